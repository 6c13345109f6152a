"""`m3rt serve`: BGE-M3's three outputs over HTTP (extra `m3rt[serve]`).

- `app`: the FastAPI app (routes, validation, error JSON), usable without Ray on any `Encoder`;
- `protocol`: request models and the JSON shapes of the outputs;
- `batching`: encode jobs, their padded-token size, and one `encode` per batch of jobs;
- `deployment`: the Ray Serve deployment, `build_app` for `serve run` / `serve deploy`, and `run_server`;
- `metrics`: the Prometheus metrics of a replica;
- `cli`: the `m3rt serve` verb (importing it imports no Ray).
"""
