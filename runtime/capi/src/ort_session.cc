#include "ort_session.h"

#include <dlfcn.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <cstring>

#define ORT_API_MANUAL_INIT
#include <onnxruntime_c_api.h>

#include "error.h"
#include "int8_probe_model.h"

#include <map>
#include <mutex>

namespace m3rt {
namespace {

// The folder holding this library, for an ONNX Runtime placed beside it.
std::string own_directory() {
    Dl_info info{};
    if (dladdr(reinterpret_cast<void*>(&own_directory), &info) && info.dli_fname) {
        std::string path = info.dli_fname;
        const size_t slash = path.rfind('/');
        if (slash != std::string::npos) return path.substr(0, slash + 1);
    }
    return "";
}

void* open_library(const std::string& requested, std::string& opened) {
    std::vector<std::string> candidates;
    if (!requested.empty()) {
        candidates.push_back(requested);
    } else {
        if (const char* env = std::getenv("M3RT_ONNXRUNTIME_LIBRARY"); env && *env) candidates.emplace_back(env);
        const std::string here = own_directory();
        if (!here.empty()) candidates.push_back(here + "libonnxruntime.so.1");
        candidates.emplace_back("libonnxruntime.so.1");
        candidates.emplace_back("libonnxruntime.so");
    }
    std::string errors;
    for (const auto& path : candidates) {
        if (void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL)) {
            opened = path;
            return h;
        }
        const char* e = dlerror();
        errors += "\n  " + path + ": " + (e ? e : "not found");
    }
    throw Error(M3RT_RUNTIME_ERROR,
                "cannot load ONNX Runtime (set m3rt_load_options.onnxruntime_library or M3RT_ONNXRUNTIME_LIBRARY to "
                "a libonnxruntime.so.1*, e.g. the onnxruntime wheel's onnxruntime/capi/libonnxruntime.so.1.*); tried:" +
                    errors);
}

}  // namespace

int parse_device(const std::string& device) {
    size_t first = 0, last = device.size();
    while (first < last && std::isspace(static_cast<unsigned char>(device[first]))) ++first;
    while (last > first && std::isspace(static_cast<unsigned char>(device[last - 1]))) --last;
    std::string text = device.substr(first, last - first);
    for (auto& c : text) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (text == "cpu") return -1;
    if (text == "cuda") return 0;
    if (text.rfind("cuda:", 0) == 0) {
        const std::string index = text.substr(5);
        if (!index.empty() && index.size() <= 6 &&
            std::all_of(index.begin(), index.end(), [](unsigned char c) { return std::isdigit(c); })) {
            return std::stoi(index);
        }
    }
    throw Error(M3RT_INVALID_ARGUMENT, "device '" + device + "': expected 'cpu', 'cuda' or 'cuda:N'");
}

