"""A byte-level language model on a corpus every machine has: the Python standard library's own
source files. Does an optimizer that speeds up grokking hurt ordinary training?

Corpus: the ``.py`` files directly in the standard library's folder (``sysconfig``'s ``stdlib``
path; no sub-packages), read as bytes (a vocabulary of 256). A file goes to the validation split
when the SHA-256 of its name, read as a number, is 0 mod 10 (about one file in ten), else to
training: the rule is the same on every machine, whatever order the files are listed in. The
files of a split, in name order, are concatenated and cut into non-overlapping windows of
``context + 1`` bytes; a window gives the inputs (its first ``context`` bytes) and the targets
(its last ``context``). Validation uses ``val_windows`` windows evenly spaced over its split.
The corpus is the running Python's: record its version beside a result (:func:`corpus_info`).

Model (:class:`GPT`): a small pre-LayerNorm causal transformer, token and position embeddings of
width 128, 2 blocks of 4 heads, MLP 128→512→128 with GELU, a final LayerNorm and an untied head
``Linear(128, 256, bias=False)``; torch's default inits under ``torch.manual_seed(seed)``.
The loss is the mean next-byte cross-entropy over every position of a batch.

Example::

    setup = lm_setup(seed=0)
    logits = setup.model(setup.data.train_inputs[:2])     # (2, 128, 256)
"""

from __future__ import annotations

import functools
import hashlib
import sys
import sysconfig
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from grokxform.experiments.data import TaskData, TaskSetup
from grokxform.experiments.modular import CausalSelfAttention, Decoder

CONTEXT = 128
"""Bytes of context of a training window."""
VAL_WINDOWS = 256
"""Validation windows (of ``CONTEXT`` targets each)."""


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The ``.py`` files directly in ``root`` (default: this Python's standard library), by name."""
    folder = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in folder.glob("*.py") if p.is_file())
    if not files:
        raise FileNotFoundError(f"lm: no .py files in {folder}")
    return files


def is_validation(name: str) -> bool:
    """The split of a file by its name: validation when ``sha256(name) ≡ 0 (mod 10)``."""
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10 == 0


def _windows(stream: bytes, context: int) -> torch.Tensor:
    n = len(stream) // (context + 1)
    flat = torch.frombuffer(bytearray(stream[: n * (context + 1)]), dtype=torch.uint8)
    return flat.view(n, context + 1).to(torch.int64)


@functools.lru_cache(maxsize=4)
def byte_corpus(root: str | None = None, context: int = CONTEXT, val_windows: int = VAL_WINDOWS) -> TaskData:
    """The split of the module docstring as :class:`TaskData`: inputs and targets ``(N, context)``
    of int64 bytes (cached: the same object for the same arguments)."""
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ValueError(f"byte_corpus: context must be an int >= 1, got {context!r}")
    files = stdlib_files(root)
    train = b"".join(p.read_bytes() for p in files if not is_validation(p.name))
    val = b"".join(p.read_bytes() for p in files if is_validation(p.name))
    tr, va = _windows(train, context), _windows(val, context)
    if len(tr) == 0 or len(va) == 0:
        raise ValueError(f"byte_corpus: too little text for windows of {context + 1} bytes in both splits")
    va = va[torch.linspace(0, len(va) - 1, min(val_windows, len(va))).round().long()]
    return TaskData(tr[:, :-1], tr[:, 1:], va[:, :-1], va[:, 1:])


def corpus_info(root: str | None = None) -> dict[str, object]:
    """What a result should record about the corpus: Python's version, the file counts and the
    bytes of each split."""
    files = stdlib_files(root)
    val = [p for p in files if is_validation(p.name)]
    return {"python": sys.version.split()[0], "files": len(files), "val_files": len(val),
            "train_bytes": sum(p.stat().st_size for p in files if not is_validation(p.name)),
            "val_bytes": sum(p.stat().st_size for p in val)}


class GPTBlock(nn.Module):
    """``x = x + Attn(LN1(x)); x = x + MLP(LN2(x))``, ``MLP = Linear(D, 4D)·GELU·Linear(4D, D)``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, num_heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(Decoder):
    """A byte-level causal transformer: ``(B, T)`` bytes to ``(B, T, 256)`` next-byte logits (the
    paper's :class:`~grokxform.experiments.modular.Decoder` with :class:`GPTBlock` layers, every
    position's logits)."""

    def __init__(self, dim: int = 128, num_layers: int = 2, num_heads: int = 4, context: int = CONTEXT,
                 vocab: int = 256) -> None:
        super().__init__(dim, num_layers, num_heads, num_tokens=vocab, seq_len=context, block=GPTBlock)

    def forward(self, tokens: torch.Tensor, all_positions: bool = True) -> torch.Tensor:
        return super().forward(tokens, all_positions)


def next_byte_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy over every position: logits ``(B, T, V)``, targets ``(B, T)``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def lm_setup(seed: int = 0, root: str | None = None, context: int = CONTEXT) -> TaskSetup:
    """The model of one seed, the corpus (the same for every seed) and the seed's shuffle stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = GPT(context=context)
    return TaskSetup(model, byte_corpus(root, context), torch.Generator().manual_seed(int(seed)))
