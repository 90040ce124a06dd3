"""State trees to and from plain containers, for checkpoints that ``torch.load(weights_only=True)``
accepts, and per-parameter views of a state tree.

The optimizer's checkpoint format (:mod:`grokxform._checkpoint`) has torch.optim's layout (what
``torch.distributed.checkpoint`` reads): :func:`param_entries` gives each parameter a flat dict
of its state, ``{path: leaf}``, the per-parameter tensors under their path in the state (the
parameter's key left out) and every group-wide leaf (counts, hyperparameters, signals) repeated
under ``"group." + path``, as torch repeats ``step`` for each parameter. :func:`from_param_entries` reads such dicts back against a
template. Tensors are the state's own, not copies (torch.optim's convention), 0-d ones too.
The older encoded layout (:func:`encode` / :func:`decode`) is still read.

A state tree holds NamedTuples, tuples, lists, dicts, tensors, ``None`` and Python scalars.
``weights_only`` refuses NamedTuples (they need their class), so :func:`encode` writes each as
``{TYPE_TAG: class name, "fields": {...}}``. :func:`decode` never imports a class by name: it reads
the encoded tree against a *template*, a freshly initialised state of the same transform, checks
that every container, key, shape and dtype agrees, and copies the saved values into the template.
A checkpoint of another model or another transform therefore fails with the path of the first
difference, before anything is changed.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from grokxform import distributed as _dist

TYPE_TAG = "__grokxform_type__"
"""The key that marks an encoded NamedTuple."""

_SCALARS = (bool, int, float, str, type(None))


def is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def encode(node: Any, path: str = "") -> Any:
    """``node`` as plain dicts, lists, tuples, tensors and scalars: the earlier checkpoint layout
    (one encoded tree per param group), and a plain form of a state to compare.

    Tensors are returned as they are (references, as :func:`param_entries` gives them), except
    0-d tensors, which are cloned: hyperparameter tensors are refilled in place before every step.
    """
    if isinstance(node, torch.Tensor):
        t = node.detach()
        return t.clone() if t.dim() == 0 else t
    if isinstance(node, _SCALARS):
        return node
    if is_namedtuple(node):
        fields = {f: encode(v, _join(path, f)) for f, v in zip(node._fields, node)}
        return {TYPE_TAG: type(node).__name__, "fields": fields}
    if isinstance(node, tuple):
        return tuple(encode(v, _join(path, i)) for i, v in enumerate(node))
    if isinstance(node, list):
        return [encode(v, _join(path, i)) for i, v in enumerate(node)]
    if isinstance(node, dict):
        bad = [k for k in node if not isinstance(k, (str, int))]
        if bad:
            raise TypeError(
                f"state_dict: the state dict at {path or '<root>'!r} has a key {bad[0]!r} that is not a str or int"
            )
        return {k: encode(v, _join(path, k)) for k, v in node.items()}
    raise TypeError(
        f"state_dict: the state at {path or '<root>'!r} holds a {type(node).__name__}, which a"
        " weights_only checkpoint cannot store"
    )


def _kind(x: Any) -> str:
    if isinstance(x, dict) and TYPE_TAG in x:
        return f"NamedTuple {x[TYPE_TAG]}"
    if is_namedtuple(x):
        return f"NamedTuple {type(x).__name__}"
    if isinstance(x, torch.Tensor):
        return "tensor"
    return type(x).__name__


class StateMismatchError(ValueError):
    """A saved state does not fit the optimizer it is loaded into."""


def decode(saved: Any, template: Any, where: str, path: str = "") -> Any:
    """Rebuild ``saved`` (made by :func:`encode`) in the shape of ``template``.

    Tensors are copied into new tensors like the template's (so they land on its devices); every
    difference of container, key, length, shape or dtype raises :class:`StateMismatchError`
    naming ``where`` and the path. Neither input is modified.
    """
    at = f"{where} at {path or '<root>'!r}"
    if isinstance(template, torch.Tensor):
        return _fit(saved, template, at)
    if template is None or isinstance(template, _SCALARS):
        if type(saved) is not type(template):
            raise StateMismatchError(f"{at}: the checkpoint has a {_kind(saved)}, this optimizer a {_kind(template)}")
        return saved
    if is_namedtuple(template):
        name = type(template).__name__
        if not (isinstance(saved, dict) and saved.get(TYPE_TAG) == name and isinstance(saved.get("fields"), dict)):
            raise StateMismatchError(f"{at}: the checkpoint has a {_kind(saved)}, this optimizer a NamedTuple {name}")
        fields = saved["fields"]
        if list(fields) != list(template._fields):
            raise StateMismatchError(
                f"{at}: the checkpoint's {name} has fields {list(fields)}, this optimizer's {list(template._fields)}"
            )
        values = [decode(fields[f], v, where, _join(path, f)) for f, v in zip(template._fields, template)]
        return type(template)(*values)
    if isinstance(template, (tuple, list)):
        if type(saved) is not type(template) or len(saved) != len(template):
            got = f"{_kind(saved)} of length {len(saved)}" if isinstance(saved, (tuple, list)) else _kind(saved)
            raise StateMismatchError(
                f"{at}: the checkpoint has a {got}, this optimizer a {_kind(template)} of length {len(template)}"
            )
        out = [decode(s, t, where, _join(path, i)) for i, (s, t) in enumerate(zip(saved, template))]
        return tuple(out) if isinstance(template, tuple) else out
    if isinstance(template, dict):
        if not isinstance(saved, dict) or TYPE_TAG in saved:
            raise StateMismatchError(f"{at}: the checkpoint has a {_kind(saved)}, this optimizer a dict")
        missing = [k for k in template if k not in saved]
        extra = [k for k in saved if k not in template]
        if missing or extra:
            if missing:
                detail = f"key {missing[0]!r} is missing from the checkpoint"
            else:
                detail = f"the checkpoint has an unknown key {extra[0]!r}"
            raise StateMismatchError(
                f"{at}: {detail} (checkpoint keys {list(saved)[:8]}, this optimizer's {list(template)[:8]})"
            )
        return {k: decode(saved[k], v, where, _join(path, k)) for k, v in template.items()}
    raise StateMismatchError(f"{at}: this optimizer's state holds a {type(template).__name__}, which cannot be loaded")


def per_param_views(state: Any, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors of ``state`` that belong to each parameter, by parameter name.

    A per-parameter tree is a dict whose keys are exactly ``names`` (the trees the transforms
    build with the params' structure). Each tensor leaf found there is listed under its parameter
    as ``{"adam.mu": t, "adam.nu": t, ...}``: the path in the state, the parameter's own key left
    out, and the ``inner_state`` field of wrappers skipped; a compressed tensor lists its parts
    (``"adam.mu.codes"``, ``"adam.mu.scales"``).
    """
    out: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    keys = set(names)

    def walk(node: Any, path: str) -> None:
        if is_namedtuple(node):
            for f, v in zip(node._fields, node):
                walk(v, path if f == "inner_state" else _join(path, f))
        elif isinstance(node, (tuple, list)):
            for i, v in enumerate(node):
                walk(v, _join(path, i))
        elif isinstance(node, dict):
            if node and set(node) == keys:
                for k, v in node.items():
                    if isinstance(v, torch.Tensor):
                        out[k][path or "state"] = v
                    elif is_namedtuple(v):  # a compressed tensor (grokxform.compress_state): its parts
                        for f, t in zip(v._fields, v):
                            if isinstance(t, torch.Tensor):
                                out[k][_join(path or "state", f)] = t
                return
            for k, v in node.items():
                walk(v, _join(path, k))

    walk(state, "")
    return out


