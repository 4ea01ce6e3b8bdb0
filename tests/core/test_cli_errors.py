"""Bad input: one line on stderr, exit status 2, no traceback, results left intact."""

from pathlib import Path

import pytest

from fedlora.cli import main


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 2
    assert err.startswith("fedlora: error: "), err
    assert "\n" not in err and "Traceback" not in err
    assert fragment in err, err


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("method=fedprox", "unknown method 'fedprox'"),
        ("bogus_key=1", "unknown config key 'bogus_key'"),
        ("rank=0", "'rank' must be >= 1"),
        (
            "dataset=/nonexistent/data.csv",
            "data file or directory not found: /nonexistent/data.csv",
        ),
        ("model=/nonexistent/model", "model path not found"),
    ],
)
def test_bad_config(capsys, tiny_overrides, override, fragment):
    code, err = run_cli(capsys, "run", *tiny_overrides, override)
    assert_one_line_error(code, err, fragment)


@pytest.mark.parametrize("override", ["method=nope", "rank=0", "dp.target_epsilon=0.01"])
def test_a_bad_config_stops_before_any_run_directory(capsys, tiny_overrides, tmp_path, override):
    out = tmp_path / "fresh"
    code, err = run_cli(capsys, "run", *tiny_overrides, f"output_dir={out}", override)
    assert_one_line_error(code, err, "")
    assert not out.exists()


def test_missing_config_file(capsys):
    code, err = run_cli(capsys, "run", "/nonexistent/config.yaml")
    assert_one_line_error(code, err, "config file not found")


def test_more_clients_than_examples(capsys, tiny_overrides):
    code, err = run_cli(capsys, "run", *tiny_overrides, "max_train_examples=10", "num_clients=20")
    assert_one_line_error(code, err, "num_clients=20 is more than the 10 training examples")


def test_empty_partition(capsys, tiny_overrides):
    code, err = run_cli(
        capsys,
        "run",
        *tiny_overrides,
        "num_clients=30",
        "partition=dirichlet",
        "partition_alpha=0.01",
    )
    assert_one_line_error(code, err, "raise alpha or lower num_clients")


def test_missing_column_and_label_mismatch(capsys, tiny_overrides, tmp_path: Path):
    data = tmp_path / "d.csv"
    data.write_text("sentence,label\n" + "".join(f"text {i},{i % 2}\n" for i in range(40)))
    code, err = run_cli(capsys, "run", *tiny_overrides, f"dataset={data}")
    assert_one_line_error(  # the default text column 'text' is missing
        code, err, f"column 'text' not found in {data}; available columns: sentence, label"
    )
    glue = tmp_path / "glue" / "SST-2"
    glue.mkdir(parents=True)
    (glue / "train.tsv").write_text(
        "sentence\tlabel\n" + "".join(f"a {i}\t{i % 2}\n" for i in range(40))
    )
    (glue / "dev.tsv").write_text(
        "sentence\tlabel\n" + "".join(f"b {i}\t{i % 3}\n" for i in range(9))
    )
    code, err = run_cli(  # a run_name of its own: the failed run above left run_name=t
        capsys,
        "run",
        *tiny_overrides,
        "dataset=sst2",
        f"data_dir={tmp_path / 'glue'}",
        "run_name=sst2",
    )
    assert_one_line_error(  # dev.tsv has a label, 2, that SST-2's train split lacks
        code, err, f"row 3 of {glue / 'dev.tsv'}: unknown label '2'; expected one of 0, 1, negative"
    )


def test_nan_update_is_rejected_and_earlier_results_survive(capsys, tiny_overrides, tmp_path):
    code, _ = run_cli(capsys, "run", *tiny_overrides)
    assert code == 0
    run_dir = (
        Path([o for o in tiny_overrides if o.startswith("output_dir=")][0].split("=", 1)[1]) / "t"
    )
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    code, err = run_cli(
        capsys, "run", *tiny_overrides, "run_name=diverged", "lr=1e30", "optimizer=sgd"
    )
    assert_one_line_error(code, err, "sent a non-finite ")
    assert err.endswith("(training diverged: lower lr)"), err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_existing_run_directory_is_refused(capsys, tiny_overrides):
    assert run_cli(capsys, "run", *tiny_overrides)[0] == 0
    code, err = run_cli(capsys, "run", *tiny_overrides)
    assert_one_line_error(code, err, "already holds results")


def test_a_run_that_failed_on_its_data_can_be_rerun_under_the_same_name(
    capsys, tiny_overrides, tmp_path
):
    """A bad data file stops the run before any metrics row: the same command, fixed, runs
    (its directory holds no results), while a finished run's directory stays protected."""
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,label\n" + "".join(f"text {i},{i % 2}\n" for i in range(40)))
    overrides = [o for o in tiny_overrides if not o.startswith("dataset=")]
    code, err = run_cli(capsys, "run", *overrides, f"dataset={bad}")
    assert_one_line_error(code, err, f"column 'text' not found in {bad}")
    assert run_cli(capsys, "run", *overrides, f"dataset={bad}", "text_column=sentence")[0] == 0
    code, err = run_cli(capsys, "run", *overrides, f"dataset={bad}", "text_column=sentence")
    assert_one_line_error(code, err, "already holds results")


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("device=cuda:99", "device=cuda:99: "),
        ("precision=fp8", "config key 'precision' must be one of fp32, bf16, fp16; got 'fp8'"),
        (
            "quantization=int4",
            "config key 'quantization' must be one of none, int8, nf4, fp4; got 'int4'",
        ),
        ("quantization=int8 method=flora", "method flora folds increments into the frozen weights"),
        ("local_steps=0", "config key 'local_steps' must be > 0, got 0"),
        ("local_epochs=0", "config key 'local_epochs' must be > 0, got 0.0"),
    ],
)
def test_device_precision_and_training_errors_exit_2_in_one_line(
    capsys, tiny_overrides, override, fragment
):
    code, err = run_cli(capsys, "run", *tiny_overrides, *override.split())
    assert_one_line_error(code, err, fragment)
