// Unit tests of the C library's parts, with expectations derived by hand from the rules they implement
// (tokenizers' Unigram/Metaspace/added-token semantics, FlagEmbedding's sparse rule). The id-for-id
// comparison with Hugging Face tokenizers itself is in tests/test_capi_tokenizer.py.
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>

#include "batching.h"
#include "error.h"
#include "manifest.h"
#include "ort_session.h"
#include "postprocess.h"
#include "tokenizer.h"

namespace {

int failures = 0;
int checks = 0;

#define CHECK(cond)                                                          \
    do {                                                                     \
        ++checks;                                                            \
        if (!(cond)) {                                                       \
            ++failures;                                                      \
            std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                    \
    } while (0)

using Ids = std::vector<int64_t>;

// A small Unigram tokenizer.json: pieces and scores chosen so the best segmentation is known by hand.
std::string tokenizer_json(const std::string& normalizer, const std::string& pre_tokenizer, const std::string& added,
                           bool byte_fallback = false) {
    return R"({"version":"1.0","truncation":null,"padding":null,
      "added_tokens":[{"id":0,"content":"<s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
                      {"id":2,"content":"</s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true})" +
           added + R"(],
      "normalizer":)" + normalizer + R"(,
      "pre_tokenizer":)" + pre_tokenizer + R"(,
      "post_processor":{"type":"TemplateProcessing","single":[{"SpecialToken":{"id":"<s>","type_id":0}},{"Sequence":{"id":"A","type_id":0}},{"SpecialToken":{"id":"</s>","type_id":0}}],
        "pair":[],"special_tokens":{"<s>":{"id":"<s>","ids":[0],"tokens":["<s>"]},"</s>":{"id":"</s>","ids":[2],"tokens":["</s>"]}}},
      "decoder":{"type":"Metaspace","replacement":"\u2581","prepend_scheme":"always","split":true},
      "model":{"type":"Unigram","unk_id":3,"byte_fallback":)" + (byte_fallback ? "true" : "false") + R"(,"vocab":[
        ["<s>",0.0],["<pad>",0.0],["</s>",0.0],["<unk>",0.0],
        ["\u2581",-2.0],["a",-3.0],["b",-3.0],["ab",-4.0],["\u2581ab",-1.0],["abc",-20.0],["c",-3.0],
        ["\u2581a",-2.5],["<mask>",0.0],["<0xC3>",-9.0],["<0xA9>",-9.0],["x",-1.0],["xx",-1.5]]}})";
}

const std::string kMetaspace = R"({"type":"Metaspace","replacement":"\u2581","prepend_scheme":"always","split":true})";
const std::string kMask = R"(,{"id":12,"content":"<mask>","single_word":false,"lstrip":true,"rstrip":false,"normalized":false,"special":true})";

Ids encode(const m3rt::TextTokenizer& tok, const std::string& text, bool specials = false, size_t max_length = 0) {
    return tok.encode(text, specials, max_length).ids;
}

void test_unigram_viterbi() {
    auto tok = m3rt::TextTokenizer::from_json(tokenizer_json("null", kMetaspace, ""), "test");
    // "▁ab": the single piece (-1) beats ▁+ab (-6), ▁a+b (-5.5), ▁+a+b (-8).
    CHECK(encode(*tok, "ab") == (Ids{8}));
    // "▁abc": ▁ab + c = -4 beats ▁ + abc = -22.
    CHECK(encode(*tok, "abc") == (Ids{8, 10}));
    // "xxx" -> "▁xxx": ▁ + xx + x (-4.5) and ▁ + x + xx (-4.5) tie; the strictly-better rule keeps the
    // first path found, which reaches position 3 via "xx" then extends with "x".
    CHECK(encode(*tok, "xxx") == (Ids{4, 15, 16}));
    // Unknown characters: each is an unk node (min score - 10); consecutive ones fuse into ONE unk id.
    CHECK(encode(*tok, "a\u00e9\u00e9b") == (Ids{11, 3, 6}));
    // Specials from the template; truncation keeps the first max_length - 2 ids.
    CHECK(encode(*tok, "ab c", true) == (Ids{0, 8, 4, 10, 2}));
    const m3rt::Encoding cut = tok->encode("ab c", true, 3);
    CHECK(cut.ids == (Ids{0, 8, 2}));
    CHECK(cut.truncated);
    CHECK(!tok->encode("ab c", true, 5).truncated);
    CHECK(encode(*tok, "") == Ids{});
    CHECK(encode(*tok, "", true) == (Ids{0, 2}));
}

void test_byte_fallback() {
    auto tok = m3rt::TextTokenizer::from_json(tokenizer_json("null", kMetaspace, "", true), "test");
    // "é" = C3 A9 is not a piece: byte fallback spells it with <0xC3><0xA9>.
    CHECK(encode(*tok, "a\u00e9") == (Ids{11, 13, 14}));
}

void test_metaspace_and_spaces() {
    auto tok = m3rt::TextTokenizer::from_json(tokenizer_json("null", kMetaspace, ""), "test");
    // "a  b" -> "▁a▁▁b" -> pieces ▁a | ▁ | ▁b (each replacement starts a piece).
    CHECK(encode(*tok, "a  b") == (Ids{11, 4, 4, 6}));
    // A trailing space: "▁a▁" -> ▁a | ▁.
    CHECK(encode(*tok, "a ") == (Ids{11, 4}));
    const std::string never = R"({"type":"Metaspace","replacement":"\u2581","prepend_scheme":"never","split":true})";
    auto tok_never = m3rt::TextTokenizer::from_json(tokenizer_json("null", never, ""), "test");
    CHECK(encode(*tok_never, "ab") == (Ids{7}));
    // Legacy field: add_prefix_space=false goes with prepend_scheme=never, and alone contradicts the
    // default scheme (always): tokenizers refuses the file, so does this library.
    const std::string legacy = R"({"type":"Metaspace","replacement":"\u2581","add_prefix_space":false,"prepend_scheme":"never"})";
    auto tok_legacy = m3rt::TextTokenizer::from_json(tokenizer_json("null", legacy, ""), "test");
    CHECK(encode(*tok_legacy, "ab") == (Ids{7}));
    bool refused = false;
    try {
        m3rt::TextTokenizer::from_json(
            tokenizer_json("null", R"({"type":"Metaspace","replacement":"\u2581","add_prefix_space":false})", ""), "test");
    } catch (const m3rt::Error&) {
        refused = true;
    }
    CHECK(refused);
    const std::string ws = R"({"type":"Sequence","pretokenizers":[{"type":"WhitespaceSplit"},)" + kMetaspace + "]}";
    auto tok_ws = m3rt::TextTokenizer::from_json(tokenizer_json("null", ws, ""), "test");
    // WhitespaceSplit drops the spaces, then each word gets its own ▁.
    CHECK(encode(*tok_ws, " ab \t c ") == (Ids{8, 4, 10}));
}

void test_normalizers() {
    const std::string strip_replace =
        R"({"type":"Sequence","normalizers":[{"type":"Strip","strip_left":true,"strip_right":true},
            {"type":"Replace","pattern":{"Regex":" {2,}"},"content":" "},{"type":"Replace","pattern":{"String":"q"},"content":"a"}]})";
    auto tok = m3rt::TextTokenizer::from_json(tokenizer_json(strip_replace, kMetaspace, ""), "test");
    // Strip, then runs of spaces become one: "a b" -> ▁a | ▁b, and ▁b is ▁ + b.
    CHECK(encode(*tok, "  a    b  ") == (Ids{11, 4, 6}));
    CHECK(encode(*tok, "qb") == (Ids{8}));
    auto nfkc = m3rt::TextTokenizer::from_json(tokenizer_json(R"({"type":"NFKC"})", kMetaspace, ""), "test");
    // Full-width Ａ (U+FF41 ａ) -> a under NFKC.
    CHECK(encode(*nfkc, "\uff41b") == (Ids{8}));
}

