#include "postprocess.h"

#include <algorithm>
#include <unordered_map>

namespace m3rt {

SparseRow aggregate_sparse(const int64_t* ids, const float* weights, int64_t length,
                           const std::vector<int64_t>& unused_ids_sorted) {
    SparseRow row;
    std::unordered_map<int64_t, size_t> slot;
    for (int64_t j = 0; j < length; ++j) {
        const float w = weights[j];
        if (!(w > 0.0f)) continue;  // also drops NaN, as `weights > 0` does
        const int64_t id = ids[j];
        if (std::binary_search(unused_ids_sorted.begin(), unused_ids_sorted.end(), id)) continue;
        const auto [it, inserted] = slot.emplace(id, row.ids.size());
        if (inserted) {
            row.ids.push_back(id);
            row.weights.push_back(w);
        } else if (w > row.weights[it->second]) {
            row.weights[it->second] = w;
        }
    }
    return row;
}

}  // namespace m3rt
