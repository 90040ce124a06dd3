"""Adam's normalised direction, and per-leaf β1 decayed with depth (``layerwise_beta``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Union

import torch

from grokxform import _common as C
from grokxform.base import GradientTransformation, Params, Scalar, elementwise, static_hyperparams
from grokxform.declarations import ScalarContext
from grokxform.elements import Inputs, Outputs, Val

LayerFn = Callable[[str, int], int]
"""``fn(path, index) -> layer``: ``path`` is the leaf's dotted name, ``index`` its position."""


@dataclass(frozen=True)
class LayerwiseBeta:
    """Per-leaf β1: ``β1_l = b1·(1−γ)^l``, ``l`` given by ``layer``. Made by :func:`layerwise_beta`."""

    b1: float
    gamma: float
    layer: Union[Literal["index", "depth"], LayerFn]

    def layers(self, paths: Sequence[str], present: Sequence[bool]) -> list[int]:
        """The layer number of each leaf."""
        if self.layer == "index":
            out, i = [], 0
            for ok in present:
                out.append(i)
                i += ok
            return out
        if self.layer == "depth":
            unnamed = next((p for p in paths if p.isdigit()), None)
            if unnamed is not None:
                raise ValueError(
                    "layerwise_beta(layer='depth') reads the block number from each leaf's module path"
                    f" ('blocks.3.attn.weight' -> 3), but the leaf {unnamed!r} is named by its position (unnamed"
                    " parameters, or a list of tensors). Name the leaves: Optimizer(model.named_parameters(), ...),"
                    " Optimizer(params, ..., module=model), or a dict tree {name: param}; or pass layer='index'"
                    " (the tensor's position, as GrokAdamW's code) or a function fn(path, index) -> layer"
                )
            return [_depth(p) for p in paths]
        return [int(self.layer(p, i)) for i, p in enumerate(paths)]

    def values(self, paths: Sequence[str], present: Sequence[bool]) -> list[float]:
        """β1 of each leaf (Python floats: they are fixed by the tree's structure)."""
        return [self.b1 * (1.0 - self.gamma) ** layer for layer in self.layers(paths, present)]


def _depth(path: str) -> int:
    """The block depth in a dotted path: its first integer component (``blocks.3.attn.w`` -> 3),
    0 for leaves outside numbered blocks (embeddings, final norms and heads)."""
    for part in path.split("."):
        if part.isdigit():
            return int(part)
    return 0


@static_hyperparams("gamma", "layer")
def layerwise_beta(
    b1: float = 0.9,
    gamma: float = 0.1,
    layer: Union[Literal["index", "depth"], LayerFn] = "depth",
) -> LayerwiseBeta:
    """β1 decayed with depth, ``β1_l = b1·(1−γ)^l``, as a per-leaf hyperparameter of
    :func:`scale_by_adam` (pass it as ``b1``).

    ``layer`` says what l is:

    - ``"index"``: the leaf's position among the leaves that have a gradient this step (GrokAdamW's
      code: its ``enumerate`` over the tensors of a param group);
    - ``"depth"``: the block number read from the path (first integer component, e.g.
      ``"blocks.3.mlp.weight"`` -> 3; 0 without one). A leaf named only by its position (``"7"``:
      the parameters were given unnamed, or the tree is a list) raises ``ValueError``: depth needs
      module paths (``model.named_parameters()``, ``Optimizer(..., module=model)``);
    - a function ``fn(path, index) -> int``.

    Examples:
        >>> b1 = gx.layerwise_beta(0.9, gamma=0.1, layer="index")
        >>> tx = gx.scale_by_adam(b1=b1)                 # β1 = 0.9, 0.81, 0.729… by leaf
        >>> state = tx.init({"a": torch.zeros(1), "b": torch.zeros(1)})
        >>> u, state = tx.update({"a": torch.ones(1), "b": torch.ones(1)}, state)
        >>> sorted(u)
        ['a', 'b']
    """
    C.check_scalar("layerwise_beta", "b1", b1, low=0.0, high=1.0, high_open=True)
    C.check_scalar("layerwise_beta", "gamma", gamma, low=0.0, high=1.0)
    if isinstance(b1, torch.Tensor) or isinstance(gamma, torch.Tensor):
        raise TypeError("layerwise_beta: b1 and gamma must be Python numbers (they fix per-leaf constants)")
    if layer not in ("index", "depth") and not callable(layer):
        raise ValueError(f"layerwise_beta: layer must be 'index', 'depth' or a function, got {layer!r}")
    return LayerwiseBeta(float(b1), float(gamma), layer)


