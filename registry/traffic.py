"""The traffic sink: sampled requests and their feedback, as partitioned JSONL files over fsspec.

Layout under ``Settings.resolved_traffic_uri`` (``traffic/`` beside the artifacts: a local
folder by default, object storage in production)::

    adapter=NAME/date=YYYY-MM-DD/requests-<utc time>-<writer>-<seq>.jsonl
    adapter=NAME/date=YYYY-MM-DD/feedback-<utc time>-<writer>-<seq>.jsonl

Every line is one JSON object: a request record (``request_id``, ``at``, ``adapter``,
``version``, the redacted ``request`` and ``response``, usage, latency, status, ...) or a
feedback record (``request_id``, ``at``, ``rating``, the redacted ``correction`` and
``comment``). Redaction is the store's write boundary: :meth:`TrafficStore.write` takes only
a :class:`RedactedBatch`, and only :meth:`TrafficStore.redact` makes one, by passing the
free-text fields of every record through a redactor (:class:`~loraflow.registry.redact.Redactor`,
built in the gateway's writer process: Presidio never loads in the request path or a plain
CLI command). A file appears whole or not at all (local: written aside and renamed; object
stores: one PUT).

Request ids carry the UTC date they were made on (``req-YYYYMMDD-<hex>``), so a feedback
for a request written by another gateway is found by reading one day's partitions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol, cast

from loraflow.registry.errors import InvalidArgumentError

Kind = Literal["requests", "feedback"]
KINDS: tuple[Kind, ...] = ("requests", "feedback")
_PARTITION = re.compile(r"adapter=(?P<adapter>[^/]+)/date=(?P<date>\d{4}-\d{2}-\d{2})$")
_REQUEST_ID = re.compile(r"^req-(?P<date>\d{8})-[0-9a-f]{32}$")
# The fields of a record that hold what people wrote or models answered: each is redacted whole.
FREE_TEXT: dict[Kind, tuple[str, ...]] = {
    "requests": ("request", "response", "shadow"),  # shadow: a rollout candidate's answer
    "feedback": ("correction", "comment"),
}
_SEALED = object()
log = logging.getLogger(__name__)


_DURATION = re.compile(r"^(?P<n>\d+)(?P<unit>[smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str, *, param: str) -> timedelta:
    """``90s``, ``30m``, ``24h``, ``7d`` or ``2w``."""
    match = _DURATION.match(text.strip())
    if match is None or int(match["n"]) == 0:
        raise InvalidArgumentError(
            f"{param} must be a positive duration such as 30m, 24h or 7d, not {text!r}", param=param
        )
    return timedelta(seconds=int(match["n"]) * _UNITS[match["unit"]])


def new_request_id(now: datetime) -> str:
    return f"req-{now:%Y%m%d}-{uuid.uuid4().hex}"


def request_date(request_id: str) -> date | None:
    """The UTC day a request id was made on, or None if it is not one of ours."""
    match = _REQUEST_ID.match(request_id)
    if match is None:
        return None
    try:
        return datetime.strptime(match["date"], "%Y%m%d").date()
    except ValueError:
        return None


def record_time(record: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(record["at"])


def request_turns(request: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The conversation a recorded request carried: a chat request's messages, or a completion's
    prompt as one user turn; None when it holds neither."""
    messages = request.get("messages")
    if isinstance(messages, list):
        return [m for m in messages if isinstance(m, dict)]
    prompt = request.get("prompt")
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return None


