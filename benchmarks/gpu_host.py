"""The GPU host's whole job, one command: install the staged onnxruntime-gpu, unpack the tokenizer, run the
GPU check, pack its results into a few files under --out.

    python3 benchmarks/gpu_host.py --out $OUT

What the host has and lacks: ../shared/gpu/README.md. `split-onnxruntime-gpu.sh` (there) stages the
onnxruntime-gpu wheel as .ortgpu/p0..p5 (`split -n 6 -d -a 1`), `wheel.sha256` and `tokenizer.json.xz`,
at most 64 MiB per transfer: p0..p4 are copied to /tmp/st one call each (carry .ortgpu/pK; command
`mkdir -p /tmp/st && cp .ortgpu/pK /tmp/st/`), and the last call carries p5, wheel.sha256 and
tokenizer.json.xz and runs this job with `--collect .ortgpu`, which copies them to --staged first:

    python3 benchmarks/gpu_host.py --collect .ortgpu --out $OUT

Then, in order:

  1. assemble   cat p0..p5 -> /tmp/<wheel>; its sha256 must equal wheel.sha256 (a part cut short or
                copied twice fails here, naming each part's size, not later as a broken import)
  2. install    pip install --no-index --no-deps --no-compile --target --site; then a fresh Python with
                --site on PYTHONPATH must import the module from there (not the host's CPU onnxruntime)
  3. tokenizer  tokenizer.json.xz -> tokenizer.json (Python's lzma), checked to be a tokenizer's JSON
  4. check      benchmarks/gpu_check.py with PYTHONPATH=--site and --budget-s = what is left of
                --deadline-s after the steps above and the packing; killed past its budget plus a grace
  5. pack       --out gets gpu_check.md (the short table), gpu_check.json (every step's figures),
                host.log (this job's own log, the check's output included) and gpu_results.tar.gz
                (everything the check wrote: test log, JUnit report, per-test figures, failures)

The whole job keeps to --deadline-s (480 s: the host's "one run of at most ~8 minutes in all"), the
install (~20-40 s) included: the check gets what is left minus the packing's reserve.
Packing runs whatever happened before it, so a failed install or a killed check still returns its log.
A second run on the same host skips steps 1-2 when --site already holds the same wheel. Stdlib only:
nothing of the project's dependencies is needed before the check starts. The exit status is the
check's, or 2 when staging failed. `--dry-run` is passed to the check (tiny model, CPU, no GPU
tests): tests/test_gpu_check.py runs this whole path here on fake parts of a small wheel.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEEL = "onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl"
PARTS = 6
INSTALL_MARK = ".m3rt-installed-sha256"
MIN_CHECK_S = 60.0  # less than this left for the check: not worth starting it


class StagingError(RuntimeError):
    """What was staged cannot be installed as it is."""


class Job:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.start = time.monotonic()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results = Path(args.work) / "results"
        self._log = (self.out / "host.log").open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def log(self, message: str) -> None:
        line = f"[{self.elapsed():6.1f} s] {message}"
        with self._lock:
            print(line, flush=True)
            self._log.write(line + "\n")
            self._log.flush()

    def close(self) -> None:
        self._log.close()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def collect(source: Path, staged: Path, parts: int) -> list[str]:
    """Copy what the last transfer carried (some parts, wheel.sha256, tokenizer.json.xz) into `staged`."""
    if not source.is_dir():
        raise StagingError(f"--collect {source} is not a folder")
    names = [f"p{k}" for k in range(parts)] + ["wheel.sha256", "tokenizer.json.xz"]
    found = [name for name in names if (source / name).is_file()]
    staged.mkdir(parents=True, exist_ok=True)
    for name in found:
        shutil.copyfile(source / name, staged / name)
    return found


def assemble(staged: Path, wheel: Path, parts: int) -> str:
    """Concatenate staged p0..p{parts-1} into `wheel`; returns its sha256, which must match wheel.sha256."""
    names = [staged / f"p{k}" for k in range(parts)]
    missing = [p.name for p in names if not p.is_file()]
    if missing:
        raise StagingError(f"staged parts missing from {staged}: {', '.join(missing)} (expected p0..p{parts - 1})")
    extra = sorted(p.name for p in staged.glob("p[0-9]*") if p not in names)
    if extra:
        raise StagingError(f"{staged} holds parts beyond p{parts - 1}: {', '.join(extra)} (--parts {parts})")
    sums = staged / "wheel.sha256"
    if not sums.is_file():
        raise StagingError(f"{sums} is missing (it is staged with the last part)")
    want = sums.read_text().split()[0].lower() if sums.read_text().split() else ""
    wheel.parent.mkdir(parents=True, exist_ok=True)
    with wheel.open("wb") as sink:
        for part in names:
            with part.open("rb") as source:
                shutil.copyfileobj(source, sink, 1 << 20)
    got = sha256(wheel)
    if got != want:
        sizes = ", ".join(f"{p.name} {p.stat().st_size:,} B" for p in names)
        raise StagingError(f"assembled {wheel.name} has sha256 {got}, wheel.sha256 says {want} (parts: {sizes})")
    return got


def install(wheel: Path, site: Path, module: str, digest: str, job: Job) -> str:
    """pip install --target `site`; returns where a fresh Python imports `module` from (under `site`)."""
    mark = site / INSTALL_MARK
    if mark.is_file() and mark.read_text().strip() == digest:
        job.log(f"install: {site} already holds this wheel")
    else:
        shutil.rmtree(site, ignore_errors=True)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        proc = subprocess.run([*cmd, "--target", str(site), str(wheel)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise StagingError(f"pip install of {wheel.name} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        mark.write_text(digest + "\n")
    probe = f"import {module}, sys; print(getattr({module}, '__version__', '?'), {module}.__file__)"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=_env(site))
    if proc.returncode != 0:
        raise StagingError(f"import {module} from {site} failed: {proc.stderr[-2000:]}")
    version, _, location = proc.stdout.strip().partition(" ")
    if not Path(location).resolve().is_relative_to(site.resolve()):
        raise StagingError(f"import {module} found {location}, not the copy installed in {site}")
    return f"{module} {version} from {location}"


def unpack_tokenizer(archive: Path, target: Path) -> Path:
    if not archive.is_file():
        raise StagingError(f"{archive} is missing (it is staged with the last part)")
    try:
        data = lzma.decompress(archive.read_bytes())
        parsed = json.loads(data)
    except (lzma.LZMAError, ValueError) as exc:
        raise StagingError(f"{archive} is not an xz-compressed tokenizer.json: {exc}") from exc
    if not isinstance(parsed, dict) or "model" not in parsed:
        raise StagingError(f"{archive} holds JSON that is not a tokenizers tokenizer.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target


def _env(site: Path) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def run_check(job: Job, site: Path, tokenizer: Path | None) -> int:
    """gpu_check.py under what is left of the deadline; its output goes to the log as it comes."""
    args = job.args
    budget = args.deadline_s - job.elapsed() - args.pack_reserve_s
    if budget < MIN_CHECK_S:
        raise StagingError(f"only {budget:.0f} s left for the check")
    shutil.rmtree(job.results, ignore_errors=True)  # this run's results only
    job.results.mkdir(parents=True)
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(job.results)]
    cmd += ["--work", str(Path(args.work) / "check"), "--budget-s", f"{budget:.0f}"]
    cmd += ["--tokenizer", str(tokenizer)] if tokenizer else []
    cmd += ["--dry-run"] if args.dry_run else []
    cmd += args.check_args
    env = _env(site)
    job.log(f"check: {' '.join(cmd)}")
    # Its own process group: past the deadline the check goes with its pytest run and everything else it started.
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )

    def relay() -> None:  # the check's output into the log as it comes
        assert proc.stdout is not None
        for line in proc.stdout:
            job.log(f"  | {line.rstrip()}")

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=budget + args.grace_s)
    except subprocess.TimeoutExpired:
        job.log(f"check: past its budget of {budget:.0f} s plus {args.grace_s:.0f} s: killed")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code = 124
    reader.join(timeout=5)
    return code


def pack(job: Job) -> list[str]:
    """A few files in --out: the table, the figures, this log, and one archive of all the check wrote.
    A check killed before its end left no table: it is written from the figures it had saved."""
    figures, table = job.results / "gpu_check.json", job.results / "gpu_check.md"
    if figures.is_file() and not table.is_file():
        cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--report-only", "--out", str(job.results)]
        cmd += ["--work", str(Path(job.args.work) / "check")]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60, env=_env(job.args.site))
        job.log(f"pack: the table from the saved figures ({proc.returncode}): {proc.stderr[-500:]}")
    written = []
    for name in ("gpu_check.md", "gpu_check.json"):
        if (job.results / name).is_file():
            shutil.copy2(job.results / name, job.out / name)
            written.append(name)
    if job.results.is_dir() and any(job.results.iterdir()):
        with tarfile.open(job.out / "gpu_results.tar.gz", "w:gz") as archive:
            archive.add(job.results, arcname="gpu_results")
        written.append("gpu_results.tar.gz")
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu_host", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="the few result files ($OUT)")
    parser.add_argument("--staged", type=Path, default=Path("/tmp/st"), help="p0..p5, wheel.sha256, tokenizer.json.xz")
    parser.add_argument("--collect", type=Path, help="copy the staged files found here (the last call's) to --staged")
    parser.add_argument("--wheel", default=WHEEL, help="the assembled wheel's file name (pip reads its tags)")
    parser.add_argument("--wheel-dir", type=Path, default=Path("/tmp"), help="where the wheel is assembled")
    parser.add_argument("--parts", type=int, default=PARTS)
    parser.add_argument("--module", default="onnxruntime", help="what the installed wheel must provide")
    parser.add_argument("--site", type=Path, default=Path("/tmp/ortsite"), help="pip install --target")
    parser.add_argument("--work", type=Path, default=Path("/tmp/m3rt-gpu-check"), help="the check's big files")
    parser.add_argument(
        "--deadline-s", type=float, default=480.0, help="the whole job, install to packing (~8 minutes in all)"
    )
    parser.add_argument("--pack-reserve-s", type=float, default=20.0, help="kept for packing after the check")
    parser.add_argument("--grace-s", type=float, default=15.0, help="past its budget, the check is killed after this")
    parser.add_argument("--dry-run", action="store_true", help="the check's dry run (tiny model, CPU)")
    parser.add_argument("check_args", nargs=argparse.REMAINDER, help="after --: more gpu_check.py arguments")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    args.check_args = [a for a in args.check_args if a != "--"]
    job = Job(args)
    code = 2
    try:
        if shutil.which("nvidia-smi"):
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20)
            job.log("nvidia-smi:\n" + smi.stdout.strip())
        if args.collect is not None:
            found = collect(args.collect, args.staged, args.parts)
            job.log(f"collect: {', '.join(found) or 'nothing'} from {args.collect} into {args.staged}")
        wheel = args.wheel_dir / args.wheel
        digest = assemble(args.staged, wheel, args.parts)
        job.log(f"assemble: {wheel} ({wheel.stat().st_size:,} B), sha256 {digest}: matches wheel.sha256")
        job.log(f"install: {install(wheel, args.site, args.module, digest, job)}")
        tokenizer = unpack_tokenizer(args.staged / "tokenizer.json.xz", args.staged / "tokenizer.json")
        job.log(f"tokenizer: {tokenizer} ({tokenizer.stat().st_size:,} B)")
        code = run_check(job, args.site, tokenizer)
        job.log(f"check: exit status {code}")
    except StagingError as exc:
        job.log(f"staging failed: {exc}")
    except Exception as exc:  # noqa: BLE001 - whatever it was, the results so far are still packed
        job.log(f"failed: {type(exc).__name__}: {exc}")
    finally:
        job.log(f"pack: {', '.join(pack(job)) or 'nothing from the check'} + host.log in {job.out}")
        job.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
