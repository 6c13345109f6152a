// Tokenises texts through the C API and prints their ids: one text per record, records separated by
// NUL bytes on stdin (texts may hold newlines), one line of space-separated ids per text on stdout.
// Built with sanitizers, it runs the tokenizer comparison of tests/test_capi_sanitizers.py natively.
// usage: m3rt_tokenize_check TOKENIZER_JSON [MAX_LENGTH]
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <iterator>
#include <string>

#include "m3rt.hpp"

int main(int argc, char** argv) {
    if (argc < 2) {
        std::cerr << "usage: m3rt_tokenize_check TOKENIZER_JSON [MAX_LENGTH]\n";
        return 2;
    }
    const int64_t max_length = argc > 2 ? std::atoll(argv[2]) : 0;
    try {
        m3rt::Tokenizer tokenizer(argv[1]);
        const std::string input((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
        size_t start = 0;
        while (start < input.size()) {
            size_t stop = input.find('\0', start);
            if (stop == std::string::npos) stop = input.size();
            std::string line;
            try {
                for (int64_t id : tokenizer.encode(std::string_view(input).substr(start, stop - start), true, max_length)) {
                    line += std::to_string(id) + ' ';
                }
            } catch (const m3rt::Exception& e) {
                line = "error " + std::to_string(e.code());
            }
            std::cout << line << '\n';
            start = stop + 1;
        }
    } catch (const m3rt::Exception& e) {
        std::cerr << e.what() << '\n';
        return 1;
    }
    return 0;
}
