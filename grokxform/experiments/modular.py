"""The Grokfast paper's modular-arithmetic task (Lee et al. 2024, ``main.py``): ``x·y mod 97``,
and the same task with the other operations of :data:`TASKS` (``add``, ``sub``, ``div``), to test
findings beyond the one task they were tuned on.

Data: every equation ``x ∘ y = (x·y) mod p`` with ``x ∈ [0, p−1]`` and ``y ∈ [1, p−1]`` (p = 97:
97·96 = 9312 equations), split at random 50/50 by a seed (4656 train / 4656 val). An equation is
the token sequence ``(x, op, y, eq)`` with ``eq = p`` (97) and ``op = p+1`` (98), a vocabulary of
p+2 = 99 tokens; the target is the result ``(x·y) mod p``, read from the last position only.
Other tasks change only the result: ``x+y``, ``x−y`` or ``x·y⁻¹`` (y's inverse mod p) instead.

Model: a causal decoder, token ``Embedding(99, 128)`` + position ``Embedding(5, 128)``, 2 blocks
of width 128 with 4 heads, each block ``x = LN1(x); x = x + Attn(x); x = x + MLP(LN2(x))`` (the
first LayerNorm replaces the residual stream, as in the paper's code), MLP 128→512→128 with GELU,
a final LayerNorm and ``Linear(128, 99, bias=False)``: 422,784 parameters in 29 tensors.

Example::

    data = modular_data(seed=0)
    model = make_decoder(seed=0)
    logits = model(data.train_inputs[:8])          # (8, 99): the answer's logits
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from grokxform.experiments.data import TaskData

P = 97
"""The paper's modulus."""
EQ_TOKEN = P
"""Token of ``=`` (97)."""
OP_TOKEN = P + 1
"""Token of the operation ``∘`` (98)."""
VOCAB_SIZE = P + 2
"""Vocabulary: the residues 0..96, ``=`` and ``∘`` (99)."""
SEQ_LEN = 5
"""Length of the position table (the paper's ``seq_len=5``; inputs use the first 4 positions)."""
TASKS = ("mul", "add", "sub", "div")
"""The operations ``x∘y mod p``: ``x·y`` (the paper's), ``x+y``, ``x−y``, ``x·y⁻¹``."""
TASK_SYMBOLS = {"mul": "·", "add": "+", "sub": "−", "div": "/"}
"""How each task's operation is written in titles (``x·y mod 97``)."""


def task_name(task: str = "mul", p: int = P) -> str:
    """The task as a reader writes it: ``"x·y mod 97"``."""
    return f"x{TASK_SYMBOLS[check_task(task)]}y mod {p}"


