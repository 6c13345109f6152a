"""The output folder of `m3rt embed`: the job it holds, a commit log, and shards committed atomically.

A unit's shard (and its errors, if any) is written under a temporary name, fsynced and renamed into
place by whoever embedded it; the unit counts as done only once the driver has appended its line to
`_commits.jsonl` (one write, fsynced). A crash anywhere leaves either a committed unit or files that
no line names: the next run deletes those and embeds the unit again, so each row ends up exactly once.
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from m3rt.errors import InputError

JOB_FILE = "_job.json"
COMMIT_LOG = "_commits.jsonl"
ERRORS_FILE = "_errors.jsonl"
ERRORS_DIR = "_error_parts"
TMP_DIR = "_tmp"
LOCK_FILE = "_lock"


def shard_name(unit: int) -> str:
    return f"part-{unit:06d}.parquet"


def errors_name(unit: int) -> str:
    return f"part-{unit:06d}.jsonl"


@dataclass(frozen=True)
class Commit:
    """What one committed unit holds (a line of the commit log)."""

    unit: int
    rows: int
    errors: int
    tokens: int
    seconds: float
    node: str

    def to_line(self) -> bytes:
        return (json.dumps(asdict(self), separators=(",", ":")) + "\n").encode()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(output: Path, write: Any, final: Path) -> None:
    """`write(tmp_path)` then fsync and rename to `final`: readers see the whole file or none."""
    tmp = output / TMP_DIR / f"{final.name}.{uuid.uuid4().hex}.tmp"
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def write_errors(output: Path, unit: int, records: list[dict[str, Any]]) -> None:
    """The unit's error rows as JSON lines under `_error_parts/`, atomically (nothing when there are none)."""
    if not records:
        return

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

    publish(output, write, output / ERRORS_DIR / errors_name(unit))


class OutputFolder:
    """The folder's job description, its commit log and its clean-up, for one run at a time."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock_fd: int | None = None

    @contextmanager
    def locked(self) -> Iterator[OutputFolder]:
        """Refuse a second run on the same folder while this one lives (advisory lock on `_lock`)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(f"{self.root}: another m3rt embed is writing to this folder") from None
        self._lock_fd = fd
        try:
            yield self
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            self._lock_fd = None

    def claim(self, job: dict[str, Any]) -> None:
        """Record the job in a new folder, or check that an existing folder holds this same job."""
        path = self.root / JOB_FILE
        if path.exists():
            held = json.loads(path.read_text())
            if held != job:
                keys = sorted(k for k in set(held) | set(job) if held.get(k) != job.get(k))
                raise InputError(
                    f"{self.root} holds the output of a different job (differs in: {', '.join(keys)}); "
                    "rerun with the same inputs and options to resume, or choose a new output folder"
                )
        else:
            leftovers = [p.name for p in self.root.iterdir() if p.name != LOCK_FILE]
            if leftovers:
                raise InputError(f"{self.root} is not empty and holds no m3rt embed job; choose an empty folder")
            publish_text(self.root, json.dumps(job, indent=2, sort_keys=True), path)
        (self.root / TMP_DIR).mkdir(exist_ok=True)
        (self.root / ERRORS_DIR).mkdir(exist_ok=True)

    def commits(self) -> dict[int, Commit]:
        """Committed units. A last line cut short by a crash is not a commit (and is cut off here)."""
        path = self.root / COMMIT_LOG
        if not path.exists():
            return {}
        data = path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            with open(path, "r+b") as f:
                f.truncate(len(complete))
                os.fsync(f.fileno())
        commits = {}
        for line in complete.decode().splitlines():
            commit = Commit(**json.loads(line))
            commits[commit.unit] = commit
        return commits

    def sweep(self, committed: Iterable[int]) -> list[str]:
        """Delete temporary files and shards no commit names (a crash between rename and log line)."""
        keep = set(committed)
        removed = []
        for tmp in (self.root / TMP_DIR).iterdir():
            tmp.unlink()
            removed.append(tmp.name)
        for folder, pattern in ((self.root, "part-*.parquet"), (self.root / ERRORS_DIR, "part-*.jsonl")):
            for path in folder.glob(pattern):
                if int(path.name[5:11]) not in keep:
                    path.unlink()
                    removed.append(path.name)
        return removed

    def commit(self, commit: Commit) -> None:
        """Append the unit's line and fsync: from here on the unit is done."""
        with open(self.root / COMMIT_LOG, "ab") as f:
            f.write(commit.to_line())
            f.flush()
            os.fsync(f.fileno())

    def gather_errors(self) -> int:
        """`_errors.jsonl`: every committed unit's error rows in unit order (rewritten atomically)."""
        parts = sorted((self.root / ERRORS_DIR).glob("part-*.jsonl"))
        count = 0

        def write(tmp: Path) -> None:
            nonlocal count
            with open(tmp, "wb") as out:
                for part in parts:
                    data = part.read_bytes()
                    count += data.count(b"\n")
                    out.write(data)

        publish(self.root, write, self.root / ERRORS_FILE)
        return count


def publish_text(output: Path, text: str, final: Path) -> None:
    (output / TMP_DIR).mkdir(parents=True, exist_ok=True)
    publish(output, lambda tmp: tmp.write_text(text), final)
