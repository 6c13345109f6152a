"""m3rt.benchmarks: `m3-bench`, latency and throughput of every backend beside the reference."""