def check_task(task: str) -> str:
    """``task`` if it is one of :data:`TASKS`, else a ``ValueError`` naming the choices."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return task


def equations(p: int = P, task: str = "mul") -> tuple[torch.Tensor, torch.Tensor]:
    """All equations of ``x∘y mod p``: tokens ``(N, 4)`` = ``(x, op, y, eq)`` and results ``(N,)``.

    ``x`` runs over ``[0, p−1]`` and ``y`` over ``[1, p−1]``, x-major (``N = p·(p−1)``), for
    every task (so ``div``'s ``y⁻¹ = y^(p−2) mod p`` exists when p is prime).
    """
    if isinstance(p, bool) or not isinstance(p, int) or p < 2:
        raise ValueError(f"equations: p must be an int >= 2, got {p!r}")
    check_task(task)
    x, y = torch.cartesian_prod(torch.arange(p), torch.arange(1, p)).T
    tokens = torch.stack([x, torch.full_like(x, p + 1), y, torch.full_like(x, p)], dim=1)
    if task == "mul":
        result = x * y
    elif task == "add":
        result = x + y
    elif task == "sub":
        result = x - y
    else:
        inverse = torch.tensor([pow(int(v), p - 2, p) for v in range(p)])
        result = x * inverse[y]
    return tokens, result % p


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with ``nn.MultiheadAttention``'s parameters and init.

    ``[q, k, v] = x·W_inᵀ + b_in``; per head ``softmax(q·kᵀ/√d_h + M)·v`` with ``M`` the causal
    mask (−∞ above the diagonal); heads concatenated, then ``out_proj``. Parameters:
    ``in_proj_weight`` (3D, D) Xavier-uniform, ``in_proj_bias`` zeros, ``out_proj`` a Linear with
    zero bias, as ``nn.MultiheadAttention`` initialises them. Runs on
    plain attention maths (vmap-friendly); input ``(B, T, D)``.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"CausalSelfAttention: dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        # Written out rather than F.scaled_dot_product_attention: the fused attention kernels have
        # no torch.func.vmap batching rule (a vmapped sweep would loop over members), and with
        # four tokens the plain maths is as fast.
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.num_heads)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        a = scores.masked_fill(causal, float("-inf")).softmax(dim=-1) @ v
        return self.out_proj(a.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """``x = LN1(x); x = x + Attn(x); x = x + MLP(LN2(x))`` with ``MLP = Linear(D, 4D)·GELU·Linear(4D, D)``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, num_heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(x)
        x = x + self.attn(x)
        return x + self.mlp(self.ln_2(x))


class Decoder(nn.Module):
    """The paper's causal decoder; ``forward(tokens)`` maps ``(B, T)`` tokens to the logits of the
    last position ``(B, V)``, or of every position ``(B, T, V)`` with ``all_positions=True``.
    ``block(dim, num_heads)`` makes each layer (default: the paper's :class:`Block`)."""

    def __init__(
        self,
        dim: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        num_tokens: int = VOCAB_SIZE,
        seq_len: int = SEQ_LEN,
        *,
        block: Callable[[int, int], nn.Module] = Block,
    ) -> None:
        super().__init__()
        self.token_embeddings = nn.Embedding(num_tokens, dim)
        self.position_embeddings = nn.Embedding(seq_len, dim)
        self.layers = nn.ModuleList([block(dim, num_heads) for _ in range(num_layers)])
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_tokens, bias=False)

    def forward(self, tokens: torch.Tensor, all_positions: bool = False) -> torch.Tensor:
        name = type(self).__name__
        if tokens.dim() != 2:
            raise ValueError(f"{name}: tokens must have shape (batch, seq), got {tuple(tokens.shape)}")
        if tokens.shape[1] > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"{name}: sequences of {tokens.shape[1]} tokens exceed the position table"
                f" ({self.position_embeddings.num_embeddings})"
            )
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.token_embeddings(tokens) + self.position_embeddings(positions)
        for layer in self.layers:
            h = layer(h)
        if not all_positions:
            h = h[:, -1]
        return self.head(self.ln_f(h))


class ModularSetup(NamedTuple):
    """What :func:`paper_setup` draws from one seed: the model, the split, and the generator that
    shuffles the training set each epoch."""

    model: Decoder
    data: TaskData
    generator: torch.Generator


def paper_setup(
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    train_fraction: float = 0.5,
    task: str = "mul",
) -> ModularSetup:
    """The model, split and shuffle stream of the paper's ``main.py --seed seed``, in its order
    (``task`` picks the operation of :data:`TASKS`; the model and split are the same for all).

    One RNG stream, as in the paper's script: ``torch.manual_seed(seed)``, the decoder's default
    initialisation, ``randperm(N)`` for the split (first ``floor(N·train_fraction)`` train, the
    rest validate), then the per-epoch shuffles, drawn from the returned ``generator``. All on
    the CPU; the caller's global RNG state is left as it was.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"paper_setup: train_fraction must be in (0, 1), got {train_fraction!r}")
    tokens, results = equations(P, task)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = Decoder()
        perm = torch.randperm(len(results))
        generator = torch.Generator()
        generator.set_state(torch.get_rng_state())
    n_train = int(len(results) * train_fraction)
    tr, va = perm[:n_train], perm[n_train:]
    data = TaskData(tokens[tr], results[tr], tokens[va], results[va]).to(device)
    return ModularSetup(model.to(device=device, dtype=dtype), data, generator)


def modular_data(seed: int = 0, train_fraction: float = 0.5, task: str = "mul") -> TaskData:
    """The random split of :func:`paper_setup` (4656 train / 4656 val for the paper's 50/50)."""
    return paper_setup(seed, train_fraction=train_fraction, task=task).data


def make_decoder(seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Decoder:
    """The decoder of :func:`paper_setup` (torch's default inits under ``torch.manual_seed(seed)``)."""
    return paper_setup(seed, device, dtype).model


def num_parameters(model: nn.Module) -> tuple[int, int]:
    """``(parameters, tensors)`` of ``model``."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), len(params)


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """``ceil(n_train / batch_size)``: the last, smaller batch is kept (4656/512 → 10 steps)."""
    return math.ceil(n_train / batch_size)
