// node tests/gguf_reference.js MODEL.gguf REQUEST.json LOGITS.f32 > answer.json
// The reference for test_gguf.py: llama.cpp itself, as the npm package
// node-llama-cpp ships it (prebuilt CPU library, installed into build/npm),
// loading a GGUF file on its own. The request:
//   {"context": N, "texts": [string, ...], "sequences": [[id, ...], ...],
//    "generate": [{"prompt": [id, ...], "steps": N}, ...]}
// The answer:
//   {"texts": [[id, ...]]          each text tokenized (no BOS),
//    "generate": [[id, ...]]}      greedy continuations by llama.cpp's sampler
// and in LOGITS.f32 the logits after each id of each sequence, float32
// little-endian, vocabulary-sized rows one after the other.
// The KV cache is kept in F32 (llama.cpp's default is F16) and flash attention
// is off (on the CPU it rounds to fp16: 250x our float32 error bound), so the only
// roundings are llama.cpp's own float32 arithmetic and, for Q8_0 / Q4_0 weights,
// its Q8_0 rounding of the activations.
const fs = require("fs");
const path = require("path");

async function main() {
    const { getLlama, LlamaLogLevel } = await import(path.resolve(__dirname, "../build/npm/node_modules/node-llama-cpp/dist/index.js"));
    const request = JSON.parse(fs.readFileSync(process.argv[3], "utf-8"));
    const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error });
    const model = await llama.loadModel({ modelPath: process.argv[2], gpuLayers: 0 });
    const context = await model.createContext({
        contextSize: request.context, batchSize: request.context, threads: 1, flashAttention: false,
        experimentalKvCacheKeyType: "F32", experimentalKvCacheValueType: "F32",
    });
    const toArray = (map) => {  // every id's logit, by id
        const a = new Array(map.size).fill(null);
        for (const [id, v] of map) a[id] = v;
        if (a.includes(null)) throw new Error("a logit is missing");
        return a;
    };
    const sequence = context.getSequence();  // emptied before each evaluation
    const evaluate = async (ids) => {
        await sequence.clearHistory();
        const out = await sequence.controlledEvaluate(ids.map((t) => [t, { generateNext: { logits: true } }]));
        return out.map((o) => toArray(o.next.logits));
    };
    const answer = { texts: (request.texts || []).map((t) => Array.from(model.tokenize(t))), generate: [] };
    const rows = [];
    for (const ids of request.sequences || []) rows.push(...await evaluate(ids));
    fs.writeFileSync(process.argv[4], Buffer.from(new Float32Array(rows.flat()).buffer));
    // llama.cpp's own greedy sampler (temperature 0: the argmax) picks each next token
    const greedy = { generateNext: { token: true, options: { temperature: 0 } } };
    for (const { prompt, steps } of request.generate || []) {
        await sequence.clearHistory();
        let out = await sequence.controlledEvaluate(prompt.map((t, i) => (i === prompt.length - 1 ? [t, greedy] : t)));
        const tokens = [];
        for (let s = 0; s < steps; s++) {
            tokens.push(out[out.length - 1].next.token);
            out = await sequence.controlledEvaluate([[tokens[s], greedy]]);
        }
        answer.generate.push(tokens);
    }
    process.stdout.write(JSON.stringify(answer));
    await context.dispose();
    await model.dispose();
}
main().catch((e) => { console.error(`gguf_reference.js: ${e.message}`); process.exit(1); });
