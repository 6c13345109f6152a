#include "manifest.h"

#include <openssl/evp.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>

#include "error.h"

namespace m3rt {
namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

constexpr const char* kManifest = "m3rt.json";
constexpr const char* kFormat = "m3rt-artifact";
constexpr int kFormatVersion = 1;

[[noreturn]] void artifact_error(const std::string& message) { throw Error(M3RT_ARTIFACT_ERROR, message); }

// nlohmann's get<int64_t>() of a non-integral number is a float-to-integer cast (undefined when out of
// range): sizes and ids must be JSON integers.
int64_t integer(const json& value, const char* what) {
    if (!value.is_number_integer()) artifact_error(std::string("m3rt.json: ") + what + " must be an integer");
    return value.get<int64_t>();
}

// A file the manifest names, which must stay inside the artifact: a relative path without "..", so
// that a crafted m3rt.json cannot make the library read (or hash) files elsewhere.
fs::path inside(const fs::path& root, const std::string& name) {
    const fs::path relative(name);
    bool escapes = name.empty() || relative.is_absolute() || relative.has_root_name();
    for (const auto& part : relative) escapes = escapes || part == "..";
    if (escapes) artifact_error("m3rt.json names '" + name + "', which is not a path inside the artifact");
    return root / relative;
}

void verify_files(const fs::path& root, const json& files) {
    for (const auto& [name, record] : files.items()) {
        const fs::path path = inside(root, name);
        std::error_code ec;
        if (!fs::is_regular_file(path, ec)) artifact_error(path.string() + " is listed in m3rt.json but missing");
        const auto size = fs::file_size(path, ec);
        const json& recorded = record.at("size");
        if (!recorded.is_number_unsigned()) artifact_error("m3rt.json: the size of " + name + " must be a non-negative integer");
        const auto expected = recorded.get<uint64_t>();
        if (ec || size != expected) {
            artifact_error(path.string() + " is " + std::to_string(size) + " bytes but m3rt.json records " +
                           std::to_string(expected) + ": the file is truncated or was replaced; re-export or copy it again");
        }
        if (sha256_file(path.string()) != record.at("sha256").get<std::string>()) {
            artifact_error(path.string() + " does not match the sha256 in m3rt.json: the file is corrupted or was replaced");
        }
    }
}

}  // namespace

std::string sha256_file(const std::string& path) {
    std::FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) artifact_error("cannot read " + path);
    std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
    EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr);
    std::vector<unsigned char> buffer(1 << 20);
    size_t n;
    while ((n = std::fread(buffer.data(), 1, buffer.size(), f)) > 0) EVP_DigestUpdate(ctx.get(), buffer.data(), n);
    const bool failed = std::ferror(f);
    std::fclose(f);
    if (failed) artifact_error("error reading " + path);
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    EVP_DigestFinal_ex(ctx.get(), digest, &len);
    static const char* hex = "0123456789abcdef";
    std::string out;
    for (unsigned int i = 0; i < len; ++i) {
        out.push_back(hex[digest[i] >> 4]);
        out.push_back(hex[digest[i] & 15]);
    }
    return out;
}

std::string select_graph(const std::vector<std::string>& names, const GraphRequest& request) {
    if (!request.graph.empty()) return request.graph;
    const auto has = [&](const char* name) { return std::find(names.begin(), names.end(), name) != names.end(); };
    const std::string& precision = request.precision;
    if (precision != "fp32" && precision != "fp16" && precision != "int8") {
        throw Error(M3RT_INVALID_ARGUMENT, "precision '" + precision + "': expected fp32, fp16 or int8");
    }
    if (request.cuda && precision == "fp16" && has("fp16-fused")) return "fp16-fused";
    if (!request.cuda && precision == "fp32" && has("fp32-flash")) return "fp32-flash";
    if (!request.cuda && precision == "int8") {
        // int8 weights where this CPU sums u8 x s8 products exactly, else their uint8 twin.
        if (has("int8") && has("int8-u8")) return request.u8s8_exact && request.u8s8_exact() ? "int8" : "int8-u8";
        if (!has("int8") && has("int8-u8")) return "int8-u8";
    }
    return precision;
}

ArtifactInfo read_artifact(const std::string& root_str, const GraphRequest& request, bool verify) {
    const fs::path root(root_str);
    std::error_code ec;
    if (!fs::is_directory(root, ec)) {
        artifact_error(root_str + " is not a directory (expected an m3rt artifact made by m3-export)");
    }
    const fs::path manifest_path = root / kManifest;
    std::ifstream in(manifest_path, std::ios::binary);
    if (!in) artifact_error(root_str + " is not an m3rt artifact: m3rt.json is missing (create one with m3-export)");
    std::stringstream buffer;
    buffer << in.rdbuf();
    return parse_manifest(root_str, buffer.str(), request, verify);
}

