// m3rt_encode: encode texts read from stdin (one per line) with the m3rt C library and print what
// `m3rt encode ARTIFACT TEXT...` prints for them.
//
//   m3rt_encode ARTIFACT [--max-length N] [--top K] [--no-verify] [--onnxruntime LIB] [--threads N]
//                        [--repeat N]
//
// --repeat N encodes each text N more times, one at a time (batch 1), and reports the latency on stderr.
#include <unicode/uchar.h>
#include <unicode/utf8.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "m3rt.hpp"

namespace {

// Python's repr() of a str: quotes, escapes and printability as CPython decides them.
std::string python_repr(const std::string& text) {
    const bool has_single = text.find('\'') != std::string::npos;
    const bool has_double = text.find('"') != std::string::npos;
    const char quote = has_single && !has_double ? '"' : '\'';
    std::string out(1, quote);
    int32_t i = 0;
    const int32_t n = static_cast<int32_t>(text.size());
    while (i < n) {
        const int32_t start = i;
        UChar32 c;
        U8_NEXT(reinterpret_cast<const uint8_t*>(text.data()), i, n, c);
        char buf[16];
        if (c == '\\' || c == quote) {
            out += '\\';
            out += static_cast<char>(c);
        } else if (c == '\n') {
            out += "\\n";
        } else if (c == '\r') {
            out += "\\r";
        } else if (c == '\t') {
            out += "\\t";
        } else if (c < 0x20 || c == 0x7f) {
            std::snprintf(buf, sizeof buf, "\\x%02x", c);
            out += buf;
        } else if (c < 0x7f) {
            out += static_cast<char>(c);
        } else {
            // Not printable for Python: Cc, Cf, Cs, Co, Cn, Zl, Zp, Zs (and characters newer than its
            // Unicode 14 tables, which it sees as unassigned).
            const int8_t type = u_charType(c);
            UVersionInfo age;
            u_charAge(c, age);
            const bool printable = !(type == U_CONTROL_CHAR || type == U_FORMAT_CHAR || type == U_SURROGATE ||
                                     type == U_PRIVATE_USE_CHAR || type == U_UNASSIGNED || type == U_LINE_SEPARATOR ||
                                     type == U_PARAGRAPH_SEPARATOR || type == U_SPACE_SEPARATOR || age[0] > 14);
            if (printable) {
                out.append(text, static_cast<size_t>(start), static_cast<size_t>(i - start));
            } else {
                if (c <= 0xff) std::snprintf(buf, sizeof buf, "\\x%02x", c);
                else if (c <= 0xffff) std::snprintf(buf, sizeof buf, "\\u%04x", c);
                else std::snprintf(buf, sizeof buf, "\\U%08x", c);
                out += buf;
            }
        }
    }
    out += quote;
    return out;
}

// The first `count` code points of a UTF-8 string (Python's text[:count]).
std::string prefix_code_points(const std::string& text, size_t count) {
    int32_t i = 0;
    const int32_t n = static_cast<int32_t>(text.size());
    for (size_t k = 0; k < count && i < n; ++k) U8_FWD_1(text.data(), i, n);
    return text.substr(0, static_cast<size_t>(i));
}

int usage() {
    std::fprintf(stderr,
                 "usage: m3rt_encode ARTIFACT [--max-length N] [--top K] [--no-verify] [--onnxruntime LIB] "
                 "[--threads N] [--precision fp32|int8] [--device cpu|cuda:N] [--repeat N] < texts (one per line)\n");
    return 2;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 2) return usage();
    std::string artifact = argv[1];
    int64_t max_length = 8192;
    int top = 8, repeat = 0;
    m3rt_load_options load;
    m3rt_load_options_init(&load);
    for (int a = 2; a < argc; ++a) {
        const std::string arg = argv[a];
        const bool has_value = a + 1 < argc;
        if (arg == "--max-length" && has_value) max_length = std::atoll(argv[++a]);
        else if (arg == "--top" && has_value) top = std::atoi(argv[++a]);
        else if (arg == "--no-verify") load.verify = 0;
        else if (arg == "--onnxruntime" && has_value) load.onnxruntime_library = argv[++a];
        else if (arg == "--threads" && has_value) load.intra_op_threads = std::atoi(argv[++a]);
        else if (arg == "--precision" && has_value) load.precision = argv[++a];
        else if (arg == "--device" && has_value) load.device = argv[++a];
        else if (arg == "--repeat" && has_value) repeat = std::atoi(argv[++a]);
        else return usage();
    }
    std::vector<std::string> texts;
    for (std::string line; std::getline(std::cin, line);) texts.push_back(line);
    try {
        const m3rt::Model model(artifact, &load);
        m3rt_encode_options options;
        m3rt_encode_options_init(&options);
        options.max_length = max_length;
        options.truncate = 1;  // as `m3rt encode` (FlagEmbedding): cut texts at max_length
        const m3rt::Result result = model.encode(texts, &options);
        const m3rt::TokenizerRef tokenizer = model.tokenizer();
        for (size_t i = 0; i < texts.size(); ++i) {
            int64_t dim = 0;
            const float* dense = result.dense(i, &dim);
            double sum = 0.0;
            for (int64_t d = 0; d < dim; ++d) sum += static_cast<double>(dense[d]) * dense[d];
            const m3rt::SparseView sparse = result.sparse(i);
            std::vector<size_t> order(sparse.size);
            for (size_t k = 0; k < order.size(); ++k) order[k] = k;
            std::stable_sort(order.begin(), order.end(),
                             [&](size_t a, size_t b) { return sparse.weights[a] > sparse.weights[b]; });
            order.resize(std::min(order.size(), static_cast<size_t>(std::max(top, 0))));
            std::string tokens;
            for (size_t k : order) {
                char weight[32];
                std::snprintf(weight, sizeof weight, ":%.3f", static_cast<double>(sparse.weights[k]));
                if (!tokens.empty()) tokens += ", ";
                tokens += python_repr(tokenizer.id_to_text(sparse.ids[k])) + weight;
            }
            const m3rt::MatrixView colbert = result.colbert(i);
            std::printf("text: %s\n", python_repr(prefix_code_points(texts[i], 70)).c_str());
            std::printf("  dense   norm %.6f  dim %lld\n", static_cast<double>(static_cast<float>(std::sqrt(sum))),
                        static_cast<long long>(dim));
            std::printf("  sparse  %zu tokens; top %zu: %s\n", sparse.size, order.size(), tokens.c_str());
            std::printf("  colbert shape (%lld, %lld)\n", static_cast<long long>(colbert.rows),
                        static_cast<long long>(colbert.dim));
        }
        if (repeat > 0 && !texts.empty()) {
            std::vector<double> ms;
            for (int r = 0; r < repeat; ++r) {
                for (const auto& text : texts) {
                    const auto t0 = std::chrono::steady_clock::now();
                    model.encode({text}, &options);
                    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
                }
            }
            std::sort(ms.begin(), ms.end());
            std::fprintf(stderr, "latency batch 1: median %.3f ms, p90 %.3f ms over %zu calls\n", ms[ms.size() / 2],
                         ms[ms.size() * 9 / 10], ms.size());
        }
    } catch (const m3rt::Exception& e) {
        std::fprintf(stderr, "m3rt_encode: %s\n", e.what());
        return 1;
    }
    return 0;
}
