#include "tokenizer.h"

#include <unicode/brkiter.h>
#include <unicode/bytestream.h>
#include <unicode/normalizer2.h>
#include <unicode/regex.h>
#include <unicode/uniset.h>
#include <unicode/uchar.h>
#include <unicode/unistr.h>
#include <unicode/utext.h>
#include <unicode/utf8.h>

#include <algorithm>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <sstream>
#include <unordered_map>

#include "error.h"

namespace m3rt {
namespace {

using json = nlohmann::json;

// nlohmann's get<int64_t>() of a non-integral number is a float-to-integer cast (undefined when out of
// range): ids must be JSON integers.
int64_t integer(const json& value, const char* what) {
    if (!value.is_number_integer()) throw Error(M3RT_ARTIFACT_ERROR, std::string("tokenizer.json: ") + what + " must be an integer");
    return value.get<int64_t>();
}

[[noreturn]] void unsupported(const std::string& what) {
    throw Error(M3RT_UNSUPPORTED, "tokenizer.json uses " + what +
                                      ", which the m3rt C library does not implement (it implements what "
                                      "BGE-M3/XLM-R tokenizers use)");
}

// Decodes the code point at text[i] (valid UTF-8 assumed) and advances i; 64-bit offsets throughout.
// A truncated sequence (never in validated text) gives -1 and ends the text.
UChar32 next_code_point(std::string_view text, size_t& i) {
    const auto* s = reinterpret_cast<const uint8_t*>(text.data());
    const uint8_t lead = s[i];
    if (lead < 0x80) {
        ++i;
        return lead;
    }
    const size_t length = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : 2;
    if (text.size() - i < length) {
        i = text.size();
        return -1;
    }
    UChar32 c = lead & (0x7F >> length);
    for (size_t k = 1; k < length; ++k) c = (c << 6) | (s[i + k] & 0x3F);
    i += length;
    return c;
}

// Text that normalisation grew past this is refused: it bounds the copies the later steps make and
// keeps every offset ICU sees (32-bit) in range.
constexpr size_t kMaxNormalizedBytes = M3RT_MAX_TEXT_BYTES * 4;

void check_normalized_size(size_t bytes) {
    if (bytes > kMaxNormalizedBytes) {
        throw Error(M3RT_INPUT_TOO_LONG, "normalisation grows the text past " + std::to_string(kMaxNormalizedBytes) +
                                             " bytes; split it into smaller texts");
    }
}

void append_utf8(std::string& out, UChar32 c) {
    char buf[4];
    int32_t n = 0;
    U8_APPEND_UNSAFE(reinterpret_cast<uint8_t*>(buf), n, c);
    out.append(buf, static_cast<size_t>(n));
}

// Rust's char::is_whitespace and regex `\s`: the White_Space property.
bool is_whitespace(UChar32 c) { return u_hasBinaryProperty(c, UCHAR_WHITE_SPACE); }

// Rust regex's Unicode `\w`: Alphabetic, Mark, Decimal_Number, Connector_Punctuation, Join_Control.
bool is_word(UChar32 c) {
    if (u_hasBinaryProperty(c, UCHAR_ALPHABETIC) || u_hasBinaryProperty(c, UCHAR_JOIN_CONTROL)) return true;
    const int8_t type = u_charType(c);
    return type == U_NON_SPACING_MARK || type == U_ENCLOSING_MARK || type == U_COMBINING_SPACING_MARK ||
           type == U_DECIMAL_DIGIT_NUMBER || type == U_CONNECTOR_PUNCTUATION;
}

std::string utf16_to_utf8(const icu::UnicodeString& s) {
    std::string out;
    s.toUTF8String(out);
    return out;
}

// ---- normalizers ----

// sentencepiece's precompiled charsmap: a Darts double array over UTF-8 bytes whose values are
// offsets into a blob of NUL-terminated replacements (spm_precompiled's reading of it).
class Precompiled final : public Normalizer {
 public:
    explicit Precompiled(const std::string& blob) {
        if (blob.size() < 4) throw Error(M3RT_ARTIFACT_ERROR, "Precompiled charsmap is too short");
        uint32_t trie_size = 0;
        for (int i = 0; i < 4; ++i) trie_size |= static_cast<uint32_t>(static_cast<uint8_t>(blob[i])) << (8 * i);
        if (trie_size / 4 * 4 + 4 > blob.size()) throw Error(M3RT_ARTIFACT_ERROR, "Precompiled charsmap is truncated");
        array_.resize(trie_size / 4);
        for (size_t k = 0; k < array_.size(); ++k) {
            uint32_t v = 0;
            for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(static_cast<uint8_t>(blob[4 + 4 * k + i])) << (8 * i);
            array_[k] = v;
        }
        normalized_ = blob.substr(4 + array_.size() * 4);
        UErrorCode status = U_ZERO_ERROR;
        prototype_.reset(icu::BreakIterator::createCharacterInstance(icu::Locale::getRoot(), status));
        if (U_FAILURE(status)) throw Error(M3RT_RUNTIME_ERROR, "ICU grapheme iterator unavailable");
    }

    void apply(std::string& text) const override {
        if (text.empty()) return;
        check_normalized_size(text.size());
        // BreakIterator is not thread-safe: one per thread (all are root-locale grapheme iterators).
        thread_local std::unique_ptr<icu::BreakIterator> iter(prototype_->clone());
        UErrorCode status = U_ZERO_ERROR;
        UText* ut = utext_openUTF8(nullptr, text.data(), static_cast<int64_t>(text.size()), &status);
        iter->setText(ut, status);
        std::string out;
        out.reserve(text.size());
        bool modified = false;
        int32_t start = iter->first();
        for (int32_t end = iter->next(); end != icu::BreakIterator::DONE; start = end, end = iter->next()) {
            std::string_view grapheme(text.data() + start, static_cast<size_t>(end - start));
            std::string_view norm;
            // Whole grapheme first (when short), else code point by code point: tokenizers' order.
            if (grapheme.size() < 6 && transform(grapheme, norm)) {
                out.append(norm);
                modified = true;
                continue;
            }
            size_t i = 0;
            while (i < grapheme.size()) {
                const size_t from = i;
                next_code_point(grapheme, i);
                std::string_view part = grapheme.substr(from, i - from);
                if (transform(part, norm)) {
                    out.append(norm);
                    modified = true;
                } else {
                    out.append(part);
                }
            }
            if (out.size() > kMaxNormalizedBytes) {
                utext_close(ut);
                check_normalized_size(out.size());
            }
        }
        utext_close(ut);
        if (modified) text.swap(out);
    }

