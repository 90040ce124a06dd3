"""optax's basics around the primitives: its schedules (against optax's own numbers and a float64
re-derivation of its formulas), the public tree utilities, transforms whose ``update`` takes no
extra arguments inside chains, ``apply_every`` and ``lookahead``."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from cases import grad_tree, param_tree

import grokxform as gx
from grokxform import declarations as D
from grokxform import tree as T

F64 = torch.float64

# ---------------------------------------------------------------- schedules

# optax 0.2.8 (jax 0.10.2, jax_enable_x64) at OPTAX_STEPS, for the schedules of SCHEDULES below
OPTAX_STEPS = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 15, 20, 24, 25, 26, 27, 30, 36, 37, 38, 50, 100, 101, 1000)
OPTAX = {
    "cosine": (0.3, 0.2984048019309115, 0.29366313981363873, 0.2859053032439455, 0.27534347247949303,
        0.2622644490795105, 0.24701984057301332, 0.23001404550799665, 0.1925164116485675, 0.1729672942406179,
        0.15351055866023156, 0.13459002774479928, 0.1166111450631937, 0.08483019873930298, 0.037967294240617906,
        0.030066841470149548, 0.03, 0.03, 0.03, 0.03, 0.03, 0.03, 0.03, 0.03, 0.03, 0.03, 0.03),
    "cosine_plain": (0.001, 0.0009972609476841367, 0.0009890738003669028, 0.0009755282581475768,
        0.0009567727288213005, 0.0009330127018922195, 0.0009045084971874737, 0.0008715724127386971,
        0.0007938926261462366, 0.00075, 0.0007033683215379002, 0.0006545084971874737, 0.0006039558454088796,
        0.0005000000000000001, 0.0002500000000000001, 9.549150281252633e-05, 6.698729810778065e-05,
        4.322727117869951e-05, 2.4471741852423235e-05, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "exp": (0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.46481199374939064, 0.4321003790665671, 0.373421475178942,
        0.3471415607735252, 0.322711121952835, 0.3, 0.2788871962496344, 0.24101452643255822, 0.16733231774978063,
        0.12497096187846907, 0.1161760039030206, 0.10799999999999998, 0.10039939064986837, 0.08065903863865145,
        0.05205913770943256, 0.04839542318319088, 0.04498954627624886, 0.018741289575395722, 0.00048771436263154983,
        0.0004533909705499681, 1.4613521413869233e-32),
    "exp_stair_end": (0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125, 0.125, 0.125, 0.0625, 0.05, 0.05,
        0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05),
    "exp_up": (0.01, 0.011119615859385788, 0.012364585686030395, 0.013748944308911808, 0.015288297918718772, 0.017,
        0.01890334696095584, 0.02101979566625167, 0.025990106461821913, 0.0289, 0.03213568983362493,
        0.03573365263262784, 0.039734449052755125, 0.04912999999999999, 0.08352099999999998, 0.12768939304693103,
        0.1419857, 0.15788264415259926, 0.1755594353841006, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2),
    "piecewise": (0.2, 0.2, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.010000000000000002, 0.010000000000000002,
        0.010000000000000002, 0.010000000000000002, 0.010000000000000002, 0.010000000000000002, 0.010000000000000002,
        0.010000000000000002, 0.010000000000000002, 0.010000000000000002, 0.030000000000000006, 0.030000000000000006,
        0.030000000000000006, 0.030000000000000006, 0.030000000000000006, 0.030000000000000006, 0.030000000000000006,
        0.030000000000000006),
    "join": (0.1, 0.1, 0.1, 0.1, 0.1, 0.5, 0.4877641290737884, 0.45225424859373686, 0.32725424859373686, 0.25,
        0.17274575140626316, 0.10305368692688174, 0.047745751406263165, 0.0, 0.05, 0.04344702230725334,
        0.0419476388303771, 0.04050000000000001, 0.03910232007652801, 0.03519208806887521, 0.02850559133578892,
        0.027521845836610416, 0.026572050000000003, 0.017433922005000005, 0.003011412550475235, 0.002907486850152005,
        5.64316940616194e-17),
    "onecycle": (0.0010000000000000009, 0.0015729201025338722, 0.0032225777903697114, 0.005750000000000002,
        0.008850342312164161, 0.012149657687835838, 0.01525, 0.01777742220963029, 0.02, 0.019937153537882963,
        0.019749404482257326, 0.019439113886432133, 0.01901018383468468, 0.01781940566726796, 0.013306139224241896,
        0.008885915061347439, 0.0077809032651066385, 0.006703860775758108, 0.005668332027520007,
        0.0029374677220404583, 7.284646211704018e-05, 1e-05, 1e-05, 1e-05, 1e-05, 1e-05, 1e-05),
    "onecycle_default": (0.040000000000000036, 0.042629490223228816, 0.050489151647773345, 0.06349287217832633,
        0.08149818033155165, 0.10430780618346935, 0.1316718427000253, 0.16329048377085076, 0.2378630788996129, 0.28,
        0.32476641132361583, 0.3716718427000253, 0.4202023884074756, 0.52, 0.7599999999999999, 0.9083281572999747,
        0.9356921938165306, 0.9585018196684485, 0.9765071278216737, 1.0, 0.9819815024222053, 0.9755283560345442,
        0.9681175628501273, 0.8117456539497631, 4e-06, 4e-06, 4e-06),
    "sgdr": (0.0, 0.033333333333333326, 0.06666666666666667, 0.1, 0.09504844339512096, 0.08117449009293669,
        0.06112604669781572, 0.03887395330218429, 0.004951556604879049, 0.05, 0.04902201421575026,
        0.04619363245772709, 0.0418161029667954, 0.0303125, 0.007812500000000003, 0.005005372182729003, 0.02, 0.024,
        0.028, 0.04, 0.0029311070759028292, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001),
}

SGDR_CYCLES = [
    dict(init_value=0.0, peak_value=0.1, warmup_steps=3, decay_steps=10),
    dict(init_value=0.01, peak_value=0.05, warmup_steps=0, decay_steps=15, end_value=0.005, exponent=2.0),
    dict(init_value=0.02, peak_value=0.04, warmup_steps=5, decay_steps=12, end_value=0.001),
]


def _build(lib) -> dict[str, Callable]:
    """The schedules of OPTAX from ``lib`` (grokxform, or this file's re-derivation: REF)."""
    return {
        "cosine": lib.cosine_decay_schedule(0.3, 25, alpha=0.1, exponent=1.5),
        "cosine_plain": lib.cosine_decay_schedule(1e-3, 30),
        "exp": lib.exponential_decay(0.5, 7, 0.6, transition_begin=5),
        "exp_stair_end": lib.exponential_decay(0.5, 4, 0.5, transition_begin=3, staircase=True, end_value=0.05),
        "exp_up": lib.exponential_decay(0.01, 5, 1.7, end_value=0.2),
        "piecewise": lib.piecewise_constant_schedule(0.2, {3: 0.5, 10: 0.1, 30: 3.0}),
        "join": lib.join_schedules([lib.constant_schedule(0.1), lib.cosine_decay_schedule(0.5, 10),
                                    lib.exponential_decay(0.05, 3, 0.9)], [5, 20]),
        "onecycle": lib.cosine_onecycle_schedule(37, 0.02, pct_start=0.25, div_factor=20.0, final_div_factor=100.0),
        "onecycle_default": lib.cosine_onecycle_schedule(100, 1.0),
        "sgdr": lib.sgdr_schedule(SGDR_CYCLES),
    }


class REF:
    """optax's schedule formulas re-derived over Python floats (float64), step t an int."""

    @staticmethod
    def constant_schedule(v):
        return lambda t: v

    @staticmethod
    def cosine_decay_schedule(init, steps, alpha=0.0, exponent=1.0):
        def f(t):
            c = 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps))
            return init * ((1 - alpha) * c**exponent + alpha)
        return f

    @staticmethod
    def exponential_decay(init, steps, rate, transition_begin=0, staircase=False, end_value=None):
        def f(t):
            p = (t - transition_begin) / steps
            try:
                v = init if t - transition_begin <= 0 else init * rate ** (math.floor(p) if staircase else p)
            except OverflowError:  # optax's float64 power gives inf there
                v = math.inf
            if end_value is not None:
                v = max(v, end_value) if rate < 1 else min(v, end_value)
            return v
        return f

    @staticmethod
    def piecewise_constant_schedule(init, scales):
        def f(t):
            v = init
            for b, s in sorted(scales.items()):
                v = v * s if t >= b else v
            return v
        return f

    @staticmethod
    def join_schedules(schedules, boundaries):
        def f(t):
            k = sum(t >= b for b in boundaries)
            return schedules[k](t - [0, *boundaries][k])
        return f

    @staticmethod
    def cosine_onecycle_schedule(steps, peak, pct_start=0.3, div_factor=25.0, final_div_factor=1e4):
        scales = {int(pct_start * steps): div_factor, steps: 1 / (div_factor * final_div_factor)}
        bounds = [0, *sorted(scales)]
        values = [peak / div_factor]
        for b in bounds[1:]:
            values.append(values[-1] * scales[b])

        def f(t):
            for i in range(len(bounds) - 1):
                if bounds[i] <= t < bounds[i + 1]:
                    pct = (t - bounds[i]) / max(bounds[i + 1] - bounds[i], 1)
                    return values[i + 1] + (values[i] - values[i + 1]) / 2 * (math.cos(math.pi * pct) + 1)
            return values[-1]
        return f

    @staticmethod
    def sgdr_schedule(cycles):
        parts, bounds, step = [], [], 0
        for c in cycles:
            init, peak, warm, steps = c["init_value"], c["peak_value"], c["warmup_steps"], c["decay_steps"]
            alpha = c.get("end_value", 0.0) / peak if peak else 0.0
            decay = REF.cosine_decay_schedule(peak, steps - warm, alpha, c.get("exponent", 1.0))

            def line(t, init=init, peak=peak, warm=warm):
                return (init - peak) * (1 - min(max(t, 0), warm) / warm) + peak if warm else init

            parts.append(REF.join_schedules([line, decay], [warm]))
            step += steps
            bounds.append(step)
        return REF.join_schedules(parts, bounds[:-1])


