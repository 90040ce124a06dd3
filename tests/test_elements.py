"""The element language (grokxform.elements) and the eager runners of declared primitives."""

from __future__ import annotations

import pytest
import torch
from cases import ALIASES, ROUNDS_TWICE, same_bits, special_pairs, special_values

import grokxform as gx
from grokxform import declarations as D
from grokxform.elements import (
    Scalars, TracedRule, isfinite, isnan, maximum, minimum, run_foreach, run_leaf, sign, where,
)


def _rule(v, sc):
    """Every operation of the language once, with every kind of scalar."""
    h = v.x.to(v.s.dtype)
    a = v.s * sc.number + h * sc.numbers
    b = (a - sc.tensor) / (h.sqrt() * 0.0 + sc.tensors + 1.5)
    c = where(sc.flag, -b, a) - 2.0 * a
    d = 1.0 - c / 3.0
    return {"out": (d * sc.numbers).to(v.x.dtype), "s": d, "copy": v.x.to(v.x.dtype)}


RULE = TracedRule(_rule)


def _inputs(dtype: torch.dtype, state: torch.dtype) -> tuple[dict, Scalars]:
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(s, generator=g).to(dtype) + 0.1 for s in ((7,), (3, 5), ())]
    ss = [torch.randn(x.shape, generator=g).to(state) for x in xs]
    sc = Scalars({
        "number": 0.3,
        "numbers": [0.7, 1.3, 0.11],
        "tensor": torch.tensor(0.337, dtype=torch.float64),
        "tensors": torch.tensor([0.21, 0.5, 1.7], dtype=torch.float64),
        "flag": torch.tensor([True, False, True]),
    }, 3)
    return {"x": xs, "s": ss}, sc


@pytest.mark.parametrize("dtype, state", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                          (torch.float16, torch.float16), (torch.float64, torch.float64)])
def test_foreach_equals_one_leaf_at_a_time_and_writes_no_input(dtype: torch.dtype, state: torch.dtype) -> None:
    inputs, sc = _inputs(dtype, state)
    before = {k: [t.clone() for t in v] for k, v in inputs.items()}
    versions = {k: [t._version for t in v] for k, v in inputs.items()}
    prog = RULE.program({"x": dtype, "s": state})
    got = run_foreach(prog, inputs, sc, [0, 1, 2])
    for i in range(3):
        one = run_leaf(prog, {k: v[i] for k, v in inputs.items()}, sc, i)
        for name in one:
            assert torch.equal(got[name][i], one[name]), (name, i)
    for k in inputs:
        assert all(torch.equal(a, b) for a, b in zip(inputs[k], before[k]))
        assert [t._version for t in inputs[k]] == versions[k]
    # an output never is an input tensor, nor another output's
    ids = {id(t) for v in inputs.values() for t in v}
    outs = [id(t) for v in got.values() for t in v]
    assert not ids & set(outs) and len(set(outs)) == len(outs)


def test_owned_inputs_are_updated_in_place_and_give_the_same_numbers() -> None:
    inputs, sc = _inputs(torch.float32, torch.float32)
    prog = RULE.program({"x": torch.float32, "s": torch.float32})
    pure = run_foreach(prog, {k: [t.clone() for t in v] for k, v in inputs.items()}, sc, [0, 1, 2])
    state = [t.clone() for t in inputs["s"]]
    got = run_foreach(prog, {"x": inputs["x"], "s": state}, sc, [0, 1, 2], owned=frozenset({"s"}))
    for name in pure:
        assert all(torch.equal(a, b) for a, b in zip(pure[name], got[name]))


def test_a_16_bit_value_is_never_scaled_in_place() -> None:
    """torch's in-place multiplication of a bfloat16 tensor by a number rounds the number to
    bfloat16 first; the rules' numbers are used at float32 precision, in place or not."""

    def rule(v, sc):
        t = v.x * 1.0
        return {"out": t * 0.0123}

    x = [torch.randn(1000, generator=torch.Generator().manual_seed(1)).bfloat16()]
    got = run_foreach(TracedRule(rule).program({"x": torch.bfloat16}), {"x": x}, Scalars({}, 1), [0])
    assert torch.equal(got["out"][0], x[0] * 1.0 * 0.0123)


