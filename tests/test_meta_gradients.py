"""Differentiating through the optimizer: the gradient of the loss after K unrolled steps with
respect to the learning rate or Grokfast's λ, from autograd, equals central finite differences."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import grokxform as gx
from grokxform._resum import window_sum

F64 = torch.float64


def _problem() -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g, dtype=F64)
    y = x @ torch.randn(4, 1, generator=g, dtype=F64) + 0.1 * torch.randn(32, 1, generator=g, dtype=F64)
    return x, y, {"w": torch.zeros(4, 1, dtype=F64), "b": torch.zeros(1, dtype=F64)}


def _loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((x @ p["w"] + p["b"] - y) ** 2).mean()


def _unrolled(tx: gx.GradientTransformation, steps: int = 6, state: Any = None) -> torch.Tensor:
    x, y, params = _problem()
    state = tx.init(params) if state is None else state
    for _ in range(steps):
        grads = torch.func.grad(_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        params = gx.apply_updates(params, updates)
    return _loss(params, x, y)


def _grokfast(lr: torch.Tensor, lamb: torch.Tensor) -> gx.GradientTransformation:
    return gx.chain(gx.amplify(gx.ema_filter(0.9), lamb), gx.scale_by_adam(),
                    gx.decoupled_weight_decay(0.01), gx.scale_by_learning_rate(lr))


def _central(f: Any, x: float, h: float = 1e-6) -> float:
    return float((f(x + h) - f(x - h)) / (2 * h))


@pytest.mark.parametrize("wrt", ["lr", "lamb"])
def test_meta_gradient_through_unrolled_grokfast_matches_finite_differences(wrt: str) -> None:
    hp = {"lr": torch.tensor(0.05, dtype=F64, requires_grad=True),
          "lamb": torch.tensor(2.0, dtype=F64, requires_grad=True)}
    (autograd,) = torch.autograd.grad(_unrolled(_grokfast(hp["lr"], hp["lamb"])), hp[wrt])

    def at(v: float) -> torch.Tensor:
        vals = {k: t.detach() for k, t in hp.items()} | {wrt: torch.tensor(v, dtype=F64)}
        return _unrolled(_grokfast(vals["lr"], vals["lamb"]))

    fd = _central(at, float(hp[wrt]))
    assert abs(float(autograd)) > 1e-4  # the loss does depend on it: the check is not vacuous
    assert float(autograd) == pytest.approx(fd, rel=1e-6, abs=1e-10)


def test_meta_gradient_of_an_injected_learning_rate_matches_finite_differences() -> None:
    def loss_at(lr: torch.Tensor) -> torch.Tensor:
        tx = gx.inject_hyperparams(gx.grokfast_ema)(lr=0.05, alpha=0.9, lamb=2.0)
        _, _, params = _problem()
        state = tx.init(params)
        state.hyperparams["lr"] = lr
        return _unrolled(tx, state=state)

    lr = torch.tensor(0.05, dtype=F64, requires_grad=True)
    (autograd,) = torch.autograd.grad(loss_at(lr), lr)
    fd = _central(lambda v: loss_at(torch.tensor(v, dtype=F64)), 0.05)
    assert abs(float(autograd)) > 1e-4
    assert float(autograd) == pytest.approx(fd, rel=1e-6, abs=1e-10)


def test_a_gradient_step_on_the_learning_rate_lowers_the_unrolled_loss() -> None:
    lr = torch.tensor(0.01, dtype=F64, requires_grad=True)
    before = _unrolled(_grokfast(lr, torch.tensor(2.0, dtype=F64)))
    (g,) = torch.autograd.grad(before, lr)
    after = _unrolled(_grokfast(lr.detach() - 1e-3 * g.sign(), torch.tensor(2.0, dtype=F64)))
    assert float(after) < float(before)


# -- Grokfast-MA: the window's re-sum under torch.func and autograd -------------------------------

MA_STEPS = 7
"""Unrolled steps: with a window of 3 the running sum is re-summed on updates 3 and 6."""


def _ma(pipeline: str, filter_type: str, warmup: bool, hp: dict[str, torch.Tensor]) -> gx.GradientTransformation:
    if pipeline == "ma_filter":
        filt = gx.ma_filter(3, filter_type, warmup)
        return gx.chain(gx.amplify(filt, hp["lamb"]), gx.scale_by_learning_rate(hp["lr"]))
    return gx.grokfast_ma(lr=hp["lr"], window_size=3, lamb=hp["lamb"], filter_type=filter_type, warmup=warmup)


def _ma_loss(pipeline: str, filter_type: str, warmup: bool, params: dict[str, torch.Tensor],
             lamb: torch.Tensor) -> torch.Tensor:
    x, y = MA_DATA
    tx = _ma(pipeline, filter_type, warmup, {"lamb": lamb, "lr": torch.tensor(0.05, dtype=F64)})
    state = tx.init(params)
    for _ in range(MA_STEPS):
        grads = torch.func.grad(_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        params = gx.apply_updates(params, updates)
    return _loss(params, x, y)


MA_DATA = _problem()[:2]
"""The regression's inputs and targets, drawn once (no random draw under ``vmap``)."""
MA_CASES = [(p, f, w) for p in ("ma_filter", "grokfast_ma") for f in ("mean", "sum") for w in (True, False)]


