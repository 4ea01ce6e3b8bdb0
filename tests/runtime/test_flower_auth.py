"""SuperNode authentication (Flower 1.41, ``--enable-supernode-auth``): the keys
``fedlora keys make`` writes are the ones Flower reads, and on a real TLS deployment on
loopback only SuperNodes whose public key was registered with ``fedlora keys register``
get in: an unregistered key and a node without a key are refused when they connect, and
the run finishes with the two registered ones."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flower_procs import AuthenticatedFederation, run_bounded
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

from fedlora.cli import main
from fedlora.errors import FedLoraError
from fedlora.outputs import read_metrics
from fedlora.runtime.flower.keys import make_node_keys

REPO = Path(__file__).resolve().parents[2]
FEDLORA = str(Path(sys.executable).parent / "fedlora")
RUN_TIMEOUT = 900.0  # a ClientApp process per message: ~10-60 s each on a busy 2-core box


def test_node_keys_are_what_flower_loads(tmp_path):
    pairs = make_node_keys(tmp_path / "keys", ["org0", "org1"])
    assert [(p.name, q.name) for p, q in pairs] == [
        ("org0.key", "org0.pub"),
        ("org1.key", "org1.pub"),
    ]
    publics = []
    for private_path, public_path in pairs:
        assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
        # As flower-supernode --auth-supernode-private-key and flwr supernode register read them.
        private = load_ssh_private_key(private_path.read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, ec.SECP384R1)
        public = try_load_public_key(public_path)
        assert public == public_key_to_bytes(private.public_key())
        publics.append(public)
    assert publics[0] != publics[1]
    before = pairs[0][0].read_bytes()
    with pytest.raises(FedLoraError, match="org0.key exists"):
        make_node_keys(tmp_path / "keys", ["org2", "org0"])
    assert pairs[0][0].read_bytes() == before
    assert not (tmp_path / "keys" / "org2.key").exists()  # nothing written when one is refused


@pytest.mark.parametrize(
    "argv, message",
    [
        (["keys", "make", "K", "a", "a"], "names must be distinct"),
        (["keys", "make", "K", "../a"], "not a usable file name"),
        (
            [
                "keys",
                "register",
                "--superlink",
                "127.0.0.1:1",
                "--root-certificates",
                "ca.crt",
                "x.pub",
            ],
            "public key file not found: x.pub",
        ),
    ],
)
def test_keys_cli_refuses_bad_input_in_one_line(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_register_needs_the_ca_file(tmp_path, capsys):
    pub = make_node_keys(tmp_path, ["org0"])[0][1]
    argv = ["keys", "register", "--superlink", "127.0.0.1:1", "--root-certificates"]
    assert main([*argv, str(tmp_path / "ca.crt"), str(pub)]) == 2
    assert "root_certificates file not found" in capsys.readouterr().err


def fedlora(args: list[str], fed: AuthenticatedFederation, timeout: float = 120.0) -> str:
    done = run_bounded([FEDLORA, *args], env=fed.env, timeout=timeout, cwd=fed.workdir)
    assert done.returncode == 0, done.stdout[-3000:]
    return str(done.stdout)


@pytest.mark.integration
def test_only_registered_supernodes_take_part(tiny_overrides, tmp_path):
    """TLS + ``--enable-supernode-auth``; org0 and org1 registered, then four SuperNodes:
    org0 (client 0) and org1 (client 1) with their keys, ``intruder`` with a key of its own
    that nobody registered and ``anonymous`` with no key, both claiming client 2. Flower
    refuses both at connect (they exit with Flower's exit code 305, the SuperLink logs
    why) before the run starts; the run (num_clients=2) finishes with clients 0 and 1. Had
    either got in, the run would have failed: the ServerApp asks every connected SuperNode
    its partition-id in round 0, and client 2 is out of range for num_clients=2."""
    certs = tmp_path / "certs"
    subprocess.run(
        ["bash", str(REPO / "scripts" / "make_certs.sh"), str(certs)],
        check=True,
        timeout=60,
        capture_output=True,
    )
    fed = AuthenticatedFederation(tmp_path, certs=certs)
    link = ["--superlink", fed.address, "--root-certificates", str(certs / "ca.crt")]
    fedlora(["keys", "make", "keys", "org0", "org1", "intruder"], fed)
    keys = tmp_path / "keys"
    args = [
        *tiny_overrides,
        "num_clients=2",
        "method=rolora",
        "eval_every=2",
        "head=frozen",
        f"output_dir={tmp_path / 'runs'}",
        "run_name=auth",
        "round_timeout=300",
        "progress=true",
        "runtime=flower",
        f"superlink={fed.address}",
        f"root_certificates={certs / 'ca.crt'}",
    ]
    try:
        fed.start_superlink()
        registered = fedlora(["keys", "register", *link, "keys/org0.pub", "keys/org1.pub"], fed)
        node_ids = re.findall(r"^keys/org[01]\.pub: node (\d+)$", registered, re.M)
        assert len(set(node_ids)) == 2, registered
        fed.start_node("org0", partition=0, private_key=keys / "org0.key")
        fed.start_node("org1", partition=1, private_key=keys / "org1.key")
        intruder = fed.start_node("intruder", partition=2, private_key=keys / "intruder.key")
        anonymous = fed.start_node("anonymous", partition=2, private_key=None)
        assert fed.wait_node_exit(intruder, timeout=180) != 0
        assert fed.wait_node_exit(anonymous, timeout=180) != 0
        done = run_bounded([FEDLORA, "run", *args], env=fed.env, timeout=RUN_TIMEOUT, cwd=tmp_path)
        fed.snapshot()
        # Registering needs nothing but ca.crt: open-source Flower's Control API has no
        # account authentication (docs/deployment.md, "What it does not protect against").
        late = fedlora(["keys", "register", *link, "keys/intruder.pub"], fed)
        listed = fedlora(["keys", "list", *link], fed)
    finally:
        left = fed.stop()
    assert not left, f"processes still alive after stop: {left}"
    assert done.returncode == 0, done.stdout[-4000:]
    assert "round 2/2" in done.stdout

    # Refused at connect, each with Flower's reason; neither ever received a message.
    intruder_log = (tmp_path / "intruder.log").read_text(errors="replace")
    anonymous_log = (tmp_path / "anonymous.log").read_text(errors="replace")
    assert "Exit Code: 305" in intruder_log and "Failed to activate SuperNode" in intruder_log
    assert "Exit Code: 305" in anonymous_log
    assert "All SuperNodes must be registered via the CLI" in anonymous_log
    link_log = (tmp_path / "superlink.log").read_text(errors="replace")
    assert "No SuperNode found with the given public key" in link_log
    for text in (intruder_log, anonymous_log):
        assert "Receiving:" not in text and "[RUN " not in text
    for name in ("org0", "org1"):
        assert "Receiving: train message" in (tmp_path / f"{name}.log").read_text(errors="replace")

    # The SuperLink's list: the two registered nodes online; the refused ones never made it
    # there, until the intruder's key was registered after the run (never connected since).
    (late_id,) = re.findall(r"^keys/intruder\.pub: node (\d+)$", late, re.M)
    status = dict(re.findall(r"^node (\d+): (\w+)$", listed, re.M))
    assert status == {node_ids[0]: "online", node_ids[1]: "online", late_id: "registered"}, listed

    run_dir = tmp_path / "runs" / "auth"
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [r["trained"] for r in rows[1:]] == ["B", "A"]
    assert all(r["clients"] == [0, 1] for r in rows[1:])
    assert set(rows[0]["client_accuracy"]) == set(rows[2]["client_accuracy"]) == {"0", "1"}
    assert not any("failures" in r for r in rows)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["client_train_sizes"]) == {"0", "1"}
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
