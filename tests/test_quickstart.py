"""The README's quickstart script runs unchanged against a fresh server and learns its answer."""

import os
import subprocess
import sys

from conftest import DEFAULT_MODEL_DIR, ROOT


def test_readme_quickstart_runs(server):
    env = {**os.environ, "LORALOOM_URL": server.url, "MODEL_DIR": str(DEFAULT_MODEL_DIR)}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True,
                          text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].strip().startswith("A LoRA server"), proc.stdout
    first, last = float(lines[0].split()[-1]), float(lines[-2].split()[-1])
    assert last < first / 2, proc.stdout