bool probe_u8s8_exact(const SessionOptions& options) {
    static std::mutex mutex;
    static std::map<std::string, bool> cache;
    std::string path;
    void* handle = open_library(options.library, path);
    std::lock_guard<std::mutex> lock(mutex);
    if (auto it = cache.find(path); it != cache.end()) return it->second;
    auto get_base = reinterpret_cast<const OrtApiBase* (*)()>(dlsym(handle, "OrtGetApiBase"));
    const OrtApi* api = get_base ? get_base()->GetApi(ORT_API_VERSION) : nullptr;
    if (!api) throw Error(M3RT_RUNTIME_ERROR, path + " is not an ONNX Runtime this library can use");
    OrtEnv* env = nullptr;
    OrtSessionOptions* so = nullptr;
    OrtSession* session = nullptr;
    OrtMemoryInfo* cpu = nullptr;
    OrtValue* input = nullptr;
    OrtValue* output = nullptr;
    auto check = [&](OrtStatus* status, const char* what) {
        if (!status) return;
        const std::string message = std::string("ONNX Runtime int8 probe ") + what + ": " + api->GetErrorMessage(status);
        api->ReleaseStatus(status);
        throw Error(M3RT_RUNTIME_ERROR, message);
    };
    bool exact = false;
    std::vector<uint8_t> a(16 * kInt8ProbeK, 255);
    try {
        check(api->CreateEnv(ORT_LOGGING_LEVEL_ERROR, "m3rt-int8-probe", &env), "CreateEnv");
        check(api->CreateSessionOptions(&so), "CreateSessionOptions");
        check(api->SetIntraOpNumThreads(so, 1), "SetIntraOpNumThreads");
        check(api->CreateSessionFromArray(env, kInt8ProbeModel, sizeof kInt8ProbeModel, so, &session), "CreateSession");
        check(api->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &cpu), "CreateCpuMemoryInfo");
        const int64_t shape[2] = {16, kInt8ProbeK};
        check(api->CreateTensorWithDataAsOrtValue(cpu, a.data(), a.size(), shape, 2, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,
                                                  &input), "input");
        const char* in_name = "a";
        const char* out_name = "y";
        check(api->Run(session, nullptr, &in_name, &input, 1, &out_name, 1, &output), "Run");
        void* data = nullptr;
        check(api->GetTensorMutableData(output, &data), "output");
        const auto* y = static_cast<const int32_t*>(data);
        exact = std::all_of(y, y + 16 * 8, [](int32_t v) { return v == kInt8ProbeK * 255 * 127; });
    } catch (...) {
        if (output) api->ReleaseValue(output);
        if (input) api->ReleaseValue(input);
        if (cpu) api->ReleaseMemoryInfo(cpu);
        if (session) api->ReleaseSession(session);
        if (so) api->ReleaseSessionOptions(so);
        if (env) api->ReleaseEnv(env);
        throw;
    }
    api->ReleaseValue(output);
    api->ReleaseValue(input);
    api->ReleaseMemoryInfo(cpu);
    api->ReleaseSession(session);
    api->ReleaseSessionOptions(so);
    api->ReleaseEnv(env);
    cache[path] = exact;
    return exact;
}

// ONNX Runtime reports every allocation failure (its allocators, BFC arena, cuBLAS, cuDNN, bad_alloc)
// with one error code; the text tells them apart (the markers m3rt.backends.onnxruntime uses).
bool is_out_of_memory(std::string text) {
    std::transform(text.begin(), text.end(), text.begin(), [](unsigned char c) { return std::tolower(c); });
    for (const char* marker : {"out of memory", "failed to allocate", "bad_alloc", "bad allocation",
                               "cudaerrormemoryallocation", "cublas_status_alloc_failed", "cudnn_status_alloc_failed"}) {
        if (text.find(marker) != std::string::npos) return true;
    }
    return false;
}

void OrtSessionRunner::check(void* raw, const char* what) const {
    auto* status = static_cast<OrtStatus*>(raw);
    if (!status) return;
    std::string message = std::string("ONNX Runtime ") + what + ": " + api_->GetErrorMessage(status);
    api_->ReleaseStatus(status);
    throw Error(is_out_of_memory(message) ? M3RT_OUT_OF_MEMORY : M3RT_RUNTIME_ERROR, message);
}

