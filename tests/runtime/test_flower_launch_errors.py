"""``runtime=flower`` against a SuperLink that is not there: one clear line, exit status 2."""

from flower_procs import free_port

from fedlora.cli import main


def test_unreachable_superlink_is_one_line(tiny_overrides, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    address = f"127.0.0.1:{free_port()}"  # nothing listens here
    status = main(
        [
            "run",
            *tiny_overrides,
            "runtime=flower",
            f"superlink={address}",
            "insecure=true",
            f"output_dir={tmp_path / 'runs'}",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err[-1].startswith(f"fedlora: error: flwr run on SuperLink {address} failed: ")
    assert "Connection to the SuperLink is unavailable" in err[-1]
    assert "Traceback" not in "\n".join(err)
