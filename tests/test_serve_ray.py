"""`m3rt serve` on Ray Serve, on loopback only: a server subprocess under 32 concurrent clients, the
OpenAI client against it, SIGINT shutdown, and a two-node local Ray cluster answering from both nodes."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest

pytest.importorskip("ray.serve")
psutil = pytest.importorskip("psutil")
requests = pytest.importorskip("requests")

from m3rt.serve.loopback import listening_off_loopback  # noqa: E402
from m3rt.serve.process import free_port, serving, wait_ready  # noqa: E402

from ray_cluster import assert_loopback_only, start_loopback_cluster  # noqa: E402

ALL = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)


def _decode(data: str, shape=None) -> np.ndarray:
    values = np.frombuffer(base64.b64decode(data), dtype="<f4")
    return values if shape is None else values.reshape(shape)


def _check_item(item: dict, reference: dict, index: int) -> None:
    np.testing.assert_allclose(_decode(item["dense"]), reference["dense_vecs"][index], atol=1e-5)
    want = reference["lexical_weights"][index]
    got = dict(zip(map(str, item["sparse"]["indices"]), item["sparse"]["values"]))
    assert set(got) == set(want)
    np.testing.assert_allclose([got[k] for k in want], [float(v) for v in want.values()], atol=1e-5)
    colbert = item["colbert"]
    np.testing.assert_allclose(_decode(colbert["data"], colbert["shape"]), reference["colbert_vecs"][index], atol=1e-5)


BAD_REQUESTS = [
    (b'{"input": [', 400),
    (json.dumps({"input": ["fine", 7]}).encode(), 422),
    (json.dumps({"input": "a", "model": "not-this-one"}).encode(), 404),
    (json.dumps({"input": ["ok", "word " * 50], "truncate": False, "max_length": 16}).encode(), 400),
    (json.dumps({"input": []}).encode(), 400),
]


@contextmanager
def _serving(artifact, log, *options: str):
    """`serving` with the server's log printed when the test fails."""
    try:
        with serving(artifact, log, options) as (proc, url):
            yield proc, url
    except BaseException:
        print(log.read_text()[-5000:])
        raise


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    """(process, URL, log) of a server with the default limits."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with _serving(tiny[1], log, "--batch-wait-ms", "20") as (proc, url):
        yield proc, url, log


def test_server_under_concurrency(server, tiny_model, texts):
    """300 requests from 32 threads, every 8th a bad one: each good answer equals in-process encode of
    its texts, in order; each bad one gets its error; some batches held several requests."""
    _, url, _ = server
    pool = [t for t in texts if t.strip()][:40]
    reference = tiny_model.encode(pool, **ALL)
    rng = np.random.default_rng(0)
    plan = []
    for i in range(300):
        if i % 8 == 7:
            plan.append(("bad", BAD_REQUESTS[(i // 8) % len(BAD_REQUESTS)]))
        else:
            plan.append(("good", rng.choice(len(pool), size=1 + i % 4, replace=True).tolist()))

    session_per_thread = {}

    def call(entry):
        kind, what = entry
        session = session_per_thread.setdefault(threading.get_ident(), requests.Session())
        if kind == "bad":
            body, _ = what
        else:
            body = json.dumps(
                {"input": [pool[i] for i in what], "return_colbert": True, "encoding_format": "base64"}
            ).encode()
        response = session.post(f"{url}/v1/encode", data=body, headers={"content-type": "application/json"}, timeout=60)
        return response.status_code, response.json(), response.headers

    with ThreadPoolExecutor(32) as threads:
        answers = list(threads.map(call, plan))

    for (kind, what), (status, body, headers) in zip(plan, answers):
        if kind == "bad":
            assert status == what[1], body
            assert body["error"]["message"]
            continue
        assert status == 200, body
        assert headers["x-m3rt-node"] and headers["x-m3rt-replica"]
        assert [item["index"] for item in body["data"]] == list(range(len(what)))
        for item, index in zip(body["data"], what):
            _check_item(item, reference, index)

    metrics = requests.get(f"{url}/metrics", timeout=10).text
    batches = _metric(metrics, "m3rt_batch_requests_count")
    single = _metric(metrics, 'm3rt_batch_requests_bucket{le="1.0"}')
    assert batches > single, f"no batch held more than one request ({batches} batches)"
    good = sum(kind == "good" for kind, _ in plan)
    assert _metric(metrics, 'm3rt_requests_total{route="/v1/encode",status="200"}') == good


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_openai_client(server, tiny_model):
    """The official OpenAI client (which asks for base64 by default) against /v1/embeddings."""
    openai = pytest.importorskip("openai")
    _, url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    inputs = ["hello world", "the client decodes base64 itself"]
    result = client.embeddings.create(model="bge-m3", input=inputs, extra_body={"return_sparse": True})
    want = tiny_model.encode(inputs, return_dense=True, return_sparse=True)
    np.testing.assert_allclose([d.embedding for d in result.data], want["dense_vecs"], atol=1e-5)
    sparse = result.data[1].model_extra["sparse"]
    assert {str(i) for i in sparse["indices"]} == set(want["lexical_weights"][1])
    assert result.usage.prompt_tokens > 0
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="x")


def test_back_pressure_answers_503(tiny, tiny_model, tmp_path):
    """More simultaneous requests than the replica takes (--max-ongoing) plus what it queues
    (--max-queued): the excess gets OpenAI's error JSON with 503 and Retry-After (the app's answer,
    never Serve's plain-text one), the rest their right answers."""
    texts = [f"request text {i} " + "many words in a long text " * 20 for i in range(16)]
    reference = tiny_model.encode(texts, return_dense=True)["dense_vecs"]
    clients = 24
    gate = threading.Barrier(clients)
    with _serving(tiny[1], tmp_path / "server.log", "--max-ongoing", "2", "--max-queued", "2") as (_, url):

        def call(_):
            gate.wait()
            response = requests.post(f"{url}/v1/encode", json={"input": texts, "return_sparse": False}, timeout=120)
            if response.status_code == 200:
                got = np.array([item["dense"] for item in response.json()["data"]])
                np.testing.assert_allclose(got, reference, atol=1e-5)
            else:
                assert response.headers["retry-after"] == "1", response.text
                assert response.json()["error"]["code"] == "overloaded", response.text
            return response.status_code

        with ThreadPoolExecutor(clients) as threads:
            statuses = list(threads.map(call, range(clients)))
    assert set(statuses) == {200, 503}, statuses


