"""Start a Flower SuperLink and SuperNodes on 127.0.0.1 for a test, and stop them all.

Every process is stopped by its id: the ones this module starts, and every descendant
they started (Flower's SuperExec, ServerApp and ClientApp processes), found with psutil
before the parents are stopped.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_env(home: Path) -> dict[str, str]:
    return dict(
        os.environ,
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # flower-superexec, flwr-*
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        HF_HUB_OFFLINE="1",
    )


def _tree(pid: int) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


class LocalFederation:
    """A SuperLink and ``num_nodes`` SuperNodes (``partition-id`` 0..n-1) on loopback."""

    def __init__(self, workdir: Path, *, num_nodes: int, certs: Path | None = None) -> None:
        self.workdir = workdir
        self.env = flower_env(workdir / "flwr-home")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.certs = certs
        self.num_nodes = num_nodes
        self.procs: list[subprocess.Popen[bytes]] = []  # the SuperLink, then the SuperNodes
        self.node_ports: list[int] = []  # each SuperNode's port for its ClientApp processes
        self.seen: set[int] = set()  # every pid started here or below

    def _start(self, name: str, args: list[str]) -> None:
        log = (self.workdir / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        self.procs.append(proc)
        self.seen.add(proc.pid)

    def start(self, timeout: float = 90.0) -> None:
        if self.certs is None:
            tls_link, tls_node = ["--insecure"], ["--insecure"]
        else:
            tls_link = [
                "--ssl-ca-certfile",
                str(self.certs / "ca.crt"),
                "--ssl-certfile",
                str(self.certs / "server.pem"),
                "--ssl-keyfile",
                str(self.certs / "server.key"),
            ]
            tls_node = ["--root-certificates", str(self.certs / "ca.crt")]
        self._start(
            "superlink",
            [
                "flower-superlink",
                *tls_link,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--disable-runtime-dependency-installation",
            ],
        )
        self.wait_for_port(self.port, timeout)
        for i in range(self.num_nodes):
            self.node_ports.append(free_port())
            self._start(
                f"supernode{i}",
                [
                    "flower-supernode",
                    *tls_node,
                    "--superlink",
                    self.address,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.node_ports[i]),
                    "--node-config",
                    f"partition-id={i} num-partitions={self.num_nodes}",
                ],
            )

    def wait_for_port(self, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a Flower process exited early; see logs in {self.workdir}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.3)
        raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")

    def snapshot(self) -> None:
        """Remember every descendant now alive (ServerApp/ClientApp processes come and go)."""
        for proc in self.procs:
            self.seen.update(_tree(proc.pid))

    def kill_node(self, i: int) -> list[int]:
        """SIGKILL SuperNode ``i`` and every descendant, as if its machine vanished.

        The tree is frozen first (SIGSTOP, until no new descendant appears) so that no
        ClientApp started in the meantime escapes. Returns the pids killed.
        """
        node = self.procs[1 + i]
        frozen: list[int] = []
        while new := [p for p in [node.pid, *_tree(node.pid)] if p not in frozen]:
            for pid in new:
                try:
                    os.kill(pid, signal.SIGSTOP)
                except ProcessLookupError:
                    pass
            frozen += new
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node.wait(timeout=10)
        self.seen.update(frozen)
        if alive := _wait_gone(frozen, timeout=10):
            raise RuntimeError(f"SuperNode {i}: processes {alive} survived SIGKILL")
        return frozen

    def processes_of_node(self, i: int) -> list[int]:
        """Every process on this machine that talks to SuperNode ``i``'s ClientApp port
        (its SuperExec and ClientApps), wherever it hangs in the process tree."""
        address = f"127.0.0.1:{self.node_ports[i]}"
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if any(address in arg for arg in cmdline) and _alive(proc.info["pid"]):
                found.append(proc.info["pid"])
        return found

    def stop(self) -> list[int]:
        """SIGTERM each started process (SuperNodes first), SIGKILL what is left; by pid.

        Returns the pids still alive afterwards (none, unless something refused to die).
        """
        self.snapshot()
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        # Flower's SuperExec exits on its own once its parent is gone; give it a moment.
        for pid in _wait_gone(sorted(self.seen), timeout=15):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return _wait_gone(sorted(self.seen), timeout=10)


def run_bounded(
    cmd: list[str], *, env: dict[str, str], timeout: float, cwd: Path
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` to the end within ``timeout``; on timeout kill it and its children by pid."""
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        children = _tree(proc.pid)
        proc.kill()
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out, _ = proc.communicate()
        raise TimeoutError(
            f"{cmd[:2]} did not finish within {timeout:.0f}s:\n{out[-3000:]}"
        ) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def tls_args(certs: Path) -> tuple[list[str], list[str]]:
    """The SuperLink's and a SuperNode's TLS flags for the certificates in ``certs``
    (scripts/make_certs.sh's file names)."""
    link = [
        "--ssl-ca-certfile",
        str(certs / "ca.crt"),
        "--ssl-certfile",
        str(certs / "server.pem"),
        "--ssl-keyfile",
        str(certs / "server.key"),
    ]
    return link, ["--root-certificates", str(certs / "ca.crt")]


class AuthenticatedFederation(LocalFederation):
    """A SuperLink with TLS and SuperNode authentication (``--enable-supernode-auth``: only
    nodes whose public key is registered get in), and SuperNodes started one by one, each
    with its own private key or none. Register the keys between :meth:`start_superlink`
    and :meth:`start_node`. Node ``i`` is the ``i``-th started, as in LocalFederation."""

    def __init__(self, workdir: Path, *, certs: Path) -> None:
        super().__init__(workdir, num_nodes=0, certs=certs)
        self.certs: Path = certs
        self.node_names: list[str] = []

    def start_superlink(self, timeout: float = 90.0) -> None:
        link, _ = tls_args(self.certs)
        self._start(
            "superlink",
            [
                "flower-superlink",
                *link,
                "--enable-supernode-auth",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--disable-runtime-dependency-installation",
            ],
        )
        self.wait_for_port(self.port, timeout)

    def start_node(self, name: str, *, partition: int, private_key: Path | None) -> int:
        """Start SuperNode ``name`` (log: ``name.log``) holding client ``partition``;
        returns its index."""
        _, node = tls_args(self.certs)
        auth = [] if private_key is None else ["--auth-supernode-private-key", str(private_key)]
        self.node_ports.append(free_port())
        self.node_names.append(name)
        self._start(
            name,
            [
                "flower-supernode",
                *node,
                *auth,
                "--superlink",
                self.address,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.node_ports[-1]),
                "--node-config",
                f"partition-id={partition}",
            ],
        )
        return len(self.node_names) - 1

    def wait_node_exit(self, i: int, timeout: float) -> int:
        """Wait for SuperNode ``i`` to exit on its own; its exit status."""
        proc = self.procs[1 + i]
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            self.seen.update(_tree(proc.pid))  # its SuperExec, stopped later if it lingers
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"SuperNode {self.node_names[i]} still running after {timeout:.0f}s"
                )
            time.sleep(0.3)
        return int(proc.returncode)
