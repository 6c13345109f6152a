"""`m3rt embed`: shards against in-process encode and the tokenizer itself, every input row exactly once
(bad rows in the errors file with their reason) including after `kill -9`, `--verify`, and the same job
on a two-node local Ray cluster (loopback only) embedding on both nodes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from m3rt.cli import main  # noqa: E402
from m3rt.embed.store import OutputFolder  # noqa: E402

ALL = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)


def _shards(output: Path) -> pa.Table:
    """Every shard, read as a dataset (the folder's bookkeeping files start with `_` and are skipped)."""
    return pq.read_table(output)


def _errors(output: Path) -> list[dict]:
    path = output / "_errors.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _write_jsonl(path: Path, records) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def _check_against_encode(table: pa.Table, texts: list[str], model) -> None:
    """Dense and ColBERT cosine 1 to 1e-6, sparse token ids equal and weights to float32 precision."""
    reference = model.encode(texts, **ALL)
    dense = np.asarray(table.column("dense").to_pylist(), np.float32)
    assert (_cosines(dense, reference["dense_vecs"]) >= 1 - 1e-6).all()
    np.testing.assert_allclose(dense, reference["dense_vecs"], atol=1e-6)
    for entry, want in zip(table.column("sparse").to_pylist(), reference["lexical_weights"]):
        assert entry["indices"] == [int(k) for k in want]
        np.testing.assert_allclose(entry["values"], [float(v) for v in want.values()], rtol=1e-6, atol=0)
    if "colbert" in table.column_names:
        for written, want in zip(table.column("colbert").to_pylist(), reference["colbert_vecs"]):
            written = np.asarray(written, np.float32)
            assert written.shape == want.shape
            assert (_cosines(written, want) >= 1 - 1e-6).all()


def test_shards_equal_in_process_encode(tiny, tiny_model, texts, tmp_path, capsys):
    """Every text of the sample set, ids from a field, all three outputs: the shards hold exactly the
    embeddable rows in input order, equal to encode; `tokens` is what the tokenizer file itself gives;
    the blank texts are in the errors file; exit status 3 says so."""
    from tokenizers import Tokenizer

    corpus = _write_jsonl(tmp_path / "corpus.jsonl", ({"doc": f"d{i}", "text": t} for i, t in enumerate(texts)))
    out = tmp_path / "out"
    code = main([
        "embed", str(tiny[1]), str(corpus), str(out), "--id-field", "doc",
        "--outputs", "dense", "sparse", "colbert", "--shard-rows", "7", "--no-progress",
    ])  # fmt: skip
    assert code == 3
    table = _shards(out)
    good = [i for i, t in enumerate(texts) if t.strip()]
    assert table.column("id").to_pylist() == [f"d{i}" for i in good]
    assert table.schema.field("dense").type == pa.list_(pa.float32(), 64)
    assert table.schema.field("sparse").type == pa.struct(
        [("indices", pa.list_(pa.int32())), ("values", pa.list_(pa.float32()))]
    )
    assert table.schema.field("colbert").type == pa.list_(pa.list_(pa.float16(), 64))
    _check_against_encode(table, [texts[i] for i in good], tiny_model)

    tokenizer = Tokenizer.from_file(str(tiny[1] / "tokenizer.json"))
    tokenizer.no_truncation()
    want_tokens = [min(len(tokenizer.encode(texts[i]).ids), tiny_model.max_length) for i in good]
    assert table.column("tokens").to_pylist() == want_tokens

    errors = _errors(out)
    assert [e["id"] for e in errors] == [f"d{i}" for i, t in enumerate(texts) if not t.strip()]
    assert {e["reason"] for e in errors} == {"empty text"}
    err = capsys.readouterr().err
    assert f"{len(good)} rows" in err and "tokens/s" in err and f"{len(errors)} rows to the errors file" in err


def test_formats_folders_globs_and_bad_rows(tiny, tiny_model, tmp_path):
    """Text, JSON lines and Parquet from a folder and a glob; ids are line numbers prefixed by the file;
    each bad row lands in the errors file with its reason; nothing is lost or doubled."""
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    long_text = "many words in a long text " * 20
    (inputs / "a.txt").write_bytes(b"first line\n\n\xff\xfe not utf-8\n" + long_text.encode() + b"\nlast line")
    (inputs / "sub" / "b.jsonl").write_text(
        '\ufeff{"text": "fine text"}\n{"text": 5}\n{"text": "\\ud800 lone"}\n[1, 2]\n{"other": "x"}\nnot json\n'
    )
    parquet_dir = tmp_path / "pq"
    parquet_dir.mkdir()
    pq.write_table(
        pa.table({"text": pa.array([b"parquet row", b"\xc3\x28 bad", None], pa.binary())}),
        parquet_dir / "c.parquet",
        row_group_size=2,
    )
    out = tmp_path / "out"
    code = main([
        "embed", str(tiny[1]), str(inputs), str(parquet_dir / "*.parquet"), str(out),
        "--max-length", "16", "--no-truncate", "--shard-rows", "2", "--no-progress",
    ])  # fmt: skip
    assert code == 3
    table = _shards(out)
    assert table.column("id").to_pylist() == ["in/a.txt:1", "in/a.txt:5", "in/sub/b.jsonl:1", "pq/c.parquet:1"]
    _check_against_encode(table, ["first line", "last line", "fine text", "parquet row"], tiny_model)
    reasons = {e["id"]: e["reason"] for e in _errors(out)}
    assert reasons == {
        "in/a.txt:2": "empty text",
        "in/a.txt:3": "invalid UTF-8 at byte 0",
        "in/a.txt:4": "longer than max_length=16 tokens (--no-truncate)",
        "in/sub/b.jsonl:2": "field 'text' is int, not a string",
        "in/sub/b.jsonl:3": "invalid Unicode: surrogates not allowed at character 0",
        "in/sub/b.jsonl:4": "a JSON list, not an object",
        "in/sub/b.jsonl:5": "no text: field 'text' missing or null",
        "in/sub/b.jsonl:6": "not valid JSON: Expecting value at column 1",
        "pq/c.parquet:2": "invalid UTF-8 at byte 0",
        "pq/c.parquet:3": "no text: field 'text' missing or null",
    }


def test_kill_9_then_rerun_every_row_exactly_once(tiny, tiny_model, tmp_path):
    """`kill -9` part-way (plus a torn commit line, an uncommitted shard and a temporary file as a crash
    leaves them); rerunning the same command skips the committed shards and ends with every row once."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(3, 40)))) for _ in range(6000)]
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", ({"id": i, "text": t} for i, t in enumerate(texts)))
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "m3rt.cli", "embed", str(tiny[1]), str(corpus), str(out),
        "--id-field", "id", "--shard-rows", "50", "--no-progress",
    ]  # fmt: skip
    log = tmp_path / "run.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    commits = out / "_commits.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if commits.exists() and commits.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = commits.read_bytes().count(b"\n")
    assert 3 <= done_before < len(texts) // 50, log.read_text()[-2000:]

    # What a crash can leave beside that: a half-written commit line, a renamed but uncommitted shard,
    # a temporary file.
    with open(commits, "ab") as f:
        f.write(b'{"unit":119,"ro')
    (out / "part-000119.parquet").write_bytes((out / "part-000000.parquet").read_bytes())
    (out / "_tmp" / "part-000118.parquet.x.tmp").write_bytes(b"partial")

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{done_before} already committed" in rerun.stderr
    table = _shards(out)
    ids = Counter(table.column("id").to_pylist())
    assert ids == Counter(str(i) for i in range(len(texts)))
    assert list((out / "_tmp").iterdir()) == []
    assert len(commits.read_text().splitlines()) == len(texts) // 50
    sample = rng.choice(len(texts), size=40, replace=False)
    by_id = {row_id: i for i, row_id in enumerate(table.column("id").to_pylist())}
    _check_against_encode(table.take([by_id[str(i)] for i in sample]), [texts[i] for i in sample], tiny_model)


def test_verify_and_refusals(tiny, tmp_path, capsys):
    """`--verify N` passes on a good output and fails (exit 4) on a shard whose dense vectors were negated;
    another job in the same folder, and a second run while one holds it, are refused."""
    texts = [f"passage number {i} " + "text " * (i % 9) for i in range(60)]
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", ({"text": t} for t in texts))
    out = tmp_path / "out"
    base = ["embed", str(tiny[1]), str(corpus), str(out), "--shard-rows", "20", "--no-progress"]
    assert main([*base, "--verify", "25"]) == 0
    assert "25 rows re-encoded: all match" in capsys.readouterr().err

    shard = out / "part-000001.parquet"
    table = pq.read_table(shard)
    negated = -np.asarray(table.column("dense").to_pylist(), np.float32)
    dense = pa.FixedSizeListArray.from_arrays(pa.array(negated.ravel()), negated.shape[1])
    pq.write_table(table.set_column(table.schema.get_field_index("dense"), "dense", dense), shard)
    assert main([*base, "--verify", "60"]) == 4
    assert "20 MISMATCHES" in capsys.readouterr().err

    assert main([*base, "--outputs", "dense"]) == 1
    assert "different job (differs in: outputs)" in capsys.readouterr().err
    with OutputFolder(out).locked():
        assert main(base) == 1
    assert "another m3rt embed is writing" in capsys.readouterr().err
    assert main(["embed", str(tmp_path), str(corpus), str(tmp_path / "o2")]) == 1
    assert "not an m3rt artifact" in capsys.readouterr().err
    assert main([*base[:4], str(tmp_path / "o3"), "--shard-rows", "0"]) == 1
    assert "--shard-rows must be >= 1" in capsys.readouterr().err
    (tmp_path / "o4").mkdir()
    (tmp_path / "o4" / "precious.txt").write_text("x")
    assert main([*base[:4], str(tmp_path / "o4")]) == 1
    assert "not empty" in capsys.readouterr().err
    assert main([*base[:3], str(tmp_path / "missing.jsonl"), str(tmp_path / "o5")]) == 1
    assert "no such file or folder" in capsys.readouterr().err
    assert main([*base[:4], str(tmp_path / "o6"), "--actors", "2"]) == 1
    assert "add --address" in capsys.readouterr().err


def test_two_node_ray_cluster_embeds_on_both_nodes(tiny, tiny_model, monkeypatch, tmp_path):
    """`m3rt embed --address` on a running two-node local cluster (every node on 127.0.0.1, one CPU
    each, one model actor per node): shards committed from both nodes, equal to encode; every socket
    of the cluster's processes on loopback."""
    pytest.importorskip("ray.data")
    psutil = pytest.importorskip("psutil")
    import ray
    from ray._private import ray_constants

    from ray_cluster import assert_loopback_only, loopback_cluster

    texts = [f"text number {i} " + "word " * (i % 11) for i in range(240)]
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", ({"text": t} for t in texts))
    out = tmp_path / "out"
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with loopback_cluster(monkeypatch) as cluster:
        node_ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(node_ids) == 2
        command = [
            sys.executable, "-m", "m3rt.cli", "embed", str(tiny[1]), str(corpus), str(out),
            "--address", cluster.address, "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
            "--shard-rows", "10", "--outputs", "dense", "sparse", "colbert", "--no-progress",
        ]  # fmt: skip
        # Not inherited: the command itself must keep its driver on loopback.
        env = {k: v for k, v in os.environ.items() if k != ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR}
        run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode == 0, run.stderr[-4000:]
        processes = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        assert_loopback_only([psutil.Process(), *processes])
    commits = [json.loads(line) for line in (out / "_commits.jsonl").read_text().splitlines()]
    assert {c["node"] for c in commits} == node_ids
    assert sorted(c["unit"] for c in commits) == list(range(24))
    table = _shards(out)
    assert table.column("id").to_pylist() == [str(i + 1) for i in range(len(texts))]
    _check_against_encode(table, texts, tiny_model)