def _pow(bases: Sequence[Scalar], t: torch.Tensor) -> torch.Tensor:
    """``bases[k] ** t[k]`` in float64 for the float64 vector ``t``: one op when every base is the
    same number or tensor, else the bases as a vector (numbers: a constant kept per device, so that
    no step copies from the host)."""
    if not bases:
        return torch.ones_like(t)
    first = bases[0]
    if all(b is first for b in bases) or (C.is_number(first) and all(C.is_number(b) and b == first for b in bases)):
        if isinstance(first, torch.Tensor):
            return first.to(device=t.device, dtype=torch.float64) ** t
        return torch.pow(float(first), t)
    if all(C.is_number(b) for b in bases):
        vec = C.constant_vector(tuple(float(b) for b in bases), t.device)
    else:
        vec = torch.stack([C.device_f64(b, t.device) for b in bases])
    return vec**t


class ScaleByAdamState(NamedTuple):
    """``count``: per-leaf steps (0-d int64); ``mu``: first moments; ``nu``: second moments."""

    count: Any
    mu: Any
    nu: Any


@static_hyperparams("bias_correction")
def scale_by_adam(
    b1: Union[Scalar, LayerwiseBeta] = 0.9,
    b2: Scalar = 0.999,
    eps: Scalar = 1e-8,
    *,
    eps_placement: Literal["corrected", "raw"] = "corrected",
    bias_correction_b1: Scalar | None = None,
    bias_correction: bool = True,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Adam's bias-corrected, normalised direction (no learning rate, no sign flip).

    ``m_t = β1·m_{t−1} + (1−β1)·g``, ``v_t = β2·v_{t−1} + (1−β2)·g²`` and, with per-leaf step t,

    - ``eps_placement="corrected"`` (torch.optim.Adam/AdamW):
      ``u = (m_t / (1−β1^t)) / (√v_t / √(1−β2^t) + ε)``, computed as
      ``(m_t·c1) / (√v_t·c2 + ε)`` with the inverses c1, c2 of the corrections taken in float64;
    - ``eps_placement="raw"`` (GrokAdamW 0.1.2): ``u = √(1−β2^t)/(1−β1^t) · m_t / (√v_t + ε)``.

    ``b1`` may be a :class:`LayerwiseBeta` (see :func:`layerwise_beta`): each leaf then has its own
    β1, and its bias correction uses that β1 unless ``bias_correction_b1`` names another (GrokAdamW
    0.1.2 corrects with the base β1). The bias corrections are computed in float64;
    ``bias_correction=False`` drops both (``u = m_t / (√v_t + ε)``, as ``pytorch_optimizer.Lamb``).
    The step count
    is per leaf, as in torch.optim: a leaf with a ``None`` gradient keeps m, v and t.
    State: :class:`ScaleByAdamState`; moments in ``state_dtype`` (default: the param's dtype,
    float32 for 16-bit params).

    Examples:
        >>> tx = gx.chain(gx.scale_by_adam(0.9, 0.999), gx.scale_by_learning_rate(1e-3))   # Adam
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> state = tx.init(params)
        >>> grads = {"w": torch.tensor([0.5, -0.5])}
        >>> updates, state = tx.update(grads, state, params)
        >>> updates["w"]
        tensor([-0.0010,  0.0010])
    """
    if not isinstance(b1, LayerwiseBeta):
        C.check_scalar("scale_by_adam", "b1", b1, low=0.0, high=1.0, high_open=True)
    C.check_scalar("scale_by_adam", "b2", b2, low=0.0, high=1.0, high_open=True)
    C.check_scalar("scale_by_adam", "eps", eps, low=0.0)
    if bias_correction_b1 is not None:
        C.check_scalar("scale_by_adam", "bias_correction_b1", bias_correction_b1, low=0.0, high=1.0, high_open=True)
    if eps_placement not in ("corrected", "raw"):
        raise ValueError(f"scale_by_adam: eps_placement must be 'corrected' or 'raw', got {eps_placement!r}")
    C.check_bool("scale_by_adam", "bias_correction", bias_correction)

    layerwise = b1 if isinstance(b1, LayerwiseBeta) else None

    def init_fn(params: Params) -> ScaleByAdamState:
        return ScaleByAdamState(
            count=C.counters_like_tree(params),
            mu=C.zeros_like_tree(params, state_dtype),
            nu=C.zeros_like_tree(params, state_dtype),
        )

    def scalars(ctx: ScalarContext) -> tuple[dict[str, Any], dict[str, Any]]:
        if layerwise is not None:
            every = layerwise.values(ctx.paths, ctx.present)
            betas1: Any = [every[i] for i in ctx.index]
            one_minus_b1: Any = [1.0 - b for b in betas1]
        else:
            betas1, one_minus_b1 = b1, 1.0 - b1  # type: ignore[operator]
        values: dict[str, Any] = {"b1": betas1, "one_minus_b1": one_minus_b1, "b2": b2, "one_minus_b2": 1.0 - b2,
                                  "eps": eps}
        if not bias_correction:  # the rule's multiplications by 1 are exact
            values.update({"inv_bc1": 1.0, "inv_bc2_sqrt": 1.0} if eps_placement == "corrected" else {"ratio": 1.0})
            return values, {}
        t = ctx.counts.to(torch.float64) + 1.0  # type: ignore[union-attr]
        bases = [bias_correction_b1] * ctx.n if bias_correction_b1 is not None else (
            betas1 if isinstance(betas1, list) else [betas1] * ctx.n)
        bc1 = 1.0 - _pow(bases, t)
        bc2 = 1.0 - _pow([b2], t)
        if eps_placement == "corrected":
            values.update(inv_bc1=torch.reciprocal(bc1), inv_bc2_sqrt=torch.rsqrt(bc2))
        else:
            values["ratio"] = torch.sqrt(bc2) / bc1
        return values, {}

    return elementwise(
        "scale_by_adam", _adam_corrected if eps_placement == "corrected" else _adam_raw, init=init_fn,
        scalars=scalars, state_type=ScaleByAdamState, fields=("mu", "nu"), count="count",
        nonnegative=("nu",),
    )


def _moments(v: Inputs, sc: Inputs) -> tuple[Val, Val, Val]:
    """g, m_t = β1·m + (1−β1)·g and v_t = β2·v + (1−β2)·g², in the moments' dtype (the rule of
    every member of the Adam family: ``mu`` and ``nu`` fields, scalars ``b1``, ``one_minus_b1``,
    ``b2``, ``one_minus_b2``)."""
    g = v.x.to(v.mu.dtype)
    m = v.mu * sc.b1 + g * sc.one_minus_b1
    nu = v.nu * sc.b2 + g * g * sc.one_minus_b2
    return g, m, nu


def _adam_corrected(v: Inputs, sc: Inputs) -> Outputs:
    """u = (m_t·(1−β1^t)⁻¹) / (√v_t·(√(1−β2^t))⁻¹ + ε), the inverses in float64 (one division per
    element)."""
    _, m, nu = _moments(v, sc)
    u = (m * sc.inv_bc1) / (nu.sqrt() * sc.inv_bc2_sqrt + sc.eps)
    return {"out": u.to(v.x.dtype), "mu": m, "nu": nu}


def _adam_raw(v: Inputs, sc: Inputs) -> Outputs:
    """u = √(1−β2^t)/(1−β1^t) · m_t / (√v_t + ε)."""
    _, m, nu = _moments(v, sc)
    u = sc.ratio * (m / (nu.sqrt() + sc.eps))
    return {"out": u.to(v.x.dtype), "mu": m, "nu": nu}
