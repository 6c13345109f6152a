// The consumer tests/test_capi_install.py builds against an installed m3rt: loads an artifact, encodes
// the texts given as arguments and prints each dense vector (one line of floats per text).
//   consumer ARTIFACT TEXT...   (ONNX Runtime: $M3RT_ONNXRUNTIME_LIBRARY or beside libm3rt)
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <m3rt.hpp>

int main(int argc, char** argv) {
    if (argc < 2) return 2;
    if (std::strcmp(m3rt_version(), M3RT_VERSION_STRING) != 0 || m3rt_abi_version() != M3RT_ABI_VERSION) {
        std::fprintf(stderr, "header %s / library %s\n", M3RT_VERSION_STRING, m3rt_version());
        return 3;
    }
    try {
        const m3rt::Model model(argv[1]);
        const std::vector<std::string> texts(argv + 2, argv + argc);
        const m3rt::Result result = model.encode(texts);
        for (size_t i = 0; i < result.size(); ++i) {
            int64_t dim = 0;
            const float* v = result.dense(i, &dim);
            for (int64_t k = 0; k < dim; ++k) std::printf(k ? " %.9g" : "%.9g", v[k]);
            std::printf("\n");
        }
    } catch (const m3rt::Exception& e) {
        std::fprintf(stderr, "%s\n", e.what());
        return 1;
    }
    return 0;
}