SCHEDULES = _build(gx)
REFERENCE = _build(REF)
MANY = [*range(130), 1000, 10**6]


def _at(schedule: Callable, t: int) -> float:
    return float(schedule(torch.tensor(t, dtype=torch.int64)))


@pytest.mark.parametrize("name", sorted(OPTAX))
def test_schedule_matches_optax_and_the_float64_rederivation(name: str) -> None:
    schedule, ref = SCHEDULES[name], REFERENCE[name]
    for t, want in zip(OPTAX_STEPS, OPTAX[name]):
        assert _at(schedule, t) == pytest.approx(want, rel=1e-15, abs=0.0), (name, t)
        assert ref(t) == pytest.approx(want, rel=1e-15, abs=0.0), (name, t)  # the re-derivation is optax's
    for t in MANY:
        assert _at(schedule, t) == pytest.approx(ref(t), rel=1e-15, abs=1e-300), (name, t)
    value = schedule(torch.tensor(3))
    assert value.dtype == F64 and value.dim() == 0


def test_schedules_refuse_bad_arguments() -> None:
    with pytest.raises(ValueError, match="decay_steps"):
        gx.cosine_decay_schedule(1.0, 0)
    with pytest.raises(ValueError, match="decay_rate"):
        gx.exponential_decay(1.0, 3, 0.0)
    with pytest.raises(ValueError, match="transition_steps"):
        gx.exponential_decay(1.0, 0, 0.5)
    with pytest.raises(ValueError, match="scale"):
        gx.piecewise_constant_schedule(1.0, {3: -0.5})
    with pytest.raises(ValueError, match="len"):
        gx.join_schedules([gx.constant_schedule(1.0)], [3])
    with pytest.raises(TypeError, match="missing"):
        gx.sgdr_schedule([dict(init_value=0.0, peak_value=1.0, warmup_steps=1)])
    with pytest.raises(TypeError, match="number"):
        gx.cosine_decay_schedule(torch.tensor(1.0), 3)


