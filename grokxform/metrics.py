"""What a user logs (TensorBoard, W&B), read from any state tree with one call.

``metrics(state)`` walks the state of a transformation (``chain`` tuples, ``named_chain`` dicts,
``inject_hyperparams`` and other wrappers, at any depth) and returns a flat dict keyed by the
path of each value in the state, ``/``-separated: ``named_chain`` names, ``chain`` indices and
state field names, the ``inner_state`` field of wrappers left out. For ``grokadamw`` run through
``grokxform.Optimizer`` (or ``inject_hyperparams(grokadamw)``)::

    lr, weight_decay, lamb, ... the injected hyperparameters (values of the last step)
    count                       the wrapper's step count
    clip/norm, clip/scale       ‖g‖ over all leaves, and min(1, c/(‖g‖+1e−6))
    grokfast/alpha              α_t = clamp(α·exp(−κ·GS_t), 0, 1)
    grokfast/signal             the grokking signal GS_t
    grokfast/step               the filter's step count
    grokfast/mu_norm            ‖μ_t‖ over all leaves
    grokfast/slow_norm          ‖λ·μ_t‖ = |λ|·‖μ_t‖, the amplified slow component that was added

``slow_norm`` needs λ, which the filter's state does not hold: it is given when an enclosing
``inject_hyperparams`` state has a ``lamb`` hyperparameter (``grokfast_ema``, ``grokadamw``).
A state class that defines ``metrics(hyperparams)`` lists its own values (those above for
:class:`~grokxform.EmaFilterState` and :class:`~grokxform.ClipByGlobalNormState`; ``hyperparams``
are the injected hyperparameters of the states that enclose it). Of any other state NamedTuple,
every 0-d tensor field is listed under its path, so the counters of other wrappers appear too.
Per-parameter trees (moments, windows) are not listed.

Values are detached copies (0-d tensors; no device synchronisation), or Python floats with
``floats=True``.
"""

from __future__ import annotations

from typing import Any

import torch

from grokxform import _state_io as S

Metrics = dict[str, Any]


def _key(path: str, name: str) -> str:
    return f"{path}/{name}" if path else name


def _walk(node: Any, path: str, hyperparams: dict[str, torch.Tensor], out: Metrics) -> None:
    if S.is_namedtuple(node) and callable(getattr(type(node), "metrics", None)):
        for name, value in node.metrics(hyperparams).items():
            out[_key(path, name)] = value
    elif S.is_namedtuple(node):
        fields = dict(zip(node._fields, node))
        hyper = fields.get("hyperparams")
        if isinstance(hyper, dict) and "inner_state" in fields:
            injected = {name: value for name, value in hyper.items() if isinstance(value, torch.Tensor)}
            for name, value in injected.items():
                out[_key(path, name)] = value
            hyperparams = {**hyperparams, **injected}
        for name, value in fields.items():
            if name == "hyperparams" and isinstance(hyper, dict):
                continue
            if isinstance(value, torch.Tensor):
                if value.dim() == 0:
                    out[_key(path, name)] = value
            else:
                _walk(value, path if name == "inner_state" else _key(path, name), hyperparams, out)
    elif isinstance(node, (tuple, list)):
        for i, value in enumerate(node):
            _walk(value, _key(path, str(i)), hyperparams, out)
    elif isinstance(node, dict):
        for name, value in node.items():
            if not isinstance(value, torch.Tensor) and value is not None:
                _walk(value, _key(path, str(name)), hyperparams, out)


def metrics(state: Any, *, prefix: str = "", floats: bool = False) -> Metrics:
    """The loggable scalars of ``state`` (see the module docs), keyed ``prefix + path``.

    Examples:
        >>> tx = gx.grokadamw(lr=1e-3)
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> state = tx.init(params)
        >>> grads = {"w": torch.tensor([0.5, -0.5])}
        >>> _, state = tx.update(grads, state, params, train_loss=0.1, val_loss=2.0)
        >>> m = gx.metrics(state, floats=True)   # e.g. writer.add_scalars("optim", m, step)
        >>> round(m["grokfast/alpha"], 4), m["grokfast/step"]    # α_t = 0.98·exp(−0.1·0.95)
        (0.8912, 1)
    """
    if not isinstance(prefix, str):
        raise TypeError(f"metrics: prefix must be a str, got {type(prefix).__name__}")
    raw: Metrics = {}
    _walk(state, "", {}, raw)
    out: Metrics = {}
    for key, value in raw.items():
        value = value.detach().clone()
        out[prefix + key] = value.item() if floats and value.numel() == 1 else value
    return out