 private:
    // spm_precompiled's transform: the replacement of the SHORTEST prefix of `chunk` found in the trie.
    bool transform(std::string_view chunk, std::string_view& norm) const {
        size_t node = 0;
        if (array_.empty()) return false;
        uint32_t unit = array_[node];
        node ^= offset(unit);
        for (unsigned char c : chunk) {
            if (c == 0) break;
            node ^= c;
            if (node >= array_.size()) return false;
            unit = array_[node];
            if (label(unit) != c) return false;
            node ^= offset(unit);
            if (has_leaf(unit)) {
                if (node >= array_.size()) return false;
                const size_t index = value(array_[node]);
                if (index >= normalized_.size()) {
                    norm = std::string_view();
                    return true;
                }
                size_t stop = normalized_.find('\0', index);
                if (stop == std::string::npos) stop = normalized_.size();
                norm = std::string_view(normalized_).substr(index, stop - index);
                return true;
            }
        }
        return false;
    }
    static bool has_leaf(uint32_t u) { return ((u >> 8) & 1) == 1; }
    static size_t value(uint32_t u) { return u & ((1u << 31) - 1); }
    static size_t label(uint32_t u) { return u & ((1u << 31) | 0xFF); }
    static size_t offset(uint32_t u) { return static_cast<size_t>(u >> 10) << ((u & (1u << 9)) >> 6); }

    std::vector<uint32_t> array_;
    std::string normalized_;
    std::unique_ptr<icu::BreakIterator> prototype_;
};

// tokenizers normalises with the unicode-normalization-alignments crate, whose decomposition tables
// predate Unicode 12: characters assigned later keep their form there (U+1F16C, U+1FBF0..9, U+A7F2..4,
// U+107xx, ...). ICU knows them, so they are excluded from normalisation: the filter set is everything
// except characters that have a decomposition and were assigned after Unicode 11.0.
constexpr const char* kNormalizableSet = "[^[[:^dt=none:]-[:age=11.0:]]]";

class UnicodeNormalForm final : public Normalizer {
 public:
    explicit UnicodeNormalForm(const std::string& form) {
        UErrorCode status = U_ZERO_ERROR;
        const icu::Normalizer2* base;
        if (form == "NFC") base = icu::Normalizer2::getNFCInstance(status);
        else if (form == "NFD") base = icu::Normalizer2::getNFDInstance(status);
        else if (form == "NFKC") base = icu::Normalizer2::getNFKCInstance(status);
        else base = icu::Normalizer2::getNFKDInstance(status);
        if (U_FAILURE(status)) throw Error(M3RT_RUNTIME_ERROR, "ICU " + form + " normalizer unavailable");
        set_ = std::make_unique<icu::UnicodeSet>(icu::UnicodeString(kNormalizableSet, -1, US_INV), status);
        if (U_FAILURE(status)) throw Error(M3RT_RUNTIME_ERROR, "ICU Unicode set unavailable");
        set_->freeze();
        filtered_ = std::make_unique<icu::FilteredNormalizer2>(*base, *set_);
        norm_ = filtered_.get();
    }
    void apply(std::string& text) const override {
        check_normalized_size(text.size());
        UErrorCode status = U_ZERO_ERROR;
        if (norm_->isNormalizedUTF8(text, status) && U_SUCCESS(status)) return;
        status = U_ZERO_ERROR;
        std::string out;
        icu::StringByteSink<std::string> sink(&out);
        norm_->normalizeUTF8(0, text, sink, nullptr, status);
        if (U_FAILURE(status)) throw Error(M3RT_RUNTIME_ERROR, "ICU normalization failed");
        check_normalized_size(out.size());
        text.swap(out);
    }

 private:
    std::unique_ptr<icu::UnicodeSet> set_;
    std::unique_ptr<icu::FilteredNormalizer2> filtered_;
    const icu::Normalizer2* norm_ = nullptr;
};

class Strip final : public Normalizer {
 public:
    Strip(bool left, bool right) : left_(left), right_(right) {}
    void apply(std::string& text) const override {
        // Byte range from the first to the end of the last non-whitespace code point.
        size_t first = std::string::npos, last_end = 0, i = 0;
        while (i < text.size()) {
            const size_t from = i;
            if (!is_whitespace(next_code_point(text, i))) {
                if (first == std::string::npos) first = from;
                last_end = i;
            }
        }
        if (first == std::string::npos) {
            if (left_ || right_) text.clear();
            return;
        }
        const size_t begin = left_ ? first : 0, end = right_ ? last_end : text.size();
        text = text.substr(begin, end - begin);
    }

