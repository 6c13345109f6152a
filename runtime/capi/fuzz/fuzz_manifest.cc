// libFuzzer: m3rt.json parsing (no file is read: hashes are not verified and paths are only checked).
#include <cstddef>
#include <cstdint>
#include <string>

#include "error.h"
#include "manifest.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const std::string text(reinterpret_cast<const char*>(data), size);
    for (const char* precision : {"fp32", "int8"}) {
        m3rt::GraphRequest request;
        request.precision = precision;
        request.u8s8_exact = [] { return false; };
        try {
            const m3rt::ArtifactInfo info = m3rt::parse_manifest("/nonexistent-artifact", text, request, false);
            if (info.hidden_size <= 0 || info.colbert_dim <= 0 || info.max_length < 2) __builtin_trap();
            if (info.graph_path.rfind("/nonexistent-artifact/", 0) != 0) __builtin_trap();
        } catch (const m3rt::Error&) {
        }
    }
    return 0;
}
