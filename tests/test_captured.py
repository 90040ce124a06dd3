"""What torch.optim survives, grokxform survives: the drop-in optimizer and the fused step never
trust the tensors, shapes, dtypes, lists and values they captured when a step was built.

Each test is a probe a user can run: the tensors of a parameter replaced after the first step
(``p.data = ...``, ``model.double()``), a gradient of another shape or dtype, a state dict kept
while training goes on, ``torch.compile`` of the step with an LR scheduler, a misspelt step
argument, a hyperparameter edited to NaN, ``group["params"]`` edited, patterns of ``None``
gradients, a tampered checkpoint. Where torch.optim.AdamW has an answer, grokxform's is
compared with it on the same script.
"""

from __future__ import annotations

import copy
import io
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import grokxform as gx
from grokxform import _state_io
from grokxform.fused import STEP_CACHE_SIZE, FusedStep

ENGINES = [None, False]  # the default engine (its C kernels on the CPU); the eager tx.update


def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _backward(model: nn.Module, t: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + t)
    dtype = next(model.parameters()).dtype
    x, y = torch.randn(16, 5, generator=g, dtype=dtype), torch.randn(16, 3, generator=g, dtype=dtype)
    for p in model.parameters():
        p.grad = None
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    return loss.detach()


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, **extra: Any) -> None:
    for t in steps:
        _backward(model, t)
        opt.step(**extra)


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))


def _roundtrip(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# -- 1. the tensors of a parameter replaced after the first step --------------------------------


@pytest.mark.parametrize("fused", ENGINES)
def test_replaced_parameter_storage_is_followed_as_torch_adamw_follows_it(fused: Any) -> None:
    """``p.data = new_tensor`` after the first step: the next steps update the new tensor (the
    one the model uses), with the state kept, exactly as torch.optim.AdamW does."""
    model, ref = _model(), _model()
    opt = gx.Optimizer(model.named_parameters(), gx.adamw, lr=1e-2, weight_decay=0.01, fused=fused)
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.01)
    for m, o in ((model, opt), (ref, torch_opt)):
        _train(m, o, range(1))
        with torch.no_grad():
            m[0].weight.data = m[0].weight.detach().clone() * 0.5  # new storage, same shape
        _train(m, o, range(1, 11))
    assert _max_diff(_weights(model), _weights(ref)) < 1e-6
    moved = (model[0].weight - ref[0].weight.detach()).abs().max().item()
    assert moved < 1e-6 and not torch.equal(model[0].weight, torch.zeros_like(model[0].weight))


def _functional(tx: gx.GradientTransformation, steps: range, cast: torch.dtype) -> list[torch.Tensor]:
    """The same run through ``tx.update`` op by op: after the first step the params, and the state as
    ``init`` would make it for the new dtype, are cast to ``cast``."""
    model = _model()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = tx.init(params)
    for t in steps:
        if t == 1:
            params = {n: p.to(cast) for n, p in params.items()}
            state = torch.utils._pytree.tree_map(
                lambda s, like: s.to(like.dtype) if isinstance(s, torch.Tensor) else s, state, tx.init(params)
            )
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.data = params[n].clone()
        _backward(model, t)
        with gx.kernels(False):  # torch's own ops: the reference
            updates, state = tx.update({n: p.grad for n, p in model.named_parameters()}, state, params)
        params = gx.apply_updates(params, updates)
    return list(params.values())


