"""The element language (grokxform.elements) and the eager runners of declared primitives."""

from __future__ import annotations

import pytest
import torch
from cases import ALIASES

import grokxform as gx
from grokxform import declarations as D
from grokxform.elements import Scalars, TracedRule, run_foreach, run_leaf, where


def _rule(v, sc):
    """Every operation of the language once, with every kind of scalar."""
    h = v.x.to(v.s.dtype)
    a = v.s * sc.number + h * sc.numbers
    b = (a - sc.tensor) / (h.sqrt() * 0.0 + sc.tensors + 1.5)
    c = where(sc.flag, -b, a) - 2.0 * a
    d = 1.0 - c / 3.0
    return {"out": (d * sc.numbers).to(v.x.dtype), "s": d, "copy": v.x.to(v.x.dtype)}


RULE = TracedRule(_rule, ("number", "numbers", "tensor", "tensors", "flag"))


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
    got = run_foreach(TracedRule(rule, ()).program({"x": torch.bfloat16}), {"x": x}, Scalars({}, 1), [0])
    assert torch.equal(got["out"][0], x[0] * 1.0 * 0.0123)


def test_the_language_refuses_what_the_kernels_could_not_round_alike() -> None:
    def mixed(v, sc):
        return {"out": v.x + v.s}

    with pytest.raises(TypeError, match="cast one with .to"):
        TracedRule(mixed, ()).program({"x": torch.bfloat16, "s": torch.float32})

    def branch(v, sc):
        return {"out": v.x if v.x else v.x}

    with pytest.raises(TypeError, match="no truth value"):
        TracedRule(branch, ()).program({"x": torch.float32})

    def scalar_maths(v, sc):
        return {"out": v.x * (1.0 - sc.a)}

    with pytest.raises(TypeError, match="scalar rule"):
        TracedRule(scalar_maths, ("a",)).program({"x": torch.float32})
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


def test_a_users_own_primitive_runs_eagerly_vmapped_and_in_the_engine() -> None:
    """``gx.base.elementwise`` makes a primitive from its two rules: eager (foreach), per leaf
    under vmap, and in the engine's foreach backend, with the same numbers."""

    def rule(v, sc):
        return {"out": v.x * sc.c}

    def scale(c: float) -> gx.GradientTransformation:
        return gx.base.elementwise("scale", lambda params: gx.EmptyState(), rule, ("c",), lambda ctx: ({"c": c}, {}))

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
