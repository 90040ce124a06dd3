"""The engine's in-place step of any declared chain: a scalar prologue and generated multi-tensor
kernels (Triton's on CUDA, C on the CPU: :mod:`grokxform.engine.native`), one pass over memory (two
with a reduction such as the global clip).

Per call, on the device and without a host synchronisation (so the whole step can be captured
into a CUDA graph):

1. the step counters of every primitive are read (one gather per primitive);
2. for each stage: the scalar rules of the nodes of that stage run (ordinary torch ops on a few
   scalars: bias corrections, α_t from the signal, the schedule's η_t, the clip factor...) and
   their tensor results are packed into one float64 buffer;
3. each pass launches one generated kernel per group of leaves (leaves that run the same program
   with the same dtypes); a reduction pass writes Σx² and a count of non-finite values per block,
   which the next stage sums per leaf in a fixed order (deterministic, no atomics); the pass of a
   whole-leaf stage (Muon's Newton–Schulz iteration) writes its input into the stage's buffers,
   which the stage's function then maps with torch's ops, batched by shape, in place; the last
   pass updates params and state in place;
4. counters and the state's 0-d fields (α, the clip norm, counts of wrappers...) are written back.

:class:`EngineStep` is built per pattern of ``None`` gradients by :class:`grokxform.fused.FusedStep`.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import importlib.util
import math
import os
import stat
import sys
import tempfile
import types
from dataclasses import dataclass, field
from typing import Any

import torch

from grokxform import declarations as D
from grokxform import tree as _tree
from grokxform.elements import Scalars
from grokxform.engine import codegen as G
from grokxform.engine import foreach as F
from grokxform.engine import native
from grokxform.engine import plan as P

BLOCK = 1024
"""Elements per program (one work item) of the pass that writes."""
REDUCE_BLOCK = 4096
"""Elements per program of a reduction pass (it reads and sums: larger blocks, fewer partial sums)."""
NUM_WARPS = 4
INT8_TILE: tuple[int, int, int | None, int] | None = (256, 1, 64, 1)
"""The tile of a Triton pass that writes int8 codes: (elements, warps, registers per thread at
most or ``None`` for the compiler's choice, work items a program takes in turn); ``None``:
``BLOCK`` and ``NUM_WARPS``, one item a program, as every other pass.
One warp reduces the absmax of each quantization block it holds with shuffles alone (no shared
memory, no barrier), 8 elements a thread. On an H200, GPT-2 small, grokadamw's int8 step took
1.089 ms with at most 64 registers a thread, 1.182 ms with 80, 1.689 ms with the compiler's
choice, and adamw's 0.771, 0.830 and 1.029 ms, in one run
(``benchmarks/results/h200_compress_gpt2_tiles.json``)."""
INT8_WINDOW_TILE: tuple[int, int, int | None, int] | None = (256, 1, 96, 1)
"""The tile of such a pass that also reads and writes an MA window (``None``: as for
:data:`INT8_TILE`), a knob of its own since the window's values add to what the registers hold:
in the run above grokfast_ma(100)'s int8 step took 1.304 ms with at most 96 registers a thread,
1.390 ms with 80 and 1.739 ms with 64."""
HOIST_LOADS = False
"""Whether the Triton kernels issue each element load as early as it may be
(:func:`~grokxform.engine.codegen.hoist_loads`) rather than where the emitter first needs it."""
ROUNDING_IN_LINE = False
"""Whether the Triton kernels compute float32 square roots and divisions of elements with the
compiler's fast sequences in line for a whole tile (``_lib.sqrt_f32``, ``_lib.div_f32``: the same
correctly rounded numbers) rather than ``tl.sqrt_rn`` and ``tl.div_rn``, which compile to a branch
around each element's slow path (:func:`~grokxform.engine.codegen.rounding_in_line`)."""
VECTOR_ACCESS = True
"""Whether the Triton kernels are launched ``ALIGNED=True`` (vector loads and stores) when every
address of a group's tables is 16-byte aligned; ``False``: never."""
THREAD_ELEMENTS = 1 << 15
"""Elements per thread of a C kernel, at least."""
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_STATE_FLOATS = (*_FLOATS, torch.float64)


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device: torch.device) -> bool:
    """Whether the engine can run on ``device``: Triton installed, and a CUDA device (or the Triton
    interpreter, for CPU tensors)."""
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        return False
    return importlib.util.find_spec("triton") is not None