def _start() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"w": 0.1 * torch.randn(4, 1, generator=g, dtype=F64), "b": torch.zeros(1, dtype=F64)}


@pytest.mark.parametrize(("pipeline", "filter_type", "warmup"), MA_CASES)
def test_torch_func_grad_and_jvp_through_ma_match_finite_differences_in_lambda(
    pipeline: str, filter_type: str, warmup: bool
) -> None:
    """d(loss after 7 steps)/dλ through the re-sums: torch.func.grad, torch.func.jvp and
    torch.func.vmap of grad over two values of λ, against central finite differences."""
    params = _start()

    def loss(lamb: torch.Tensor) -> torch.Tensor:
        return _ma_loss(pipeline, filter_type, warmup, params, lamb)

    lambs = torch.tensor([2.0, 0.5], dtype=F64)
    fds = [_central(lambda v: loss(torch.tensor(v, dtype=F64)), float(v)) for v in lambs]
    assert abs(fds[0]) > 1e-4  # the loss does depend on λ: the check is not vacuous
    _, by_jvp = torch.func.jvp(loss, (lambs[0],), (torch.ones((), dtype=F64),))
    assert float(by_jvp) == pytest.approx(fds[0], rel=1e-7)
    by_grad = torch.func.grad(loss)(lambs[0])
    assert float(by_grad) == pytest.approx(fds[0], rel=1e-7)
    assert float(by_jvp) == pytest.approx(float(by_grad), rel=1e-12)
    by_vmap = torch.func.vmap(torch.func.grad(loss))(lambs)
    for got, fd in zip(by_vmap.tolist(), fds):
        assert got == pytest.approx(fd, rel=1e-7)


@pytest.mark.parametrize(("pipeline", "filter_type", "warmup"), MA_CASES)
def test_torch_func_grad_and_jvp_through_ma_match_finite_differences_in_the_initial_params(
    pipeline: str, filter_type: str, warmup: bool
) -> None:
    """The derivative of the loss after 7 steps along a direction of the initial params: the
    torch.func.grad dotted with it, torch.func.jvp along it and central finite differences."""
    params, lamb = _start(), torch.tensor(2.0, dtype=F64)
    g = torch.Generator().manual_seed(2)
    direction = {n: torch.randn(p.shape, generator=g, dtype=F64) for n, p in params.items()}

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return _ma_loss(pipeline, filter_type, warmup, p, lamb)

    def along(h: float) -> torch.Tensor:
        return loss({n: p + h * direction[n] for n, p in params.items()})

    fd = _central(along, 0.0)
    assert abs(fd) > 1e-4
    _, by_jvp = torch.func.jvp(loss, (params,), (direction,))
    assert float(by_jvp) == pytest.approx(fd, rel=1e-7)
    grads = torch.func.grad(loss)(params)
    by_grad = float(sum((grads[n] * direction[n]).sum() for n in params))
    assert by_grad == pytest.approx(fd, rel=1e-7)
    assert float(by_jvp) == pytest.approx(by_grad, rel=1e-12)


