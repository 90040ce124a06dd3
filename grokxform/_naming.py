"""The names of an optimizer's parameters: the keys of the tree that each param group hands to its
transformation, and the names its checkpoints carry.

A group's parameters are named by its ``"param_names"`` (what ``model.named_parameters()`` and
``(name, param)`` pairs give), else by the module they belong to, else by their position counted
across groups (``"0"``, ``"1"``...). A name, and a tensor, may appear once in an optimizer: a
tensor given twice would be updated twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from grokxform import distributed as _dist

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""DDP's and ``torch.compile``'s prefixes of parameter names, left out of checkpoint names."""


def canonical(name: str) -> str:
    """A parameter name without the prefixes that DDP and ``torch.compile`` add (what
    ``torch.distributed.checkpoint`` calls the FQN).

    Args:
        name: a dotted parameter name (``"module.blocks.0.weight"``).
    """
    return ".".join(part for part in name.split(".") if part + "." not in WRAPPER_PREFIXES)


def module_names(module: torch.nn.Module | None) -> dict[int, str] | None:
    """The name of each parameter of ``module``, by the id of the tensor (``None`` without a module).

    Args:
        module: the ``nn.Module`` the parameters belong to, or ``None``.
    """
    if module is None:
        return None
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"Optimizer: module must be a torch.nn.Module, got {type(module).__name__}")
    return {id(p): n for n, p in module.named_parameters()}


def group_names(
    group: Mapping[str, Any], g: int, before: Sequence[tuple[list[str], list[torch.Tensor]]],
    by_module: dict[int, str] | None,
) -> list[str]:
    """The names of the parameters of param group ``g``; a name given twice raises ``ValueError``.

    Args:
        group: the param group (``"params"``, and ``"param_names"`` when they are named).
        g: its index.
        before: ``(names, params)`` of each group before it.
        by_module: :func:`module_names` of the module unnamed parameters belong to, or ``None``.
    """
    params = group["params"]
    if "param_names" in group:
        names = list(group["param_names"])
        bad = [n for n in names if not isinstance(n, str)]
        if bad:
            raise TypeError(f"Optimizer: parameter names must be str, param group {g} has {bad[0]!r}")
    elif by_module is not None:
        outside = next((i for i, p in enumerate(params) if id(p) not in by_module), None)
        if outside is not None:
            raise ValueError(
                f"Optimizer: parameter {outside} of param group {g} is not a parameter of the module given"
                " as module= (its names come from module.named_parameters())"
            )
        names = [by_module[id(p)] for p in params]
    else:
        offset = sum(len(others) for _, others in before)
        names = [str(offset + i) for i in range(len(params))]
    seen = {n for other, _ in before for n in other}
    for n in names:
        if n in seen:
            raise ValueError(f"Optimizer: the parameter name {n!r} appears twice (param group {g})")
        seen.add(n)
    return names


def check_distinct(
    params: list[torch.Tensor], names: list[str], g: int, before: Sequence[tuple[list[str], list[torch.Tensor]]]
) -> None:
    """Refuse a tensor given twice, in group ``g`` or in a group before it, or two tensors that
    share memory: it would be updated twice.

    Args:
        params: the parameters of group ``g``.
        names: their names.
        g: the group's index.
        before: ``(names, params)`` of each group before it.
    """
    where: dict[int, str] = {}
    known: dict[tuple[torch.device, int], str] = {}
    for other, others in before:
        for n, p in zip(other, others):
            where[id(p)] = n
            if p.numel():
                known[(p.device, _dist.local(p).data_ptr())] = n
    for n, p in zip(names, params):
        key = (p.device, _dist.local(p).data_ptr())
        first = where.get(id(p)) or (known.get(key) if p.numel() else None)
        if first is not None:
            raise ValueError(
                f"Optimizer: parameter {n!r} of param group {g} is the same tensor as {first!r} (or shares its"
                " memory); each parameter may be given once, or it would be updated twice"
            )
        where[id(p)] = n
        if p.numel():
            known[key] = n