 private:
    bool left_, right_;
};

class Replace final : public Normalizer {
 public:
    Replace(const json& pattern, std::string content) : content_(std::move(content)) {
        if (pattern.contains("String")) {
            literal_ = pattern["String"].get<std::string>();
        } else if (pattern.contains("Regex")) {
            UErrorCode status = U_ZERO_ERROR;
            UParseError parse_error;
            const std::string source = pattern["Regex"].get<std::string>();
            regex_source_ = source;
            regex_.reset(icu::RegexPattern::compile(icu::UnicodeString::fromUTF8(source), parse_error, status));
            if (U_FAILURE(status)) unsupported("a Replace regex ICU cannot compile: " + source);
        } else {
            unsupported("a Replace pattern that is neither String nor Regex");
        }
    }
    void apply(std::string& text) const override {
        check_normalized_size(text.size());
        if (regex_) {
            UErrorCode status = U_ZERO_ERROR;
            const icu::UnicodeString input = icu::UnicodeString::fromUTF8(text);
            std::unique_ptr<icu::RegexMatcher> matcher(regex_->matcher(input, status));
            if (U_FAILURE(status)) throw Error(M3RT_RUNTIME_ERROR, "ICU regex matcher failed");
            icu::UnicodeString out;
            int32_t last = 0;
            bool any = false;
            while (matcher->find(status) && U_SUCCESS(status)) {
                const int32_t s = matcher->start(status), e = matcher->end(status);
                if (e == s) continue;  // tokenizers skips empty matches
                out.append(input, last, s - last);
                out.append(icu::UnicodeString::fromUTF8(content_));
                last = e;
                any = true;
            }
            if (!any) return;
            out.append(input, last, input.length() - last);
            text = utf16_to_utf8(out);
            return;
        }
        if (literal_.empty()) return;
        std::string out;
        size_t pos = 0;
        bool any = false;
        for (size_t hit; (hit = text.find(literal_, pos)) != std::string::npos; pos = hit + literal_.size()) {
            out.append(text, pos, hit - pos);
            out.append(content_);
            any = true;
        }
        if (!any) return;
        out.append(text, pos, std::string::npos);
        check_normalized_size(out.size());
        text.swap(out);
    }
    // Whether a match can never span an ASCII non-space / ASCII whitespace boundary: a literal that is
    // all whitespace or has none, or a regex of spaces and repetitions only (" {2,}").
    bool local() const override {
        const auto ws = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; };
        const bool spaces_to_spaces = std::all_of(content_.begin(), content_.end(), ws);
        if (regex_) return spaces_to_spaces && regex_source_.find_first_not_of(" {},0123456789+*") == std::string::npos;
        if (std::none_of(literal_.begin(), literal_.end(), ws)) return true;
        return spaces_to_spaces && std::all_of(literal_.begin(), literal_.end(), ws);
    }

 private:
    std::string literal_, regex_source_;
    std::unique_ptr<icu::RegexPattern> regex_;
    std::string content_;
};

class SequenceNormalizer final : public Normalizer {
 public:
    explicit SequenceNormalizer(std::vector<std::unique_ptr<Normalizer>> steps) : steps_(std::move(steps)) {}
    void apply(std::string& text) const override {
        for (const auto& step : steps_) {
            step->apply(text);
            check_normalized_size(text.size());
        }
    }
    bool local() const override {
        return std::all_of(steps_.begin(), steps_.end(), [](const auto& step) { return step->local(); });
    }

 private:
    std::vector<std::unique_ptr<Normalizer>> steps_;
};

std::unique_ptr<Normalizer> make_normalizer(const json& spec) {
    if (spec.is_null()) return nullptr;
    const std::string type = spec.value("type", "");
    if (type == "Sequence") {
        std::vector<std::unique_ptr<Normalizer>> steps;
        for (const auto& s : spec.at("normalizers")) {
            if (auto n = make_normalizer(s)) steps.push_back(std::move(n));
        }
        return std::make_unique<SequenceNormalizer>(std::move(steps));
    }
    if (type == "Precompiled") {
        const json& map = spec.at("precompiled_charsmap");
        if (map.is_null()) return nullptr;  // tokenizers: an empty charsmap normalises nothing
        const std::string b64 = map.get<std::string>();
        static const std::string alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        std::string blob;
        uint32_t acc = 0;
        int bits = 0;
        for (char ch : b64) {
            if (ch == '=') break;
            const size_t v = alphabet.find(ch);
            if (v == std::string::npos) throw Error(M3RT_ARTIFACT_ERROR, "Precompiled charsmap is not base64");
            acc = (acc << 6) | static_cast<uint32_t>(v);
            bits += 6;
            if (bits >= 8) {
                bits -= 8;
                blob.push_back(static_cast<char>((acc >> bits) & 0xFF));
            }
        }
        if (blob.empty()) return nullptr;
        return std::make_unique<Precompiled>(blob);
    }
    if (type == "NFC" || type == "NFD" || type == "NFKC" || type == "NFKD") return std::make_unique<UnicodeNormalForm>(type);
    if (type == "Strip") return std::make_unique<Strip>(spec.value("strip_left", true), spec.value("strip_right", true));
    if (type == "Replace") return std::make_unique<Replace>(spec.at("pattern"), spec.at("content").get<std::string>());
    unsupported("the normalizer '" + type + "'");
}

// ---- pre-tokenizers ----

enum class Prepend { Always, First, Never };

class Metaspace final : public PreTokenizer {
 public:
    Metaspace(UChar32 replacement, Prepend prepend, bool split) : prepend_(prepend), split_(split) {
        append_utf8(rep_, replacement);
    }
    void apply(std::vector<Piece>& pieces) const override {
        std::vector<Piece> out;
        out.reserve(pieces.size());
        for (auto& piece : pieces) {
            std::string text;
            text.reserve(piece.text.size() + rep_.size());
            for (char ch : piece.text) {
                if (ch == ' ') text += rep_;
                else text.push_back(ch);
            }
            const bool starts = text.compare(0, rep_.size(), rep_) == 0;
            if (!starts && (prepend_ == Prepend::Always || (prepend_ == Prepend::First && piece.original_start == 0))) {
                text.insert(0, rep_);
            }
            if (!split_) {
                out.push_back({std::move(text), piece.original_start});
                continue;
            }
            // MergedWithNext: every replacement character starts a new piece.
            size_t begin = 0;
            for (size_t pos = text.find(rep_); pos != std::string::npos; pos = text.find(rep_, pos + rep_.size())) {
                if (pos == 0) continue;
                out.push_back({text.substr(begin, pos - begin), piece.original_start});
                begin = pos;
            }
            if (begin < text.size()) out.push_back({text.substr(begin), piece.original_start});
        }
        pieces.swap(out);
    }

