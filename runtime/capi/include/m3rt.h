/*
 * m3rt C API: BGE-M3 embeddings (dense, sparse, ColBERT) from an m3rt artifact directory.
 *
 * The library loads the artifact that `m3-export` writes (m3rt.json, the ONNX graph, tokenizer.json),
 * verifies the manifest's sha256 hashes, tokenises exactly as Hugging Face `tokenizers` does with the
 * artifact's tokenizer.json, batches texts by token budget, runs ONNX Runtime (loaded at run time) and
 * returns the three outputs with FlagEmbedding's post-processing.
 *
 * Conventions:
 *  - Every fallible call returns an m3rt_status*: NULL on success, otherwise an object holding a code
 *    and a message that the caller frees with m3rt_status_free.
 *  - Objects returned through out-parameters are owned by the caller and freed with their _free call.
 *  - A loaded m3rt_model may be used from many threads at once (m3rt_encode, m3rt_tokenize);
 *    m3rt_model_free must not race with them. Results are independent of the model once returned.
 *  - Texts are UTF-8; invalid UTF-8 is reported as M3RT_INVALID_INPUT naming the text.
 *  - Option structs carry their size: initialise them with the matching _init function, then set fields.
 *    A program built against an older m3rt.h passes its smaller struct_size and gets the defaults for the
 *    fields added since; a struct_size larger than this library's struct is refused (M3RT_INVALID_ARGUMENT).
 *  - Input texts are at most M3RT_MAX_TEXT_BYTES bytes (longer: M3RT_INPUT_TOO_LONG). With truncation on,
 *    only the part of a text that can reach the token limit is normalised and tokenised.
 */
#ifndef M3RT_H
#define M3RT_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define M3RT_API __declspec(dllexport)
#else
#define M3RT_API __attribute__((visibility("default")))
#endif