void test_added_tokens() {
    auto tok = m3rt::TextTokenizer::from_json(tokenizer_json("null", kMetaspace, kMask), "test");
    // Specials in the text are extracted before normalisation; the text around them is its own sequence
    // (each gets the ▁ prefix).
    CHECK(encode(*tok, "ab</s>ab") == (Ids{8, 2, 8}));
    // <mask> has lstrip: the spaces before it belong to it; " ab" after it already starts with ▁.
    CHECK(encode(*tok, "ab   <mask> ab") == (Ids{8, 12, 8}));
    CHECK(encode(*tok, "<s>") == (Ids{0}));
    // Leftmost-longest: "</s>" wins over nothing shorter; "<s" alone is plain text (all unknown).
    CHECK(encode(*tok, "<s") == (Ids{4, 3}));
    const std::string single_word =
        R"(,{"id":15,"content":"x","single_word":true,"lstrip":false,"rstrip":true,"normalized":false,"special":false})";
    auto sw = m3rt::TextTokenizer::from_json(tokenizer_json("null", kMetaspace, single_word), "test");
    // "x" inside a word is not the added token; standing alone (then rstrip takes the space) it is.
    CHECK(encode(*sw, "axb") == (Ids{11, 15, 6}));
    CHECK(encode(*sw, "a x b") == (Ids{11, 4, 15, 4, 6}));
}