def test_the_language_refuses_what_the_kernels_could_not_round_alike() -> None:
    def mixed(v, sc):
        return {"out": v.x + v.s}

    with pytest.raises(TypeError, match="cast one with .to"):
        TracedRule(mixed).program({"x": torch.bfloat16, "s": torch.float32})

    def branch(v, sc):
        return {"out": v.x if v.x else v.x}

    with pytest.raises(TypeError, match="no truth value"):
        TracedRule(branch).program({"x": torch.float32})

    def scalar_maths(v, sc):
        return {"out": v.x * (1.0 - sc.a)}

    with pytest.raises(TypeError, match="scalar rule"):
        TracedRule(scalar_maths).program({"x": torch.float32})
    with pytest.raises(ValueError, match="one value per leaf"):
        Scalars({"a": torch.ones(2)}, 3)
    with pytest.raises(TypeError, match="flag"):
        Scalars({"a": True}, 1)


def test_every_primitive_and_combinator_is_declared() -> None:
    assert isinstance(D.declaration_of(gx.scale_by_adam()), D.Elementwise)
    assert isinstance(D.declaration_of(gx.ema_filter()), D.Elementwise)
    assert isinstance(D.declaration_of(gx.ma_filter(3)), D.Elementwise)
    assert isinstance(D.declaration_of(gx.clip_by_global_norm()), D.Elementwise)
    assert isinstance(D.declaration_of(gx.clip_by_tensor_norm()), D.Elementwise)
    assert isinstance(D.declaration_of(gx.decoupled_weight_decay()), D.Elementwise)
    assert isinstance(D.declaration_of(gx.scale_by_learning_rate(gx.linear_warmup(1.0, 2))), D.Elementwise)
    assert isinstance(D.declaration_of(gx.amplify(gx.ema_filter())), D.Amplify)
    assert isinstance(D.declaration_of(gx.masked(gx.identity(), ["*"])), D.Masked)
    assert isinstance(D.declaration_of(gx.partition({"a": gx.identity()}, lambda p, x: "a")), D.Partition)
    assert isinstance(D.declaration_of(gx.MultiSteps(gx.identity(), 2)), D.Accumulate)
    assert isinstance(D.declaration_of(gx.apply_if_finite(gx.identity())), D.IfFinite)
    assert isinstance(D.declaration_of(gx.inject_hyperparams(gx.adamw)(lr=1e-3)), D.Injected)
    for case in ALIASES.values():
        decl = D.declaration_of(case.make())
        assert isinstance(decl, D.Sequence) and all(m is not None for m in decl.members)
    own = gx.GradientTransformation(lambda p: (), lambda u, s, p=None, **e: (u, s))
    assert D.declaration_of(own) is None and D.declaration_of(gx.chain(own)).members == (None,)


def test_a_rule_that_reads_a_scalar_its_scalar_rule_does_not_give_raises_on_every_path() -> None:
    """The element rule's scalars are the names it reads; one its scalar rule does not give is named,
    op by op and on the kernels alike; a primitive with state needs its ``init``."""
    tx = gx.base.elementwise("scale", lambda v, sc: {"out": v.x * sc.missing}, scalars=lambda ctx: ({"c": 1.0}, {}))
    params = {"a": torch.ones(3)}
    for on in (False, True):
        with gx.kernels(on), pytest.raises(ValueError, match=r"reads a scalar 'missing'.*gives \['c'\]"):
            tx.update({"a": torch.ones(3)}, tx.init(params), params)
    with pytest.raises(TypeError, match="give its init="):
        gx.base.elementwise("ema", lambda v, sc: {"out": v.x, "mu": v.mu}, fields=("mu",))


