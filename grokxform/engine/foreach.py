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

from typing import Any

import torch

from grokxform import declarations as D
from grokxform._resum import sum_windows
from grokxform.elements import Scalars, run_foreach
from grokxform.engine import plan as P


class Reached(Exception):
    """The pass's reduction point: ``x`` is the value reduced there."""

    def __init__(self, x: list[torch.Tensor]) -> None:
        super().__init__()
        self.x = x


class GroupPass:
    """One pass of the plan over one group of leaves (leaves that run the same program with the
    same dtypes), with lists of tensors for values."""

    def __init__(
        self, step: Any, grp: Any, pass_index: int, scalars: dict[int, Scalars], flags: dict[tuple[int, str], Any]
    ) -> None:
        self.step, self.grp, self.pass_index = step, grp, pass_index
        self.main = pass_index == step.plan.passes - 1
        self.leaf = grp.leaves[0]
        self.scalars, self.flags = scalars, flags
        self.guards: list[torch.Tensor] = []
        self._lists = {id(v) for v in grp.roles.values()}

    def run(self) -> None:
        """The whole program; the params updated in place (``θ ← θ + u``), or the update stored."""
        out, _ = self.node(self.step.plan.root, self.grp.roles["G"], False)
        if self.step.output == "updates":
            torch._foreach_copy_(self.grp.roles["U"], out)
            return
        params = self.grp.roles["P"]
        dt = params[0].dtype
        torch._foreach_add_(params, out if out[0].dtype == dt else [t.to(dt) for t in out])

    def reduce_input(self) -> list[torch.Tensor]:
        """The values at this pass's reduction point."""
        try:
            self.node(self.step.plan.root, self.grp.roles["G"], False)
        except Reached as r:
            return r.x
        raise AssertionError("the pass has no reduction point in this group")

    # -- the plan -------------------------------------------------------------------------------

    def node(self, node: Any, x: list[torch.Tensor], owned: bool) -> tuple[list[torch.Tensor], bool]:
        """``node`` applied to ``x``; ``owned``: whether ``x`` is a temporary that may be written."""
        leaf = self.leaf
        if isinstance(node, P.Seq):
            for kid in node.children:
                x, owned = self.node(kid, x, owned)
            return x, owned
        if isinstance(node, P.Mask):
            return self.node(node.inner, x, owned) if leaf in node.selected else (x, owned)
        if isinstance(node, P.Part):
            return self.node(node.members[node.labels[leaf]], x, owned)
        if isinstance(node, P.Inject):
            return self.node(node.inner, x, owned)
        if isinstance(node, P.Amp):
            if leaf not in node.leaves:
                return x, owned
            slow, slow_owned = self.node(node.inner, x, False)  # x is read again below
            prog = node.rule.program({"x": x[0].dtype, "slow": slow[0].dtype})
            mine = frozenset(n for n, o in (("x", owned), ("slow", slow_owned)) if o)
            got = run_foreach(prog, {"x": x, "slow": slow}, self.scalars[id(node)], self._idx(node), mine)
            return got["out"], True
        if isinstance(node, P.Member):
            return self.member(node, x, owned)
        if isinstance(node, P.Accum):
            return self.accumulate(node, x, owned)
        if isinstance(node, P.Finite):
            if node.reduction == self.pass_index:
                raise Reached(x)
            finite = self.flags[(id(node), "finite")]
            self.guards.append(finite)
            y, _ = self.node(node.inner, x, owned)
            self.guards.pop()
            return _skip(finite, y), True
        raise AssertionError(type(node))

    def member(self, m: P.Member, x: list[torch.Tensor], owned: bool) -> tuple[list[torch.Tensor], bool]:
        if self.leaf not in m.leaves:
            return x, owned
        if m.reduction == self.pass_index:
            raise Reached(x)
        decl: D.Elementwise = m.decl
        grp, role = self.grp, self.step._role
        inputs: dict[str, list[torch.Tensor]] = {"x": x}
        mine = {"x"} if owned else set()
        if decl.needs_params:
            inputs["param"] = grp.roles["P"]
        for f in decl.fields:
            inputs[f] = grp.roles[role(m, f)]
            if self.main and not self.guards:  # its old values are not needed after this step
                mine.add(f)
        slots: list[torch.Tensor] = []
        if decl.window is not None:
            slot = self.scalars[id(m)].values["__slot"]
            where = [int(s) for s in slot[self._idx(m)].tolist()]
            slots = [ring[k] for ring, k in zip(grp.roles[role(m, "window")], where)]
            inputs["window"] = slots
        prog = decl.rule.program({name: col[0].dtype for name, col in inputs.items()})
        got = run_foreach(prog, inputs, self.scalars[id(m)], self._idx(m), frozenset(mine))
        if self.main:
            for f in decl.fields:
                self.store(grp.roles[role(m, f)], got[f])
            if slots:
                self.store(slots, got["window"])
                got["out"] = self.resum(m, where, got["out"])
        out = got["out"]  # a temporary, unless it is an input that was not ours to write
        return out, id(out) not in self._lists and all(out is not v for n, v in inputs.items() if n not in mine)

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

    def accumulate(self, node: P.Accum, x: list[torch.Tensor], owned: bool) -> tuple[list[torch.Tensor], bool]:
        if self.leaf not in node.leaves:
            return x, owned
        acc = self.grp.roles[self.step._role(node, "acc")]
        prog = node.decl.rule.program({"x": x[0].dtype, "acc": acc[0].dtype})
        mine = frozenset({"acc"} if self.main and not self.guards else set()) | (
            frozenset({"x"}) if owned else frozenset())
        got = run_foreach(prog, {"x": x, "acc": acc}, self.scalars[id(node)], self._idx(node), mine)
        final = self.flags[(id(node), "final")]
        self.guards.append(final)
        y, _ = self.node(node.inner, got["mean"], True)
        self.guards.pop()
        if self.main:
            self.store(acc, [torch.where(final, torch.zeros_like(t), t) for t in got["acc"]])
        return _skip(final, y), True

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


def _skip(cond: torch.Tensor, y: list[torch.Tensor]) -> list[torch.Tensor]:
    """``y`` where ``cond``, else −0.0 (θ + (−0.0) is θ bit for bit)."""
    return [torch.where(cond, t, torch.full_like(t, -0.0)) for t in y]