def _unsafe(path: str) -> str | None:
    """Why the folder ``path`` cannot hold code that this process runs, or ``None`` when it is a
    private folder of this user: a real folder (not a symbolic link) that this user owns and that
    neither the group nor others may write to. Where the OS has no user ids (Windows), folders
    are not checked: their mode bits say nothing of who may write."""
    getuid = getattr(os, "getuid", None)
    try:
        st = os.lstat(path)
    except OSError as e:
        return f"it cannot be read ({e.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a folder"
    if getuid is None:
        return None
    if st.st_uid != getuid():
        return f"it is owned by another user (uid {st.st_uid})"
    if st.st_mode & 0o022:
        return f"other users may write to it (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _private(path: str) -> str | None:
    """Create the folder ``path`` for this user alone (mode 0o700) if it is absent; why it cannot
    hold kernels (:func:`_unsafe`), or ``None``."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        if not os.path.lexists(path):
            return f"it cannot be created ({e.strerror})"
    return _unsafe(path)


def _user() -> str:
    getuid = getattr(os, "getuid", None)
    return str(getuid()) if getuid is not None else getpass.getuser()


_DIR: tuple[tuple[str, ...], str] | None = None
"""The cache folder and the settings it was chosen for (``GROKXFORM_CACHE_DIR``, the user's cache,
the temporary folder)."""


def cache_dir() -> str:
    """Where generated kernel modules are written: ``GROKXFORM_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/grokxform/kernels`` (``~/.cache/grokxform/kernels``), else
    ``grokxform-kernels-<uid>`` in the temporary folder, else a new temporary folder of this process.

    The folder must be private to this user (created with mode 0o700; not a symbolic link, owned
    by this user, not writable by the group or others): a default folder that is not is skipped,
    and a ``GROKXFORM_CACHE_DIR`` that is not raises :class:`PermissionError`. It is chosen once per
    process and settings; later calls check it again with one ``lstat``."""
    global _DIR
    explicit = os.environ.get("GROKXFORM_CACHE_DIR", "")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    key = (explicit, base, tempfile.gettempdir())
    if _DIR is not None and _DIR[0] == key and _unsafe(_DIR[1]) is None:
        return _DIR[1]
    if explicit:
        why = _private(explicit)
        if why is not None:
            raise PermissionError(
                f"GROKXFORM_CACHE_DIR={explicit!r} cannot hold generated kernels: {why}. Make it a folder"
                f" of this user that only this user may write to (chmod 700 {explicit}), or set"
                " GROKXFORM_CACHE_DIR to another folder"
            )
        root = explicit
    else:
        candidates = (os.path.join(base, "grokxform", "kernels"), os.path.join(key[2], f"grokxform-kernels-{_user()}"))
        root = next((c for c in candidates if _private(c) is None), None)
        if root is None:
            root = tempfile.mkdtemp(prefix="grokxform-kernels-")
    _DIR = (key, root)
    return root


def _module_file(folder: str, mod_name: str, code: bytes) -> str:
    """The path of ``mod_name``'s file in ``folder``, holding exactly ``code``: the file there if
    it does, else (absent, changed, cut short by a crash) written anew, atomically: a file of this
    user alone (mode 0o600, created exclusively), then renamed over it."""
    path = os.path.join(folder, f"{mod_name}.py")
    try:
        with open(path, "rb") as f:
            if f.read(len(code) + 1) == code:
                return path
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{mod_name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(code)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


_MODULES: dict[str, Any] = {}


def load_kernel(source: str, name: str) -> Any:
    """The Triton kernel ``name`` defined by ``source``, written once to the cache folder and run
    from there (Triton reads a kernel's source from its file). What runs is ``source`` itself: the
    file is checked to hold exactly it, and rewritten when it does not."""
    code = source.encode()
    mod_name = f"grokxform_kernel_{hashlib.sha256(code).hexdigest()[:20]}"
    mod = _MODULES.get(mod_name)
    if mod is None:
        path = _module_file(cache_dir(), mod_name, code)
        mod = types.ModuleType(mod_name)
        mod.__file__ = path
        sys.modules[mod_name] = mod
        exec(compile(code, path, "exec"), mod.__dict__)
        _MODULES[mod_name] = mod
    return getattr(mod, name)


@dataclass(eq=False)
class _Group:
    """Leaves that run the same program with the same dtypes: one launch per pass."""

    leaves: list[int]
    roles: dict[str, list[torch.Tensor]]
    dtypes: dict[str, torch.dtype]
    numel: torch.Tensor
    items: dict[int, tuple[torch.Tensor, torch.Tensor, int, int]]
    """Per block size: the work items (leaf, start), their count and the most blocks of one leaf."""
    tile: tuple[int, int, int | None, int]
    """The pass that writes: elements per item, warps, registers per thread at most (Triton), items
    per program."""
    pos: torch.Tensor
    tables: dict[str, torch.Tensor] = field(default_factory=dict)
    unaligned: set[str] = field(default_factory=set)
    """The roles whose table holds an address that is not a multiple of 16 bytes: while there is
    one, the Triton kernels run with ``ALIGNED=False`` (no vector loads or stores)."""
    kernels: dict[int, tuple[Any, list[str]]] = field(default_factory=dict)
    rsq: dict[int, torch.Tensor] = field(default_factory=dict)
    rbad: dict[int, torch.Tensor] = field(default_factory=dict)
    red_index: dict[int, torch.Tensor] = field(default_factory=dict)
    idx: dict[int, list[int]] = field(default_factory=dict)
    """Per node: the positions of the group's leaves among the node's leaves (its per-leaf scalars)."""
    grad_key: tuple[int, ...] = ()
    elements: int = 0
    """The group's elements (the sum of its leaves' sizes)."""
    c_args: dict[int, torch.Tensor] = field(default_factory=dict)
    """Per pass of the C backend: its kernel's argument array."""
    reads_gradient: dict[int, bool] = field(default_factory=dict)
    """Per reduction pass of the C backend: whether it reduces the gradient as it comes."""


