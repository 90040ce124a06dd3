"""Sharded training on 2 CPU ranks (gloo): FSDP2 and DDP give the single-process numbers, and
``torch.distributed.checkpoint`` checkpoints resume on another number of ranks (2 → 1, 1 → 2)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("torch.distributed.fsdp")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).parent))
import dist_cases
from cases import SHARDABLE

TOL = 1e-6
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The single-process runs (saving DCP checkpoints at step SAVE_AT), the 2-rank run (which
    resumes from those), then single-process resumes from the 2-rank checkpoints."""
    out = tmp_path_factory.mktemp("dist")
    ckpt1 = out / "ckpt1"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = {name: dist_cases.single(name, ckpt=str(ckpt1 / name)) for name in SHARDABLE}
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
               "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
        script = str(Path(dist_cases.__file__))
        procs = [subprocess.Popen([sys.executable, script, str(out), str(ckpt1)], env={**env, "RANK": str(r)},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
        logs = []
        for p in procs:
            try:
                logs.append(p.communicate(timeout=150)[0])
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                pytest.fail("the 2-rank run did not finish in 150 s")
        assert all(p.returncode == 0 for p in procs), "\n".join(x[-3000:] for x in logs)
        ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
        resumed = {name: dist_cases.single(name, resume=str(out / f"ckpt2_{name}")) for name in SHARDABLE}
        functional = dist_cases.functional_reference()
        groups = dist_cases.single("grokadamw", groups=True)
    finally:
        torch.set_num_threads(threads)
    return {"reference": reference, "ranks": ranks, "resumed_2to1": resumed, "functional": functional,
            "groups": groups}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert list(a) == list(b)
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.mark.parametrize("how", ["fsdp2", "ddp", "resume_1to2"])
@pytest.mark.parametrize("name", list(SHARDABLE))
def test_two_ranks_equal_one_process(runs: dict[str, Any], name: str, how: str) -> None:
    """N steps on 2 ranks (FSDP2, DDP, or FSDP2 resumed from a 1-process DCP checkpoint) give the
    parameters of N steps in one process, on both ranks."""
    ref = runs["reference"][name]
    for rank in runs["ranks"]:
        got = rank[f"{how}/{name}"]
        assert _max_diff(got, ref) <= TOL, (how, name, _max_diff(got, ref))
        assert any((got[n] != dist_cases.full_params(dist_cases.model())[n]).any() for n in got)  # it trained


def test_fsdp2_param_groups_share_one_clip(runs: dict[str, Any]) -> None:
    """Two param groups (decay / no decay) under FSDP2: the clip's one norm spans the groups and
    the ranks, as in one process."""
    for rank in runs["ranks"]:
        got = rank["fsdp2_groups/grokadamw"]
        assert _max_diff(got, runs["groups"]) <= TOL, _max_diff(got, runs["groups"])


@pytest.mark.parametrize("name", ["grokadamw", "grokfast_ma"])
def test_fsdp2_eager_path_equals_one_process(runs: dict[str, Any], name: str) -> None:
    for rank in runs["ranks"]:
        assert _max_diff(rank[f"fsdp2_eager/{name}"], runs["reference"][name]) <= TOL


@pytest.mark.parametrize("name", list(SHARDABLE))
def test_resume_from_two_ranks_in_one_process(runs: dict[str, Any], name: str) -> None:
    """A DCP checkpoint of the 2-rank FSDP2 run at step SAVE_AT, loaded in one process, continues
    to the uninterrupted run's parameters."""
    assert _max_diff(runs["resumed_2to1"][name], runs["reference"][name]) <= TOL


def test_whole_state_dicts_set_into_a_sharded_run(runs: dict[str, Any]) -> None:
    """Gathered (``full_state_dict=True``) model and optimizer state dicts set into a fresh FSDP2
    run: each rank keeps its part, and the run continues to the uninterrupted one's parameters."""
    for rank in runs["ranks"]:
        assert _max_diff(rank["full_state/grokfast_ma"], runs["reference"]["grokfast_ma"]) <= TOL


def test_clip_is_one_all_reduce_per_step(runs: dict[str, Any]) -> None:
    for rank in runs["ranks"]:
        assert rank["all_reduces/grokadamw"] == 1
        assert rank["all_reduces/adamw"] == 0


def test_functional_api_on_dtensors_keeps_state_sharded(runs: dict[str, Any]) -> None:
    for rank in runs["ranks"]:
        f = rank["functional"]
        assert f["state_sharded"] and f["state_leaves"] > 0
        for got, want in zip(f["updates"], runs["functional"]):
            assert _max_diff(got, want) <= TOL


@pytest.mark.parametrize("name", list(SHARDABLE))
def test_dcp_state_dict_of_a_fresh_optimizer_leaves_params_alone(name: str) -> None:
    """``get_optimizer_state_dict`` on an optimizer that has not stepped runs one step with zero
    gradients and lr 0 (as for torch.optim) to create the state: the parameters do not move, and
    the state dict has every parameter's entry, keyed by its name."""
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    m = dist_cases.model()
    before = dist_cases.full_params(m)
    opt = dist_cases.optimizer(m, name)
    osd = get_optimizer_state_dict(m, opt)
    assert _max_diff(dist_cases.full_params(m), before) == 0.0
    assert set(osd["state"]) == set(before)
    assert all(p.grad is None for p in m.parameters())
    assert opt.param_groups[0]["lr"] == SHARDABLE[name].kwargs["lr"]
    set_optimizer_state_dict(m, opt, osd)  # and it loads back
    assert set(opt.state_dict()["state"]) == set(range(len(before)))


def test_set_optimizer_state_dict_refuses_another_transform() -> None:
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    m = dist_cases.model()
    opt = dist_cases.optimizer(m, "grokadamw")
    dist_cases.train(m, opt, 0, 2)
    osd = get_optimizer_state_dict(m, opt)
    other = dist_cases.optimizer(m, "adamw")
    with pytest.raises(ValueError, match="over 'grokxform.pipelines.grokadamw', this one runs 'grokxform.pipelines.adamw'"):
        set_optimizer_state_dict(m, other, osd)
