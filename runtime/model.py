"""`M3Model`: loads an artifact directory and offers FlagEmbedding's `BGEM3FlagModel` surface."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from m3rt.auto_precision import resolve_auto
from m3rt.backends import Backend
from m3rt.bf16_gate import check_bf16_on_this_cpu
from m3rt.core import BatchRunner
from m3rt.errors import InputError
from m3rt.explain import Explanation, explain
from m3rt.granularity import GranularityOptions, encode_granular, parse_levels
from m3rt.heads import HEAD_OUTPUTS, HEADS, OUTPUT_SPARSE, unused_token_ids
from m3rt.manifest import Manifest, load_manifest
from m3rt.memory import budget_rows
from m3rt.pipeline import Stages, TokenProgress, run_pipeline
from m3rt.placement import Placement, create_backend, resolve
from m3rt.postprocess import Collected, OutputCollector, PostProcessor
from m3rt.scheduler import pad_batch, plan_batches, token_lengths
from m3rt.scoring import colbert_score, lexical_matching_scores, pair_scores
from m3rt.tokenizer import M3Tokenizer
from m3rt.validation import check_int8_on_this_cpu

SparseFormat = Literal["dict", "csr", "scipy"]


def _unused_ids(manifest: Manifest) -> tuple[int, ...]:
    return unused_token_ids(manifest.special_tokens)


def _as_texts(sentences: Any, what: str = "sentences") -> tuple[list[str], bool]:
    """Validate the input; returns (texts, was_single_string)."""
    if isinstance(sentences, str):
        return [sentences], True
    if sentences is None:
        raise InputError(f"{what} is None; pass a string or a list of strings")
    if isinstance(sentences, (bytes, bytearray)):
        raise InputError(f"{what} is bytes; decode it to str first (e.g. data.decode('utf-8'))")
    if isinstance(sentences, dict) or not hasattr(sentences, "__iter__"):
        raise InputError(f"{what} must be a string or a list of strings, got {type(sentences).__name__}")
    texts = list(sentences)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            hint = " (decode bytes to str first)" if isinstance(text, (bytes, bytearray)) else ""
            raise InputError(f"{what}[{index}] is {type(text).__name__}, not str{hint}")
    return texts, False


def _check_positive_int(name: str, value: Any, upper: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise InputError(f"{name} must be >= 1, got {value}")
    if upper is not None and value > upper:
        raise InputError(f"{name}={value} exceeds this model's limit of {upper}")
    return int(value)


class M3Model:
    """BGE-M3 on an exported artifact. Thread-safe for concurrent `encode` calls.

    Defaults follow FlagEmbedding's `BGEM3FlagModel` except `passage_max_length`, which is the
    model's full 8192 tokens (FlagEmbedding 1.4 uses 512; pass 512 for identical truncation).
    """

    def __init__(
        self,
        manifest: Manifest,
        backend: Backend,
        tokenizer: M3Tokenizer,
        *,
        batch_size: int = 256,
        query_max_length: int = 512,
        passage_max_length: int = 8192,
        token_budget: int = 8192,
        return_dense: bool = True,
        return_sparse: bool = False,
        return_colbert_vecs: bool = False,
        postprocessor: PostProcessor | None = None,
        memory_budget: int | str | None = None,
        placement: Placement | None = None,
    ) -> None:
        self.manifest = manifest
        self.backend = backend
        # What runs (engine, device, graphs), as `resolve` decided it; None for a backend built by hand.
        self.placement = placement
        self.tokenizer = tokenizer
        self.max_length = manifest.max_length
        self.batch_size = _check_positive_int("batch_size", batch_size)
        self.query_max_length = self._check_max_length(query_max_length)
        self.passage_max_length = self._check_max_length(passage_max_length)
        self.token_budget = _check_positive_int("token_budget", token_budget)
        self.return_dense = return_dense
        self.return_sparse = return_sparse
        self.return_colbert_vecs = return_colbert_vecs
        specials = manifest.special_tokens
        self.pad_id = specials["pad"]
        self.unused_ids = _unused_ids(manifest)
        # The three heads, on the host or on the GPU where a backend leaves its outputs.
        self.postprocessor = postprocessor or PostProcessor(self.unused_ids)
        # Rows per batch at a padded length under `memory_budget` (bytes or "6GiB"; None: no limit).
        self._memory_rows = budget_rows(
            manifest, placement, memory_budget, getattr(backend, "flash_from_tokens", None)
        )
        # Locking, row limits and out-of-memory retries, by what the backend says it can do.
        self._runner = BatchRunner(backend)
        if self._runner.capabilities.output_device is not None:
            # Compile and load the device kernels now rather than in the first encode call.
            self.postprocessor.kernels_for(self._runner.capabilities.output_device)

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        backend: str = "onnxruntime",
        precision: str = "fp32",
        verify: bool = True,
        providers: Sequence[Any] | None = None,
        intra_op_threads: int | None = None,
        device: str | None = None,
        backend_options: dict[str, Any] | None = None,
        colbert_fp16: bool = False,
        device_postprocess: bool = True,
        **options: Any,
    ) -> M3Model:
        """Load an artifact directory written by `m3-export`.

        `backend`: "onnxruntime", "openvino" (CPU: fp32, or bf16 on CPUs with avx512_bf16 or AMX),
        "tensorrt" or "auto" (TensorRT when the artifact has an engine of
        this precision and TensorRT and a GPU are present; else ONNX Runtime, on CUDA when no device
        is given and onnxruntime-gpu sees a GPU, except for int8). `precision`: "fp32", "fp16", "int8",
        "bf16" (OpenVINO) or "auto" (the CPU's fastest form within its gates, measured once per CPU;
        `model.placement.auto` says what it measured)
        (for ONNX Runtime, "int8" is the CPU-fast graph; for TensorRT, the engine built from the
        explicit Q/DQ graph). `verify` checks every file against the manifest's sizes and sha256 first.
        `device`: "cpu" (default) or "cuda" / "cuda:N" for ONNX Runtime CUDA (also chosen when
        `providers` asks for CUDAExecutionProvider); there fp16 runs the fused graph when the artifact
        has one. `backend_options`: CUDA backend settings (cuda_graph, graph_buckets; see
        `OnnxRuntimeCudaBackend`). `colbert_fp16`: ColBERT vectors as float16 (converted on the GPU
        when they are there). `device_postprocess=False`: reduce GPU outputs on the host instead of with
        the device kernels.
        """
        manifest = load_manifest(path, verify=verify)
        if precision == "auto":
            placement = resolve_auto(manifest, device, backend)
        else:
            placement = resolve(manifest, precision, device, backend=backend, providers=providers)
        notes = [placement.auto.describe()] if placement.auto is not None else []
        if placement.int8_kernel is not None:
            kernel = placement.int8_kernel
            notes.append(f"int8: {placement.graph.file} for this CPU's {kernel.describe()} kernels")
            if placement.int8_check:
                measured_here = check_int8_on_this_cpu(manifest, placement.graph.name, kernel)
                notes.extend([measured_here] if measured_here else [])
        engine = create_backend(
            manifest,
            placement,
            providers=providers,
            intra_op_threads=intra_op_threads,
            backend_options=backend_options,
        )
        if placement.engine == "openvino" and placement.precision == "bf16":
            # bf16 has no graph of its own: its gate is this CPU's, measured here unless recorded for it.
            notes.append(check_bf16_on_this_cpu(manifest, engine))
        if hasattr(engine, "notes"):
            engine.notes.extend(notes)
        post = PostProcessor(_unused_ids(manifest), colbert_fp16=colbert_fp16, device_postprocess=device_postprocess)
        try:
            tokenizer = M3Tokenizer(manifest.tokenizer_path)
            return cls(manifest, engine, tokenizer, postprocessor=post, placement=placement, **options)
        except BaseException:
            # A bad option (batch_size, memory_budget, ...) must not leave the backend's streams and memory behind.
            close = getattr(engine, "close", None)
            if close is not None:
                close()
            raise

    @property
    def notes(self) -> list[str]:
        """What the loader and the post-processor said about how this model runs (the int8 form chosen
        for this CPU, CUDA graphs or device post-processing turned off and why, ...)."""
        return [*getattr(self.backend, "notes", []), *self.postprocessor.notes]

    def close(self) -> None:
        """Release what the backend and the post-processor hold beyond memory (CUDA streams, device
        buffers, worker threads; nothing on ONNX Runtime CPU). Do not encode afterwards.
        `with M3Model.load(...) as model:` calls it on exit."""
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()
        self.postprocessor.close()

    def __enter__(self) -> M3Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ encoding

    def _check_max_length(self, value: Any) -> int:
        value = _check_positive_int("max_length", value, upper=self.max_length)
        if value < 2:
            raise InputError("max_length must be >= 2: it counts <s> and </s>")
        return value

    def _tokenize(
        self, texts: Sequence[str], max_length: int, truncate: bool, first_index: int = 0
    ) -> list[np.ndarray]:
        # M3Tokenizer.encode is thread-safe itself (it locks around its truncation setting).
        return self.tokenizer.encode(texts, max_length=max_length, truncate=truncate, first_index=first_index).ids

    def encode(
        self,
        sentences: str | Sequence[str],
        batch_size: int | None = None,
        max_length: int | None = None,
        return_dense: bool | None = None,
        return_sparse: bool | None = None,
        return_colbert_vecs: bool | None = None,
        *,
        truncate: bool = True,
        sparse_format: SparseFormat = "dict",
        show_progress: bool | None = None,
        granularity: str | Sequence[str] | None = None,
        granularity_options: GranularityOptions | dict[str, Any] | None = None,
        **_flag_embedding_kwargs: Any,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Encode texts; returns FlagEmbedding's dict (`dense_vecs`, `lexical_weights`, `colbert_vecs`).

        A single string returns un-batched values. Texts longer than `max_length` tokens are
        truncated like FlagEmbedding, or raise InputTooLongError with `truncate=False`.
        `sparse_format` "csr" returns a `SparseRows`, "scipy" a `scipy.sparse.csr_matrix`.

        `granularity` (any of "token", "sentence", "passage", "document") returns instead, per text,
        {level: results with character `offsets`} (see `m3rt.granularity`; `granularity_options`:
        passage_tokens, passage_overlap, passage_snap, long_document, document_overlap, language).
        """
        if granularity is not None:
            return self._encode_granular(
                sentences, granularity, granularity_options, batch_size, max_length,
                return_dense, return_sparse, return_colbert_vecs, show_progress,
            )  # fmt: skip
        texts, single = _as_texts(sentences)
        batch_size = _check_positive_int("batch_size", self.batch_size if batch_size is None else batch_size)
        max_length = self._check_max_length(self.passage_max_length if max_length is None else max_length)
        outputs = self._wanted(return_dense, return_sparse, return_colbert_vecs)
        if sparse_format not in ("dict", "csr", "scipy"):
            raise InputError(f"sparse_format must be 'dict', 'csr' or 'scipy', got {sparse_format!r}")
        if single and sparse_format != "dict":
            raise InputError("sparse_format 'csr'/'scipy' needs a list of texts")

        collected = self._run(texts, max_length, truncate, batch_size, outputs, show_progress)
        result: dict[str, Any] = {h.api: None for h in HEADS}
        for spec, values in zip(HEADS, collected):
            if spec.output not in outputs:
                continue
            if spec.output == OUTPUT_SPARSE and sparse_format != "dict":
                csr = sparse_format == "csr"
                result[spec.api] = values if csr else values.to_scipy(self.manifest.model.vocab_size)
                continue
            if spec.output == OUTPUT_SPARSE:
                values = values.to_dicts()
            result[spec.api] = values[0] if single else values
        return result

    def _wanted(self, *flags: bool | None) -> list[str]:
        """The graph outputs asked for by `encode`'s return_* flags (None: the model's default), in head order."""
        return [spec.output for spec, flag in zip(HEADS, flags) if (getattr(self, spec.flag) if flag is None else flag)]

    def _encode_granular(
        self, sentences, granularity, options, batch_size, max_length, want_dense, want_sparse, want_colbert, progress
    ) -> dict[str, Any] | list[dict[str, Any]]:
        texts, single = _as_texts(sentences)
        levels = parse_levels(granularity)
        batch_size = _check_positive_int("batch_size", self.batch_size if batch_size is None else batch_size)
        max_length_given = max_length
        max_length = self._check_max_length(self.passage_max_length if max_length is None else max_length)
        if isinstance(options, GranularityOptions):
            options_length = self._check_max_length(options.max_length)
            if max_length_given is not None and options_length != max_length:
                raise InputError(
                    f"granularity_options.max_length ({options_length}) differs from max_length ({max_length})"
                )
            options = replace(options, max_length=options_length)
        else:
            options = options or {}
            if not isinstance(options, dict) or "max_length" in options:
                raise InputError("granularity_options must be a dict of GranularityOptions fields (not max_length)")
            try:
                options = GranularityOptions(max_length=max_length, **options)
            except TypeError as exc:
                raise InputError(f"granularity_options: {exc}") from None
        outputs = self._wanted(want_dense, want_sparse, want_colbert)
        results = encode_granular(self, texts, levels, options, outputs, batch_size, progress)
        return results[0] if single else results

    def _run(
        self,
        texts: list[str],
        max_length: int,
        truncate: bool,
        batch_size: int,
        outputs: list[str],
        show_progress: bool | None,
    ) -> Collected:
        """Tokenise, batch, infer and post-process `texts` (pipelined); results in input order."""
        collector = OutputCollector(len(texts), self.manifest.hidden_size, outputs, self.postprocessor)
        if not outputs:
            # Nothing to compute, but bad input (truncate=False) is still reported.
            self._tokenize(texts, max_length, truncate)
            return collector.finish()
        tokenize = lambda chunk, first_index: self._tokenize(chunk, max_length, truncate, first_index)  # noqa: E731
        self._pipeline(texts, tokenize, outputs, batch_size, collector, show_progress)
        return collector.finish()

    def _pipeline(self, items, tokenize, outputs, batch_size, collector, show_progress) -> None:
        stages = Stages(
            tokenize=tokenize,
            plan=lambda ids: plan_batches(token_lengths(ids), batch_size, self.token_budget, self._memory_rows),
            pad=lambda ids, positions, first_index: pad_batch(ids, positions, self.pad_id, first_index),
            infer=lambda batch: self._runner.run(batch, outputs),
            collect=collector.add,
        )
        with TokenProgress(show_progress) as progress:
            run_pipeline(items, stages, progress)

    def run_ids(
        self,
        ids: Sequence[np.ndarray],
        outputs: Sequence[str],
        *,
        batch_size: int | None = None,
        show_progress: bool | None = None,
        collector: OutputCollector | None = None,
    ) -> Collected:
        """Run already tokenised inputs (each `<s> ... </s>`, at most `max_length` ids) through the model:
        batched under the token budget, pipelined, post-processed; results in input order.

        `outputs`: graph outputs to compute (`m3rt.heads`' outputs; also extra graph outputs such as
        `last_hidden_state` when `collector` keeps them). `collector`: an `OutputCollector` to fill
        instead of a new one (for what it keeps beyond the heads: per-token weights, hidden rows).
        """
        rows = self._check_ids(ids)
        batch_size = _check_positive_int("batch_size", self.batch_size if batch_size is None else batch_size)
        outputs = list(dict.fromkeys(outputs))
        if collector is None:
            heads = [name for name in outputs if name in HEAD_OUTPUTS]
            collector = OutputCollector(len(rows), self.manifest.hidden_size, heads, self.postprocessor)
        if outputs and rows:
            tokenize = lambda chunk, first_index: [rows[i] for i in chunk]  # noqa: E731
            self._pipeline(list(range(len(rows))), tokenize, outputs, batch_size, collector, show_progress)
        return collector.finish()

    def _check_ids(self, ids: Any) -> list[np.ndarray]:
        if isinstance(ids, (str, bytes, np.ndarray)) or not hasattr(ids, "__iter__"):
            raise InputError("ids must be a sequence of 1-D token id arrays, one per input")
        vocab = self.manifest.model.vocab_size
        rows = []
        for index, row in enumerate(ids):
            array = np.asarray(row)
            if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
                raise InputError(f"ids[{index}] must be a 1-D array of integer token ids")
            if not 1 <= array.size <= self.max_length:
                raise InputError(f"ids[{index}] has {array.size} ids; 1..{self.max_length} (max_length) are allowed")
            if array.min() < 0 or array.max() >= vocab:
                raise InputError(f"ids[{index}] has ids outside this model's vocabulary 0..{vocab - 1}")
            rows.append(array.astype(np.int64, copy=False))
        return rows

    def encode_queries(
        self, queries: str | Sequence[str], batch_size: int | None = None, max_length: int | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        return self.encode(
            queries,
            batch_size=batch_size,
            max_length=self.query_max_length if max_length is None else max_length,
            **kwargs,
        )

    def encode_corpus(
        self, corpus: str | Sequence[str], batch_size: int | None = None, max_length: int | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        return self.encode(
            corpus,
            batch_size=batch_size,
            max_length=self.passage_max_length if max_length is None else max_length,
            **kwargs,
        )

    # ------------------------------------------------------------------ scoring

    def compute_lexical_matching_score(self, lexical_weights_1, lexical_weights_2):
        return lexical_matching_scores(lexical_weights_1, lexical_weights_2)

    def colbert_score(self, q_reps: np.ndarray, p_reps: np.ndarray) -> np.float32:
        return colbert_score(q_reps, p_reps)

    def compute_score(
        self,
        sentence_pairs: Sequence[tuple[str, str]] | tuple[str, str],
        batch_size: int | None = None,
        max_query_length: int | None = None,
        max_passage_length: int | None = None,
        weights_for_different_modes: list[float] | None = None,
        **_flag_embedding_kwargs: Any,
    ) -> dict[str, list[float]] | dict[str, float] | list:
        """Dense, sparse, ColBERT and combined scores per (query, passage) pair, as FlagEmbedding."""
        if isinstance(sentence_pairs, list) and len(sentence_pairs) == 0:
            return []
        if sentence_pairs is None or isinstance(sentence_pairs, (str, bytes)):
            raise InputError("sentence_pairs must be a (query, passage) pair or a list of pairs")
        pairs = list(sentence_pairs)
        single = len(pairs) == 2 and all(isinstance(x, str) for x in pairs)
        if single:
            pairs = [tuple(pairs)]
        for index, pair in enumerate(pairs):
            if isinstance(pair, (str, bytes)) or len(pair) != 2:
                raise InputError(f"sentence_pairs[{index}] is not a (query, passage) pair")
        batch_size = _check_positive_int("batch_size", self.batch_size if batch_size is None else batch_size)
        q_len = self.query_max_length if max_query_length is None else max_query_length
        p_len = self.passage_max_length if max_passage_length is None else max_passage_length
        everything = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)
        queries = self.encode([p[0] for p in pairs], batch_size=batch_size, max_length=q_len, **everything)
        passages = self.encode([p[1] for p in pairs], batch_size=batch_size, max_length=p_len, **everything)

        scores = pair_scores(queries, passages, batch_size, weights_for_different_modes)
        if single:
            return {k: float(v[0]) for k, v in scores.items()}
        return {k: v.astype(np.float32).tolist() for k, v in scores.items()}

    def explain(
        self,
        query: str,
        passage: str,
        *,
        max_query_length: int | None = None,
        max_passage_length: int | None = None,
        weights_for_different_modes: list[float] | None = None,
    ) -> Explanation:
        """Why `passage` matched `query`: shared lexical tokens with their weights and products, each
        query token's best ColBERT match with character spans, and `compute_score`'s scores."""
        return explain(
            self,
            query,
            passage,
            max_query_length=max_query_length,
            max_passage_length=max_passage_length,
            weights_for_different_modes=weights_for_different_modes,
        )

    # ------------------------------------------------------------------ tokens

    def convert_id_to_token(self, lexical_weights):
        """Replace token-id keys by their decoded strings (colliding strings overwrite, as upstream)."""
        items = [lexical_weights] if isinstance(lexical_weights, dict) else lexical_weights
        converted = [{self.tokenizer.decode_id(int(k)): w for k, w in item.items()} for item in items]
        return converted[0] if len(converted) == 1 else converted


class BGEM3FlagModel(M3Model):
    """Drop-in for `FlagEmbedding.BGEM3FlagModel(path, ...)` on an m3rt artifact.

    Keeps FlagEmbedding 1.4's defaults (512-token queries and passages); device and precision
    arguments of the original are accepted and ignored (the artifact decides precision).
    """

    def __init__(
        self,
        model_name_or_path: str | Path,
        *,
        batch_size: int = 256,
        query_max_length: int = 512,
        passage_max_length: int = 512,
        return_dense: bool = True,
        return_sparse: bool = False,
        return_colbert_vecs: bool = False,
        backend: str = "onnxruntime",
        precision: str = "fp32",
        **_ignored: Any,
    ) -> None:
        loaded = M3Model.load(model_name_or_path, backend=backend, precision=precision)
        super().__init__(
            loaded.manifest,
            loaded.backend,
            loaded.tokenizer,
            batch_size=batch_size,
            query_max_length=query_max_length,
            passage_max_length=passage_max_length,
            return_dense=return_dense,
            return_sparse=return_sparse,
            return_colbert_vecs=return_colbert_vecs,
            placement=loaded.placement,
        )
