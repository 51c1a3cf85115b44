"""Reading, normalizing and validating training data.

Three input formats, as JSONL or Parquet, are normalized to chat messages:

- ``{"messages": [{"role", "content"}, ...]}``: an optional system message first,
  then user/assistant turns alternating, ending on the assistant's
- ``{"prompt", "completion"}``
- ``{"instruction", "input", "output"}`` (``input`` may be empty or absent)

Validation reports *every* bad line (1-based) with its reason, not just the first.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel

from loraflow.registry.errors import InvalidArgumentError

Role = Literal["system", "user", "assistant"]
Format = Literal["messages", "prompt_completion", "instruction"]


class Message(BaseModel):
    role: Role
    content: str


class Example(BaseModel):
    """One normalized training example; ``line`` is where it came from (1-based)."""

    messages: list[Message]
    line: int
    format: Format
    label: str | None = None
    tokens: int | None = None  # after the chat template, when validated with a tokenizer
    prompt_tokens: int | None = None  # of the prompt, up to the assistant's header: what the engine counts

    def text(self) -> str:
        return "\n".join(f"{m.role}: {m.content}" for m in self.messages)

    def prompt_text(self) -> str:
        return "\n".join(m.content for m in self.messages[:-1] if m.role == "user")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"messages": [m.model_dump() for m in self.messages]}
        if self.label is not None:
            out["label"] = self.label
        return out


@dataclass(frozen=True)
class LineError:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


class BadLine(Exception):
    """One record that is not a valid example; ``reason`` names the field (the caller adds the line)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TokenCounter(Protocol):
    def __call__(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> int: ...


ACCEPTED_FORMATS = (
    "JSONL (one JSON object per line: 'messages', 'prompt'+'completion' or "
    "'instruction'+'input'+'output') or Parquet with those columns"
)
# Files that are not text: their first bytes say what they are, and what to do instead.
_MAGIC = {
    b"\x1f\x8b": "gzip-compressed: decompress it first (gunzip)",
    b"PK\x03\x04": "a zip archive: extract the file first",
    b"BZh": "bzip2-compressed: decompress it first (bunzip2)",
    b"\xfd7zXZ\x00": "xz-compressed: decompress it first (unxz)",
    b"(\xb5/\xfd": "zstd-compressed: decompress it first (unzstd)",
    b"PAR1": "a Parquet file: name it *.parquet",
}
_BOM = b"\xef\xbb\xbf"


def read_records(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed record or BadLine) for a .jsonl/.json or .parquet file.

    A file that is not readable as one of those at all (compressed, binary, CSV, a broken Parquet
    file) raises InvalidArgumentError saying what it looks like, before any line is read. A UTF-8
    byte-order mark is accepted (like Python's utf-8-sig); a line that is not UTF-8 is a bad line."""
    if not path.is_file():
        raise InvalidArgumentError(f"no such data file: {path}", param="FILE")
    if path.suffix == ".parquet":
        yield from _parquet_records(path)
        return
    _sniff(path)
    with path.open("rb") as fh:
        for i, raw_bytes in enumerate(fh, start=1):
            if i == 1 and raw_bytes.startswith(_BOM):
                raw_bytes = raw_bytes[len(_BOM) :]
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield (
                    i,
                    BadLine(f"not UTF-8 text (byte 0x{raw_bytes[exc.start]:02x} at column {exc.start + 1})"),
                )
                continue
            if not raw.strip():
                yield i, BadLine("empty line")
                continue
            try:
                yield i, json.loads(raw)
            except json.JSONDecodeError as exc:
                yield i, BadLine(f"invalid JSON ({exc.msg} at column {exc.colno})")


def _parquet_records(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise InvalidArgumentError(
            f"{path} is not a readable Parquet file ({exc}); loraflow reads {ACCEPTED_FORMATS}", param="FILE"
        ) from None
    yield from enumerate(rows, start=1)


def _sniff(path: Path) -> None:
    """Refuse a file that is plainly not JSONL: compressed or binary, or CSV/TSV (whose every line
    would otherwise be 'invalid JSON' with no hint why)."""
    with path.open("rb") as fh:
        head = fh.read(65536)
    for magic, what in _MAGIC.items():
        if head.startswith(magic):
            raise InvalidArgumentError(f"{path} is {what}; loraflow reads {ACCEPTED_FORMATS}", param="FILE")
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or json.detect_encoding(head).startswith("utf-16"):
        raise InvalidArgumentError(  # PowerShell's `>` writes UTF-16
            f"{path} is UTF-16 text; save it as UTF-8 (e.g. Out-File -Encoding utf8); "
            f"loraflow reads {ACCEPTED_FORMATS}",
            param="FILE",
        )
    if b"\x00" in head:
        raise InvalidArgumentError(
            f"{path} is a binary file, not text; loraflow reads {ACCEPTED_FORMATS}", param="FILE"
        )
    lines = [line.strip() for line in head.removeprefix(_BOM).decode("utf-8", "replace").splitlines()]
    lines = [line for line in lines if line][:2]
    if lines and all(_looks_delimited(line) for line in lines):
        raise InvalidArgumentError(
            f"{path} looks like CSV or TSV (line 1: {lines[0][:60]!r}); loraflow reads {ACCEPTED_FORMATS}. "
            "Convert it, e.g. with pandas: read_csv(...).to_json(OUT, orient='records', lines=True)",
            param="FILE",
        )


def _looks_delimited(line: str) -> bool:
    """A line that is not JSON but has a CSV/TSV delimiter."""
    if line.startswith(("{", "[")):
        return False
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return any(d in line for d in (",", "\t", ";"))
    return False


def _text(record: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise BadLine(f"missing field '{key}'")
        return ""
    if not isinstance(value, str):
        raise BadLine(f"field '{key}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise BadLine(f"field '{key}' is empty")
    return value


def _check_roles(messages: list[Message]) -> None:
    turns = messages[1:] if messages and messages[0].role == "system" else messages
    if not turns:
        raise BadLine("messages has no user/assistant turns")
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m.role != expected:
            index = i + (len(messages) - len(turns))
            prev = turns[i - 1].role if i else "the start"
            raise BadLine(
                f"bad role order: messages[{index}].role is '{m.role}', expected '{expected}' after {prev}"
            )
    if turns[-1].role != "assistant":
        raise BadLine(f"the last message must be the assistant's, not '{turns[-1].role}'")


def normalize(record: Any, line: int, *, system_prompt: str | None = None) -> Example:
    """Turn one raw record into an Example, or raise BadLine with the reason."""
    if not isinstance(record, dict):
        raise BadLine(f"expected a JSON object, got {type(record).__name__}")
    label = record.get("label", record.get("task"))
    label = str(label) if label is not None else None
    fmt: Format
    if "messages" in record:
        fmt = "messages"
        raw = record["messages"]
        if not isinstance(raw, list) or not raw:
            raise BadLine("field 'messages' must be a non-empty list")
        messages = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict):
                raise BadLine(f"messages[{i}] must be an object with 'role' and 'content'")
            role = m.get("role")
            if role not in ("system", "user", "assistant"):
                raise BadLine(f"messages[{i}].role must be system, user or assistant, got {role!r}")
            if i > 0 and role == "system":
                raise BadLine(f"bad role order: messages[{i}] is a system message; only the first may be")
            content = m.get("content")
            if not isinstance(content, str) or not content.strip():
                raise BadLine(f"messages[{i}].content is missing or empty")
            messages.append(Message(role=role, content=content))
    elif "prompt" in record or "completion" in record:
        fmt = "prompt_completion"
        messages = [
            Message(role="user", content=_text(record, "prompt")),
            Message(role="assistant", content=_text(record, "completion")),
        ]
    elif "instruction" in record or "output" in record:
        fmt = "instruction"
        instruction, extra = _text(record, "instruction"), _text(record, "input", required=False)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [
            Message(role="user", content=prompt),
            Message(role="assistant", content=_text(record, "output")),
        ]
    else:
        keys = ", ".join(sorted(record)) or "none"
        raise BadLine(
            f"unknown format (keys: {keys}); expected 'messages', 'prompt'+'completion' "
            "or 'instruction'+'input'+'output'"
        )
    _check_roles(messages)
    if system_prompt and messages[0].role != "system":
        messages.insert(0, Message(role="system", content=system_prompt))
    return Example(messages=messages, line=line, format=fmt, label=label)


@dataclass
class Validation:
    path: Path
    examples: list[Example] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)
    max_length: int | None = None
    base_model: str | None = None  # whose tokenizer counted the tokens (validate_for_base)
    base_fingerprint: str | None = None

    @property
    def token_lengths(self) -> list[int]:
        return [e.tokens for e in self.examples if e.tokens is not None]

    @property
    def ok(self) -> bool:
        return not self.errors and bool(self.examples)

    @property
    def formats(self) -> Counter[str]:
        return Counter(e.format for e in self.examples)

    def summary(self) -> dict[str, Any]:
        lengths = sorted(self.token_lengths)
        return {
            "file": str(self.path),
            "examples": len(self.examples),
            "bad_lines": len(self.errors),
            "formats": dict(self.formats),
            "labels": dict(Counter(e.label for e in self.examples if e.label is not None)),
            "tokens": token_stats(lengths),
        }


def token_stats(lengths: list[int]) -> dict[str, Any]:
    if not lengths:
        return {"total": 0}
    lengths = sorted(lengths)

    def q(p: float) -> int:
        return lengths[min(len(lengths) - 1, int(p * len(lengths)))]

    return {
        "total": sum(lengths),
        "min": lengths[0],
        "p50": q(0.5),
        "p90": q(0.9),
        "p99": q(0.99),
        "max": lengths[-1],
        "mean": round(sum(lengths) / len(lengths), 2),
    }


def validate_records(
    records: Iterable[tuple[int, Any]],
    source: Path,
    *,
    count_tokens: TokenCounter | None = None,
    max_length: int | None = None,
    system_prompt: str | None = None,
) -> Validation:
    """Check every (line, record); with ``count_tokens``, also refuse examples longer than ``max_length``."""
    result = Validation(path=source, max_length=max_length)
    for line, record in records:
        try:
            if isinstance(record, BadLine):
                raise record
            example = normalize(record, line, system_prompt=system_prompt)
            if count_tokens is not None:
                messages = [m.model_dump() for m in example.messages]
                n = count_tokens(messages)
                if max_length is not None and n > max_length:
                    raise BadLine(f"too many tokens: {n} > max_length {max_length}")
                example.tokens = n
                example.prompt_tokens = count_tokens(messages[:-1], add_generation_prompt=True)
        except BadLine as bad:
            result.errors.append(LineError(line, bad.reason))
            continue
        result.examples.append(example)
    return result


def validate_file(
    path: Path,
    *,
    count_tokens: TokenCounter | None = None,
    max_length: int | None = None,
    system_prompt: str | None = None,
) -> Validation:
    """Check every line of a JSONL/Parquet file."""
    return validate_records(
        read_records(path),
        path,
        count_tokens=count_tokens,
        max_length=max_length,
        system_prompt=system_prompt,
    )


def validate_for_base(
    path: Path, base: str, *, max_length: int, system_prompt: str | None = None
) -> Validation:
    """Validate with the base model's tokenizer and chat template, as training will render it."""
    from loraflow.trainer.model import load_tokenizer, locate_base_model, token_counter

    located = locate_base_model(base)
    tokenizer = load_tokenizer(located)
    result = validate_file(
        path, count_tokens=token_counter(tokenizer), max_length=max_length, system_prompt=system_prompt
    )
    result.base_model, result.base_fingerprint = located.id, located.fingerprint
    return result
