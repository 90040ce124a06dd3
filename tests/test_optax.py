"""Against optax: where optax has the same transform, the same inputs give the same numbers.

optax and jax's CPU wheels are an optional test extra (``pip install -e ".[test,optax]"``); the
tests skip where they are not installed. jax runs in float32 (its default), so each comparison is
in float32, over several steps, with a tolerance of a few float32 roundings of the values (the two
libraries order their operations differently).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

optax = pytest.importorskip("optax")
jnp = pytest.importorskip("jax.numpy")

import grokxform as gx  # noqa: E402

SHAPES = {"w": (7, 5), "b": (5,), "s": ()}
STEPS = 12


def _params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


def _grads(t: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + t)
    scale = 1e3 if t == 5 else 1.0  # a large step, for the clips
    return {k: scale * torch.randn(s, generator=g) for k, s in SHAPES.items()}


def _to_jax(tree: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {k: jnp.asarray(v.numpy()) for k, v in tree.items()}


def _run_both(ours: gx.GradientTransformation, theirs: Any, steps: int = STEPS) -> list[tuple[dict, dict]]:
    """The updates of ``ours`` (op by op) and of the optax transform ``theirs`` at each step, both
    applied to their own params."""
    p = _params()
    q = _to_jax(p)
    s, r = ours.init(p), theirs.init(q)
    out = []
    for t in range(steps):
        g = _grads(t)
        with gx.kernels(False):
            u, s = ours.update(g, s, p)
        v, r = theirs.update(_to_jax(g), r, q)
        out.append((u, v))
        p = gx.apply_updates(p, u)
        q = optax.apply_updates(q, v)
    return out


def _assert_same(pairs: list[tuple[dict, dict]], rtol: float = 2e-5, atol: float = 1e-6) -> None:
    for t, (u, v) in enumerate(pairs):
        for k in u:
            np.testing.assert_allclose(u[k].numpy(), np.asarray(v[k]), rtol=rtol, atol=atol,
                                       err_msg=f"step {t}, leaf {k!r}")


CASES: dict[str, tuple[Callable[[], gx.GradientTransformation], Callable[[], Any]]] = {
    "scale_by_adam": (lambda: gx.scale_by_adam(), lambda: optax.scale_by_adam()),
    "adamw": (lambda: gx.adamw(1e-2, (0.9, 0.99), 1e-8, 0.1),
              lambda: optax.adamw(1e-2, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1)),
    "clip_by_global_norm": (lambda: gx.clip_by_global_norm(2.0), lambda: optax.clip_by_global_norm(2.0)),
    "trace": (lambda: gx.trace(0.9), lambda: optax.trace(0.9)),
    "trace_nesterov": (lambda: gx.trace(0.9, nesterov=True), lambda: optax.trace(0.9, nesterov=True)),
    "sgd_momentum": (lambda: gx.sgd(1e-2, momentum=0.9), lambda: optax.sgd(1e-2, momentum=0.9)),
    "sgd_nesterov": (lambda: gx.sgd(1e-2, momentum=0.9, nesterov=True),
                     lambda: optax.sgd(1e-2, momentum=0.9, nesterov=True)),
    "lion": (lambda: gx.lion(1e-3, 0.9, 0.99, weight_decay=0.1),
             lambda: optax.lion(1e-3, b1=0.9, b2=0.99, weight_decay=0.1)),
    "chain_clip_adam_lr": (
        lambda: gx.chain(gx.clip_by_global_norm(1.0), gx.scale_by_adam(), gx.scale_by_learning_rate(1e-3)),
        lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(), optax.scale(-1e-3)),
    ),
    "masked_adam": (
        lambda: gx.masked(gx.scale_by_adam(), lambda path, p: p.ndim == 2),
        lambda: optax.masked(optax.scale_by_adam(), {"w": True, "b": False, "s": False}),
    ),
    "partition": (
        lambda: gx.partition({"adam": gx.adamw(1e-2, weight_decay=0.0), "sgd": gx.sgd(1e-1)},
                             lambda path, p: "adam" if p.ndim == 2 else "sgd"),
        lambda: optax.multi_transform({"adam": optax.adam(1e-2), "sgd": optax.sgd(1e-1)},
                                      {"w": "adam", "b": "sgd", "s": "sgd"}),
    ),
    "multi_steps": (
        lambda: gx.MultiSteps(gx.adamw(1e-2, weight_decay=0.0), every_k_schedule=3),
        lambda: optax.MultiSteps(optax.adam(1e-2), every_k_schedule=3),
    ),
    "adam": (lambda: gx.adam(1e-2), lambda: optax.adam(1e-2)),
    "scale_by_rms": (lambda: gx.scale_by_rms(0.9, 1e-8, eps_in_sqrt=True), lambda: optax.scale_by_rms(0.9, 1e-8)),
    "scale_by_stddev": (lambda: gx.scale_by_stddev(0.9, 1e-8, eps_in_sqrt=True),
                        lambda: optax.scale_by_stddev(0.9, 1e-8)),
    "lamb": (lambda: gx.lamb(1e-2, weight_decay=0.01), lambda: optax.lamb(1e-2, weight_decay=0.01)),
    "scale_by_trust_ratio": (lambda: gx.scale_by_trust_ratio(min_norm=0.5, trust_coefficient=0.1),
                             lambda: optax.scale_by_trust_ratio(min_norm=0.5, trust_coefficient=0.1)),
    "centralize": (lambda: gx.centralize(), lambda: optax.centralize()),
    "scale": (lambda: gx.scale(-0.5), lambda: optax.scale(-0.5)),
    "clip": (lambda: gx.clip(0.3), lambda: optax.clip(0.3)),
    "zero_nans": (lambda: gx.zero_nans(), lambda: optax.zero_nans()),
    "apply_every": (lambda: gx.apply_every(3), lambda: optax.apply_every(3)),
    "inject_hyperparams": (
        lambda: gx.inject_hyperparams(gx.adamw)(lr=1e-2, weight_decay=0.0),
        lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_numbers_as_optax(name: str) -> None:
    ours, theirs = CASES[name]
    _assert_same(_run_both(ours(), theirs()))


SCHEDULES: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
    "cosine_decay_schedule": (lambda: gx.cosine_decay_schedule(1e-2, 100, alpha=0.1, exponent=2.0),
                              lambda: optax.cosine_decay_schedule(1e-2, 100, alpha=0.1, exponent=2.0)),
    "exponential_decay": (lambda: gx.exponential_decay(1e-2, 10, 0.5, transition_begin=5, staircase=True,
                                                       end_value=1e-4),
                          lambda: optax.exponential_decay(1e-2, 10, 0.5, transition_begin=5, staircase=True,
                                                          end_value=1e-4)),
    "piecewise_constant_schedule": (lambda: gx.piecewise_constant_schedule(1e-2, {10: 0.5, 50: 0.1}),
                                    lambda: optax.piecewise_constant_schedule(1e-2, {10: 0.5, 50: 0.1})),
    "cosine_onecycle_schedule": (lambda: gx.cosine_onecycle_schedule(200, 1e-2),
                                 lambda: optax.cosine_onecycle_schedule(200, 1e-2)),
    "join_schedules": (
        lambda: gx.join_schedules([gx.cosine_decay_schedule(1e-2, 20), gx.exponential_decay(1e-3, 5, 0.9)], [20]),
        lambda: optax.join_schedules([optax.cosine_decay_schedule(1e-2, 20), optax.exponential_decay(1e-3, 5, 0.9)],
                                     [20]),
    ),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_same_schedule_as_optax(name: str) -> None:
    """optax computes a schedule in float32 (jax's default), grokxform in float64: a few float32
    roundings apart."""
    ours, theirs = (make() for make in SCHEDULES[name])
    for t in [0, 1, 4, 5, 9, 10, 11, 19, 20, 21, 49, 50, 51, 60, 99, 100, 101, 199, 200, 201, 1000]:
        np.testing.assert_allclose(float(ours(torch.tensor(t))), float(theirs(t)), rtol=1e-5, atol=1e-10,
                                   err_msg=f"{name}, t = {t}")


def test_warmup_cosine_decay_is_optax_schedule() -> None:
    ours = gx.warmup_cosine_decay(peak=1e-2, warmup_steps=10, decay_steps=100, end=1e-4)
    theirs = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 10, 100, end_value=1e-4)
    for t in [0, 1, 5, 9, 10, 11, 50, 99, 100, 101, 500]:
        np.testing.assert_allclose(float(ours(torch.tensor(t))), float(theirs(t)), rtol=2e-6, atol=1e-9,
                                   err_msg=f"t = {t}")