GROUP_PREFIX = "group."
"""The key prefix of a group-wide state leaf in each parameter's checkpoint entry."""


def _leaf_out(x: Any) -> Any:
    """A state leaf as a checkpoint holds it: tensors detached, the state's own (live)."""
    return x.detach() if isinstance(x, torch.Tensor) else x


def _walk_leaves(node: Any, names: set[str], path: str, param: str | None, fn: Any) -> Any:
    """``node`` rebuilt with each leaf ``x`` replaced by ``fn(path, param, x)``: ``param`` is the
    parameter a leaf belongs to (a leaf under a dict whose keys are the parameter names), ``path``
    its path without that key."""
    if is_namedtuple(node):
        return type(node)(*(_walk_leaves(v, names, _join(path, f), param, fn) for f, v in zip(node._fields, node)))
    if isinstance(node, (tuple, list)):
        out = [_walk_leaves(v, names, _join(path, i), param, fn) for i, v in enumerate(node)]
        return tuple(out) if isinstance(node, tuple) else out
    if isinstance(node, dict):
        if param is None and node and set(node) == names:
            return {k: _walk_leaves(v, names, path, k, fn) for k, v in node.items()}
        return {k: _walk_leaves(v, names, _join(path, k), param, fn) for k, v in node.items()}
    return fn(path or "state", param, node)


def param_entries(state: Any, names: list[str]) -> dict[str, dict[str, Any]]:
    """Each parameter's checkpoint entry ``{path: leaf}`` (see the module docs); ``None`` leaves
    are left out."""
    own: dict[str, dict[str, Any]] = {n: {} for n in names}
    shared: dict[str, Any] = {}

    def take(path: str, param: str | None, x: Any) -> Any:
        if x is not None:
            (own[param] if param is not None else shared)[path if param is not None else GROUP_PREFIX + path] = (
                _leaf_out(x)
            )
        return x

    _walk_leaves(state, set(names), "", None, take)
    return {n: {**own[n], **shared} for n in names}


