"""Property-based tests (hypothesis) over random pytrees: every pipeline, every way of running it.

Trees are nested dicts / lists / tuples of 0-d, empty and odd-shaped float32 / float64 / bfloat16
tensors; on some steps some leaves have no gradient (``None``). For each pipeline:

- functional == vmapped: 2-3 members stacked and updated by ``torch.func.vmap`` give, member by
  member, what running each member alone gives;
- functional == compiled (``backend="aot_eager"`` on a few examples, inductor on one fixed tree);
- purity: the inputs' values and ``_version`` are unchanged, no update aliases a state tensor;
- a leaf without a gradient keeps every state tensor it owns, bit for bit, and gets no update;
- a NaN / ±inf in one leaf: under ``apply_if_finite`` params and state stay bit for bit and the skip
  is counted; without it, every other leaf's update and state are exactly those of a step where the
  bad leaf's gradient is zero.

Examples per property: ``GROKXFORM_PROPERTY_EXAMPLES`` (default 30; the compiled property runs a fifteenth of that, at least 2); CI runs a fixed (derandomized)
set, ``GROKXFORM_PROPERTY_RANDOM=1`` explores new ones.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from cases import ALIASES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import grokxform as gx
from grokxform import tree as T
from grokxform.transforms.combinators import MultiSteps, apply_if_finite, masked, partition

EXAMPLES = int(os.environ.get("GROKXFORM_PROPERTY_EXAMPLES", "30"))
RANDOM = bool(os.environ.get("GROKXFORM_PROPERTY_RANDOM"))


def _settings(n: int) -> settings:
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=not RANDOM,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


DTYPES = (torch.float32, torch.float64, torch.bfloat16)
KEYS = ("w", "b", "emb", "blocks", "norm", "head")


# ---------------------------------------------------------------- pipelines


def handmade(skip_non_finite: bool = True) -> gx.GradientTransformation:
    """masked + partition + apply_if_finite + MultiSteps around the primitives."""
    labels = lambda path, p: "matrix" if p.ndim >= 2 else "vector"  # noqa: E731
    inner = gx.chain(
        partition(
            {
                "matrix": gx.chain(gx.clip_by_global_norm(1.0), gx.amplify(gx.ema_filter(0.9), 2.0), gx.scale_by_adam()),
                "vector": gx.chain(gx.amplify(gx.ma_filter(2, warmup=False), 1.0), gx.scale_by_adam(b1=0.5)),
            },
            labels,
        ),
        masked(gx.decoupled_weight_decay(0.1), lambda path, p: p.ndim >= 1),
        gx.scale_by_learning_rate(1e-2),
    )
    multi = MultiSteps(inner, every_k_schedule=2)
    return apply_if_finite(multi) if skip_non_finite else multi


PIPELINES: dict[str, Callable[[], gx.GradientTransformation]] = {
    **{name: case.make for name, case in ALIASES.items()},
    "handmade": handmade,
}
NAMES = sorted(PIPELINES)


# ---------------------------------------------------------------- random trees


@dataclasses.dataclass(frozen=True)
class Leaf:
    shape: tuple[int, ...]
    dtype: torch.dtype


leaves = st.builds(
    Leaf,
    st.lists(st.integers(0, 4), max_size=3).map(tuple),  # () is 0-d; a 0 gives an empty tensor
    st.sampled_from(DTYPES),
)
subtrees = st.recursive(
    leaves,
    lambda kids: st.one_of(
        st.dictionaries(st.sampled_from(KEYS), kids, min_size=1, max_size=3),
        st.lists(kids, min_size=1, max_size=3),
        st.lists(kids, min_size=1, max_size=2).map(tuple),
    ),
    max_leaves=6,
)
specs = st.dictionaries(st.sampled_from(KEYS), subtrees, min_size=1, max_size=3)


def build(spec: Any, make: Callable[[Leaf], Any]) -> Any:
    if isinstance(spec, Leaf):
        return make(spec)
    if isinstance(spec, dict):
        return {k: build(v, make) for k, v in spec.items()}
    return type(spec)(build(v, make) for v in spec)


def spec_leaves(spec: Any) -> list[Leaf]:
    out: list[Leaf] = []
    build(spec, out.append)
    return out


@dataclasses.dataclass
class Case:
    spec: Any
    steps: int
    none: list[list[bool]]  # none[t][i]: leaf i has no gradient at step t
    seed: int
    scale: float

    def params(self, member: int = 0) -> Any:
        g = torch.Generator().manual_seed(self.seed + 7919 * member)

        def make(leaf: Leaf) -> torch.Tensor:
            x = torch.randn(leaf.shape, generator=g)
            if self.seed % 2 == 0:  # some −0.0 entries: "bit for bit" must keep their sign
                x.view(-1)[::3] = -0.0
            return x.to(leaf.dtype)

        return build(self.spec, make)

    def grads(self, t: int, member: int = 0) -> Any:
        g = torch.Generator().manual_seed(self.seed + 7919 * member + 104729 * (t + 1))
        flat, spec = T.flatten(build(self.spec, lambda leaf: leaf))
        out = [
            None if self.none[t][i] else (self.scale * torch.randn(leaf.shape, generator=g)).to(leaf.dtype)
            for i, leaf in enumerate(flat)
        ]
        return T.unflatten(out, spec)

    def extra(self, t: int) -> dict[str, torch.Tensor]:
        return {"train_loss": torch.tensor(1.0 / (t + 1)), "val_loss": torch.tensor(1.5)}


@st.composite
def cases(draw: Any, max_steps: int = 4) -> Case:
    spec = draw(specs)
    n = len(spec_leaves(spec))
    steps = draw(st.integers(1, max_steps))
    none = [
        draw(st.lists(st.booleans(), min_size=n, max_size=n)) if draw(st.integers(0, 2)) == 0 else [False] * n
        for _ in range(steps)
    ]
    return Case(spec, steps, none, draw(st.integers(0, 2**20)), draw(st.sampled_from([1e-3, 1.0, 30.0])))


# ---------------------------------------------------------------- comparisons


def tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in T.flatten(tree)[0] if isinstance(x, torch.Tensor)]


_INT_OF = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (−0.0 differs from 0.0, a NaN equals the same NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    return torch.equal(a.view(_INT_OF[a.element_size()]), b.view(_INT_OF[b.element_size()]))


def trees_same_bits(a: Any, b: Any) -> bool:
    la, sa = T.flatten(a)
    lb, sb = T.flatten(b)
    return sa == sb and all(
        same_bits(x, y) if isinstance(x, torch.Tensor) else x is None and y is None for x, y in zip(la, lb)
    )


TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-5), torch.bfloat16: (3e-2, 1e-2)}


def assert_close_trees(got: Any, want: Any, what: str, params: Any = None) -> None:
    """Close leaf by leaf, within the tolerance of the leaf's dtype; a state tensor owned by a
    bfloat16 param (its float32 EMA, say) gets bfloat16's, as its inputs were rounded to bfloat16."""
    precision = {}
    if params is not None:
        p_leaves = T.flatten(params)[0]
        for i, owned in owned_state(want, params).items():
            for x in owned:
                precision[id(x)] = p_leaves[i].dtype
    lg, sg = T.flatten(got)
    lw, sw = T.flatten(want)
    assert sg == sw, f"{what}: structures differ"
    names = T.path_names(want)
    for name, x, y in zip(names, lg, lw):
        if not isinstance(y, torch.Tensor):
            assert x is None and y is None, f"{what} {name}"
            continue
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what} {name}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}"
        if not y.is_floating_point():
            assert torch.equal(x, y), f"{what} {name}: {x} vs {y}"
            continue
        rtol, atol = TOL[precision.get(id(y), y.dtype)] if precision.get(id(y)) == torch.bfloat16 else TOL[y.dtype]
        xd, yd = x.double(), y.double()
        assert torch.equal(xd.isnan(), yd.isnan()), f"{what} {name}: NaN pattern differs"
        ok = ~yd.isnan()
        err = (xd[ok] - yd[ok]).abs() - rtol * yd[ok].abs()
        assert err.numel() == 0 or err.max().item() <= atol, f"{what} {name}: off by {err.max().item():.3g}"