    bool splits_on_whitespace() const override { return split_; }

 private:
    std::string rep_;
    Prepend prepend_;
    bool split_;
};

class WhitespaceSplit final : public PreTokenizer {
 public:
    void apply(std::vector<Piece>& pieces) const override {
        std::vector<Piece> out;
        for (const auto& piece : pieces) {
            const std::string& t = piece.text;
            size_t i = 0, word_start = std::string::npos;
            while (i < t.size()) {
                const size_t from = i;
                const bool space = is_whitespace(next_code_point(t, i));
                if (space && word_start != std::string::npos) {
                    out.push_back({t.substr(word_start, from - word_start), piece.original_start});
                    word_start = std::string::npos;
                } else if (!space && word_start == std::string::npos) {
                    word_start = from;
                }
            }
            if (word_start != std::string::npos) out.push_back({t.substr(word_start), piece.original_start});
        }
        pieces.swap(out);
    }
    bool splits_on_whitespace() const override { return true; }
};

class SequencePreTokenizer final : public PreTokenizer {
 public:
    explicit SequencePreTokenizer(std::vector<std::unique_ptr<PreTokenizer>> steps) : steps_(std::move(steps)) {}
    void apply(std::vector<Piece>& pieces) const override {
        for (const auto& step : steps_) {
            step->apply(pieces);
            pieces.erase(std::remove_if(pieces.begin(), pieces.end(), [](const Piece& p) { return p.text.empty(); }),
                         pieces.end());
        }
    }

    bool splits_on_whitespace() const override {
        return std::any_of(steps_.begin(), steps_.end(), [](const auto& step) { return step->splits_on_whitespace(); });
    }

 private:
    std::vector<std::unique_ptr<PreTokenizer>> steps_;
};

UChar32 single_char(const std::string& s, const std::string& what) {
    size_t i = 0;
    if (s.empty()) throw Error(M3RT_ARTIFACT_ERROR, what + " is empty");
    const UChar32 c = next_code_point(s, i);
    if (i != s.size() || c < 0) throw Error(M3RT_ARTIFACT_ERROR, what + " must be one character");
    return c;
}

Prepend metaspace_prepend(const json& spec) {
    // tokenizers' legacy field: add_prefix_space=false means prepend_scheme=never.
    Prepend prepend = Prepend::Always;
    if (spec.contains("prepend_scheme") && !spec["prepend_scheme"].is_null()) {
        const std::string s = spec["prepend_scheme"].get<std::string>();
        if (s == "always") prepend = Prepend::Always;
        else if (s == "first") prepend = Prepend::First;
        else if (s == "never") prepend = Prepend::Never;
        else throw Error(M3RT_ARTIFACT_ERROR, "unknown Metaspace prepend_scheme '" + s + "'");
    }
    if (spec.contains("add_prefix_space") && spec["add_prefix_space"].is_boolean() && !spec["add_prefix_space"].get<bool>()) {
        if (prepend != Prepend::Never)  // as tokenizers: the default scheme (always) contradicts it too
            throw Error(M3RT_ARTIFACT_ERROR, "Metaspace add_prefix_space does not match declared prepend_scheme");
        prepend = Prepend::Never;
    }
    return prepend;
}

std::unique_ptr<PreTokenizer> make_pre_tokenizer(const json& spec) {
    if (spec.is_null()) return nullptr;
    const std::string type = spec.value("type", "");
    if (type == "Sequence") {
        std::vector<std::unique_ptr<PreTokenizer>> steps;
        for (const auto& s : spec.at("pretokenizers")) {
            if (auto p = make_pre_tokenizer(s)) steps.push_back(std::move(p));
        }
        return std::make_unique<SequencePreTokenizer>(std::move(steps));
    }
    if (type == "Metaspace") {
        const bool split = spec.contains("split") && !spec["split"].is_null() ? spec["split"].get<bool>() : true;
        return std::make_unique<Metaspace>(single_char(spec.at("replacement").get<std::string>(), "Metaspace replacement"),
                                           metaspace_prepend(spec), split);
    }
    if (type == "WhitespaceSplit") return std::make_unique<WhitespaceSplit>();
    unsupported("the pre_tokenizer '" + type + "'");
}

constexpr double kUnkPenalty = 10.0;

}  // namespace

// ---- Unigram ----

Unigram::Unigram(std::vector<std::pair<std::string, double>> vocab, int64_t unk_id, bool byte_fallback)
    : vocab_(std::move(vocab)), unk_id_(unk_id), byte_fallback_(byte_fallback) {
    if (unk_id_ >= 0 && (vocab_.empty() || static_cast<size_t>(unk_id_) >= vocab_.size()))
        throw Error(M3RT_ARTIFACT_ERROR, "Unigram unk_id is not in the vocabulary");
    min_score_ = std::numeric_limits<double>::infinity();
    size_t longest = 4;  // an unknown character: up to 4 bytes
    for (const auto& entry : vocab_) {
        min_score_ = std::min(min_score_, entry.second);
        longest = std::max(longest, entry.first.size());
    }
    if (longest > UINT16_MAX) throw Error(M3RT_UNSUPPORTED, "a Unigram piece longer than 65535 bytes");
    ring_size_ = longest + 1;
    build_trie();
}

