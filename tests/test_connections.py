"""Connection hygiene: idle and half-open sockets cannot keep a keyed client out, slow headers
and bodies are cut off, an oversized Content-Length gets an early 413, and endpoints that
ignore their body still leave the kept-alive connection usable.

Bounds are generous (seconds where the server acts in milliseconds) so that a loaded machine
does not fail them; each names the flag it checks.
"""

import resource
import socket
import time

import pytest
import requests

from conftest import ALICE, MODEL_NAME, Server

# The test process opens over a thousand sockets: lift its own limit first.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))

HEADERS = {"X-API-Key": ALICE}


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("conns"), "--api-key", f"alice={ALICE}",
                 "--header-timeout-secs", "2", "--body-timeout-secs", "2", "--max-connections", "64")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("conns-default"), "--api-key", f"alice={ALICE}")
    yield srv
    srv.stop()


def idle_sockets(server, n):
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", server.port))
        socks.append(s)
    return socks


def closed_by_server(sock, wait):
    """True when the server closed `sock` within `wait` seconds."""
    sock.settimeout(wait)
    try:
        return sock.recv(1024) == b""
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True


def keyed_request(server):
    r = requests.get(server.url + "/api/v1/training_runs", headers=HEADERS, timeout=5)
    assert r.status_code == 200, r.text


def test_a_keyed_request_is_served_with_1100_idle_connections_open(default_server):
    socks = idle_sockets(default_server, 1100)
    try:
        keyed_request(default_server)
    finally:
        for s in socks:
            s.close()


def test_at_the_connection_cap_the_oldest_idle_connections_make_room(strict_server):
    socks = idle_sockets(strict_server, 100)
    try:
        keyed_request(strict_server)
        # 101 connections against a cap of 64: the oldest idle ones were closed.
        closed = sum(closed_by_server(s, 0.2) for s in socks[:40])
        assert closed >= 30, closed
    finally:
        for s in socks:
            s.close()


def test_partial_headers_are_cut_off_by_the_header_timeout(strict_server):
    s = socket.create_connection(("127.0.0.1", strict_server.port))
    s.sendall(b"GET /api/v1/healthz HTTP/1.1\r\nHost: x\r\n")
    assert closed_by_server(s, 20), "--header-timeout-secs 2 did not close a stalled request head"
    s.close()


def first_reply(server, path, content_length, body, key=ALICE):
    """Sends a POST head (with `key`, unless None) declaring `content_length` and then only
    `body`; returns the first bytes the server answers (within a generous 20 s)."""
    key_line = f"X-API-Key: {key}\r\n" if key else ""
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\n{key_line}"
                  f"Content-Type: application/json\r\nContent-Length: {content_length}\r\n\r\n".encode() + body)
        s.settimeout(20)
        return s.recv(4096)


def test_a_stalled_body_gets_a_408(strict_server):
    reply = first_reply(strict_server, "/api/v1/create_session", 100, b'{"tags":')
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert b"body-timeout-secs" in reply


def test_an_oversized_content_length_gets_an_early_413(strict_server):
    reply = first_reply(strict_server, "/api/v1/forward_backward", 10_000_000_000, b"")
    assert reply.startswith(b"HTTP/1.1 413"), reply
    assert b"payload_too_large" in reply


def test_the_client_config_answers_a_stranger_without_reading_its_body(strict_server):
    """The SDK's client config needs no key, so it must not buffer a stranger's upload: a 30 MB
    body declared and not sent is answered at once, not held until --body-timeout-secs."""
    for path in ["/api/v1/client/config", "/api/v1/client/dynamic_config"]:
        reply = first_reply(strict_server, path, 30_000_000, b"{}", key=None)
        assert reply.startswith(b"HTTP/1.1 200"), reply


def test_endpoints_that_ignore_their_body_keep_the_connection_usable(strict_server):
    with requests.Session() as http:
        http.headers.update(HEADERS)
        for i in range(10):
            body = {"tags": ["x" * 200], "user_metadata": {"i": i, "pad": "p" * 2000}, "sdk_version": "0"}
            r = http.post(strict_server.url + "/api/v1/create_session", json=body, timeout=5)
            assert r.status_code == 200, r.text
            r = http.post(strict_server.url + "/api/v1/telemetry", json={"events": ["e" * 5000]}, timeout=5)
            assert r.status_code == 200, r.text
            r = http.post(strict_server.url + "/api/v1/client/config", json={"pad": "p" * 5000}, timeout=5)
            assert r.status_code == 200 and "fwdbwd_max_chunk_bytes_count" in r.text, r.text
    keyed_request(strict_server)


def http_reply(sock):
    """One HTTP/1.1 response read off `sock` (head and Content-Length body), or b"" when the
    server closed the connection instead."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_a_client_config_body_that_arrives_late_leaves_the_connection_usable(strict_server):
    """The client configs ignore their bodies, but read a small one: answered before its last
    bytes came, the kept-alive connection would be closed under the client's next request."""
    for path in ["/api/v1/client/config", "/api/v1/client/dynamic_config"]:
        body = b'{"pad": "' + b"p" * 5000 + b'"}'
        with socket.create_connection(("127.0.0.1", strict_server.port)) as s:
            s.settimeout(20)
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:100])
            time.sleep(0.5)
            s.sendall(body[100:])
            assert http_reply(s).startswith(b"HTTP/1.1 200"), path
            s.sendall(b"GET /api/v1/healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert http_reply(s).startswith(b"HTTP/1.1 200"), f"{path}: the connection was closed"


def test_every_request_has_an_id_that_its_log_lines_and_its_jobs_carry(tmp_path, monkeypatch):
    """A client's `X-Request-Id` is answered back and a missing one is made; the id is in the
    request's log lines and in those its engine job logs on the worker thread."""
    monkeypatch.setenv("RUST_LOG", "info,loraloom_engine=debug,tower_http=debug")
    srv = Server(tmp_path, "--api-key", f"alice={ALICE}")
    try:
        made = requests.get(srv.url + "/api/v1/healthz")
        assert len(made.headers["x-request-id"]) == 36, made.headers  # a UUID
        session = requests.post(srv.url + "/api/v1/create_session", json={}, headers=HEADERS).json()
        create = {"session_id": session["session_id"], "base_model": MODEL_NAME,
                  "lora_config": {"rank": 4}}
        r = requests.post(srv.url + "/api/v1/create_model", json=create,
                          headers={**HEADERS, "X-Request-Id": "trace-me-42"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "trace-me-42", r.text
        future = r.json()["request_id"]
        done = requests.post(srv.url + "/api/v1/retrieve_future", json={"request_id": future},
                             headers=HEADERS)
        assert done.status_code == 200, done.text
    finally:
        srv.stop()
    log = (tmp_path / "server.log").read_text()
    tagged = [line for line in log.splitlines() if "trace-me-42" in line]
    assert any('route="/api/v1/create_model"' in line for line in tagged), tagged
    # The job's own line (logged by the worker) sits inside the request's span.
    assert any(future in line and "job done" in line for line in tagged), tagged