def stack(trees: list[Any]) -> Any:
    return T.tree_map(lambda *xs: None if xs[0] is None else torch.stack(xs), *trees)


def batch_dims(tree: Any) -> Any:
    """``in_dims`` / ``out_dims`` for ``torch.func.vmap``: 0 for a tensor, None for a None leaf."""
    return T.tree_map(lambda x: None if x is None else 0, tree)


def member(tree: Any, i: int) -> Any:
    return T.tree_map(lambda x: None if x is None else x[i], tree)


def run_alone(tx: gx.GradientTransformation, case: Case, m: int = 0) -> tuple[Any, Any]:
    params = case.params(m)
    state = tx.init(params)
    for t in range(case.steps):
        updates, state = tx.update(case.grads(t, m), state, params, **case.extra(t))
        params = gx.apply_updates(params, updates)
    return params, state


def owned_state(state: Any, params: Any) -> dict[int, list[torch.Tensor]]:
    """Per param leaf i, the state tensors that belong to it: the leaves of every subtree of the state
    shaped like the params (EMA μ, Adam m and v, the per-leaf counters, each MA window slot...)."""
    spec = T.flatten(params)[1]
    out: dict[int, list[torch.Tensor]] = {}

    def walk(node: Any) -> None:
        if node is None or isinstance(node, torch.Tensor):
            return
        if isinstance(node, (dict, list, tuple)) and T.flatten(node)[1] == spec:
            for i, x in enumerate(T.flatten(node)[0]):
                if isinstance(x, torch.Tensor):
                    out.setdefault(i, []).append(x)
            return
        children = node.values() if isinstance(node, dict) else node if isinstance(node, (list, tuple)) else ()
        for c in children:
            walk(c)

    walk(state)
    return out


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("name", NAMES)
@_settings(EXAMPLES)
@given(case=cases(), n_members=st.integers(2, 3))
def test_vmapped_equals_each_member_alone(name: str, case: Case, n_members: int) -> None:
    tx = PIPELINES[name]()
    alone = [run_alone(tx, case, m) for m in range(n_members)]
    params = stack([case.params(m) for m in range(n_members)])
    state = stack([tx.init(case.params(m)) for m in range(n_members)])
    for t in range(case.steps):
        extra = case.extra(t)
        grads = stack([case.grads(t, m) for m in range(n_members)])
        # vmap takes a None leaf for an input: say so with in_dims / out_dims of None there
        g_dims, s_dims, p_dims = batch_dims(grads), batch_dims(state), batch_dims(params)
        update = torch.func.vmap(
            lambda g, s, p: tx.update(g, s, p, **extra),  # noqa: B023
            in_dims=(g_dims, s_dims, p_dims),
            out_dims=(g_dims, s_dims),
        )
        updates, state = update(grads, state, params)
        params = gx.apply_updates(params, updates)
    for m, (want_p, want_s) in enumerate(alone):
        assert_close_trees(member(params, m), want_p, f"{name} member {m} params")
        assert_close_trees(member(state, m), want_s, f"{name} member {m} state", want_p)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "handmade" else n for n in NAMES])