void Unigram::build_trie() {
    // token_to_ids keeps the LAST id of a repeated piece (a map insert per vocabulary entry).
    std::vector<uint32_t> order(vocab_.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) { return vocab_[a].first < vocab_[b].first; });
    // Recursive construction over the sorted pieces: children of a node are contiguous edges.
    nodes_.clear();
    edges_.clear();
    nodes_.push_back(Node{});
    struct Frame {
        uint32_t node;
        size_t lo, hi, depth;
    };
    std::vector<Frame> stack{{0, 0, order.size(), 0}};
    while (!stack.empty()) {
        Frame f = stack.back();
        stack.pop_back();
        size_t lo = f.lo;
        // Pieces that end exactly at this depth: the node's own token (the last such id wins).
        while (lo < f.hi && vocab_[order[lo]].first.size() == f.depth) {
            nodes_[f.node].token = order[lo];
            ++lo;
        }
        nodes_[f.node].first_edge = static_cast<uint32_t>(edges_.size());
        std::vector<Frame> children;
        while (lo < f.hi) {
            const uint8_t byte = static_cast<uint8_t>(vocab_[order[lo]].first[f.depth]);
            size_t hi = lo;
            while (hi < f.hi && static_cast<uint8_t>(vocab_[order[hi]].first[f.depth]) == byte) ++hi;
            const uint32_t child = static_cast<uint32_t>(nodes_.size());
            nodes_.push_back(Node{});
            edges_.push_back(Edge{byte, child});
            children.push_back({child, lo, hi, f.depth + 1});
            lo = hi;
        }
        nodes_[f.node].num_edges = static_cast<uint32_t>(edges_.size()) - nodes_[f.node].first_edge;
        for (auto it = children.rbegin(); it != children.rend(); ++it) stack.push_back(*it);
    }
}

int64_t Unigram::id_of(std::string_view piece) const {
    uint32_t node = 0;
    for (unsigned char c : piece) {
        const Node& n = nodes_[node];
        const Edge* begin = edges_.data() + n.first_edge;
        const Edge* end = begin + n.num_edges;
        const Edge* e = std::lower_bound(begin, end, c, [](const Edge& edge, uint8_t b) { return edge.byte < b; });
        if (e == end || e->byte != c) return -1;
        node = e->child;
    }
    return nodes_[node].token;
}

size_t Unigram::tokenize(std::string_view text, std::vector<int64_t>& ids, size_t limit) const {
    if (text.empty() || limit == 0) return 0;
    // sentencepiece's Viterbi with a lean lattice: per byte only the length of the best piece ending
    // there (2 bytes); scores live in a ring over the longest piece, since a piece starting at `s`
    // ends within s + longest. Ids are looked up again when back-tracking: a position's best piece is
    // the vocabulary entry of its bytes, or unknown when the vocabulary has none.
    const size_t size = text.size();
    const double unk_score = min_score_ - kUnkPenalty;
    const size_t ring = ring_size_;
    std::vector<uint16_t> back(size + 1, 0);
    std::vector<double> score(ring, 0.0);
    std::vector<uint8_t> set(ring, 0);
    set[0] = 1;
    size_t starts_at = 0;
    while (starts_at < size) {
        const double till_here = score[starts_at % ring];
        size_t next = starts_at;
        next_code_point(text, next);
        const size_t mblen = next - starts_at;
        bool has_single_node = false;
        uint32_t node = 0;
        for (size_t pos = starts_at; pos < size; ++pos) {
            const Node& n = nodes_[node];
            const Edge* begin = edges_.data() + n.first_edge;
            const Edge* end = begin + n.num_edges;
            const uint8_t c = static_cast<uint8_t>(text[pos]);
            const Edge* e = std::lower_bound(begin, end, c, [](const Edge& edge, uint8_t b) { return edge.byte < b; });
            if (e == end || e->byte != c) break;
            node = e->child;
            const int64_t id = nodes_[node].token;
            if (id < 0) continue;
            const size_t key_pos = pos + 1;
            const double candidate = vocab_[static_cast<size_t>(id)].second + till_here;
            const size_t slot = key_pos % ring;
            if (!set[slot] || candidate > score[slot]) {
                score[slot] = candidate;
                set[slot] = 1;
                back[key_pos] = static_cast<uint16_t>(key_pos - starts_at);
            }
            if (key_pos - starts_at == mblen) has_single_node = true;
        }
        if (!has_single_node) {
            if (unk_id_ < 0) throw Error(M3RT_UNSUPPORTED, "the Unigram model has no unk_id but met an unknown character");
            const size_t slot = (starts_at + mblen) % ring;
            const double candidate = unk_score + till_here;
            if (!set[slot] || candidate > score[slot]) {
                score[slot] = candidate;
                set[slot] = 1;
                back[starts_at + mblen] = static_cast<uint16_t>(mblen);
            }
        }
        // The slots of the positions passed are reused for those `ring` bytes further on.
        for (size_t p = starts_at; p < next; ++p) set[p % ring] = 0;
        starts_at = next;
    }
    // Back-track; consecutive unknown pieces are fused into one string, then every string is looked
    // up. A first walk counts the strings, so that with a `limit` only the first ones are kept.
    const auto is_unknown = [&](size_t start, size_t stop) {
        const int64_t id = id_of(text.substr(start, stop - start));
        return id < 0 || id == unk_id_;
    };
    const auto walk = [&](auto&& emit) {
        size_t ends_at = size, unk_end = 0;
        bool in_unk = false;
        while (ends_at > 0) {
            const size_t start = ends_at - back[ends_at];
            if (is_unknown(start, ends_at)) {
                if (!in_unk) unk_end = ends_at;
                in_unk = true;
            } else {
                if (in_unk) emit(ends_at, unk_end);
                in_unk = false;
                emit(start, ends_at);
            }
            ends_at = start;
        }
        if (in_unk) emit(0, unk_end);
    };
    size_t total = 0;
    if (limit != SIZE_MAX) walk([&](size_t, size_t) { ++total; });
    const size_t skip = limit != SIZE_MAX && total > limit ? total - limit : 0;
    std::vector<std::pair<size_t, size_t>> pieces;  // byte ranges, reversed
    size_t seen = 0;
    walk([&](size_t start, size_t stop) {
        if (seen++ >= skip) pieces.emplace_back(start, stop);
    });
    const size_t before = ids.size();
    for (auto it = pieces.rbegin(); it != pieces.rend() && ids.size() - before < limit; ++it) {
        const std::string_view s = text.substr(it->first, it->second - it->first);
        const int64_t id = id_of(s);
        if (id >= 0) {
            ids.push_back(id);
            continue;
        }
        if (byte_fallback_) {
            std::vector<int64_t> bytes;
            for (unsigned char b : s) {
                char name[8];
                snprintf(name, sizeof name, "<0x%02X>", b);
                const int64_t bid = id_of(name);
                if (bid < 0) break;
                bytes.push_back(bid);
            }
            if (bytes.size() == s.size()) {
                ids.insert(ids.end(), bytes.begin(), bytes.end());
                continue;
            }
        }
        if (unk_id_ < 0) throw Error(M3RT_UNSUPPORTED, "the Unigram model has no unk_id but met an unknown piece");
        ids.push_back(unk_id_);
    }
    if (ids.size() - before > limit) ids.resize(before + limit);
    return ids.size() - before;
}

