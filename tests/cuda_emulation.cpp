// Runs the real kernels of kernels/cuda/ on the CPU, for machines without a GPU (tests only).
//
// Each block's threads are std::threads, so the atomics of m3rt_sparse_insert really race within a
// block; blocks run one after another, so `__shared__` can be a plain static. Block-wide collectives
// (__syncthreads_count, __ballot_sync, __shfl_up_sync) are barrier-based: every thread of the block
// must reach them, as on the GPU (the kernels only call them under block-uniform conditions).
//
// Usage: cuda_emulation sparse|colbert IN OUT. The launch sequence mirrors kernels/device.py.
//   sparse  IN: int64 B, S, num_special, has_mask; f32 weights[B*S]; i64 ids[B*S]; i64 mask[B*S]
//               (if has_mask); i64 specials[num_special]. OUT: i64 offsets[B+1], i64 ids[T], f32 w[T]
//   colbert IN: int64 B, R, D, to_half; i64 offsets[B+1] padded to an even count; f32 vectors[B*R*D].
//           OUT: [T*D] f32 or f16

#include <atomic>
#include <barrier>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

struct emu_dim3 {
    unsigned int x = 1, y = 1, z = 1;
};
thread_local emu_dim3 threadIdx, blockIdx;
emu_dim3 blockDim, gridDim;

struct float4 {
    float x, y, z, w;
};
struct uint2 {
    unsigned int x, y;
};

static std::barrier<>* emu_barrier = nullptr;
static long long emu_slots[1024];

static void __syncthreads() { emu_barrier->arrive_and_wait(); }

static int __syncthreads_count(int predicate) {
    emu_slots[threadIdx.x] = predicate != 0;
    __syncthreads();
    int count = 0;
    for (unsigned int t = 0; t < blockDim.x; ++t) count += (int)emu_slots[t];
    __syncthreads();
    return count;
}

static unsigned int __ballot_sync(unsigned int, int predicate) {
    emu_slots[threadIdx.x] = predicate != 0;
    __syncthreads();
    unsigned int ballot = 0, warp = threadIdx.x & ~31u;
    for (unsigned int l = 0; l < 32; ++l) ballot |= (unsigned int)emu_slots[warp + l] << l;
    __syncthreads();
    return ballot;
}

static long long __shfl_up_sync(unsigned int, long long value, int delta) {
    emu_slots[threadIdx.x] = value;
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const long long result = lane >= delta ? emu_slots[threadIdx.x - delta] : value;
    __syncthreads();
    return result;
}

static int __popc(unsigned int x) { return __builtin_popcount(x); }

static int atomicCAS(int* address, int compare, int value) {
    std::atomic_ref<int>(*address).compare_exchange_strong(compare, value);
    return compare;  // the old value either way
}

static unsigned int atomicMax(unsigned int* address, unsigned int value) {
    std::atomic_ref<unsigned int> ref(*address);
    unsigned int old = ref.load();
    while (old < value && !ref.compare_exchange_weak(old, value)) {
    }
    return old;
}

static int atomicMin(int* address, int value) {
    std::atomic_ref<int> ref(*address);
    int old = ref.load();
    while (old > value && !ref.compare_exchange_weak(old, value)) {
    }
    return old;
}

static unsigned int __float_as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, 4);
    return u;
}

static float __uint_as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

#define __CUDACC__ 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
// The header's float16 helper is inline PTX; keep it out of the way and use the compiler's own
// round-to-nearest-even conversion below.
#define m3rt_float_to_half_bits m3rt_float_to_half_bits_ptx
#define asm(...) (h = 0)
#include "../kernels/cuda/m3rt_kernels.cuh"
#undef asm
#undef m3rt_float_to_half_bits
static unsigned short m3rt_float_to_half_bits(float x) {
    _Float16 h = (_Float16)x;
    unsigned short bits;
    std::memcpy(&bits, &h, 2);
    return bits;
}
#include "../kernels/cuda/colbert_compact.cu"
#include "../kernels/cuda/sparse_aggregate.cu"

