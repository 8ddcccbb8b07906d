"""Hostile-payload fuzzer: mutates real SDK traffic and checks that the server answers every
request with a JSON 4xx or a success, never a 5xx, a panic or a crash, and that the tenant
it attacks keeps its state.

1. A victim tenant (Bob) trains a run, saves a checkpoint and records what it sees: a forward
   loss, its checkpoints, its sessions.
2. The attacker (Alice) drives the official SDK through a recording proxy: every request the
   SDK sends (path, content type, body, JSON or protobuf) becomes a seed.
3. Seeds are mutated (JSON trees: values swapped for hostile ones or for Bob's ids, fields
   dropped, added or duplicated, lists grown, depth; bytes: flips, truncation, splices; paths:
   ids swapped, traversal; keys: missing or wrong) and sent as Alice.
4. Findings: a 5xx (a 504 `time_limit` aside), a 4xx whose body is not JSON with `error`, a
   future failing `internal`, a request that does not return, the server gone or logging a
   panic, or any of Bob's observations changed.

`make fuzz` runs it for 10 minutes (`--secs`); `tests/test_fuzz.py` runs a short, seeded
round in `make test`. A failing round prints its seed and writes the offending requests to
`--out` (JSON lines) so they can be replayed.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import pickle
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).parent))
from conftest import ALICE, BOB, MODEL_NAME, Server  # noqa: E402

# The server's flags for a round: a short sampling limit, so a mutated request for a long
# generation costs seconds, not minutes.
# Long polls (retrieve_future, retrieve_futures) answer within 2 s, so a mutated poll that waits
# does not hold the run up.
SERVER_FLAGS = ("--api-key", f"alice={ALICE}", "--api-key", f"bob={BOB}", "--max-sample-secs", "5",
                "--long-poll-secs", "2")
REQUEST_TIMEOUT = 60.0
PROBE = [1, 504, 3437, 314, 260, 1345, 28]


@dataclass
class Seed:
    method: str
    path: str
    content_type: str
    body: bytes


@dataclass
class Finding:
    why: str
    method: str
    path: str
    headers: dict
    body: str  # base64
    status: int | None = None
    answer: str = ""


# ---------------------------------------------------------------- recording the SDK's traffic


class Recorder:
    """A reverse proxy in front of the server that keeps every request it forwards."""

    def __init__(self, upstream: str):
        self.seeds: list[Seed] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def forward(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "content-length", "connection", "accept-encoding")}
                r = requests.request(self.command, upstream + self.path, data=body, headers=headers,
                                     timeout=REQUEST_TIMEOUT)
                recorder.seeds.append(Seed(self.command, self.path, self.headers.get("Content-Type", ""), body))
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = do_POST = do_PUT = do_DELETE = forward

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def record_sdk_traffic(server_url: str) -> list[Seed]:
    """Alice's SDK session, as a user's script would run it, recorded as seeds."""
    import tinker
    from tinker import types

    proxy = Recorder(server_url)
    try:
        sc = tinker.ServiceClient(base_url=proxy.url, api_key=ALICE)
        tc = sc.create_lora_training_client(base_model=MODEL_NAME, rank=4).result()
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(PROBE[:-1]),
            loss_fn_inputs={"target_tokens": PROBE[1:], "weights": [1.0] * (len(PROBE) - 1)},
        )
        rl = types.Datum(
            model_input=types.ModelInput.from_ints(PROBE[:-1]),
            loss_fn_inputs={"target_tokens": PROBE[1:], "logprobs": [-1.0] * (len(PROBE) - 1),
                            "advantages": [0.5] * (len(PROBE) - 1)},
        )
        tc.forward([datum], "cross_entropy").result()
        tc.forward_backward([datum], "cross_entropy").result()
        tc.forward_backward([rl], "importance_sampling").result()
        tc.forward_backward([rl], "ppo", loss_fn_config={"clip_low_threshold": 0.8}).result()
        tc.optim_step(types.AdamParams(learning_rate=1e-4)).result()
        state = tc.save_state("fuzz-state", ttl_seconds=3600).result().path
        weights = tc.save_weights_for_sampler("fuzz-sampler").result().path
        tc.load_state(state).result()
        tc.get_info()
        sampler = sc.create_sampling_client(model_path=weights)
        params = types.SamplingParams(max_tokens=4, temperature=0.7, seed=1, stop=["\n"])
        prompt = types.ModelInput.from_ints(PROBE)
        sampler.sample(prompt, num_samples=2, sampling_params=params).result()
        sampler.sample(prompt, num_samples=1, sampling_params=params, include_prompt_logprobs=True,
                       topk_prompt_logprobs=2, topk_sample_logprobs=2).result()
        sampler.compute_logprobs(prompt).result()
        # A copy as another process would unpickle it: it joins the session for its clone id.
        clone = pickle.loads(pickle.dumps(sampler.result()))
        clone.sample(prompt, num_samples=1, sampling_params=params).result()
        rest = sc.create_rest_client()
        rest.list_training_runs().result()
        rest.get_training_run(tc.model_id).result()
        rest.list_checkpoints(tc.model_id).result()
        rest.list_user_checkpoints().result()
        rest.publish_checkpoint_from_tinker_path(weights).result()
        rest.set_checkpoint_ttl_from_tinker_path(state, 7200).result()
        rest.list_sessions().result()
        session = rest.list_sessions(limit=1).result().sessions[0]
        rest.get_session(session).result()
        rest.get_weights_info_by_tinker_path(state).result()
        sc.create_training_client_from_state(state).result()
        rest.search_sessions(types.SessionSearchRequest(session_id=session)).result()
        rest.assign_session_project(session, "fuzz").result()
        rest.export_session_trace(session).result()
        external = tc.save_weights_external("fuzz-external").result().path
        rest.get_external_weights_urls(external).result()
        rest.copy_weights(weights, "fuzz-copy").result()
        # Routes the SDK reaches only on paths this script does not take, sent as it would.
        raw = requests.Session()
        raw.headers["X-API-Key"] = ALICE
        busy = raw.post(proxy.url + "/api/v1/asample", json={
            "base_model": MODEL_NAME, "num_samples": 1, "prompt_logprobs": True, "prompt_logprobs_last_n": 2, "prompt_alt_tokens_k": 1,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": PROBE}]},
            "sampling_params": {"max_tokens": 64, "temperature": 1.0}}).json()
        assert "request_id" in busy, busy
        raw.post(proxy.url + "/api/v1/cancel_future", json={"request_id": busy["request_id"]})
        raw.post(proxy.url + "/api/v1/retrieve_futures", json={
            "target": {"type": "sampling_session", "sampling_session_id": clone._sampling_session_id,
                       "cloned_sampler_id": 1},
            "prev_cursor": 0, "timeout": 0, "retrieved_request_ids": [busy["request_id"]]})
        raw.post(proxy.url + "/api/v1/sample", json={
            "base_model": MODEL_NAME, "num_samples": 1,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": PROBE}]},
            "sampling_params": {"max_tokens": 2}})
        raw.post(proxy.url + "/api/v1/session_heartbeat", json={"session_id": session})
        rest.unpublish_checkpoint_from_tinker_path(weights).result()
        rest.delete_checkpoint_from_tinker_path(external).result()
        sc.close("success").result()
    finally:
        proxy.close()
    return [s for s in proxy.seeds if not s.path.startswith("/api/v1/downloads/")]


# ---------------------------------------------------------------- the victim


def victim_setup(url: str) -> dict:
    import tinker
    from tinker import types

    sc = tinker.ServiceClient(base_url=url, api_key=BOB)
    tc = sc.create_lora_training_client(base_model=MODEL_NAME, rank=4).result()
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(PROBE[:-1]),
        loss_fn_inputs={"target_tokens": PROBE[1:], "weights": [1.0] * (len(PROBE) - 1)},
    )
    tc.forward_backward([datum], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    path = tc.save_state("bobs-state").result().path
    sampler_path = tc.save_weights_for_sampler("bobs-sampler").result().path
    rest = sc.create_rest_client()
    session = rest.list_sessions(limit=1).result().sessions[0]
    return {"sc": sc, "tc": tc, "rest": rest, "datum": datum, "model_id": tc.model_id,
            "paths": [path, sampler_path], "session": session}


def victim_view(v: dict) -> dict:
    """What Bob sees; none of it may change while Alice fuzzes."""
    loss = v["tc"].forward([v["datum"]], "cross_entropy").result().metrics["loss:sum"]
    rest = v["rest"]
    ckpts = sorted((c.tinker_path, c.public, str(c.expires_at))
                   for c in rest.list_user_checkpoints().result().checkpoints)
    return {"loss": loss, "checkpoints": ckpts,
            "runs": sorted(r.training_run_id for r in rest.list_training_runs().result().training_runs),
            "sessions": sorted(rest.list_sessions().result().sessions)}


# ---------------------------------------------------------------- mutations


def hostile_values(victim: dict) -> list:
    bob_ids = [victim["model_id"], victim["session"], *victim["paths"],
               victim["paths"][0].rsplit("/", 1)[0] + "/../../../../etc/passwd"]
    return [
        None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63), 2**64 + 1, 10**30, 1e308, -1e308, 1e-320,
        math.nan, math.inf, -math.inf, 0.5, -0.0,
        "", " ", "a" * 70_000, "\u0000", "\ud800", "é" * 100, "../../etc/passwd", "/etc/passwd",
        "tinker://", "tinker://x/weights/../../y", "%2e%2e%2f", "NaN", "-1", "1e309", "🙂" * 50,
        [], [None], [[[[[]]]]], {}, {"": None}, {"__proto__": {}}, list(range(2000)), [1.5, "x", None],
        *bob_ids,
    ]


def mutate_tree(node, rng: random.Random, pool: list, depth: int = 0):
    """A copy of a JSON tree with one random change."""
    if isinstance(node, dict) and node and rng.random() < 0.8:
        key = rng.choice(list(node))
        out = dict(node)
        r = rng.random()
        if r < 0.15:
            del out[key]
        elif r < 0.25:
            out[rng.choice(["extra", key + "_", "model_id", "session_id", "path", "type"])] = rng.choice(pool)
        else:
            out[key] = mutate_tree(node[key], rng, pool, depth + 1)
        return out
    if isinstance(node, list) and node and rng.random() < 0.8:
        out = list(node)
        i = rng.randrange(len(out))
        r = rng.random()
        if r < 0.15:
            del out[i]
        elif r < 0.3:
            out = out * rng.choice([2, 7, 50])
        else:
            out[i] = mutate_tree(out[i], rng, pool, depth + 1)
        return out
    r = rng.random()
    if r < 0.1:
        nested = rng.choice(pool)
        for _ in range(rng.choice([10, 200, 5000])):
            nested = [nested]
        return nested
    if r < 0.2 and isinstance(node, (int, float)) and not isinstance(node, bool):
        return rng.choice([node + 1, node - 1, -node, node * 1000, node * 1e6, float(node) + 0.5])
    return rng.choice(pool)


def mutate_bytes(body: bytes, rng: random.Random, other: bytes) -> bytes:
    b = bytearray(body)
    r = rng.random()
    if not b or r < 0.15:
        return bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 16, 300])))
    if r < 0.35:
        return bytes(b[: rng.randrange(len(b))])
    if r < 0.55:
        for _ in range(rng.choice([1, 3, 10])):
            b[rng.randrange(len(b))] = rng.getrandbits(8)
        return bytes(b)
    if r < 0.7:
        i = rng.randrange(len(b))
        return bytes(b[:i] + bytes([0xFF] * rng.choice([1, 8, 64])) + b[i:])
    if r < 0.85:
        i, j = rng.randrange(len(b)), rng.randrange(len(other) + 1)
        return bytes(b[:i]) + other[j:]
    return bytes(b) * rng.choice([2, 3])


def mutate_path(path: str, rng: random.Random, victim: dict) -> str:
    parts = path.split("/")
    swaps = [victim["model_id"], victim["session"], "..", "%2e%2e", "x" * 5000, "", "0", "-1",
             victim["model_id"].split(":")[0], "weights", "sampler_weights", "%00"]
    i = rng.randrange(1, len(parts)) if len(parts) > 1 else 0
    parts[i] = rng.choice(swaps)
    out = "/".join(parts)
    if rng.random() < 0.2:
        out += rng.choice(["?limit=-1", "?limit=99999999999999999999", "?offset=x", "?cursor=%ff",
                           "?project_id=" + "p" * 3000, "?a=1&a=2"])
    return out


def mutate(seed: Seed, rng: random.Random, pool: list, victim: dict, seeds: list[Seed]) -> tuple:
    method, path, ctype, body = seed.method, seed.path, seed.content_type, seed.body
    headers = {"X-API-Key": ALICE}
    if ctype:
        headers["Content-Type"] = ctype
    r = rng.random()
    if r < 0.1:
        path = mutate_path(path, rng, victim)
    elif r < 0.14:
        headers["X-API-Key"] = rng.choice(["", "tml-", ALICE + "x", BOB[:-1], ALICE + " ", ALICE + "#1", "é"])
    elif r < 0.18:
        headers["Content-Type"] = rng.choice(["application/x-protobuf", "text/plain", "application/json; charset=latin1",
                                              "multipart/form-data", ""])
    elif r < 0.21:
        method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH"])
    elif "json" in ctype and body and rng.random() < 0.75:
        try:
            tree = json.loads(body)
        except ValueError:
            tree = None
        if tree is not None:
            for _ in range(rng.choice([1, 1, 2, 4])):
                tree = mutate_tree(tree, rng, pool)
            try:
                body = json.dumps(tree, allow_nan=True).encode("utf-8", "surrogatepass")
            except (ValueError, RecursionError):
                body = b"[" * 100_000
            if rng.random() < 0.05:  # a duplicated key
                body = body.replace(b"{", b'{"model_id": 1, ', 1)
    else:
        other = rng.choice(seeds).body
        body = mutate_bytes(body, rng, other)
    return method, path, headers, body


# ---------------------------------------------------------------- one round


@dataclass
class Round:
    url: str
    findings: list = field(default_factory=list)
    statuses: dict = field(default_factory=dict)
    futures: list = field(default_factory=list)

    def send(self, method, path, headers, body):
        try:
            r = requests.request(method, self.url + path, headers=headers, data=body, timeout=REQUEST_TIMEOUT)
        except requests.RequestException as e:
            self.find(f"no answer: {type(e).__name__}", method, path, headers, body)
            return None
        self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1
        why = self.judge(r)
        if why:
            self.find(why, method, path, headers, body, r)
        elif r.status_code == 200 and "json" in r.headers.get("content-type", ""):
            try:
                answer = r.json()
            except ValueError:
                answer = None
            if isinstance(answer, dict) and isinstance(answer.get("request_id"), str):
                self.futures.append((answer["request_id"], method, path, headers, body))
        return r

    @staticmethod
    def judge(r) -> str | None:
        if r.status_code >= 500:
            try:
                kind = r.json().get("error_type")
            except ValueError:
                kind = None
            if r.status_code == 504 and kind == "time_limit":
                return None
            return f"status {r.status_code}"
        if r.status_code >= 400:
            try:
                body = r.json()
            except ValueError:
                return f"{r.status_code} without a JSON body"
            if not isinstance(body, dict) or "error" not in body:
                return f"{r.status_code} without an error field"
        return None

    def find(self, why, method, path, headers, body, r=None):
        self.findings.append(Finding(why, method, path[:300], headers, base64.b64encode(body[:20_000]).decode(),
                                     r.status_code if r is not None else None, r.text[:500] if r is not None else ""))

    def settle_futures(self, deadline: float):
        """Every accepted job either succeeded or failed with a user-facing error, by the
        deadline (a server that never answers a future is a finding too)."""
        for fid, method, path, headers, body in self.futures:
            settled = False
            while not settled and time.time() < deadline:
                try:
                    r = requests.post(self.url + "/api/v1/retrieve_future", json={"request_id": fid},
                                      headers={"X-API-Key": ALICE}, timeout=REQUEST_TIMEOUT)
                except requests.RequestException:
                    break
                if r.status_code == 408 or ("json" in r.headers.get("content-type", "")
                                             and r.json().get("type") == "try_again"):
                    time.sleep(0.05)
                    continue
                settled = True
                if r.status_code >= 500:
                    self.find(f"future answered {r.status_code}", method, path, headers, body, r)
                else:
                    a = r.json() if "json" in r.headers.get("content-type", "") else {}
                    if a.get("error_type") == "internal":
                        self.find("future failed internal", method, path, headers, body, r)
            if not settled:
                self.find(f"future {fid} unsettled at the deadline", method, path, headers, body)


def healthy(url: str) -> bool:
    try:
        return requests.get(url + "/api/v1/healthz", timeout=30).ok
    except requests.RequestException:
        return False


def fuzz(data_dir: Path, seed: int, secs: float, max_requests: int, out: Path | None) -> list[Finding]:
    data_dir.mkdir(parents=True, exist_ok=True)
    srv = Server(data_dir, *SERVER_FLAGS)
    findings: list[Finding] = []
    try:
        victim = victim_setup(srv.url)
        before = victim_view(victim)
        seeds = record_sdk_traffic(srv.url)
        assert len(seeds) >= 20, f"only {len(seeds)} seeds recorded"
        pool = hostile_values(victim)
        rng = random.Random(seed)
        rnd = Round(srv.url)
        start = time.time()
        n = 0
        while n < max_requests and time.time() - start < secs:
            seed_req = rng.choice(seeds)
            rnd.send(*mutate(seed_req, rng, pool, victim, seeds))
            n += 1
            if n % 100 == 0 and not healthy(srv.url):
                rnd.find("server unhealthy", "GET", "/api/v1/healthz", {}, b"")
                break
        rnd.settle_futures(time.time() + 300)
        findings = rnd.findings
        if srv.proc.poll() is not None:
            findings.append(Finding(f"server exited with {srv.proc.returncode}", "", "", {}, ""))
        elif not healthy(srv.url):
            findings.append(Finding("server unhealthy at the end", "", "", {}, ""))
        else:
            after = victim_view(victim)
            if after != before:
                findings.append(Finding(f"the victim's view changed: {before} -> {after}", "", "", {}, ""))
        print(f"fuzz seed {seed}: {n} requests from {len(seeds)} seeds in {time.time() - start:.0f} s, "
              f"statuses {dict(sorted(rnd.statuses.items()))}, {len(rnd.futures)} futures, "
              f"{len(findings)} findings", flush=True)
    finally:
        srv.stop()
    log = (data_dir / "server.log").read_text(errors="replace")
    if "panicked" in log:
        findings.append(Finding("the server logged a panic", "", "", {}, "",
                                answer=log[log.index("panicked") - 200:][:1500]))
    if findings and out is not None:
        with out.open("w") as f:
            for x in findings:
                f.write(json.dumps(x.__dict__) + "\n")
    return findings


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--secs", type=float, default=600)
    ap.add_argument("--max-requests", type=int, default=10**9)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("fuzz-findings.jsonl"))
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    with tempfile.TemporaryDirectory(prefix="loraloom-fuzz-") as d:
        findings = fuzz(Path(d), seed, args.secs, args.max_requests, args.out)
    for f in findings[:20]:
        print(f"  {f.why}: {f.method} {f.path} -> {f.status} {f.answer[:200]}")
    if findings:
        print(f"{len(findings)} findings (seed {seed}); requests written to {args.out}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