def test_a_users_own_primitive_runs_eagerly_vmapped_and_in_the_engine() -> None:
    """``gx.base.elementwise`` makes a primitive from its two rules: eager (foreach), per leaf
    under vmap, and in the engine's foreach backend, with the same numbers."""

    def rule(v, sc):
        return {"out": v.x * sc.c}

    def scale(c: float) -> gx.GradientTransformation:
        return gx.base.elementwise("scale", rule, scalars=lambda ctx: ({"c": c}, {}))

    tx = gx.chain(scale(0.5), gx.scale_by_learning_rate(0.1))
    params = {"a": torch.ones(3), "b": torch.ones(2, 2)}
    grads = {"a": torch.full((3,), 2.0), "b": torch.full((2, 2), 4.0)}
    u, _ = tx.update(grads, tx.init(params), params)
    assert torch.equal(u["a"], torch.full((3,), -0.1)) and torch.equal(u["b"], torch.full((2, 2), -0.2))
    batched = torch.func.vmap(lambda g: tx.update({"a": g, "b": grads["b"]}, tx.init(params), params)[0]["a"])(
        torch.stack([grads["a"], 2 * grads["a"]]))
    assert torch.equal(batched[1], torch.full((3,), -0.2))
    from grokxform.fused import FusedStep

    fs = FusedStep(tx, {k: v.clone() for k, v in params.items()}, backend="foreach")
    fs(grads)
    assert fs.engine == "foreach" and torch.equal(fs.params["b"], torch.full((2, 2), 0.8))


# --------------------------------------------------------------------------------------------
# abs, sign, minimum, maximum, comparisons and predicates: each is torch's op, bit for bit.

BF16_TWICE, F16_TWICE = ROUNDS_TWICE[torch.bfloat16], ROUNDS_TWICE[torch.float16]


def _ops_rule(v, sc):
    """Every new op once, with a value, a number (on either side), and each kind of scalar."""
    x, y, one = v.x, v.y, v.one
    return {
        "abs": abs(x), "sign": sign(x),
        "min": minimum(x, y), "max": maximum(x, y),
        "min_0": minimum(x, 0.0), "max_neg0": maximum(-0.0, x), "min_num": minimum(0.1, x),
        "max_num": maximum(x, -2.5), "min_nan": minimum(x, float("nan")),
        "min_tensors": minimum(x, sc.t), "max_numbers": maximum(sc.n, x), "max_number": maximum(x, sc.f),
        "min_tensor": minimum(sc.z, x),
        "lt": where(x < y, one, 0.0), "le": where(x <= sc.t, one, 0.0), "gt": where(x > BF16_TWICE, one, 0.0),
        "ge": where((x >= BF16_TWICE) | (F16_TWICE <= x), one, 0.0), "eq": where(x == sc.f, one, 0.0), "ne": where(x != sc.n, one, 0.0),
        "eq_tensor": where(sc.z == x, one, 0.0),
        "isnan": where(isnan(x), one, 0.0), "isfinite": where(isfinite(x), one, 0.0),
        "logic": where((x < y) & ~isnan(y) | (x == 0.0), one, 0.0),
        "where_left": where(x > y, 0.1, x),
    }


OPS_RULE = TracedRule(_ops_rule)


def _ieee(kind: str, x: torch.Tensor, y: torch.Tensor | float) -> torch.Tensor:
    """torch.minimum / torch.maximum, with a tie of ±0 given the IEEE 754 answer (−0 below +0),
    which torch gives or not depending on where in the tensor the tie lies."""
    y = y.to(x.dtype).expand_as(x) if isinstance(y, torch.Tensor) else torch.full_like(x, y)
    out = (torch.minimum if kind == "min" else torch.maximum)(x, y)
    negative = torch.signbit(x) | torch.signbit(y) if kind == "min" else torch.signbit(x) & torch.signbit(y)
    zero_tie = (x == 0) & (y == 0)
    return torch.where(zero_tie, torch.where(negative, -0.0, 0.0).to(x.dtype), out)