template <class Kernel, class... Args>
static void launch(emu_dim3 grid, unsigned int block, Kernel kernel, Args... args) {
    gridDim = grid;
    blockDim = {block, 1, 1};
    std::barrier<> barrier((std::ptrdiff_t)block);
    emu_barrier = &barrier;
    // One thread per CUDA thread for the whole launch, walking the blocks in lockstep: a barrier
    // after each block keeps one block at a time (so `__shared__` statics are per block).
    std::vector<std::thread> threads;
    for (unsigned int t = 0; t < block; ++t) {
        threads.emplace_back([=, &barrier] {
            threadIdx = {t, 0, 0};
            for (unsigned int by = 0; by < grid.y; ++by) {
                for (unsigned int bx = 0; bx < grid.x; ++bx) {
                    blockIdx = {bx, by, 0};
                    kernel(args...);
                    barrier.arrive_and_wait();
                }
            }
        });
    }
    for (auto& thread : threads) thread.join();
}

struct alignas(16) emu_chunk {
    char bytes[16];
};

template <class T>
static const T* take(const char*& cursor, long long count) {
    const T* p = reinterpret_cast<const T*>(cursor);
    cursor += count * (long long)sizeof(T);
    return p;
}

static unsigned int stride_grid(long long n) {
    long long blocks = (n + M3RT_ROW_THREADS - 1) / M3RT_ROW_THREADS;
    return (unsigned int)(blocks < 1 ? 1 : blocks > 8192 ? 8192 : blocks);
}

int main(int argc, char** argv) {
    if (argc != 4) return 2;
    const std::string mode = argv[1];
    std::ifstream in(argv[2], std::ios::binary);
    const std::vector<char> raw((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::vector<emu_chunk> data(raw.size() / 16 + 1);  // 16-byte aligned like device memory
    std::memcpy(data.data(), raw.data(), raw.size());
    const char* cursor = (const char*)data.data();
    const long long* head = take<long long>(cursor, 4);
    std::ofstream out(argv[3], std::ios::binary);
    if (mode == "sparse") {
        const int batch = (int)head[0], seq_len = (int)head[1], num_special = (int)head[2];
        const long long tokens = (long long)batch * seq_len;
        const float* weights = take<float>(cursor, tokens);
        const long long* ids = take<long long>(cursor, tokens);
        const long long* mask = head[3] ? take<long long>(cursor, tokens) : nullptr;
        const long long* specials = num_special ? take<long long>(cursor, num_special) : nullptr;
        const int log2 = m3rt_sparse_table_log2(seq_len);
        const long long slots = (long long)batch << log2;
        std::vector<m3rt_sparse_slot> table(slots);
        std::vector<int> slot_of(tokens), counts(batch);
        std::vector<long long> offsets(batch + 1), entries(tokens * 12 / 8 + 1);
        launch({stride_grid(slots)}, M3RT_ROW_THREADS, m3rt_sparse_clear, table.data(), slots);
        launch({stride_grid(tokens)}, M3RT_ROW_THREADS, m3rt_sparse_insert, weights, ids, mask, specials,
               num_special, batch, seq_len, log2, table.data(), slot_of.data());
        launch({(unsigned int)batch}, M3RT_ROW_THREADS, m3rt_sparse_count, (const int*)slot_of.data(),
               (const m3rt_sparse_slot*)table.data(), batch, seq_len, log2, counts.data());
        launch({1}, M3RT_SCAN_THREADS, m3rt_sparse_offsets, (const int*)counts.data(), batch, offsets.data());
        launch({(unsigned int)batch}, M3RT_ROW_THREADS, m3rt_sparse_compact, ids, (const int*)slot_of.data(),
               (const m3rt_sparse_slot*)table.data(), (const long long*)offsets.data(), batch, seq_len, log2,
               entries.data());
        out.write((const char*)offsets.data(), (batch + 1) * 8);
        out.write((const char*)entries.data(), offsets[batch] * 12);
    } else if (mode == "colbert") {
        const int batch = (int)head[0], rows = (int)head[1], dim = (int)head[2], to_half = (int)head[3];
        const long long* offsets = take<long long>(cursor, batch + 1 + ((batch + 1) & 1));  // keeps 16-alignment
        const float* vectors = take<float>(cursor, (long long)batch * rows * dim);
        const long long bytes = offsets[batch] * dim * (to_half ? 2 : 4);
        std::vector<emu_chunk> result(bytes / 16 + 1);
        launch({3, (unsigned int)batch}, M3RT_COPY_THREADS, m3rt_colbert_compact, vectors, offsets, batch, rows, dim,
               to_half, (void*)result.data());
        out.write((const char*)result.data(), bytes);
    } else {
        return 2;
    }
    return 0;
}