@pytest.mark.parametrize("fused", ENGINES)
@pytest.mark.parametrize("convert", ["double", "half", "to"])
def test_model_cast_after_the_first_step_is_followed(fused: Any, convert: str) -> None:
    """``model.double()`` / ``.half()`` / ``.to(dtype)`` after the first step: the optimizer
    follows the new tensors, its state cast to what ``init`` gives for them (float64 moments for
    float64 params; float32 ones for float16 params), as the functional loop does it."""
    dtype = {"double": torch.float64, "half": torch.float16, "to": torch.float64}[convert]
    model = _model()
    opt = gx.Optimizer(model.named_parameters(), gx.grokfast_ma, lr=1e-2, window_size=3, fused=fused)
    _train(model, opt, range(1))
    before = _weights(model)
    if convert == "double":
        model.double()
    elif convert == "half":
        model.half()
    else:
        model.to(torch.float64)
    _train(model, opt, range(1, 8))
    assert _max_diff(_weights(model), [b.to(dtype) for b in before]) > 1e-3  # the model's own weights moved
    expected = _functional(gx.grokfast_ma(lr=1e-2, window_size=3), range(8), dtype)
    # (the default engine's first, float32 step is within float32 rounding of eager's: its C kernels
    # round every square root correctly, torch's CPU sqrt not always)
    tol = 1e-3 if dtype != torch.float64 else 1e-12 if fused is False else 1e-6
    assert _max_diff(_weights(model), expected) <= tol
    mu = opt.state[model[0].weight]["adam.mu"]
    assert mu.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("fused", ENGINES)
def test_a_parameter_of_another_shape_is_refused_by_name(fused: Any) -> None:
    model = _model()
    opt = gx.Optimizer(model.named_parameters(), gx.adamw, lr=1e-2, fused=fused)
    _train(model, opt, range(1))
    model[2].bias.data = torch.zeros(4)
    model[2].bias.grad = torch.ones(4)
    before = _weights(model)
    with pytest.raises(ValueError, match=r"'2\.bias'.*changed shape from \(3,\) to \(4,\)"):
        opt.step()
    assert _max_diff(_weights(model), before) == 0.0


def test_fused_step_follows_replaced_storage_and_refuses_a_new_shape() -> None:
    model = _model()
    params = dict(model.named_parameters())
    step = FusedStep(gx.adamw(lr=1e-2), params, backend="foreach")
    _backward(model, 0)
    step({n: p.grad for n, p in params.items()})
    with torch.no_grad():
        model[0].weight.data = model[0].weight.detach().clone()
    old = model[0].weight.detach().clone()
    _backward(model, 1)
    step({n: p.grad for n, p in params.items()})
    assert not torch.equal(model[0].weight, old)  # the new storage was written
    model[0].bias.data = torch.zeros(9)
    with pytest.raises(ValueError, match=r"param at path '0\.bias'"):
        step({n: torch.zeros_like(p) for n, p in params.items()})


# -- 2. a gradient of another shape or dtype ----------------------------------------------------


@pytest.mark.parametrize("fused", ENGINES)
def test_a_gradient_of_another_shape_is_refused_not_broadcast(fused: Any) -> None:
    model = _model()
    opt = gx.Optimizer(model.named_parameters(), gx.adamw, lr=1e-2, fused=fused)
    _train(model, opt, range(2))
    _backward(model, 2)
    model[2].bias.grad.data = torch.ones(1)
    before = _weights(model)
    with pytest.raises(ValueError, match=r"2\.bias"):
        opt.step()
    assert _max_diff(_weights(model), before) == 0.0


@pytest.mark.parametrize("backend", ["foreach", "inductor"])
def test_compile_step_given_float64_gradients_after_its_first_call(backend: str) -> None:
    """A step built for float32 gradients, then given float64 ones: built again for them, and
    the result is the eager ``tx.update``'s (never float64 bytes read as float32)."""
    tx = gx.adamw(lr=0.1)
    params = {"w": torch.ones(5), "b": torch.zeros(3)}
    grads = [{"w": torch.full((5,), 0.5), "b": torch.full((3,), -1.0)} for _ in range(3)]
    grads[1] = {n: g.double() * 2 for n, g in grads[1].items()}
    grads[2] = {n: g.double() for n, g in grads[2].items()}
    fused_params = {n: p.clone() for n, p in params.items()}
    step = FusedStep(tx, fused_params, backend=backend)
    state = tx.init(params)
    for g in grads:
        step(g)
        u, state = tx.update(g, state, params)
        params = gx.apply_updates(params, u)
    for n in params:
        torch.testing.assert_close(fused_params[n], params[n], rtol=1e-6, atol=1e-7)
    assert step.compiles == 2


