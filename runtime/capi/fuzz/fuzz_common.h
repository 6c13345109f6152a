// Shared by the libFuzzer targets: the tokenizer they tokenise with, and what counts as a failure
// (any exception other than m3rt::Error, any crash or sanitizer report).
#pragma once

#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>

#include "tokenizer.h"

namespace m3rt_fuzz {

// A Unigram tokenizer with every component kind the library implements (added tokens with lstrip,
// rstrip and single_word, NFKC, Replace, Strip, Metaspace, byte fallback). $M3RT_FUZZ_TOKENIZER names a
// tokenizer.json to use instead (CI: the real XLM-R one).
inline const char* kTokenizerJson = R"({"version":"1.0",
  "added_tokens":[
    {"id":0,"content":"<s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
    {"id":2,"content":"</s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
    {"id":12,"content":"<mask>","single_word":false,"lstrip":true,"rstrip":false,"normalized":false,"special":true},
    {"id":17,"content":"word","single_word":true,"lstrip":false,"rstrip":true,"normalized":true,"special":false}],
  "normalizer":{"type":"Sequence","normalizers":[{"type":"NFKC"},
    {"type":"Replace","pattern":{"Regex":" {2,}"},"content":" "},{"type":"Strip","strip_left":false,"strip_right":true}]},
  "pre_tokenizer":{"type":"Sequence","pretokenizers":[{"type":"WhitespaceSplit"},
    {"type":"Metaspace","replacement":"\u2581","prepend_scheme":"always","split":true}]},
  "post_processor":{"type":"TemplateProcessing","single":[{"SpecialToken":{"id":"<s>","type_id":0}},{"Sequence":{"id":"A","type_id":0}},{"SpecialToken":{"id":"</s>","type_id":0}}],
    "pair":[],"special_tokens":{"<s>":{"id":"<s>","ids":[0],"tokens":["<s>"]},"</s>":{"id":"</s>","ids":[2],"tokens":["</s>"]}}},
  "decoder":{"type":"Metaspace","replacement":"\u2581","prepend_scheme":"always","split":true},
  "model":{"type":"Unigram","unk_id":3,"byte_fallback":true,"vocab":[
    ["<s>",0.0],["<pad>",0.0],["</s>",0.0],["<unk>",0.0],["\u2581",-2.0],["a",-3.0],["b",-3.0],["ab",-4.0],
    ["\u2581ab",-1.0],["abc",-20.0],["c",-3.0],["\u2581a",-2.5],["<mask>",0.0],["<0xC3>",-9.0],["<0xA9>",-9.0],
    ["x",-1.0],["xx",-1.5],["word",-1.0],["\u65e5",-4.0],["\u65e5\u672c",-5.0]]}})";

inline std::unique_ptr<m3rt::TextTokenizer> load_tokenizer() {
    if (const char* path = std::getenv("M3RT_FUZZ_TOKENIZER"); path && *path) return m3rt::TextTokenizer::from_file(path);
    return m3rt::TextTokenizer::from_json(kTokenizerJson, "fuzz tokenizer");
}

}  // namespace m3rt_fuzz
