"""The engine's foreach backend: a plan run in place with ``torch._foreach_*`` ops.

Where no kernel is generated (the CPU, or CUDA without Triton), an owner of the state (the
optimizer) still runs the whole chain as one program per group of leaves: the element programs of
the primitives in the chain's order (:mod:`grokxform.elements`), the state fields updated in
place at their last read (the owner overwrites them anyway), temporaries reused, and the params
updated with one ``_foreach_add_``. The per-step Python of the eager path (flattening trees,
checks, grouping leaves, per primitive) is done once, when the plan is built. The numbers are
the eager path's: the same programs, the same scalar rules, the same reductions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from grokxform._resum import sum_windows
from grokxform.elements import Scalars, TracedRule, run_foreach
from grokxform.engine import plan as P
from grokxform.transforms.compress import Bf16Pair, Bf16Stochastic, Int8Blocks, decode, encode, stochastic


def _slot(ring: Any, k: int) -> Any:
    """Slot ``k`` of a compressed ring (views of its parts)."""
    return type(ring)(*(part[k] for part in ring))


class Reached(Exception):
    """The pass's reduction point: ``x`` is the value reduced there, ``sums`` the values summed."""

    def __init__(self, x: list[torch.Tensor], sums: dict[str, list[torch.Tensor]]) -> None:
        super().__init__()
        self.x, self.sums = x, sums


class Stashed(Exception):
    """The pass's whole-leaf stage: its input is in the stage's buffers."""


@dataclass
class Vals:
    """A value of the foreach backend: one tensor per leaf of the group, and whether they are
    temporaries of this pass (which an op may update in place at their last use)."""

    ts: list[torch.Tensor]
    owned: bool


