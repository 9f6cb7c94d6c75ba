"""Real servers for the tests: a Prefect server (SQLite in a temporary PREFECT_HOME) and
Prefect workers, and an S3-API object store (moto's standalone server), each started on
127.0.0.1 and stopped by its PID (its own process group)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen, timeout: float = 15) -> None:
    """Stop a process we started, and its children (its own session), by its PID."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class PrefectServer:
    home: Path
    port: int
    process: subprocess.Popen | None = None
    children: list[subprocess.Popen] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        return f"{self.url}/api"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment of a client process (CLI, worker, flow) of this server."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(self.home), PREFECT_API_URL=self.api, PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_LOGGING_LEVEL="INFO", PATH=f"{BIN}:{env.get('PATH', '')}", **extra)
        return env

    def start(self, timeout: float = 90) -> None:
        env = self.env(PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(self.port),
                       PREFECT_SERVER_UI_API_URL=self.api)
        env.pop("PREFECT_API_URL")
        log = open(self.home / "server.log", "wb")
        self.process = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                                        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prefect server exited: {(self.home / 'server.log').read_text()[-2000:]}")
            try:
                if self.request("GET", "/health") is True:
                    return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"prefect server did not answer within {timeout} s")

    def spawn(self, args: list[str], log_name: str, cwd: Path = ROOT, **env: str) -> subprocess.Popen:
        """A client process of this server (stopped with the server if still running)."""
        log = open(self.home / log_name, "ab")
        process = subprocess.Popen(args, cwd=cwd, env=self.env(**env), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.children.append(process)
        return process

    def cli(self, *args: str, timeout: float = 180) -> str:
        result = subprocess.run([str(BIN / "prefect"), *args], cwd=ROOT, env=self.env(), capture_output=True,
                                text=True, timeout=timeout)
        if result.returncode:
            raise RuntimeError(f"prefect {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result.stdout

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """One API call; retried, as Prefect's own client does, while the server answers 429,
        502 or 503 (its SQLite database busy under load: nothing was written)."""
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(6):
            req = urllib.request.Request(f"{self.api}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=30) as response:
                    text = response.read()
                return json.loads(text) if text else None
            except urllib.error.HTTPError as exc:
                if exc.code not in (429, 502, 503) or attempt == 5:
                    raise
                time.sleep(0.5 * 2**attempt)

    def wait_for_run(self, run_id: str, timeout: float = 300) -> dict:
        """Poll a flow run until it reaches a final state; return the run."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.request("GET", f"/flow_runs/{run_id}")
            if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return run
            time.sleep(1)
        raise TimeoutError(f"flow run {run_id} not finished after {timeout} s")

    def artifacts(self, run_id: str) -> dict[str, dict]:
        """The artifacts of a flow run (its tasks' included), by key or type."""
        found = self.request("POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
        return {a.get("key") or f"{a['type']}-{a['id']}": a for a in found}

    def logs(self, run_id: str, contains: str, timeout: float = 20) -> list[str]:
        """Log messages of a flow run that contain ``contains``, waiting for them: runs send
        their logs to the server in batches, a little after the run returns."""
        deadline = time.monotonic() + timeout
        while True:
            found = [entry["message"] for entry in self.request("POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}})
                     if contains in entry["message"]]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.5)

    def stop(self) -> None:
        for child in self.children:
            stop(child)
        if self.process is not None:
            stop(self.process)


@dataclass
class S3Server:
    """moto's standalone S3-API server (``python -m moto.server``), in memory, on 127.0.0.1:
    a real HTTP endpoint that s3fs, botocore and Zarr talk to as they talk to AWS (requests,
    range reads, listings of 1000 keys a page), for outputs and slides on ``s3://``."""

    log: Path
    port: int
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> None:
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto server exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=5) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"moto server did not answer within {timeout} s")

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
