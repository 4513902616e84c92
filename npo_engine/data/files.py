"""Prompt datasets on disk: JSON lines (`.jsonl`, `.json`) and Parquet (`.parquet`) read into `PromptRecord`s.

Each row is one JSON object (or Parquet row) holding a prompt, a reference answer and, optionally, an id.
Field names are configurable and may be dotted paths into nested objects; verl's Parquet files, for example,
load with `answer_field="reward_model.ground_truth"` and `id_field="extra_info.index"`. A key that itself
contains dots is matched whole before it is read as a path.

How a row becomes a record:
- prompt: a non-empty string, or a chat message list `[{"role": "user", "content": "..."}, ...]`. For a chat
  list, `prompt` is the content of the LAST user message and the whole list is kept in `meta["messages"]`:
  a rollout backend that applies a chat template uses the list (system prompt, few-shot turns), everything
  else (logs, dumps, verifiers) sees the plain question.
- answer: a string, an int, a finite float, or a non-empty list of those. Integral floats drop the ".0"
  (3.0 becomes "3", so that it exact-matches "3"). A list (verl allows several ground truths) gives its
  FIRST element as `answer` and keeps all of them, as strings, in `meta["answers"]`.
- id: a string or an int. Where the field is absent or null, the id is `"<file stem>:<line>"` (Parquet:
  `"<file stem>:<row>"`), stable as long as the file is not edited. Ids must be unique across all files of
  one `load_prompt_files` call, because the NPO guide cache is keyed by them.
- meta: `"source"` (`"<file name>:<line>"`, Parquet `"<file name>:row <i>"`), `"messages"` and `"answers"` as
  above, and every other top-level field of the row (e.g. `"difficulty"`, `"data_source"`). A row field
  whose name clashes with one of those three keys is kept as `"row.<name>"`.

Locations in messages and default ids: JSON lines count 1-based physical lines (blank lines are ignored
but counted, so the number is the one an editor shows); a `.json` file holding one top-level array counts
1-based items; Parquet counts 0-based rows, as pyarrow and pandas index them.

A malformed row raises `DatasetError` naming the file, the location, what is wrong and the fix. With
`on_error="skip"` it is skipped instead and counted in the `LoadReport`, and one warning per file is logged.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

from npo_engine.data.records import PromptRecord
from npo_engine.errors import UserError

logger = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]

# A report keeps only the first few messages: enough to see the pattern, bounded for a file with a
# million bad rows.
_MAX_REPORTED_ERRORS = 5
# meta keys the loader sets itself; a row field with one of these names is stored as "row.<name>".
_RESERVED_META_KEYS = ("source", "messages", "answers")
_JSON_SUFFIXES = (".jsonl", ".json")
_PARQUET_SUFFIXES = (".parquet",)
_SKIP_HINT = "or set data.on_error='skip' to skip malformed rows"
# Editors on Windows may start UTF-8 files with a byte-order mark, which json.loads rejects.
_UTF8_BOM = b"\xef\xbb\xbf"


class DatasetError(UserError, ValueError):
    """A prompt file (or one of its rows) cannot be turned into records.

    `path` is the file; `location` is `"line 12"`, `"item 3"` or `"row 7"` for a row error, else None.
    """

    def __init__(self, message: str, *, path: Path, location: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.location = location


@dataclass
class LoadReport:
    """What one load did: rows turned into records, rows skipped (only with `on_error="skip"`), and the
    messages of the first few skipped rows."""

    loaded: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)

    def _add_error(self, message: str) -> None:
        self.skipped += 1
        if len(self.errors) < _MAX_REPORTED_ERRORS:
            self.errors.append(message)


class _RowError(Exception):
    """What is wrong with one row and how to fix it; the caller adds the file and location."""


@dataclass(frozen=True)
class _Fields:
    prompt: str
    answer: str
    id: str | None


@dataclass(frozen=True)
class _Row:
    """One raw row: `location` for messages ("line 12"), `index` for default ids and meta["source"]."""

    location: str
    index: str
    value: Any = None
    error: str | None = None  # set when the row could not even be parsed (invalid JSON, bad UTF-8)


def load_prompt_file(
    path: str | os.PathLike[str],
    *,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    id_field: str | None = "id",
    on_error: OnError = "raise",
) -> tuple[list[PromptRecord], LoadReport]:
    """Read one `.jsonl` / `.json` / `.parquet` prompt file.

    Args:
        path: the file; its suffix picks the format.
        prompt_field, answer_field: field names or dotted paths (`"reward_model.ground_truth"`).
        id_field: field name or dotted path of the id; None gives every record a `"<stem>:<line>"` id.
        on_error: `"raise"` stops at the first malformed row; `"skip"` skips and counts such rows.

    Returns:
        (records in file order, report).

    Raises:
        FileNotFoundError: the file does not exist.
        DatasetError: a malformed row (with `on_error="raise"`), an unknown suffix, an unreadable file, or a
            file without any valid row.
        ImportError: a Parquet file without pyarrow installed.
    """
    return _load(Path(path), _check_args(prompt_field, answer_field, id_field, on_error), on_error, seen={})


def load_prompt_files(
    paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    *,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    id_field: str | None = "id",
    on_error: OnError = "raise",
) -> tuple[list[PromptRecord], LoadReport]:
    """Read several prompt files (see `load_prompt_file`) and concatenate them in the order given.

    Ids must be unique across all files; every file must contain at least one valid row. The report sums
    the per-file counts.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if len(paths) == 0:
        raise ValueError("load_prompt_files got no paths; pass at least one .jsonl/.json/.parquet file")
    fields = _check_args(prompt_field, answer_field, id_field, on_error)
    seen: dict[str, str] = {}
    records: list[PromptRecord] = []
    total = LoadReport()
    for p in paths:
        recs, report = _load(Path(p), fields, on_error, seen)
        records.extend(recs)
        total.loaded += report.loaded
        total.skipped += report.skipped
        total.errors.extend(report.errors[: _MAX_REPORTED_ERRORS - len(total.errors)])
    return records, total