# -- 3. a state dict kept while training goes on ------------------------------------------------


@pytest.mark.parametrize("fused", ENGINES)
@pytest.mark.parametrize("pipeline", ["grokfast_ma", "grokadamw"])
def test_a_state_dict_kept_in_memory_is_the_state_of_the_last_step(fused: Any, pipeline: str) -> None:
    """A state dict taken at step 6 and kept while training goes on to step 8 is the state of
    step 8, every tensor of it (as torch.optim's is): resuming from it with the step-8 params is
    the uninterrupted run bit for bit. A deep copy taken at step 6 resumes from step 6."""
    factory = getattr(gx, pipeline)
    kwargs: dict[str, Any] = {"lr": 1e-2, **({"window_size": 3} if pipeline == "grokfast_ma" else {})}
    model = _model()
    opt = gx.Optimizer(model.named_parameters(), factory, fused=fused, **kwargs)
    _train(model, opt, range(6), train_loss=0.3, val_loss=0.9)
    kept = opt.state_dict()
    snapshot, weights6 = copy.deepcopy(kept), copy.deepcopy(model.state_dict())
    _train(model, opt, range(6, 8), train_loss=0.3, val_loss=0.9)
    kept_at_8, weights8 = _roundtrip(kept), copy.deepcopy(model.state_dict())  # the dict taken at 6, read at 8
    assert int(kept_at_8["state"][0]["group.count"]) == 8
    _train(model, opt, range(8, 20), train_loss=0.3, val_loss=0.9)
    for sd, weights, start in ((kept_at_8, weights8, 8), (snapshot, weights6, 6)):
        twin = _model()
        twin.load_state_dict(weights)
        twin_opt = gx.Optimizer(twin.named_parameters(), factory, fused=fused, **kwargs)
        twin_opt.load_state_dict(_roundtrip(sd))
        _train(twin, twin_opt, range(start, 20), train_loss=0.3, val_loss=0.9)
        assert _max_diff(_weights(twin), _weights(model)) == 0.0, start


def test_a_checkpoint_of_format_2_still_loads() -> None:
    """Format 2 gave MA windows oldest first; it resumes as the current format does."""
    model = _model()
    opt = gx.Optimizer(model.named_parameters(), gx.grokfast_ma, lr=1e-2, window_size=3)
    _train(model, opt, range(5))
    sd = opt.state_dict()
    names = [n for n, _ in model.named_parameters()]
    entries = _state_io.param_entries(opt.tx_states[0], names)  # windows oldest first
    old = {"state": {i: {k: v.clone() for k, v in entries[n].items()} for i, n in enumerate(names)},
           "param_groups": [{**sd["param_groups"][0], "grokxform_version": 2}]}
    twin = _model()
    twin.load_state_dict(model.state_dict())
    twin_opt = gx.Optimizer(twin.named_parameters(), gx.grokfast_ma, lr=1e-2, window_size=3)
    twin_opt.load_state_dict(_roundtrip(old))
    _train(model, opt, range(5, 9))
    _train(twin, twin_opt, range(5, 9))
    assert _max_diff(_weights(twin), _weights(model)) == 0.0


# -- 4. torch.compile of the step with an LR scheduler ------------------------------------------


