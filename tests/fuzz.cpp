// libFuzzer targets for everything that reads untrusted bytes: `make fuzz`.
// One file, compiled once per target with -DFUZZ_<NAME> (and -DQUANTIZED for
// runq.cpp's loader), always with AddressSanitizer + UBSan. fatal() throws
// here (RUN_FATAL_THROWS) so that a refused input is an ordinary outcome; any
// crash, sanitizer report, leak or hang is a finding.
//
//   checkpoint  the bytes are a checkpoint file: load it (version 0/1 in run,
//               2 or 3 in runq), then run one forward pass on it if it loads
//   tokenizer   the bytes are a tokenizer.bin for a 512-token model: load it,
//               then encode and decode a sample text with it
//   encode      the bytes are a prompt for stories260K's tokenizer
//   encode-bpe  the same for a byte-level BPE (build/fuzz/seeds/tokenizer/bpe512.bin)
//   cli         the bytes, split at NULs, are the command line

#define RUN_NO_MAIN
#define RUN_FATAL_THROWS
#pragma GCC diagnostic ignored "-Wunused-function"
#ifdef QUANTIZED
#include "../runq.cpp"
#else
#include "../run.cpp"
#endif

#include <string>
#include <vector>

// The loaders take a path, as the engines do: each input goes through a file.
static std::string as_file(const uint8_t* data, size_t size) {
    static const std::string path = "/tmp/fuzz-input-" + std::to_string(getpid());
    std::FILE* f = std::fopen(path.c_str(), "wb");
    if (!f || std::fwrite(data, 1, size, f) != size || std::fclose(f) != 0) std::abort();
    return path;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    try {
#if defined(FUZZ_CHECKPOINT)
        const std::string path = as_file(data, size);
        Transformer tr{load_checkpoint(path.c_str()), {}};
        const Config& c = tr.config();
        tr.state = make_run_state(c, std::min(c.seq_len, 4), size % 2 == 1);  // either KV cache
        const int tokens[2] = {kBos, c.vocab_size - 1};
        forward(tr, tokens, std::min(c.seq_len, 2), 0, true);
#elif defined(FUZZ_TOKENIZER)
        const std::string path = as_file(data, size);
        const Tokenizer tok = load_tokenizer(path.c_str(), 512);
        const std::vector<int> ids = encode(tok, "Once upon a time, \xc3\xa9t\xc3\xa9 \xf0\x9f\x98\x80!\n", true);
        char byte;
        for (size_t i = 1; i < ids.size(); i++) decode(tok, ids[i - 1], ids[i], &byte);
#elif defined(FUZZ_ENCODE)
        static const Tokenizer tok = load_tokenizer(TOKENIZER_PATH, 512);
        const std::vector<int> ids = encode(tok, std::string_view((const char*)data, size), true);
        char byte;
        for (size_t i = 1; i < ids.size(); i++) decode(tok, ids[i - 1], ids[i], &byte);
#elif defined(FUZZ_CLI)
        std::vector<std::string> args{"run"};
        std::string cur;
        for (size_t i = 0; i < size; i++)
            if (data[i]) cur += (char)data[i];
            else args.push_back(cur), cur.clear();
        args.push_back(cur);
        std::vector<char*> argv;
        for (std::string& a : args) {
            if (a == "-h" || a == "--help") return 0;  // prints usage and exits: by design
            argv.push_back(a.data());
        }
        parse_args((int)argv.size(), argv.data());
#endif
    } catch (const FatalError&) {
    }
    return 0;
}