void test_refuses_unknown_components() {
    auto refused = [](const std::string& json) {
        try {
            m3rt::TextTokenizer::from_json(json, "test");
        } catch (const m3rt::Error& e) {
            return e.code() == M3RT_UNSUPPORTED;
        }
        return false;
    };
    CHECK(refused(tokenizer_json(R"({"type":"Lowercase"})", kMetaspace, "")));
    CHECK(refused(tokenizer_json("null", R"({"type":"ByteLevel"})", "")));
    std::string bpe = tokenizer_json("null", kMetaspace, "");
    bpe.replace(bpe.find("\"type\":\"Unigram\""), 16, "\"type\":\"BPE\"");
    CHECK(refused(bpe));
}

void test_utf8_validation() {
    CHECK(m3rt::find_invalid_utf8("plain \xe2\x96\x81 text") == std::string::npos);
    CHECK(m3rt::find_invalid_utf8("ab\xc0\xaf") == 2);         // overlong '/'
    CHECK(m3rt::find_invalid_utf8("\xed\xa0\x80") == 0);        // a surrogate
    CHECK(m3rt::find_invalid_utf8("ok\xe2\x96") == 2);          // truncated sequence
    CHECK(m3rt::find_invalid_utf8("\xf4\x90\x80\x80") == 0);    // above U+10FFFF
}

void test_sparse_aggregation() {
    const std::vector<int64_t> unused = {0, 1, 2, 3};  // cls, pad, eos, unk
    const float nan = std::numeric_limits<float>::quiet_NaN();
    //                 <s>   7     9    7     3(unk) 11    9     11    </s>
    const int64_t ids[] = {0, 7, 9, 7, 3, 11, 9, 11, 2};
    const float w[] = {5.0f, 0.2f, 0.0f, 0.7f, 9.0f, -1.0f, 0.4f, nan, 3.0f};
    const m3rt::SparseRow row = m3rt::aggregate_sparse(ids, w, 9, unused);
    // 7: max(0.2, 0.7); 9: 0.0 is dropped (not > 0), 0.4 kept -> first KEPT occurrence is position 6;
    // 11: -1 and NaN dropped; specials dropped whatever their weight.
    CHECK(row.ids == (Ids{7, 9}));
    CHECK(row.weights.size() == 2 && row.weights[0] == 0.7f && row.weights[1] == 0.4f);
    const m3rt::SparseRow empty = m3rt::aggregate_sparse(ids, w, 0, unused);
    CHECK(empty.ids.empty());
}

void test_batching() {
    // Longest first; at most batch_size rows and token_budget padded tokens; a text over budget alone.
    const auto batches = m3rt::plan_batches({3, 10, 5, 10, 20}, 8, 20);
    CHECK(batches.size() == 3);
    CHECK(batches[0] == (std::vector<size_t>{4}));
    CHECK(batches[1] == (std::vector<size_t>{1, 3}));
    CHECK(batches[2] == (std::vector<size_t>{2, 0}));
    const auto by_size = m3rt::plan_batches({1, 1, 1, 1, 1}, 2, 100);
    CHECK(by_size.size() == 3 && by_size[2] == (std::vector<size_t>{4}));
    CHECK(m3rt::plan_batches({}, 4, 10).empty());
    CHECK(m3rt::plan_batches({50}, 4, 10).size() == 1);
}