def _items(
    numels: list[int], block: int, device: torch.device, multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """The work items of leaves of ``numels`` elements in blocks of ``block``: (leaf, start) tables,
    their count and the most blocks of one leaf (the row length of the reduction buffers). The
    tables are padded to a ``multiple`` of items with items past the end of the first leaf (no
    element of theirs is read or written)."""
    leaf, start = [], []
    for j, n in enumerate(numels):
        for c in range(math.ceil(n / block)):
            leaf.append(j)
            start.append(c * block)
    while len(leaf) % multiple:
        leaf.append(0)
        start.append(math.ceil(numels[0] / block) * block)
    chunks = max(1, max((math.ceil(n / block) for n in numels), default=1))
    leaf_t = torch.tensor(leaf or [0], dtype=torch.int64, device=device)
    return leaf_t, torch.tensor(start or [0], dtype=torch.int64, device=device), len(leaf), chunks


def _as_vector(counts: list[torch.Tensor]) -> torch.Tensor | None:
    """The counters as one int64 vector view when they are consecutive in one buffer (the fused
    layout homes them so), else ``None``."""
    first = counts[0]
    storage, off = first.untyped_storage().data_ptr(), first.storage_offset()
    for k, c in enumerate(counts):
        if c.dtype != torch.int64 or c.dim() != 0 or c.untyped_storage().data_ptr() != storage or (
                c.storage_offset() != off + k):
            return None
    return first.as_strided((len(counts),), (1,), off)


def _records(values: dict[int, dict[str, Any]], writes: list[tuple[Any, Any, Any]]) -> bool:
    """Whether autograd records a scalar of ``values`` or a value of ``writes`` (a step run with
    grad mode on refuses them: the kernels would cut the graph)."""
    return any(isinstance(v, torch.Tensor) and v.requires_grad for vs in values.values() for v in vs.values()) or any(
        isinstance(src, torch.Tensor) and src.requires_grad for _, src, _ in writes)


class EngineStep:
    """The in-place step of the declared transform ``tx`` for one pattern of ``None`` gradients.

    ``EngineStep(tx, p_tree, state, grads, extras)`` raises :class:`~grokxform.engine.plan.Unsupported`
    when a member has no declaration or a tensor is out of reach (the message says which);
    ``step(extras)`` then updates the params and the state in place, after :meth:`prepare`
    pointed the kernels at this step's gradients.
    """

    def __init__(
        self, tx: Any, p_tree: Any, state: Any, grads: list[Any], extras: dict[str, torch.Tensor],
        *, backend: str = "triton", block: int | None = None, num_warps: int | None = None,
        shards: list[Any] | None = None, declaration: D.Declaration | None = None, output: str = "params",
    ) -> None:
        if backend not in ("triton", "c", "foreach"):
            raise ValueError(f"EngineStep: backend must be 'triton', 'c' or 'foreach', got {backend!r}")
        if output not in ("params", "updates"):
            raise ValueError(f"EngineStep: output must be 'params' or 'updates', got {output!r}")
        self.output = output
        """``"params"``: the step adds its update to the params; ``"updates"``: it writes the update
        into :attr:`updates` (one tensor per leaf with a gradient, the gradient's dtype and shape,
        reused from step to step) and leaves the params as they are."""
        if backend == "c":
            cc, why = native.compiler()
            if cc is None:
                raise P.Unsupported(why)
        self.backend = backend
        self.shards = shards if shards is not None and any(x is not None for x in shards) else None
        """The layout of each param leaf when the tensors are local shards of DTensors (``None``:
        unsharded): the per-leaf reductions are then completed over the ranks."""
        self.decl = declaration if declaration is not None else D.declaration_of(tx)
        self.state = state
        self.plan = plan = P.make_plan(self.decl, state, p_tree, grads)
        self.updates: dict[int, torch.Tensor] = (
            {i: torch.empty_like(grads[i]) for i in plan.leaves} if output == "updates" else {}
        )
        self.block = block or BLOCK
        self.reduce_block = REDUCE_BLOCK
        self.num_warps = num_warps or NUM_WARPS
        sizes = {node.decl.block_size for node in plan.nodes if isinstance(node, P.Pack) and node.decl.fmt == "int8"}
        self.int8_tiles: dict[bool, tuple[int, int, int | None, int]] = {
            windowed: tile if tile is not None and backend == "triton" and block is None and num_warps is None
            and tile[0] != self.reduce_block and all(tile[0] % size == 0 for size in sizes)
            else (self.block, self.num_warps, None, 1)
            for windowed, tile in ((False, INT8_TILE), (True, INT8_WINDOW_TILE))}
        """The tile of a group whose pass writes int8 codes, by whether the group holds an MA
        window: :data:`INT8_TILE` or :data:`INT8_WINDOW_TILE`, unless the step was given its block or
        warps or a quantization block does not divide that tile (then the other passes' tile)."""
        present = [grads[i] for i in plan.leaves]
        self.device = present[0].device
        self._check_tensors(plan, state)
        self._wholes = [node for node in plan.reductions if isinstance(node, P.Whole)]
        for node in self._wholes:
            if self.shards is not None and any(self.shards[leaf] is not None for leaf in node.leaves):
                raise P.Unsupported(f"{node.where}: a leaf it maps is sharded (a DTensor); it needs each leaf whole")
            node.allocate([grads[leaf] for leaf in node.leaves], self.device)
        self._node_of = {id(node): node for node in plan.nodes}
        self._node_index = {id(node): k for k, node in enumerate(plan.nodes)}
        self._position = {  # a leaf's position among a node's leaves (the index of its per-leaf scalars)
            id(node): {leaf: k for k, leaf in enumerate(node.leaves)} for node in plan.nodes
            if node.per_leaf
        }
        self._nodes_by_stage: list[list[Any]] = [[] for _ in range(plan.passes)]
        for node in plan.nodes:
            self._nodes_by_stage[node.stage].append(node)
        cuda = self.device.type == "cuda" and backend == "triton"
        self._streams = [torch.cuda.Stream(self.device) for _ in range(4)] if cuda else []
        self._member_col = {id(m): k for k, m in enumerate(plan.members)}
        self._counts = {id(m): _as_vector(m.counts) for m in plan.members if m.counts}
        self._present = {id(m): [False] * len(plan.paths) for m in plan.members}
        for m in plan.members:
            for i in m.leaves:
                self._present[id(m)][i] = True
        # The layout of the scalars: one run of the prologue, with stand-in reductions.
        self._constants: list[float] = []
        self._const_index: dict[str, int] = {}
        self._slots: dict[tuple[int, str], G.Slot] = {}
        self._dyn: list[list[tuple[int, str]]] = [[] for _ in range(plan.passes)]
        self._sc: list[torch.Tensor] = []
        stand_in = {
            id(r): {"norm": torch.ones(len(r.leaves), device=self.device),
                    "finite": torch.ones(len(r.leaves), dtype=torch.bool, device=self.device),
                    **{name: torch.ones(len(r.leaves), device=self.device) for name in r.sum_names()}}
            for r in plan.reductions if not isinstance(r, P.Whole)
        }
        if backend != "foreach":
            with torch.no_grad():
                self._run(extras, stand_in)
        self._c_functions: list[tuple[_Group, int, str, str]] = []
        self._c_threads = 0  # torch's number of threads when the C kernels' thread counts were set
        self._torch_reductions: set[int] = set()  # the C kernels' reductions that torch makes
        self._grads: dict[int, torch.Tensor] = dict(plan.grads)  # this step's gradients, by leaf
        self._groups = self._make_groups(plan)
        self.const = torch.tensor(self._constants or [0.0], dtype=torch.float64, device=self.device)
        self._interp = interpreting()
        if backend == "c":
            self._load_c()

    # -- build --------------------------------------------------------------------------------

    def _check_tensors(self, plan: P.Plan, state: Any) -> None:
        dev = self.device
        floats = _FLOATS if self.backend == "triton" else _STATE_FLOATS
        for i in plan.leaves:
            p, g = plan.params[i], plan.grads[i]
            name = plan.paths[i]
            if not isinstance(p, torch.Tensor) or p.dtype not in floats or g.dtype not in floats:
                got = f"{getattr(p, 'dtype', type(p).__name__)}/{g.dtype}"
                kinds = "16/32-bit floats" if self.backend == "triton" else "floats"
                raise P.Unsupported(f"the param/gradient dtypes at {name!r} are {got} (the kernels take {kinds})")
            if p.device != dev or g.device != dev:
                raise P.Unsupported("every tensor must be on one device")
            if not p.is_contiguous() or not g.is_contiguous():
                raise P.Unsupported(f"the param or gradient at {name!r} is not contiguous")
        for m in plan.members:
            columns = [*m.fields.values(), m.window or []]
            for t in (t for v in columns for t in v if not P.is_packed(t)):
                if t.device != dev or t.dtype not in _STATE_FLOATS or not t.is_contiguous():
                    raise P.Unsupported(f"{m.where}: a state tensor is not a contiguous float tensor on {dev}")
            for t in (part for v in columns for x in v if P.is_packed(x) for part in x):
                if t.device != dev or not t.is_contiguous():
                    raise P.Unsupported(f"{m.where}: a compressed state tensor is not contiguous on {dev}")
        for node in plan.nodes:
            if not (isinstance(node, P.Pack) and node.decl.fmt == "int8" and self.backend != "foreach"):
                continue
            for tile, *_ in self.int8_tiles.values():
                if tile % node.decl.block_size:
                    raise P.Unsupported(
                        f"{node.where}: int8 blocks of {node.decl.block_size} elements do not divide the kernels'"
                        f" tile of {tile} (a quantization block must lie in one tile, whose absmax it reduces):"
                        " block_size must divide it (a power of two up to it)")
        for t in _tree.flatten(state)[0]:
            if isinstance(t, torch.Tensor) and t.device != dev:
                raise P.Unsupported(f"a state tensor is on {t.device}, the params on {dev}")

    def _role(self, node: Any, name: str) -> str:
        return f"N{self._node_index[id(node)]}_{name}"

    def _leaf_roles(self, plan: P.Plan, leaf: int) -> tuple[dict[str, torch.Tensor], tuple[Any, ...]]:
        """The tensors the program of ``leaf`` reads and writes, by role, and its program key."""
        roles = {"P": plan.params[leaf], "G": plan.grads[leaf]}
        if self.output == "updates":
            roles["U"] = self.updates[leaf]
        key: list[Any] = []
        for node in plan.nodes:
            at = self._position.get(id(node))
            inside = leaf in at if at is not None else node.acts_on(leaf)
            if inside and at is not None:
                for name, col in node.columns().items():
                    t = col[at[leaf]]
                    if P.is_packed(t):  # one role per part: "N3_mu__codes", "N3_mu__scales"
                        roles.update({f"{self._role(node, name)}__{part}": x for part, x in zip(t._fields, t)})
                    else:
                        roles[self._role(node, name)] = t
            key.append(inside)
        key.extend((r, t.dtype) for r, t in sorted(roles.items()))
        return roles, tuple(key)

    def _make_groups(self, plan: P.Plan) -> list[_Group]:
        by: dict[tuple[Any, ...], list[tuple[int, dict[str, torch.Tensor]]]] = {}  # key -> (leaf, its roles)
        for leaf in plan.leaves:
            leaf_roles, key = self._leaf_roles(plan, leaf)
            by.setdefault(key, []).append((leaf, leaf_roles))
        groups = []
        dev = self.device
        for entries in by.values():
            leaves = [leaf for leaf, _ in entries]
            role_names = list(entries[0][1])
            roles: dict[str, list[torch.Tensor]] = {r: [e[1][r] for e in entries] for r in role_names}
            numels = [plan.params[leaf].numel() for leaf in leaves]
            n_cols = max(1, len(plan.members))
            pos = [[0] * n_cols for _ in leaves]
            for j, leaf in enumerate(leaves):
                for k, m in enumerate(plan.members):
                    where = self._position[id(m)].get(leaf)
                    if where is not None:
                        pos[j][k] = where
            dtypes = {r: ts[0].dtype for r, ts in roles.items()}
            codes = any(dt in (torch.int8, torch.uint8) for dt in dtypes.values())
            windowed = any(m.window is not None and leaves[0] in self._position.get(id(m), ()) for m in plan.members)
            tile = self.int8_tiles[windowed] if codes else (self.block, self.num_warps, None, 1)
            items = {self.reduce_block: _items(numels, self.reduce_block, dev)}
            items[tile[0]] = _items(numels, tile[0], dev, tile[3])  # (tile[3] > 1: not the reduce block)
            grp = _Group(
                leaves=leaves, roles=roles, dtypes=dtypes,
                numel=torch.tensor(numels, dtype=torch.int64, device=dev),
                pos=torch.tensor(pos, dtype=torch.int64, device=dev),
                items=items, tile=tile, elements=sum(numels),
            )
            grp.idx = {
                id(node): [self._position[id(node)][leaf] if id(node) in self._position else j
                           for j, leaf in enumerate(leaves)]
                for node in plan.nodes if leaves[0] in getattr(node, "leaves", ())
            }
            if self.backend != "foreach":
                for r, ts in roles.items():
                    if r != "G":
                        self._point(grp, r, [t.data_ptr() for t in ts])
                self._point_grads(grp, roles["G"])
                self._codegen(grp)
            groups.append(grp)
        return groups

    def _codegen(self, grp: _Group) -> None:
        plan = self.plan
        leaf = grp.leaves[0]
        for p in range(plan.passes):
            main = p == plan.passes - 1
            if not main and leaf not in plan.reductions[p].leaves:
                continue
            kind = native.CEmitter if self.backend == "c" else G.Emitter
            em = kind(leaf, p, main, grp.dtypes.__getitem__, self._slot, self._col, self._constant, self._role,
                      output=self.output)
            em.walk(plan.root)
            wide = grp.dtypes["G"] == torch.float64 or em.wide_sums  # (float64 gradients: C kernels)
            rsq = torch.float64 if wide else torch.float32
            if isinstance(em, native.CEmitter):  # compiled with the step's other kernels (_load_c)
                if not main:
                    grp.reads_gradient[p] = em.reduced is em.gradient and not em.sum_names
                name = f"group{len(self._c_functions)}_pass{p}"
                block = grp.tile[0] if main else self.reduce_block
                self._c_functions.append((grp, p, name, native.function_source(name, em, plan.passes, block, rsq)))
                grp.kernels[p] = (None, list(em.roles))
            else:
                name = f"step_pass{p}"
                source = G.kernel_source(name, em, plan.passes, grp.tile[3] if main else 1, HOIST_LOADS,
                                         ROUNDING_IN_LINE)
                grp.kernels[p] = (load_kernel(source, name), list(em.roles))
            if not main and not isinstance(plan.reductions[p], P.Whole):
                n = len(grp.leaves) * grp.items[self.reduce_block][3]
                red = plan.reductions[p]
                grp.rsq[p] = torch.zeros(n * (1 + len(red.sum_names())), dtype=rsq, device=self.device)
                grp.rbad[p] = torch.zeros(n, dtype=torch.int32, device=self.device)
                grp.red_index[p] = torch.tensor([self._position[id(red)][leaf] for leaf in grp.leaves], device=self.device)

    def _load_c(self) -> None:
        """Compile the step's C kernels (one library) and give each its argument array: the
        addresses of the tables and buffers it reads, which keep their storage from step to step."""
        source = "\n\n".join([native.HEADER, *(src for _, _, _, src in self._c_functions)])
        try:
            lib = native.load_library(source, cache_dir())
        except RuntimeError as e:
            raise P.Unsupported(str(e)) from None
        for grp, p, name, _ in self._c_functions:
            roles = grp.kernels[p][1]
            main = p == self.plan.passes - 1
            item_leaf, item_start, n_items, chunks = grp.items[grp.tile[0] if main else self.reduce_block]
            addr = [item_leaf, item_start, grp.numel, grp.pos, grp.pos.shape[1], self.const, *self._sc,
                    *(grp.tables[r] for r in roles), grp.rsq.get(p, self.const), grp.rbad.get(p, self.const), chunks,
                    self._threads(grp)]  # (the threads: set again when torch's number changes, _launch)
            args = torch.tensor([n_items, *(a.data_ptr() if isinstance(a, torch.Tensor) else int(a) for a in addr)],
                                dtype=torch.int64)
            grp.kernels[p] = (native.function(lib, name), roles)
            grp.c_args[p] = args
        self._c_threads = torch.get_num_threads()
        self._torch_reductions = {p for p in range(self.plan.passes - 1) if self._reads_gradients(p)}

    def _col(self, node: Any) -> int:
        return self._member_col[id(node)]

    def _slot(self, node: Any, name: str) -> G.Slot:
        try:
            return self._slots[(id(node), name)]
        except KeyError:
            raise P.Unsupported(f"{getattr(node, 'where', 'a node')}: its rule reads a scalar {name!r} that its"
                                " scalar rule does not give") from None

    def _constant(self, x: float) -> int:
        key = float(x).hex()
        if key not in self._const_index:
            self._const_index[key] = len(self._constants)
            self._constants.append(float(x))
        return self._const_index[key]

    # -- other tensors --------------------------------------------------------------------------

    def bind(self, state: Any, p_tree: Any, grads: list[Any], updates: dict[int, torch.Tensor] | None = None) -> None:
        """Point the step at other tensors of the structure, shapes, dtypes and devices it was
        built for: the state ``state``, the params ``p_tree``, the gradients ``grads`` (the leaves
        of the tree, ``None`` where none, the same pattern) and, with ``output="updates"``, the
        update tensors ``updates`` (by leaf). Nothing is compiled again: the address tables are
        rewritten (on CUDA from page-locked memory, in stream order)."""
        plan = P.make_plan(self.decl, state, p_tree, grads)
        mine = self.plan
        if len(plan.nodes) != len(mine.nodes) or plan.leaves != mine.leaves:
            raise P.Unsupported("the transform or its gradients changed structure since the step was built")
        for old, new in zip(mine.nodes, plan.nodes):
            if type(old) is not type(new):
                raise P.Unsupported("the transform changed structure since the step was built")
            old.bind(new)
        mine.params, mine.grads = plan.params, plan.grads
        self.state = state
        self._counts = {id(m): _as_vector(m.counts) for m in mine.members if m.counts}
        if updates is not None:
            self.updates = updates
        self._grads = dict(plan.grads)
        for grp in self._groups:
            grp.roles = {r: self._role_tensors(grp, r) for r in grp.roles}
            if self.backend == "foreach":
                continue
            for r in grp.tables:
                if r != "G":
                    self._point(grp, r, [t.data_ptr() for t in grp.roles[r]])
            self._point_grads(grp, grp.roles["G"])

    def _role_tensors(self, grp: _Group, role: str) -> list[torch.Tensor]:
        """The tensors of role ``role`` of the group's leaves, from the plan as it is bound now."""
        plan = self.plan
        if role == "P":
            return [plan.params[leaf] for leaf in grp.leaves]
        if role == "G":
            return [plan.grads[leaf] for leaf in grp.leaves]
        if role == "U":
            return [self.updates[leaf] for leaf in grp.leaves]
        k, _, name = role[1:].partition("_")
        name, _, part = name.partition("__")
        node = plan.nodes[int(k)]
        col = node.columns()[name]
        at = self._position[id(node)]
        return [getattr(col[at[leaf]], part) if part else col[at[leaf]] for leaf in grp.leaves]

    def release(self) -> None:
        """Drop the references to the tensors the step was last pointed at (:meth:`bind` points
        it again): what a pure ``tx.update`` on the kernels does after each call, so that the
        cached step holds no gradients, params or state of the caller's."""
        for node in self.plan.nodes:
            node.release()
        self.plan.params, self.plan.grads = [], {}
        self.state, self.updates, self._grads, self._counts = None, {}, {}, {}
        for grp in self._groups:
            grp.roles = {r: [] for r in grp.roles}
            grp.grad_key = ()

    def _point(self, grp: _Group, role: str, addresses: list[int]) -> None:
        """Make or rewrite the group's address table of ``role`` (on CUDA from page-locked memory,
        in stream order: no synchronisation), and note whether every address is 16-byte aligned."""
        if all(a % 16 == 0 for a in addresses):
            grp.unaligned.discard(role)
        else:
            grp.unaligned.add(role)
        table = grp.tables.get(role)
        if table is None:
            grp.tables[role] = torch.tensor(addresses, dtype=torch.int64, device=self.device)
            return
        host = torch.tensor(addresses, dtype=torch.int64)
        if table.device.type == "cuda":
            table.copy_(host.pin_memory(), non_blocking=True)
        else:
            table.copy_(host)

    # -- the step -------------------------------------------------------------------------------

    def prepare(self, grads: list[torch.Tensor]) -> None:
        """Point the kernels at this step's gradients (the leaves with a gradient, in tree order):
        when they are other tensors than last time, their address tables are rewritten (a small
        host-to-device copy: call this outside a CUDA graph capture)."""
        by_leaf = self._grads = dict(zip(self.plan.leaves, grads))
        for grp in self._groups:
            if self.backend == "foreach":
                grp.roles["G"] = [by_leaf[leaf] for leaf in grp.leaves]
            else:
                self._point_grads(grp, [by_leaf[leaf] for leaf in grp.leaves])

    def launch_flags(self) -> tuple[bool, ...]:
        """The ``ALIGNED`` argument each group's Triton kernels are launched with now: a CUDA graph
        captured under other flags launches other kernels, and must be captured again."""
        return tuple(self._aligned(grp) for grp in self._groups)

    @staticmethod
    def _aligned(grp: _Group) -> bool:
        return VECTOR_ACCESS and not grp.unaligned

    def _point_grads(self, grp: _Group, grads: list[torch.Tensor]) -> None:
        key = tuple(g.data_ptr() for g in grads)
        if key == grp.grad_key:
            return
        dt = grp.dtypes["G"]
        for g, p in zip(grads, grp.roles["P"]):
            if g.dtype != dt or g.device != self.device or g.shape != p.shape or not g.is_contiguous():
                raise ValueError(
                    f"a gradient of {g.dtype}{list(g.shape)} on {g.device} meets a step built for"
                    f" {dt}{list(p.shape)} on {self.device} (contiguous)"
                )
        self._point(grp, "G", list(key))
        grp.grad_key = key

    def __call__(self, extras: dict[str, torch.Tensor]) -> None:
        """One step, in place (no host synchronisation; capturable into a CUDA graph)."""
        self._run(extras)

    def _run(self, extras: dict[str, torch.Tensor], stand_in: dict[int, dict[str, torch.Tensor]] | None = None) -> None:
        """The step; with ``stand_in`` (reductions to use instead of launching) only the scalar
        layout is recorded: nothing is launched or written."""
        plan = self.plan
        layout = stand_in is not None
        cnt: dict[int, torch.Tensor] = {}
        for m in plan.members:
            if m.counts:
                vec = self._counts[id(m)]
                cnt[id(m)] = torch.stack(m.counts) if vec is None else vec
        cnt.update({id(m): torch.zeros(0, dtype=torch.int64, device=self.device)
                    for m in plan.members if m.counts is not None and not m.counts})
        env = P.StepEnv(plan.rebind(self.decl, self.state), cnt, {}, extras, plan.paths, self._present,
                        self._counts, self.device)
        reduced, flags = env.reduced, env.flags
        scalars: dict[int, Scalars] = {}
        for stage in range(plan.passes):
            values = self._branches(self._nodes_by_stage[stage], lambda node: node.scalars(env))
            if torch.is_grad_enabled() and _records(values, env.writes):  # nothing is written yet
                raise P.Unsupported("autograd records the call (a hyperparameter requires grad)")
            last = stage == plan.passes - 1
            if self.backend == "foreach":  # the plan run with foreach ops, in place
                scalars.update({key: Scalars(v, len(getattr(self._node_of[key], "leaves", ()))) for key, v in values.items()})
                point = None if last else plan.reductions[stage]
                if point is None:
                    for grp in self._groups:
                        F.GroupPass(self, grp, stage, scalars, flags).run()
                elif isinstance(point, P.Whole):
                    for grp in self._groups:
                        if grp.leaves[0] in point.leaves:
                            F.GroupPass(self, grp, stage, scalars, flags).stash_input()
                    point.run(env.decls[id(point)])
                else:
                    reduced[id(point)] = self._foreach_reduce(point, stage, scalars, flags)
                continue
            if layout:
                self._record(stage, values)
            else:
                parts = [values[key][name].reshape(-1) for key, name in self._dyn[stage]]
                if parts:
                    torch.cat(parts, out=self._sc[stage])
            if not last:
                red = plan.reductions[stage]
                if isinstance(red, P.Whole):  # its input into its buffers, then its function on them
                    if not layout:
                        for grp in self._groups:
                            if stage in grp.kernels:
                                self._launch(grp, stage)
                        red.run(env.decls[id(red)])
                elif layout:
                    reduced[id(red)] = stand_in[id(red)]  # type: ignore[index]
                elif stage in self._torch_reductions:  # as eager reduces them: the same numbers
                    reduced[id(red)] = self._reduce_gradients(red)
                else:
                    for grp in self._groups:
                        if stage in grp.kernels:
                            self._launch(grp, stage)
                    reduced[id(red)] = self._finalize(red, stage)
                    if self.shards is not None:
                        reduced[id(red)] = D._dist.complete_reductions(
                            reduced[id(red)], [self.shards[leaf] for leaf in red.leaves]
                        )
            elif not layout:
                for grp in self._groups:
                    self._launch(grp, stage)
        if not layout:
            self._write_back(env.writes, env.bumps, flags)

    def _reads_gradients(self, p: int) -> bool:
        """Whether reduction ``p`` of the C kernels reads the gradients as they come (the clip
        first in the chain): torch's own reductions then make it, as the eager path does."""
        used = [grp for grp in self._groups if p in grp.kernels]
        return bool(used) and all(grp.reads_gradient.get(p, False) for grp in used)

    def _reduce_gradients(self, red: Any) -> dict[str, torch.Tensor]:
        shards = None if self.shards is None else [self.shards[leaf] for leaf in red.leaves]
        return D.reductions(red.reduction_kinds(), [self._grads[leaf] for leaf in red.leaves], self.device, shards)

    def _foreach_reduce(
        self, red: Any, p: int, scalars: dict[int, Scalars], flags: dict[tuple[int, str], torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The reductions of pass ``p`` on the foreach backend: the eager path's own, on the values
        each group reaches at the reduction point, in the order of the node's leaves."""
        at: dict[int, torch.Tensor] = {}
        summed: dict[str, dict[int, torch.Tensor]] = {name: {} for name in red.sum_names()}
        for grp in self._groups:
            if grp.leaves[0] in red.leaves:
                x, sums = F.GroupPass(self, grp, p, scalars, flags).reduce_input()
                at.update(zip(grp.leaves, x))
                for name, ts in sums.items():
                    summed[name].update(zip(grp.leaves, ts))
        shards = None if self.shards is None else [self.shards[leaf] for leaf in red.leaves]
        return D.reductions(red.reduction_kinds(), [at[leaf] for leaf in red.leaves], self.device, shards,
                            {name: [vals[leaf] for leaf in red.leaves] for name, vals in summed.items()})

    def _branches(self, nodes: list[Any], scalars: Any) -> dict[int, dict[str, Any]]:
        """``scalars(node)`` for each node of a stage. On CUDA the nodes' rules run on side streams
        (they are independent), so a captured step holds them as parallel branches: the prologue
        takes the time of its longest rule, not of all its small kernels in a row."""
        if not self._streams or len(nodes) < 2:
            return {id(node): scalars(node) for node in nodes}
        main = torch.cuda.current_stream(self.device)
        out, used = {}, []
        for k, node in enumerate(nodes):
            side = self._streams[k % len(self._streams)]
            if side not in used:
                side.wait_stream(main)
                used.append(side)
            with torch.cuda.stream(side):
                out[id(node)] = scalars(node)
        for side in used:
            main.wait_stream(side)
        return out

    def _record(self, stage: int, values: dict[int, dict[str, Any]]) -> None:
        """Give every scalar of this stage its place: numbers in the constant table, tensors in
        the stage's buffer."""
        off = 0
        for node in self._nodes_by_stage[stage]:
            vals = values[id(node)]
            sc = Scalars(vals, len(node.leaves) if node.per_leaf else 0)
            for name in vals:
                kind = sc.kind(name)
                if kind == "number":
                    slot = G.Slot(kind, "CONST", self._constant(sc.values[name]))
                elif kind == "numbers":
                    first = len(self._constants)
                    self._constants.extend(sc.values[name])
                    slot = G.Slot(kind, "CONST", first)
                else:
                    slot = G.Slot(kind, f"SC{stage}", off)
                    self._dyn[stage].append((id(node), name))
                    off += sc.values[name].numel()
                self._slots[(id(node), name)] = slot
        self._sc.append(torch.zeros(max(1, off), dtype=torch.float64, device=self.device))

    def _write_back(
        self, writes: list[Any], bumps: list[Any], flags: dict[tuple[int, str], torch.Tensor]
    ) -> None:
        def guard(gs: tuple[P.Flag, ...]) -> torch.Tensor:
            out = flags[(id(gs[0].node), gs[0].name)]
            for g in gs[1:]:
                out = out & flags[(id(g.node), g.name)]
            return out

        by_dtype: dict[torch.dtype, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for dst, src, gs in writes:
            if src is dst:
                continue
            src = src.to(dst.dtype).reshape(dst.shape)
            if gs:
                src = torch.where(guard(gs), src, dst)
            d, s = by_dtype.setdefault(dst.dtype, ([], []))
            d.append(dst)
            s.append(src)
        for d, s in by_dtype.values():
            torch._foreach_copy_(d, s)
        plain = [c for counts, vec, gs in bumps if not gs and vec is None for c in counts]
        if plain:
            torch._foreach_add_(plain, 1)
        for counts, vec, gs in bumps:  # + 1 (where the wrapper's flag is set), no host read: capturable
            step = guard(gs).to(torch.int64) if gs else 1
            if vec is not None:
                vec.add_(step)
            elif gs:
                torch._foreach_copy_(counts, (torch.stack(counts) + step).unbind())

    def _launch(self, grp: _Group, p: int) -> None:
        if self.backend == "c":
            if torch.get_num_threads() != self._c_threads:
                self._c_threads = torch.get_num_threads()
                for g in self._groups:
                    for args in g.c_args.values():
                        args[-1] = self._threads(g)
            if p in grp.kernels:
                grp.kernels[p][0](grp.c_args[p].data_ptr())
            return
        main = p == self.plan.passes - 1
        block, warps, regs, per_program = grp.tile if main else (self.reduce_block, 2 * self.num_warps, None, 1)
        item_leaf, item_start, n_items, chunks = grp.items[block]
        if p not in grp.kernels or n_items == 0:
            return
        fn, roles = grp.kernels[p]
        tables = [grp.tables[r] for r in roles]
        rsq = grp.rsq.get(p, self.const)
        rbad = grp.rbad.get(p, self.const)
        extra: dict[str, Any] = {} if self._interp else {"enable_fp_fusion": False}
        if regs is not None and not self._interp:
            extra["maxnreg"] = regs
        fn[(n_items // per_program,)](
            item_leaf, item_start, grp.numel, grp.pos, self.const, *self._sc, *tables, rsq, rbad,
            chunks, NPOS=grp.pos.shape[1], BLOCK=block, ALIGNED=self._aligned(grp),
            num_warps=warps, **extra,
        )

    def _threads(self, grp: _Group) -> int:
        """How many threads share a C kernel's items: torch's (``torch.get_num_threads()``), one per
        ``THREAD_ELEMENTS`` elements of the group at most (a thread costs a few µs to wake)."""
        return max(1, min(torch.get_num_threads(), grp.elements // THREAD_ELEMENTS))

    def _finalize(self, red: Any, p: int) -> dict[str, torch.Tensor]:
        """The per-leaf norms, finite flags and sums of reduction ``p``, in the order of its node's
        leaves (each leaf's blocks summed in a fixed order: deterministic)."""
        names = red.sum_names()
        width = 1 + len(names)
        groups = [grp for grp in self._groups if p in grp.rsq]
        if len(groups) == 1 and groups[0].leaves == red.leaves:  # one group, in order
            grp = groups[0]
            rows = len(grp.leaves)
            chunks = grp.items[self.reduce_block][3]
            sums = grp.rsq[p].view(rows, chunks, width).sum(1)
            bad = grp.rbad[p].view(rows, chunks).sum(1, dtype=torch.int32)
        else:
            n = len(red.leaves)
            wide = any(grp.rsq[p].dtype == torch.float64 for grp in groups)
            sums = torch.zeros(n, width, dtype=torch.float64 if wide else torch.float32, device=self.device)
            bad = torch.zeros(n, dtype=torch.int32, device=self.device)
            for grp in groups:
                rows = len(grp.leaves)
                chunks = grp.items[self.reduce_block][3]
                sums.index_copy_(0, grp.red_index[p], grp.rsq[p].view(rows, chunks, width).sum(1).to(sums.dtype))
                bad.index_copy_(0, grp.red_index[p], grp.rbad[p].view(rows, chunks).sum(1, dtype=torch.int32))
        norm = sums[:, 0].sqrt()
        if all(grp.dtypes["G"] != torch.float64 for grp in groups):  # (a float64 buffer for float64 sums)
            norm = norm.to(torch.float32)
        return {"norm": norm, "finite": bad == 0, **{name: sums[:, j] for j, name in enumerate(names, 1)}}