OrtSessionRunner::OrtSessionRunner(const std::string& model_path, const SessionOptions& options) {
    handle_ = open_library(options.library, library_path_);
    using GetApiBase = const OrtApiBase* (*)();
    auto get_base = reinterpret_cast<GetApiBase>(dlsym(handle_, "OrtGetApiBase"));
    if (!get_base) {
        dlclose(handle_);
        throw Error(M3RT_RUNTIME_ERROR, library_path_ + " has no OrtGetApiBase: not an ONNX Runtime library");
    }
    const OrtApiBase* base = get_base();
    api_ = base->GetApi(ORT_API_VERSION);
    if (!api_) {
        const std::string version = base->GetVersionString();
        dlclose(handle_);
        throw Error(M3RT_RUNTIME_ERROR, "ONNX Runtime " + version + " at " + library_path_ +
                                            " is older than the headers this library was built with (API version " +
                                            std::to_string(ORT_API_VERSION) + "); use a newer one");
    }
    OrtSessionOptions* so = nullptr;
    try {
        check(api_->CreateEnv(ORT_LOGGING_LEVEL_ERROR, "m3rt", &env_), "CreateEnv");
        check(api_->CreateSessionOptions(&so), "CreateSessionOptions");
        check(api_->SetSessionGraphOptimizationLevel(so, ORT_ENABLE_ALL), "SetSessionGraphOptimizationLevel");
        if (options.intra_op_threads > 0) check(api_->SetIntraOpNumThreads(so, options.intra_op_threads), "SetIntraOpNumThreads");
        if (options.cuda_device >= 0) {
            OrtCUDAProviderOptions cuda{};
            cuda.device_id = options.cuda_device;
            check(api_->SessionOptionsAppendExecutionProvider_CUDA(so, &cuda), "CUDA provider");
        }
        check(api_->CreateSession(env_, model_path.c_str(), so, &session_), "CreateSession");
        check(api_->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &cpu_), "CreateCpuMemoryInfo");
    } catch (...) {
        if (so) api_->ReleaseSessionOptions(so);
        if (session_) api_->ReleaseSession(session_);
        if (env_) api_->ReleaseEnv(env_);
        // The library stays loaded: ONNX Runtime does not support being unloaded and reloaded.
        throw;
    }
    api_->ReleaseSessionOptions(so);
}

OrtSessionRunner::~OrtSessionRunner() {
    if (cpu_) api_->ReleaseMemoryInfo(cpu_);
    if (session_) api_->ReleaseSession(session_);
    if (env_) api_->ReleaseEnv(env_);
}

std::vector<HostTensor> OrtSessionRunner::run(const std::vector<int64_t>& input_ids,
                                              const std::vector<int64_t>& attention_mask, int64_t rows, int64_t width,
                                              const std::vector<const char*>& outputs) const {
    const int64_t shape[2] = {rows, width};
    OrtValue* inputs[2] = {nullptr, nullptr};
    std::vector<OrtValue*> results(outputs.size(), nullptr);
    auto release = [&]() {
        for (OrtValue* v : inputs) if (v) api_->ReleaseValue(v);
        for (OrtValue* v : results) if (v) api_->ReleaseValue(v);
    };
    std::vector<HostTensor> out;
    try {
        const size_t bytes = static_cast<size_t>(rows * width) * sizeof(int64_t);
        check(api_->CreateTensorWithDataAsOrtValue(cpu_, const_cast<int64_t*>(input_ids.data()), bytes, shape, 2,
                                                   ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, &inputs[0]), "input_ids");
        check(api_->CreateTensorWithDataAsOrtValue(cpu_, const_cast<int64_t*>(attention_mask.data()), bytes, shape, 2,
                                                   ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, &inputs[1]), "attention_mask");
        const char* input_names[2] = {"input_ids", "attention_mask"};
        check(api_->Run(session_, nullptr, input_names, inputs, 2, outputs.data(), outputs.size(), results.data()), "Run");
        for (size_t k = 0; k < outputs.size(); ++k) {
            OrtTensorTypeAndShapeInfo* info = nullptr;
            check(api_->GetTensorTypeAndShape(results[k], &info), "GetTensorTypeAndShape");
            ONNXTensorElementDataType type;
            size_t dims = 0, count = 0;
            HostTensor t;
            OrtStatus* s = api_->GetTensorElementType(info, &type);
            if (!s) s = api_->GetDimensionsCount(info, &dims);
            if (!s) {
                t.shape.resize(dims);
                s = api_->GetDimensions(info, t.shape.data(), dims);
            }
            if (!s) s = api_->GetTensorShapeElementCount(info, &count);
            api_->ReleaseTensorTypeAndShapeInfo(info);
            check(s, "output shape");
            if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
                throw Error(M3RT_UNSUPPORTED, std::string("output ") + outputs[k] + " is not float32");
            }
            void* data = nullptr;
            check(api_->GetTensorMutableData(results[k], &data), "GetTensorMutableData");
            const float* f = static_cast<const float*>(data);
            t.values.assign(f, f + count);
            out.push_back(std::move(t));
        }
    } catch (...) {
        release();
        throw;
    }
    release();
    return out;
}

}  // namespace m3rt
