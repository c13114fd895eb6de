"""Dataset files: format detection, loading with clear errors, writing, reports, diffs, splits."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from appliance.errors import DatasetError
from appliance.tabular import FORMATS, detect_format, diff_tables, load_table, quality_report, split_table, write_table

CHAT = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    {"messages": [{"role": "user", "content": "이름이 뭐예요?", "name": "minji"}, {"role": "assistant", "content": "저는 도우미입니다."}]},
]


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


def error_of(path: Path, fmt: str) -> str:
    with pytest.raises(DatasetError) as caught:
        load_table(path, fmt)
    assert str(path) in caught.value.message, "the error names the file"
    return caught.value.message


# detect_format


@pytest.mark.parametrize(
    "name, expected",
    [("a.csv", "csv"), ("A.CSV", "csv"), ("a.jsonl", "jsonl"), ("a.ndjson", "jsonl"), ("a.json-lines", "jsonl"), ("a.parquet", "parquet"), ("a.pq", "parquet")],
)
def test_detect_format_by_extension(name, expected):
    assert detect_format(name, b"") == expected


@pytest.mark.parametrize(
    "head, expected",
    [
        (b"PAR1\x15\x04\x15", "parquet"),
        (b'\n{"prompt": "a", "completion": "b"}\n{"prompt": "c"', "jsonl"),
        (b'{"text": "a first line longer than the head', "jsonl"),
        (b"\xef\xbb\xbfid,text\n1,hello\n2,world\n3,cut he", "csv"),
        ('이름,나이\n민지,30\n'.encode(), "csv"),
    ],
)
def test_detect_format_by_content(head, expected):
    assert detect_format("upload.dat", head) == expected


@pytest.mark.parametrize(
    "name, head, reason",
    [
        ("book.xlsx", b"PK\x03\x04\x14\x00\x06\x00", "zip archive"),
        ("data.csv.gz", b"\x1f\x8b\x08\x00", "gzip"),
        ("blob.bin", bytes(range(256)), "binary"),
        ("empty.txt", b"", "empty"),
        ("notes.txt", b"Just some prose\nwithout any delimiters\n", "neither"),
        ("rows.json", b'[{"a": 1},\n{"a": 2}]\n', "neither"),
    ],
)
def test_detect_format_refuses_other_files(name, head, reason):
    with pytest.raises(DatasetError) as caught:
        detect_format(name, head)
    message = caught.value.message
    assert message.startswith(name) and reason in message
    assert "supported formats: csv, jsonl, parquet" in message
    assert caught.value.code == "invalid_dataset" and caught.value.status == 400


# CSV


def test_csv_columns_are_typed_only_when_every_cell_reads_back_exactly(tmp_path):
    path = write(
        tmp_path,
        "t.csv",
        "id,score,ok,zip,phone,note,mixed\n"
        '1,0.5,true,01234,010-1234-5678,"line one\nline two",1\n'
        "2,,FALSE,12345,010-9876-5432,,x\n"
        "-3,2e-3,,00001,02-123-4567,plain,2.5\n",
    )
    table = load_table(path, "csv")
    assert [str(field.type) for field in table.schema] == ["int64", "double", "bool", "string", "string", "string", "string"]
    assert table.column("id").to_pylist() == [1, 2, -3]
    assert table.column("score").to_pylist() == [0.5, None, 0.002]
    assert table.column("ok").to_pylist() == [True, False, None]
    assert table.column("zip").to_pylist() == ["01234", "12345", "00001"], "leading zeros keep a column as text"
    assert table.column("note").to_pylist() == ["line one\nline two", "", "plain"], "empty text cells stay empty strings"


def test_csv_skips_blank_lines_and_a_byte_order_mark(tmp_path):
    path = write(tmp_path, "t.csv", "\ufeffa,b\n\n1,x\n\n2,y\n")
    assert load_table(path, "csv").to_pylist() == [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]


def test_csv_row_with_the_wrong_number_of_fields_names_its_line(tmp_path):
    lines = ["a,b,c", "1,2,3", '"multi\nline",8,9', "", "10,11,12", "13,14,15,16"]
    # physical lines: header 1, rows 2, 3-4 (a quoted line break), blank 5, 6, then 7
    path = write(tmp_path, "t.csv", "\n".join(lines) + "\n")
    assert "line 7: expected 3 fields, got 4" in error_of(path, "csv")


def test_csv_that_is_not_utf8_names_the_line(tmp_path):
    path = write(tmp_path, "t.csv", "name,city\nKim,Seoul\n".encode() + "Lee,부산\n".encode("cp949"))
    message = error_of(path, "csv")
    assert "line 3" in message and "UTF-8" in message


@pytest.mark.parametrize(
    "content, expected",
    [
        ("a,,c\n1,2,3\n", "line 1: column 2 of the header has no name"),
        ("\n\nid,text,id\n1,2,3\n", "line 3: duplicate column names in the header: id"),
        ("a,b\n", "no data rows"),
        ("", "the file is empty"),
        ('a,b\n1,"unterminated\n', "line 2: malformed CSV (unexpected end of data)"),
        ('a,b\n1,"x"y\n', "line 2: malformed CSV"),
    ],
)
def test_csv_errors(tmp_path, content, expected):
    assert expected in error_of(write(tmp_path, "t.csv", content), "csv")


# JSON Lines


def test_jsonl_takes_the_union_of_keys_and_unifies_mixed_types(tmp_path):
    rows = [{"id": 1, "label": 1, "extra": {"k": [1, 2]}}, {"id": 2, "label": "spam"}, {"id": 3, "label": None, "extra": "text", "late": True}]
    path = write(tmp_path, "t.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    table = load_table(path, "jsonl")
    assert table.column_names == ["id", "label", "extra", "late"]
    assert table.column("id").type == pa.int64()
    assert table.column("label").to_pylist() == ["1", "spam", None], "an int and a string in one column become text"
    assert table.column("extra").to_pylist() == ['{"k":[1,2]}', None, "text"]
    assert table.column("late").to_pylist() == [None, None, True]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_nested_chat_rows_survive_a_round_trip(tmp_path, fmt):
    source = write(tmp_path, "chat.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in CHAT))
    table = load_table(source, "jsonl")
    assert pa.types.is_list(table.column("messages").type)
    copy = tmp_path / f"copy.{fmt}"
    write_table(table, copy, fmt)
    again = load_table(copy, fmt)
    assert again.equals(table)
    written = tmp_path / "again.jsonl"
    write_table(again, written, "jsonl")
    assert [json.loads(line) for line in written.read_text(encoding="utf-8").splitlines()] == CHAT


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"a": 1}\n{"a": 2,}\n', "line 2: not valid JSON"),
        ('{"a": 1}\n\n[1, 2]\n', "line 3: expected a JSON object, got an array"),
        ('{"a": 1}\n"text"\n', "line 2: expected a JSON object, got a string"),
        ("\n  \n", "no rows"),
    ],
)
def test_jsonl_errors(tmp_path, content, expected):
    assert expected in error_of(write(tmp_path, "t.jsonl", content), "jsonl")


def test_jsonl_that_is_not_utf8_names_the_line(tmp_path):
    path = write(tmp_path, "t.jsonl", b'{"a": "ok"}\n{"a": "caf\xe9"}\n')
    assert "line 2: not UTF-8" in error_of(path, "jsonl")


# Parquet


def test_truncated_or_foreign_parquet_is_refused(tmp_path):
    whole = tmp_path / "whole.parquet"
    write_table(pa.table({"a": list(range(100)), "b": ["x"] * 100}), whole, "parquet")
    assert load_table(whole, "parquet").num_rows == 100
    truncated = write(tmp_path, "cut.parquet", whole.read_bytes()[: whole.stat().st_size // 2])
    assert "not a readable Parquet file" in error_of(truncated, "parquet")
    foreign = write(tmp_path, "csv.parquet", "a,b\n1,2\n")
    assert "not a readable Parquet file" in error_of(foreign, "parquet")


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="supported formats: csv, jsonl, parquet"):
        load_table(tmp_path / "t.xlsx", "xlsx")
    assert "cannot read" in error_of(tmp_path / "missing.csv", "csv")
    assert FORMATS == ("csv", "jsonl", "parquet")


# Writing


def test_csv_output_writes_nested_values_as_json_text_and_types_read_back(tmp_path):
    table = pa.table({"id": [1, 2], "score": [0.5, None], "ok": [True, False], "messages": [CHAT[0]["messages"], None], "tags": [["a", "b"], []]})
    path = tmp_path / "out.csv"
    write_table(table, path, "csv")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "id,score,ok,messages,tags"
    assert lines[2] == '2,,false,,[]'
    again = load_table(path, "csv")
    assert again.column("id").to_pylist() == [1, 2] and again.column("score").to_pylist() == [0.5, None]
    assert again.column("ok").to_pylist() == [True, False]
    assert json.loads(again.column("messages")[0].as_py()) == CHAT[0]["messages"]
    assert again.column("tags").to_pylist() == ['["a","b"]', "[]"]


def test_writing_is_atomic(tmp_path):
    path = tmp_path / "data.parquet"
    write_table(pa.table({"a": [1]}), path, "parquet")
    before = path.read_bytes()
    with pytest.raises(DatasetError, match="cannot write this table as Parquet"):
        write_table(pa.table({"a": pa.array([{}])}), path, "parquet")  # Parquet cannot hold an empty struct
    assert path.read_bytes() == before, "a failed write leaves the old file as it was"
    assert [p.name for p in tmp_path.iterdir()] == ["data.parquet"], "no temporary file is left behind"


# Quality report


def test_quality_report_numbers():
    table = pa.table({
        "id": [1, 2, 2, None, 5],
        "text": ["ab", "abcd", "abcd", "", "héllo"],
        "tags": [["x"], ["x", "y"], ["x", "y"], None, []],
    })
    table = pa.concat_tables([table, pa.table({"id": pa.array([None], pa.int64()), "text": ["  "], "tags": pa.array([[]], pa.list_(pa.string()))})])
    report = quality_report(table)
    assert json.loads(json.dumps(report)) == report
    assert report["rows"] == 6 and report["duplicate_rows"] == 1 and report["empty_rows"] == 2
    id_column, text, tags = report["columns"]
    assert id_column == {"name": "id", "type": "int64", "nulls": 2, "null_fraction": 2 / 6, "distinct": 3, "length": None}
    # text lengths: 2, 4, 4, 0, 5, 2 -> sorted 0 2 2 4 4 5
    assert text == {"name": "text", "type": "string", "nulls": 0, "null_fraction": 0.0, "distinct": 5,
                    "length": {"min": 0, "p50": 2, "p90": 5, "max": 5, "mean": 2.833}}
    # tags as JSON text: ["x"]=5, ["x","y"]=9 twice, []=2 twice
    assert tags["type"] == "list<item: string>" and tags["nulls"] == 1 and tags["distinct"] == 3
    assert tags["length"] == {"min": 2, "p50": 5, "p90": 9, "max": 9, "mean": 5.4}


# Diff


def test_diff_by_key_reports_added_removed_changed_and_schema():
    old = pa.table({"key": ["a", "b", "c", "d"], "text": ["1", "2", "3", "4"], "gone": [1, 2, 3, 4], "n": [1, 2, 3, 4]})
    new = pa.table({"key": ["b", "c", "d", "e", "f"], "text": ["2", "three", "4", "5", "6"], "n": [2, 3, 4, 5, 6], "added": [0] * 5})
    result = diff_tables(old, new, key="key")
    assert json.loads(json.dumps(result)) == result
    assert result["key"] == "key" and "note" not in result
    assert (result["added"], result["removed"], result["changed"], result["unchanged"]) == (2, 1, 1, 2)
    assert result["rows"] == {"old": 4, "new": 5}
    assert result["samples"] == {"added": ["e", "f"], "removed": ["a"], "changed": ["c"]}
    assert result["schema"] == {
        "added": [{"name": "added", "type": "int64"}],
        "removed": [{"name": "gone", "type": "int64"}],
        "type_changed": [],
    }


def test_diff_uses_a_unique_id_column_on_its_own_and_reports_type_changes():
    old = pa.table({"id": [1, 2, 3], "label": [0, 1, 0]})
    new = pa.table({"id": [1, 2, 3], "label": ["0", "1", "0"]})
    result = diff_tables(old, new)
    assert result["key"] == "id" and result["changed"] == 3
    assert result["schema"]["type_changed"] == [{"name": "label", "old": "int64", "new": "string"}]


def test_diff_without_a_key_compares_rows_as_a_multiset():
    old = pa.table({"id": [1, 1, 2], "text": ["a", "a", "b"]})  # id is not unique: no key
    new = pa.table({"id": [1, 2, 2, 3], "text": ["a", "b", "B", "c"]})
    result = diff_tables(old, new)
    assert result["key"] is None and "one removed plus one added" in result["note"]
    assert (result["added"], result["removed"], result["changed"], result["unchanged"]) == (2, 1, 0, 2)
    assert result["samples"]["added"] == [{"id": 2, "text": "B"}, {"id": 3, "text": "c"}]
    assert result["samples"]["removed"] == [{"id": 1, "text": "a"}]


def test_diff_samples_stop_at_five():
    result = diff_tables(pa.table({"id": [0]}), pa.table({"id": list(range(20))}))
    assert result["added"] == 19 and result["samples"]["added"] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ({"id": [1]}, {"key": [1]}, "key column 'key' is missing from the old table"),
        ({"key": [1]}, {"id": [1]}, "key column 'key' is missing from the new table"),
        ({"key": [1, 1]}, {"key": [1]}, "not unique in the old table: 1 appears more than once"),
        ({"key": [1]}, {"key": ["x", None]}, "empty values in the new table"),
    ],
)
def test_diff_key_errors(old, new, expected):
    with pytest.raises(DatasetError, match=expected):
        diff_tables(pa.table(old), pa.table(new), key="key")


# Split


def test_split_is_deterministic_disjoint_complete_and_sized():
    table = pa.table({"n": list(range(101))})
    ratios = {"train": 0.8, "validation": 0.1, "test": 0.1}
    parts = split_table(table, ratios, seed=7)
    assert {name: part.num_rows for name, part in parts.items()} == {"train": 81, "validation": 10, "test": 10}
    values = [part.column("n").to_pylist() for part in parts.values()]
    assert sorted(sum(values, [])) == list(range(101)), "every row lands in exactly one part"
    assert all(v == sorted(v) for v in values), "rows keep their file order within a part"
    again = split_table(table, ratios, seed=7)
    assert all(again[name].equals(parts[name]) for name in parts)
    other = split_table(table, ratios, seed=8)
    assert not other["test"].equals(parts["test"])


def test_split_sizes_follow_decimal_ratios_and_allow_empty_parts():
    parts = split_table(pa.table({"n": list(range(100))}), {"a": 0.71, "b": 0.29, "c": 0.0}, seed=1)
    assert [part.num_rows for part in parts.values()] == [71, 29, 0]
    assert parts["c"].schema == parts["a"].schema


@pytest.mark.parametrize(
    "ratios, expected",
    [({"train": 0.8, "test": 0.1}, "add up to 1"), ({"train": 1.2, "test": -0.2}, ">= 0"), ({}, "at least one part")],
)
def test_split_rejects_bad_ratios(ratios, expected):
    with pytest.raises(DatasetError, match=expected):
        split_table(pa.table({"n": [1, 2]}), ratios, seed=0)
