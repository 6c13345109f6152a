// m3rt device kernels: sparse (lexical) aggregation and ColBERT compaction.
//
// Usable as is from C++ (nvcc, launch with <<<>>> or the driver API by name) and from NVRTC, which
// m3rt.kernels.device uses at run time. NVRTC has no system headers, so only built-in types appear
// here: `long long` is int64, `int` is int32, `unsigned int` is uint32.
//
// All arrays are dense, row-major and on the device. CPU twins with the reference semantics:
// kernels/sparse.py (aggregate_sparse) and kernels/colbert.py (split_colbert).
//
// Sparse aggregation of a batch [B, S] (one stream, in this order):
//   1. m3rt_sparse_clear     <<<any, any>>>               table[B * cap] := empty
//   2. m3rt_sparse_insert    <<<any, any>>>               one thread per token (grid-stride)
//   3. m3rt_sparse_count     <<<B, M3RT_ROW_THREADS>>>    counts[B] distinct kept ids per row
//   4. m3rt_sparse_offsets   <<<1, M3RT_SCAN_THREADS>>>   offsets[B + 1] = exclusive scan of counts
//   5. m3rt_sparse_compact   <<<B, M3RT_ROW_THREADS>>>    entries in first-occurrence order
// with cap = m3rt_sparse_table_capacity(S) slots per row (a power of two >= 2 S, so probing always
// ends and chains stay short). Output: offsets (int64 [B + 1]) and `entries`, which holds
// offsets[B] int64 ids followed directly by offsets[B] float32 weights (one buffer, so the host
// copies the result with one transfer once it has read offsets[B]). Size it for B * S entries.
//
// ColBERT compaction: m3rt_colbert_compact <<<(x, min(B, 65535)), M3RT_COPY_THREADS>>>.

#ifndef M3RT_KERNELS_CUH
#define M3RT_KERNELS_CUH

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define M3RT_HD __host__ __device__
#else
#define M3RT_HD
#endif

#define M3RT_ROW_THREADS 256
#define M3RT_SCAN_THREADS 1024
#define M3RT_COPY_THREADS 256

// One hash-table slot per distinct id of a row. `key` is 1 + the position of the token that claimed
// the slot (0 = empty): comparing ids through input_ids[row, key - 1] leaves every int64 value usable
// as a token id, with no sentinel id. `weight_bits` holds the max weight's bits: kept weights are
// > 0, and positive IEEE floats order like their unsigned bit patterns, so atomicMax on the bits is
// a max on the floats (bit-exact, independent of arrival order).
struct m3rt_sparse_slot {
    int key;
    unsigned int weight_bits;
    int first_pos;
};

static M3RT_HD inline int m3rt_sparse_table_log2(int seq_len) {
    int log2 = 4;  // 16 slots at least
    while ((1 << log2) < 2 * seq_len) ++log2;
    return log2;
}

static M3RT_HD inline long long m3rt_sparse_table_capacity(int seq_len) {
    return 1LL << m3rt_sparse_table_log2(seq_len);
}

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)

// Fibonacci hashing: the high bits of id * 2^64/phi spread consecutive token ids over the table.
static __device__ __forceinline__ unsigned int m3rt_hash_id(long long id, int log2) {
    return (unsigned int)(((unsigned long long)id * 0x9E3779B97F4A7C15ULL) >> (64 - log2));
}

// float32 -> float16 bits, round to nearest even (what numpy's astype(float16) does); inline PTX
// because NVRTC cannot always find cuda_fp16.h.
static __device__ __forceinline__ unsigned short m3rt_float_to_half_bits(float x) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}

extern "C" {

// Empties `num_slots` slots (key 0, weight bits 0, first position INT_MAX).
__global__ void m3rt_sparse_clear(m3rt_sparse_slot* table, long long num_slots);

// weights: float32 [B, S] (a [B, S, 1] tensor is the same memory); input_ids: int64 [B, S];
// attention_mask: int64 [B, S] or NULL (all positions valid); special_ids: int64 [num_special].
// slot_of: int32 [B, S] scratch, the slot (within its row) of each kept token, -1 if dropped.
__global__ void m3rt_sparse_insert(const float* weights, const long long* input_ids,
                                   const long long* attention_mask, const long long* special_ids,
                                   int num_special, int batch, int seq_len, int table_log2,
                                   m3rt_sparse_slot* table, int* slot_of);

// counts: int32 [B]. Launch with blockDim.x == M3RT_ROW_THREADS, one block per row.
__global__ void m3rt_sparse_count(const int* slot_of, const m3rt_sparse_slot* table, int batch,
                                  int seq_len, int table_log2, int* counts);

// offsets: int64 [B + 1]. Launch with one block of M3RT_SCAN_THREADS threads.
__global__ void m3rt_sparse_offsets(const int* counts, int batch, long long* offsets);

// entries: int64 ids [offsets[B]] then float32 weights [offsets[B]]. One block per row,
// blockDim.x == M3RT_ROW_THREADS.
__global__ void m3rt_sparse_compact(const long long* input_ids, const int* slot_of,
                                    const m3rt_sparse_slot* table, const long long* offsets, int batch,
                                    int seq_len, int table_log2, long long* entries);

// vectors: float32 [B, rows_per_text, D]; offsets: int64 [B + 1], row r keeps its first
// offsets[r + 1] - offsets[r] (<= rows_per_text) vectors; out: [offsets[B], D] float32, or float16
// bits when to_half != 0. Grid-stride in both grid dimensions, so any grid shape is correct.
__global__ void m3rt_colbert_compact(const float* vectors, const long long* offsets, int batch,
                                     int rows_per_text, int dim, int to_half, void* out);

}  // extern "C"

#endif  // __CUDACC__ || __CUDACC_RTC__

#endif  // M3RT_KERNELS_CUH