@pytest.mark.parametrize("what, lr_kind", [
    ("opt.step", "float"),
    ("opt.step", "tensor"),
    pytest.param("training step", "float", marks=pytest.mark.slow),
    ("training step", "tensor"),
])
def test_compiled_step_follows_the_scheduler_in_as_few_graphs_as_torch_adamw(lr_kind: str, what: str) -> None:
    """``torch.compile(opt.step)`` and ``torch.compile`` of a whole training step, with StepLR:
    the learning rates are the scheduler's (the params equal the uncompiled run's), and Dynamo
    builds as many graphs as for torch.optim.AdamW on the same script: for ``opt.step`` one, and
    one more for a float lr once it changes (a constant of the first graph, then an input); a
    training step adds the graph before ``backward()``."""
    from torch._dynamo.utils import counters

    batches = [(torch.randn(16, 5, generator=torch.Generator().manual_seed(t)), torch.randn(16, 3)) for t in range(12)]

    def run(optimizer: str, compiled: bool) -> tuple[list[torch.Tensor], int]:
        model = _model()
        lr = torch.tensor(0.01) if lr_kind == "tensor" else 0.01
        if optimizer == "torch":
            opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        else:
            opt = gx.Optimizer(model.named_parameters(), gx.adamw, lr=lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)
        torch._dynamo.reset()
        counters.clear()
        opt_step = torch.compile(opt.step, backend="aot_eager") if compiled and what == "opt.step" else opt.step

        def training_step(x: torch.Tensor, y: torch.Tensor) -> None:
            for p in model.parameters():
                p.grad = None
            nn.functional.mse_loss(model(x), y).backward()
            opt_step()

        step = torch.compile(training_step, backend="aot_eager") if compiled and what != "opt.step" else training_step
        for x, y in batches:
            step(x, y)
            sched.step()
        return _weights(model), int(counters["stats"]["unique_graphs"])

    eager, _ = run("grokxform", False)
    compiled, graphs = run("grokxform", True)
    torch_eager, _ = run("torch", False)
    torch_compiled, torch_graphs = run("torch", True)
    assert _max_diff(compiled, eager) < 1e-6
    assert _max_diff(compiled, torch_compiled) < 1e-5 and _max_diff(torch_compiled, torch_eager) < 1e-6
    assert graphs == torch_graphs
    if what == "opt.step":
        assert graphs == (2 if lr_kind == "float" else 1)


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["grokfast_ma", "grokadamw"])
def test_compiled_step_of_windows_and_signals_equals_the_eager_one(pipeline: str) -> None:
    """Inside ``torch.compile`` the step reads the state as the engine holds it (MA windows as
    ring buffers) and writes it back in place: the same numbers as uncompiled, and the state dict
    then resumes an uncompiled optimizer bit for bit."""
    kwargs: dict[str, Any] = {"lr": 1e-2, **({"window_size": 3} if pipeline == "grokfast_ma" else {})}
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = _model()
        opt = gx.Optimizer(model.named_parameters(), getattr(gx, pipeline), **kwargs)
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        for t in range(7):
            _backward(model, t)
            step(train_loss=torch.tensor(0.3), val_loss=torch.tensor(0.9))
        runs.append((model, opt))
    (eager, eager_opt), (comp, comp_opt) = runs
    assert _max_diff(_weights(comp), _weights(eager)) < 1e-6
    twin = _model()
    twin.load_state_dict(comp.state_dict())
    twin_opt = gx.Optimizer(twin.named_parameters(), getattr(gx, pipeline), **kwargs)
    twin_opt.load_state_dict(_roundtrip(comp_opt.state_dict()))
    for m, o in ((eager, eager_opt), (twin, twin_opt)):
        _train(m, o, range(7, 10), train_loss=0.3, val_loss=0.9)
    assert _max_diff(_weights(twin), _weights(eager)) < 1e-6


def test_compiled_step_with_a_tensor_lr_and_inductor() -> None:
    """The same under Inductor (the default backend), with a tensor lr: each step uses the
    scheduler's value."""
    torch._dynamo.reset()
    model, ref = _model(), _model()
    opt = gx.Optimizer(model.named_parameters(), gx.adamw, lr=torch.tensor(0.01))
    ref_opt = gx.Optimizer(ref.named_parameters(), gx.adamw, lr=0.01)
    scheds = [torch.optim.lr_scheduler.StepLR(o, 2, 0.5) for o in (opt, ref_opt)]
    cstep = torch.compile(opt.step)
    for t in range(6):
        _backward(model, t)
        cstep()
        _train(ref, ref_opt, range(t, t + 1))
        for s in scheds:
            s.step()
    assert _max_diff(_weights(model), _weights(ref)) < 1e-6