// ---- TextTokenizer ----

TextTokenizer::~TextTokenizer() = default;

std::unique_ptr<TextTokenizer> TextTokenizer::from_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw Error(M3RT_ARTIFACT_ERROR, "cannot read " + path);
    std::stringstream buffer;
    buffer << in.rdbuf();
    return from_json(buffer.str(), path);
}

std::unique_ptr<TextTokenizer> TextTokenizer::from_json(const std::string& text, const std::string& what) {
    json spec;
    try {
        spec = json::parse(text);
    } catch (const json::exception& e) {
        throw Error(M3RT_ARTIFACT_ERROR, what + " is not valid JSON: " + e.what());
    }
    std::unique_ptr<TextTokenizer> tok(new TextTokenizer());
    try {
        const json& model = spec.at("model");
        const std::string model_type = model.value("type", "");
        if (model_type != "Unigram") unsupported("the model '" + model_type + "'");
        std::vector<std::pair<std::string, double>> vocab;
        vocab.reserve(model.at("vocab").size());
        for (const auto& entry : model.at("vocab")) vocab.emplace_back(entry.at(0).get<std::string>(), entry.at(1).get<double>());
        const int64_t unk_id = model.contains("unk_id") && !model["unk_id"].is_null() ? integer(model["unk_id"], "unk_id") : -1;
        const bool byte_fallback = model.value("byte_fallback", false);
        tok->model_ = std::make_unique<Unigram>(std::move(vocab), unk_id, byte_fallback);

        tok->normalizer_ = make_normalizer(spec.value("normalizer", json()));
        tok->pre_tokenizer_ = make_pre_tokenizer(spec.value("pre_tokenizer", json()));

        // Added tokens as tokenizers' deserialisation adds them (AddedVocabulary::add_tokens): the file's
        // "id" is not used; a content already known keeps its id (earlier added token, then the model's
        // vocabulary), a new one gets the next id from the model's vocabulary size on. Exact duplicates
        // are ignored; the flags of an id are those of its last entry. Match patterns: the special
        // tokens (each content once), then the other tokens.
        std::vector<AddedToken> listed;
        for (const auto& a : spec.value("added_tokens", json::array())) {
            listed.push_back(AddedToken{-1, a.at("content").get<std::string>(), a.value("single_word", false),
                                        a.value("lstrip", false), a.value("rstrip", false), a.value("normalized", true),
                                        a.value("special", false)});
        }
        auto same = [](const AddedToken& x, const AddedToken& y) {
            return x.content == y.content && x.single_word == y.single_word && x.lstrip == y.lstrip &&
                   x.rstrip == y.rstrip && x.normalized == y.normalized && x.special == y.special;
        };
        std::vector<AddedToken> specials, plain, kept;
        for (const auto& t : listed) {
            if (!t.special || t.content.empty()) continue;
            if (std::none_of(specials.begin(), specials.end(), [&](const AddedToken& x) { return x.content == t.content; }))
                specials.push_back(t);
        }
        std::map<std::string, int64_t> content_id;
        std::map<int64_t, AddedToken> by_id;
        int64_t next_id = static_cast<int64_t>(tok->model_->size());
        for (const auto& t : listed) {
            if (t.content.empty() || std::any_of(kept.begin(), kept.end(), [&](const AddedToken& x) { return same(x, t); })) continue;
            int64_t id;
            if (auto it = content_id.find(t.content); it != content_id.end()) id = it->second;
            else if (int64_t model_id = tok->model_->id_of(t.content); model_id >= 0) id = model_id;
            else id = next_id++;
            content_id[t.content] = id;
            by_id[id] = t;
            if (std::none_of(specials.begin(), specials.end(), [&](const AddedToken& x) { return x.content == t.content; }))
                plain.push_back(t);
            kept.push_back(t);
        }
        for (auto* group : {&specials, &plain}) {
            for (const auto& t : *group) {
                const int64_t id = content_id.at(t.content);
                AddedToken pattern = by_id.at(id);  // lstrip/rstrip/single_word of the id's last entry
                pattern.id = id;
                pattern.normalized = t.normalized;  // which text it is matched in: this entry's own flag
                tok->added_.push_back(pattern);
            }
        }
        for (const auto& t : tok->added_) {
            std::string content = t.content;
            if (t.normalized) {
                tok->has_normalized_added_ = true;
                if (tok->normalizer_) tok->normalizer_->apply(content);
            }
            tok->added_normalized_content_.push_back(content);
        }
        tok->added_by_id_ = std::move(by_id);
        const bool added_without_spaces = std::none_of(tok->added_.begin(), tok->added_.end(), [](const AddedToken& t) {
            return t.content.find_first_of(" \t\n\r\v\f") != std::string::npos;
        });
        tok->prefix_cut_safe_ = added_without_spaces && tok->pre_tokenizer_ &&
                                tok->pre_tokenizer_->splits_on_whitespace() &&
                                (!tok->normalizer_ || tok->normalizer_->local());

        const json post = spec.value("post_processor", json());
        if (!post.is_null()) {
            const std::string type = post.value("type", "");
            if (type != "TemplateProcessing") unsupported("the post_processor '" + type + "'");
            bool seen_sequence = false;
            for (const auto& item : post.at("single")) {
                if (item.contains("Sequence")) {
                    if (item["Sequence"].value("id", "A") != "A") unsupported("a single-sequence template with sequence B");
                    if (seen_sequence) unsupported("a template with the sequence twice");
                    seen_sequence = true;
                } else if (item.contains("SpecialToken")) {
                    const std::string name = item["SpecialToken"].at("id").get<std::string>();
                    const json& special = post.at("special_tokens").at(name);
                    auto& side = seen_sequence ? tok->template_suffix_ : tok->template_prefix_;
                    for (const auto& id : special.at("ids")) side.push_back(integer(id, "a template id"));
                } else {
                    unsupported("a template item other than Sequence/SpecialToken");
                }
            }
            tok->template_added_ = tok->template_prefix_.size() + tok->template_suffix_.size();
        }

        // Decoding single ids (for display): tokenizers' decode([id]) with the Metaspace decoder or none.
        const json decoder = spec.value("decoder", json());
        std::string replacement;  // Metaspace decoder: its replacement character, removed or made a space
        bool remove_replacement = false;
        if (!decoder.is_null()) {
            const std::string type = decoder.value("type", "");
            if (type != "Metaspace") unsupported("the decoder '" + type + "'");
            append_utf8(replacement, single_char(decoder.at("replacement").get<std::string>(), "Metaspace replacement"));
            // decode([id]): the single token is the first, whose replacements vanish unless prepend is never.
            remove_replacement = metaspace_prepend(decoder) != Prepend::Never;
        }
        size_t size = tok->model_->size();
        for (const auto& [id, t] : tok->added_by_id_) size = std::max(size, static_cast<size_t>(id) + 1);
        for (const auto* side : {&tok->template_prefix_, &tok->template_suffix_}) {
            for (int64_t id : *side) {
                if (id < 0 || static_cast<size_t>(id) >= size) {
                    throw Error(M3RT_ARTIFACT_ERROR, "tokenizer.json: the post-processor's id " + std::to_string(id) +
                                                         " is outside the vocabulary");
                }
            }
        }
        tok->decoded_.assign(size, std::string());
        for (size_t id = 0; id < tok->model_->size(); ++id) tok->decoded_[id] = tok->model_->piece(id);
        for (const auto& [id, t] : tok->added_by_id_) tok->decoded_[static_cast<size_t>(id)] = t.content;
        if (!replacement.empty()) {
            for (auto& s : tok->decoded_) {
                std::string out;
                size_t pos = 0;
                for (size_t hit; (hit = s.find(replacement, pos)) != std::string::npos; pos = hit + replacement.size()) {
                    out.append(s, pos, hit - pos);
                    if (!remove_replacement) out.push_back(' ');
                }
                out.append(s, pos, std::string::npos);
                s.swap(out);
            }
        }
    } catch (const json::exception& e) {
        throw Error(M3RT_ARTIFACT_ERROR, what + " has an unexpected structure: " + e.what());
    }
    return tok;
}

