// The C ABI: argument checks, exceptions -> m3rt_status, and the encode pipeline
// (tokenise -> plan batches -> run -> post-process -> results in input order).
#include <algorithm>
#include <cstddef>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "batching.h"
#include "error.h"
#include "m3rt.h"
#include "manifest.h"
#include "ort_session.h"
#include "postprocess.h"
#include "tokenizer.h"

#ifdef M3RT_WITH_CUDA
#include "cuda_sparse.h"
#endif

struct m3rt_status {
    m3rt_code code;
    std::string message;
};

struct m3rt_tokenizer {
    std::unique_ptr<m3rt::TextTokenizer> impl;
};

struct m3rt_model {
    m3rt::ArtifactInfo info;
    m3rt_tokenizer tokenizer;
    std::unique_ptr<m3rt::OrtSessionRunner> session;
    int64_t token_budget = 8192;
    int cuda_device = -1;  // -1: the CPU
};

struct m3rt_result {
    size_t count = 0;
    int64_t dense_dim = 0, colbert_dim = 0;
    bool has_dense = false, has_sparse = false, has_colbert = false;
    std::vector<float> dense;
    std::vector<int64_t> indptr, indices;
    std::vector<float> values;
    std::vector<std::vector<float>> colbert;
};

namespace {

// Returned when even the status cannot be allocated; never freed.
m3rt_status g_out_of_memory{M3RT_OUT_OF_MEMORY, "out of memory"};

// What an accessor returns for a requested but empty array (a NULL would read as "not requested").
const float kNoFloats[1] = {0.0f};
const int64_t kNoIds[1] = {0};

m3rt_status* make_status(m3rt_code code, const std::string& message) {
    try {
        return new m3rt_status{code, message};
    } catch (...) {
        return &g_out_of_memory;
    }
}

template <typename F>
m3rt_status* guarded(F&& body) {
    try {
        body();
        return nullptr;
    } catch (const m3rt::Error& e) {
        return make_status(e.code(), e.what());
    } catch (const std::bad_alloc&) {
        return make_status(M3RT_OUT_OF_MEMORY, "out of memory");
    } catch (const std::exception& e) {
        return make_status(M3RT_RUNTIME_ERROR, e.what());
    } catch (...) {
        return make_status(M3RT_RUNTIME_ERROR, "unknown error");
    }
}

[[noreturn]] void invalid(const std::string& message) { throw m3rt::Error(M3RT_INVALID_ARGUMENT, message); }

std::string_view text_at(const char* const* texts, const size_t* lengths, size_t i) {
    if (!texts[i]) invalid("texts[" + std::to_string(i) + "] is NULL");
    return lengths ? std::string_view(texts[i], lengths[i]) : std::string_view(texts[i]);
}

// Options structs from callers built against an older m3rt.h are shorter: what they have is taken,
// the fields added since keep their defaults. `oldest` is the size of the struct's first version.
template <typename Options>
void take_options(Options& opts, const Options* given, size_t oldest, const char* name) {
    if (!given) return;
    if (given->struct_size < oldest || given->struct_size > sizeof(Options)) {
        invalid(std::string(name) + ".struct_size is " + std::to_string(given->struct_size) + ", expected " +
                std::to_string(oldest) + ".." + std::to_string(sizeof(Options)) +
                ": initialise it with its _init function (a larger size means a newer m3rt.h than this library)");
    }
    std::memcpy(static_cast<void*>(&opts), given, given->struct_size);
    opts.struct_size = sizeof(Options);
}

// The first m3rt_load_options ended with token_budget.
constexpr size_t kLoadOptionsV1 = offsetof(m3rt_load_options, token_budget) + sizeof(int64_t);

void check_utf8(std::string_view text, size_t index) {
    if (text.size() > M3RT_MAX_TEXT_BYTES) {
        throw m3rt::Error(M3RT_INPUT_TOO_LONG, "text " + std::to_string(index) + " is " + std::to_string(text.size()) +
                                                   " bytes, over M3RT_MAX_TEXT_BYTES (" +
                                                   std::to_string(M3RT_MAX_TEXT_BYTES) + "): split it");
    }
    const size_t bad = m3rt::find_invalid_utf8(text);
    if (bad != std::string::npos) {
        throw m3rt::Error(M3RT_INVALID_INPUT, "text " + std::to_string(index) + " is not valid UTF-8 (at byte " +
                                                  std::to_string(bad) + "); repair it first, e.g. replace invalid "
                                                  "sequences with U+FFFD");
    }
}

m3rt::Encoding encode_checked(const m3rt::TextTokenizer& tok, std::string_view text, size_t index, size_t max_length,
                              bool truncate) {
    check_utf8(text, index);
    m3rt::Encoding enc = tok.encode(text, true, max_length);
    if (enc.truncated && !truncate) {
        throw m3rt::Error(M3RT_INPUT_TOO_LONG, "text " + std::to_string(index) + " is longer than max_length=" +
                                                   std::to_string(max_length) + " tokens (special tokens included); "
                                                   "shorten it, raise max_length, or set truncate=1");
    }
    return enc;
}

void run_batch(const m3rt_model& model, const std::vector<m3rt::Encoding>& encodings, const std::vector<size_t>& batch,
               unsigned outputs, m3rt_result& result, std::vector<m3rt::SparseRow>& sparse) {
    const int64_t rows = static_cast<int64_t>(batch.size());
    int64_t width = 0;
    for (size_t i : batch) width = std::max<int64_t>(width, static_cast<int64_t>(encodings[i].ids.size()));
    std::vector<int64_t> ids(static_cast<size_t>(rows * width), model.info.pad_id), mask(ids.size(), 0);
    for (int64_t r = 0; r < rows; ++r) {
        const auto& seq = encodings[batch[static_cast<size_t>(r)]].ids;
        std::copy(seq.begin(), seq.end(), ids.begin() + r * width);
        std::fill(mask.begin() + r * width, mask.begin() + r * width + static_cast<int64_t>(seq.size()), 1);
    }
    std::vector<const char*> names;
    if (outputs & M3RT_OUTPUT_DENSE) names.push_back("dense_vecs");
    if (outputs & M3RT_OUTPUT_SPARSE) names.push_back("sparse_weights");
    if (outputs & M3RT_OUTPUT_COLBERT) names.push_back("colbert_vecs");
    const std::vector<m3rt::HostTensor> out = model.session->run(ids, mask, rows, width, names);
    size_t k = 0;
    if (outputs & M3RT_OUTPUT_DENSE) {
        const auto& t = out[k++];
        const int64_t dim = result.dense_dim;
        if (t.values.size() != static_cast<size_t>(rows * dim)) {
            throw m3rt::Error(M3RT_RUNTIME_ERROR, "dense_vecs has an unexpected shape for hidden size " + std::to_string(dim));
        }
        for (int64_t r = 0; r < rows; ++r) {
            std::copy(t.values.begin() + r * dim, t.values.begin() + (r + 1) * dim,
                      result.dense.begin() + static_cast<int64_t>(batch[static_cast<size_t>(r)]) * dim);
        }
    }
    if (outputs & M3RT_OUTPUT_SPARSE) {
        const auto& t = out[k++];
        if (t.values.size() != static_cast<size_t>(rows * width)) {
            throw m3rt::Error(M3RT_RUNTIME_ERROR, "sparse_weights does not have one weight per token");
        }
#ifdef M3RT_WITH_CUDA
        if (model.cuda_device >= 0) {
            std::vector<m3rt::SparseRow> rows_out =
                m3rt::aggregate_sparse_cuda(model.cuda_device, ids.data(), mask.data(), t.values.data(), rows, width, model.info.unused_ids);
            for (int64_t r = 0; r < rows; ++r) sparse[batch[static_cast<size_t>(r)]] = std::move(rows_out[static_cast<size_t>(r)]);
        } else
#endif
        for (int64_t r = 0; r < rows; ++r) {
            const size_t index = batch[static_cast<size_t>(r)];
            sparse[index] = m3rt::aggregate_sparse(ids.data() + r * width, t.values.data() + r * width,
                                                   static_cast<int64_t>(encodings[index].ids.size()), model.info.unused_ids);
        }
    }
    if (outputs & M3RT_OUTPUT_COLBERT) {
        const auto& t = out[k++];
        const int64_t dim = result.colbert_dim;
        const int64_t per_row = std::max<int64_t>(width - 1, 0) * dim;
        if (t.values.size() != static_cast<size_t>(rows * per_row)) {
            throw m3rt::Error(M3RT_RUNTIME_ERROR, "colbert_vecs has an unexpected shape for dimension " + std::to_string(dim));
        }
        for (int64_t r = 0; r < rows; ++r) {
            const size_t index = batch[static_cast<size_t>(r)];
            const int64_t n = std::max<int64_t>(static_cast<int64_t>(encodings[index].ids.size()) - 1, 0);
            const auto begin = t.values.begin() + r * per_row;
            result.colbert[index].assign(begin, begin + n * dim);
        }
    }
}

}  // namespace

