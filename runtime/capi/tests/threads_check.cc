// Concurrency check through the C++ header: N threads encode through ONE model at once (no GIL, no
// locks in the caller) and every result must equal, bit for bit, the single-threaded result of the
// same texts. Also checks errors as m3rt::Exception and the Result accessors' bounds.
//
//   m3rt_threads_check ARTIFACT ONNXRUNTIME_LIBRARY [THREADS] < texts (one per line)
#include <atomic>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "m3rt.hpp"

namespace {

// Everything a Result holds, flattened, for exact comparison.
std::vector<float> flatten(const m3rt::Result& r, std::vector<int64_t>& ids) {
    std::vector<float> out;
    for (size_t i = 0; i < r.size(); ++i) {
        int64_t dim = 0;
        const float* d = r.dense(i, &dim);
        out.insert(out.end(), d, d + dim);
        const m3rt::SparseView s = r.sparse(i);
        ids.insert(ids.end(), s.ids, s.ids + s.size);
        ids.push_back(-1);
        out.insert(out.end(), s.weights, s.weights + s.size);
        const m3rt::MatrixView c = r.colbert(i);
        out.insert(out.end(), c.data, c.data + c.rows * c.dim);
    }
    return out;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 3) {
        std::fprintf(stderr, "usage: m3rt_threads_check ARTIFACT ONNXRUNTIME_LIBRARY [THREADS] < texts\n");
        return 2;
    }
    const int threads = argc > 3 ? std::atoi(argv[3]) : 8;
    std::vector<std::string> texts;
    for (std::string line; std::getline(std::cin, line);) texts.push_back(line);
    try {
        m3rt_load_options load;
        m3rt_load_options_init(&load);
        load.onnxruntime_library = argv[2];
        load.intra_op_threads = 1;
        const m3rt::Model model(argv[1], &load);
        m3rt_encode_options options;
        m3rt_encode_options_init(&options);
        options.truncate = 1;
        // Each thread encodes its own slice of the texts, several times.
        std::vector<std::vector<std::string>> jobs(static_cast<size_t>(threads));
        for (size_t i = 0; i < texts.size(); ++i) jobs[i % jobs.size()].push_back(texts[i]);
        std::vector<std::vector<float>> expected(jobs.size());
        std::vector<std::vector<int64_t>> expected_ids(jobs.size());
        for (size_t j = 0; j < jobs.size(); ++j) expected[j] = flatten(model.encode(jobs[j], &options), expected_ids[j]);
        std::atomic<int> mismatches{0}, errors{0};
        std::vector<std::thread> pool;
        for (size_t j = 0; j < jobs.size(); ++j) {
            pool.emplace_back([&, j] {
                try {
                    for (int round = 0; round < 5; ++round) {
                        std::vector<int64_t> ids;
                        const std::vector<float> got = flatten(model.encode(jobs[j], &options), ids);
                        if (ids != expected_ids[j] || got.size() != expected[j].size() ||
                            std::memcmp(got.data(), expected[j].data(), got.size() * sizeof(float)) != 0) {
                            ++mismatches;
                        }
                        // Tokenising concurrently with encoding, through the model's tokenizer.
                        model.tokenizer().encode(jobs[j].empty() ? "" : jobs[j][0]);
                    }
                } catch (const std::exception& e) {
                    std::fprintf(stderr, "thread %zu: %s\n", j, e.what());
                    ++errors;
                }
            });
        }
        for (auto& t : pool) t.join();
        // Errors come back as exceptions with their code.
        bool refused = false;
        try {
            model.encode({std::string("bad \xff utf-8")}, &options);
        } catch (const m3rt::Exception& e) {
            refused = e.code() == M3RT_INVALID_INPUT;
        }
        // Rows past the end are refused by every accessor (nullptr / empty), not read out of bounds.
        const m3rt::Result one = model.encode({std::string("one text")}, &options);
        const bool bounded = one.dense(0) != nullptr && one.dense(1) == nullptr && one.sparse(1).size == 0 &&
                             one.colbert(1).data == nullptr;
        std::printf("threads %d, texts %zu, mismatches %d, errors %d, invalid utf-8 refused %s, rows bounded %s\n",
                    threads, texts.size(), mismatches.load(), errors.load(), refused ? "yes" : "no",
                    bounded ? "yes" : "no");
        return mismatches == 0 && errors == 0 && refused && bounded ? 0 : 1;
    } catch (const m3rt::Exception& e) {
        std::fprintf(stderr, "m3rt_threads_check: %s\n", e.what());
        return 1;
    }
}