def current_feedback(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Feedback records as they stand: one per request and key, the latest (by ``at``). Every
    record stays in the store, so a rating that was replaced is still there to audit
    (``loraflow traffic show ID``); what counts is the one each key gave last."""
    latest: dict[tuple[str, str | None], dict[str, Any]] = {}
    for record in sorted(records, key=lambda f: str(f["at"])):
        latest[(str(record["request_id"]), record.get("key"))] = record
    return sorted(latest.values(), key=lambda f: str(f["at"]))


def answer_text(record: dict[str, Any]) -> str:
    """The text of a request record's first choice ("" when it has none)."""
    return str(((record.get("response") or [{}])[0]).get("content") or "")


@dataclass(frozen=True)
class Purged:
    files_deleted: int
    records_deleted: int


class ValueRedactor(Protocol):
    """What the store needs of a redactor: :class:`~loraflow.registry.redact.Redactor` is one."""

    def redact_value(self, value: object) -> tuple[object, Counter[str]]: ...


@dataclass(frozen=True)
class CorruptLine:
    """A line of a traffic file that is not a record (a torn write, a disk error): skipped."""

    path: str
    line: int  # 1-based
    reason: str


@dataclass(frozen=True)
class RedactedBatch:
    """Records of one kind as a redactor left them: the only thing :meth:`TrafficStore.write` takes.
    Made by :meth:`TrafficStore.redact`; built any other way it raises ``TypeError``."""

    kind: Kind
    records: tuple[dict[str, Any], ...]
    found: Counter[str]  # PII and secret spans replaced, by class
    dropped: int  # records the redactor failed on: never written
    seal: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.seal is not _SEALED:
            raise TypeError("a RedactedBatch is made by TrafficStore.redact, never by hand")


class TrafficStore:
    def __init__(self, uri: str, *, writer: str | None = None) -> None:
        from fsspec.implementations.local import LocalFileSystem  # only once a store is opened

        from loraflow.registry.artifacts import filesystem

        fs, root = filesystem(uri)
        self.fs: Any = fs
        self.root: str = root.rstrip("/")
        self._local = isinstance(fs, LocalFileSystem)
        self.writer = writer or uuid.uuid4().hex[:8]  # this process: file names never collide
        self._seq = 0
        self.corrupt: list[CorruptLine] = []  # every line reads skipped, with its file and line
        if self._local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def _partition(self, adapter: str, day: date) -> str:
        return f"{self.root}/adapter={adapter}/date={day.isoformat()}"

    # -- writing -----------------------------------------------------------------
    @staticmethod
    def redact(kind: Kind, records: Iterable[dict[str, Any]], redactor: ValueRedactor) -> RedactedBatch:
        """Every record with its :data:`FREE_TEXT` fields redacted and what was found under
        ``redacted``. A record the redactor fails on is dropped (and counted), never written as it
        was: one text Presidio chokes on must not take the batch with it."""
        out: list[dict[str, Any]] = []
        found: Counter[str] = Counter()
        dropped = 0
        for record in records:
            try:
                redacted = dict(record)
                # One walk over all of a record's free text, so a name found after a cue in the
                # request is replaced in the answer too.
                free = {name: record[name] for name in FREE_TEXT[kind] if name in record}
                cleaned, spans = redactor.redact_value(free)
                redacted.update(cast(dict[str, Any], cleaned))
            except Exception:
                log.exception("could not redact a %s record; dropped", kind)
                dropped += 1
                continue
            redacted["redacted"] = dict(spans)
            out.append(_writable(redacted))
            found.update(spans)
        return RedactedBatch(kind=kind, records=tuple(out), found=found, dropped=dropped, seal=_SEALED)

    def write(self, batch: RedactedBatch) -> list[str]:
        """Write a redacted batch (each record with ``adapter`` and ``at``), one file per partition.
        Returns the paths."""
        kind = batch.kind
        groups: dict[tuple[str, date], list[dict[str, Any]]] = defaultdict(list)
        for record in batch.records:
            groups[(record["adapter"], record_time(record).astimezone(UTC).date())].append(record)
        paths = []
        for (adapter, day), group in sorted(groups.items()):
            self._seq += 1
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
            path = f"{self._partition(adapter, day)}/{kind}-{stamp}-{self.writer}-{self._seq:06d}.jsonl"
            self._put(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in group).encode())
            paths.append(path)
        return paths

    def _put(self, path: str, data: bytes) -> None:
        if self._local:  # durable before it is visible: the file, its rename, then the folder
            final = Path(path)
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".{final.name}.tmp")
            with tmp.open("wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            tmp.replace(final)
            folder = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        else:
            self.fs.pipe_file(path, data)

    # -- losses ------------------------------------------------------------------
    def record_loss(self, *, records: int, at: datetime, reason: str) -> str:
        """Note that ``records`` records a gateway accepted were never written (it died with them
        queued): a count under ``_losses/``, so that what is missing is known, not guessed."""
        self._seq += 1
        stamp = at.astimezone(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        day = at.astimezone(UTC).date().isoformat()
        path = f"{self.root}/_losses/date={day}/loss-{stamp}-{self.writer}-{self._seq:06d}.json"
        body = {"at": at.isoformat(), "records": records, "reason": reason}
        self._put(path, json.dumps(body).encode())
        return path

    def losses(self, *, since: datetime | None = None, until: datetime | None = None) -> list[dict[str, Any]]:
        """The losses :meth:`record_loss` noted in ``[since, until)``, oldest first."""
        out = []
        for path in sorted(str(p) for p in self.fs.glob(f"{self.root}/_losses/date=*/loss-*.json")):
            try:
                loss = json.loads(self.fs.cat_file(path))
                at = datetime.fromisoformat(loss["at"])
            except (FileNotFoundError, ValueError, KeyError, TypeError):
                continue
            if (since is None or at >= since) and (until is None or at < until):
                out.append(loss)
        return out

    # -- reading -----------------------------------------------------------------
    def partitions(self, adapter: str | None = None) -> list[tuple[str, date, str]]:
        """(adapter, day, path) of every partition, oldest first."""
        pattern = f"{self.root}/adapter={adapter or '*'}/date=*"
        found = []
        for path in self.fs.glob(pattern):
            match = _PARTITION.search(str(path).rstrip("/"))
            if match:
                found.append((match["adapter"], date.fromisoformat(match["date"]), str(path)))
        return sorted(found, key=lambda p: (p[1], p[0]))

    def _files(self, partition: str, kind: Kind) -> list[str]:
        return sorted(str(p) for p in self.fs.glob(f"{partition}/{kind}-*.jsonl"))

    def _read(self, path: str) -> list[dict[str, Any]]:
        """The records of one file. A line that is not a record is skipped, logged and kept in
        :attr:`corrupt` with its file and line number: one torn file must not stop the flywheel,
        drift or ``traffic show`` from reading the rest."""
        try:
            data: bytes = self.fs.cat_file(path)
        except FileNotFoundError:  # purged meanwhile
            return []
        records = []
        for number, raw in enumerate(data.split(b"\n"), 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
                record_time(record)
            except (ValueError, KeyError, TypeError) as exc:
                reason = f"{type(exc).__name__}: {exc}"[:160]
                self.corrupt.append(CorruptLine(path, number, reason))
                log.warning("traffic file %s line %d is not a record (%s); skipped", path, number, reason)
                continue
            records.append(record)
        return records

    def read(
        self,
        kind: Kind,
        *,
        adapter: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Records of ``kind`` (of one adapter, or all) made in ``[since, until)``."""
        for _, day, partition in self.partitions(adapter):
            if since is not None and day < since.astimezone(UTC).date():
                continue
            if until is not None and day > until.astimezone(UTC).date():
                continue
            for path in self._files(partition, kind):
                for record in self._read(path):
                    at = record_time(record)
                    if (since is None or at >= since) and (until is None or at < until):
                        yield record

    def find_request(self, request_id: str) -> dict[str, Any] | None:
        """The written request record with this id, or None. Reads only the day the id names."""
        day = request_date(request_id)
        if day is None:
            return None
        needle = json.dumps(request_id)
        for _, pday, partition in self.partitions():
            if pday != day:
                continue
            for path in self._files(partition, "requests"):
                for record in self._read(path):
                    if json.dumps(record.get("request_id")) == needle:
                        return record
        return None

    # -- deleting ----------------------------------------------------------------
    def purge(self, *, before: date | None = None, request_ids: Iterable[str] = ()) -> Purged:
        """Delete every partition dated before ``before``, and every record (request or feedback)
        whose ``request_id`` is in ``request_ids``; files holding them are rewritten without them."""
        ids = set(request_ids)
        if before is None and not ids:
            raise InvalidArgumentError("say what to purge: a date, or request ids", param="before")
        files = records = 0
        for _, day, partition in self.partitions():
            if before is not None and day < before:
                for kind in KINDS:
                    for path in self._files(partition, kind):
                        records += len(self._read(path))
                        self.fs.rm_file(path)
                        files += 1
                with contextlib.suppress(FileNotFoundError, OSError):
                    self.fs.rm(partition, recursive=True)
                continue
            if not ids:
                continue
            for kind in KINDS:
                for path in self._files(partition, kind):
                    rows = self._read(path)
                    kept = [r for r in rows if r.get("request_id") not in ids]
                    if len(kept) == len(rows):
                        continue
                    records += len(rows) - len(kept)
                    if kept:
                        self._put(
                            path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept).encode()
                        )
                    else:
                        self.fs.rm_file(path)
                        files += 1
        return Purged(files_deleted=files, records_deleted=records)

    def expired_before(self, retention_days: int, *, today: date | None = None) -> date:
        """The first day still kept under a retention of ``retention_days``."""
        return (today or datetime.now(UTC).date()) - timedelta(days=retention_days - 1)


def _writable(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` as the store can encode it. A lone UTF-16 surrogate (``"\\ud800"`` in an engine's
    JSON) is valid JSON text and a valid Python string, but not Unicode: UTF-8 cannot encode it,
    and the write of the whole batch would fail with it. It becomes U+FFFD here."""
    try:
        json.dumps(record, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        cleaned = _no_surrogates(record)
        assert isinstance(cleaned, dict)
        return cleaned
    return record


def _no_surrogates(value: object) -> object:
    if isinstance(value, str):
        return "".join("\ufffd" if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in value)
    if isinstance(value, dict):
        return {_no_surrogates(k): _no_surrogates(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_no_surrogates(v) for v in value]
    return value