// tokenizers' AddedVocabulary::find_matches: leftmost-longest matches of the added tokens, with
// single_word / lstrip / rstrip applied.
std::vector<TextTokenizer::Split> TextTokenizer::find_added(std::string_view text, bool normalized_set) const {
    std::vector<Split> splits;
    size_t start_offset = 0, search = 0;
    while (search < text.size()) {
        // Leftmost position with a match, longest pattern there.
        size_t mat_start = std::string::npos, mat_len = 0, which = 0;
        for (size_t pos = search; pos < text.size() && mat_start == std::string::npos; ++pos) {
            for (size_t k = 0; k < added_.size(); ++k) {
                if (added_[k].normalized != normalized_set) continue;
                const std::string& pat = added_normalized_content_[k];
                if (pat.size() > mat_len && text.compare(pos, pat.size(), pat) == 0) {
                    mat_start = pos;
                    mat_len = pat.size();
                    which = k;
                }
            }
        }
        if (mat_start == std::string::npos) break;
        search = mat_start + mat_len;
        const AddedToken& token = added_[which];
        size_t start = mat_start, stop = mat_start + mat_len;
        if (token.single_word) {
            bool start_space = start == 0;
            if (!start_space) {
                // Last code point before the match.
                size_t p = start - 1;
                while (p > 0 && (static_cast<uint8_t>(text[p]) & 0xC0) == 0x80) --p;
                size_t q = p;
                start_space = !is_word(next_code_point(text, q));
            }
            bool stop_space = stop == text.size();
            if (!stop_space) {
                size_t q = stop;
                stop_space = !is_word(next_code_point(text, q));
            }
            if (!start_space || !stop_space) continue;
        }
        if (token.lstrip) {
            // Start of the whitespace run that ends at the match, but not before the previous split.
            size_t new_start = start;
            while (new_start > 0) {
                size_t p = new_start - 1;
                while (p > 0 && (static_cast<uint8_t>(text[p]) & 0xC0) == 0x80) --p;
                size_t q = p;
                if (!is_whitespace(next_code_point(text, q))) break;
                new_start = p;
            }
            start = std::max(new_start, start_offset);
        }
        if (token.rstrip) {
            size_t q = stop;
            while (q < text.size()) {
                size_t r = q;
                if (!is_whitespace(next_code_point(text, r))) break;
                q = r;
            }
            stop = q;
        }
        if (start_offset < start) splits.push_back({start_offset, start, -1});
        splits.push_back({start, stop, token.id});
        start_offset = stop;
    }
    if (start_offset != text.size()) splits.push_back({start_offset, text.size(), -1});
    return splits;
}

