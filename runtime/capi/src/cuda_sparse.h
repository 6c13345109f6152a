// Sparse aggregation of a padded batch with the device kernels of kernels/cuda/m3rt_kernels.cuh
// (built only with -DM3RT_WITH_CUDA=ON). Same rows as aggregate_sparse on the CPU.
#pragma once

#include <cstdint>
#include <vector>

#include "postprocess.h"

namespace m3rt {

// On CUDA device `device`. ids/mask: int64 [rows, width], weights: float32 [rows, width], all on the
// host. Throws m3rt::Error.
std::vector<SparseRow> aggregate_sparse_cuda(int device, const int64_t* ids, const int64_t* mask, const float* weights,
                                             int64_t rows, int64_t width, const std::vector<int64_t>& unused_ids);

}  // namespace m3rt
