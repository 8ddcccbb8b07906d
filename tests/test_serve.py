"""The `loraloom serve` process over real HTTP on 127.0.0.1."""

import subprocess

import requests

from conftest import BINARY


def test_healthz_answers(server):
    r = requests.get(server.url + "/api/v1/healthz", timeout=5)
    assert r.status_code == 200
    assert r.json()["status"] == "ok"


def test_capabilities_list_the_served_model(server):
    r = requests.get(server.url + "/api/v1/get_server_capabilities", timeout=5)
    assert r.status_code == 200
    models = r.json()["supported_models"]
    assert [m["model_name"] for m in models] == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert models[0]["max_context_length"] == 8192


def test_start_logs_a_model_summary(server):
    out = server.output()
    assert "llama" in out and "30 layers" in out and "parameters" in out, out


def test_bad_model_directory_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt_neox"}')
    proc = subprocess.run(
        [str(BINARY), "serve", "--port", "0", "--model", str(tmp_path), "--data-dir", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    assert "unsupported architecture `gpt_neox`" in proc.stderr, proc.stderr
    assert "panicked" not in proc.stderr