void TextTokenizer::tokenize_sequence(std::string_view text, std::vector<int64_t>& ids, size_t limit) const {
    // 1. Added tokens matched on the raw text; 2. normalise the rest and match normalised added tokens.
    struct Segment {
        std::string text;
        size_t original_start;
        int64_t token;
    };
    std::vector<Segment> segments;
    if (text.empty()) return;
    for (const Split& s : find_added(text, false)) {
        if (s.stop == s.start) continue;
        std::string part(text.substr(s.start, s.stop - s.start));
        if (s.token >= 0) {
            segments.push_back({std::move(part), s.start, s.token});
            continue;
        }
        if (normalizer_) normalizer_->apply(part);
        check_normalized_size(part.size());
        if (part.empty()) continue;
        if (!has_normalized_added_) {
            segments.push_back({std::move(part), s.start, -1});
            continue;
        }
        for (const Split& n : find_added(part, true)) {
            if (n.stop == n.start) continue;
            // A slice of a normalised string starts at its source's start only when it is the first slice.
            segments.push_back({part.substr(n.start, n.stop - n.start), n.start == 0 ? s.start : s.start + 1, n.token});
        }
    }
    std::vector<Piece> pieces;
    for (Segment& seg : segments) {
        if (ids.size() >= limit) return;
        if (seg.token >= 0) {
            ids.push_back(seg.token);
            continue;
        }
        pieces.clear();
        pieces.push_back({std::move(seg.text), seg.original_start});
        if (pre_tokenizer_) {
            pre_tokenizer_->apply(pieces);
        }
        for (const Piece& p : pieces) {
            if (ids.size() >= limit) return;
            if (!p.text.empty()) model_->tokenize(p.text, ids, limit == SIZE_MAX ? SIZE_MAX : limit - ids.size());
        }
    }
}

size_t TextTokenizer::cut_after(std::string_view text, size_t from) {
    for (size_t i = std::max<size_t>(from, 1); i < text.size(); ++i) {
        const auto before = static_cast<unsigned char>(text[i - 1]);
        if (text[i] == ' ' && before > 0x20 && before < 0x7F) return i;
    }
    return text.size();
}

Encoding TextTokenizer::encode(std::string_view text, bool add_special_tokens, size_t max_length) const {
    Encoding enc;
    std::vector<int64_t> ids;
    const size_t added = add_special_tokens ? template_added_ : 0;
    if (max_length > 0 && max_length < added) {
        throw Error(M3RT_INVALID_ARGUMENT, "max_length " + std::to_string(max_length) + " is below the " +
                                               std::to_string(added) + " special tokens the template adds");
    }
    if (max_length == 0) {
        tokenize_sequence(text, ids, SIZE_MAX);
    } else if (!prefix_cut_safe_) {
        tokenize_sequence(text, ids, max_length - added + 1);
    } else {
        // One token more than fits decides truncation. Only a prefix that ends at a safe cut (before
        // an ASCII space that follows an ASCII non-space) is normalised and tokenised; it grows until
        // it yields that many tokens or is the whole text. A whole text's first tokens are its safe
        // prefix's tokens: nothing the tokenizer does reaches across such a cut.
        const size_t wanted = max_length - added + 1;
        for (size_t reach = std::max<size_t>(4096, wanted * 16);; reach *= 4) {
            const size_t cut = cut_after(text, reach);
            ids.clear();
            tokenize_sequence(text.substr(0, cut), ids, wanted);
            if (ids.size() >= wanted || cut == text.size()) break;
        }
    }
    if (max_length > 0) {
        if (ids.size() > max_length - added) {
            ids.resize(max_length - added);
            enc.truncated = true;
        }
    }
    if (add_special_tokens) {
        enc.ids.reserve(ids.size() + template_added_);
        enc.ids.insert(enc.ids.end(), template_prefix_.begin(), template_prefix_.end());
        enc.ids.insert(enc.ids.end(), ids.begin(), ids.end());
        enc.ids.insert(enc.ids.end(), template_suffix_.begin(), template_suffix_.end());
    } else {
        enc.ids = std::move(ids);
    }
    return enc;
}

const std::string* TextTokenizer::id_to_text(int64_t id) const {
    if (id < 0 || static_cast<size_t>(id) >= decoded_.size()) return nullptr;
    return &decoded_[static_cast<size_t>(id)];
}

size_t find_invalid_utf8(std::string_view text) {
    // Rust's str rules (the Unicode standard's well-formed sequences), with 64-bit offsets.
    const auto* s = reinterpret_cast<const uint8_t*>(text.data());
    const size_t n = text.size();
    size_t i = 0;
    while (i < n) {
        const uint8_t b = s[i];
        if (b < 0x80) {
            ++i;
            continue;
        }
        size_t length;
        uint8_t lo = 0x80, hi = 0xBF;  // the second byte's range
        if (b >= 0xC2 && b <= 0xDF) length = 2;
        else if (b == 0xE0) length = 3, lo = 0xA0;
        else if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF) length = 3;
        else if (b == 0xED) length = 3, hi = 0x9F;
        else if (b == 0xF0) length = 4, lo = 0x90;
        else if (b >= 0xF1 && b <= 0xF3) length = 4;
        else if (b == 0xF4) length = 4, hi = 0x8F;
        else return i;
        if (n - i < length || s[i + 1] < lo || s[i + 1] > hi) return i;
        for (size_t k = 2; k < length; ++k) {
            if ((s[i + k] & 0xC0) != 0x80) return i;
        }
        i += length;
    }
    return std::string::npos;
}

}  // namespace m3rt
