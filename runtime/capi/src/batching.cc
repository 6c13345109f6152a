#include "batching.h"

#include <algorithm>
#include <numeric>

#include "error.h"

namespace m3rt {

std::vector<std::vector<size_t>> plan_batches(const std::vector<size_t>& lengths, size_t batch_size,
                                              size_t token_budget) {
    std::vector<size_t> order(lengths.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return lengths[a] > lengths[b]; });
    std::vector<std::vector<size_t>> batches;
    for (size_t start = 0; start < order.size();) {
        const size_t longest = std::max<size_t>(lengths[order[start]], 1);
        const size_t rows = std::max<size_t>(1, std::min(batch_size, token_budget / longest));
        const size_t stop = std::min(order.size(), start + rows);
        batches.emplace_back(order.begin() + static_cast<std::ptrdiff_t>(start),
                             order.begin() + static_cast<std::ptrdiff_t>(stop));
        start = stop;
    }
    return batches;
}

void run_splitting_on_oom(const std::vector<size_t>& batch, const std::function<void(const std::vector<size_t>&)>& run) {
    try {
        run(batch);
        return;
    } catch (const Error& e) {
        if (e.code() != M3RT_OUT_OF_MEMORY || batch.size() < 2) throw;
    }
    const auto middle = batch.begin() + static_cast<std::ptrdiff_t>(batch.size() / 2);
    run_splitting_on_oom(std::vector<size_t>(batch.begin(), middle), run);
    run_splitting_on_oom(std::vector<size_t>(middle, batch.end()), run);
}

}  // namespace m3rt
