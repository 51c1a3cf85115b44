"""Content-addressed artifact store over fsspec.

Layout under the store root::

    sha256/<d[:2]>/<digest>/<file>...      the files, as given
    sha256/<d[:2]>/<digest>/MANIFEST.json  per-file sha256 and size; written last

The digest of a set of files is the sha256 of its ``sha256sum``-style listing
(``"<file sha256>  <name>\\n"`` per file, sorted by name), so it depends only on
the names and the bytes.

Writes are atomic as seen by readers. On a local filesystem the files are
staged in a private folder and renamed into place in one ``rename``. On object
stores, where no rename is atomic, the manifest is the commit marker: it is
written after every file, and an artifact without one does not exist.
Every read verifies each file against the manifest and the manifest against
the digest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraflow.registry.errors import (
    IntegrityError,
    InvalidArgumentError,
    MissingDependencyError,
    NotFoundError,
)

MANIFEST = "MANIFEST.json"
# What a stored file may be called: a plain name in the artifact's own folder. Never a path (a
# manifest naming "../../x" must not write outside the engine cache), never hidden, never MANIFEST.
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_file_name(name: str) -> bool:
    return bool(_FILE_NAME.match(name)) and name != MANIFEST


_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def digest_of(files: dict[str, str]) -> str:
    """Digest of a {name: sha256} listing."""
    listing = "".join(f"{files[name]}  {name}\n" for name in sorted(files))
    return hashlib.sha256(listing.encode()).hexdigest()


@dataclass(frozen=True)
class Stored:
    digest: str
    size_bytes: int
    files: dict[str, str]  # name -> sha256


class ArtifactStore:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        from fsspec.implementations.local import LocalFileSystem  # fsspec: only once a store is opened

        fs, root = filesystem(uri)
        self.fs: Any = fs
        self.root: str = root.rstrip("/")
        self._local = isinstance(fs, LocalFileSystem)
        if self._local:
            try:
                Path(self.root).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise InvalidArgumentError(
                    f"cannot create the artifact store {self.root} ({exc.strerror or exc}); set "
                    "LORAFLOW_HOME (or artifact_uri) to a folder you can write",
                    param="artifact_uri",
                ) from None

    # -- paths -----------------------------------------------------------------
    def _dir(self, digest: str) -> str:
        return f"{self.root}/sha256/{digest[:2]}/{digest}"

    # -- write -----------------------------------------------------------------
    def put(self, src_dir: Path, names: Iterable[str]) -> Stored:
        """Store the named files of ``src_dir``; returns their digest. Idempotent."""
        names = sorted(names)
        for name in names:
            if not check_file_name(name):
                raise InvalidArgumentError(
                    f"cannot store {name!r}: an artifact holds plain file names only", param="name"
                )
        files = {name: sha256_file(src_dir / name) for name in names}
        size = sum((src_dir / name).stat().st_size for name in names)
        digest = digest_of(files)
        stored = Stored(digest=digest, size_bytes=size, files=files)
        if self.exists(digest):
            return stored
        manifest = json.dumps(
            {
                "digest": digest,
                "files": {n: {"sha256": files[n], "size": (src_dir / n).stat().st_size} for n in names},
            },
            indent=2,
            sort_keys=True,
        )
        if self._local:
            self._put_local(src_dir, names, digest, manifest)
        else:
            self._put_remote(src_dir, names, digest, manifest)
        # Guard against the source changing under us between hashing and copying.
        self.verify(digest)
        return stored

    def _put_local(self, src_dir: Path, names: list[str], digest: str, manifest: str) -> None:
        staging = Path(self.root) / ".staging" / uuid.uuid4().hex
        staging.mkdir(parents=True)
        try:
            for name in names:
                shutil.copyfile(src_dir / name, staging / name)
            (staging / MANIFEST).write_text(manifest)
            for path in staging.iterdir():
                with path.open("rb") as fh:
                    os.fsync(fh.fileno())
            final = Path(self._dir(digest))
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(staging, final)
            except OSError:
                # Someone stored the same content first (rename onto a non-empty dir fails).
                if not self.exists(digest):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _put_remote(self, src_dir: Path, names: list[str], digest: str, manifest: str) -> None:
        final = self._dir(digest)
        for name in names:
            self.fs.put_file(str(src_dir / name), f"{final}/{name}")
        with self.fs.open(f"{final}/{MANIFEST}", "w") as fh:  # the commit marker, last
            fh.write(manifest)

    # -- read ------------------------------------------------------------------
    def exists(self, digest: str) -> bool:
        return bool(self.fs.exists(f"{self._dir(digest)}/{MANIFEST}"))

    def manifest(self, digest: str) -> dict[str, Any]:
        path = f"{self._dir(digest)}/{MANIFEST}"
        try:
            manifest: dict[str, Any] = json.loads(self.fs.cat_file(path))  # one request on object stores
        except FileNotFoundError:
            raise NotFoundError(
                f"artifact {digest} is not in the store at {self.uri}", param="digest"
            ) from None
        listed = {name: meta["sha256"] for name, meta in manifest["files"].items()}
        unsafe = sorted(name for name in listed if not check_file_name(name))
        if unsafe:
            raise IntegrityError(
                f"artifact {digest}: its manifest names files that are not plain names: {unsafe}"
            )
        if digest_of(listed) != digest or manifest.get("digest") != digest:
            raise IntegrityError(f"artifact {digest}: manifest does not match its digest")
        return manifest

    def read_bytes(self, digest: str, name: str) -> bytes:
        return self._read_verified(digest, name, self.manifest(digest))

    def _read_verified(self, digest: str, name: str, manifest: dict[str, Any]) -> bytes:
        if name not in manifest["files"]:
            raise NotFoundError(f"artifact {digest} has no file {name!r}", param="name")
        data: bytes = self.fs.cat_file(f"{self._dir(digest)}/{name}")
        if hashlib.sha256(data).hexdigest() != manifest["files"][name]["sha256"]:
            raise IntegrityError(f"artifact {digest}: {name} does not match its sha256")
        return data

    def verify(self, digest: str) -> None:
        """Re-hash every file of an artifact; raise IntegrityError on any mismatch."""
        manifest = self.manifest(digest)
        for name in manifest["files"]:
            self._read_verified(digest, name, manifest)

    def fetch(self, digest: str, dest: Path) -> Path:
        """Materialize an artifact in ``dest`` (created atomically), verifying every byte.

        If ``dest`` already holds a verified copy it is reused.
        """
        manifest = self.manifest(digest)
        if dest.is_dir() and _local_copy_ok(dest, manifest):
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            for name in manifest["files"]:  # the manifest read once, every file checked against it
                (tmp / name).write_bytes(self._read_verified(digest, name, manifest))
            if dest.exists():
                shutil.rmtree(dest)
            with contextlib.suppress(OSError):  # a concurrent fetch of the same digest won
                os.rename(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if not _local_copy_ok(dest, manifest):
            raise IntegrityError(f"artifact {digest}: local copy at {dest} failed verification")
        return dest


def filesystem(uri: str) -> tuple[Any, str]:
    """fsspec's filesystem for ``uri`` (the artifact store, or the traffic store beside it); an
    unknown scheme or a missing backend is a typed error naming the setting."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(uri)
    except ImportError as exc:  # a known scheme whose package is not installed, e.g. s3 without s3fs
        hint = " (pip install 'loraflow[s3]')" if uri.startswith(("s3://", "s3a://")) else ""
        raise MissingDependencyError(f"artifact_uri {uri!r}: {exc}{hint}", param="artifact_uri") from None
    except ValueError as exc:  # "Protocol not known: foo"
        raise InvalidArgumentError(
            f"artifact_uri {uri!r} is not a storage URI fsspec knows ({exc}); use a local folder or "
            "e.g. s3://bucket/prefix",
            param="artifact_uri",
        ) from None
    return fs, str(root)


def _local_copy_ok(path: Path, manifest: dict[str, Any]) -> bool:
    for name, meta in manifest["files"].items():
        file = path / name
        if not file.is_file() or sha256_file(file) != meta["sha256"]:
            return False
    return True