void test_out_of_memory_splits_batches() {
    // A fake run that cannot take more than 2 rows: the batch is retried as halves, in order.
    std::vector<std::vector<size_t>> ran;
    auto run = [&](const std::vector<size_t>& rows) {
        if (rows.size() > 2) throw m3rt::Error(M3RT_OUT_OF_MEMORY, "ONNX Runtime Run: Failed to allocate memory");
        ran.push_back(rows);
    };
    m3rt::run_splitting_on_oom({4, 1, 3, 0, 2}, run);
    CHECK(ran == (std::vector<std::vector<size_t>>{{4, 1}, {3}, {0, 2}}));
    // A single row that does not fit, and any other error, are reported.
    bool reported = false;
    try {
        m3rt::run_splitting_on_oom({7}, [](const std::vector<size_t>&) { throw m3rt::Error(M3RT_OUT_OF_MEMORY, "oom"); });
    } catch (const m3rt::Error& e) {
        reported = e.code() == M3RT_OUT_OF_MEMORY;
    }
    CHECK(reported);
    int calls = 0;
    try {
        m3rt::run_splitting_on_oom({1, 2}, [&](const std::vector<size_t>&) {
            ++calls;
            throw m3rt::Error(M3RT_RUNTIME_ERROR, "other");
        });
    } catch (const m3rt::Error&) {
    }
    CHECK(calls == 1);
    CHECK(m3rt::is_out_of_memory("ONNX Runtime Run: BFCArena::AllocateRawInternal Failed to allocate memory"));
    CHECK(m3rt::is_out_of_memory("std::bad_alloc"));
    CHECK(!m3rt::is_out_of_memory("Invalid input name"));
}

template <typename F>
m3rt_code code_of(F&& f) {
    try {
        f();
    } catch (const m3rt::Error& e) {
        return e.code();
    }
    return M3RT_OK;
}

void test_device_parsing() {
    // The Python runtime's parse_device: "cpu", "cuda" (device 0), "cuda:N"; case and outer spaces ignored.
    CHECK(m3rt::parse_device("cpu") == -1);
    CHECK(m3rt::parse_device("cuda") == 0);
    CHECK(m3rt::parse_device("cuda:0") == 0);
    CHECK(m3rt::parse_device("cuda:3") == 3);
    CHECK(m3rt::parse_device(" CUDA:12 ") == 12);
    for (const char* bad : {"", "gpu", "cuda:", "cuda:-1", "cuda:x", "cuda:1.5", "cuda: 1", "cuda:99999999999"}) {
        CHECK(code_of([&] { m3rt::parse_device(bad); }) == M3RT_INVALID_ARGUMENT);
    }
}

void test_graph_selection() {
    // The Python runtime's select_graph / int8_graph_for rules.
    int probes = 0;
    auto request = [&](const char* precision, bool cuda, bool exact) {
        m3rt::GraphRequest r;
        r.precision = precision;
        r.cuda = cuda;
        r.u8s8_exact = [&probes, exact] { ++probes; return exact; };
        return r;
    };
    const std::vector<std::string> both = {"fp32", "fp32-flash", "fp16", "fp16-fused", "int8", "int8-u8"};
    CHECK(m3rt::select_graph(both, request("int8", false, true)) == "int8");
    CHECK(m3rt::select_graph(both, request("int8", false, false)) == "int8-u8");
    CHECK(probes == 2);
    CHECK(m3rt::select_graph({"fp32", "int8-u8"}, request("int8", false, true)) == "int8-u8");
    CHECK(m3rt::select_graph({"fp32", "int8"}, request("int8", false, false)) == "int8");
    CHECK(probes == 2);  // no choice to make: no probe
    CHECK(m3rt::select_graph(both, request("fp32", false, true)) == "fp32-flash");
    CHECK(m3rt::select_graph(both, request("fp32", true, true)) == "fp32");
    CHECK(m3rt::select_graph(both, request("fp16", true, true)) == "fp16-fused");
    CHECK(m3rt::select_graph(both, request("fp16", false, true)) == "fp16");
    m3rt::GraphRequest named = request("int8", false, false);
    named.graph = "int8";
    CHECK(m3rt::select_graph(both, named) == "int8");
    CHECK(code_of([&] { m3rt::select_graph(both, request("int4", false, true)); }) == M3RT_INVALID_ARGUMENT);
}

