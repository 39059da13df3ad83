// tokenize_many TOKENIZER VOCAB_SIZE [--decode] < strings: encodes each
// NUL-terminated string on stdin with run.cpp's encoder (BOS included when the
// tokenizer has one) and prints its ids on one line; with --decode, a second
// line holds the hex bytes that decode() gives back for those ids. Lets the
// tests compare thousands of strings with a reference without starting a
// process per string.

#define RUN_NO_MAIN
#pragma GCC diagnostic ignored "-Wunused-function"
#include "../run.cpp"

int main(int argc, char** argv) {
    const bool decoded = argc == 4 && std::strcmp(argv[3], "--decode") == 0;
    if (argc != 3 && !decoded) fatal("usage: tokenize_many TOKENIZER VOCAB_SIZE [--decode] < NUL-separated strings");
    Tokenizer tok = load_tokenizer(argv[1], std::atoi(argv[2]));
    std::string s;
    while (std::getline(std::cin, s, '\0')) {
        const std::vector<int> ids = encode(tok, s, true);
        for (size_t i = 0; i < ids.size(); i++) std::printf(i ? " %d" : "%d", ids[i]);
        std::printf("\n");
        if (!decoded) continue;
        char byte;
        for (size_t i = 0; i < ids.size(); i++)
            for (unsigned char c : decode(tok, i ? ids[i - 1] : -1, ids[i], &byte)) std::printf("%02x", c);
        std::printf("\n");
    }
    return 0;
}
