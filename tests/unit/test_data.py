"""Normalization and line-by-line validation of training data, without a tokenizer."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from loraflow.registry.errors import InvalidArgumentError
from loraflow.trainer.data import validate_file

pytestmark = pytest.mark.unit


def _write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_three_formats_normalize_to_messages(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "d.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"},
                ]
            },
            {"prompt": "p", "completion": "c", "task": "t1"},
            {"instruction": "do", "input": "this", "output": "done"},
            {"instruction": "do", "output": "done"},
        ],
    )
    v = validate_file(f)
    assert v.ok and not v.errors
    msgs = [[(m.role, m.content) for m in e.messages] for e in v.examples]
    assert msgs[0][0] == ("system", "be brief")
    assert msgs[1] == [("user", "p"), ("assistant", "c")]
    assert msgs[2] == [("user", "do\n\nthis"), ("assistant", "done")]
    assert msgs[3] == [("user", "do"), ("assistant", "done")]
    assert v.examples[1].label == "t1"
    assert dict(v.formats) == {"messages": 1, "prompt_completion": 1, "instruction": 2}


def test_system_prompt_goes_into_every_example_without_one(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "d.jsonl",
        [
            {"prompt": "p", "completion": "c"},
            {
                "messages": [
                    {"role": "system", "content": "own"},
                    {"role": "user", "content": "u"},
                    {"role": "assistant", "content": "a"},
                ]
            },
        ],
    )
    v = validate_file(f, system_prompt="You extract JSON.")
    assert v.examples[0].messages[0].content == "You extract JSON."
    assert v.examples[1].messages[0].content == "own"


def test_every_bad_line_is_reported(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "d.jsonl",
        [
            {"prompt": "ok", "completion": "ok"},
            "[1, 2]",
            "",
            {"messages": []},
            {"messages": [{"role": "bot", "content": "x"}]},
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "system", "content": "late"},
                    {"role": "assistant", "content": "b"},
                ]
            },
            {"messages": [{"role": "assistant", "content": "first"}]},
            {"prompt": 3, "completion": "x"},
            {"instruction": "x", "output": "   "},
        ],
    )
    v = validate_file(f)
    assert not v.ok
    reasons = {e.line: e.reason for e in v.errors}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert "expected a JSON object" in reasons[2]
    assert "empty line" in reasons[3]
    assert "non-empty list" in reasons[4]
    assert "role must be system, user or assistant" in reasons[5]
    assert "only the first may be" in reasons[6]
    assert "messages[0].role is 'assistant', expected 'user'" in reasons[7]
    assert "must be a string" in reasons[8]
    assert "field 'output' is empty" in reasons[9]


def test_parquet_input(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"prompt": "p", "completion": "c"}, {"prompt": "", "completion": "c"}]), path
    )
    v = validate_file(path)
    assert len(v.examples) == 1
    assert [(e.line, e.reason) for e in v.errors] == [(2, "field 'prompt' is empty")]


def test_a_utf8_bom_is_accepted_and_a_line_that_is_not_utf8_is_a_bad_line(tmp_path: Path) -> None:
    good = json.dumps({"prompt": "p", "completion": "c"}).encode()
    f = tmp_path / "d.jsonl"
    f.write_bytes(
        b"\xef\xbb\xbf" + good + b"\n" + b'{"prompt": "caf\xe9", "completion": "c"}\n' + good + b"\n"
    )
    v = validate_file(f)
    assert [e.line for e in v.examples] == [1, 3]
    assert [(e.line, e.reason) for e in v.errors] == [(2, "not UTF-8 text (byte 0xe9 at column 16)")]


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (gzip.compress(b'{"prompt": "p", "completion": "c"}\n'), "gzip-compressed: decompress it first"),
        (b"PK\x03\x04rest of a zip", "a zip archive"),
        (b"PAR1 parquet bytes", "a Parquet file: name it *.parquet"),
        (b'{"prompt": "p"\x00\x00}', "a binary file"),
        (b"prompt,completion\nhi,there\n", "looks like CSV or TSV (line 1: 'prompt,completion')"),
        (b"\xef\xbb\xbfprompt\tcompletion\nhi\tthere\n", "looks like CSV or TSV"),
        ('{"prompt": "p", "completion": "c"}\n'.encode("utf-16"), "UTF-16 text; save it as UTF-8"),
        ('{"prompt": "p", "completion": "c"}\n'.encode("utf-16-le"), "UTF-16 text; save it as UTF-8"),
    ],
)
def test_a_file_that_is_not_jsonl_says_what_it_looks_like(tmp_path: Path, content: bytes, says: str) -> None:
    f = tmp_path / "d.jsonl"
    f.write_bytes(content)
    with pytest.raises(InvalidArgumentError, match="loraflow reads JSONL") as caught:
        validate_file(f)
    assert says in caught.value.message and caught.value.param == "FILE"


def test_one_bad_first_line_is_not_taken_for_csv(tmp_path: Path) -> None:
    f = _write(tmp_path / "d.jsonl", ["oops, a note", {"prompt": "p", "completion": "c"}])
    v = validate_file(f)
    assert [e.line for e in v.errors] == [1] and len(v.examples) == 1


def test_a_broken_parquet_file_is_named(tmp_path: Path) -> None:
    f = tmp_path / "fake.parquet"
    f.write_text("not parquet\n")
    with pytest.raises(InvalidArgumentError, match=r"fake\.parquet is not a readable Parquet file"):
        validate_file(f)
