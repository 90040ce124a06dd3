"""Gradient clipping: by norm (one norm over all leaves, or one per leaf), or element by element."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from grokxform import _common as C
from grokxform import tree as _tree
from grokxform.base import EmptyState, GradientTransformation, Params, Scalar, Updates, elementwise
from grokxform.declarations import GLOBAL_NORM, ScalarContext
from grokxform.elements import Inputs, Outputs, maximum, minimum

_CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s guard


def _norm_dtype(leaves: list[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(g.dtype == torch.float64 for g in leaves) else torch.float32


class ClipByGlobalNormState(NamedTuple):
    """``norm``: the global gradient norm of the last step; ``scale``: the factor applied."""

    norm: torch.Tensor
    scale: torch.Tensor

    def metrics(self, hyperparams: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What :func:`grokxform.metrics` logs of this state: ``norm`` and ``scale``.

        Args:
            hyperparams: the injected hyperparameters of the states that enclose this one (unused).
        """
        del hyperparams
        return {"norm": self.norm, "scale": self.scale}


def clip_by_global_norm(max_norm: Scalar = 1.0) -> GradientTransformation:
    """``u = g·min(1, c / (‖g‖ + 1e−6))`` with ``‖g‖ = √(Σ_leaves ‖g_leaf‖²)``: one norm over all
    leaves, as ``torch.nn.utils.clip_grad_norm_``. Each leaf's norm is taken in float32 (float64
    for float64 leaves), the global norm in the state's dtype (float64 if any param is float64).
    State: :class:`ClipByGlobalNormState`, the norm and the scale for logging.

    Non-finite gradients: the scale is computed from the leaves whose values are all finite,
    ``‖g‖_fin = √(Σ_{finite leaves} ‖g_leaf‖²)``, so a NaN or an infinity in one leaf leaves the
    clipping of every other leaf exactly as if that leaf's gradient were zero (``clip_grad_norm_``
    would make the scale NaN and spread it to all leaves). The non-finite leaf is multiplied by
    the same scale, so it stays non-finite and only its own path is affected downstream. The
    logged ``norm`` is the plain global norm over all leaves (NaN or inf on such a step, as
    ``clip_grad_norm_`` reports it); ``scale`` is the factor applied. Wrap the pipeline in
    :func:`grokxform.apply_if_finite` to skip such steps altogether.

    A tree that is part of a larger gradient (the param groups of one
    :class:`~grokxform.Optimizer`, which passes it for you): ``update(..., global_grad_norm=n)``
    gives the norm of the whole, a number or tensor, or the pair ``(‖g‖, ‖g‖_fin)`` as a
    2-element tensor; the scale then uses it instead of the tree's own norm (every
    ``clip_by_global_norm`` of the chain does: give it to chains whose clip reads the gradients).
    :func:`grokxform.declarations.whole_gradient_reductions` computes it.

    Examples:
        >>> tx = gx.clip_by_global_norm(1.0)
        >>> state = tx.init({"a": torch.zeros(1), "b": torch.zeros(1)})
        >>> u, state = tx.update({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}, state)
        >>> u["a"], u["b"]                # ‖g‖ = 5, scaled to norm 1
        (tensor([0.6000]), tensor([0.8000]))
    """
    C.check_scalar("clip_by_global_norm", "max_norm", max_norm, low=0.0, low_open=True)

    def init_fn(params: Params) -> ClipByGlobalNormState:
        leaves = [p for p in _tree.flatten(params)[0] if isinstance(p, torch.Tensor)]
        dt = _norm_dtype(leaves)
        dev = _tree.first_device(params)
        return ClipByGlobalNormState(torch.zeros((), dtype=dt, device=dev), torch.ones((), dtype=dt, device=dev))

    def check(updates: Updates, state: ClipByGlobalNormState, params: Params | None) -> None:
        dev = state.norm.device
        for i, g in enumerate(_tree.flatten(updates)[0]):  # leaves on several GPUs are fine, another kind is not
            if g is not None and g.device.type != dev.type:
                raise ValueError(
                    f"clip_by_global_norm: the gradient at path {_tree.path_names(updates)[i]!r} is on {g.device}"
                    f" but the state is on {dev}"
                )

    def scalars(ctx: ScalarContext) -> tuple[dict[str, Any], dict[str, Any]]:
        dt, dev = ctx.state.norm.dtype, ctx.state.norm.device
        whole = ctx.extra.get(GLOBAL_NORM)
        if whole is not None:  # the tree is a part of the gradient: the norm of the whole is given
            both = torch.as_tensor(whole).to(device=dev, dtype=dt).reshape(-1)
            norm, norm_finite = both[0], both[-1]
        else:
            norms = ctx.reduced["norm"].to(device=dev, dtype=dt)
            finite = ctx.reduced["finite"].to(dev)
            norm = torch.linalg.vector_norm(norms)
            norm_finite = torch.linalg.vector_norm(torch.where(finite, norms, 0.0))
        scale = torch.clamp(C.scalar_for(max_norm, norm_finite) / (norm_finite + _CLIP_EPS), max=1.0)
        return {"scale": scale}, {"norm": norm, "scale": scale}

    return elementwise(
        "clip_by_global_norm", _scale, init=init_fn, scalars=scalars, state_type=ClipByGlobalNormState,
        reduce=("norm", "finite"), check=check, extras=(GLOBAL_NORM,),
    )


