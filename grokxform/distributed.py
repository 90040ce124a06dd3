"""Sharded parameters (``torch.distributed.tensor.DTensor``, what FSDP2's ``fully_shard`` and
tensor parallelism make): every transform runs on each rank's local shard, and the reductions
over leaves (the global norm of ``clip_by_global_norm``, the finite check of
``apply_if_finite``) are completed across ranks.

The rule is exact because the declared transforms are elementwise per parameter: a shard's
update needs its own elements and a few scalars. The only cross-element values are the per-leaf
reductions, which are combined here: the squared norms and the non-finite counts of all leaves
go into **one** vector, all-reduced (sum) once per mesh dimension along which some leaf is
sharded (one all-reduce per step for FSDP2's 1-d mesh). A leaf replicated along that dimension
(or a plain tensor) contributes from the first coordinate only, so it is counted once.

State follows its parameter: a per-parameter state tensor (Adam's moments, an EMA, each slot of
an MA window) has the parameter's local shape and is sharded like it; nothing is gathered.
Scalars (counts, hyperparameters, signals) are plain tensors, the same on every rank.

``Optimizer`` and ``tx.init`` / ``tx.update`` accept DTensor parameters as they are; see
``docs/distributed.md`` for FSDP2, DDP and ``torch.distributed.checkpoint``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

try:  # torch.distributed is optional in some builds
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Replicate, Shard
except ImportError:  # pragma: no cover - a torch built without distributed
    DTensor = None  # type: ignore[assignment,misc]


class LeafShard(NamedTuple):
    """How one leaf is laid out: its mesh, placements, global shape and stride."""

    mesh: Any
    placements: tuple[Any, ...]
    shape: torch.Size
    stride: tuple[int, ...]


def is_sharded(t: Any) -> bool:
    """Whether ``t`` is a DTensor."""
    return DTensor is not None and isinstance(t, DTensor)


def shard_of(t: Any) -> LeafShard | None:
    """The layout of a DTensor (``None`` for anything else)."""
    if not is_sharded(t):
        return None
    return LeafShard(t.device_mesh, tuple(t.placements), t.shape, tuple(t.stride()))


def local(t: Any) -> Any:
    """A DTensor's local shard (the very tensor it holds: in-place updates reach the DTensor);
    anything else as it is."""
    return t._local_tensor if is_sharded(t) else t


def wrap(t: Any, spec: LeafShard | None) -> Any:
    """``t`` (a local shard) as the DTensor of layout ``spec``; ``t`` itself when ``spec`` is
    ``None``, ``t`` is not a tensor, or its shape is not the spec's local shape (a 0-d scalar)."""
    if spec is None or not isinstance(t, torch.Tensor) or is_sharded(t):
        return t
    if t.dim() != len(spec.shape):
        return t
    return DTensor.from_local(t, spec.mesh, spec.placements, run_check=False, shape=spec.shape, stride=spec.stride)


def stacked(spec: LeafShard | None, n: int) -> LeafShard | None:
    """The layout of ``n`` tensors of layout ``spec`` stacked along a new first dimension (an MA
    window's ring buffer): sharded along the same dimensions, shifted by one."""
    if spec is None:
        return None
    placements = tuple(Shard(p.dim + 1) if isinstance(p, Shard) else p for p in spec.placements)
    inner = spec.shape.numel()
    return LeafShard(spec.mesh, placements, torch.Size((n, *spec.shape)), (inner, *spec.stride))


def local_shape(spec: LeafShard) -> torch.Size:
    """The shape of this rank's shard of a leaf of layout ``spec``."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, _ = compute_local_shape_and_global_offset(spec.shape, spec.mesh, spec.placements)
    return torch.Size(shape)


def full(t: Any) -> Any:
    """A DTensor gathered whole (a collective: every rank of its mesh must call it); anything
    else as it is."""
    return t.full_tensor() if is_sharded(t) else t


def local_piece(whole: torch.Tensor, spec: LeafShard) -> torch.Tensor:
    """This rank's part of ``whole`` (a tensor of the global shape) for layout ``spec``: a slice,
    no communication."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(spec.shape, spec.mesh, spec.placements)
    index = tuple(slice(o, o + n) for o, n in zip(offset, shape))
    return whole[index] if index else whole