# -- 5. step arguments the chain does not take -------------------------------------------------


@pytest.mark.parametrize("fused", ENGINES)
@pytest.mark.parametrize(("given", "meant"), [("eval_loss", "val_loss"), ("trian_loss", "train_loss")])
def test_a_step_argument_no_transform_reads_is_refused_with_the_right_name(fused: Any, given: str, meant: str) -> None:
    model = _model()
    opt = gx.Optimizer(model.named_parameters(), gx.grokadamw, lr=1e-2, fused=fused)
    _backward(model, 0)
    before = _weights(model)
    with pytest.raises(TypeError, match=rf"{given!r}.*did you mean {meant!r}"):
        opt.step(train_loss=0.5, **{given: 1.0})
    assert _max_diff(_weights(model), before) == 0.0
    step = FusedStep(gx.grokadamw(lr=1e-2), dict(model.named_parameters()), backend="foreach")
    with pytest.raises(TypeError, match=rf"{given!r}.*did you mean {meant!r}"):
        step({n: p.grad for n, p in model.named_parameters()}, **{given: 1.0})


def test_the_signal_arguments_reach_every_chain_and_a_primitive_declares_its_own() -> None:
    """``train_loss=`` / ``val_loss=`` / ``grokking_signal=`` are taken by every chain (one loop
    for all optimizers; a chain without a signal ignores them); a primitive of one's own that
    reads another argument declares it, and reading an undeclared one raises."""
    from grokxform.base import EmptyState, elementwise

    model = _model()
    opt = gx.Optimizer(model.named_parameters(), gx.adamw, lr=1e-2)
    _train(model, opt, range(2), train_loss=0.5, val_loss=1.0, grokking_signal=0.1)

    def scaled(declared: bool) -> gx.GradientTransformation:
        def scalars(ctx: Any) -> tuple[dict[str, Any], dict[str, Any]]:
            return {"c": torch.as_tensor(ctx.extra.get("temperature", 1.0), dtype=torch.float64)}, {}

        return elementwise("scaled", lambda v, sc: {"out": v.x * sc.c}, scalars=scalars,
                           extras=("temperature",) if declared else ())

    params = {"w": torch.ones(2)}
    u, _ = scaled(True).update({"w": torch.ones(2)}, EmptyState(), params, temperature=3.0)
    assert u["w"].tolist() == [3.0, 3.0]
    with pytest.raises(ValueError, match="reads the update argument 'temperature', which it does not declare"):
        scaled(False).update({"w": torch.ones(2)}, EmptyState(), params, temperature=3.0)
    opt = gx.Optimizer(model.named_parameters(), gx.chain(scaled(True), gx.scale_by_learning_rate(1e-2)))
    _backward(model, 3)
    opt.step(temperature=2.0)
    with pytest.raises(TypeError, match="'temprature'.*did you mean 'temperature'"):
        opt.step(temprature=2.0)


# -- 6. hyperparameters edited in param_groups --------------------------------------------------


@pytest.mark.parametrize("fused", ENGINES)
@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("lr", float("nan"), r"grokadamw: lr must be finite, got nan"),
        ("lr", float("inf"), r"grokadamw: lr must be finite, got inf"),
        ("lr", -1e-3, r"grokadamw: lr must be >= 0.0, got -0.001"),
        ("weight_decay", -5.0, r"grokadamw: weight_decay must be >= 0.0, got -5.0"),
        ("eps", -1.0, r"scale_by_adam: eps must be >= 0.0, got -1.0"),
        ("lamb", float("nan"), r"amplify: lamb must be finite, got nan"),
    ],
)
def test_a_hyperparameter_edited_between_steps_is_checked_by_the_factory(
    fused: Any, name: str, value: float, message: str
) -> None:
    model = _model()
    opt = gx.Optimizer(model.named_parameters(), gx.grokadamw, lr=1e-2, fused=fused)
    _train(model, opt, range(2))
    with pytest.raises(ValueError, match=message):
        gx.grokadamw(**{name: value})  # the factory's own message ...
    opt.param_groups[0][name] = value
    _backward(model, 2)
    before = _weights(model)
    with pytest.raises(ValueError, match=rf"param group 0: .*{message}"):  # ... at the next step
        opt.step()
    assert _max_diff(_weights(model), before) == 0.0
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- 7. the list of parameters edited; one tensor under two names --------------------------------


