// libFuzzer: tokenisation of arbitrary bytes. Byte 0 picks the options (special tokens, max_length);
// the rest is the text, refused when it is not UTF-8 as the C API refuses it.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "error.h"
#include "fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    static const auto tokenizer = m3rt_fuzz::load_tokenizer();
    if (size == 0) return 0;
    const bool specials = data[0] & 1;
    const size_t max_length = (data[0] >> 1) == 0 ? 0 : (data[0] >> 1) + 1;  // 0 or 2..128
    const std::string_view text(reinterpret_cast<const char*>(data + 1), size - 1);
    if (m3rt::find_invalid_utf8(text) != std::string_view::npos) return 0;
    try {
        const m3rt::Encoding enc = tokenizer->encode(text, specials, max_length);
        if (max_length > 0 && enc.ids.size() > max_length) __builtin_trap();
        for (int64_t id : enc.ids) {
            if (!tokenizer->id_to_text(id)) __builtin_trap();  // every id has a text
        }
        // Truncation keeps the first tokens of the whole text's.
        if (max_length > 0 && enc.truncated) {
            const m3rt::Encoding whole = tokenizer->encode(text, false, 0);
            const size_t offset = specials ? 1 : 0;
            for (size_t i = offset; i + offset < enc.ids.size(); ++i) {
                if (enc.ids[i] != whole.ids[i - offset]) __builtin_trap();
            }
        }
    } catch (const m3rt::Error&) {
    }
    return 0;
}