def test_loopback_only_and_clean_sigint_shutdown(tiny, tmp_path):
    """Every socket the server's processes listen on or talk to is on 127.0.0.1; SIGINT stops all of them.
    A server of its own: stopping the module's would break whichever test used it next."""
    log = tmp_path / "server.log"
    with _serving(tiny[1], log) as (proc, url):
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        assert any("raylet" in " ".join(p.cmdline()) for p in tree), "Ray's processes are not children of the server"
        requests.post(f"{url}/v1/embeddings", json={"input": "traffic while we look"}, timeout=30)
        assert_loopback_only(tree)
        assert listening_off_loopback(proc.pid) == []  # the server's own check agrees

        proc.send_signal(signal.SIGINT)
        assert proc.wait(90) == 0, log.read_text()[-3000:]
        gone, alive = psutil.wait_procs(tree[1:], timeout=30)
        assert alive == [], f"left running after shutdown: {[p.pid for p in alive]}"
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{url}/health", timeout=2)


def test_two_node_cluster_answers_from_both_nodes(tiny, tiny_model, monkeypatch, tmp_path):
    """`m3rt serve --address` on a running two-node local cluster (every node on 127.0.0.1), two
    replicas behind one HTTP proxy: answers come from both nodes and equal in-process encode; on
    SIGINT the command removes its application and leaves the cluster running."""
    import ray
    from ray import serve
    from ray._private import ray_constants

    # The one proxy would send everything to the replica on its own node while that one has room;
    # the cluster's processes inherit this environment.
    monkeypatch.setenv("RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING", "0")
    port = free_port()
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    cluster = start_loopback_cluster(monkeypatch)
    server = None
    log = tmp_path / "server.log"
    try:
        command = [
            sys.executable, "-m", "m3rt.cli", "serve", str(tiny[1]), "--address", cluster.address,
            "--node-ip-address", "127.0.0.1", "--port", str(port), "--replicas", "2", "--num-cpus", "1",
        ]  # fmt: skip
        # Not inherited: the command itself must keep its driver on loopback.
        env = {k: v for k, v in os.environ.items() if k != ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR}
        with open(log, "w") as out:
            server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, 180, alive=lambda: server.poll() is None)

        nodes = [n for n in ray.nodes() if n["Alive"]]
        assert len(nodes) == 2
        assert {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}
        node_ids = {n["NodeID"] for n in nodes}

        texts = [f"text number {i} " + "word " * (i % 7) for i in range(64)]
        reference = tiny_model.encode(texts, **ALL)

        def call(i):
            body = {"input": [texts[i]], "return_colbert": True, "encoding_format": "base64"}
            response = requests.post(f"{url}/v1/encode", json=body, timeout=60)
            assert response.status_code == 200, response.text
            _check_item(response.json()["data"][0], reference, i)
            return response.headers["x-m3rt-node"]

        seen: set[str] = set()
        with ThreadPoolExecutor(8) as threads:
            for _ in range(5):  # the router picks replicas at random among the least loaded
                seen |= set(threads.map(call, range(len(texts))))
                if seen == node_ids:
                    break
        assert seen == node_ids

        cards = {requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]["m3rt"]["node_id"] for _ in range(20)}
        assert cards <= node_ids
        processes = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        assert_loopback_only([psutil.Process(), *processes])

        server.send_signal(signal.SIGINT)
        assert server.wait(90) == 0, log.read_text()[-3000:]
        assert "m3rt" not in serve.status().applications
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    except BaseException:
        print(log.read_text()[-5000:] if log.exists() else "")
        raise
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
    leftover = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    _, alive = psutil.wait_procs(leftover, timeout=30)
    assert alive == []


