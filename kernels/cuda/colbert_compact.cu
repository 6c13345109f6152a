// ColBERT compaction on the device: drop the padding vectors of a right-padded batch and pack the
// kept ones contiguously (optionally as float16), so that one device-to-host copy moves only real
// data. CPU twin: kernels/colbert.py (split_colbert). See m3rt_kernels.cuh for the layout.

#include "m3rt_kernels.cuh"

extern "C" __global__ void m3rt_colbert_compact(const float* vectors, const long long* offsets, int batch,
                                                int rows_per_text, int dim, int to_half, void* out) {
    const long long step = (long long)gridDim.x * blockDim.x;
    const long long start = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    // 16-byte loads when every row starts 16-byte aligned (dim % 4 == 0, as for BGE-M3's 1024): the
    // copy is bandwidth-bound and vector accesses move more bytes per instruction.
    const bool vec4 = (dim & 3) == 0 && ((unsigned long long)vectors & 15ull) == 0 &&
                      ((unsigned long long)out & (to_half ? 7ull : 15ull)) == 0;
    for (int r = blockIdx.y; r < batch; r += gridDim.y) {
        const long long first = offsets[r];
        const long long n = (offsets[r + 1] - first) * dim;
        const float* src = vectors + (long long)r * rows_per_text * dim;
        const long long dst = first * dim;
        if (vec4) {
            const float4* src4 = (const float4*)src;
            for (long long k = start; k < n / 4; k += step) {
                const float4 v = src4[k];
                if (to_half) {
                    uint2 h;
                    h.x = (unsigned int)m3rt_float_to_half_bits(v.x) | ((unsigned int)m3rt_float_to_half_bits(v.y) << 16);
                    h.y = (unsigned int)m3rt_float_to_half_bits(v.z) | ((unsigned int)m3rt_float_to_half_bits(v.w) << 16);
                    ((uint2*)out)[dst / 4 + k] = h;
                } else {
                    ((float4*)out)[dst / 4 + k] = v;
                }
            }
        } else {
            for (long long k = start; k < n; k += step) {
                if (to_half) {
                    ((unsigned short*)out)[dst + k] = m3rt_float_to_half_bits(src[k]);
                } else {
                    ((float*)out)[dst + k] = src[k];
                }
            }
        }
    }
}
