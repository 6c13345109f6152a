// FlagEmbedding's post-processing of one padded batch, per row: sparse aggregation and ColBERT rows.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace m3rt {

struct SparseRow {
    std::vector<int64_t> ids;    // in order of first kept occurrence
    std::vector<float> weights;  // max weight of each id, all > 0
};

// `M3Embedder._process_token_weights`: drop the unused special ids (sorted) and weights that are not
// strictly positive (relu), keep the max weight of a repeated id. `ids`/`weights` are one text's
// `length` real tokens (padding excluded).
SparseRow aggregate_sparse(const int64_t* ids, const float* weights, int64_t length,
                           const std::vector<int64_t>& unused_ids_sorted);

}  // namespace m3rt
