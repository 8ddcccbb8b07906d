"""Sampling throughput over real HTTP with the official `tinker` SDK (issue 11's CPU proxy).

Starts `loraloom serve` on MODEL_DIR (default: the tiny model of `make bench`, where per-op
overhead dominates as kernel launches do on a GPU), makes 8 adapters, then measures:

  alone      one request (max_tokens 64, no early stop) at a time: generated tokens/s
  crowd      32 concurrent requests over the 8 adapters, max_tokens 16..64: tokens/s, and its
             ratio to `alone` (goal >= 10x); with the CPU time the SDK client and the server's
             threads spent per crowd, and the wall time of the same 32 requests at max_tokens 1
             (HTTP, the client and prefill only): client and server share this machine's cores
  n16        one request with num_samples 16 vs num_samples 1 (same prompt, max_tokens 32):
             the time ratio (goal <= 2x) and the prefills it did (from /metrics; goal 1)
  behind     8 short requests (16 tokens) sent just after a long one (512 tokens) started: their
             mean latency against one short request alone (continuous batching: near 1x;
             a batch that runs to its longest sequence: the long request's duration)

Prints one JSON line per measurement.
usage: python scripts/sample_throughput.py [MODEL_DIR] [BINARY]
"""

import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import tinker
from tinker import types

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "tml-sample-throughput"
ADAPTERS = 8
CROWD = 32
REPEATS = int(os.environ.get("BENCH_ITERS", "3"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(url: str, name: str) -> float:
    request = urllib.request.Request(url + "/metrics", headers={"X-API-Key": KEY})
    text = urllib.request.urlopen(request, timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def thread_cpu(pid: int) -> dict:
    """CPU seconds of each thread name of process `pid` (Linux; empty elsewhere)."""
    out: dict = {}
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        pass
    return out


def own_cpu() -> float:
    """CPU seconds of this process (the SDK client), every thread."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def params(max_tokens: int) -> types.SamplingParams:
    return types.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=7, stop=[])


def prompt(i: int) -> types.ModelInput:
    return types.ModelInput.from_ints([(i * 37 + j * 11) % 900 + 20 for j in range(8 + i % 5)])


def generated(res) -> int:
    return sum(len(s.tokens) for s in res.sequences)


def timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def start_server(binary: str, model: str):
    """`binary serve` on `model` in a fresh data directory, once healthy: (process, url, log)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data = tempfile.mkdtemp(prefix="loraloom-sample-bench-")
    log = open(os.path.join(data, "server.log"), "w")
    server = subprocess.Popen(
        [binary, "serve", "--port", str(port), "--model", model, "--data-dir", data],
        stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/api/v1/healthz", timeout=1)
            return server, url, log
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                stop_server(server, log)
                raise SystemExit("server did not start")
            time.sleep(0.2)


def connect(url: str):
    """An SDK client of the server at `url`, and the name of the base model it serves."""
    sc = tinker.ServiceClient(base_url=url, api_key=KEY)
    base = tinker.RestClient(base_url=url, api_key=KEY).get_server_capabilities().result().supported_models[0].model_name
    return sc, base


def stop_server(server, log) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


@contextlib.contextmanager
def served(binary: str, model: str):
    """`binary serve` on `model` (`start_server`) with an SDK client of it (`connect`):
    yields (server process, url, client, base model name). The client's session is closed
    before the server stops (an SDK client left to interpreter exit can abort it)."""
    server, url, log = start_server(binary, model)
    try:
        sc, base = connect(url)
        yield server, url, sc, base
        sc.close("success").result()
    finally:
        stop_server(server, log)


def compare_binaries(doc: str, what: str, measure, best_key: str, fields: dict, rounds: int) -> None:
    """For `MODEL_DIR BINARY [BINARY ...]` on the command line (else `doc`), runs
    `measure(binary, model)` for each binary in turn, `rounds` rounds (alternately, so that
    binaries compare within one run on a shared machine); prints one JSON line per run (`what`,
    the binary, the round, `fields`, the measurement) and, per binary, its best (least)
    `best_key` against the first binary's."""
    if len(sys.argv) < 3:
        raise SystemExit(doc)
    model, binaries = sys.argv[1], sys.argv[2:]
    best: dict = {}
    for r in range(rounds):
        for b in binaries:
            m = measure(b, model)
            print(json.dumps({"what": what, "binary": b, "round": r, **fields, **m}), flush=True)
            best[b] = min(best.get(b, float("inf")), m[best_key])
    first = best[binaries[0]]
    for b in binaries:
        print(json.dumps({"what": what + "_best", "binary": b, best_key: best[b],
                          "vs_first": round(best[b] / first, 3)}))


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "data/models/tiny64")
    binary = sys.argv[2] if len(sys.argv) > 2 else os.path.join(HERE, "target/release/loraloom")
    with served(binary, model) as (server, url, sc, base):
        samplers = []
        for i in range(ADAPTERS):
            tc = sc.create_lora_training_client(base_model=base, rank=8, seed=i).result()
            samplers.append(tc.save_weights_and_get_sampling_client().result())
        # Warm up every sampler (loads its weights).
        for s in samplers:
            s.sample(prompt(0), 1, params(4)).result()

        alone_rates = []
        for r in range(REPEATS):
            t = time.perf_counter()
            res = samplers[r % ADAPTERS].sample(prompt(r), 1, params(64)).result()
            alone_rates.append(generated(res) / (time.perf_counter() - t))
        alone = max(alone_rates)
        print(json.dumps({"what": "sample_alone", "tokens_per_s": round(alone, 1)}))

        def crowd_of(max_tokens) -> tuple:
            """One crowd: (seconds, tokens, client CPU s, server CPU s by thread name)."""
            server_before, client_before = thread_cpu(server.pid), own_cpu()
            t = time.perf_counter()
            futures = [
                samplers[i % ADAPTERS].sample(prompt(i), 1, params(max_tokens(i)))
                for i in range(CROWD)
            ]
            tokens = sum(generated(f.result()) for f in futures)
            seconds = time.perf_counter() - t
            server_after = thread_cpu(server.pid)
            spent = {k: v - server_before.get(k, 0.0) for k, v in server_after.items()}
            return seconds, tokens, own_cpu() - client_before, spent

        crowds = [crowd_of(lambda i: 16 + 16 * (i % 4)) for _ in range(REPEATS)]
        seconds, tokens = min((c[0], c[1]) for c in crowds)
        crowd = tokens / seconds
        # CPU per crowd, averaged over the repeats (/proc counts in clock ticks of 10 ms).
        client_cpu = sum(c[2] for c in crowds) / len(crowds)
        server_cpu: dict = {}
        for c in crowds:
            for k, v in c[3].items():
                server_cpu[k] = server_cpu.get(k, 0.0) + v / len(crowds)
        floor = min(crowd_of(lambda i: 1)[0] for _ in range(REPEATS))
        print(json.dumps({"what": "sample_crowd", "requests": CROWD, "adapters": ADAPTERS,
                          "tokens_per_s": round(crowd, 1), "vs_alone": round(crowd / alone, 2),
                          "seconds": round(seconds, 4),
                          "client_cpu_s": round(client_cpu, 4),
                          "server_worker_cpu_s": round(sum(v for k, v in server_cpu.items()
                                                           if k.startswith("loraloom-worker")), 4),
                          "server_http_cpu_s": round(sum(v for k, v in server_cpu.items()
                                                         if k.startswith("tokio")), 4),
                          "max_tokens_1_seconds": round(floor, 4)}))

        times = {}
        prefills = None
        for n in (1, 16):
            best = float("inf")
            for _ in range(REPEATS):
                before = metric(url, "loraloom_sample_prefills_total")
                t = time.perf_counter()
                res = samplers[0].sample(prompt(3), n, params(32)).result()
                best = min(best, time.perf_counter() - t)
                assert len(res.sequences) == n
                if n == 16:
                    prefills = metric(url, "loraloom_sample_prefills_total") - before
            times[n] = best
        print(json.dumps({"what": "sample_num_samples", "n1_s": round(times[1], 4),
                          "n16_s": round(times[16], 4), "ratio": round(times[16] / times[1], 2),
                          "prefills_n16": prefills}))
        short_alone = min(timed(lambda: samplers[1].sample(prompt(5), 1, params(16)).result())
                          for _ in range(REPEATS))
        behind = []
        for _ in range(REPEATS):
            long = samplers[0].sample(prompt(1), 1, params(512))
            time.sleep(0.05)
            t = time.perf_counter()
            shorts = [samplers[1 + i % 7].sample(prompt(i), 1, params(16)) for i in range(8)]
            done = []
            for f in shorts:
                f.result()
                done.append(time.perf_counter() - t)
            long_s = time.perf_counter() - t
            long.result()
            long_s = max(long_s, time.perf_counter() - t)
            behind.append((sum(done) / len(done), long_s))
        mean_short = min(b[0] for b in behind)
        print(json.dumps({"what": "sample_behind_long", "short_alone_s": round(short_alone, 4),
                          "short_behind_long_s": round(mean_short, 4),
                          "long_rest_s": round(min(b[1] for b in behind), 4),
                          "ratio": round(mean_short / short_alone, 2)}))


if __name__ == "__main__":
    main()