@pytest.mark.parametrize("fused", ENGINES)
def test_a_parameter_appended_to_a_group_is_refused_clearly(fused: Any) -> None:
    model = _model()
    opt = gx.Optimizer(model.named_parameters(), gx.adamw, lr=1e-2, fused=fused)
    _train(model, opt, range(1))
    extra = nn.Parameter(torch.ones(2))
    extra.grad = torch.ones(2)
    opt.param_groups[0]["params"].append(extra)
    with pytest.raises(ValueError, match=r"'params' list of param group 0 was edited.*add_param_group"):
        _train(model, opt, range(1, 2))


def test_one_tensor_under_two_names_is_refused() -> None:
    p = nn.Parameter(torch.ones(3))
    for fused in ENGINES:
        with pytest.raises(ValueError, match=r"'b' of param group 0 is the same tensor as 'a'"):
            gx.Optimizer([("a", p), ("b", p)], gx.adamw, fused=fused)
    opt = gx.Optimizer([("a", p)], gx.adamw)
    with pytest.raises(ValueError, match="more than one parameter group"):  # torch.optim's own check
        opt.add_param_group({"params": [("c", p)]})
    with pytest.raises(ValueError, match=r"'c' of param group 1 is the same tensor as 'a' \(or shares its memory"):
        opt.add_param_group({"params": [("c", nn.Parameter(p.detach()))]})


# -- 8. changing patterns of None gradients -----------------------------------------------------


