"""The dataset registry through the admin API and the CLI, on a real stack with each object
store in turn: the embedded filesystem store and a real S3 server process (moto)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.gateway.registry_stores import stack, store_kind, store_settings  # noqa: F401 (each test on both stores)
from tests.gateway.test_model_registry import api, cli

pytestmark = pytest.mark.stack

REVIEWS_V1 = """id,text,label
1,Call me at 010-1234-5678,pos
2,mail kim@example.com now,neg
3,hello world,pos
4,RRN 900101-1234568 and card 4111 1111 1111 1111,neg
5,server 192.168.0.10 key sk-ap-Abc123def456GHI789jkl012,pos
6,"office 02-312-4567, +1 415 555 2671",neg
"""
REVIEWS_V2 = """id,text,label
1,Call me at 010-1234-5678,pos
2,mail kim@example.com now,pos
3,hello world,pos
5,server 192.168.0.10 key sk-ap-Abc123def456GHI789jkl012,pos
6,"office 02-312-4567, +1 415 555 2671",neg
7,a new row,neg
"""


def upload(stack, name: str, path: Path, *extra) -> dict:
    out = cli(stack, "datasets", "upload", name, str(path), "--json", *extra).stdout
    return json.loads(out[out.index("{"):])


def stored_dataset_keys(settings) -> set[str]:
    return {o.key for o in settings.open().list_objects("datasets")}


def test_csv_upload_reports_quality_and_every_kind_of_pii(stack, tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text(REVIEWS_V1)
    row = upload(stack, "reviews", path)
    assert row["version"] == 1 and row["rows"] == 6 and row["format"] == "csv"
    assert row["pii"]["counts"] == {"secret": 1, "kr_rrn": 1, "kr_frn": 0, "kr_brn": 0, "credit_card": 1, "passport": 0,
                                    "email": 1, "ip_address": 1, "phone": 3, "bank_account": 0}
    assert row["pii"]["rows_with_pii"] == 5
    samples = {s["kind"]: s for s in row["pii"]["samples"]}
    assert samples["kr_rrn"] == {"kind": "kr_rrn", "row": 3, "column": "text", "path": "text", "value": "900101-1******"}
    assert "1234568" not in json.dumps(row["pii"])  # the report never repeats the full value
    shown = json.loads(cli(stack, "datasets", "show", "reviews:1", "--json").stdout)
    columns = {c["name"]: c for c in shown["quality"]["columns"]}
    assert columns["id"]["type"] == "int64" and columns["label"]["distinct"] == 2
    assert columns["text"]["length"]["min"] == len("hello world") and shown["quality"]["duplicate_rows"] == 0
    text = cli(stack, "datasets", "show", "reviews:1").stdout
    assert "5 of 6 rows hold personal data" in text and "900101-1******" in text


def test_diff_between_versions_by_id(stack, tmp_path):
    (tmp_path / "v1.csv").write_text(REVIEWS_V1)
    (tmp_path / "v2.csv").write_text(REVIEWS_V2)
    upload(stack, "diffed", tmp_path / "v1.csv")
    upload(stack, "diffed", tmp_path / "v2.csv")
    diff = json.loads(cli(stack, "datasets", "diff", "diffed", "1", "2", "--json").stdout)
    assert (diff["key"], diff["added"], diff["removed"], diff["changed"], diff["unchanged"]) == ("id", 1, 1, 1, 4)
    assert diff["samples"] == {"added": [7], "removed": [4], "changed": [2]}
    whole_rows = api(stack).get("/admin/datasets/diffed/diff", params={"a": 1, "b": 2, "key": "label"})
    assert whole_rows.status_code == 400 and "not unique" in whole_rows.json()["error"]["message"]


def test_masked_copy_is_a_new_version_without_pii(stack, tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": "my email is lee@corp.kr, phone 010-9876-5432"},
                          {"role": "assistant", "content": "Noted."}]},
            {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = upload(stack, "chats", path)
    assert first["pii"]["counts"]["email"] == 1 and first["pii"]["samples"][0]["path"] == "messages[0].content"
    masked = json.loads(cli(stack, "datasets", "mask", "chats:1", "--json").stdout)
    assert masked["version"] == 2 and masked["parent_id"] == first["id"]
    assert masked["derivation"] == "masked from version 1: 1 email, 1 phone"
    assert sum(masked["pii"]["counts"].values()) == 0
    target = tmp_path / "masked.jsonl"
    cli(stack, "datasets", "download", "chats:2", "-o", str(target))
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert lines[0]["messages"][0]["content"] == "my email is [EMAIL], phone [PHONE]" and lines[1] == rows[1]
    again = cli(stack, "datasets", "mask", "chats:2", check=False)
    assert again.returncode == 1 and "has no PII to mask" in again.stderr


def test_split_is_deterministic_complete_and_stored(stack, tmp_path):
    path = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"n": list(range(100)), "text": [f"row {i}" for i in range(100)]}), path)
    upload(stack, "numbers", path)
    first = json.loads(cli(stack, "datasets", "split", "numbers:1", "--seed", "42", "--json").stdout)
    assert {p: v["rows"] for p, v in first["parts"].items()} == {"train": 80, "validation": 10, "test": 10}
    again = json.loads(cli(stack, "datasets", "split", "numbers:1", "--seed", "42", "--json").stdout)
    assert again["id"] == first["id"] and again["parts"] == first["parts"]
    other = json.loads(cli(stack, "datasets", "split", "numbers:1", "--seed", "7", "--json").stdout)
    assert other["parts"]["train"]["sha256"] != first["parts"]["train"]["sha256"]
    seen = []
    for part in ("train", "validation", "test"):
        target = tmp_path / f"{part}.parquet"
        cli(stack, "datasets", "download", "numbers:1", "--split", first["id"], "--part", part, "-o", str(target))
        seen += pq.read_table(target).column("n").to_pylist()
    assert sorted(seen) == list(range(100))
    bad = api(stack).post("/admin/datasets/numbers/versions/1/split", json={"ratios": {"train": 0.5, "test": 0.2}})
    assert bad.status_code == 400 and "must add up to 1, got 0.7" in bad.json()["error"]["message"]


def test_bad_dataset_input_registers_nothing(stack, store_settings, tmp_path):
    before = stored_dataset_keys(store_settings)
    malformed = tmp_path / "malformed.csv"
    malformed.write_text("id,text\n1,fine\n2,too,many\n")
    result = cli(stack, "datasets", "upload", "broken", str(malformed), check=False)
    assert result.returncode == 1 and "malformed.csv: line 3: expected 2 fields, got 3" in result.stderr
    workbook = tmp_path / "sheet.xlsx"
    with zipfile.ZipFile(workbook, "w") as z:
        z.writestr("xl/workbook.xml", "<workbook/>")
    result = cli(stack, "datasets", "upload", "broken", str(workbook), check=False)
    assert result.returncode == 1 and "supported formats: csv, jsonl, parquet" in result.stderr
    lines = tmp_path / "lines.jsonl"
    lines.write_text('{"a": 1}\n{"a": 2\n')
    result = cli(stack, "datasets", "upload", "broken", str(lines), check=False)
    assert result.returncode == 1 and "line 2" in result.stderr
    good = tmp_path / "good.csv"
    good.write_text("a\n1\n")
    result = cli(stack, "datasets", "upload", "broken", str(good), "--sha256", "f" * 64, check=False)
    assert result.returncode == 1 and "expected fff" in result.stderr
    assert api(stack).get("/admin/datasets/broken").status_code == 404
    assert stored_dataset_keys(store_settings) == before


def test_download_matches_the_registered_bytes_and_delete_removes_files(stack, store_settings, tmp_path):
    path = tmp_path / "small.csv"
    path.write_text("a,b\n1,x\n2,y\n")
    row = upload(stack, "small", path)
    target = tmp_path / "copy.csv"
    cli(stack, "datasets", "download", "small:1", "-o", str(target))
    assert target.read_bytes() == path.read_bytes()
    assert f"sha256/{row['sha256']}" in stored_dataset_keys(store_settings)
    cli(stack, "datasets", "delete", "small:1")
    assert f"sha256/{row['sha256']}" not in stored_dataset_keys(store_settings)
    assert httpx.get(f"{stack.root}/admin/datasets/small", headers={"Authorization": f"Bearer {stack.admin_key}"}).status_code == 404