def test_application_builder_takes_serve_config_args():
    """`serve run m3rt.serve.deployment:build_app key=value` passes strings; they become typed options."""
    from m3rt.serve.deployment import build_app

    deployment = build_app(
        {"artifact": "/a", "min_replicas": "1", "max_replicas": "3", "num_cpus": "2"}
    )._bound_deployment
    autoscaling = deployment._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (1, 3)
    assert deployment.ray_actor_options["num_cpus"] == 2
    assert build_app({"artifact": "/a", "num_replicas": "2"})._bound_deployment.num_replicas == 2
    # Overload is the app's to answer: replicas take more than it admits, Serve's own queue is far beyond.
    options = build_app({"artifact": "/a", "max_ongoing_requests": 2, "max_queued_requests": 2})._bound_deployment
    assert options.max_ongoing_requests > 4 and options.max_queued_requests > 1000
    with pytest.raises(ValueError, match="both min_replicas and max_replicas"):
        build_app({"artifact": "/a", "min_replicas": 1})
    with pytest.raises(ValueError, match="unknown_option"):
        build_app({"artifact": "/a", "unknown_option": 1})


def test_cli_refuses_bad_options_before_starting_ray(tiny, tmp_path, capsys):
    from m3rt.cli import main

    assert main(["serve", str(tiny[1]), "--min-replicas", "2"]) == 1
    assert "min_replicas and max_replicas" in capsys.readouterr().err
    assert main(["serve", str(tmp_path)]) == 1
    assert "not an m3rt artifact" in capsys.readouterr().err