def _fit(saved: Any, template: torch.Tensor, at: str, cast: bool = False) -> torch.Tensor:
    """A new tensor like ``template`` (its device, dtype and layout: a DTensor's local shard)
    holding ``saved``: a tensor of the same global shape, sharded or whole (of the same dtype,
    or any dtype with ``cast``). Fresh, never the template itself: a template may share one
    tensor between two leaves (a state seeded with a hyperparameter tensor), which must not
    receive two values."""
    if not isinstance(saved, torch.Tensor):
        raise StateMismatchError(f"{at}: the checkpoint has a {_kind(saved)}, this optimizer a tensor")
    if saved.shape != template.shape:
        raise StateMismatchError(
            f"{at}: the checkpoint has shape {tuple(saved.shape)}, this optimizer {tuple(template.shape)}"
        )
    if saved.dtype != template.dtype and not cast:
        raise StateMismatchError(f"{at}: the checkpoint has dtype {saved.dtype}, this optimizer {template.dtype}")
    spec = _dist.shard_of(template)
    if spec is None:
        return torch.empty_like(template).copy_(_dist.full(saved))
    if _dist.shard_of(saved) == spec:
        return torch.empty_like(template).copy_(saved)
    piece = _dist.local_piece(_dist.full(saved), spec)  # a whole tensor: this rank's part of it
    return _dist.wrap(torch.empty_like(_dist.local(template)).copy_(piece), spec)


def from_param_entries(
    entries: dict[str, Any], template: Any, names: list[str], where: str, *, cast: bool = False
) -> Any:
    """The state rebuilt from parameter entries (made by :func:`param_entries`, possibly keyed
    and resharded by ``torch.distributed.checkpoint``) in the shape of ``template``, a freshly
    initialised state. A parameter without an entry keeps the template's values; group-wide
    leaves are read from the first parameter that has an entry. Every key, shape and dtype is
    checked (``cast``: values of another dtype or device are converted to the template's); a
    difference raises :class:`StateMismatchError`. The inputs are not modified."""
    given = [n for n in names if entries.get(n) is not None]
    if not given:
        raise StateMismatchError(f"{where}: no parameter has a state in the checkpoint")
    first = entries[given[0]]

    def fill(path: str, param: str | None, x: Any) -> Any:
        if param is not None and entries.get(param) is None:
            return x
        entry, key = (entries[param], path) if param is not None else (first, GROUP_PREFIX + path)
        at = f"{where}, parameter {param or given[0]!r}, {key!r}"
        if x is None:
            return None
        if not isinstance(entry, dict) or key not in entry:
            have = list(entry)[:8] if isinstance(entry, dict) else type(entry).__name__
            raise StateMismatchError(f"{at}: missing from the checkpoint (it has {have})")
        saved = entry[key]
        if isinstance(x, torch.Tensor):
            return _fit(saved, x, at, cast)
        if type(saved) is not type(x):
            raise StateMismatchError(f"{at}: the checkpoint has a {_kind(saved)}, this optimizer a {_kind(x)}")
        return saved

    state = _walk_leaves(template, set(names), "", None, fill)
    expected: dict[str, set[str]] = {n: set() for n in names}

    def keys(path: str, param: str | None, x: Any) -> Any:
        if x is not None:
            for n in ([param] if param is not None else names):
                expected[n].add(path if param is not None else GROUP_PREFIX + path)
        return x

    _walk_leaves(template, set(names), "", None, keys)
    for n in given:
        extra = sorted(set(entries[n]) - expected[n])
        if extra:
            raise StateMismatchError(f"{where}, parameter {n!r}: the checkpoint has an unknown entry {extra[0]!r}")
    return state


def check_loaded(state: Any, names: list[str], where: str) -> None:
    """Values a checkpoint cannot hold legitimately, found before anything is changed: a
    negative step count raises :class:`StateMismatchError` naming the entry. Non-finite values
    in a floating-point state tensor can be legitimate (a run that diverged without
    ``apply_if_finite``), so they are reported with one ``RuntimeWarning`` naming the entries."""
    bad: list[str] = []

    def visit(path: str, param: str | None, x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.dtype == torch.bool or x.numel() == 0:
            return x
        at = f"parameter {param!r}, {path!r}" if param is not None else f"{GROUP_PREFIX + path!r}"
        if x.dtype in (torch.int8, torch.uint8, torch.int16):  # (the codes of a compressed state)
            return x
        if not x.is_floating_point() and not x.is_complex():
            low = int(x.min())
            if low < 0:
                raise StateMismatchError(f"{where}, {at}: holds {low}; a step count is never negative")
        elif not bool(torch.isfinite(x).all()):
            bad.append(at)
        return x

    _walk_leaves(state, set(names), "", None, visit)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        warnings.warn(
            f"{where}: {', '.join(bad[:3])}{more} hold non-finite values (NaN or inf): the run was saved after"
            " it diverged there, and steps from this state keep them (apply_if_finite skips such steps)",
            RuntimeWarning,
            stacklevel=4,  # the caller of Optimizer.load_state_dict (through grokxform._checkpoint.restore)
        )
