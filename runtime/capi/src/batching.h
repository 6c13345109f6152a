// Token-budget batching, as the Python runtime plans it (m3rt.scheduler.plan_batches).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace m3rt {

// Text indices grouped into batches, longest first (stable for equal lengths). A batch holds at most
// `batch_size` texts and at most `token_budget` padded tokens (rows x longest); a longer text runs alone.
std::vector<std::vector<size_t>> plan_batches(const std::vector<size_t>& lengths, size_t batch_size,
                                              size_t token_budget);

}  // namespace m3rt
