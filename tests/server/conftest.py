"""One ``autoglm serve`` process (the default model, a small engine) shared by every server test.

The server runs as a real subprocess on a free loopback port, started the way users start it, so
the tests cover flags, uvicorn and signal handling too. Engine start compiles its buckets (~30-40 s
on a 2-core CPU), hence one server per session; ``ServerProcess.ensure_running`` restarts it if a
test (the SIGTERM test) stopped it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

from autoglm_jax.parallel.distributed import free_port

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
API_KEY = "test-key-123"
MODEL = "smollm2-test"
MAX_SEQUENCE_LENGTH = 512
MAX_WAITING_REQUESTS = 220
MAX_BATCH_SIZE = 8
START_TIMEOUT_S = 300


class ServerProcess:
    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.log_path = os.path.join(tempfile.mkdtemp(prefix="autoglm-serve-"), "server.log")
        self._start_error: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}

    def ensure_running(self) -> "ServerProcess":
        if self._start_error is not None:  # do not wait out the start timeout again in every test
            pytest.fail(self._start_error)
        if self.process is None or self.process.poll() is not None:
            try:
                self._start()
            except RuntimeError as error:
                self._start_error = str(error)
                raise
        return self

    def _start(self) -> None:
        self.port = free_port()
        command = [sys.executable, "-m", "autoglm_jax.cli.serve", f"--port={self.port}", "--host=127.0.0.1",
                   f"--served_model_name={MODEL}", f"--api_key={API_KEY}", f"--max_batch_size={MAX_BATCH_SIZE}",
                   f"--max_sequence_length={MAX_SEQUENCE_LENGTH}", "--max_num_batched_tokens=64",
                   "--decode_steps_per_call=4", f"--max_waiting_requests={MAX_WAITING_REQUESTS}",
                   "--shutdown_timeout=20", "--log_level=warning"]
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO_ROOT}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode} during start:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not healthy within {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 60) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log_tail(self, num_chars: int = 4000) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-num_chars:]

    def gauges(self) -> dict[str, float]:
        """The ``autoglm_*`` gauges of ``GET /metrics`` (live engine state)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {name: float(value) for name, value in re.findall(r"^(autoglm_[a-z_]+) ([0-9.e+-]+)$", text, re.M)}

    def wait_idle(self, timeout: float = 30) -> dict[str, float]:
        """Waits until no sequence runs or waits and every KV page is free; returns the last gauges."""
        deadline = time.monotonic() + timeout
        while True:
            gauges = self.gauges()
            idle = (gauges["autoglm_num_requests_running"] == 0 and gauges["autoglm_num_requests_waiting"] == 0
                    and gauges["autoglm_kv_cache_free_pages"] == gauges["autoglm_kv_cache_usable_pages"])
            if idle or time.monotonic() > deadline:
                return gauges
            time.sleep(0.2)


@pytest.fixture(scope="session")
def server_process():
    server = ServerProcess()
    yield server
    server.stop()


@pytest.fixture
def server(server_process) -> ServerProcess:
    return server_process.ensure_running()
