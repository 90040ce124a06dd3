"""Kill a training process mid-run, resume from its last checkpoint, get the uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

TRAINER = textwrap.dedent(
    """
    import os, sys, time, torch
    import grokxform as gx
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    out, steps, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = gx.Optimizer(model.named_parameters(), gx.grokadamw, lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 5))
    ckpt = os.path.join(out, "last.pt")
    start = 0
    if os.path.exists(ckpt):
        c = torch.load(ckpt, weights_only=True)
        model.load_state_dict(c["model"]); opt.load_state_dict(c["opt"]); sched.load_state_dict(c["sched"])
        start = c["step"]
    for t in range(start, steps):
        g = torch.Generator().manual_seed(t)            # the data of step t, whoever runs it
        x = torch.randn(32, 6, generator=g); y = x.sum(1, keepdim=True).sin()
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(); loss.backward()
        opt.step(train_loss=loss.detach(), val_loss=loss.detach() * 1.5)
        sched.step()
        tmp = ckpt + ".tmp"                                # atomic: a kill never leaves half a file
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "step": t + 1}, tmp)
        os.replace(tmp, ckpt)
        print(t + 1, flush=True)
        time.sleep(delay)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, os.path.join(out, "final.pt"))
    """
)

STEPS = 30


def _python(script: Path, out: Path, delay: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(script), str(out), str(STEPS), str(delay)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _equal(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="uses SIGKILL")
def test_killed_run_resumes_bit_for_bit(tmp_path: Path):
    script = tmp_path / "train.py"
    script.write_text(TRAINER)
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    whole.mkdir()
    crashed.mkdir()

    ref = _python(script, whole, 0.0)
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err

    victim = _python(script, crashed, 0.2)
    deadline = time.time() + 120
    done = 0
    while done < 8 and time.time() < deadline:  # let it write a few checkpoints, then kill it hard
        line = victim.stdout.readline()
        done = int(line) if line.strip().isdigit() else done
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    assert not (crashed / "final.pt").exists()
    killed_at = torch.load(crashed / "last.pt", weights_only=True)["step"]
    assert 8 <= killed_at < STEPS

    resumed = _python(script, crashed, 0.0)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err

    a = torch.load(whole / "final.pt", weights_only=True)
    b = torch.load(crashed / "final.pt", weights_only=True)
    assert _equal(a["model"], b["model"])
    assert _equal(a["opt"], b["opt"])