void test_manifest_paths_stay_inside() {
    namespace fs = std::filesystem;
    const fs::path root = fs::temp_directory_path() / ("m3rt-unit-" + std::to_string(::getpid()));
    fs::create_directories(root);
    auto manifest = [&](const std::string& graph_file, const std::string& tokenizer_file, int colbert_dim) {
        std::ofstream(root / "m3rt.json")
            << R"({"format":"m3rt-artifact","format_version":1,"files":{},"graphs":{"fp32":{"file":")" << graph_file
            << R"(","outputs":{"dense_vecs":{},"sparse_weights":{},"colbert_vecs":{}}}},
                 "model":{"hidden_size":8,"vocab_size":10,"max_length":16,"colbert_dim":)" << colbert_dim
            << R"(},"special_tokens":{"pad":1},"tokenizer":{"file":")" << tokenizer_file << R"("}})";
    };
    m3rt::GraphRequest fp32;
    manifest("model.onnx", "tokenizer.json", 8);
    CHECK(code_of([&] { m3rt::read_artifact(root.string(), fp32, false); }) == M3RT_OK);
    for (const char* bad : {"../outside.onnx", "/etc/passwd", "sub/../../x", ""}) {
        manifest(bad, "tokenizer.json", 8);
        CHECK(code_of([&] { m3rt::read_artifact(root.string(), fp32, false); }) == M3RT_ARTIFACT_ERROR);
        manifest("model.onnx", bad, 8);
        CHECK(code_of([&] { m3rt::read_artifact(root.string(), fp32, false); }) == M3RT_ARTIFACT_ERROR);
    }
    manifest("model.onnx", "tokenizer.json", 0);  // a ColBERT dimension of 0 would divide by zero later
    CHECK(code_of([&] { m3rt::read_artifact(root.string(), fp32, false); }) == M3RT_ARTIFACT_ERROR);
    fs::remove_all(root);
}

void test_truncation_reads_a_prefix() {
    // With a max_length, the tokens are those of the whole text cut to max_length, whatever is after
    // the part that yields them: a long tail (here invalid for the model: unknown) is never tokenised.
    auto tok = m3rt::TextTokenizer::from_json(tokenizer_json("null", kMetaspace, kMask), "test");
    std::string text;
    for (int i = 0; i < 3000; ++i) text += i % 3 ? "ab a<mask> " : "abc  x ";
    const Ids whole = encode(*tok, text, true);
    for (size_t max_length : {size_t{2}, size_t{3}, size_t{10}, size_t{500}, size_t{4000}, whole.size(), whole.size() + 1}) {
        const m3rt::Encoding cut = tok->encode(text, true, max_length);
        const size_t n = std::min(max_length, whole.size());
        Ids want(whole.begin(), whole.begin() + static_cast<long>(n - 1));  // <s> and the first tokens
        want.push_back(2);                                                  // </s>
        CHECK(cut.truncated == (whole.size() > max_length));
        CHECK(cut.ids == (whole.size() > max_length ? want : whole));
    }
    // A whitespace-free text has no safe cut: it is tokenised whole, still cut to max_length.
    const std::string run(20000, 'x');
    const m3rt::Encoding x = tok->encode(run, false, 5);
    CHECK(x.truncated && x.ids == (Ids{4, 16, 16, 16, 16}));  // "▁" then "xx" pieces
    CHECK(tok->encode(run, false, 0).ids.size() == 10001);
}

}  // namespace

int main() {
    const std::vector<std::pair<const char*, std::function<void()>>> tests = {
        {"unigram_viterbi", test_unigram_viterbi},   {"byte_fallback", test_byte_fallback},
        {"metaspace_and_spaces", test_metaspace_and_spaces}, {"normalizers", test_normalizers},
        {"added_tokens", test_added_tokens},         {"refuses_unknown_components", test_refuses_unknown_components},
        {"utf8_validation", test_utf8_validation},   {"sparse_aggregation", test_sparse_aggregation},
        {"batching", test_batching},                 {"out_of_memory_splits_batches", test_out_of_memory_splits_batches},
        {"device_parsing", test_device_parsing},     {"graph_selection", test_graph_selection},
        {"manifest_paths_stay_inside", test_manifest_paths_stay_inside},
        {"truncation_reads_a_prefix", test_truncation_reads_a_prefix},
    };
    for (const auto& [name, fn] : tests) {
        const int before = failures;
        try {
            fn();
        } catch (const std::exception& e) {
            ++failures;
            std::fprintf(stderr, "%s: exception: %s\n", name, e.what());
        }
        std::printf("%s %s\n", failures == before ? "PASS" : "FAIL", name);
    }
    std::printf("%d checks, %d failures\n", checks, failures);
    return failures == 0 ? 0 : 1;
}
