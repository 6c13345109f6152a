// A Hugging Face tokenizer.json interpreter for the components BGE-M3 tokenizers use, reproducing
// `tokenizers` (Rust, 0.22) id for id: added-token extraction (lstrip/rstrip/single_word), the
// normalizers Precompiled (sentencepiece charsmap, applied per grapheme as tokenizers does), NFC/NFD/
// NFKC/NFKD (ICU), Strip, Replace and Sequence; the pre-tokenizers Metaspace, WhitespaceSplit and
// Sequence; the Unigram model (Viterbi with unknown-token fusion, optional byte fallback); the
// TemplateProcessing post-processor; and truncation. Anything else is refused at load.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace m3rt {

class Normalizer {
 public:
    virtual ~Normalizer() = default;
    virtual void apply(std::string& text) const = 0;
    // Whether normalising a text cut at an ASCII non-space / ASCII whitespace boundary gives the
    // whole text's normalisation up to there (nothing reaches across such a boundary).
    virtual bool local() const { return true; }
};

// One piece of pre-tokenised text: `text` (normalised) and where its source starts in the input.
struct Piece {
    std::string text;
    size_t original_start;
};

class PreTokenizer {
 public:
    virtual ~PreTokenizer() = default;
    virtual void apply(std::vector<Piece>& pieces) const = 0;
    // Whether every ASCII space ends the piece before it (no piece spans one).
    virtual bool splits_on_whitespace() const = 0;
};

// Unigram model: sentencepiece's Viterbi over a byte trie of the vocabulary, as tokenizers runs it.
class Unigram {
 public:
    Unigram(std::vector<std::pair<std::string, double>> vocab, int64_t unk_id, bool byte_fallback);
    // Appends the first `limit` ids of one pre-tokenised piece; returns how many it appended.
    size_t tokenize(std::string_view text, std::vector<int64_t>& ids, size_t limit = SIZE_MAX) const;
    size_t size() const { return vocab_.size(); }
    // tokenizers' token_to_id: the id of a piece (the last of equal pieces), -1 when absent.
    int64_t id_of(std::string_view piece) const;
    const std::string& piece(size_t id) const { return vocab_[id].first; }

 private:
    struct Node {
        uint32_t first_edge = 0;
        uint32_t num_edges = 0;
        int64_t token = -1;  // id of the piece ending here (token_to_ids' id), -1: none
    };
    struct Edge {
        uint8_t byte;
        uint32_t child;
    };
    void build_trie();

    std::vector<std::pair<std::string, double>> vocab_;
    std::vector<Node> nodes_;
    std::vector<Edge> edges_;
    int64_t unk_id_;
    bool byte_fallback_;
    double min_score_;
    size_t ring_size_ = 5;  // longest piece in bytes + 1: how far ahead a piece reaches
};

struct AddedToken {
    int64_t id;
    std::string content;
    bool single_word, lstrip, rstrip, normalized, special;
};

// Result of encoding one text: ids (with special tokens when asked) and whether truncation cut it.
struct Encoding {
    std::vector<int64_t> ids;
    bool truncated = false;
};

class TextTokenizer {
 public:
    // Parses tokenizer.json; throws m3rt::Error(M3RT_UNSUPPORTED / M3RT_ARTIFACT_ERROR).
    static std::unique_ptr<TextTokenizer> from_file(const std::string& path);
    static std::unique_ptr<TextTokenizer> from_json(const std::string& json, const std::string& what);
    ~TextTokenizer();

    // Thread-safe. `text` must be valid UTF-8 (checked by the caller). max_length == 0: no truncation;
    // otherwise the cost is bounded by what max_length tokens need, not by the text's length, where
    // the text has safe cuts (see cut_after).
    Encoding encode(std::string_view text, bool add_special_tokens, size_t max_length) const;
    // Number of ids the post-processor adds to a single sequence.
    size_t num_special_tokens() const { return template_added_; }
    size_t vocab_size() const { return decoded_.size(); }
    // tokenizers' decode([id], skip_special_tokens=False); nullptr for an unknown id.
    const std::string* id_to_text(int64_t id) const;

 private:
    TextTokenizer() = default;
    struct Split {
        size_t start, stop;  // byte range in the searched text
        int64_t token;       // added token id, -1: plain text
    };
    std::vector<Split> find_added(std::string_view text, bool normalized_set) const;
    // Appends the ids of `text` until `limit` ids are there.
    void tokenize_sequence(std::string_view text, std::vector<int64_t>& ids, size_t limit) const;
    // The first position at or after `from` before which a text may be cut without changing the
    // tokens before it: an ASCII space after an ASCII non-space. text.size() when there is none.
    static size_t cut_after(std::string_view text, size_t from);

    std::vector<AddedToken> added_;
    bool has_normalized_added_ = false;
    std::vector<std::string> added_normalized_content_;  // normalizer(content) for normalized tokens
    std::map<int64_t, AddedToken> added_by_id_;
    std::unique_ptr<Normalizer> normalizer_;
    std::unique_ptr<PreTokenizer> pre_tokenizer_;
    std::unique_ptr<Unigram> model_;
    // TemplateProcessing "single": ids before and after the sequence.
    std::vector<int64_t> template_prefix_, template_suffix_;
    size_t template_added_ = 0;
    std::vector<std::string> decoded_;
    bool prefix_cut_safe_ = false;  // encode with a max_length tokenises only a prefix of long texts
};

// Validates UTF-8 as Rust's str does (no surrogates, no overlongs, <= U+10FFFF). Returns the byte
// offset of the first invalid sequence, or npos when valid.
size_t find_invalid_utf8(std::string_view text);

}  // namespace m3rt