def _adamw_reference(schedule_ref: Callable, params: torch.Tensor, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """torch.optim.AdamW (float64, no decay) with its lr set to the re-derived schedule each step."""
    p = params.clone().requires_grad_(True)
    opt = torch.optim.AdamW([p], lr=0.0, weight_decay=0.0)
    out = []
    for t, g in enumerate(grads):
        opt.param_groups[0]["lr"] = schedule_ref(t)
        p.grad = g.clone()
        opt.step()
        out.append(p.detach().clone())
    return out


@pytest.mark.parametrize("name", sorted(OPTAX))
def test_schedule_drives_adamw_in_the_pure_api_and_the_optimizer(name: str) -> None:
    steps = 40
    p0 = torch.linspace(-1.0, 1.0, 5, dtype=F64)
    grads = [torch.sin(torch.arange(5, dtype=F64) + 0.7 * t) for t in range(steps)]
    want = _adamw_reference(REFERENCE[name], p0, grads)
    # gx.adamw(lr=schedule): the pure update (on the C kernels)
    tx = gx.adamw(lr=SCHEDULES[name], weight_decay=0.0)
    params = {"w": p0.clone()}
    state = tx.init(params)
    # inject_hyperparams(adamw)(lr=schedule): the value recorded each step is the schedule's
    itx = gx.inject_hyperparams(gx.adamw)(lr=SCHEDULES[name], weight_decay=0.0)
    istate = itx.init(params)
    # gx.Optimizer: the C-kernel engine evaluates the schedule in its scalar prologue
    w = torch.nn.Parameter(p0.clone())
    opt = gx.Optimizer([w], gx.adamw, lr=SCHEDULES[name], weight_decay=0.0)
    for t, g in enumerate(grads):
        u, state = tx.update({"w": g}, state, params)
        params = gx.apply_updates(params, u)
        _, istate = itx.update({"w": g}, istate, params)
        assert float(istate.hyperparams["lr"]) == pytest.approx(REFERENCE[name](t), rel=1e-15, abs=1e-300)
        w.grad = g.clone()
        opt.step()
        torch.testing.assert_close(params["w"], want[t], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(w.detach(), want[t], rtol=1e-12, atol=1e-15)
    assert opt.engines == ["c"]


# ---------------------------------------------------------------- tree utilities


def _tree() -> dict:
    g = torch.Generator().manual_seed(3)
    return {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g).to(torch.bfloat16),
            "none": None, "nested": [torch.randn(2, generator=g), None]}


def test_tree_map_keeps_none_and_does_not_call_fn_on_it() -> None:
    calls = []

    def fn(x, y):
        calls.append(1)
        return x + y

    a = {"w": torch.ones(2), "frozen": None, "deep": (torch.ones(1), None)}
    got = T.tree_map(fn, a, a)
    assert got["frozen"] is None and got["deep"][1] is None and len(calls) == 2
    assert torch.equal(got["w"], torch.full((2,), 2.0))
    assert T.tree_map(lambda x, y: y, {"w": torch.ones(1)}, {"w": None}) == {"w": None}  # rest leaves as they are


def test_tree_arithmetic_leaf_by_leaf() -> None:
    a, b = _tree(), T.tree_map(lambda x: x * 2 + 1, _tree())
    for got, want in ((T.tree_add(a, b), lambda x, y: x + y), (T.tree_sub(a, b), lambda x, y: x - y)):
        assert got["none"] is None and got["nested"][1] is None
        for k in ("a", "b"):
            assert torch.equal(got[k], want(a[k], b[k])) and got[k].dtype == a[k].dtype
    three = T.tree_add(a, b, b)
    assert torch.equal(three["a"], a["a"] + b["a"] + b["a"])
    assert T.tree_add({"w": torch.ones(1)}, {"w": None}) == {"w": None}
    scaled = T.tree_scale(torch.tensor(0.5, dtype=F64), a)
    assert scaled["b"].dtype == torch.bfloat16 and torch.equal(scaled["b"], a["b"] * 0.5)
    assert torch.equal(T.tree_scale(3.0, a)["a"], 3.0 * a["a"]) and T.tree_scale(3.0, a)["none"] is None
    zeros = T.tree_zeros_like(a)
    assert zeros["none"] is None and zeros["b"].dtype == torch.bfloat16 and not zeros["a"].any()
    assert T.tree_zeros_like(a, F64)["a"].dtype == F64
    cast = T.tree_cast({"w": torch.ones(2), "count": torch.tensor(4), "none": None}, F64)
    assert cast["w"].dtype == F64 and cast["count"].dtype == torch.int64 and cast["none"] is None
    assert T.tree_cast(a, None) is a


def test_tree_reductions_accumulate_in_float32_or_float64() -> None:
    a, b = _tree(), T.tree_map(lambda x: x - 0.25, _tree())
    leaves = [x for x in T.flatten(a)[0] if x is not None]
    exact = lambda xs: torch.cat([x.double().reshape(-1) for x in xs])  # noqa: E731
    norm = T.tree_l2_norm(a)
    assert norm.dtype == torch.float32 and norm.dim() == 0
    assert float(norm) == pytest.approx(float(exact(leaves).norm()), rel=1e-6)
    assert float(T.tree_l2_norm(a, squared=True)) == pytest.approx(float(exact(leaves).norm()) ** 2, rel=1e-6)
    assert float(T.tree_sum(a)) == pytest.approx(float(exact(leaves).sum()), rel=1e-5)
    b_leaves = [x for x in T.flatten(b)[0] if x is not None]
    assert float(T.tree_vdot(a, b)) == pytest.approx(float(exact(leaves) @ exact(b_leaves)), rel=1e-5)
    # a float64 leaf makes the accumulator float64; a tree without tensors gives 0
    d = {"x": torch.tensor([1e-200, 3.0], dtype=F64), "y": torch.tensor([4.0])}
    assert T.tree_l2_norm(d).dtype == F64 and float(T.tree_l2_norm(d)) == 5.0
    assert float(T.tree_vdot(d, d)) == 25.0 and float(T.tree_sum(d)) == 7.0
    assert float(T.tree_l2_norm({"none": None})) == 0.0 and float(T.tree_sum({})) == 0.0
    with pytest.raises(ValueError, match="does not match"):
        T.tree_vdot({"x": torch.ones(1)}, {"y": torch.ones(1)})


# ---------------------------------------------------------------- members without **extra


def _plain_halve() -> gx.GradientTransformation:
    """An optax-style transform: ``update(updates, state, params=None)``, no extra arguments."""

    def update(updates, state, params=None):
        return T.tree_scale(0.5, updates), state

    return gx.GradientTransformation(lambda params: gx.EmptyState(), update)


def _loss_reader(seen: dict) -> gx.GradientTransformation:
    """A transform that names the one extra argument it reads."""

    def update(updates, state, params=None, *, train_loss=None):
        seen["train_loss"] = train_loss
        return updates, state

    return gx.GradientTransformation(lambda params: gx.EmptyState(), update)


def _plain_chain(seen: dict) -> gx.GradientTransformation:
    return gx.named_chain(
        ("plain", _plain_halve()), ("reader", _loss_reader(seen)),
        ("grok", gx.chain(gx.grokadamw(lr=1e-2, gradient_clipping=0.0), _plain_halve())),
    )


def test_chain_passes_each_member_only_what_it_takes() -> None:
    seen: dict = {}
    params = param_tree(dtype=F64)
    tx = _plain_chain(seen)
    assert D.extra_args(D.declaration_of(tx)) is None  # undeclared members: what it reads is unknown
    state = tx.init(params)
    extra = {"train_loss": torch.tensor(0.5, dtype=F64), "val_loss": torch.tensor(0.9, dtype=F64), "foo": 1}
    u, state = tx.update(grad_tree(params, 0), state, params, **extra)
    assert seen == {"train_loss": extra["train_loss"]}
    # the same maths with the plain members written by hand: the signal reached grokadamw
    with gx.kernels(False):
        ref_tx = gx.grokadamw(lr=1e-2, gradient_clipping=0.0)
        g = T.tree_scale(0.5, grad_tree(params, 0))
        ref_u, _ = ref_tx.update(g, ref_tx.init(params), params, train_loss=extra["train_loss"],
                                 val_loss=extra["val_loss"])
    for k in params:
        torch.testing.assert_close(u[k], 0.5 * ref_u[k], rtol=1e-12, atol=0.0)
    tx2 = gx.chain(gx.adamw(1e-2), _plain_halve())
    tx2.update(grad_tree(params, 0), tx2.init(params), params, train_loss=1.0)


def test_with_extra_args_support() -> None:
    plain = _plain_halve()
    with pytest.raises(TypeError, match="unexpected keyword"):
        plain.update({"w": torch.ones(1)}, gx.EmptyState(), None, train_loss=1.0)
    tx = gx.with_extra_args_support(plain)
    u, _ = tx.update({"w": torch.ones(1)}, tx.init({"w": torch.ones(1)}), None, train_loss=1.0, val_loss=2.0)
    assert torch.equal(u["w"], torch.full((1,), 0.5))
    declared = gx.adamw()
    assert gx.with_extra_args_support(declared) is declared
    seen: dict = {}
    gx.with_extra_args_support(_loss_reader(seen)).update({"w": torch.ones(1)}, gx.EmptyState(), None,
                                                          train_loss=3.0, other=4.0)
    assert seen == {"train_loss": 3.0}
    with pytest.raises(TypeError, match="GradientTransformation"):
        gx.with_extra_args_support(lambda u: u)  # type: ignore[arg-type]


def test_optimizer_steps_a_chain_with_members_without_extra_arguments() -> None:
    seen: dict = {}
    params = param_tree(dtype=F64)
    tx = _plain_chain(seen)
    model = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = gx.Optimizer(list(model.items()), tx)
    state = tx.init(params)
    for t in range(4):
        loss = {"train_loss": torch.tensor(1.0 / (t + 1), dtype=F64), "val_loss": torch.tensor(1.0, dtype=F64)}
        grads = grad_tree(params, t)
        for k, p in model.items():
            p.grad = grads[k].clone()
        opt.step(**loss)
        u, state = tx.update(grads, state, params, **loss)
        params = gx.apply_updates(params, u)
        assert seen["train_loss"] is loss["train_loss"]
    assert opt.engines == ["tx.update+tx.update+c+tx.update+c"]  # (the last: the lr multiplier)
    for k in params:
        torch.testing.assert_close(model[k].detach(), params[k], rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------- apply_every


def test_apply_every_matches_optax_and_runs_on_the_engine() -> None:
    k = 3
    params = {"w": torch.zeros(4, dtype=F64), "b": torch.zeros(2, dtype=F64)}
    grads = [{n: torch.randn(p.shape, dtype=F64, generator=torch.Generator().manual_seed(t)) for n, p in params.items()}
             for t in range(8)]
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    tx = gx.apply_every(k)
    states = [tx.init(params), tx.init(params)]
    w = {n: torch.nn.Parameter(p.clone()) for n, p in params.items()}
    opt = gx.Optimizer(list(w.items()), gx.apply_every, k=k)
    total = {n: p.clone() for n, p in params.items()}
    for t, g in enumerate(grads):
        acc = {n: (acc[n] if t % k else 0.0) + g[n] for n in params}  # optax: acc·(c != 0) + g
        want = {n: acc[n] if t % k == k - 1 else torch.zeros_like(acc[n]) for n in params}
        u, states[0] = tx.update(g, states[0], params)
        with gx.kernels(False):
            u_eager, states[1] = tx.update(g, states[1], params)
        for n in params:
            assert torch.equal(u[n], want[n]) and torch.equal(u_eager[n], want[n])
            total[n] += want[n]
            w[n].grad = g[n].clone()
        opt.step()
    assert opt.engines == ["c"]
    for n in params:
        torch.testing.assert_close(w[n].detach(), total[n], rtol=0, atol=1e-15)
    assert torch.equal(states[0].count["w"], torch.tensor(8))


def test_apply_every_none_gradient_keeps_its_sum_and_place() -> None:
    tx = gx.apply_every(2)
    p = {"a": torch.zeros(1), "b": torch.zeros(1)}
    s = tx.init(p)
    u, s = tx.update({"a": torch.ones(1), "b": torch.ones(1)}, s)
    u, s = tx.update({"a": torch.ones(1), "b": None}, s)
    assert torch.equal(u["a"], torch.full((1,), 2.0)) and u["b"] is None
    u, s = tx.update({"a": torch.ones(1), "b": torch.full((1,), 5.0)}, s)
    assert torch.equal(u["b"], torch.full((1,), 6.0)) and float(u["a"]) == 0.0
    with pytest.raises(ValueError, match="k"):
        gx.apply_every(0)


# ---------------------------------------------------------------- lookahead


def _quadratic_grad(p: torch.Tensor) -> torch.Tensor:
    """The gradient of ½·θᵀAθ − bᵀθ, so that the trajectory depends on where the params are."""
    n = p.numel()
    a = torch.diag(torch.linspace(0.5, 3.0, n, dtype=F64)) + 0.1
    return a @ p - torch.linspace(-1.0, 1.0, n, dtype=F64)


def _lookahead_reference(make_inner: Callable, p0: torch.Tensor, steps: int, k: int, alpha: float) -> list:
    """Zhang et al.'s two loops in float64: k steps of the torch optimizer on the fast weights,
    then φ ← φ + α(θ − φ), θ ← φ (the inner optimizer's state carried on)."""
    theta = p0.clone().requires_grad_(True)
    opt = make_inner([theta])
    slow = p0.clone()
    out = []
    for t in range(steps):
        theta.grad = _quadratic_grad(theta.detach())
        opt.step()
        if t % k == k - 1:
            slow = slow + alpha * (theta.detach() - slow)
            with torch.no_grad():
                theta.copy_(slow)
        out.append((theta.detach().clone(), slow.clone()))
    return out


LOOKAHEAD_INNER = {
    "sgd_momentum": (lambda: gx.sgd(lr=0.05, momentum=0.9),
                     lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)),
    "adamw": (lambda: gx.adamw(lr=0.02, weight_decay=0.1),
              lambda ps: torch.optim.AdamW(ps, lr=0.02, weight_decay=0.1)),
}


@pytest.mark.parametrize("inner", sorted(LOOKAHEAD_INNER))
def test_lookahead_matches_the_two_loop_algorithm(inner: str) -> None:
    ours, theirs = LOOKAHEAD_INNER[inner]
    k, alpha, steps = 4, 0.6, 22
    p0 = torch.linspace(-2.0, 1.5, 6, dtype=F64)
    want = _lookahead_reference(theirs, p0, steps, k, alpha)
    tx = gx.lookahead(ours(), sync_period=k, alpha=alpha)
    runs = {"kernels": {"w": p0.clone()}, "eager": {"w": p0.clone()}}
    states = {name: tx.init(p) for name, p in runs.items()}
    w = torch.nn.Parameter(p0.clone())
    opt = gx.Optimizer([("w", w)], gx.lookahead, fast=ours(), sync_period=k, alpha=alpha)
    for t in range(steps):
        for name, params in runs.items():
            with gx.kernels(name == "kernels"):
                u, states[name] = tx.update({"w": _quadratic_grad(params["w"])}, states[name], params)
            runs[name] = gx.apply_updates(params, u)
            torch.testing.assert_close(runs[name]["w"], want[t][0], rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(states[name]["lookahead"].slow["w"], want[t][1], rtol=1e-12, atol=1e-14)
        w.grad = _quadratic_grad(w.detach())
        opt.step()
        torch.testing.assert_close(w.detach(), want[t][0], rtol=1e-12, atol=1e-14)
    assert opt.engines == ["c"]


def test_lookahead_checks_its_arguments() -> None:
    with pytest.raises(TypeError, match="fast"):
        gx.lookahead(gx.sgd, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sync_period"):
        gx.lookahead(gx.sgd(), 0)
    with pytest.raises(ValueError, match="alpha"):
        gx.lookahead(gx.sgd(), 2, alpha=1.5)


@pytest.mark.parametrize("wrap", ["masked", "partition", "multi_steps", "apply_if_finite", "amplify"])
def test_wrappers_pass_a_plain_inner_transform_only_what_it_takes(wrap: str) -> None:
    """Every wrapper takes an optax-style inner transform (``update`` without ``**extra``) where the
    training loop passes the losses, as chains do."""
    plain = _plain_halve()
    tx = {
        "masked": lambda: gx.masked(plain, lambda path, p: True),
        "partition": lambda: gx.partition({"a": plain}, lambda path, p: "a"),
        "multi_steps": lambda: gx.MultiSteps(plain, every_k_schedule=1),
        "apply_if_finite": lambda: gx.apply_if_finite(plain),
        "amplify": lambda: gx.amplify(plain, lamb=2.0),  # g + 2·(g/2) = 2g
    }[wrap]()
    params = param_tree(dtype=F64)
    g = grad_tree(params, 0)
    u, _ = tx.update(g, tx.init(params), params, train_loss=torch.tensor(0.5), val_loss=torch.tensor(1.0))
    factor = 2.0 if wrap == "amplify" else 0.5
    for k in params:
        torch.testing.assert_close(u[k], factor * g[k], rtol=1e-15, atol=0.0)
