"""A short, seeded round of the hostile-payload fuzzer (`tests/fuzz_http.py`; `make fuzz` runs
it for 10 minutes with a fresh seed): mutated SDK requests are answered with a JSON 4xx or a
success, never a 5xx or a crash, and the attacked tenant's state does not change."""

import fuzz_http


def test_mutated_sdk_traffic_gets_json_4xx_or_success_and_leaves_the_victim_alone(tmp_path):
    out = tmp_path / "findings.jsonl"
    findings = fuzz_http.fuzz(tmp_path / "server", seed=20261127, secs=120, max_requests=3000, out=out)
    assert not findings, [(f.why, f.method, f.path, f.status, f.answer[:200]) for f in findings[:10]]
