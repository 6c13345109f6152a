// Sparse (lexical) aggregation on the device: per-token weights -> CSR rows, identical to
// kernels/sparse.py (aggregate_sparse). See m3rt_kernels.cuh for the launch sequence and layouts.
//
// Why a hash table per row: a row of S = 8192 tokens would cost O(S^2) with pairwise duplicate
// checks; an open-addressing table of >= 2 S slots makes insertion O(1) expected per token. Order
// comes from positions, not from the table: an id's entry is written by the token at its first kept
// position (atomicMin over positions), and a block-wide scan over positions gives each such token
// its rank in the row, so the output order is deterministic even though insertion is not.

#include "m3rt_kernels.cuh"

static __device__ __forceinline__ bool m3rt_sparse_is_first(const int* row_slots, const m3rt_sparse_slot* row_table,
                                                            int pos, int seq_len) {
    if (pos >= seq_len) return false;
    const int slot = row_slots[pos];
    return slot >= 0 && row_table[slot].first_pos == pos;
}

extern "C" __global__ void m3rt_sparse_clear(m3rt_sparse_slot* table, long long num_slots) {
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < num_slots; i += step) {
        table[i].key = 0;
        table[i].weight_bits = 0u;
        table[i].first_pos = 0x7fffffff;
    }
}

extern "C" __global__ void m3rt_sparse_insert(const float* weights, const long long* input_ids,
                                              const long long* attention_mask, const long long* special_ids,
                                              int num_special, int batch, int seq_len, int table_log2,
                                              m3rt_sparse_slot* table, int* slot_of) {
    const long long total = (long long)batch * seq_len;
    const long long step = (long long)gridDim.x * blockDim.x;
    const unsigned int wrap = (1u << table_log2) - 1u;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        const float w = weights[i];
        const long long id = input_ids[i];
        // `w > 0` is false for NaN and -0.0, as in the CPU kernel.
        bool keep = w > 0.0f && (attention_mask == 0 || attention_mask[i] != 0);
        for (int k = 0; keep && k < num_special; ++k) keep = special_ids[k] != id;
        int slot = -1;
        if (keep) {
            const int row = (int)(i / seq_len);
            const int pos = (int)(i - (long long)row * seq_len);
            const long long* row_ids = input_ids + (long long)row * seq_len;
            m3rt_sparse_slot* row_table = table + ((long long)row << table_log2);
            unsigned int h = m3rt_hash_id(id, table_log2);
            for (;;) {
                // A plain (volatile) read first: repeated ids find their slot without an atomic. A stale
                // 0 only sends us to atomicCAS, which returns the real key if another token won.
                int key = *(volatile int*)&row_table[h].key;
                if (key == 0) key = atomicCAS(&row_table[h].key, 0, pos + 1);
                if (key == 0 || row_ids[key - 1] == id) break;
                h = (h + 1u) & wrap;  // at most S distinct ids in >= 2 S slots: an empty or own slot exists
            }
            m3rt_sparse_slot* s = &row_table[h];
            const unsigned int bits = __float_as_uint(w);
            // Both fields only move one way, so skipping the atomic when it cannot change them is safe.
            if (*(volatile unsigned int*)&s->weight_bits < bits) atomicMax(&s->weight_bits, bits);
            if (*(volatile int*)&s->first_pos > pos) atomicMin(&s->first_pos, pos);
            slot = (int)h;
        }
        slot_of[i] = slot;
    }
}

extern "C" __global__ void m3rt_sparse_count(const int* slot_of, const m3rt_sparse_slot* table, int batch,
                                             int seq_len, int table_log2, int* counts) {
    // The loop bounds depend on the block only, so every thread reaches each __syncthreads_count.
    for (int row = blockIdx.x; row < batch; row += gridDim.x) {
        const int* row_slots = slot_of + (long long)row * seq_len;
        const m3rt_sparse_slot* row_table = table + ((long long)row << table_log2);
        int count = 0;
        for (int base = 0; base < seq_len; base += blockDim.x) {
            count += __syncthreads_count(m3rt_sparse_is_first(row_slots, row_table, base + threadIdx.x, seq_len));
        }
        if (threadIdx.x == 0) counts[row] = count;
    }
}

extern "C" __global__ void m3rt_sparse_offsets(const int* counts, int batch, long long* offsets) {
    __shared__ long long warp_sums[32];
    if (blockIdx.x != 0) return;  // a single-block scan; extra blocks would race on offsets
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int num_warps = blockDim.x >> 5;
    if (threadIdx.x == 0) offsets[0] = 0;
    long long carry = 0;
    for (int base = 0; base < batch; base += blockDim.x) {
        const int i = base + threadIdx.x;
        long long x = i < batch ? (long long)counts[i] : 0;
        for (int d = 1; d < 32; d <<= 1) {
            const long long y = __shfl_up_sync(0xffffffffu, x, d);
            if (lane >= d) x += y;
        }
        if (lane == 31) warp_sums[warp] = x;
        __syncthreads();
        long long before = 0, tile = 0;
        for (int w = 0; w < num_warps; ++w) {
            before += w < warp ? warp_sums[w] : 0;
            tile += warp_sums[w];
        }
        if (i < batch) offsets[i + 1] = carry + before + x;
        carry += tile;
        __syncthreads();  // warp_sums is rewritten by the next tile
    }
}

extern "C" __global__ void m3rt_sparse_compact(const long long* input_ids, const int* slot_of,
                                               const m3rt_sparse_slot* table, const long long* offsets, int batch,
                                               int seq_len, int table_log2, long long* entries) {
    __shared__ int warp_counts[32];
    const long long total = offsets[batch];
    float* out_weights = (float*)(entries + total);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int num_warps = blockDim.x >> 5;
    for (int row = blockIdx.x; row < batch; row += gridDim.x) {
        const long long* row_ids = input_ids + (long long)row * seq_len;
        const int* row_slots = slot_of + (long long)row * seq_len;
        const m3rt_sparse_slot* row_table = table + ((long long)row << table_log2);
        long long out = offsets[row];
        // Tiles of blockDim.x positions in order; within a tile a ballot gives each first occurrence
        // its rank among the earlier ones, so entries land in position order.
        for (int base = 0; base < seq_len; base += blockDim.x) {
            const int pos = base + threadIdx.x;
            const bool first = m3rt_sparse_is_first(row_slots, row_table, pos, seq_len);
            const unsigned int ballot = __ballot_sync(0xffffffffu, first);
            if (lane == 0) warp_counts[warp] = __popc(ballot);
            __syncthreads();
            int before = __popc(ballot & ((1u << lane) - 1u));
            int tile = 0;
            for (int w = 0; w < num_warps; ++w) {
                before += w < warp ? warp_counts[w] : 0;
                tile += warp_counts[w];
            }
            if (first) {
                entries[out + before] = row_ids[pos];
                out_weights[out + before] = __uint_as_float(row_table[row_slots[pos]].weight_bits);
            }
            out += tile;
            __syncthreads();  // warp_counts is rewritten by the next tile
        }
    }
}
