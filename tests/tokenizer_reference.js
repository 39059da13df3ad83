// node tests/tokenizer_reference.js TOKENIZER_JSON TOKENIZER_CONFIG_JSON < strings
// The reference for test_byte_level.py: transformers.js' tokenizer (the npm
// package @lenml/tokenizers, installed into build/npm), written independently
// of ours, loading a real tokenizer.json. Each NUL-terminated string on stdin
// is decoded as UTF-8 (ill-formed bytes become U+FFFD, as TextDecoder does;
// a leading U+FEFF stays text); two lines are printed for it: its ids, without BOS or any special token, and
// the hex bytes of those ids decoded back to text. Special-token text stays
// text, as in our encoder: the strings go through the tokenizer's
// pre-tokenizer and BPE model directly, the steps encode() takes for text that
// holds no added token (checked against encode() for such strings).
const fs = require("fs");
const path = require("path");
const { TokenizerLoader } = require(path.resolve(__dirname, "../build/npm/node_modules/@lenml/tokenizers"));
const tok = TokenizerLoader.fromPreTrained({
    tokenizerJSON: JSON.parse(fs.readFileSync(process.argv[2], "utf-8")),
    tokenizerConfig: JSON.parse(fs.readFileSync(process.argv[3], "utf-8")),
});
const added = tok.added_tokens.map((t) => t.content);
const input = fs.readFileSync(0);
const out = [];
let start = 0;
for (let i = 0; i < input.length; i++) {
    if (input[i] !== 0) continue;
    const text = new TextDecoder("utf-8", { ignoreBOM: true }).decode(input.subarray(start, i));
    start = i + 1;
    const words = tok.pre_tokenizer ? tok.pre_tokenizer(text) : [text];
    const ids = tok.model.convert_tokens_to_ids(tok.model(words));
    if (!added.some((a) => text.includes(a))) {
        const api = tok.encode(text, { add_special_tokens: false });
        if (api.join(" ") !== ids.join(" ")) throw new Error(`encode() disagrees on ${JSON.stringify(text)}`);
    }
    const back = ids.length ? tok.decode(ids, { skip_special_tokens: false, clean_up_tokenization_spaces: false }) : "";
    out.push(ids.join(" "), Buffer.from(back, "utf-8").toString("hex"));
}
process.stdout.write(out.map((l) => l + "\n").join(""));
