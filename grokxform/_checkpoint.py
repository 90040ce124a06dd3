"""The checkpoint format of :class:`grokxform.Optimizer`: its ``state_dict()``, checked and read back.

torch.optim's layout, which ``torch.distributed.checkpoint`` reads: ``"state"`` maps each
parameter's index to its entry, ``{path: tensor}`` (:func:`grokxform._state_io.param_entries`:
its own state tensors, and the group-wide values under ``"group."``); each of
``"param_groups"`` holds the group's values that a ``weights_only`` checkpoint can store, the
parameters' indices, names and shapes, the format version and the factory's name. Versions:

1. one encoded state tree per group (``"state"`` a list, ``sd["grokxform"]`` the version);
2. torch.optim's layout, MA windows oldest first;
3. torch.optim's layout, MA windows as the slots of their ring buffers (what is written).

All three are read: the saved state is rebuilt against a freshly initialised state of the
transformation, and every difference raises ``ValueError`` naming it, before anything changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from grokxform import _state_io as S
from grokxform import distributed as _dist
from grokxform._naming import canonical
from grokxform.base import GradientTransformation
from grokxform.engine.layout import init_state, to_eager_layout, to_fused_layout

FORMAT_VERSION = 3
"""The version written (see the module docs)."""

BOOKKEEPING = ("params", "param_names", "param_shapes", "grokxform_version", "grokxform_transform")
"""The keys of a saved param group that describe it rather than set its values."""


def _plain(x: Any) -> bool:
    """Whether a group value can go into a ``weights_only`` checkpoint."""
    if x is None or isinstance(x, (bool, int, float, str, torch.dtype, torch.device, torch.Tensor)):
        return True
    if isinstance(x, (tuple, list)):
        return all(_plain(v) for v in x)
    return False


def state_dict(
    groups: Sequence[tuple[Mapping[str, Any], list[str], Any]], transform: str
) -> dict[str, Any]:
    """``{"state": ..., "param_groups": ...}`` of the format version :data:`FORMAT_VERSION`. The
    state tensors are the given ones, not copies; tensor values of a group are cloned.

    Args:
        groups: for each param group, the group, its parameter names and its state with MA
            windows as ring slots (``None`` before its first step).
        transform: the name of the factory (``"GradientTransformation"`` for a ready one).
    """
    saved_groups = []
    state: dict[int, dict[str, Any]] = {}
    index = 0
    for group, names, slots in groups:
        saved = {
            k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
            for k, v in group.items()
            if k not in BOOKKEEPING and _plain(v)
        }
        ids = list(range(index, index + len(group["params"])))
        saved["params"] = ids
        saved["param_names"] = [canonical(n) for n in names]
        saved["param_shapes"] = [list(p.shape) for p in group["params"]]
        saved["grokxform_version"] = FORMAT_VERSION
        saved["grokxform_transform"] = transform
        index += len(ids)
        saved_groups.append(saved)
        if slots is not None:
            entries = S.param_entries(slots, names)
            state.update({i: entries[n] for i, n in zip(ids, names)})
    return {"state": state, "param_groups": saved_groups}


def check(sd: Any, transform: str, groups: Sequence[tuple[list[str], list[torch.Tensor]]]) -> int:
    """The format version of ``sd``, after checking it against an optimizer: its factory, number
    of groups, and every parameter's name and shape. A mismatch raises ``ValueError`` naming it.

    Args:
        sd: a state dict.
        transform: the optimizer's factory name.
        groups: the parameter names and parameters of each of its param groups.
    """
    if not isinstance(sd, Mapping):
        raise TypeError(f"load_state_dict: expected a dict, got {type(sd).__name__}")
    saved_groups, states = sd.get("param_groups"), sd.get("state")
    if "grokxform" in sd:  # format 1
        meta = sd["grokxform"]
        version = meta.get("version") if isinstance(meta, Mapping) else None
        saved_transform = meta.get("transform") if isinstance(meta, Mapping) else None
        if not isinstance(saved_groups, list) or not isinstance(states, list) or len(saved_groups) != len(states):
            raise ValueError("load_state_dict: 'param_groups' and 'state' must be lists of the same length")
        if version != 1:
            raise ValueError(f"load_state_dict: unsupported checkpoint format {meta!r}")
    else:
        ours = isinstance(saved_groups, list) and saved_groups and all(
            isinstance(x, Mapping) and "grokxform_version" in x for x in saved_groups
        )
        if not ours:
            torch_like = "param_groups" in sd
            kind = "a torch.optim optimizer's state_dict" if torch_like else f"a dict with keys {list(sd)[:6]}"
            raise ValueError(f"load_state_dict: this is {kind}, not a grokxform.Optimizer state_dict")
        assert isinstance(saved_groups, list)
        version, saved_transform = saved_groups[0]["grokxform_version"], saved_groups[0].get("grokxform_transform")
        if version not in (2, FORMAT_VERSION):
            raise ValueError(
                f"load_state_dict: unsupported checkpoint format {version!r} (this version reads 1, 2 and"
                f" {FORMAT_VERSION})"
            )
        if not isinstance(states, Mapping):
            raise ValueError("load_state_dict: 'state' must be a dict of the parameters' states")
    if saved_transform != transform:
        raise ValueError(
            f"load_state_dict: the checkpoint is of an optimizer over {saved_transform!r}, this one runs"
            f" {transform!r}"
        )
    if len(saved_groups) != len(groups):
        raise ValueError(
            f"load_state_dict: the checkpoint has {len(saved_groups)} param groups,"
            f" this optimizer {len(groups)}"
        )
    for g, (saved, (here_names, params)) in enumerate(zip(saved_groups, groups)):
        names = list(saved.get("param_names", []))
        if len(names) != len(params) or len(saved.get("params", names)) != len(names):
            raise ValueError(
                f"load_state_dict: param group {g} has {len(names)} parameters in the checkpoint,"
                f" {len(params)} here"
            )
        here = [canonical(n) for n in here_names]
        diff = next((i for i, (a, b) in enumerate(zip(names, here)) if canonical(a) != b), None)
        if diff is not None:
            raise ValueError(
                f"load_state_dict: param group {g}, parameter {diff} is {names[diff]!r} in the checkpoint,"
                f" {here_names[diff]!r} here"
            )
        for n, shape, p in zip(names, saved.get("param_shapes", []), params):
            if list(shape) != list(p.shape):
                raise ValueError(
                    f"load_state_dict: parameter {n!r} has shape {tuple(shape)} in the checkpoint,"
                    f" {tuple(p.shape)} here"
                )
    return int(version)


def group_values(saved_group: Mapping[str, Any]) -> dict[str, Any]:
    """The values that a saved param group sets (its hyperparameters...), without its bookkeeping.

    Args:
        saved_group: one of a checked state dict's ``"param_groups"``.
    """
    return {k: v for k, v in saved_group.items() if k not in BOOKKEEPING}


def saved_state(sd: Mapping[str, Any], version: int, g: int, names: list[str]) -> Any:
    """Param group ``g``'s saved state: its encoded tree (version 1) or each parameter's entry by
    name (``None`` for a parameter without one); ``None`` when no parameter of the group has one.

    Args:
        sd: a state dict that :func:`check` accepted.
        version: its format version.
        g: the group's index.
        names: the group's parameter names here.
    """
    if version == 1:
        return sd["state"][g]
    keys = sd["param_groups"][g].get("params", list(range(len(names))))
    entries = {n: sd["state"].get(k) for n, k in zip(names, keys)}
    return None if all(v is None for v in entries.values()) else entries


def restore(
    saved: Any, version: int, tx: GradientTransformation, params: list[torch.Tensor], names: list[str],
    specs: dict[str, Any], where: str,
) -> Any:
    """A param group's state rebuilt from :func:`saved_state` against a fresh state of ``tx``, in
    the layout the optimizer steps on (MA windows as ring buffers). Every container, key, shape
    and dtype is checked, and a step count below 0 refused, raising ``ValueError`` that names
    ``where`` and the entry; non-finite values warn.

    Args:
        saved: the group's saved state.
        version: the checkpoint's format version.
        tx: the group's transformation.
        params: the group's parameters.
        names: their names.
        specs: the layout of each parameter (``None`` for a plain tensor).
        where: the group, as messages name it.
    """
    tree = {n: p.detach() for n, p in zip(names, params)}
    with torch.no_grad():
        if version == 1:
            state = S.decode(saved, tx.init(tree), where)
        elif version == 2:  # windows oldest first
            state = S.from_param_entries(saved, tx.init(tree), names, where)
        else:  # windows as ring slots
            local = {n: _dist.local(p) for n, p in tree.items()}
            template = _dist.shard_like(to_eager_layout(init_state(tx, local), ring_order=True), specs)
            state = S.from_param_entries(saved, template, names, where)
        S.check_loaded(state, names, where)
        return to_fused_layout(_dist.unshard_tree(state), ring_order=version == FORMAT_VERSION)
