"""The kernel step: a pipeline with an :class:`AdamFamilySpec` run as multi-tensor Triton kernels.

Per call, on the device and without a host sync (so the whole step can be captured in a CUDA
graph), in launch order:

1. with a global clip, :func:`~grokxform.kernels._triton.sumsq_kernel` writes Σg² and a count of
   non-finite values per block of each leaf;
2. :func:`~grokxform.kernels._triton.fetch_add_kernel` gathers every step counter of the chain
   (old values) and adds one to each;
3. the scalar prologue — the clip factor (the blocks of a leaf summed in a fixed order), the bias
   corrections ``1−β1_l^t`` and ``√(1−β2^t)`` in float64 per leaf, α_t of the grokking signal, a
   schedule's η_t, the MA slot and divisor — writes the dynamic columns of each group's
   ``[n_leaves, N_COLS]`` table and the state's logged scalars (clip norm and scale, α, signal);
   ordinary torch code, compiled by Inductor on CUDA;
4. :func:`~grokxform.kernels._triton.adam_family_kernel` updates EMA/MA state, m, v and θ in
   place, one launch per group of leaves with the same dtypes.

The state is the fused layout's (:func:`grokxform.fused.to_fused_layout`): the same tensors the
eager transforms use, with MA windows as ring buffers. :class:`grokxform.fused.FusedStep`
builds a :class:`KernelStep` for ``backend="triton"`` (or ``"auto"`` on CUDA).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from grokxform import _common as C
from grokxform import signals as _signals
from grokxform import tree as _tree
from grokxform.kernels.spec import AdamFamilySpec, EmaSpec, InjectedSpec, MaSpec, Spec, spec_of
from grokxform.transforms.adam import LayerwiseBeta, _pow
from grokxform.transforms.filters import MaRingWindow
from grokxform.transforms.masks import resolve_mask
from grokxform.transforms.schedules import ScaleByScheduleState
from grokxform.transforms.wrappers import InjectHyperparamsState

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 1024
"""Elements per program of the kernels (one item)."""
NUM_WARPS = 4
_EAGER_NUMERICS = {"eager_numerics.division_rounding": True, "eager_numerics.use_pytorch_libdevice": True}
"""Inductor settings (where this torch has them) that make the prologue's divisions and libdevice
calls round as the eager kernels do."""
COMPILE_PROLOGUE: bool | None = None
"""Compile the scalar prologue with Inductor (``None``: on CUDA; on the CPU it runs op by op)."""


class KernelUnsupported(ValueError):
    """The chain, state or tensors are outside what the kernel step handles (the message says
    what); :class:`grokxform.fused.FusedStep` then compiles the chain with Inductor."""


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device: torch.device) -> bool:
    """Whether the kernel step can run on ``device``: Triton importable, and a CUDA device (or
    the Triton interpreter, for CPU tensors)."""
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        return False
    return importlib.util.find_spec("triton") is not None


def _like(x: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A hyperparameter as the eager op in ``dtype`` uses it, as float32: a Python number is the
    op's float32 scalar, a tensor is first rounded to ``dtype`` (``scalar_for``)."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype).to(torch.float32)
    return torch.tensor(float(x), dtype=torch.float32, device=device)


@dataclass
class _Group:
    """The leaves of one dtype combination, with their address tables and work items."""

    pos: list[int]  # positions among the present leaves
    dtypes: tuple[torch.dtype, ...]  # P, G, E (EMA), S (moments), W (window)
    tables: dict[str, torch.Tensor]
    numel: torch.Tensor
    item_leaf: torch.Tensor
    item_start: torch.Tensor
    item_slot: torch.Tensor  # where the clip pass writes an item's partial sums
    chunks: int  # the most items of one leaf (the partial sums are [n_leaves, chunks])
    cols: torch.Tensor  # the per-leaf scalar table [n, N_COLS], float32
    index: torch.Tensor  # ``pos`` on the device
    sq: torch.Tensor  # the clip pass's partial sums of g², [n * chunks] (slots no item writes stay 0)
    bad: torch.Tensor  # ... and counts of non-finite elements
    grad_key: tuple[int, ...] = ()


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _addresses(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=device)


class KernelStep:
    """The in-place step of a pipeline with a kernel spec, for one pattern of ``None`` gradients.

    ``KernelStep(spec, p_leaves, p_spec, state, mask, grads, extra_names)`` raises
    :class:`KernelUnsupported` when the chain or the tensors are outside the kernels' reach;
    ``step(grads, extras)`` then updates params and state in place, with the eager numbers
    (rounded where the eager ops round; float32 maths may differ in the last bit).
    """

    def __init__(
        self,
        spec: Spec,
        p_leaves: list[Any],
        p_spec: _tree.TreeSpec,
        state: Any,
        mask: tuple[bool, ...],
        grads: list[torch.Tensor],
        extra_names: tuple[str, ...],
        extras: list[torch.Tensor],
    ) -> None:
        self._inject = spec if isinstance(spec, InjectedSpec) else None
        if self._inject is not None:
            if not isinstance(state, InjectHyperparamsState):
                raise KernelUnsupported("the state is not an inject_hyperparams state")
            _, inner = self._inject.inner(state.count, state.hyperparams)
            if inner is None:
                raise KernelUnsupported("the injected factory has no kernel spec")
            spec, chain_state = inner, state.inner_state
        else:
            chain_state = state
        if not isinstance(spec, AdamFamilySpec):
            raise KernelUnsupported(f"no kernel for {type(spec).__name__}")
        if not isinstance(chain_state, dict) or tuple(chain_state) != spec.names:
            raise KernelUnsupported(f"the state is not that of the chain {spec.names}")
        filt = spec.filter
        if isinstance(filt, EmaSpec) and filt.signal_fns:
            raise KernelUnsupported("grokking signal functions run Python each step")
        if isinstance(filt, MaSpec) and filt.accumulator_dtype != torch.float64:
            raise KernelUnsupported("the MA running sum must be float64")
        present = [i for i, m in enumerate(mask) if m]
        if not present:
            raise KernelUnsupported("no leaf has a gradient")
        self._state, self._spec0 = state, spec
        self._present = present
        self._extra_names = extra_names
        names = _tree.path_names(_tree.unflatten(p_leaves, p_spec))
        self._names = [names[i] for i in present]
        self._all_names, self._mask = names, mask
        params = [p_leaves[i] for i in present]
        adam = chain_state["adam"]
        def leaf(tree: Any) -> list[Any]:  # the leaves of ``tree`` at the present positions
            leaves = _tree.flatten(tree)[0]
            return [leaves[i] for i in present]

        self._m, self._v, self._adam_counts = leaf(adam.mu), leaf(adam.nu), leaf(adam.count)
        self._mu = self._ema_counts = self._ring = self._total = self._ma_counts = None
        if isinstance(filt, EmaSpec):
            ema = chain_state["grokfast"]
            self._mu, self._ema_counts = leaf(ema.mu), leaf(ema.count)
        elif isinstance(filt, MaSpec):
            ma = chain_state["grokfast"]
            if not isinstance(ma.window, MaRingWindow):
                raise KernelUnsupported("the MA window is not in the ring layout")
            self._ring, self._total, self._ma_counts = leaf(ma.window.buffers), leaf(ma.total), leaf(ma.count)
        self._device = params[0].device
        self._block, self._warps = BLOCK, NUM_WARPS
        every = [params, grads, self._m, self._v, self._mu or [], self._ring or [], self._total or []]
        for group in every:
            for t in group:
                if not isinstance(t, torch.Tensor) or t.device != self._device:
                    raise KernelUnsupported("every tensor must be on one device")
                if not t.is_contiguous():
                    raise KernelUnsupported("a tensor is not contiguous")
        for i, (p, g, m) in enumerate(zip(params, grads, self._m)):
            if p.dtype not in _FLOATS or g.dtype not in _FLOATS or m.dtype not in _FLOATS:
                raise KernelUnsupported(f"dtypes {p.dtype}/{g.dtype}/{m.dtype} at {self._names[i]!r}")
            if (self._v[i].dtype != m.dtype) or (self._mu is not None and self._mu[i].dtype not in _FLOATS):
                raise KernelUnsupported(f"state dtypes at {self._names[i]!r}")
            if self._ring is not None and (self._ring[i].dtype not in _FLOATS or self._total[i].dtype != torch.float64):
                raise KernelUnsupported(f"window dtypes at {self._names[i]!r}")
        from grokxform.kernels import _triton as K  # Triton is imported only here

        self._K = K
        selected = resolve_mask(spec.weight_decay_mask, _tree.unflatten(p_leaves, p_spec), "kernel")
        self._wd_on = [selected[i] for i in present]
        self._betas = betas = self._betas1()
        if any(isinstance(b, torch.Tensor) for b in betas):
            self._b1_vec: Any = None  # recomputed each step from the spec's tensors
        elif all(b == betas[0] for b in betas):
            self._b1_vec = float(betas[0])
        else:
            self._b1_vec = torch.tensor([float(b) for b in betas], dtype=torch.float64, device=self._device)
        self._groups = self._make_groups(params, grads)
        self._order = torch.tensor([k for grp in self._groups for k in grp.pos], device=self._device).argsort()
        # Step counters: gathered (old values) and incremented by one kernel, fetch_add_kernel.
        counters: list[torch.Tensor] = []
        self._slices: dict[str, tuple[int, int]] = {}

        def add(name: str, ts: list[torch.Tensor]) -> None:
            self._slices[name] = (len(counters), len(counters) + len(ts))
            counters.extend(ts)

        add("adam", self._adam_counts)
        if self._ema_counts is not None:
            add("ema", self._ema_counts)
            add("ema_step", [chain_state["grokfast"].step])
        if self._ma_counts is not None:
            add("ma", self._ma_counts)
        if isinstance(chain_state["lr"], ScaleByScheduleState):
            add("lr", [chain_state["lr"].count])
        if self._inject is not None:
            add("inject", [state.count])
        for c in counters:
            if c.dtype != torch.int64 or c.numel() != 1 or c.device != self._device:
                raise KernelUnsupported("a step counter is not a 0-d int64 tensor on the params' device")
        self._cnt_table = _addresses(counters, self._device)
        self._cnt = torch.zeros(len(counters), dtype=torch.int64, device=self._device)
        # State scalars the step writes (what eager returns as new leaves).
        self._logged: dict[str, torch.Tensor] = {}
        if spec.clip is not None:
            self._logged.update(clip_norm=chain_state["clip"].norm, clip_scale=chain_state["clip"].scale)
        if isinstance(filt, EmaSpec):
            self._logged.update(ema_alpha=chain_state["grokfast"].alpha, ema_signal=chain_state["grokfast"].signal)
        if self._inject is not None:
            self._logged.update({"hp:" + n: state.hyperparams[n] for n in self._inject.schedules})
        self._make_prologue(list(extras))

    # -- build --------------------------------------------------------------------------------

    def _make_groups(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[_Group]:
        K, dev = self._K, self._device
        by: dict[tuple[torch.dtype, ...], list[int]] = {}
        for k, (p, g) in enumerate(zip(params, grads)):
            e = self._mu[k].dtype if self._mu is not None else torch.float32
            w = self._ring[k].dtype if self._ring is not None else torch.float32
            by.setdefault((p.dtype, g.dtype, e, self._m[k].dtype, w), []).append(k)
        groups = []
        for dtypes, pos in by.items():
            numels = [params[k].numel() for k in pos]
            block = self._block
            chunks = max(1, max((n + block - 1) // block for n in numels))
            leaf_ids, starts, slots = [], [], []
            for j, n in enumerate(numels):
                for c in range((n + block - 1) // block):
                    leaf_ids.append(j)
                    starts.append(c * block)
                    slots.append(j * chunks + c)
            tables = {
                "P": _addresses([params[k] for k in pos], dev),
                "M": _addresses([self._m[k] for k in pos], dev),
                "V": _addresses([self._v[k] for k in pos], dev),
            }
            if self._mu is not None:
                tables["MU"] = _addresses([self._mu[k] for k in pos], dev)
            if self._ring is not None:
                tables["BUF"] = _addresses([self._ring[k] for k in pos], dev)
                tables["TOT"] = _addresses([self._total[k] for k in pos], dev)
            i64 = {"dtype": torch.int64, "device": dev}
            groups.append(_Group(
                pos=pos, dtypes=dtypes, tables=tables, numel=torch.tensor(numels, **i64),
                item_leaf=torch.tensor(leaf_ids, **i64), item_start=torch.tensor(starts, **i64),
                item_slot=torch.tensor(slots, **i64), chunks=chunks,
                cols=torch.zeros((len(pos), K.N_COLS), dtype=torch.float32, device=dev),
                index=torch.tensor(pos, **i64),
                sq=torch.zeros(len(pos) * chunks, dtype=torch.float32, device=dev),
                bad=torch.zeros(len(pos) * chunks, dtype=torch.int32, device=dev),
            ))
        self._constant_columns(groups)
        self.prepare(grads, groups)
        return groups

    def _constant_columns(self, groups: list[_Group]) -> None:
        """Columns that no step changes: Python-number hyperparameters, the mask."""
        K, spec, dev = self._K, self._spec0, self._device
        for grp in groups:
            _, G, _, S, _ = grp.dtypes
            cols = grp.cols
            cols[:, K.C["clip_scale"]] = 1.0
            cols[:, K.C["ma_divisor"]] = 1.0
            cols[:, K.C["ma_on"]] = 1.0
            cols[:, K.C["wd_on"]] = torch.tensor([float(self._wd_on[k]) for k in grp.pos], device=dev)
            for name, value, dt in (("lamb", spec.lamb, G), ("wd", spec.weight_decay, G), ("b2", spec.b2, S),
                                    ("eps", spec.eps, S)):
                if not isinstance(value, torch.Tensor):
                    cols[:, K.C[name]] = _like(value, dt, dev)
            if not isinstance(spec.b2, torch.Tensor):
                cols[:, K.C["one_minus_b2"]] = _like(1.0 - spec.b2, S, dev)
            betas = self._betas
            if all(not isinstance(b, torch.Tensor) for b in betas):
                cols[:, K.C["b1"]] = torch.tensor([float(betas[k]) for k in grp.pos], dtype=torch.float32, device=dev)
                cols[:, K.C["one_minus_b1"]] = torch.tensor(
                    [1.0 - float(betas[k]) for k in grp.pos], dtype=torch.float32, device=dev
                )
            if not callable(spec.lr) and not isinstance(spec.lr, torch.Tensor):
                cols[:, K.C["neg_lr"]] = _like(-1.0 * spec.lr, G, dev)

    def _betas1(self, spec: AdamFamilySpec | None = None) -> list[Any]:
        """β1 of each present leaf (a :class:`LayerwiseBeta` numbers leaves as the eager step does)."""
        spec = spec or self._spec0
        if isinstance(spec.b1, LayerwiseBeta):
            values = spec.b1.values(self._all_names, list(self._mask))
            return [values[i] for i in self._present]
        return [spec.b1] * len(self._present)

    def _bc1(self, spec: AdamFamilySpec, t: torch.Tensor) -> torch.Tensor:
        """``1 − β1_l^t`` in float64, as ``scale_by_adam`` computes it."""
        if self._b1_vec is None:
            return 1.0 - _pow(self._betas1(spec), t)
        if isinstance(self._b1_vec, float):
            return 1.0 - torch.pow(self._b1_vec, t)
        return 1.0 - self._b1_vec**t

    def prepare(self, grads: list[torch.Tensor], groups: list[_Group] | None = None) -> None:
        """Point the gradient tables at ``grads`` (a host-to-device copy when they are new
        tensors: call it before a CUDA graph capture, not during one)."""
        for grp in groups if groups is not None else self._groups:
            key = tuple(grads[k].data_ptr() for k in grp.pos)
            if key != grp.grad_key:
                for k in grp.pos:
                    g = grads[k]
                    if not g.is_contiguous() or g.dtype != grp.dtypes[1] or g.device != self._device:
                        raise KernelUnsupported(f"the gradient at {self._names[k]!r} changed layout or dtype")
                grp.tables["G"] = _addresses([grads[k] for k in grp.pos], self._device)
                grp.grad_key = key

    # -- the step -----------------------------------------------------------------------------

    def __call__(self, grads: list[torch.Tensor], extras: dict[str, torch.Tensor]) -> None:
        K = self._K
        self.prepare(grads)
        spec = self._spec0
        if spec.clip is not None:
            for grp in self._groups:
                K.sumsq_kernel[(grp.item_leaf.numel(),)](
                    grp.tables["G"], grp.numel, grp.item_leaf, grp.item_start, grp.item_slot, grp.sq, grp.bad,
                    G_DT=K.tl_dtype(grp.dtypes[1]), BLOCK=self._block, num_warps=self._warps,
                )
        n_cnt = self._cnt.numel()
        K.fetch_add_kernel[(_cdiv(n_cnt, 256),)](self._cnt_table, self._cnt, n_cnt, BLOCK=256)
        self._prologue(*self._pro_inputs, *(extras[n] for n in self._extra_names))
        kind = 1 if isinstance(spec.filter, EmaSpec) else 2 if isinstance(spec.filter, MaSpec) else 0
        exact = {} if interpreting() else {"enable_fp_fusion": False}  # eager rounds a·b, then adds c
        for grp in self._groups:
            P, G, E, S, W = grp.dtypes
            tb = grp.tables
            K.adam_family_kernel[(grp.item_leaf.numel(),)](
                tb["P"], tb["G"], tb.get("MU", tb["P"]), tb["M"], tb["V"], tb.get("BUF", tb["P"]),
                tb.get("TOT", tb["P"]), grp.numel, grp.item_leaf, grp.item_start, grp.cols,
                P_DT=K.tl_dtype(P), G_DT=K.tl_dtype(G), E_DT=K.tl_dtype(E), S_DT=K.tl_dtype(S), W_DT=K.tl_dtype(W),
                HAS_CLIP=spec.clip is not None, FILTER=kind, COUPLED=spec.coupled, N_COLS=K.N_COLS,
                BLOCK=self._block, num_warps=self._warps, **exact,
            )

    # -- the scalar prologue --------------------------------------------------------------------

    def _make_prologue(self, extras: list[torch.Tensor]) -> None:
        """The scalar work as one function of explicit tensors; on CUDA traced with ``make_fx``
        and compiled by Inductor into a few kernels (no guards, no recompiles), else run as is."""
        groups = self._groups
        hp_names = sorted(self._state.hyperparams) if self._inject is not None else []
        logged_names = list(self._logged)
        self._pro_inputs = [
            self._cnt, *(g.sq for g in groups), *(g.bad for g in groups),
            *(self._state.hyperparams[n] for n in hp_names), *(self._logged[n] for n in logged_names),
            *(g.cols for g in groups),
        ]
        ng, nh, nl = len(groups), len(hp_names), len(logged_names)

        def prologue(*flat: torch.Tensor) -> tuple[()]:
            cnt, rest = flat[0], list(flat[1:])
            sqs, bads, rest = rest[:ng], rest[ng : 2 * ng], rest[2 * ng :]
            hp = dict(zip(hp_names, rest[:nh]))
            logged = dict(zip(logged_names, rest[nh : nh + nl]))
            cols, xs = rest[nh + nl : nh + nl + ng], rest[nh + nl + ng :]
            self._scalars(cnt, sqs, bads, hp, logged, cols, dict(zip(self._extra_names, xs)))
            return ()

        if not (COMPILE_PROLOGUE if COMPILE_PROLOGUE is not None else self._device.type == "cuda"):
            self._prologue = prologue
            return
        from grokxform.fused import _backend_compile, _inductor_options

        args = [*self._pro_inputs, *extras]
        with torch.no_grad():
            gm = make_fx(prologue, tracing_mode="fake", _allow_non_fake_inputs=True)(*args)  # constants: β1 per leaf
        options = _inductor_options(dict(_EAGER_NUMERICS), ring=False)
        self._prologue = _backend_compile(gm, args, "inductor", options)

    def _scalars(
        self, cnt: torch.Tensor, sqs: list[torch.Tensor], bads: list[torch.Tensor], stored: dict[str, torch.Tensor],
        logged: dict[str, torch.Tensor], cols: list[torch.Tensor], extras: dict[str, torch.Tensor],
    ) -> None:
        """Fill the dynamic columns of each group's table and the state's logged scalars.
        ``cnt`` holds the step counters before this step (:meth:`_counter_slices`)."""
        K, dev, sl = self._K, self._device, self._slices
        if self._inject is not None:
            hp, spec = self._inject.inner(cnt[sl["inject"][0]], stored)
            for name in self._inject.schedules:
                logged["hp:" + name].copy_(hp[name])
        else:
            spec = self._spec0
        dyn: dict[str, torch.Tensor] = {}  # name -> [n] or 0-d tensor, before rounding
        if spec.clip is not None:
            sq = [s.view(len(g.pos), g.chunks).sum(1) for s, g in zip(sqs, self._groups)]
            bad = [b.view(len(g.pos), g.chunks).sum(1) for b, g in zip(bads, self._groups)]
            sq_all, bad_all = (sq[0], bad[0]) if len(sq) == 1 else (torch.cat(sq)[self._order], torch.cat(bad)[self._order])
            norms = sq_all.sqrt()
            norm = torch.linalg.vector_norm(norms)
            norm_finite = torch.linalg.vector_norm(torch.where(bad_all == 0, norms, torch.zeros_like(norms)))
            scale = torch.clamp(C.scalar_for(spec.clip, norm_finite) / (norm_finite + 1e-6), max=1.0)
            logged["clip_norm"].copy_(norm)
            logged["clip_scale"].copy_(scale)
            dyn["clip_scale"] = scale
        filt = spec.filter
        if isinstance(filt, EmaSpec):
            step = cnt[sl["ema_step"][0]]
            gs = _signals.compute_signal(filt.signal_fns, step, dev, extras)
            a = _signals.adapted_alpha(filt.alpha, filt.signal_decay_rate, gs)
            logged["ema_alpha"].copy_(a)
            logged["ema_signal"].copy_(gs)
            dyn["alpha"], dyn["one_minus_alpha"] = a, 1.0 - a
            if filt.init == "first":
                dyn["ema_first"] = (cnt[slice(*sl["ema"])] == 0).to(torch.float64)
        elif isinstance(filt, MaSpec):
            c, w = cnt[slice(*sl["ma"])], filt.window_size
            dyn["ma_slot"] = torch.remainder(c, w).to(torch.float64)
            if filt.filter_type == "mean":
                dyn["ma_divisor"] = torch.clamp(c + 1, max=w).to(torch.float64)
            if filt.warmup:
                dyn["ma_on"] = (c + 1 >= w).to(torch.float64)
        t = (cnt[slice(*sl["adam"])] + 1).to(torch.float64)
        dyn["bc1"] = self._bc1(spec, t)
        dyn["bc2_sqrt"] = torch.sqrt(1.0 - _pow([spec.b2], t))
        if self._b1_vec is None:
            b1v = torch.stack([C.f64(b, dev) for b in self._betas1(spec)])
            dyn["b1"], dyn["one_minus_b1"] = b1v, 1.0 - b1v
        for name, value in (("lamb", spec.lamb), ("wd", spec.weight_decay), ("b2", spec.b2), ("eps", spec.eps)):
            if isinstance(value, torch.Tensor):
                dyn[name] = value
        if isinstance(spec.b2, torch.Tensor):
            dyn["one_minus_b2"] = 1.0 - spec.b2
        if "lr" in sl:
            dyn["neg_lr"] = -1.0 * spec.lr(cnt[sl["lr"][0]])
        elif isinstance(spec.lr, torch.Tensor):
            dyn["neg_lr"] = -1.0 * spec.lr
        names = tuple(dyn)
        where = torch.tensor([K.C[x] for x in names], device=dev)
        n = len(self._present)
        for grp, table in zip(self._groups, cols):
            P, G, E, S, W = grp.dtypes
            round_to = {"clip_scale": G, "alpha": E, "one_minus_alpha": E, "lamb": G, "wd": G, "neg_lr": G,
                        "b1": S, "one_minus_b1": S, "b2": S, "one_minus_b2": S, "eps": S, "bc1": S, "bc2_sqrt": S}
            vals = []
            for name in names:
                v = dyn[name]
                if v.dim() == 1 and len(grp.pos) != n:
                    v = v[grp.index]
                if v.dtype == torch.float64:  # as c10 converts a double: to float first
                    v = v.to(torch.float32)
                vals.append(v.to(round_to.get(name, torch.float32)).to(torch.float32).expand(len(grp.pos)))
            table.index_copy_(1, where, torch.stack(vals, 1))


def build(
    tx: Any, p_leaves: list[Any], p_spec: _tree.TreeSpec, state: Any, mask: tuple[bool, ...],
    grads: list[torch.Tensor], extra_names: tuple[str, ...], extras: list[torch.Tensor],
) -> KernelStep:
    """The :class:`KernelStep` of ``tx`` (raises :class:`KernelUnsupported` if there is none)."""
    spec = spec_of(tx)
    if spec is None:
        raise KernelUnsupported("the chain has no kernel spec (only the adamw / grokfast_ema / grokfast_ma / grokadamw pipelines do)")
    return KernelStep(spec, p_leaves, p_spec, state, mask, grads, extra_names, extras)
