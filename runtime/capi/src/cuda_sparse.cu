// Host side of the device sparse aggregation: the launch sequence documented in m3rt_kernels.cuh.
#include <cuda_runtime.h>

#include <string>

#include "cuda_sparse.h"
#include "error.h"
#include "m3rt_kernels.cuh"

namespace m3rt {
namespace {

void check(cudaError_t status, const char* what) {
    if (status != cudaSuccess) {
        throw Error(M3RT_RUNTIME_ERROR, std::string("CUDA ") + what + ": " + cudaGetErrorString(status));
    }
}

struct DeviceBuffer {
    void* ptr = nullptr;
    explicit DeviceBuffer(size_t bytes) { check(cudaMalloc(&ptr, bytes > 0 ? bytes : 1), "cudaMalloc"); }
    ~DeviceBuffer() { cudaFree(ptr); }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    template <typename T>
    T* as() const { return static_cast<T*>(ptr); }
};

}  // namespace

std::vector<SparseRow> aggregate_sparse_cuda(int device, const int64_t* ids, const int64_t* mask, const float* weights,
                                             int64_t rows, int64_t width, const std::vector<int64_t>& unused_ids) {
    std::vector<SparseRow> out(static_cast<size_t>(rows));
    if (rows == 0 || width == 0) return out;
    // The calling thread's current device is whatever it last set: use the model's.
    check(cudaSetDevice(device), "cudaSetDevice");
    const int batch = static_cast<int>(rows), seq_len = static_cast<int>(width);
    const int log2 = m3rt_sparse_table_log2(seq_len);
    const long long slots = static_cast<long long>(batch) * m3rt_sparse_table_capacity(seq_len);
    const size_t tokens = static_cast<size_t>(rows * width);
    DeviceBuffer d_ids(tokens * sizeof(long long)), d_mask(tokens * sizeof(long long)), d_w(tokens * sizeof(float));
    DeviceBuffer d_special(unused_ids.size() * sizeof(long long)), d_table(static_cast<size_t>(slots) * sizeof(m3rt_sparse_slot));
    DeviceBuffer d_slot_of(tokens * sizeof(int)), d_counts(static_cast<size_t>(batch) * sizeof(int));
    DeviceBuffer d_offsets((static_cast<size_t>(batch) + 1) * sizeof(long long));
    DeviceBuffer d_entries(tokens * (sizeof(long long) + sizeof(float)));
    check(cudaMemcpy(d_ids.ptr, ids, tokens * sizeof(long long), cudaMemcpyHostToDevice), "copy ids");
    check(cudaMemcpy(d_mask.ptr, mask, tokens * sizeof(long long), cudaMemcpyHostToDevice), "copy mask");
    check(cudaMemcpy(d_w.ptr, weights, tokens * sizeof(float), cudaMemcpyHostToDevice), "copy weights");
    if (!unused_ids.empty()) {
        check(cudaMemcpy(d_special.ptr, unused_ids.data(), unused_ids.size() * sizeof(long long), cudaMemcpyHostToDevice),
              "copy special ids");
    }
    const int threads = 256;
    const int blocks = static_cast<int>((tokens + threads - 1) / threads);
    m3rt_sparse_clear<<<blocks, threads>>>(d_table.as<m3rt_sparse_slot>(), slots);
    m3rt_sparse_insert<<<blocks, threads>>>(d_w.as<float>(), d_ids.as<long long>(), d_mask.as<long long>(),
                                            d_special.as<long long>(), static_cast<int>(unused_ids.size()), batch,
                                            seq_len, log2, d_table.as<m3rt_sparse_slot>(), d_slot_of.as<int>());
    m3rt_sparse_count<<<batch, M3RT_ROW_THREADS>>>(d_slot_of.as<int>(), d_table.as<m3rt_sparse_slot>(), batch, seq_len,
                                                  log2, d_counts.as<int>());
    m3rt_sparse_offsets<<<1, M3RT_SCAN_THREADS>>>(d_counts.as<int>(), batch, d_offsets.as<long long>());
    m3rt_sparse_compact<<<batch, M3RT_ROW_THREADS>>>(d_ids.as<long long>(), d_slot_of.as<int>(),
                                                    d_table.as<m3rt_sparse_slot>(), d_offsets.as<long long>(), batch,
                                                    seq_len, log2, d_entries.as<long long>());
    check(cudaGetLastError(), "kernel launch");
    std::vector<long long> offsets(static_cast<size_t>(batch) + 1);
    check(cudaMemcpy(offsets.data(), d_offsets.ptr, offsets.size() * sizeof(long long), cudaMemcpyDeviceToHost),
          "copy offsets");
    const size_t total = static_cast<size_t>(offsets.back());
    std::vector<long long> entry_ids(total);
    std::vector<float> entry_weights(total);
    if (total > 0) {
        check(cudaMemcpy(entry_ids.data(), d_entries.ptr, total * sizeof(long long), cudaMemcpyDeviceToHost), "copy ids");
        check(cudaMemcpy(entry_weights.data(), d_entries.as<long long>() + total, total * sizeof(float),
                         cudaMemcpyDeviceToHost),
              "copy weights");
    }
    for (int r = 0; r < batch; ++r) {
        SparseRow& row = out[static_cast<size_t>(r)];
        for (long long k = offsets[static_cast<size_t>(r)]; k < offsets[static_cast<size_t>(r) + 1]; ++k) {
            row.ids.push_back(entry_ids[static_cast<size_t>(k)]);
            row.weights.push_back(entry_weights[static_cast<size_t>(k)]);
        }
    }
    return out;
}

}  // namespace m3rt