def check_meshes(specs: Sequence[LeafShard | None], what: str) -> Any:
    """The one mesh of the sharded leaves (``None`` if none is sharded); several raise."""
    meshes = [s.mesh for s in specs if s is not None]
    if not meshes:
        return None
    mesh = meshes[0]
    if any(m != mesh for m in meshes[1:]):
        raise ValueError(f"{what}: the sharded parameters of one transform must share one device mesh")
    for s in specs:
        if s is not None and any(not isinstance(p, (Shard, Replicate)) for p in s.placements):
            raise ValueError(f"{what}: parameters must be sharded or replicated, got placements {s.placements}")
    return mesh


def complete_reductions(
    out: dict[str, torch.Tensor], specs: Sequence[LeafShard | None]
) -> dict[str, torch.Tensor]:
    """Per-leaf reductions of local shards (as :func:`grokxform.declarations.reductions` gives
    them) completed over the ranks: the norm of each whole leaf (``"norm"``), whether all of it is
    finite (``"finite"``), and every other entry, a per-leaf sum, summed. One all-reduce per
    sharded mesh dimension, in float64."""
    mesh = check_meshes(specs, "grokxform (a reduction over the leaves)")
    if mesh is None or not out:
        return out
    dims = [d for d in range(mesh.ndim) if any(s is not None and isinstance(s.placements[d], Shard) for s in specs)]
    if not dims:
        return out
    n = len(specs)
    device = next(iter(out.values())).device
    names = list(out)
    parts = [out[k].to(torch.float64).square() if k == "norm" else (~out[k]).to(torch.float64) if k == "finite"
             else out[k].to(torch.float64) for k in names]
    vec = torch.cat(parts)
    import torch.distributed as dist

    for d in dims:
        sharded = torch.tensor(
            [s is not None and isinstance(s.placements[d], Shard) for s in specs], device=device
        ).repeat(len(parts))
        if mesh.get_local_rank(d) != 0:  # a replicated leaf is counted on the first coordinate only
            vec = torch.where(sharded, vec, torch.zeros((), dtype=vec.dtype, device=device))
        dist.all_reduce(vec, group=mesh.get_group(d))
    done = {}
    for k, name in enumerate(names):
        got = vec[k * n:(k + 1) * n]
        done[name] = got.sqrt().to(out[name].dtype) if name == "norm" else got == 0 if name == "finite" else got.to(
            out[name].dtype)
    return done


def unshard_tree(tree: Any) -> Any:
    """``tree`` with every DTensor leaf replaced by its local shard (containers rebuilt, NamedTuples
    kept)."""
    if is_sharded(tree):
        return local(tree)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(unshard_tree(v) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(unshard_tree(v) for v in tree)
    if isinstance(tree, dict):
        return {k: unshard_tree(v) for k, v in tree.items()}
    return tree


def shard_like(state: Any, specs: dict[str, LeafShard | None]) -> Any:
    """A state tree of local shards with each per-parameter tensor (a tensor under a dict whose
    keys are exactly the parameter names of ``specs``, with its parameter's local shape) wrapped
    as a DTensor laid out like its parameter; the other leaves (scalars) as they are. The
    DTensors hold the very tensors of ``state``."""
    if not any(s is not None for s in specs.values()):
        return state
    names = set(specs)
    shapes = {n: (local_shape(s) if s is not None else None) for n, s in specs.items()}

    def walk(node: Any) -> Any:
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*(walk(v) for v in node))
        if isinstance(node, (tuple, list)):
            return type(node)(walk(v) for v in node)
        if isinstance(node, dict):
            if node and set(node) == names:
                return {
                    k: wrap(v, specs[k]) if isinstance(v, torch.Tensor) and v.shape == shapes[k] else walk(v)
                    for k, v in node.items()
                }
            return {k: walk(v) for k, v in node.items()}
        return node

    return walk(state)
