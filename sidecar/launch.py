"""Start a sidecar in a child process on free ports and wait until it is SERVING.

Used by the evaluator's one-command run, the benchmark and end-to-end tests: the same `serve` users
run, as a real separate process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import typing
from collections.abc import Sequence
from pathlib import Path

from sidecar.client import RerankerClient
from sidecar.health import check
from sidecar.security import ClientSecurity, grpc_channel


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class SidecarProcess:
    def __init__(
        self,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        ready_timeout: float = 300.0,
        log_path: Path | None = None,
        security: ClientSecurity | None = None,
    ) -> None:
        """`security` is how to reach it when `args` turn on TLS or a token (--tls-cert-file, ...; the
        token may also come through `env` as RERANK_AUTH_TOKEN): the readiness check and `client()`
        use it."""
        self.grpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.args = list(args)
        self.env = env
        self.ready_timeout = ready_timeout
        self.log_path = log_path
        self.security = security or ClientSecurity()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: typing.IO[bytes] | None = None

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self._scheme}://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"{self._scheme}://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def _scheme(self) -> str:
        return "https" if self.security.uses_tls else "http"

    def client(self) -> RerankerClient:
        return RerankerClient(self.grpc_target, self.security)

    def start(self) -> SidecarProcess:
        cmd = [
            sys.executable,
            "-m",
            "sidecar",
            "serve",
            "--host",
            "127.0.0.1",
            "--grpc-port",
            str(self.grpc_port),
            "--http-port",
            str(self.http_port),
            "--metrics-port",
            str(self.metrics_port),
            *self.args,
        ]
        env = {**os.environ, **(self.env or {})}
        # The child must import this same `sidecar` package, even from an uninstalled checkout.
        package_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        self._log = open(self.log_path, "wb") if self.log_path else None  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=self._log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT if self._log else subprocess.DEVNULL,
        )
        until = time.monotonic() + self.ready_timeout
        with grpc_channel(self.grpc_target, self.security) as channel:
            while time.monotonic() < until:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"the sidecar exited with code {self.proc.returncode} before serving: {' '.join(cmd)}"
                    )
                if check(channel, timeout=1.0):
                    return self
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"the sidecar did not become SERVING within {self.ready_timeout:.0f}s")

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (the graceful drain), then wait; SIGKILL only if it overstays `timeout`."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log:
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> SidecarProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