@_settings(max(2, EXAMPLES // 15))
@given(case=cases(max_steps=3))
def test_compiled_aot_eager_equals_functional(name: str, case: Case) -> None:
    torch._dynamo.reset()
    tx = PIPELINES[name]()
    want_p, want_s = run_alone(tx, case)
    compiled = torch.compile(tx.update, backend="aot_eager", fullgraph=True)
    params = case.params()
    state = tx.init(params)
    for t in range(case.steps):
        updates, state = compiled(case.grads(t), state, params, **case.extra(t))
        params = gx.apply_updates(params, updates)
    assert_close_trees(params, want_p, f"{name} compiled params")
    assert_close_trees(state, want_s, f"{name} compiled state", want_p)


def test_compiled_inductor_equals_functional_on_a_mixed_tree() -> None:
    torch._dynamo.reset()
    spec = {
        "emb": Leaf((5, 3), torch.float32),
        "blocks": [{"w": Leaf((3, 3), torch.bfloat16), "b": Leaf((3,), torch.float32)}, (Leaf((), torch.float32),)],
        "norm": Leaf((0, 2), torch.float32),
    }
    none = [[False] * 5, [False, True, False, False, False], [False] * 5]
    case = Case(spec, 3, none, seed=3, scale=10.0)
    tx = gx.grokadamw(lr=1e-2)
    want_p, want_s = run_alone(tx, case)
    compiled = torch.compile(tx.update, backend="inductor", fullgraph=True)
    params = case.params()
    state = tx.init(params)
    for t in range(case.steps):
        updates, state = compiled(case.grads(t), state, params, **case.extra(t))
        params = gx.apply_updates(params, updates)
    assert_close_trees(params, want_p, "inductor params")
    assert_close_trees(state, want_s, "inductor state", want_p)


@pytest.mark.parametrize("name", NAMES)
@_settings(EXAMPLES)
@given(case=cases())
def test_update_is_pure_and_none_leaves_keep_their_state(name: str, case: Case) -> None:
    tx = PIPELINES[name]()
    params = case.params()
    state = tx.init(params)
    for t in range(case.steps):
        grads = case.grads(t)
        inputs = tensors((grads, state, params))
        before = [(x.clone(), x._version) for x in inputs]
        updates, new_state = tx.update(grads, state, params, **case.extra(t))
        for (copy, version), x in zip(before, inputs):
            assert x._version == version, f"{name}: an input was modified in place"
            assert same_bits(copy, x), f"{name}: an input changed"
        state_ptrs = {x.untyped_storage().data_ptr() for x in tensors((state, new_state)) if x.numel() > 0}
        for u in tensors(updates):
            assert u.numel() == 0 or u.untyped_storage().data_ptr() not in state_ptrs, f"{name}: update aliases state"
        old, new = owned_state(state, params), owned_state(new_state, params)
        assert old.keys() == new.keys()
        u_leaves = T.flatten(updates)[0]
        for i, is_none in enumerate(case.none[t]):
            if is_none:
                assert u_leaves[i] is None, f"{name}: leaf {i} without a gradient got an update"
                assert all(same_bits(a, b) for a, b in zip(old.get(i, []), new.get(i, []))), (
                    f"{name}: leaf {i} without a gradient had its state changed"
                )
            else:
                assert u_leaves[i] is not None
        new_params = gx.apply_updates(params, updates)
        for i, (p, q) in enumerate(zip(T.flatten(params)[0], T.flatten(new_params)[0])):
            assert q.dtype == p.dtype and q.shape == p.shape
            if case.none[t][i]:
                assert q is p
        state, params = new_state, new_params


def _with_bad_value(case: Case, t: int, leaf: int, pos: int, value: float) -> Any:
    grads = case.grads(t)
    flat, spec = T.flatten(grads)
    g = flat[leaf].clone()
    g.view(-1)[pos % g.numel()] = value
    flat[leaf] = g
    return T.unflatten(flat, spec)


def _bad_case(draw: Any) -> tuple[Case, int, int, float]:
    case = draw(cases(max_steps=3))
    flat = spec_leaves(case.spec)
    nonempty = [i for i, leaf in enumerate(flat) if all(d > 0 for d in leaf.shape)]
    if not nonempty:  # make the first leaf a vector that can hold a bad value
        first = next(iter(case.spec))
        case.spec = {**case.spec, first: Leaf((3,), torch.float32)}
        flat = spec_leaves(case.spec)
        case.none = [[False] * len(flat) for _ in range(case.steps)]
        nonempty = [i for i, leaf in enumerate(flat) if all(d > 0 for d in leaf.shape)]
    leaf = draw(st.sampled_from(nonempty))
    for row in case.none:  # the bad step is the last one; the bad leaf has a gradient there
        row[leaf] = row[leaf] and row is not case.none[-1]
    value = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    return case, leaf, draw(st.integers(0, 63)), value


@st.composite
def bad_cases(draw: Any) -> tuple[Case, int, int, float]:
    return _bad_case(draw)


@pytest.mark.parametrize("name", NAMES)
@_settings(EXAMPLES)
@given(bad=bad_cases())
def test_apply_if_finite_skips_a_non_finite_step_bit_for_bit(name: str, bad: tuple[Case, int, int, float]) -> None:
    case, leaf, pos, value = bad
    tx = apply_if_finite(PIPELINES[name]())
    params = case.params()
    state = tx.init(params)
    for t in range(case.steps - 1):
        updates, state = tx.update(case.grads(t), state, params, **case.extra(t))
        params = gx.apply_updates(params, updates)
    last = case.steps - 1
    updates, new_state = tx.update(_with_bad_value(case, last, leaf, pos, value), state, params, **case.extra(last))
    new_params = gx.apply_updates(params, updates)
    assert trees_same_bits(new_params, params), f"{name}: a skipped step moved the params"
    assert trees_same_bits(new_state.inner_state, state.inner_state), f"{name}: a skipped step changed the state"
    assert int(new_state.notfinite_count) == int(state.notfinite_count) + 1
    assert int(new_state.total_notfinite) == int(state.total_notfinite) + 1
    assert not bool(new_state.last_finite)
    # the next finite step is taken and resets the run of skips
    updates, after = tx.update(case.grads(last), new_state, new_params, **case.extra(last))
    assert int(after.notfinite_count) == 0 and int(after.total_notfinite) == int(new_state.total_notfinite)
    assert bool(after.last_finite)


UNWRAPPED: dict[str, Callable[[], gx.GradientTransformation]] = {
    **PIPELINES,
    "handmade": lambda: handmade(skip_non_finite=False),
}


# Micro-steps per real step: under MultiSteps the clip sees the window's mean, so the reference
# zeroes the bad leaf over the whole window (earlier micro-steps touch only the bad leaf's own sum).
WINDOW = {"handmade": 2}


@pytest.mark.parametrize("name", NAMES)
@_settings(EXAMPLES)
@given(bad=bad_cases())
def test_without_apply_if_finite_a_bad_leaf_never_touches_the_others(
    name: str, bad: tuple[Case, int, int, float]
) -> None:
    """The other leaves get exactly the update and state of a step where the bad leaf's gradient
    is zero (the global clip's scale is taken over the finite leaves)."""
    case, leaf, pos, value = bad
    last = case.steps - 1
    window = WINDOW.get(name, 1)
    first_zeroed = last - last % window

    def run(bad_step: bool) -> tuple[Any, Any, Any]:
        tx = UNWRAPPED[name]()
        params = case.params()
        state = tx.init(params)
        for t in range(case.steps):
            grads = case.grads(t)
            if bad_step and t == last:
                grads = _with_bad_value(case, t, leaf, pos, value)
            elif not bad_step and t >= first_zeroed:
                flat, spec = T.flatten(grads)
                flat[leaf] = None if flat[leaf] is None else torch.zeros_like(flat[leaf])
                grads = T.unflatten(flat, spec)
            before = params
            updates, state = tx.update(grads, state, params, **case.extra(t))
            params = gx.apply_updates(params, updates)
        return updates, state, before

    u_bad, s_bad, params = run(True)
    u_zero, s_zero, _ = run(False)
    own_bad, own_zero = owned_state(s_bad, params), owned_state(s_zero, params)
    for i, (a, b) in enumerate(zip(T.flatten(u_bad)[0], T.flatten(u_zero)[0])):
        if i == leaf:
            continue
        assert (a is None and b is None) or same_bits(a, b), f"{name}: leaf {i}'s update was touched by leaf {leaf}"
        assert all(same_bits(x, y) for x, y in zip(own_bad.get(i, []), own_zero.get(i, []))), (
            f"{name}: leaf {i}'s state was touched by leaf {leaf}"
        )
        new_p = T.flatten(gx.apply_updates(params, u_bad))[0][i]
        assert bool(torch.isfinite(new_p).all()), f"{name}: leaf {i}'s param became non-finite"
