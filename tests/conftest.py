"""Fixtures for end-to-end tests: a real loraloom server on 127.0.0.1."""

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
BINARY = ROOT / "target" / "debug" / "loraloom"
DEFAULT_MODEL_DIR = Path(
    os.environ.get("LORALOOM_DEFAULT_MODEL_DIR", ROOT / "data" / "models" / "SmolLM2-135M-Instruct")
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, data_dir: Path, *extra: str, env: dict | None = None, port: int | None = None,
                 model: tuple[Path, str] | None = None):
        """`loraloom serve` on `data_dir`, once healthy; on `port` (a restart where clients
        already point) or a free one; the default model unless `model` (its folder and name)."""
        # f32 unless a test asks otherwise: the tolerances of the f32 oracles must not depend on
        # a LORALOOM_DTYPE left in the shell.
        if "--dtype" not in extra:
            extra = ("--dtype", "f32", *extra)
        self.data_dir = data_dir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(data_dir / "server.log", "w+")
        model_dir, model_name = model or (DEFAULT_MODEL_DIR, MODEL_NAME)
        self.proc = subprocess.Popen(
            [str(BINARY), "serve", "--port", str(self.port), "--model", str(model_dir),
             "--model-name", model_name, "--data-dir", str(data_dir), *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.output()}")
            try:
                if requests.get(self.url + "/api/v1/healthz", timeout=1).ok:
                    return
            except requests.ConnectionError:
                time.sleep(0.2)
        raise RuntimeError(f"server did not start:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)  # past --drain-secs, a batch and the snapshots
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
ALICE = "tml-alice-0123456789"
BOB = "tml-bob-0123456789"
# Server flags for two keyed tenants, alice and bob.
TWO_TENANTS = ("--api-key", f"alice={ALICE}", "--api-key", f"bob={BOB}")


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """Single-tenant mode (no keys configured)."""
    srv = Server(tmp_path_factory.mktemp("data"))
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def keyed_server(tmp_path_factory):
    """Two tenants, alice and bob; a small body limit for the size test."""
    srv = Server(tmp_path_factory.mktemp("keyed"), *TWO_TENANTS,
                 "--max-body-bytes", str(4 * 1024 * 1024), "--long-poll-secs", "5")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)


# pytest's exit status, kept for `pytest_unconfigure`.
_exit_status = 0


def pytest_sessionfinish(session, exitstatus):
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Ends the test process with pytest's status once pytest has reported, skipping the
    interpreter's teardown. The tinker SDK leaves threads running (its event loop, session
    heartbeats, its Rust HTTP client's runtime); once, after every test had passed, tearing them
    down aborted the process (SIGABRT, nothing printed), which failed `make test`. Nothing is
    left to clean up by then: each server is stopped by its test or fixture."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)
