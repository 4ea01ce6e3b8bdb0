"""SuperNode authentication: per-node key pairs, and registering their public keys.

Flower 1.41's node authentication ("CLI-managed"): the SuperLink, started with
``--enable-supernode-auth`` (TLS required), accepts a SuperNode only if that node's public
key was registered beforehand through its Control API (``flwr supernode register``); each
SuperNode signs every request with its private key (``flower-supernode
--auth-supernode-private-key``), and an unknown key is refused when it connects. The keys
are NIST elliptic-curve keys in OpenSSH format (what ``ssh-keygen -t ecdsa -b 384`` writes
and what Flower's loaders read).

:func:`make_node_keys` writes one key pair per organisation; :func:`register_nodes` puts
public keys on a SuperLink's list with the ``flwr`` CLI, in a scratch Flower configuration
like :func:`fedlora.runtime.flower.deploy.launch` (the user's ``~/.flwr`` is untouched);
:func:`list_nodes` reads that list back. See docs/deployment.md, "Node authentication".
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tomli_w
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedlora.errors import FedLoraError
from fedlora.runtime.flower.deploy import CONNECTION, _call, _fail


def make_node_keys(out_dir: str | Path, names: Sequence[str]) -> list[tuple[Path, Path]]:
    """Write ``out_dir/NAME.key`` (private, mode 600: it stays on that SuperNode) and
    ``out_dir/NAME.pub`` (goes to whoever registers nodes on the SuperLink) for each name.

    P-384 keys, as in Flower's own guide. Existing files are never overwritten: a node
    whose key changes must be registered again.
    """
    if not names:
        raise FedLoraError("keys: give at least one SuperNode name")
    if len(set(names)) != len(names):
        raise FedLoraError(f"keys: SuperNode names must be distinct, got {list(names)}")
    out = Path(out_dir)
    pairs = [(out / f"{name}.key", out / f"{name}.pub") for name in names]
    for name in names:
        if not name or "/" in name or name.startswith("."):
            raise FedLoraError(f"keys: not a usable file name for a SuperNode: {name!r}")
    if taken := [str(p) for pair in pairs for p in pair if p.exists()]:
        raise FedLoraError(f"keys: {taken[0]} exists; not overwriting a node's key")
    out.mkdir(parents=True, exist_ok=True)
    for private_path, public_path in pairs:
        private = ec.generate_private_key(ec.SECP384R1())
        # O_EXCL + mode 600 at creation: the private key is never readable by others.
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(
                private.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.OpenSSH,
                    serialization.NoEncryption(),
                )
            )
        public = private.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        public_path.write_bytes(public + f" {private_path.stem}\n".encode())
    return pairs


def _connection_env(scratch: Path, superlink: str, root_certificates: str | Path) -> dict[str, str]:
    ca = Path(root_certificates)
    if not ca.is_file():
        raise FedLoraError(f"root_certificates file not found: {ca}")
    home = scratch / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    connection = {"address": superlink, "root-certificates": str(ca.resolve())}
    config = {"superlink": {"default": CONNECTION, CONNECTION: connection}}
    (home / "config.toml").write_text(tomli_w.dumps(config))
    return dict(os.environ, FLWR_HOME=str(home))


def register_nodes(
    public_keys: Sequence[str | Path], *, superlink: str, root_certificates: str | Path
) -> dict[str, int]:
    """Register each public key on the SuperLink at ``superlink`` (TLS, verified against
    ``root_certificates``); return {public key file: node id}. The SuperLink must run
    with ``--enable-supernode-auth``, else it admits every node and the list is moot."""
    if not public_keys:
        raise FedLoraError("register: give at least one public key file")
    for key in public_keys:
        if not Path(key).is_file():
            raise FedLoraError(f"register: public key file not found: {key}")
    registered: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="fedlora-flwr-") as scratch:
        env = _connection_env(Path(scratch), superlink, root_certificates)
        for key in public_keys:
            done = _call(
                ["supernode", "register", str(Path(key).resolve()), CONNECTION, "--format", "json"],
                env,
                capture=True,
            )
            try:
                registered[str(key)] = int(json.loads(done.stdout)["node-id"])
            except (ValueError, KeyError, TypeError):
                raise _fail(f"registering {key} on SuperLink {superlink}", done) from None
    return registered


def list_nodes(*, superlink: str, root_certificates: str | Path) -> list[dict[str, Any]]:
    """The SuperNodes registered on the SuperLink, as ``flwr supernode ls --format json``
    reports them (node id, owner, status, ...)."""
    with tempfile.TemporaryDirectory(prefix="fedlora-flwr-") as scratch:
        env = _connection_env(Path(scratch), superlink, root_certificates)
        done = _call(["supernode", "ls", CONNECTION, "--format", "json"], env, capture=True)
    try:
        nodes = json.loads(done.stdout)["nodes"]
    except (ValueError, KeyError, TypeError):
        raise _fail(f"listing the SuperNodes of SuperLink {superlink}", done) from None
    return list(nodes)
