// libFuzzer: tokenizer.json parsing. A loaded tokenizer also tokenises a few texts.
#include <cstddef>
#include <cstdint>
#include <string>

#include "error.h"
#include "tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const std::string json(reinterpret_cast<const char*>(data), size);
    try {
        const auto tokenizer = m3rt::TextTokenizer::from_json(json, "fuzz input");
        for (const char* text : {"", "a b  c", "<s> <mask>x\u00e9\u65e5\u672c", " \t\n"}) {
            tokenizer->encode(text, true, 0);
            tokenizer->encode(text, true, 3);
        }
        for (int64_t id = -1; id < 40; ++id) tokenizer->id_to_text(id);
    } catch (const m3rt::Error&) {
    }
    return 0;
}
