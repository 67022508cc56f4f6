"""Real processes for integration tests: uvicorn servers of the service, throwaway Redis servers and clusters."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port(avoid: int | None = None) -> int:
    """A port nothing listens on now (and not ``avoid``, a port just handed out for something else)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port != avoid:
            return port


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(interval)
    raise TimeoutError("condition not met in time")


def server_env(**ntm: str) -> dict[str, str]:
    """This process's environment without any NTM_* variable, plus ``ntm`` as NTM_<KEY>."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NTM_")}
    env.update({f"NTM_{key.upper()}": value for key, value in ntm.items()})
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ServerProcess:
    """A real server of the service in a subprocess, its output in a log file.

    By default ``python -m uvicorn service.app:app_from_env --factory`` on a free port, with
    ``env`` (NTM_* variables) on top of a clean environment; ``args`` runs another command
    line (``ntm-serve``, say) that listens on ``port``. It runs the model eagerly (NTM_COMPILE=0: a compile
    warm-up takes seconds) unless ``env`` says otherwise. Its gRPC server listens on another free
    port (``grpc_target``), unless ``env`` names NTM_GRPC_PORT. ``cwd``: the checkout whose code it
    runs (this one by default; ``bench.http_ab`` runs another beside it). ``stop`` sends SIGTERM and waits.
    """

    def __init__(
        self,
        env: dict[str, str] | None = None,
        *,
        args: Sequence[str] | None = None,
        port: int | None = None,
        log_path: Path | None = None,
        cwd: Path = ROOT,
        log_level: str = "warning",
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        given = (env or {}).get("NTM_GRPC_PORT")
        self.grpc_port = int(given) if given is not None else free_port(avoid=self.port)
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        if log_path is None:
            handle, name = tempfile.mkstemp(prefix="ntm-server-", suffix=".log")
            os.close(handle)
            log_path = Path(name)
        self.log_path = log_path
        base = server_env(log_level=log_level, threads="1", grpc_port=str(self.grpc_port), compile="0")
        full_env = {**base, **(env or {})}
        if args is None:
            args = [sys.executable, "-m", "uvicorn", "service.app:app_from_env", "--factory", "--host", "127.0.0.1"]
            args += ["--port", str(self.port), "--log-level", log_level, "--no-access-log"]
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(list(args), cwd=cwd, env=full_env, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> ServerProcess:
        """Until /readyz answers 200 (models loaded, store reachable); raises with the log if not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + "/readyz", timeout=1.0).status_code == 200:
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server not ready within {timeout:g} s:\n{self.log()[-3000:]}")

    def wait_packages(self, timeout: float = 300.0) -> ServerProcess:
        """Until /metrics says every model's one-row packages are loaded (``ntm_model_package_loaded``).

        A server without that gauge (a build from before packages, in an A/B run) has none to wait for.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            text = httpx.get(self.url + "/metrics", timeout=5.0).text
            gauges = [line for line in text.splitlines() if line.startswith("ntm_model_package_loaded{")]
            if all(line.endswith(" 1.0") for line in gauges):
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"packages not loaded within {timeout:g} s:\n{self.log()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal, then wait; the exit status (uvicorn re-raises SIGTERM after a graceful shutdown: -15)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@contextlib.contextmanager
def server(env: dict[str, str]) -> Iterator[ServerProcess]:
    """A ready server for the duration of the block; its log file is removed afterwards."""
    proc = ServerProcess(env)
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()
        proc.log_path.unlink(missing_ok=True)


CLUSTER_BUS_OFFSET = 10_000  # a cluster node also listens on its port + 10000 (the cluster bus)


def free_cluster_port() -> int:
    """A free port whose cluster-bus port (+10000) is free too, and so below 65536."""
    while True:
        port = free_port()
        if port + CLUSTER_BUS_OFFSET < 65536:
            with contextlib.suppress(OSError), socket.socket() as sock:
                sock.bind(("127.0.0.1", port + CLUSTER_BUS_OFFSET))
                return port


class RedisServer:
    """A throwaway redis-server on a free port with an append-only file, so a restart keeps its data.

    ``cluster=True``: a node in cluster mode, its node file (``nodes.conf``) in its own folder, so a
    restart on the same port rejoins its cluster with the same slots.
    """

    def __init__(self, cluster: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH")
        self.binary, self.port = binary, free_cluster_port() if cluster else free_port()
        self.dir = tempfile.mkdtemp(prefix="ntm-redis-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.address = f"127.0.0.1:{self.port}"
        self.cluster_args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"] if cluster else []
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            self.dir,
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            *self.cluster_args,
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._answers, timeout=20)

    def _answers(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM: Redis shuts down cleanly; SIGKILL: a crash (fsync always: no acknowledged write is lost)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisCluster:
    """A throwaway Redis Cluster: ``masters`` cluster-mode RedisServers (no replicas) on free ports, their
    slots assigned by ``redis-cli --cluster create``; ready once every node says ``cluster_state:ok``.
    ``url`` names every node (``redis+cluster://127.0.0.1:P1,...``); ``nodes[i].stop()`` and ``.start()``
    restart a master on its port with its node file and append-only file, so it comes back with its
    slots and its data."""

    def __init__(self, masters: int = 3) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not on PATH")
        self.nodes: list[RedisServer] = []
        try:
            for _ in range(masters):
                self.nodes.append(RedisServer(cluster=True))
            addresses = [node.address for node in self.nodes]
            create = [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"]
            subprocess.run(create, check=True, capture_output=True, timeout=60)
            self.wait_ok()
        except BaseException:
            self.close()
            raise
        self.url = "redis+cluster://" + ",".join(addresses)

    def node_of(self, key: str | None = None, slot: int | None = None) -> RedisServer:
        """The master that serves ``key``'s slot (or ``slot``)."""
        import redis

        client = redis.Redis(port=self.nodes[0].port, socket_timeout=1)
        try:
            slot = client.cluster("KEYSLOT", key) if slot is None else slot
            ports = [int(served[2][1]) for served in client.cluster("SLOTS") if served[0] <= slot <= served[1]]
        finally:
            client.close()
        return next(node for node in self.nodes if node.port == ports[0])

    def info(self, node: RedisServer) -> dict:
        import redis

        client = redis.Redis(port=node.port, socket_timeout=1)
        try:
            return client.cluster("INFO")
        finally:
            client.close()

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every node sees the whole cluster up: all slots served, state ok."""

        def ok() -> bool:
            infos = [self.info(node) for node in self.nodes]
            return all(
                info["cluster_state"] == "ok" and int(info["cluster_known_nodes"]) == len(self.nodes) for info in infos
            )

        wait_until(ok, timeout=timeout, interval=0.1)

    def close(self) -> None:
        for node in self.nodes:
            node.close()
