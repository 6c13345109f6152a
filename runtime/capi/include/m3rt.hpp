// m3rt C++ header: RAII and exceptions over the C API in m3rt.h (header-only, no extra ABI).
#ifndef M3RT_HPP
#define M3RT_HPP

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "m3rt.h"

namespace m3rt {

class Exception : public std::runtime_error {
 public:
    Exception(m3rt_code code, const std::string& message) : std::runtime_error(message), code_(code) {}
    m3rt_code code() const noexcept { return code_; }

 private:
    m3rt_code code_;
};

inline void check(m3rt_status* status) {
    if (!status) return;
    const m3rt_code code = m3rt_status_code(status);
    std::string message = m3rt_status_message(status);
    m3rt_status_free(status);
    throw Exception(code, message);
}

// A view of one text's sparse weights: ids[i] has weight weights[i].
struct SparseView {
    const int64_t* ids;
    const float* weights;
    size_t size;
};

// A ColBERT matrix view: rows x dim floats, row-major.
struct MatrixView {
    const float* data;
    int64_t rows;
    int64_t dim;
};

class Result {
 public:
    explicit Result(m3rt_result* r) : r_(r, &m3rt_result_free) {}
    size_t size() const { return m3rt_result_count(r_.get()); }
    // Dense vector of text i (dim floats); nullptr when not requested or i is out of range.
    const float* dense(size_t i, int64_t* dim = nullptr) const {
        int64_t d = 0;
        const float* p = m3rt_result_dense(r_.get(), &d);
        if (dim) *dim = p && i < size() ? d : 0;
        return p && i < size() ? p + static_cast<int64_t>(i) * d : nullptr;
    }
    SparseView sparse(size_t i) const {
        const int64_t *indptr, *indices;
        const float* values;
        if (!m3rt_result_sparse(r_.get(), &indptr, &indices, &values) || i >= size()) return {nullptr, nullptr, 0};
        return {indices + indptr[i], values + indptr[i], static_cast<size_t>(indptr[i + 1] - indptr[i])};
    }
    MatrixView colbert(size_t i) const {
        MatrixView m{nullptr, 0, 0};
        m.data = m3rt_result_colbert(r_.get(), i, &m.rows, &m.dim);
        return m;
    }
    const m3rt_result* get() const { return r_.get(); }

 private:
    std::unique_ptr<m3rt_result, decltype(&m3rt_result_free)> r_;
};

class TokenizerRef {
 public:
    explicit TokenizerRef(const m3rt_tokenizer* t) : t_(t) {}
    std::vector<int64_t> encode(std::string_view text, bool add_special_tokens = true, int64_t max_length = 0,
                                bool truncate = true) const {
        int64_t* ids = nullptr;
        size_t count = 0;
        check(m3rt_tokenize(t_, text.data(), text.size(), add_special_tokens, max_length, truncate, &ids, &count));
        std::vector<int64_t> out(ids, ids + count);
        m3rt_ids_free(ids);
        return out;
    }
    std::string id_to_text(int64_t id) const {
        const char* s = m3rt_tokenizer_id_to_text(t_, id);
        return s ? s : "";
    }
    const m3rt_tokenizer* handle() const { return t_; }

 private:
    const m3rt_tokenizer* t_;
};

namespace detail {
// Owns a loaded tokenizer. A base class of Tokenizer, listed first, so that the handle exists before
// TokenizerRef is given it and is freed after.
class TokenizerOwner {
 protected:
    explicit TokenizerOwner(const std::string& path) {
        m3rt_tokenizer* t = nullptr;
        check(m3rt_tokenizer_load(path.c_str(), &t));
        owned_.reset(t);
    }
    std::unique_ptr<m3rt_tokenizer, decltype(&m3rt_tokenizer_free)> owned_{nullptr, &m3rt_tokenizer_free};
};
}  // namespace detail

// A tokenizer.json loaded on its own (no model). Not copyable or movable: TokenizerRefs may point at it.
class Tokenizer : private detail::TokenizerOwner, public TokenizerRef {
 public:
    explicit Tokenizer(const std::string& tokenizer_json)
        : detail::TokenizerOwner(tokenizer_json), TokenizerRef(owned_.get()) {}
    Tokenizer(const Tokenizer&) = delete;
    Tokenizer& operator=(const Tokenizer&) = delete;
};

class Model {
 public:
    explicit Model(const std::string& artifact_dir, const m3rt_load_options* options = nullptr) {
        m3rt_model* m = nullptr;
        check(m3rt_model_load(artifact_dir.c_str(), options, &m));
        m_.reset(m);
    }
    // Thread-safe: one Model may encode from many threads.
    Result encode(const std::vector<std::string>& texts, const m3rt_encode_options* options = nullptr) const {
        std::vector<const char*> ptrs;
        std::vector<size_t> lengths;
        ptrs.reserve(texts.size());
        lengths.reserve(texts.size());
        for (const auto& t : texts) {
            ptrs.push_back(t.data());
            lengths.push_back(t.size());
        }
        m3rt_result* r = nullptr;
        check(m3rt_encode(m_.get(), ptrs.data(), lengths.data(), texts.size(), options, &r));
        return Result(r);
    }
    TokenizerRef tokenizer() const { return TokenizerRef(m3rt_model_tokenizer(m_.get())); }
    int64_t hidden_size() const { return m3rt_model_hidden_size(m_.get()); }
    int64_t max_length() const { return m3rt_model_max_length(m_.get()); }
    std::string graph() const { return m3rt_model_graph(m_.get()); }
    const m3rt_model* get() const { return m_.get(); }

 private:
    std::unique_ptr<m3rt_model, decltype(&m3rt_model_free)> m_{nullptr, &m3rt_model_free};
};

}  // namespace m3rt

#endif  // M3RT_HPP
