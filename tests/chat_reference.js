// node tests/chat_reference.js TOKENIZER_JSON TOKENIZER_CONFIG_JSON < conversations.json
// The reference for test_byte_level.py's chat test: each conversation (a list
// of {role, content} messages) is rendered by the chat_template in
// TOKENIZER_CONFIG_JSON with @huggingface/jinja (the renderer Hugging Face's
// JavaScript libraries use), then the rendered text is tokenized by
// transformers.js' tokenizer, which turns the special tokens written in it
// into their ids. One line of ids per conversation.
const fs = require("fs");
const path = require("path");
const npm = path.resolve(__dirname, "../build/npm/node_modules");
const { Template } = require(path.join(npm, "@huggingface/jinja"));
const { TokenizerLoader } = require(path.join(npm, "@lenml/tokenizers"));
const config = JSON.parse(fs.readFileSync(process.argv[3], "utf-8"));
const tok = TokenizerLoader.fromPreTrained({
    tokenizerJSON: JSON.parse(fs.readFileSync(process.argv[2], "utf-8")),
    tokenizerConfig: config,
});
const template = new Template(config.chat_template);
for (const messages of JSON.parse(fs.readFileSync(0, "utf-8"))) {
    const text = template.render({ messages, bos_token: config.bos_token, add_generation_prompt: true });
    process.stdout.write(tok.encode(text, { add_special_tokens: false }).join(" ") + "\n");
}
