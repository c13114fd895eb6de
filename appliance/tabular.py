"""Dataset files as Arrow tables: detect, load, write, profile, compare and split.

Choices that callers see:
- CSV is read with Python's csv module (so errors carry line numbers). Cells stay strings
  unless every non-empty cell of a column reads back exactly as one type: integers without
  leading zeros that fit int64 (so "007" and "010-..." stay text), decimals such as 1.5 or
  2e-3, or true/false in any case. In a typed column an empty cell is null; in a text
  column it stays "". Blank lines are skipped.
- JSON Lines: a column is the union of the keys seen, in order of first appearance; a row
  without the key holds null. A column whose values do not share one type (1 in one row,
  "a" in another) becomes text: strings as they are, other values as JSON text.
- Arrow cannot tell a missing key from a null one, so JSON output leaves out null fields
  inside nested values (chat messages round-trip as written) but keeps every top-level
  column. CSV output writes null as an empty cell and nested values as JSON text, which
  reads back as text.
- Values JSON cannot hold are written as text: dates and times in ISO 8601, bytes in base64.
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import csv
import datetime
import io
import json
import math
import os
import random
import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from appliance.errors import DatasetError

FORMATS = ("csv", "jsonl", "parquet")

_EXTENSIONS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json-lines": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
_PARQUET_MAGIC = b"PAR1"
_ARCHIVES = {b"PK\x03\x04": "a zip archive (an .xlsx workbook is one: export it as CSV)", b"\x1f\x8b": "gzip-compressed: decompress it first"}
_CSV_FIELD_LIMIT = 1 << 30  # long documents in one cell are normal in training data
_CSV_INT = re.compile(r"-?(?:0|[1-9][0-9]*)")
_CSV_FLOAT = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_INT64 = (-(2**63), 2**63 - 1)
_SAMPLES = 5


def detect_format(filename: str, head: bytes) -> str:
    """The format of a file from its name, else from its first bytes (a few KiB are enough)."""
    by_extension = _EXTENSIONS.get(Path(filename).suffix.lower())
    if by_extension:
        return by_extension
    if head.startswith(_PARQUET_MAGIC):
        return "parquet"
    text = _text_head(head)
    if text is None:
        archive = next((what for magic, what in _ARCHIVES.items() if head.startswith(magic)), None)
        raise _unknown_format(filename, archive or ("the file is empty" if not head else "the content is binary"))
    lines = [line for line in text.split("\n") if line.strip()]
    if lines and lines[0].lstrip().startswith("{"):
        first_is_cut = len(lines) == 1 and not text.endswith("\n")
        if first_is_cut or isinstance(_json_or_none(lines[0]), dict):
            return "jsonl"
    if lines and _looks_delimited(text):
        return "csv"
    raise _unknown_format(filename, "the text is neither JSON Lines nor comma-separated")


def load_table(path: Path, fmt: str) -> pa.Table:
    """The whole file as a table; DatasetError naming the file and the place of any problem."""
    _check_format(fmt)
    if fmt == "parquet":
        try:
            return pq.read_table(path)
        except (pa.ArrowException, OSError) as error:
            raise DatasetError(f"{path}: not a readable Parquet file ({error})") from None
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"{path}: cannot read the file ({error.strerror})") from None
    text = _decode(path, data)
    return _read_csv(path, text) if fmt == "csv" else _read_jsonl(path, text)


def write_table(table: pa.Table, path: Path, fmt: str) -> None:
    """Write atomically: a temporary file beside `path`, then os.replace."""
    _check_format(fmt)
    with _atomic(path) as temporary:
        if fmt == "parquet":
            try:
                pq.write_table(table, temporary)
            except pa.ArrowException as error:
                raise DatasetError(f"{path}: cannot write this table as Parquet ({error})") from None
            return
        with open(temporary, "w", encoding="utf-8", newline="") as out:
            if fmt == "csv":
                writer = csv.writer(out, lineterminator="\n")
                writer.writerow(table.column_names)
                writer.writerows([_csv_cell(value) for value in row] for row in _rows(table))
            else:
                for row in _rows(table):
                    record = dict(zip(table.column_names, (_plain(value) for value in row)))
                    out.write(json.dumps(record, ensure_ascii=False, default=_json_default) + "\n")


def quality_report(table: pa.Table) -> dict:
    """Row and column statistics, JSON-serialisable.

    `distinct` counts distinct non-null values; `length` (characters; of the JSON text for
    nested values) is given for text and nested columns, else null; percentiles are
    nearest-rank. An empty row has only nulls, blank strings and empty lists or objects.
    """
    rows = table.num_rows
    columns = []
    for field, column in zip(table.schema, table.columns):
        values = column.to_pylist()
        present = [value for value in values if value is not None]
        nested = pa.types.is_nested(field.type)
        if nested:
            present = [_json_text(value) for value in present]
        textual = nested or _is_text(field.type)
        columns.append({
            "name": field.name,
            "type": str(field.type),
            "nulls": column.null_count,
            "null_fraction": column.null_count / rows if rows else 0.0,
            "distinct": len(set(present)),
            "length": _length_stats([len(value) for value in present]) if textual and present else None,
        })
    all_rows = list(_rows(table))
    return {
        "rows": rows,
        "columns": columns,
        "duplicate_rows": len(all_rows) - len({_canonical(row) for row in all_rows}),
        "empty_rows": sum(all(_is_blank(value) for value in row) for row in all_rows),
    }


def diff_tables(old: pa.Table, new: pa.Table, key: str | None = None) -> dict:
    """Rows added, removed and changed from `old` to `new`, plus schema changes.

    Rows are compared on the columns both tables have; column changes show under "schema".
    Without `key`, a column named id is the key when it is unique in both tables; with no
    key at all, rows are compared as a multiset.
    """
    if key is None and _usable_key(old, "id") and _usable_key(new, "id"):
        key = "id"
    if key is not None:
        _check_key(old, key, "old")
        _check_key(new, key, "new")
    common = sorted(set(old.column_names) & set(new.column_names))
    old_rows = [_canonical(row) for row in _rows(old.select(common))]
    new_rows = [_canonical(row) for row in _rows(new.select(common))]
    result = {"key": key, "rows": {"old": old.num_rows, "new": new.num_rows}}
    if key is None:
        result |= _multiset_diff(old_rows, new_rows, common)
        result["note"] = "no key column: rows are compared as a whole, so a changed row shows as one removed plus one added"
    else:
        old_by_key = dict(zip(old.column(key).to_pylist(), old_rows))
        new_by_key = dict(zip(new.column(key).to_pylist(), new_rows))
        added = [k for k in new_by_key if k not in old_by_key]
        removed = [k for k in old_by_key if k not in new_by_key]
        changed = [k for k in new_by_key if k in old_by_key and old_by_key[k] != new_by_key[k]]
        result |= {
            "added": len(added),
            "removed": len(removed),
            "changed": len(changed),
            "unchanged": len(new_by_key) - len(added) - len(changed),
            "samples": {
                "added": [_jsonable(k) for k in added[:_SAMPLES]],
                "removed": [_jsonable(k) for k in removed[:_SAMPLES]],
                "changed": [_jsonable(k) for k in changed[:_SAMPLES]],
            },
        }
    result["schema"] = _schema_changes(old.schema, new.schema)
    return result


def split_table(table: pa.Table, ratios: dict[str, float], seed: int) -> dict[str, pa.Table]:
    """Split rows at random (reproducibly for a seed) into named parts, rows kept in file order.

    Each part gets floor(ratio * rows) rows, the first part also the remainder.
    """
    if not ratios:
        raise DatasetError("a split needs at least one part, such as {'train': 0.8, 'test': 0.2}")
    for name, ratio in ratios.items():
        if not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio < 0:
            raise DatasetError(f"split ratio for {name!r} must be a number >= 0, got {ratio!r}")
    if abs(sum(ratios.values()) - 1) > 1e-6:
        raise DatasetError(f"split ratios must add up to 1, got {sum(ratios.values()):g}")
    # Ratios as written in decimal, so that 0.29 * 100 rows is 29, not 28.999...
    shares = {name: Fraction(repr(float(ratio))) for name, ratio in ratios.items()}
    total = sum(shares.values())
    sizes = {name: math.floor(share * table.num_rows / total) for name, share in shares.items()}
    first = next(iter(sizes))
    sizes[first] += table.num_rows - sum(sizes.values())
    order = list(range(table.num_rows))
    random.Random(seed).shuffle(order)
    parts, start = {}, 0
    for name, size in sizes.items():
        parts[name] = table.take(pa.array(sorted(order[start : start + size]), pa.int64()))
        start += size
    return parts


def _unknown_format(filename: str, reason: str) -> DatasetError:
    return DatasetError(f"{filename}: unknown dataset format ({reason}); supported formats: {', '.join(FORMATS)}")


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {fmt!r}; supported formats: {', '.join(FORMATS)}")


def _text_head(head: bytes) -> str | None:
    """The head as text, tolerating a character cut at its end; None for empty or binary data."""
    try:
        text = codecs.getincrementaldecoder("utf-8-sig")().decode(head, final=False)
    except UnicodeDecodeError:
        return None
    if not text.strip() or any(ch < " " and ch not in "\t\r\n" for ch in text):
        return None
    return text


def _json_or_none(line: str):
    try:
        return json.loads(line)
    except ValueError:
        return None


def _looks_delimited(text: str) -> bool:
    """Comma-separated: at least two fields and the same count on every complete line."""
    complete = text if text.endswith("\n") or "\n" not in text else text[: text.rindex("\n")]
    counts = {len(row) for row in csv.reader(io.StringIO(complete, newline="")) if row}
    return len(counts) == 1 and counts.pop() >= 2


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DatasetError(f"{path}: line {line}: not UTF-8 text (byte {data[error.start]:#04x}); save the file as UTF-8") from None


def _read_csv(path: Path, text: str) -> pa.Table:
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header, rows, line = None, [], 0
    try:
        for row in reader:
            line, row_start = reader.line_num, line + 1
            if not row:
                continue
            if header is None:
                header = _check_header(path, row_start, row)
            elif len(row) != len(header):
                raise DatasetError(f"{path}: line {row_start}: expected {len(header)} fields, got {len(row)}")
            else:
                rows.append(row)
    except csv.Error as error:
        raise DatasetError(f"{path}: line {reader.line_num}: malformed CSV ({error})") from None
    if header is None:
        raise DatasetError(f"{path}: the file is empty; a CSV dataset needs a header line and data rows")
    if not rows:
        raise DatasetError(f"{path}: no data rows after the header")
    return pa.table({name: _typed([row[i] for row in rows]) for i, name in enumerate(header)})


def _check_header(path: Path, line: int, header: list[str]) -> list[str]:
    for position, name in enumerate(header, 1):
        if not name.strip():
            raise DatasetError(f"{path}: line {line}: column {position} of the header has no name")
    repeated = [name for name, count in Counter(header).items() if count > 1]
    if repeated:
        raise DatasetError(f"{path}: line {line}: duplicate column names in the header: {', '.join(repeated)}")
    return header


def _typed(cells: list[str]) -> pa.Array:
    """A CSV column as int64, double or bool when every non-empty cell reads back exactly, else text."""
    present = [cell for cell in cells if cell != ""]
    if present:
        if all(_CSV_INT.fullmatch(cell) for cell in present):
            numbers = [int(cell) if cell else None for cell in cells]
            if all(_INT64[0] <= n <= _INT64[1] for n in numbers if n is not None):
                return pa.array(numbers, pa.int64())
        elif all(_CSV_FLOAT.fullmatch(cell) for cell in present):
            return pa.array([float(cell) if cell else None for cell in cells], pa.float64())
        elif all(cell.lower() in ("true", "false") for cell in present):
            return pa.array([cell.lower() == "true" if cell else None for cell in cells], pa.bool_())
    return pa.array(cells, pa.string())


def _read_jsonl(path: Path, text: str) -> pa.Table:
    columns: dict[str, list] = {}
    rows = 0
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            reason = getattr(error, "msg", str(error))
            raise DatasetError(f"{path}: line {number}: not valid JSON ({reason})") from None
        if not isinstance(record, dict):
            raise DatasetError(f"{path}: line {number}: expected a JSON object, got {_json_kind(record)}")
        for name, value in record.items():
            if name not in columns:
                columns[name] = [None] * rows
            columns[name].append(value)
        rows += 1
        for values in columns.values():
            if len(values) < rows:
                values.append(None)
    if not rows:
        raise DatasetError(f"{path}: no rows; a JSON Lines dataset has one JSON object per line")
    return pa.table({name: _unified(values) for name, values in columns.items()})


def _json_kind(value) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return names.get(type(value), "null")


def _unified(values: list) -> pa.Array:
    """One Arrow type for a JSON column; text when the values do not share one."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return pa.array([value if value is None or isinstance(value, str) else _json_text(value) for value in values], pa.string())


