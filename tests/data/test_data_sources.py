"""Loaders: packaged BBC News, GLUE and AG News beside the repo, fixture files, the hub path."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import pytest

from fedlora.data import TextExamples, label_histogram, load_text_dataset
from fedlora.errors import FedLoraError

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
# CI clones the repository with ../shared beside it: missing data is a failure, not a skip.
needs_shared = pytest.mark.usefixtures()


def write_tsv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(header)] + ["\t".join(str(c) for c in row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- BBC News (packaged)


@pytest.fixture(scope="module")
def bbc():
    return load_text_dataset(name="bbc-news")


def test_bbc_news_counts_labels_and_stratified_split(bbc):
    assert bbc.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(bbc.train) + len(bbc.test) == 2225
    total = [510, 386, 417, 511, 401]
    for n, n_test, n_train in zip(
        total, label_histogram(bbc.test, 5), label_histogram(bbc.train, 5), strict=True
    ):
        assert n_test + n_train == n
        assert abs(n_test - n * 0.2) <= 2  # duplicated articles move as one
    # The title is the first line of the article.
    assert any(
        t.startswith("Ad sales boost Time Warner profit\n") for t in bbc.train.text + bbc.test.text
    )


def test_bbc_news_split_keeps_duplicate_articles_on_one_side():
    ds = load_text_dataset(name="bbc-news", group_column="file")
    files = (ds.train.groups or []) + (ds.test.groups or [])
    assert len(set(files)) == 2225 and "business/001.txt" in files
    assert len(set(ds.train.text + ds.test.text)) == 2127  # the corpus repeats 98 articles
    assert not set(ds.train.text) & set(ds.test.text)


def test_bbc_news_split_is_deterministic_and_seeded(bbc):
    again = load_text_dataset(name="bbc-news")
    assert again.test.text == bbc.test.text and again.train.labels == bbc.train.labels
    other = load_text_dataset(name="bbc-news", seed=1, test_fraction=0.5)
    assert len(other.test) == sum(round(n * 0.5) for n in [510, 386, 417, 511, 401])
    assert set(other.test.text) != set(bbc.test.text)


def test_max_examples_subsample_keeps_label_proportions(bbc):
    small = load_text_dataset(name="bbc-news", max_train_examples=100, max_test_examples=50)
    assert (len(small.train), len(small.test)) == (100, 50)
    full_share = [n / len(bbc.train) for n in label_histogram(bbc.train, 5)]
    for n, share in zip(label_histogram(small.train, 5), full_share, strict=True):
        assert abs(n - 100 * share) < 1
    assert set(small.train.text) <= set(bbc.train.text)
    again = load_text_dataset(name="bbc-news", max_train_examples=100, max_test_examples=50)
    assert again.train.text == small.train.text


# ---------------------------------------------------------------- GLUE and AG News (shared)


@needs_shared
def test_sst2_from_local_glue_directory():
    ds = load_text_dataset(name="sst2", data_dir=str(SHARED / "glue"))
    assert ds.label_names == ["negative", "positive"]
    assert len(ds.test) == 872 and label_histogram(ds.test, 2) == [428, 444]
    assert len(ds.train) == 67349 and label_histogram(ds.train, 2) == [29780, 37569]
    assert ds.train.text_pair is None
    small = load_text_dataset(name="sst2", data_dir=str(SHARED), max_train_examples=1000)
    assert label_histogram(small.train, 2) == [442, 558]  # 1000 * 29780 / 67349 = 442.2
    assert len(small.test) == 872


@needs_shared
def test_sst2_eval_split_test_reads_the_labelled_test_file():
    ds = load_text_dataset(name="sst2", data_dir=str(SHARED / "glue"), eval_split="test")
    # ../shared/data/README.md: 1,821 sentences, 917 negative / 904 positive
    assert len(ds.test) == 1821 and label_histogram(ds.test, 2) == [917, 904]
    assert ds.test.text[0] == "uneasy mishmash of styles and genres ." and len(ds.train) == 67349
    with pytest.raises(FedLoraError, match=r"eval_split=test needs .*RTE/test.tsv"):
        load_text_dataset(name="rte", data_dir=str(SHARED / "glue"), eval_split="test")
    with pytest.raises(FedLoraError, match=r"eval_split=test needs a GLUE task read from data_dir"):
        load_text_dataset(name="bbc-news", eval_split="test")


@needs_shared
def test_rte_pairs_and_integer_labels():
    ds = load_text_dataset(name="rte", data_dir=str(SHARED / "glue"))
    assert ds.label_names == ["entailment", "not_entailment"]
    assert (len(ds.train), len(ds.test)) == (2490, 277)
    assert label_histogram(ds.train, 2) == [1249, 1241]
    assert ds.train.text_pair is not None and len(ds.train.text_pair) == 2490
    assert ds.train.text[0] == "No Weapons of Mass Destruction Found in Iraq Yet."
    assert ds.train.text_pair[0] == "Weapons of Mass Destruction Found in Iraq."


@needs_shared
def test_qnli_dev_only_is_split_deterministically():
    ds = load_text_dataset(name="qnli", data_dir=str(SHARED / "glue"), test_fraction=0.2)
    assert len(ds.train) + len(ds.test) == 5463
    assert label_histogram(ds.test, 2) == [round(2702 * 0.2), round(2761 * 0.2)]
    assert ds.train.text_pair is not None and ds.test.text_pair is not None
    pairs = lambda e: set(zip(e.text, e.text_pair, strict=True))  # noqa: E731
    assert not pairs(ds.train) & pairs(ds.test)
    assert load_text_dataset(name="qnli", data_dir=str(SHARED / "glue")).test == ds.test
    reseeded = load_text_dataset(name="qnli", data_dir=str(SHARED / "glue"), seed=3)
    assert reseeded.test.text != ds.test.text


@needs_shared
@pytest.mark.parametrize("data_dir", [SHARED, SHARED / "agnews"])
def test_ag_news_from_headerless_tsv(data_dir):
    ds = load_text_dataset(name="ag_news", data_dir=str(data_dir))
    assert ds.label_names == ["World", "Sports", "Business", "Sci/Tech"]
    assert label_histogram(ds.train, 4) == [2509, 2458, 2496, 2538]
    assert label_histogram(ds.test, 4) == [1900] * 4


# ---------------------------------------------------------------- GLUE layout fixtures


def test_mnli_fixture_string_labels_quotes_and_groups(tmp_path):
    header = ["index", "genre", "sentence1", "sentence2", "gold_label"]
    rows = [
        [0, "fiction", 'He said "hi', "He spoke.", "entailment"],
        [1, "fiction", "A cat sat.", "A dog sat.", "contradiction"],
        [2, "travel", "Rome is old.", "Rome is a city.", "neutral"],
        [3, "travel", "It rained.", "It was dry.", "contradiction"],
    ]
    write_tsv(tmp_path / "MNLI" / "train.tsv", header, rows)
    write_tsv(tmp_path / "MNLI" / "dev_matched.tsv", header, rows[:3])
    ds = load_text_dataset(name="mnli", data_dir=str(tmp_path), group_column="genre")
    assert ds.label_names == ["entailment", "neutral", "contradiction"]
    assert ds.train.labels == [0, 2, 1, 2]
    assert ds.train.text[0] == 'He said "hi'  # QUOTE_NONE: a quote mark is just a character
    assert ds.train.text_pair == ["He spoke.", "A dog sat.", "Rome is a city.", "It was dry."]
    assert ds.train.groups == ["fiction", "fiction", "travel", "travel"]
    assert len(ds.test) == 3


def test_qqp_and_rte_with_glue_string_labels(tmp_path):
    header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    rows = [[i, 2 * i, 2 * i + 1, f"q{i}?", f"p{i}?", i % 2] for i in range(6)]
    write_tsv(tmp_path / "QQP" / "train.tsv", header, rows)
    write_tsv(tmp_path / "QQP" / "dev.tsv", header, rows[:2])
    qqp = load_text_dataset(name="qqp", data_dir=str(tmp_path))
    assert qqp.label_names == ["not_duplicate", "duplicate"]
    assert qqp.train.labels == [0, 1, 0, 1, 0, 1] and qqp.train.text_pair == [
        f"p{i}?" for i in range(6)
    ]
    labels = ["entailment", "not_entailment"]
    rte_rows = [[f"s{i}", f"h{i}", labels[i % 2], i] for i in range(4)]
    for split in ("train", "dev"):
        write_tsv(
            tmp_path / "RTE" / f"{split}.tsv", ["sentence1", "sentence2", "label", "idx"], rte_rows
        )
    assert load_text_dataset(name="rte", data_dir=str(tmp_path)).test.labels == [0, 1, 0, 1]


# ---------------------------------------------------------------- user files


def test_csv_file_with_string_labels_and_pairs_is_split(tmp_path):
    lines = ["premise,hypothesis,stance"] + [
        f'"text {i}, with a comma",hyp {i},{"pro" if i % 3 else "anti"}' for i in range(30)
    ]
    (tmp_path / "stance.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    ds = load_text_dataset(
        name=str(tmp_path / "stance.csv"),
        text_column="premise",
        text_pair_column="hypothesis",
        label_column="stance",
        test_fraction=0.3,
    )
    assert ds.name == "stance"
    assert ds.label_names == ["anti", "pro"]
    assert (len(ds.train), len(ds.test)) == (21, 9)
    assert label_histogram(ds.test, 2) == [3, 6]
    text_to_pair = dict(zip(ds.train.text, ds.train.text_pair or [], strict=True))
    assert text_to_pair["text 4, with a comma"] == "hyp 4"


def test_tsv_file_relative_to_data_dir(tmp_path):
    write_tsv(tmp_path / "reviews.tsv", ["text", "label"], [[f"r{i}", i % 2] for i in range(10)])
    ds = load_text_dataset(name="reviews.tsv", data_dir=str(tmp_path), test_fraction=0.2)
    assert ds.label_names == ["0", "1"] and (len(ds.train), len(ds.test)) == (8, 2)


def test_directory_of_jsonl_files_with_numeric_labels(tmp_path):
    def write(split: str, labels: list[int]) -> None:
        rows = [
            {"text": f"{split} {i}", "label": y, "user": f"u{i % 3}"} for i, y in enumerate(labels)
        ]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")

    write("train", [10, 3, 10, 3, 10])
    write("dev", [3, 10])
    ds = load_text_dataset(name=str(tmp_path), group_column="user")
    assert ds.label_names == ["3", "10"]  # numeric order, not string order
    assert ds.train.labels == [1, 0, 1, 0, 1] and ds.test.labels == [0, 1]
    assert ds.train.groups == ["u0", "u1", "u2", "u0", "u1"]
    assert ds.test.text == ["dev 0", "dev 1"]


def test_text_examples_select_and_length_check():
    ex = TextExamples(text=["a", "b", "c"], labels=[0, 1, 0], groups=["x", "y", "z"])
    picked = ex.select([2, 0])
    assert (picked.text, picked.labels, picked.groups, len(picked)) == (
        ["c", "a"],
        [0, 0],
        ["z", "x"],
        2,
    )
    with pytest.raises(ValueError, match="^labels has 2 entries, text has 1$"):
        TextExamples(text=["a"], labels=[0, 1])


# ---------------------------------------------------------------- errors


def test_unknown_name_lists_known_datasets():
    with pytest.raises(FedLoraError, match=r"unknown dataset 'imdb'.*sst2.*ag_news"):
        load_text_dataset(name="imdb")


def test_missing_file_and_directory_are_named(tmp_path):
    with pytest.raises(FedLoraError, match=r"not found: .*nope\.csv"):
        load_text_dataset(name=str(tmp_path / "nope.csv"))
    with pytest.raises(FedLoraError, match=r"not found: .*SST-2.*dev\.tsv"):
        load_text_dataset(name="sst2", data_dir=str(tmp_path))
    with pytest.raises(FedLoraError, match=r"not found: .*agnews|not found: .*dev\.tsv"):
        load_text_dataset(name="ag_news", data_dir=str(tmp_path))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FedLoraError, match=r"no train\.csv.*empty_dir"):
        load_text_dataset(name=str(tmp_path / "empty_dir"))


def test_missing_column_names_column_file_and_available(tmp_path):
    write_tsv(tmp_path / "d.tsv", ["body", "label", "who"], [["x", 0, "a"], ["y", 1, "b"]])
    with pytest.raises(
        FedLoraError, match=r"column 'text' not found in .*d\.tsv.*body, label, who"
    ):
        load_text_dataset(name=str(tmp_path / "d.tsv"))
    with pytest.raises(FedLoraError, match=r"column 'stars' not found"):
        load_text_dataset(name=str(tmp_path / "d.tsv"), text_column="body", label_column="stars")
    with pytest.raises(FedLoraError, match=r"column 'region' not found"):
        load_text_dataset(name=str(tmp_path / "d.tsv"), text_column="body", group_column="region")
    with pytest.raises(FedLoraError, match=r"column 'nope' not found in .*bbcnews"):
        load_text_dataset(name="bbc-news", group_column="nope")


def test_empty_data_set(tmp_path):
    (tmp_path / "header_only.csv").write_text("text,label\n")
    with pytest.raises(FedLoraError, match=r"no examples in .*header_only\.csv"):
        load_text_dataset(name=str(tmp_path / "header_only.csv"))
    (tmp_path / "blank.csv").write_text("")
    with pytest.raises(FedLoraError, match=r"empty data file: .*blank\.csv"):
        load_text_dataset(name=str(tmp_path / "blank.csv"))


def test_label_sets_differing_between_train_and_test(tmp_path):
    write_tsv(tmp_path / "train.tsv", ["text", "label"], [["a", "x"], ["b", "y"], ["c", "z"]])
    write_tsv(tmp_path / "test.tsv", ["text", "label"], [["d", "x"], ["e", "y"]])
    with pytest.raises(FedLoraError, match=r"label sets differ.*\['x', 'y', 'z'\].*\['x', 'y'\]"):
        load_text_dataset(name=str(tmp_path))


def test_bad_labels_and_unsplittable_classes(tmp_path):
    write_tsv(tmp_path / "SST-2" / "train.tsv", ["sentence", "label"], [["a", 0], ["b", "maybe"]])
    write_tsv(tmp_path / "SST-2" / "dev.tsv", ["sentence", "label"], [["a", 0]])
    with pytest.raises(FedLoraError, match=r"row 2 of .*train\.tsv: unknown label 'maybe'"):
        load_text_dataset(name="sst2", data_dir=str(tmp_path))
    write_tsv(tmp_path / "one.tsv", ["text", "label"], [["a", "x"], ["b", "x"], ["c", "y"]])
    with pytest.raises(FedLoraError, match=r"label 'y' has only 1 distinct example"):
        load_text_dataset(name=str(tmp_path / "one.tsv"))


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_bad_test_fraction(fraction):
    with pytest.raises(
        FedLoraError,
        match=rf"^test_fraction must be between 0 and 1 \(exclusive\), got {fraction}$",
    ):
        load_text_dataset(name="bbc-news", test_fraction=fraction)


# ---------------------------------------------------------------- HuggingFace hub (mocked)


def test_glue_from_hub_uses_validation_split(monkeypatch):
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append(args)
        split = lambda n: datasets.Dataset.from_dict(  # noqa: E731
            {
                "premise": [f"p{i}" for i in range(n)],
                "hypothesis": [f"h{i}" for i in range(n)],
                "label": [i % 3 for i in range(n)],
                "idx": list(range(n)),
            }
        )
        return {"train": split(6), "validation_matched": split(3), "test_matched": split(3)}

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_text_dataset(name="mnli")
    assert calls == [("glue", "mnli")]
    assert ds.label_names == ["entailment", "neutral", "contradiction"]
    assert ds.train.labels == [0, 1, 2, 0, 1, 2] and ds.test.text == ["p0", "p1", "p2"]
    assert ds.test.text_pair == ["h0", "h1", "h2"]


def test_ag_news_from_hub(monkeypatch):
    def fake_load_dataset(*args, **kwargs):
        assert args == ("ag_news",)
        split = datasets.Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [0, 1, 2, 3]})
        return {"train": split, "test": split}

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_text_dataset(name="ag_news")
    assert Counter(ds.train.labels) == Counter({0: 1, 1: 1, 2: 1, 3: 1})


def test_hub_failure_becomes_one_line_fedlora_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError(
            "Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)\nmore"
        )

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FedLoraError) as info:
        load_text_dataset(name="sst2")
    message = str(info.value)
    assert message.startswith(
        "could not load GLUE 'sst2' from the HuggingFace hub (ConnectionError"
    )
    assert message.endswith("set data_dir to a local GLUE directory") and "\n" not in message
    with pytest.raises(FedLoraError, match=r"could not load 'ag_news'.*set data_dir"):
        load_text_dataset(name="ag_news")


def test_train_file_takes_its_dev_sibling(tmp_path):
    folder = tmp_path / "reviews"
    write_tsv(folder / "train.tsv", ["text", "label"], [["a", "x"], ["b", "y"], ["c", "x"]])
    write_tsv(folder / "dev.tsv", ["text", "label"], [["d", "y"], ["e", "x"]])
    for name in (folder / "train.tsv", folder):
        ds = load_text_dataset(name=str(name))
        assert ds.name == "reviews"
        assert ds.train.text == ["a", "b", "c"] and ds.test.text == ["d", "e"]


# ---------------------------------------------------------------- file encodings


def write_latin1_csv(path: Path) -> bytes:
    rows = [f"{word} {i},{'hot' if i % 2 else 'cold'}" for i in range(10) for word in ["café"]]
    data = ("text,label\n" + "\n".join(rows) + "\n").encode("latin-1")
    path.write_bytes(data)
    return data


def test_non_utf8_file_names_the_encoding_key_and_where(tmp_path):
    data = write_latin1_csv(tmp_path / "menu.csv")
    with pytest.raises(FedLoraError) as info:
        load_text_dataset(name=str(tmp_path / "menu.csv"))
    message = str(info.value)
    offset = data.index(b"\xe9")
    assert f"menu.csv is not valid utf-8 text (byte 0xe9 at offset {offset}, line 2)" in message
    assert message.endswith("set encoding=<its encoding>, e.g. encoding=latin-1")
    assert "\n" not in message


def test_encoding_key_reads_latin1_and_utf16_files(tmp_path):
    write_latin1_csv(tmp_path / "menu.csv")
    ds = load_text_dataset(name=str(tmp_path / "menu.csv"), encoding="latin-1")
    assert sorted(ds.train.text + ds.test.text) == sorted(f"café {i}" for i in range(10))
    rows = [{"text": f"naïve {i}", "label": i % 2} for i in range(6)]
    utf16 = tmp_path / "notes.jsonl"
    utf16.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), "utf-16")
    with pytest.raises(FedLoraError, match=r"byte 0xff at offset 0.*e\.g\. encoding=utf-16$"):
        load_text_dataset(name=str(utf16))
    ds = load_text_dataset(name=str(utf16), encoding="utf-16", test_fraction=0.34)
    assert sorted(ds.train.text + ds.test.text) == [f"naïve {i}" for i in range(6)]


def test_utf8_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    # Excel's "CSV UTF-8" starts with a BOM; it must not rename column 'text' to '\ufefftext'.
    path = tmp_path / "excel.csv"
    path.write_text("text,label\n" + "".join(f"é{i},{i % 2}\n" for i in range(6)), "utf-8-sig")
    ds = load_text_dataset(name=str(path), test_fraction=0.34)
    assert sorted(ds.train.text + ds.test.text) == [f"é{i}" for i in range(6)]


def test_local_glue_copy_uses_the_encoding(tmp_path):
    rows = [[f"crème {i}", i % 2] for i in range(6)]
    for split in ("train", "dev"):
        path = tmp_path / "SST-2" / f"{split}.tsv"
        write_tsv(path, ["sentence", "label"], rows)
        path.write_bytes(path.read_text("utf-8").encode("cp1252"))
    with pytest.raises(FedLoraError, match=r"SST-2.dev\.tsv is not valid utf-8 text .*encoding="):
        load_text_dataset(name="sst2", data_dir=str(tmp_path))
    ds = load_text_dataset(name="sst2", data_dir=str(tmp_path), encoding="cp1252")
    assert ds.train.text[0] == "crème 0"


def test_causal_files_use_the_encoding(tmp_path):
    from fedlora.data.causal import is_causal_source, load_causal_dataset

    records = [{"instruction": f"Décris {i}", "output": f"Voilà {i}"} for i in range(4)]
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_bytes(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in records).encode("latin-1")
    )
    text = tmp_path / "docs.txt"
    text.write_bytes("Über eins.\r\n\r\nÜber zwei.\r\n".encode("latin-1"))
    for path in (jsonl, text):
        assert is_causal_source(str(path))  # sniffing never fails on a byte
        with pytest.raises(FedLoraError, match=r"is not valid utf-8 text.*encoding=latin-1$"):
            load_causal_dataset(str(path))
    data = load_causal_dataset(str(jsonl), encoding="latin-1", test_fraction=0.25)
    assert sorted(data.train.text_pair + data.test.text_pair) == [f"Voilà {i}" for i in range(4)]
    docs = load_causal_dataset(str(text), encoding="latin-1", test_fraction=0.5)
    assert sorted(docs.train.text_pair + docs.test.text_pair) == ["Über eins.", "Über zwei."]
    assert is_causal_source(str(jsonl), encoding="no-such-codec") is False


def test_unknown_encoding_in_the_loader_is_one_line(tmp_path):
    write_latin1_csv(tmp_path / "menu.csv")
    for name in ("no-such-codec", "rot13"):
        with pytest.raises(FedLoraError, match=f"encoding.*{name}") as info:
            load_text_dataset(name=str(tmp_path / "menu.csv"), encoding=name)
        assert "\n" not in str(info.value)
