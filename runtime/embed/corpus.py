"""The input corpus of `m3rt embed`: which files, how they split into work units, and each unit's rows.

A unit is a range of rows of one file, the same on every run over the same inputs, so a rerun can
tell committed work from the rest. Rows that cannot be embedded keep their place with a reason.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from m3rt.errors import InputError

FORMATS = ("jsonl", "parquet", "text")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
_TEXT_SUFFIXES = {".txt", ".text", ".tsv", ".md"}


@dataclass(frozen=True)
class InputFile:
    path: str
    format: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Unit:
    """Rows [start, stop) of one file (0-based); `offset` is the byte where row `start` begins (text
    and JSON lines) so a worker seeks there instead of reading the file from the top."""

    index: int
    path: str
    format: str
    start: int
    stop: int
    offset: int = 0
    # the id prefix when several files are read and rows have no id field
    label: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> Unit:
        return Unit(**json.loads(text))


@dataclass
class Rows:
    """A unit's rows in input order: `texts[i]` is None where `reasons[i]` says why it is not embedded."""

    ids: list[str] = field(default_factory=list)
    texts: list[str | None] = field(default_factory=list)
    reasons: list[str | None] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)

    def add(self, row_id: str, line: int, text: str | None, reason: str | None) -> None:
        self.ids.append(row_id)
        self.lines.append(line)
        self.texts.append(text if reason is None else None)
        self.reasons.append(reason)


def _format_of(path: Path, forced: str | None) -> str | None:
    if forced:
        return forced
    suffix = path.suffix.lower()
    if suffix in _SUFFIXES:
        return _SUFFIXES[suffix]
    return "text" if suffix in _TEXT_SUFFIXES else None


def find_inputs(specs: Sequence[str], forced_format: str | None = None, exclude: Path | None = None) -> list[InputFile]:
    """Files named, found under folders (recursively, known suffixes, hidden ones skipped) or matched by
    globs; sorted, de-duplicated, anything under `exclude` (the output folder) left out."""
    if forced_format is not None and forced_format not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}, got {forced_format!r}")
    found: dict[str, str] = {}
    excluded = exclude.resolve() if exclude is not None else None
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            candidates = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
            candidates = [p for p in candidates if _format_of(p, forced_format)]
        elif path.is_file():
            if _format_of(path, forced_format) is None:
                raise InputError(f"{path}: unknown input format; name it .jsonl, .parquet or .txt, or pass --format")
            candidates = [path]
        else:
            matches = sorted(glob.glob(spec, recursive=True))
            candidates = [Path(m) for m in matches if Path(m).is_file() and _format_of(Path(m), forced_format)]
            if not candidates:
                raise InputError(f"input {spec!r}: no such file or folder, and no file matches it as a glob")
        for candidate in candidates:
            resolved = candidate.resolve()
            if excluded is not None and resolved.is_relative_to(excluded):
                continue
            found.setdefault(str(resolved), _format_of(candidate, forced_format))
    if not found:
        raise InputError(f"no input files in {', '.join(specs)} (looked for .jsonl, .ndjson, .json, .parquet, .txt)")
    files = []
    for path, fmt in sorted(found.items()):
        stat = os.stat(path)
        files.append(InputFile(path, fmt, stat.st_size, stat.st_mtime_ns))
    return files


def _hidden(relative: Path) -> bool:
    return any(part.startswith((".", "_")) for part in relative.parts)


def plan_units(files: Sequence[InputFile], rows_per_unit: int) -> list[Unit]:
    """Every file cut into units of `rows_per_unit` rows (the last one shorter); a unit never spans files."""
    if rows_per_unit < 1:
        raise InputError("--shard-rows must be >= 1")
    root = os.path.commonpath([os.path.dirname(f.path) for f in files])
    units: list[Unit] = []
    for f in files:
        label = os.path.relpath(f.path, root) if len(files) > 1 else ""
        if f.format == "parquet":
            import pyarrow.parquet as pq

            total = _parquet_rows(pq, f.path)
            starts = [(start, 0) for start in range(0, total, rows_per_unit)]
        else:
            starts, total = _line_starts(f.path, rows_per_unit)
        for start, offset in starts:
            stop = min(start + rows_per_unit, total)
            units.append(Unit(len(units), f.path, f.format, start, stop, offset, label))
    return units


def _parquet_rows(pq, path: str) -> int:
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError with its own message
        raise InputError(f"{path}: not a readable Parquet file ({exc})") from None