def _check_args(prompt_field: str, answer_field: str, id_field: str | None, on_error: str) -> _Fields:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    for name, value in (("prompt_field", prompt_field), ("answer_field", answer_field)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"data.{name} must be a non-empty field name or dotted path, got {value!r}")
    if id_field is not None and (not isinstance(id_field, str) or not id_field):
        raise ValueError(
            f"data.id_field must be a field name, a dotted path or None (ids from file:line), "
            f"got {id_field!r}"
        )
    return _Fields(prompt=prompt_field, answer=answer_field, id=id_field)


def _load(
    path: Path, fields: _Fields, on_error: OnError, seen: dict[str, str]
) -> tuple[list[PromptRecord], LoadReport]:
    """Read one file; `seen` maps every id loaded so far (in this call) to its source, for duplicates."""
    if not path.exists():
        raise FileNotFoundError(
            f"prompt file {str(path)!r} does not exist (working directory: {os.getcwd()}); check the path"
        )
    if path.is_dir():
        raise DatasetError(f"prompt file {str(path)!r} is a directory; pass the data files in it", path=path)
    suffix = path.suffix.lower()
    if suffix in _JSON_SUFFIXES:
        rows = _json_rows(path)
    elif suffix in _PARQUET_SUFFIXES:
        rows = _parquet_rows(path, fields)
    else:
        raise DatasetError(
            f"prompt file {str(path)!r} has suffix {path.suffix!r}; supported: "
            f"{', '.join(_JSON_SUFFIXES + _PARQUET_SUFFIXES)} (rename the file or convert it)",
            path=path,
        )

    records: list[PromptRecord] = []
    report = LoadReport()
    n_rows = 0
    for row in rows:
        n_rows += 1
        try:
            if row.error is not None:
                raise _RowError(row.error)
            record = _to_record(row, path, fields)
            if record.id in seen:
                raise _RowError(
                    f"duplicate id {record.id!r} (first seen at {seen[record.id]}); ids must be unique: fix "
                    f"the data, set data.id_field to a unique field, or set it to null for file:line ids"
                )
        except _RowError as e:
            message = f"{path}: {row.location}: {e}"
            if on_error == "raise":
                raise DatasetError(f"{message}; {_SKIP_HINT}", path=path, location=row.location) from None
            report._add_error(message)
            continue
        seen[record.id] = f"{path}: {row.location}"
        records.append(record)
    report.loaded = len(records)

    if n_rows == 0:
        raise DatasetError(
            f"prompt file {str(path)!r} contains no rows; remove it from the file list", path=path
        )
    if not records:
        raise DatasetError(
            f"prompt file {str(path)!r}: all {n_rows} rows are malformed and were skipped; first errors: "
            + " | ".join(report.errors),
            path=path,
        )
    if report.skipped:
        logger.warning(
            "%s: skipped %d of %d rows as malformed (data.on_error='skip'); first: %s",
            path, report.skipped, n_rows, report.errors[0],
        )
    return records, report


