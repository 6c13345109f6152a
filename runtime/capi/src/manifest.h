// The artifact's m3rt.json: what the C library needs of it, parsed and (optionally) hash-verified.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace m3rt {

struct ArtifactInfo {
    std::string root;
    std::string graph_name;
    std::string graph_path;           // the ONNX file to load
    std::string execution_provider;   // set when only that provider runs the graph ("" otherwise)
    std::vector<std::string> backends;  // what serves the graph ("onnxruntime-cpu", "tensorrt", ...)
    std::string tokenizer_path;
    int64_t hidden_size = 0;
    int64_t colbert_dim = 0;
    int64_t vocab_size = 0;
    int64_t max_length = 0;
    int64_t pad_id = 1;
    std::vector<int64_t> unused_ids;  // cls, eos, pad, unk: never sparse keys (FlagEmbedding)
};

// Which graph to run: `graph` by name, else the one `precision` picks for the device as the Python
// runtime's select_graph and int8_graph_for do (`u8s8_exact` is asked only when the choice needs it).
struct GraphRequest {
    std::string graph;
    std::string precision = "fp32";
    bool cuda = false;
    std::function<bool()> u8s8_exact;
};

// Reads root/m3rt.json; with `verify`, checks every listed file's size and sha256. Throws m3rt::Error.
ArtifactInfo read_artifact(const std::string& root, const GraphRequest& request, bool verify);

// The same from the manifest's text (`root` is where its files are).
ArtifactInfo parse_manifest(const std::string& root, const std::string& text, const GraphRequest& request, bool verify);

// The manifest's graph for a request, given the graph names it has.
std::string select_graph(const std::vector<std::string>& names, const GraphRequest& request);

// Lower-case hex sha256 of a file's contents.
std::string sha256_file(const std::string& path);

}  // namespace m3rt