extern "C" {

m3rt_code m3rt_status_code(const m3rt_status* status) { return status ? status->code : M3RT_OK; }
const char* m3rt_status_message(const m3rt_status* status) { return status ? status->message.c_str() : ""; }
void m3rt_status_free(m3rt_status* status) {
    if (status != &g_out_of_memory) delete status;
}

const char* m3rt_version(void) { return M3RT_VERSION_STRING; }
int m3rt_abi_version(void) { return M3RT_ABI_VERSION; }

void m3rt_load_options_init(m3rt_load_options* o) {
    if (!o) return;
    std::memset(o, 0, sizeof *o);
    o->struct_size = sizeof *o;
    o->verify = 1;
    o->token_budget = 8192;
}

void m3rt_encode_options_init(m3rt_encode_options* o) {
    if (!o) return;
    std::memset(o, 0, sizeof *o);
    o->struct_size = sizeof *o;
    o->truncate = 0;
    o->batch_size = 256;
    o->outputs = M3RT_OUTPUT_ALL;
}

m3rt_status* m3rt_model_load(const char* artifact_dir, const m3rt_load_options* options, m3rt_model** out) {
    return guarded([&] {
        if (!artifact_dir || !out) invalid("artifact_dir and out must not be NULL");
        *out = nullptr;
        m3rt_load_options opts;
        m3rt_load_options_init(&opts);
        take_options(opts, options, kLoadOptionsV1, "m3rt_load_options");
        if (opts.token_budget <= 0) invalid("token_budget must be > 0");
        if (opts.intra_op_threads < 0) invalid("intra_op_threads must be >= 0");
        if (opts.use_cuda != 0 && opts.use_cuda != 1) invalid("use_cuda must be 0 or 1");
        m3rt::SessionOptions so;
        so.library = opts.onnxruntime_library ? opts.onnxruntime_library : "";
        so.intra_op_threads = opts.intra_op_threads;
        so.cuda_device = opts.device ? m3rt::parse_device(opts.device) : (opts.use_cuda ? 0 : -1);
        if (opts.device && opts.use_cuda && so.cuda_device < 0) invalid("use_cuda=1 contradicts device '" + std::string(opts.device) + "'");
        const bool cuda = so.cuda_device >= 0;
        m3rt::GraphRequest request;
        request.graph = opts.graph ? opts.graph : "";
        request.precision = opts.precision ? opts.precision : "fp32";
        request.cuda = cuda;
        request.u8s8_exact = [&so] { return m3rt::probe_u8s8_exact(so); };
        auto model = std::make_unique<m3rt_model>();
        model->info = m3rt::read_artifact(artifact_dir, request, opts.verify != 0);
        const auto& backends = model->info.backends;
        const std::string wanted = cuda ? "onnxruntime-cuda" : "onnxruntime-cpu";
        if (!backends.empty() && std::find(backends.begin(), backends.end(), wanted) == backends.end()) {
            std::string served;
            for (const auto& b : backends) served += (served.empty() ? "" : ", ") + b;
            throw m3rt::Error(M3RT_UNSUPPORTED, "graph '" + model->info.graph_name + "' is made for " + served +
                                                    ", not " + wanted + " (pick another graph, e.g. fp32 or int8)");
        }
        const std::string& provider = model->info.execution_provider;
        if (!provider.empty() && provider != "CPUExecutionProvider" && !(cuda && provider == "CUDAExecutionProvider")) {
            throw m3rt::Error(M3RT_UNSUPPORTED, "graph '" + model->info.graph_name + "' runs only on " + provider +
                                                    (provider == "CUDAExecutionProvider" ? " (set use_cuda=1)" : ""));
        }
        model->tokenizer.impl = m3rt::TextTokenizer::from_file(model->info.tokenizer_path);
        model->session = std::make_unique<m3rt::OrtSessionRunner>(model->info.graph_path, so);
        model->token_budget = opts.token_budget;
        model->cuda_device = so.cuda_device;
        *out = model.release();
    });
}

void m3rt_model_free(m3rt_model* model) { delete model; }

int64_t m3rt_model_hidden_size(const m3rt_model* m) { return m ? m->info.hidden_size : 0; }
int64_t m3rt_model_colbert_dim(const m3rt_model* m) { return m ? m->info.colbert_dim : 0; }
int64_t m3rt_model_max_length(const m3rt_model* m) { return m ? m->info.max_length : 0; }
int64_t m3rt_model_vocab_size(const m3rt_model* m) { return m ? m->info.vocab_size : 0; }
const m3rt_tokenizer* m3rt_model_tokenizer(const m3rt_model* m) { return m ? &m->tokenizer : nullptr; }
const char* m3rt_model_graph(const m3rt_model* m) { return m ? m->info.graph_name.c_str() : ""; }
int m3rt_model_cuda_device(const m3rt_model* m) { return m ? m->cuda_device : -1; }

m3rt_status* m3rt_encode(const m3rt_model* model, const char* const* texts, const size_t* lengths, size_t count,
                         const m3rt_encode_options* options, m3rt_result** out) {
    return guarded([&] {
        if (!model || !out || (count > 0 && !texts)) invalid("model, texts and out must not be NULL");
        *out = nullptr;
        m3rt_encode_options opts;
        m3rt_encode_options_init(&opts);
        take_options(opts, options, sizeof(m3rt_encode_options), "m3rt_encode_options");
        const int64_t max_length = opts.max_length == 0 ? model->info.max_length : opts.max_length;
        if (max_length < 2 || max_length > model->info.max_length) {
            invalid("max_length must be in 2.." + std::to_string(model->info.max_length) + " (it counts <s> and </s>)");
        }
        if (opts.batch_size <= 0) invalid("batch_size must be > 0");
        if (opts.outputs & ~M3RT_OUTPUT_ALL) invalid("outputs has unknown bits");
        auto result = std::make_unique<m3rt_result>();
        result->count = count;
        result->dense_dim = model->info.hidden_size;
        result->colbert_dim = model->info.colbert_dim;
        result->has_dense = opts.outputs & M3RT_OUTPUT_DENSE;
        result->has_sparse = opts.outputs & M3RT_OUTPUT_SPARSE;
        result->has_colbert = opts.outputs & M3RT_OUTPUT_COLBERT;
        // Every text is tokenised (and so checked) before anything runs.
        std::vector<m3rt::Encoding> encodings(count);
        std::vector<size_t> lengths_in_tokens(count);
        for (size_t i = 0; i < count; ++i) {
            encodings[i] = encode_checked(*model->tokenizer.impl, text_at(texts, lengths, i), i,
                                          static_cast<size_t>(max_length), opts.truncate != 0);
            lengths_in_tokens[i] = encodings[i].ids.size();
        }
        if (result->has_dense) result->dense.assign(count * static_cast<size_t>(result->dense_dim), 0.0f);
        if (result->has_colbert) result->colbert.resize(count);
        std::vector<m3rt::SparseRow> sparse(result->has_sparse ? count : 0);
        if (opts.outputs != 0) {
            for (const auto& batch : m3rt::plan_batches(lengths_in_tokens, static_cast<size_t>(opts.batch_size),
                                                        static_cast<size_t>(model->token_budget))) {
                m3rt::run_splitting_on_oom(batch, [&](const std::vector<size_t>& rows) {
                    run_batch(*model, encodings, rows, opts.outputs, *result, sparse);
                });
            }
        }
        if (result->has_sparse) {
            result->indptr.assign(count + 1, 0);
            for (size_t i = 0; i < count; ++i) result->indptr[i + 1] = result->indptr[i] + static_cast<int64_t>(sparse[i].ids.size());
            result->indices.reserve(static_cast<size_t>(result->indptr[count]));
            result->values.reserve(static_cast<size_t>(result->indptr[count]));
            for (const auto& row : sparse) {
                result->indices.insert(result->indices.end(), row.ids.begin(), row.ids.end());
                result->values.insert(result->values.end(), row.weights.begin(), row.weights.end());
            }
        }
        *out = result.release();
    });
}

size_t m3rt_result_count(const m3rt_result* r) { return r ? r->count : 0; }

const float* m3rt_result_dense(const m3rt_result* r, int64_t* dim) {
    if (dim) *dim = r && r->has_dense ? r->dense_dim : 0;
    if (!r || !r->has_dense) return nullptr;
    return r->dense.empty() ? kNoFloats : r->dense.data();
}

int m3rt_result_sparse(const m3rt_result* r, const int64_t** indptr, const int64_t** indices, const float** values) {
    const bool ok = r && r->has_sparse;
    if (indptr) *indptr = ok ? r->indptr.data() : nullptr;
    if (indices) *indices = ok ? (r->indices.empty() ? kNoIds : r->indices.data()) : nullptr;
    if (values) *values = ok ? (r->values.empty() ? kNoFloats : r->values.data()) : nullptr;
    return ok ? 1 : 0;
}

const float* m3rt_result_colbert(const m3rt_result* r, size_t index, int64_t* rows, int64_t* dim) {
    const bool ok = r && r->has_colbert && index < r->count;
    if (rows) *rows = ok && r->colbert_dim > 0 ? static_cast<int64_t>(r->colbert[index].size()) / r->colbert_dim : 0;
    if (dim) *dim = ok ? r->colbert_dim : 0;
    if (!ok) return nullptr;
    return r->colbert[index].empty() ? kNoFloats : r->colbert[index].data();
}

void m3rt_result_free(m3rt_result* r) { delete r; }

m3rt_status* m3rt_tokenizer_load(const char* path, m3rt_tokenizer** out) {
    return guarded([&] {
        if (!path || !out) invalid("path and out must not be NULL");
        *out = nullptr;
        auto tok = std::make_unique<m3rt_tokenizer>();
        tok->impl = m3rt::TextTokenizer::from_file(path);
        *out = tok.release();
    });
}

void m3rt_tokenizer_free(m3rt_tokenizer* tokenizer) { delete tokenizer; }

m3rt_status* m3rt_tokenize(const m3rt_tokenizer* tokenizer, const char* text, size_t length, int add_special_tokens,
                           int64_t max_length, int truncate, int64_t** ids, size_t* count) {
    return guarded([&] {
        if (!tokenizer || !ids || !count || (!text && length > 0)) invalid("tokenizer, text, ids and count must not be NULL");
        *ids = nullptr;
        *count = 0;
        if (max_length < 0) invalid("max_length must be >= 0");
        const std::string_view view(text ? text : "", length);
        check_utf8(view, 0);
        m3rt::Encoding enc = tokenizer->impl->encode(view, add_special_tokens != 0, static_cast<size_t>(max_length));
        if (enc.truncated && !truncate) {
            throw m3rt::Error(M3RT_INPUT_TOO_LONG, "the text is longer than max_length=" + std::to_string(max_length) + " tokens");
        }
        auto* buffer = static_cast<int64_t*>(std::malloc(std::max<size_t>(enc.ids.size(), 1) * sizeof(int64_t)));
        if (!buffer) throw std::bad_alloc();
        std::copy(enc.ids.begin(), enc.ids.end(), buffer);
        *ids = buffer;
        *count = enc.ids.size();
    });
}

void m3rt_ids_free(int64_t* ids) { std::free(ids); }

const char* m3rt_tokenizer_id_to_text(const m3rt_tokenizer* tokenizer, int64_t id) {
    if (!tokenizer) return nullptr;
    const std::string* s = tokenizer->impl->id_to_text(id);
    return s ? s->c_str() : nullptr;
}

int64_t m3rt_tokenizer_vocab_size(const m3rt_tokenizer* tokenizer) {
    return tokenizer ? static_cast<int64_t>(tokenizer->impl->vocab_size()) : 0;
}

}  // extern "C"
