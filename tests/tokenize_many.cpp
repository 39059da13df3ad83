// tokenize_many TOKENIZER VOCAB_SIZE < strings: encodes each NUL-terminated
// string on stdin with run.cpp's encoder (BOS included) and prints its ids on
// one line. Lets the tests compare thousands of strings with sentencepiece
// without starting a process per string.

#define RUN_NO_MAIN
#pragma GCC diagnostic ignored "-Wunused-function"
#include "../run.cpp"

int main(int argc, char** argv) {
    if (argc != 3) fatal("usage: tokenize_many TOKENIZER VOCAB_SIZE < NUL-separated strings");
    Tokenizer tok = load_tokenizer(argv[1], std::atoi(argv[2]));
    std::string s;
    while (std::getline(std::cin, s, '\0')) {
        const std::vector<int> ids = encode(tok, s, true);
        for (size_t i = 0; i < ids.size(); i++) std::printf(i ? " %d" : "%d", ids[i]);
        std::printf("\n");
    }
    return 0;
}