def _scale(v: Inputs, sc: Inputs) -> Outputs:
    """u = g·scale."""
    return {"out": v.x * sc.scale}


def clip_by_tensor_norm(max_norm: Scalar = 1.0) -> GradientTransformation:
    """``u_i = g_i·min(1, c / (‖g_i‖ + 1e−6))`` for each leaf on its own (GrokAdamW 0.1.2's clip,
    ``clip_grad_norm_`` called once per tensor). Stateless.

    Examples:
        >>> tx = gx.clip_by_tensor_norm(1.0)
        >>> state = tx.init({"a": torch.zeros(2), "b": torch.zeros(1)})
        >>> u, state = tx.update({"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.5])}, state)
        >>> u["a"], u["b"]                # each tensor clipped on its own
        (tensor([0.6000, 0.8000]), tensor([0.5000]))
    """
    C.check_scalar("clip_by_tensor_norm", "max_norm", max_norm, low=0.0, low_open=True)

    def init_fn(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def scalars(ctx: ScalarContext) -> tuple[dict[str, Any], dict[str, Any]]:
        norms = ctx.reduced["norm"]
        return {"scale": torch.clamp(C.scalar_for(max_norm, norms) / (norms + _CLIP_EPS), max=1.0)}, {}

    return elementwise(
        "clip_by_tensor_norm", _scale, init=init_fn, scalars=scalars, reduce=("norm",), reduce_scope="leaf"
    )


def clip(max_delta: Scalar = 1.0) -> GradientTransformation:
    """Each element clipped to ``[−δ, δ]``: ``u = min(max(g, −δ), δ)``, as optax's ``clip`` (and
    ``torch.clamp``). A NaN stays NaN; ±inf becomes ±δ. Stateless.

    Examples:
        >>> tx = gx.clip(0.5)
        >>> u, _ = tx.update({"w": torch.tensor([-2.0, 0.25, 3.0])}, tx.init({"w": torch.zeros(3)}))
        >>> u["w"]
        tensor([-0.5000,  0.2500,  0.5000])
    """
    C.check_scalar("clip", "max_delta", max_delta, low=0.0)

    def scalars(ctx: ScalarContext) -> tuple[dict[str, Any], dict[str, Any]]:
        return {"low": -max_delta, "high": max_delta}, {}

    return elementwise("clip", _clip, scalars=scalars)


def _clip(v: Inputs, sc: Inputs) -> Outputs:
    """u = min(max(g, −δ), δ)."""
    return {"out": minimum(maximum(v.x, sc.low), sc.high)}