def _line_starts(path: str, every: int) -> tuple[list[tuple[int, int]], int]:
    """(row, byte offset) of rows 0, every, 2*every, ... and the number of lines (a last line without
    a newline counts; the newline at the end of the file does not start one)."""
    starts: list[tuple[int, int]] = []
    offset = 0
    rows = 0
    with open(path, "rb") as f:
        for line in f:
            if rows % every == 0:
                starts.append((rows, offset))
            offset += len(line)
            rows += 1
    return starts, rows


def _decode(raw: bytes) -> tuple[str | None, str | None]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return None, f"invalid UTF-8 at byte {exc.start}"


def _unicode_problem(text: str) -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from a JSON "\\ud800" escape
        return f"invalid Unicode: {exc.reason} at character {exc.start}"
    return None


def _check_text(text: object, text_field: str) -> tuple[str | None, str | None]:
    if text is None:
        return None, f"no text: field {text_field!r} missing or null"
    if not isinstance(text, str):
        return None, f"field {text_field!r} is {type(text).__name__}, not a string"
    problem = _unicode_problem(text)
    if problem:
        return None, problem
    if not text.strip():
        return None, "empty text"
    return text, None


def _row_id(value: object, id_field: str) -> tuple[str | None, str | None]:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        what = "missing or null" if value is None else f"a {type(value).__name__}"
        return None, f"id field {id_field!r} is {what}, not a string or integer"
    return str(value), None


def read_unit(unit: Unit, text_field: str = "text", id_field: str | None = None) -> Rows:
    """The unit's rows. Ids: the id field's value as a string, else the 1-based line (Parquet: row)
    number, prefixed by the file's path relative to the inputs' common folder when there are several."""
    rows = Rows()
    for line, raw_id, text, reason in _raw_rows(unit, text_field, id_field):
        row_id = None
        if id_field is not None and reason is None:
            row_id, reason = _row_id(raw_id, id_field)
        if row_id is None:
            row_id = f"{unit.label}:{line}" if unit.label else str(line)
        if reason is None:
            text, reason = _check_text(text, text_field)
        rows.add(row_id, line, text, reason)
    return rows


def _raw_rows(unit: Unit, text_field: str, id_field: str | None) -> Iterable[tuple[int, object, object, str | None]]:
    """(1-based line, raw id or None, raw text, reason or None) per row of the unit."""
    if unit.format == "parquet":
        yield from _parquet_rows_of(unit, text_field, id_field)
        return
    with open(unit.path, "rb") as f:
        f.seek(unit.offset)
        for line in range(unit.start + 1, unit.stop + 1):
            raw = f.readline()
            if raw.endswith(b"\n"):
                raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
            if line == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark is not text
                raw = raw[3:]
            text, reason = _decode(raw)
            if reason is not None or unit.format == "text":
                yield line, None, text, reason
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                yield line, None, None, f"not valid JSON: {exc.msg} at column {exc.colno}"
                continue
            if not isinstance(record, dict):
                yield line, None, None, f"a JSON {type(record).__name__}, not an object"
                continue
            yield line, record.get(id_field) if id_field else None, record.get(text_field), None


def _parquet_rows_of(unit: Unit, text_field: str, id_field: str | None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(unit.path)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise InputError(f"{unit.path}: no column {text_field!r} (columns: {', '.join(names)}); use --text-field")
    if id_field is not None and id_field not in names:
        raise InputError(f"{unit.path}: no column {id_field!r} (columns: {', '.join(names)}); use --id-field")
    # Only the row groups that overlap the unit are read.
    groups, first, skipped = [], 0, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if first < unit.stop and first + n > unit.start:
            groups.append(g)
        elif first + n <= unit.start:
            skipped = first + n
        first += n
    columns = [text_field] + ([id_field] if id_field and id_field != text_field else [])
    table = pf.read_row_groups(groups, columns=columns).slice(unit.start - skipped, unit.stop - unit.start)
    text_column = table.column(text_field)
    if pa.types.is_string(text_column.type) or pa.types.is_large_string(text_column.type):
        # Decoded here, row by row: a writer that put invalid UTF-8 in a string column fails only its row.
        text_column = text_column.cast(pa.large_binary())
    elif not (pa.types.is_binary(text_column.type) or pa.types.is_large_binary(text_column.type)):
        raise InputError(f"{unit.path}: column {text_field!r} is {text_column.type}, not a string column")
    raw_texts = text_column.to_pylist()
    raw_ids = table.column(id_field).to_pylist() if id_field else [None] * len(raw_texts)
    for i, (raw, raw_id) in enumerate(zip(raw_texts, raw_ids)):
        line = unit.start + i + 1
        if raw is None:
            yield line, raw_id, None, None
            continue
        text, reason = _decode(raw)
        yield line, raw_id, text, reason