def _torch_ops(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, n: float, f: float, z: torch.Tensor) -> dict:
    """What torch's eager ops give for :func:`_ops_rule` (predicates as 1.0 / 0.0)."""
    def pred(p: torch.Tensor) -> torch.Tensor:
        return p.to(x.dtype)

    return {
        "abs": torch.abs(x), "sign": torch.sign(x),
        "min": _ieee("min", x, y), "max": _ieee("max", x, y),
        "min_0": _ieee("min", x, 0.0), "max_neg0": _ieee("max", x, -0.0), "min_num": _ieee("min", x, 0.1),
        "max_num": _ieee("max", x, -2.5), "min_nan": torch.full_like(x, float("nan")),
        "min_tensors": _ieee("min", x, t), "max_numbers": _ieee("max", x, n), "max_number": _ieee("max", x, f),
        "min_tensor": _ieee("min", x, z),
        "lt": pred(x < y), "le": pred(x <= t), "gt": pred(x > BF16_TWICE), "ge": pred((x >= BF16_TWICE) | (x >= F16_TWICE)),
        "eq": pred(x == f), "ne": pred(x != n), "eq_tensor": pred(x == z),
        "isnan": pred(torch.isnan(x)), "isfinite": pred(torch.isfinite(x)),
        "logic": pred((x < y) & ~torch.isnan(y) | (x == 0.0)),
        "where_left": torch.where(x > y, 0.1, x),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["fp32", "bf16", "fp16", "fp64"])
def test_each_new_op_is_the_torch_op_bit_for_bit(dtype: torch.dtype) -> None:
    """foreach and one leaf at a time, on every pair of special values (NaN, ±inf, ±0, subnormals,
    numbers a 16-bit dtype rounds twice through float32): a number meets a comparison rounded to
    the value's dtype (as torch's ``x < 0.1``), a tensor scalar too; minimum and maximum are
    torch's, NaN propagating, with ties of ±0 resolved as IEEE 754 does."""
    x, y = special_pairs(dtype)
    xs = [x, y.flip(0).reshape(len(special_values(dtype)), -1)]
    ys = [y, x.flip(0).reshape(xs[1].shape)]
    sc = Scalars({"t": torch.tensor([BF16_TWICE, -0.0], dtype=torch.float64), "n": [0.0, -0.0], "f": 0.1,
                  "z": torch.tensor(-0.0, dtype=torch.float64)}, 2)
    inputs = {"x": xs, "y": ys, "one": [torch.ones_like(t) for t in xs]}
    prog = OPS_RULE.program({"x": dtype, "y": dtype, "one": dtype})
    got = run_foreach(prog, inputs, sc, [0, 1])
    for i in range(2):
        want = _torch_ops(xs[i], ys[i], sc.values["t"][i], sc.values["n"][i], 0.1, sc.values["z"])
        one = run_leaf(prog, {k: v[i] for k, v in inputs.items()}, sc, i)
        for name, w in want.items():
            assert same_bits(got[name][i], w), (name, i, "foreach")
            assert same_bits(one[name], w), (name, i, "one leaf")


def test_torch_sign_and_abs_of_zeros_and_nans() -> None:
    """The language's sign is torch.sign's: +0.0 for −0.0 and for NaN (not NaN); abs clears the
    sign bit of −0.0 and of a NaN."""
    rule = TracedRule(lambda v, sc: {"sign": sign(v.x), "abs": abs(v.x)})
    x = torch.tensor([-0.0, float("nan"), -float("nan"), -3.0, 1e-45])
    got = run_foreach(rule.program({"x": torch.float32}), {"x": [x]}, Scalars({}, 1), [0])
    assert got["sign"][0].tolist() == [0.0, 0.0, 0.0, -1.0, 1.0] and not torch.signbit(got["sign"][0][:3]).any()
    assert not torch.signbit(got["abs"][0]).any()