namespace {

ArtifactInfo parse_manifest_json(const std::string& root_str, const std::string& text, const GraphRequest& request,
                                 bool verify) {
    const fs::path root(root_str);
    const fs::path manifest_path = root / kManifest;
    json data;
    try {
        data = json::parse(text);
    } catch (const json::exception& e) {
        artifact_error(manifest_path.string() + " is not valid JSON: " + e.what());
    }
    if (!data.is_object() || data.value("format", "") != kFormat) {
        artifact_error(manifest_path.string() + " is not an m3rt manifest (format field is not 'm3rt-artifact')");
    }
    if (!data.contains("format_version") || data["format_version"] != kFormatVersion) {
        artifact_error(manifest_path.string() + " has format_version " + data.value("format_version", json()).dump() +
                       "; this library reads 1. Re-export the model with this m3rt version.");
    }
    for (const char* key : {"files", "graphs", "model", "special_tokens", "tokenizer"}) {
        if (!data.contains(key)) artifact_error(manifest_path.string() + " lacks the '" + key + "' section");
    }
    ArtifactInfo info;
    try {
        if (verify) verify_files(root, data["files"]);
        const json& graphs = data["graphs"];
        if (!graphs.is_object()) artifact_error(manifest_path.string() + " has no graphs object");
        std::vector<std::string> names;
        for (const auto& [name, _] : graphs.items()) names.push_back(name);
        const std::string graph = select_graph(names, request);
        if (!graphs.contains(graph)) {
            std::string listed;
            for (const auto& name : names) listed += (listed.empty() ? "" : ", ") + name;
            artifact_error(root_str + " has no '" + graph + "' graph; it has: " + listed);
        }
        const json& g = graphs[graph];
        for (const char* output : {"dense_vecs", "sparse_weights", "colbert_vecs"}) {
            const std::string dtype = g.at("outputs").at(output).value("dtype", "float32");
            if (dtype != "float32") {
                throw Error(M3RT_UNSUPPORTED, "graph '" + graph + "' returns " + output + " as " + dtype +
                                                  "; the C library reads float32 outputs (use the fp32 or an int8 graph)");
            }
        }
        info.root = root_str;
        info.graph_name = graph;
        info.graph_path = inside(root, g.at("file").get<std::string>()).string();
        info.execution_provider = g.value("execution_provider", json()).is_string() ? g["execution_provider"].get<std::string>() : "";
        for (const auto& b : g.value("backends", json::array())) info.backends.push_back(b.get<std::string>());
        info.tokenizer_path = inside(root, data["tokenizer"].at("file").get<std::string>()).string();
        const json& model = data["model"];
        info.hidden_size = integer(model.at("hidden_size"), "hidden_size");
        info.vocab_size = integer(model.at("vocab_size"), "vocab_size");
        info.max_length = integer(model.at("max_length"), "max_length");
        info.colbert_dim = model.contains("colbert_dim") ? integer(model["colbert_dim"], "colbert_dim") : info.hidden_size;
        const json& specials = data["special_tokens"];
        info.pad_id = integer(specials.at("pad"), "special_tokens.pad");
        for (const char* name : {"cls", "eos", "pad", "unk"}) {
            if (specials.contains(name)) info.unused_ids.push_back(integer(specials[name], "a special token id"));
        }
        std::sort(info.unused_ids.begin(), info.unused_ids.end());
        info.unused_ids.erase(std::unique(info.unused_ids.begin(), info.unused_ids.end()), info.unused_ids.end());
    } catch (const json::exception& e) {
        artifact_error(manifest_path.string() + " has an unexpected structure: " + e.what());
    }
    if (info.hidden_size <= 0 || info.colbert_dim <= 0 || info.vocab_size <= 0 || info.max_length < 2 ||
        info.max_length > (int64_t{1} << 20)) {
        artifact_error(manifest_path.string() + " has an invalid model section (hidden_size, colbert_dim and vocab_size "
                       "must be positive, max_length in 2..1048576)");
    }
    return info;
}

}  // namespace

ArtifactInfo parse_manifest(const std::string& root_str, const std::string& text, const GraphRequest& request,
                            bool verify) {
    try {
        return parse_manifest_json(root_str, text, request, verify);
    } catch (const json::exception& e) {  // a field of the wrong type anywhere
        artifact_error((fs::path(root_str) / kManifest).string() + " has an unexpected structure: " + e.what());
    }
}

}  // namespace m3rt