@pytest.mark.parametrize("ring", [False, True], ids=["list", "ring"])
def test_the_window_sum_operator_passes_the_gradient_to_each_value_of_the_window(ring: bool) -> None:
    """``grokxform::window_sum`` (a bfloat16 window, a float32 newest value, a float32 sum):
    each value of the window gets the incoming gradient in its dtype, as autograd gives it
    through the plain float64 sum; a ring buffer's last slot, not in the window, gets zero."""
    g = torch.Generator().manual_seed(4)
    size = 4
    ring_buffer = torch.randn(size, 5, generator=g).to(torch.bfloat16).requires_grad_()
    older = [t.detach().requires_grad_() for t in ring_buffer.unbind()][: size - 1]
    newest = torch.randn(5, generator=g).requires_grad_()
    weights = torch.randn(5, generator=g)
    operands = [ring_buffer, newest] if ring else [*older, newest]
    out = torch.ops.grokxform.window_sum(operands, ring, size, torch.float32)
    got = torch.autograd.grad((out * weights).sum(), operands)
    plain = [o.detach().requires_grad_() for o in [*older, newest]]
    want = torch.autograd.grad((window_sum(plain, torch.float32) * weights).sum(), plain)
    assert torch.equal(out, window_sum([o.detach() for o in [*older, newest]], torch.float32))
    if ring:
        assert torch.equal(got[0][: size - 1], torch.stack(want[: size - 1]))
        assert torch.equal(got[0][size - 1], torch.zeros(5, dtype=torch.bfloat16))
        assert torch.equal(got[1], want[-1])
    else:
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("ring", [False, True], ids=["list", "ring"])
def test_under_vmap_a_window_value_shared_by_the_members_gets_the_sum_of_their_gradients(ring: bool) -> None:
    """``torch.func.vmap`` over the newest value only, differentiated by ``torch.autograd``: the
    operator's vmap rule broadcasts the older values, and its gradient sums over the members as
    autograd does through the plain float64 sum."""
    g = torch.Generator().manual_seed(6)
    size = 3
    ring_buffer = torch.randn(size, 5, generator=g, dtype=F64).requires_grad_()
    older = [t.detach().requires_grad_() for t in ring_buffer.unbind()][: size - 1]
    newest = torch.randn(4, 5, generator=g).requires_grad_()
    weights = torch.randn(4, 5, generator=g, dtype=F64)
    shared = [ring_buffer] if ring else older

    def by_op(n: torch.Tensor) -> torch.Tensor:
        return torch.ops.grokxform.window_sum([*shared, n], ring, size, F64)

    def by_plain(n: torch.Tensor) -> torch.Tensor:
        return window_sum([*older, n], F64)

    got = torch.autograd.grad((torch.func.vmap(by_op)(newest) * weights).sum(), [*shared, newest])
    want = torch.autograd.grad((torch.func.vmap(by_plain)(newest) * weights).sum(), [*older, newest])
    if ring:
        assert torch.equal(got[0], torch.cat([torch.stack(want[: size - 1]), torch.zeros(1, 5, dtype=F64)]))
    else:
        assert all(torch.equal(a, b) for a, b in zip(got[:-1], want[:-1]))
    assert torch.equal(got[-1], want[-1])


def test_a_compiled_unrolled_ma_loss_has_the_eager_meta_gradient() -> None:
    """``torch.compile`` (one graph) of the loss after 7 steps of an amplified ``ma_filter``,
    differentiated by ``torch.autograd``: the graph holds the re-sum operator
    ``grokxform::window_sum`` and the meta-gradient equals the eager one."""
    params = _start()
    targets: list[str] = []

    def backend(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Any:
        targets.extend(str(node.target) for node in gm.graph.nodes)
        return torch._dynamo.lookup_backend("aot_eager")(gm, inputs)

    def loss(lamb: torch.Tensor) -> torch.Tensor:
        return _ma_loss("ma_filter", "mean", True, params, lamb)

    lamb = torch.tensor(2.0, dtype=F64, requires_grad=True)
    (compiled,) = torch.autograd.grad(torch.compile(loss, backend=backend, fullgraph=True)(lamb), lamb)
    (eager,) = torch.autograd.grad(loss(lamb), lamb)
    assert "grokxform.window_sum.default" in targets
    assert float(compiled) == pytest.approx(float(eager), rel=1e-12)
    assert float(eager) == pytest.approx(_central(lambda v: loss(torch.tensor(v, dtype=F64)), 2.0), rel=1e-7)


def test_a_torch_func_transform_of_a_traced_ma_loss_is_refused_with_a_clear_error() -> None:
    from torch.fx.experimental.proxy_tensor import make_fx

    params = _start()

    def loss(lamb: torch.Tensor) -> torch.Tensor:
        return _ma_loss("ma_filter", "mean", False, params, lamb)

    with pytest.raises(RuntimeError, match="ma_filter: torch.func.grad .* inside a graph traced by make_fx"):
        make_fx(torch.func.grad(loss))(torch.tensor(2.0, dtype=F64))
