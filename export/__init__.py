"""m3rt.export: BGE-M3 checkpoint -> ONNX artifact directory (needs the `export` extra)."""