def test_predicates_are_conditions_and_nothing_else() -> None:
    def program(rule):
        return TracedRule(rule).program({"x": torch.float32, "h": torch.bfloat16})

    with pytest.raises(TypeError, match="not an element value"):
        program(lambda v, sc: {"out": v.x < 1.0})
    with pytest.raises(TypeError, match="cannot add a value and a Pred"):
        program(lambda v, sc: {"out": v.x + (v.x < 1.0)})
    with pytest.raises(TypeError, match="no truth value"):
        program(lambda v, sc: {"out": v.x if v.x < 1.0 else v.x})
    with pytest.raises(TypeError, match="compare it first"):
        program(lambda v, sc: {"out": where((v.x < 1.0) & v.x, v.x, 0.0)})
    with pytest.raises(TypeError, match="cast one with .to"):
        program(lambda v, sc: {"out": where(v.x < v.h, v.x, 0.0)})
    with pytest.raises(TypeError, match="cast one with .to"):
        program(lambda v, sc: {"out": minimum(v.x, v.h)})
    with pytest.raises(TypeError, match="one of them a number"):
        program(lambda v, sc: {"out": where(v.x < 1.0, 0.0, 1.0)})
    with pytest.raises(TypeError, match="one of them a number"):
        program(lambda v, sc: {"out": where(v.x < 1.0, v.x, sc.flag)})
    with pytest.raises(TypeError, match="a predicate of the elements"):
        program(lambda v, sc: {"out": where(True, v.x, 0.0)})
    with pytest.raises(TypeError, match="expected an element value"):
        program(lambda v, sc: {"out": minimum(1.0, sc.flag)})
    # the flag form is unchanged, and mixes with predicates
    prog = program(lambda v, sc: {"out": where(sc.flag, where(~isnan(v.x), v.x, 0.0), -v.x)})
    assert [op.kind for op in prog.ops] == ["isnan", "not", "where", "neg", "where"]


def _clip_rule(v, sc):
    x = v.x
    clipped = minimum(maximum(x, sc.low), sc.high)
    return {"out": where(isfinite(x) & (abs(x) > 0.25), clipped, x * 0.5) + sign(x) * sc.step}


def _clip(high: torch.Tensor) -> gx.GradientTransformation:
    return gx.base.elementwise("clip_elementwise", _clip_rule,
                               scalars=lambda ctx: ({"low": -0.5, "high": high, "step": 0.01}, {}))


def _clip_in_torch(g: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    clipped = torch.clamp_max(torch.clamp_min(g, -0.5), high)
    return torch.where(torch.isfinite(g) & (torch.abs(g) > 0.25), clipped, g * 0.5) + torch.sign(g) * 0.01


def test_the_new_ops_under_vmap_grad_autograd_and_torch_compile() -> None:
    """The eager rule one leaf at a time: vmapped (per-member clip bounds too), differentiated with
    torch.func.grad and with autograd, traced whole by torch.compile, it gives torch's values and
    gradients, bit for bit."""
    high = torch.tensor(0.75)
    tx = _clip(high)
    gen = torch.Generator().manual_seed(3)
    gs = torch.randn(4, 64, generator=gen)
    gs[0, :6] = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 0.3])

    def step(g: torch.Tensor, tx: gx.GradientTransformation = tx) -> torch.Tensor:
        return tx.update({"w": g}, gx.EmptyState())[0]["w"]

    assert same_bits(torch.func.vmap(step)(gs), _clip_in_torch(gs, high))
    assert all(same_bits(torch.func.vmap(step)(gs)[k], step(gs[k])) for k in range(4))
    assert same_bits(torch.compile(step, fullgraph=True, backend="eager")(gs[0]), step(gs[0]))
    highs = torch.tensor([0.75, 0.5, 1.0, 0.0])
    per_member = torch.func.vmap(lambda g, h: step(g, _clip(h)))(gs, highs)
    assert same_bits(per_member, torch.stack([_clip_in_torch(g, h) for g, h in zip(gs, highs)]))

    finite = gs[1:]
    grad = torch.func.vmap(torch.func.grad(lambda g: step(g).sum()))(finite)
    want = torch.func.vmap(torch.func.grad(lambda g: _clip_in_torch(g, high).sum()))(finite)
    assert same_bits(grad, want) and set(grad.unique().tolist()) == {0.0, 0.5, 1.0}
    g = finite[0].clone().requires_grad_()
    step(g).pow(2).sum().backward()
    h = finite[0].clone().requires_grad_()
    _clip_in_torch(h, high).pow(2).sum().backward()
    assert same_bits(g.grad, h.grad)