def _rows(table: pa.Table) -> Iterator[tuple]:
    return zip(*(column.to_pylist() for column in table.columns))


def _is_text(arrow_type: pa.DataType) -> bool:
    if pa.types.is_dictionary(arrow_type):
        return _is_text(arrow_type.value_type)
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


def _plain(value):
    """A cell as plain JSON data, leaving out null fields of nested objects."""
    if isinstance(value, dict):
        return {name: _plain(item) for name, item in value.items() if item is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _json_default(value) -> str:
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return str(value)


def _json_text(value) -> str:
    return json.dumps(_plain(value), ensure_ascii=False, separators=(",", ":"), default=_json_default)


def _jsonable(value):
    return json.loads(json.dumps(_plain(value), default=_json_default))


def _canonical(row: tuple) -> str:
    return json.dumps(_plain(list(row)), ensure_ascii=False, separators=(",", ":"), sort_keys=True, default=_json_default)


def _csv_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (dict, list, tuple)):
        return _json_text(value)
    return _json_default(value)


def _is_blank(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, (list, dict, tuple)) and not value)


def _length_stats(lengths: list[int]) -> dict:
    lengths.sort()

    def rank(percent: int) -> int:
        return lengths[max(0, -(-percent * len(lengths) // 100) - 1)]

    return {"min": lengths[0], "p50": rank(50), "p90": rank(90), "max": lengths[-1], "mean": round(sum(lengths) / len(lengths), 3)}


def _usable_key(table: pa.Table, key: str) -> bool:
    if key not in table.column_names or pa.types.is_nested(table.schema.field(key).type):
        return False
    column = table.column(key)
    return column.null_count == 0 and len(set(column.to_pylist())) == table.num_rows


def _check_key(table: pa.Table, key: str, which: str) -> None:
    if key not in table.column_names:
        raise DatasetError(f"key column {key!r} is missing from the {which} table (its columns: {', '.join(table.column_names)})")
    if pa.types.is_nested(table.schema.field(key).type):
        raise DatasetError(f"key column {key!r} holds nested values in the {which} table; a key must be a plain value")
    values = table.column(key).to_pylist()
    if None in values:
        raise DatasetError(f"key column {key!r} has empty values in the {which} table")
    repeated = next((value for value, count in Counter(values).items() if count > 1), None)
    if repeated is not None:
        raise DatasetError(f"key column {key!r} is not unique in the {which} table: {repeated!r} appears more than once")


def _multiset_diff(old_rows: list[str], new_rows: list[str], columns: list[str]) -> dict:
    old_counts, new_counts = Counter(old_rows), Counter(new_rows)
    added, removed = new_counts - old_counts, old_counts - new_counts

    def samples(rows: list[str], surplus: Counter) -> list[dict]:
        picked, left = [], Counter(surplus)
        for row in rows:
            if len(picked) == _SAMPLES:
                break
            if left[row] > 0:
                left[row] -= 1
                picked.append(dict(zip(columns, json.loads(row))))
        return picked

    return {
        "added": added.total(),
        "removed": removed.total(),
        "changed": 0,
        "unchanged": (old_counts & new_counts).total(),
        "samples": {"added": samples(new_rows, added), "removed": samples(old_rows, removed), "changed": []},
    }


def _schema_changes(old: pa.Schema, new: pa.Schema) -> dict:
    old_types = {field.name: str(field.type) for field in old}
    new_types = {field.name: str(field.type) for field in new}
    return {
        "added": [{"name": name, "type": kind} for name, kind in new_types.items() if name not in old_types],
        "removed": [{"name": name, "type": kind} for name, kind in old_types.items() if name not in new_types],
        "type_changed": [
            {"name": name, "old": kind, "new": new_types[name]}
            for name, kind in old_types.items()
            if name in new_types and new_types[name] != kind
        ],
    }


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[str]:
    """A temporary path in the target's folder; it replaces `path` only if the body succeeds."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield temporary
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