def test_changing_none_patterns_keep_a_bounded_number_of_steps() -> None:
    """Random subsets of parameters without a gradient: a step is built per new pattern, and at
    most ``STEP_CACHE_SIZE`` are kept; the numbers stay those of the eager path."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), *[nn.Linear(3, 3) for _ in range(5)])
    ref = copy.deepcopy(model)
    opt = gx.Optimizer(model.named_parameters(), gx.adamw, lr=1e-2)
    ref_opt = gx.Optimizer(ref.named_parameters(), gx.adamw, lr=1e-2, fused=False)
    rng = torch.Generator().manual_seed(1)
    for t in range(60):
        keep = torch.rand(12, generator=rng) < 0.5
        for m in (model, ref):
            _backward(m, t)
            for k, p in zip(keep.tolist(), m.parameters()):
                if not k:
                    p.grad = None
        opt.step()
        ref_opt.step()
    fs = opt._fused_steps[0][1]
    assert fs.compiles > STEP_CACHE_SIZE  # many patterns were built ...
    assert fs.cached <= STEP_CACHE_SIZE  # ... and few are kept
    assert _max_diff(_weights(model), _weights(ref)) < 1e-6


# -- 11. a tampered checkpoint ------------------------------------------------------------------


def test_a_negative_count_in_a_checkpoint_is_refused_by_name_and_changes_nothing() -> None:
    model = _model()
    opt = gx.Optimizer(model.named_parameters(), gx.grokadamw, lr=1e-2)
    _train(model, opt, range(3))
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][1]["inner_state.adam.count"] = torch.tensor(-1)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"parameter '0\.bias', 'inner_state\.adam\.count'.*holds -1"):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert all(torch.equal(after["state"][i][k], v) for i, e in before["state"].items() for k, v in e.items())


def test_non_finite_moments_in_a_checkpoint_are_reported() -> None:
    model = _model()
    opt = gx.Optimizer(model.named_parameters(), gx.grokadamw, lr=1e-2)
    _train(model, opt, range(3))
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["inner_state.adam.mu"].fill_(float("nan"))
    with pytest.warns(RuntimeWarning, match=r"parameter '0\.weight', 'inner_state\.adam\.mu'.*non-finite"):
        opt.load_state_dict(sd)
    sd["state"][0]["inner_state.adam.mu"].fill_(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.load_state_dict(sd)  # finite: nothing to report


# -- the same on CUDA, where the default engine runs generated kernels in a captured CUDA graph ---

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_model(seed: int = 0) -> nn.Module:
    return _model(seed).cuda()


def _cuda_batch(t: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(16, 5, generator=g).to("cuda", dtype), torch.randn(16, 3, generator=g).to("cuda", dtype)


def _cuda_backward(model: nn.Module, t: int, batch: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    x, y = batch if batch is not None else _cuda_batch(t, next(model.parameters()).dtype)
    for p in model.parameters():
        p.grad = None
    nn.functional.mse_loss(model(x), y).backward()


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("pipeline", ["adamw", "grokfast_ma"])
def test_cuda_replaced_storage_and_cast_after_the_graph_was_captured(pipeline: str) -> None:
    """On CUDA the default step is captured into a CUDA graph after its first call; replacing a
    parameter's storage, or casting the model, afterwards is followed (the graph is captured
    again over the new tensors), as the eager path follows it."""
    kwargs: dict[str, Any] = {"lr": 1e-2, **({"window_size": 3} if pipeline == "grokfast_ma" else {})}
    runs = []
    for fused in (None, False):
        model = _cuda_model()
        opt = gx.Optimizer(model.named_parameters(), getattr(gx, pipeline), fused=fused, **kwargs)
        for t in range(4):
            _cuda_backward(model, t)
            opt.step()
        with torch.no_grad():
            model[0].weight.data = model[0].weight.detach().clone() * 0.5
        for t in range(4, 8):
            _cuda_backward(model, t)
            opt.step()
        model.double()
        for t in range(8, 12):
            _cuda_backward(model, t)
            opt.step()
        runs.append((_weights(model), opt.engines))
    assert runs[0][1] != ["tx.update"]
    assert _max_diff(runs[0][0], runs[1][0]) < 1e-6


@pytest.mark.gpu
@cuda
def test_cuda_steps_check_without_synchronising() -> None:
    """The per-step checks (parameters, gradients, hyperparameters, step arguments) read no
    device value: with new gradient tensors every step and tensor losses, no step synchronises."""
    model = _cuda_model()
    opt = gx.Optimizer(model.named_parameters(), gx.grokadamw, lr=1e-2)
    loss = torch.tensor(0.5, device="cuda")
    for t in range(3):
        _cuda_backward(model, t)
        opt.step(train_loss=loss, val_loss=2 * loss)
    batches = [_cuda_batch(t) for t in range(3, 8)]  # copied from the host before the checked steps
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t, batch in zip(range(3, 8), batches):
            _cuda_backward(model, t, batch)
            opt.step(train_loss=loss, val_loss=2 * loss)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.engines == ["triton"]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
def test_cuda_compiled_opt_step_follows_the_scheduler(lr_kind: str) -> None:
    from torch._dynamo.utils import counters

    def run(optimizer: str, compiled: bool) -> tuple[list[torch.Tensor], int]:
        model = _cuda_model()
        lr = torch.tensor(0.01, device="cuda") if lr_kind == "tensor" else 0.01
        if optimizer == "torch":
            opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        else:
            opt = gx.Optimizer(model.named_parameters(), gx.adamw, lr=lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)
        torch._dynamo.reset()
        counters.clear()
        step = torch.compile(opt.step) if compiled else opt.step
        for t in range(12):
            _cuda_backward(model, t)
            step()
            sched.step()
        return _weights(model), int(counters["stats"]["unique_graphs"])

    eager, _ = run("grokxform", False)
    compiled, graphs = run("grokxform", True)
    _, torch_graphs = run("torch", True)
    assert _max_diff(compiled, eager) < 1e-6
    assert graphs <= max(torch_graphs, 2 if lr_kind == "float" else 1)
