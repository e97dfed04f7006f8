"""Checkpoint and resume across a real kill: a CLI training process killed with SIGKILL mid-run and started again
ends with the same table as an uninterrupted run, and leaves nothing behind. Real processes, like the server layer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from epd_core import load_params
from epd_dev import ROOT
from epd_dev.tables import assert_tables_close, checkpoint_iteration

pytestmark = pytest.mark.server


COMMANDS = {
    "distill": ["distill", "--steps", "3", "--iterations", "40", "--batch", "4", "--teacher-m", "1", "--seed", "2",
                "--learn-grid", "--scale-time", "0.1"],
    "rdpo": ["rdpo", "TABLE", "--iterations", "24", "--groups", "2", "--k", "2", "--exact-steps", "10", "--seed", "2",
             "--lr", "1e-3", "--guard-action", "warn"],  # the held-out fidelity checks go on, the run does too
}  # fmt: skip


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_run_killed_with_sigkill_resumes_to_the_same_table(tmp_path, command):
    args = [a.replace("TABLE", str(ROOT / "weights" / "demo" / "analytic-sd15-reference-nfe5.safetensors"))
            for a in COMMANDS[command]]  # fmt: skip
    run = [sys.executable, "-m", "epd_core", *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ref, out, ck = tmp_path / "ref.safetensors", tmp_path / "out.safetensors", tmp_path / "run.ckpt"
    subprocess.run([*run, "--out", str(ref)], cwd=tmp_path, env=env, check=True, capture_output=True, timeout=600)

    resumable = [*run, "--out", str(out), "--checkpoint", str(ck), "--checkpoint-every", "2"]
    proc = subprocess.Popen(resumable, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while checkpoint_iteration(ck) < 6 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint_iteration(ck)
    assert proc.returncode == -signal.SIGKILL and not out.exists() and killed_at >= 6, proc.stderr.read()
    total = int(args[args.index("--iterations") + 1])
    assert killed_at < total

    subprocess.run(resumable, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=600)
    print(f"\n{command}: killed after checkpoint {killed_at}/{total}, resumed")
    assert_tables_close(load_params(out), load_params(ref))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "ref.safetensors"]  # no checkpoint, no tmp