class GroupPass:
    """One pass of the plan over one group of leaves (leaves that run the same program with the
    same dtypes), with lists of tensors for values: a :class:`~grokxform.engine.plan.Runner`."""

    def __init__(
        self, step: Any, grp: Any, pass_index: int, scalars: dict[int, Scalars], flags: dict[tuple[int, str], Any]
    ) -> None:
        self.step, self.grp, self.pass_index = step, grp, pass_index
        self.main = pass_index == step.plan.passes - 1
        self.leaf = grp.leaves[0]
        self.scalars, self.flags = scalars, flags
        self.guards: list[torch.Tensor] = []
        self._lists = {id(v) for v in grp.roles.values()}
        self._slots: dict[int, list[int]] = {}

    def run(self) -> None:
        """The whole program; the params updated in place (``θ ← θ + u``), or the update stored."""
        out = self.step.plan.root.apply(self, Vals(self.grp.roles["G"], False)).ts
        if self.step.output == "updates":
            torch._foreach_copy_(self.grp.roles["U"], out)
            return
        params = self.grp.roles["P"]
        dt = params[0].dtype
        torch._foreach_add_(params, out if out[0].dtype == dt else [t.to(dt) for t in out])

    def reduce_input(self) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
        """The values at this pass's reduction point: the value reduced and the values summed."""
        try:
            self.step.plan.root.apply(self, Vals(self.grp.roles["G"], False))
        except Reached as r:
            return r.x, r.sums
        raise AssertionError("the pass has no reduction point in this group")

    def stash_input(self) -> None:
        """The program up to this pass's whole-leaf stage, its input stored in the stage's buffers."""
        try:
            self.step.plan.root.apply(self, Vals(self.grp.roles["G"], False))
        except Stashed:
            return
        raise AssertionError("the pass has no whole-leaf stage in this group")

    # -- what the plan's nodes drive (grokxform.engine.plan.Runner) ------------------------------

    def rule(self, node: Any, rule: TracedRule, inputs: dict[str, Vals]) -> dict[str, Vals]:
        """The rule over the lists; an input that is ours (a temporary, or a state the pass
        overwrites) may be updated in place. An output is ours unless it is a role's own list or
        an input that was not."""
        prog = rule.program({name: v.ts[0].dtype for name, v in inputs.items()})
        mine = frozenset(name for name, v in inputs.items() if v.owned)
        idx = self._idx(node)
        sc = self.scalars.get(id(node)) or Scalars({}, len(idx))  # (a reduction's sums come before its scalars)
        got = run_foreach(prog, {name: v.ts for name, v in inputs.items()}, sc, idx, mine)
        theirs = [v.ts for name, v in inputs.items() if name not in mine]
        return {name: Vals(out, id(out) not in self._lists and all(out is not t for t in theirs))
                for name, out in got.items()}

    def param(self) -> Vals:
        return Vals(self.grp.roles["P"], False)

    def state(self, node: Any, name: str) -> Vals:
        codec = node.codec(self.leaf, name)
        if codec is not None:  # decoded into temporaries of this pass
            return Vals([decode(p, codec.block_size) for p in self._packed(node, name, codec)], True)
        # Its old values are not needed after the step (the pass overwrites them), unless a wrapper may skip it.
        return Vals(self.grp.roles[self.step._role(node, name)], self.main and not self.guards)

    def write(self, node: Any, name: str, value: Vals) -> None:
        codec = node.codec(self.leaf, name)
        if codec is None:
            self.store(self.grp.roles[self.step._role(node, name)], value.ts)
            return
        packed = self._packed(node, name, codec)
        keys = self._keys(node, codec, len(packed))
        new = [encode(x, codec.fmt, nonnegative=codec.unsigned, block_size=codec.block_size, key=k)
               for x, k in zip(value.ts, keys)]
        for j in range(len(packed[0])):
            self.store([p[j] for p in packed], [q[j] for q in new])

    def _packed(self, node: Any, name: str, codec: P.Codec) -> list[Any]:
        """The compressed tensors of ``node``'s column ``name`` (one per leaf of the group)."""
        role = self.step._role(node, name)
        kind = {"bf16": Bf16Pair, "bf16_sr": Bf16Stochastic, "int8": Int8Blocks}[codec.fmt]
        return [kind(*ts) for ts in zip(*(self.grp.roles[f"{role}__{part}"] for part in kind._fields))]

    def oldest(self, m: P.Member) -> Vals:
        slot = self.scalars[id(m)].values[P.SLOT]
        where = self._slots[id(m)] = [int(s) for s in slot[self._idx(m)].tolist()]
        codec = m.codec(self.leaf, "window")
        if codec is not None:  # the oldest slot decoded into temporaries of this pass
            rings = self._packed(m, "window", codec)
            return Vals([decode(_slot(ring, k), codec.block_size) for ring, k in zip(rings, where)], True)
        rings = self.grp.roles[self.step._role(m, "window")]
        return Vals([ring[k] for ring, k in zip(rings, where)], False)

    def push(self, m: P.Member, newest: Vals, out: Vals, total: Vals | None) -> Vals:
        slots = self._slots[id(m)]
        codec = m.codec(self.leaf, "window")
        if codec is not None:
            self.push_packed(m, codec, slots, newest.ts, total)
            return out
        rings = self.grp.roles[self.step._role(m, "window")]
        self.store([ring[k] for ring, k in zip(rings, slots)], newest.ts)
        resummed = self.resum(m, slots, out.ts)
        return out if resummed is out.ts else Vals(resummed, True)

    def push_packed(self, m: P.Member, codec: P.Codec, slots: list[int], newest: list[torch.Tensor],
                    total: Vals | None) -> None:
        """``newest`` encoded into the oldest slots of the compressed rings; the running sums
        ``total + (q − newest)`` (q: what the slots now hold, decoded), or on a leaf due for its
        re-sum its decoded slots summed oldest first (:func:`~grokxform._resum.window_sum`'s order),
        one slot of every due leaf at a time."""
        rings = self._packed(m, "window", codec)
        keys = self._keys(m, codec, len(rings))
        new = [encode(x, codec.fmt, block_size=codec.block_size, key=k) for x, k in zip(newest, keys)]
        for j in range(len(new[0])):
            self.store([ring[j][k] for ring, k in zip(rings, slots)], [p[j] for p in new])
        wf = m.decl.window
        if wf is None or wf.total is None or total is None:
            return
        totals = self.grp.roles[self.step._role(m, wf.total)]
        q = [decode(p, codec.block_size) for p in new]
        acc = totals[0].dtype
        self.store(totals, [t + (a.to(acc) - g.to(acc)) for t, a, g in zip(total.ts, q, newest)])
        due = [k for k, s in enumerate(slots) if s == wf.size - 1]
        if not due:
            return
        sums = [q[k].to(torch.float64) if wf.size == 1 else decode(_slot(rings[k], 0), codec.block_size).to(torch.float64)
                for k in due]
        for j in range(1, wf.size):
            torch._foreach_add_(sums, [q[k] if j == wf.size - 1 else decode(_slot(rings[k], j), codec.block_size)
                                       for k in due])
        self.store([totals[k] for k in due], [v.to(totals[k].dtype) for v, k in zip(sums, due)])

    def reached(self, x: Vals, sums: dict[str, Vals]) -> NoReturn:
        raise Reached(x.ts, {name: v.ts for name, v in sums.items()})

    def stash(self, node: P.Whole, x: Vals) -> NoReturn:
        buffers = self.grp.roles[self.step._role(node, "stash")]
        if x.ts[0].dtype != buffers[0].dtype:
            raise P.Unsupported(f"{node.where}: its input is {x.ts[0].dtype}, not the gradient's {buffers[0].dtype}")
        torch._foreach_copy_(buffers, x.ts)  # (a buffer, not state: written whatever the flags)
        raise Stashed

    def stashed(self, node: P.Whole) -> Vals:
        return Vals(self.grp.roles[self.step._role(node, "stash")], False)

    def shared(self, x: Vals) -> Vals:
        return Vals(x.ts, False)

    @contextmanager
    def gated(self, node: Any, flag: str) -> Iterator[None]:
        self.guards.append(self.flags[(id(node), flag)])
        try:
            yield
        finally:
            self.guards.pop()

    def resum(self, m: P.Member, slots: list[int], out: list[torch.Tensor]) -> list[torch.Tensor]:
        """The window's sum into the running sum of each leaf due for it (its ring is in order on
        that update: the newest value was just written to the last slot). Returns ``out``, copied
        first if it is the running sums' own tensors (a ``"sum"`` filter): the update's output is
        the running sum before the re-sum, as in the eager path."""
        wf = m.decl.window
        if wf is None or wf.total is None:
            return out
        due = [k for k, s in enumerate(slots) if s == wf.size - 1]
        if not due:
            return out
        rings = self.grp.roles[self.step._role(m, "window")]
        totals = self.grp.roles[self.step._role(m, wf.total)]
        if any(o.data_ptr() == t.data_ptr() for o, t in zip(out, totals)):
            out = [o.clone() for o in out]
        sums = sum_windows([list(rings[k].unbind()) for k in due], [totals[k].dtype for k in due])
        self.store([totals[k] for k in due], sums)
        return out

    def store(self, dst: list[torch.Tensor], new: list[torch.Tensor]) -> None:
        """``dst ← new`` in place (where the wrappers' flags are set)."""
        if new is dst:
            if not self.guards:
                return
            raise AssertionError("a guarded state was updated in place")
        if self.guards:
            flag = self.guards[0]
            for g in self.guards[1:]:
                flag = flag & g
            new = [torch.where(flag, n, d) for n, d in zip(new, dst)]
        torch._foreach_copy_(dst, new)

    def _idx(self, node: Any) -> list[int]:
        return self.grp.idx[id(node)]

    def _keys(self, node: Any, codec: P.Codec, n: int) -> Any:
        """The stochastic rounding's key of each of the ``n`` leaves ``node`` codes (0 where the
        field rounds to nearest)."""
        if not stochastic(codec.fmt, codec.unsigned):
            return [0] * n
        return self.scalars[id(node)].values[codec.key][self._idx(node)]