# ---------------------------------------------------------------------------------------------- readers


def _json_rows(path: Path) -> Iterator[_Row]:
    with path.open("rb") as f:
        head = f.read(4096).removeprefix(_UTF8_BOM).lstrip()
    if path.suffix.lower() == ".json" and head.startswith(b"["):
        yield from _json_array_rows(path)
        return
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            row = _Row(location=f"line {lineno}", index=str(lineno))
            if lineno == 1:
                raw = raw.removeprefix(_UTF8_BOM)
            try:
                value = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield _Row(row.location, row.index, error=f"not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            except json.JSONDecodeError as e:
                yield _Row(
                    row.location, row.index,
                    error=f"invalid JSON ({e.msg} at column {e.colno}); each line must hold one JSON object",
                )
                continue
            yield _Row(row.location, row.index, value=value)


def _json_array_rows(path: Path) -> Iterator[_Row]:
    """A `.json` file holding one array of row objects, as `json.dump(list_of_dicts)` writes it."""
    try:
        items = json.loads(path.read_bytes().removeprefix(_UTF8_BOM).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(
            f"prompt file {str(path)!r} starts with '[' but is not a valid JSON array ({e}); fix the file or "
            f"write it as JSON lines (.jsonl, one object per line)",
            path=path,
        ) from None
    for i, value in enumerate(items, start=1):
        yield _Row(location=f"item {i}", index=str(i), value=value)


def _parquet_rows(path: Path, fields: _Fields) -> Iterator[_Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(
            f"reading the Parquet file {str(path)!r} needs pyarrow: pip install pyarrow "
            f"(or pip install 'npo_engine[parquet]')"
        ) from e
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid/OSError family for corrupt files
        raise DatasetError(
            f"cannot read Parquet file {str(path)!r}: {type(e).__name__}: {e}; check that it is a Parquet "
            f"file",
            path=path,
        ) from e
    # A missing column fails every row the same way, so it is one file error even with on_error="skip".
    columns = table.column_names
    for name, value in (("prompt_field", fields.prompt), ("answer_field", fields.answer)):
        if value not in columns and value.split(".")[0] not in columns:
            raise DatasetError(
                f"Parquet file {str(path)!r} has no column for data.{name}={value!r} (columns: "
                f"{', '.join(columns)}); set data.{name} to the column (dotted path for struct fields)",
                path=path,
            )
    i = 0
    for batch in table.to_batches():  # batch by batch: a whole table as Python dicts can be many GB
        for value in batch.to_pylist():
            yield _Row(location=f"row {i}", index=str(i), value=value)
            i += 1


# ---------------------------------------------------------------------------------------- row → record


def _to_record(row: _Row, path: Path, fields: _Fields) -> PromptRecord:
    value = row.value
    if not isinstance(value, dict):
        raise _RowError(
            f"row is {_describe(value)}, not an object; each row must be an object like "
            f'{{"{fields.prompt}": ..., "{fields.answer}": ...}}'
        )
    meta: dict[str, Any] = {}
    prompt = _prompt(value, fields.prompt, meta)
    answer = _answer(value, fields.answer, meta)
    record_id = f"{path.stem}:{row.index}"
    if fields.id is not None:
        raw_id = _lookup(value, fields.id)
        if raw_id is not None:
            if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or raw_id == "":
                raise _RowError(
                    f"field {fields.id!r} is {_describe(raw_id)}; ids must be non-empty strings or ints: fix "
                    f"the data, set data.id_field to another field, or set it to null for file:line ids"
                )
            record_id = str(raw_id)

    used = {fields.prompt, fields.answer, fields.id}
    for key, v in value.items():
        if key in used:
            continue
        meta[f"row.{key}" if key in _RESERVED_META_KEYS else key] = v
    sep = ":row " if row.location.startswith("row") else ":"
    meta["source"] = f"{path.name}{sep}{row.index}"
    return PromptRecord(id=record_id, prompt=prompt, answer=answer, meta=meta)


def _lookup(row: dict[str, Any], name: str) -> Any:
    """The value at `name` (a key, else a dotted path); None when absent or null."""
    if name in row:
        return row[name]
    node: Any = row
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _require(row: dict[str, Any], name: str, config_key: str) -> Any:
    value = _lookup(row, name)
    if value is None:
        raise _RowError(
            f"missing field {name!r} (row fields: {_field_list(row)}); set {config_key} "
            f"to the field that holds it (a dotted path for nested fields)"
        )
    return value


def _prompt(row: dict[str, Any], name: str, meta: dict[str, Any]) -> str:
    value = _require(row, name, "data.prompt_field")
    if isinstance(value, str):
        if not value.strip():
            raise _RowError(f"field {name!r} (the prompt) is empty; fill it in or remove the row")
        return value
    if isinstance(value, list):
        user_turns = []
        for k, message in enumerate(value, start=1):
            if not (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                raise _RowError(
                    f"field {name!r} is a chat list whose message {k} is {_describe(message)}; each message "
                    f'must be {{"role": str, "content": str}}'
                )
            if message["role"] == "user":
                user_turns.append(message["content"])
        if not user_turns:
            raise _RowError(
                f"field {name!r} is a chat list without a 'user' message (roles: "
                f"{', '.join(m['role'] for m in value) or 'none'}); the last user message is the prompt: add "
                f"one or remove the row"
            )
        if not user_turns[-1].strip():
            raise _RowError(f"field {name!r}: the last user message is empty; fill it in or remove the row")
        meta["messages"] = value
        return user_turns[-1]
    raise _RowError(
        f"field {name!r} is {_describe(value)}; a prompt must be a non-empty string or a chat list "
        f'[{{"role": "user", "content": "..."}}]: set data.prompt_field if another field holds the prompt'
    )


def _answer(row: dict[str, Any], name: str, meta: dict[str, Any]) -> str:
    value = _require(row, name, "data.answer_field")
    if isinstance(value, list):
        if not value:
            raise _RowError(f"field {name!r} (the answer) is an empty list; give at least one answer")
        answers = [_answer_text(v, name) for v in value]
        meta["answers"] = answers
        return answers[0]
    return _answer_text(value, name)


def _answer_text(value: Any, name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _RowError(
            f"field {name!r} is {_describe(value)}; an answer must be a string, a number or a list of them: "
            f"set data.answer_field if another field holds the answer"
        )
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _RowError(f"field {name!r} (the answer) is {value}; answers must be finite numbers")
        # 3.0 → "3": JSON writers and pandas turn integer columns with nulls into floats.
        return str(int(value)) if value.is_integer() else repr(value)
    text = str(value)
    if not text.strip():
        raise _RowError(f"field {name!r} (the answer) is empty; fill it in or remove the row")
    return text


def _field_list(row: dict[str, Any]) -> str:
    """The row's keys for a message, at most 12 of them (some rows carry hundreds of fields)."""
    keys = list(map(str, row))
    return (", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")) or "none"


def _describe(value: Any) -> str:
    """`a list ([1, 2])`, shortened, for messages."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    if value is None:
        return "null"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name} ({text})"