/* A status that is ignored is an error that is lost. */
#if defined(__GNUC__) || defined(__clang__)
#define M3RT_NODISCARD __attribute__((warn_unused_result))
#else
#define M3RT_NODISCARD
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* The release (m3rt_version() returns the library's own) and the ABI version, which is the shared
   library's SOVERSION (libm3rt.so.1) and its symbol version node (M3RT_1). */
#define M3RT_VERSION_MAJOR 0
#define M3RT_VERSION_MINOR 2
#define M3RT_VERSION_PATCH 0
#define M3RT_VERSION_STRING "0.2.0"
#define M3RT_ABI_VERSION 1

/* The longest text (in bytes) m3rt_encode and m3rt_tokenize accept. Tokenising costs about 3 bytes of
   memory per byte of the text it reads (its normalised copies and the Viterbi lattice) plus the ids
   (8 bytes each, while being returned up to 3 copies). With truncation it reads only the start of
   the text up to a safe cut that yields max_length tokens, unless the text has no such cut (a
   whitespace-free run): at most 64 MiB read, 192 MiB, measured in benchmarks/RESULTS.md. */
#define M3RT_MAX_TEXT_BYTES ((size_t)64 << 20)

typedef enum m3rt_code {
    M3RT_OK = 0,
    M3RT_INVALID_ARGUMENT = 1, /* a NULL pointer, an option out of range */
    M3RT_ARTIFACT_ERROR = 2,   /* missing/corrupt artifact file, hash mismatch, bad manifest */
    M3RT_UNSUPPORTED = 3,      /* a tokenizer.json component or graph this library does not implement */
    M3RT_INVALID_INPUT = 4,    /* a text that is not valid UTF-8 */
    M3RT_INPUT_TOO_LONG = 5,   /* a text longer than max_length tokens with truncation off, or over
                                  M3RT_MAX_TEXT_BYTES bytes */
    M3RT_RUNTIME_ERROR = 6,    /* ONNX Runtime could not be loaded or failed */
    M3RT_OUT_OF_MEMORY = 7     /* an allocation failed even for one text (larger batches are split and retried) */
} m3rt_code;

typedef struct m3rt_status m3rt_status;
typedef struct m3rt_model m3rt_model;
typedef struct m3rt_tokenizer m3rt_tokenizer;
typedef struct m3rt_result m3rt_result;

M3RT_API m3rt_code m3rt_status_code(const m3rt_status* status);
M3RT_API const char* m3rt_status_message(const m3rt_status* status);
M3RT_API void m3rt_status_free(m3rt_status* status);

/* The library's own version ("0.2.0") and ABI version (compare with the macros above). */
M3RT_API const char* m3rt_version(void);
M3RT_API int m3rt_abi_version(void);

/* ---- loading ---- */

typedef struct m3rt_load_options {
    size_t struct_size;              /* sizeof(m3rt_load_options), set by m3rt_load_options_init */
    const char* onnxruntime_library; /* path of libonnxruntime.so.1*; NULL: $M3RT_ONNXRUNTIME_LIBRARY,
                                        else the one found next to this library or by the loader */
    const char* graph;               /* artifact graph to run by name; NULL: the one `precision` picks */
    int verify;                      /* 1 (default): check every listed file's size and sha256 */
    int intra_op_threads;            /* ONNX Runtime threads per run; 0 (default): ONNX Runtime's choice */
    int use_cuda;                    /* 1: run on ONNX Runtime's CUDA provider (the device `device`
                                        names, else device 0); fails with M3RT_RUNTIME_ERROR when the
                                        library has none. Default 0. */
    int64_t token_budget;            /* padded tokens per batch (rows x longest row); default 8192 */
    /* ---- ABI 1, added in 0.2.0 ---- */
    const char* precision;           /* "fp32" (default), "fp16" or "int8", as M3Model.load: on the CPU,
                                        fp32 runs the artifact's fp32-flash graph when it has one and
                                        int8 runs the int8 form this CPU's ONNX Runtime GEMM sums exactly
                                        (int8 or int8-u8, the Python runtime's probe); on CUDA, fp16 runs
                                        fp16-fused when present. Ignored when `graph` names one. */
    const char* device;              /* "cpu", "cuda" or "cuda:N" as the Python runtime takes it; NULL:
                                        "cuda:0" when use_cuda is 1, else "cpu" */
} m3rt_load_options;

M3RT_API void m3rt_load_options_init(m3rt_load_options* options);

/* Load an artifact directory. `options` may be NULL (defaults). */
M3RT_NODISCARD M3RT_API m3rt_status* m3rt_model_load(const char* artifact_dir, const m3rt_load_options* options,
                                      m3rt_model** out);
M3RT_API void m3rt_model_free(m3rt_model* model);

M3RT_API int64_t m3rt_model_hidden_size(const m3rt_model* model);   /* dense dimension */
M3RT_API int64_t m3rt_model_colbert_dim(const m3rt_model* model);   /* ColBERT vector dimension */
M3RT_API int64_t m3rt_model_max_length(const m3rt_model* model);    /* tokens, <s> and </s> included */
M3RT_API int64_t m3rt_model_vocab_size(const m3rt_model* model);
/* The model's tokenizer (owned by the model; valid until m3rt_model_free). */
M3RT_API const m3rt_tokenizer* m3rt_model_tokenizer(const m3rt_model* model);
/* The artifact graph the model runs ("fp32", "int8-u8", ...; owned by the model). */
M3RT_API const char* m3rt_model_graph(const m3rt_model* model);
/* The CUDA device index the model runs on, -1 on the CPU. */
M3RT_API int m3rt_model_cuda_device(const m3rt_model* model);

/* ---- encoding ---- */

#define M3RT_OUTPUT_DENSE 1u
#define M3RT_OUTPUT_SPARSE 2u
#define M3RT_OUTPUT_COLBERT 4u
#define M3RT_OUTPUT_ALL 7u

typedef struct m3rt_encode_options {
    size_t struct_size; /* sizeof(m3rt_encode_options), set by m3rt_encode_options_init */
    int64_t max_length; /* tokens per text, <s> and </s> included; 0 (default): the model's maximum */
    int truncate;       /* 0 (default): a longer text fails the call with M3RT_INPUT_TOO_LONG;
                           1: cut it to max_length tokens, as FlagEmbedding does */
    int64_t batch_size; /* texts per batch at most; default 256 */
    unsigned outputs;   /* M3RT_OUTPUT_* bits; default M3RT_OUTPUT_ALL */
} m3rt_encode_options;

M3RT_API void m3rt_encode_options_init(m3rt_encode_options* options);

/* Encode `count` UTF-8 texts. `lengths` gives each text's length in bytes; NULL: NUL-terminated texts.
   `options` may be NULL (defaults). On success *out holds exactly `count` rows, in input order. */
M3RT_NODISCARD M3RT_API m3rt_status* m3rt_encode(const m3rt_model* model, const char* const* texts, const size_t* lengths,
                                  size_t count, const m3rt_encode_options* options, m3rt_result** out);

M3RT_API size_t m3rt_result_count(const m3rt_result* result);
/* Dense vectors, row-major [count, *dim] (L2-normalised); NULL when not requested. */
M3RT_API const float* m3rt_result_dense(const m3rt_result* result, int64_t* dim);
/* Sparse weights as CSR: row r holds indices[indptr[r]..indptr[r+1]) with values alongside, in order of
   each token id's first occurrence in the text (FlagEmbedding's dict order). Returns 0 when not requested. */
M3RT_API int m3rt_result_sparse(const m3rt_result* result, const int64_t** indptr, const int64_t** indices,
                                const float** values);
/* ColBERT vectors of text `index`: row-major [*rows, *dim] (one per token after <s>, normalised);
   NULL when not requested or index is out of range (then *rows = 0). */
M3RT_API const float* m3rt_result_colbert(const m3rt_result* result, size_t index, int64_t* rows, int64_t* dim);
M3RT_API void m3rt_result_free(m3rt_result* result);

/* ---- tokenisation ---- */

/* Load a Hugging Face tokenizer.json on its own (no model). Components other than those BGE-M3's
   tokenizers use are refused with M3RT_UNSUPPORTED naming them. */
M3RT_NODISCARD M3RT_API m3rt_status* m3rt_tokenizer_load(const char* tokenizer_json_path, m3rt_tokenizer** out);
M3RT_API void m3rt_tokenizer_free(m3rt_tokenizer* tokenizer);

/* Token ids of one UTF-8 text. add_special_tokens: apply the post-processor template (<s> ... </s>).
   max_length > 0 limits the ids (special tokens included) as tokenizers' truncation does; with
   truncate = 0 a longer text fails with M3RT_INPUT_TOO_LONG instead. The ids are freed with m3rt_ids_free. */
M3RT_NODISCARD M3RT_API m3rt_status* m3rt_tokenize(const m3rt_tokenizer* tokenizer, const char* text, size_t length,
                                    int add_special_tokens, int64_t max_length, int truncate, int64_t** ids,
                                    size_t* count);
M3RT_API void m3rt_ids_free(int64_t* ids);

/* The text of one token id as tokenizers' decode([id]) gives it (special tokens kept). NULL for an id
   outside the vocabulary. Owned by the tokenizer. */
M3RT_API const char* m3rt_tokenizer_id_to_text(const m3rt_tokenizer* tokenizer, int64_t id);
M3RT_API int64_t m3rt_tokenizer_vocab_size(const m3rt_tokenizer* tokenizer);

#ifdef __cplusplus
}
#endif

#endif /* M3RT_H */
