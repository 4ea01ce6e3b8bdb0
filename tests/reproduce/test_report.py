"""``fedlora report``: a fixture of finished runs gives the expected table."""

import json

import yaml

from fedlora.reproduce.report import write_report


def fake_run(path, *, method, seed, accuracies, upload):
    path.mkdir(parents=True)
    config = {"model": "m", "dataset": "d", "method": method, "rank": 2, "seed": seed}
    (path / "config.yaml").write_text(yaml.safe_dump(config | {"run_name": path.name}))
    rows = [
        {"round": t, "accuracy": acc, "upload_bytes": 0 if t == 0 else upload}
        for t, acc in enumerate(accuracies)
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"final_accuracy": accuracies[-1], "best_accuracy": max(accuracies)}
    (path / "summary.json").write_text(json.dumps(summary))


def test_report_table_mean_std_over_seeds(tmp_path):
    fake_run(tmp_path / "a0", method="fedavg", seed=0, accuracies=[0.5, 0.8, 0.7], upload=2e6)
    fake_run(tmp_path / "a1", method="fedavg", seed=1, accuracies=[0.5, 0.6, 0.9], upload=2e6)
    fake_run(tmp_path / "b0", method="rolora", seed=0, accuracies=[0.5, 0.75], upload=1e6)
    (tmp_path / "unfinished").mkdir()  # no summary.json: not a finished run
    text = write_report(tmp_path, title="t")
    assert text == (
        "# t\n\n"
        "Shared by every run: model=m, dataset=d, rank=2.\n\n"
        "| method | seeds | final acc. (%) | best acc. (%) | upload / round (MB) |\n"
        "|---|---|---|---|---|\n"
        "| fedavg | 2 | 80.00 ± 14.14 | 85.00 ± 7.07 | 2.0000 |\n"
        "| rolora | 1 | 75.00 | 75.00 | 1.0000 |\n"
    )
    assert (tmp_path / "report.md").read_text() == text
    assert (tmp_path / "accuracy_per_round.png").is_file()
    assert (tmp_path / "accuracy_vs_upload.png").is_file()


def test_a_key_a_run_predates_is_its_default_not_a_column():
    from pathlib import Path

    from fedlora.reproduce.report import Run, group_runs

    old = {"method": "fedavg", "seed": 0}  # written before `precision` existed
    new = {"method": "fedavg", "seed": 1, "precision": "fp32"}
    rows = [{"round": 0, "accuracy": 0.5, "upload_bytes": 0}]
    varying, groups = group_runs([Run(Path("a"), old, {}, rows), Run(Path("b"), new, {}, rows)])
    assert varying == [] and len(groups) == 1 and len(groups[0][1]) == 2
    bf16 = {"method": "fedavg", "seed": 2, "precision": "bf16"}
    varying, _ = group_runs([Run(Path("a"), old, {}, rows), Run(Path("c"), bf16, {}, rows)])
    assert varying == ["precision"]


def test_shared_line_names_the_local_epochs_that_ran_not_the_ignored_steps(tmp_path):
    for seed in (0, 1):
        fake_run(
            tmp_path / f"r{seed}", method="rolora", seed=seed, accuracies=[0.5, 0.7], upload=1e6
        )
        path = tmp_path / f"r{seed}" / "config.yaml"
        config = yaml.safe_load(path.read_text())
        extra = {"local_steps": 10, "local_epochs": 2.0, "eval_split": "test", "lr": None}
        path.write_text(yaml.safe_dump(config | extra))
    text = write_report(tmp_path, title="t")
    assert (
        "Shared by every run: model=m, dataset=d, method=rolora, rank=2, local_epochs=2.0, eval_split=test.\n"
        in text
    )
