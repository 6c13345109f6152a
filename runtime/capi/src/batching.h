// Token-budget batching, as the Python runtime plans it (m3rt.scheduler.plan_batches).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

namespace m3rt {

// Text indices grouped into batches, longest first (stable for equal lengths). A batch holds at most
// `batch_size` texts and at most `token_budget` padded tokens (rows x longest); a longer text runs alone.
std::vector<std::vector<size_t>> plan_batches(const std::vector<size_t>& lengths, size_t batch_size,
                                              size_t token_budget);

// Runs `batch` through `run`; when that fails with M3RT_OUT_OF_MEMORY, runs the two halves instead
// (recursively, down to single rows, whose failure is reported), as the Python runtime retries.
void run_splitting_on_oom(const std::vector<size_t>& batch, const std::function<void(const std::vector<size_t>&)>& run);

}  // namespace m3rt
