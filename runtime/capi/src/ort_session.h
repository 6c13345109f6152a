// ONNX Runtime through its C API, loaded at run time (dlopen + OrtGetApiBase): any library whose API
// version is at or above the headers' works, and nothing links against a particular build.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

struct OrtApi;
struct OrtEnv;
struct OrtSession;
struct OrtMemoryInfo;

namespace m3rt {

struct SessionOptions {
    std::string library;  // path of libonnxruntime.so.1*, "" = search
    int intra_op_threads = 0;
    int cuda_device = -1;  // CUDA device index; -1: the CPU
};

// Where to run: "cpu", "cuda" or "cuda:N", as the Python runtime's parse_device reads it (-1: the CPU).
// Throws m3rt::Error(M3RT_INVALID_ARGUMENT) for anything else.
int parse_device(const std::string& device);

// Whether this ONNX Runtime's CPU u8 x s8 GEMM sums 255 * 127 pairs exactly (no int16 saturation):
// the Python runtime's probe (m3rt.int8_kernel.probe_u8s8_exact), on the same graph. Cached per library.
bool probe_u8s8_exact(const SessionOptions& options);

// One model output as host float32: `shape` and the values, row-major.
struct HostTensor {
    std::vector<int64_t> shape;
    std::vector<float> values;
};

// Whether an ONNX Runtime error message is an allocation failure.
bool is_out_of_memory(std::string message);

class OrtSessionRunner {
 public:
    OrtSessionRunner(const std::string& model_path, const SessionOptions& options);
    ~OrtSessionRunner();
    OrtSessionRunner(const OrtSessionRunner&) = delete;
    OrtSessionRunner& operator=(const OrtSessionRunner&) = delete;

    // Runs input_ids/attention_mask [rows, width] and returns the named outputs. Thread-safe.
    std::vector<HostTensor> run(const std::vector<int64_t>& input_ids, const std::vector<int64_t>& attention_mask,
                                int64_t rows, int64_t width, const std::vector<const char*>& outputs) const;
    const std::string& library_path() const { return library_path_; }

 private:
    void check(void* status, const char* what) const;

    void* handle_ = nullptr;
    const OrtApi* api_ = nullptr;
    OrtEnv* env_ = nullptr;
    OrtSession* session_ = nullptr;
    OrtMemoryInfo* cpu_ = nullptr;
    std::string library_path_;
};

}  // namespace m3rt