def test_sigterm_drains_the_requests_in_progress(tiny, tiny_model, tmp_path):
    """4 requests within the limits, SIGTERM while they run: all 4 get 200 with the right answers, a
    request after the signal is refused with JSON 503 (or finds the server gone), and the server
    exits 0 after it has drained."""
    texts = [f"text {i} " + "long words of a passage to encode " * 60 for i in range(48)]
    reference = tiny_model.encode(texts, return_dense=True)["dense_vecs"]
    log = tmp_path / "server.log"
    with _serving(tiny[1], log, "--drain-timeout", "120") as (proc, url):

        def call(_):
            return requests.post(f"{url}/v1/encode", json={"input": texts, "return_sparse": False}, timeout=180)

        with ThreadPoolExecutor(4) as threads:
            answers = threads.map(call, range(4))
            time.sleep(1.0)  # all 4 are at the replica: 4 x 48 texts of ~900 tokens take several seconds
            proc.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            try:
                late = requests.post(f"{url}/v1/encode", json={"input": "too late"}, timeout=60)
            except requests.ConnectionError:
                late = None
            answers = list(answers)
        assert proc.wait(180) == 0, log.read_text()[-3000:]
    for response in answers:
        assert response.status_code == 200, response.text
        np.testing.assert_allclose([d["dense"] for d in response.json()["data"]], reference, atol=1e-5)
    if late is not None:
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        assert late.headers["retry-after"] == "1"
    assert "m3rt serve: drained" in log.read_text()


def _replicas(proc) -> list:
    found = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "ServeReplica:m3rt" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def test_sigkill_of_one_replica_of_two_under_load(tiny, tiny_model, tmp_path):
    """4 clients in a loop, one of two replicas killed: no request hangs, every failure is a 5xx, Serve
    starts a new replica and the server answers 200 again. Prints the outcome counts (RESULTS.md)."""
    texts = [f"text {i} with some words to encode" for i in range(8)]
    reference = tiny_model.encode(texts, return_dense=True)["dense_vecs"]
    with _serving(tiny[1], tmp_path / "server.log", "--replicas", "2", "--num-cpus", "0.5") as (proc, url):
        deadline = time.monotonic() + 60
        while len(_replicas(proc)) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        before = _replicas(proc)
        assert len(before) == 2
        stop, outcomes = threading.Event(), []

        def client(_):
            session = requests.Session()
            while not stop.is_set():
                try:
                    response = session.post(f"{url}/v1/embeddings", json={"input": texts}, timeout=60)
                except requests.Timeout:
                    outcomes.append(("hung", None))
                    continue
                except requests.ConnectionError:
                    outcomes.append(("connection closed", None))
                    continue
                if response.status_code == 200:
                    got = [item["embedding"] for item in response.json()["data"]]
                    np.testing.assert_allclose(got, reference, atol=1e-5)
                    outcomes.append((200, True))
                else:
                    is_json = response.headers.get("content-type", "").startswith("application/json")
                    outcomes.append((response.status_code, is_json))

        with ThreadPoolExecutor(4) as threads:
            running = threads.map(client, range(4))
            time.sleep(3)
            before[0].send_signal(signal.SIGKILL)
            time.sleep(8)
            stop.set()
            list(running)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            now = _replicas(proc)
            if len(now) == 2 and before[0].pid not in {p.pid for p in now}:
                break
            time.sleep(1)
        else:
            raise AssertionError("the killed replica did not come back within 120 s")
        after = [requests.post(f"{url}/v1/embeddings", json={"input": texts}, timeout=60).status_code for _ in range(8)]
    counts: dict = {}
    for outcome in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    print(f"replica SIGKILL under load: {counts}")
    assert ("hung", None) not in counts
    assert all(status == 200 or (isinstance(status, int) and status >= 500) for status, _ in counts), counts
    assert after == [200] * 8
