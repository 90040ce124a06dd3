"""The folder of generated kernel modules (:func:`grokxform.engine.step.cache_dir`) and their
loading (:func:`~grokxform.engine.step.load_kernel`): the folder is private to this user, and what
runs is the source this process generated, whatever a cached file holds.

On a machine without CUDA the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``,
set here before Triton is imported), as in tests/test_engine.py.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import re
import stat
import tempfile
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import grokxform as gx  # noqa: E402
from grokxform.engine import step  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
posix_only = pytest.mark.skipif(not hasattr(os, "getuid"), reason="folder owners and modes are POSIX")

SOURCE = '''import triton
import triton.language as tl


@triton.jit
def add_one(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1.0, mask=mask)
'''


@pytest.fixture(autouse=True)
def _fresh_modules(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No kernel module loaded yet in this process, and the cache in this test's folder."""
    monkeypatch.setattr(step, "_MODULES", {})
    monkeypatch.setenv("GROKXFORM_CACHE_DIR", str(tmp_path / "kernels"))


def _module_path(folder: Path, source: str) -> Path:
    return folder / f"grokxform_kernel_{hashlib.sha256(source.encode()).hexdigest()[:20]}.py"


def _run_add_one() -> torch.Tensor:
    x = torch.arange(5.0, device=DEVICE)
    step.load_kernel(SOURCE, "add_one")[(1,)](x, x.numel(), BLOCK=8)
    return x.cpu()


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _train() -> dict[str, torch.Tensor]:
    """Four steps of grokfast_ma on the engine's kernels (built, so loaded, by this optimizer)."""
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(4, 3).to(DEVICE)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    opt = gx.Optimizer(model.named_parameters(), gx.grokfast_ma, fused="triton", lr=1e-2, window_size=3)
    for _ in range(4):
        model(torch.randn(5, 4, generator=gen).to(DEVICE)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    assert opt.engines == ["triton"]
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters()}


# -- what runs is the generated source ----------------------------------------------------------


def test_a_line_planted_in_cached_kernel_modules_does_not_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The optimizer's kernels are written to the folder; a line appended to each cached module
    (it would write a marker file) does not run when a new optimizer loads them: each file is
    rewritten with the generated source first, and the kernels compute what they did."""
    first = _train()
    folder = tmp_path / "kernels"
    generated = {f: f.read_bytes() for f in folder.glob("grokxform_kernel_*.py")}
    assert generated
    marker = tmp_path / "planted"
    for f in generated:
        f.write_text(f.read_text() + f"\nimport pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    monkeypatch.setattr(step, "_MODULES", {})
    second = _train()
    assert not marker.exists()
    assert {f: f.read_bytes() for f in generated} == generated
    for n in first:
        assert torch.equal(first[n], second[n]), n


def test_a_kernel_module_cut_short_is_rewritten(tmp_path: Path) -> None:
    """A cached file holding half the source (a process killed while writing it) is replaced by
    the whole source, and the kernel runs."""
    folder = tmp_path / "kernels"
    folder.mkdir(mode=0o700)
    path = _module_path(folder, SOURCE)
    path.write_text(SOURCE[: len(SOURCE) // 2])
    assert torch.equal(_run_add_one(), torch.arange(5.0) + 1)
    assert path.read_text() == SOURCE
    assert not list(folder.glob("*.tmp"))


@posix_only
def test_the_folder_and_the_kernel_files_are_this_users_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Created under a umask of 0 (which would leave them writable by all): the folder has mode
    0o700 and a module file no permission for the group or others."""
    folder = tmp_path / "new" / "kernels"
    monkeypatch.setenv("GROKXFORM_CACHE_DIR", str(folder))
    umask = os.umask(0)
    try:
        assert step.cache_dir() == str(folder)
        _run_add_one()
    finally:
        os.umask(umask)
    assert _mode(folder) == 0o700
    assert _mode(_module_path(folder, SOURCE)) & 0o077 == 0


# -- GROKXFORM_CACHE_DIR --------------------------------------------------------------------------


def _symlink_to_private(path: Path) -> None:
    target = path.parent / "private"
    target.mkdir(mode=0o700)
    path.symlink_to(target, target_is_directory=True)


UNSAFE = {
    "world-writable": (lambda p: (p.mkdir(), p.chmod(0o777)), "other users may write to it"),
    "group-writable": (lambda p: (p.mkdir(), p.chmod(0o770)), "other users may write to it"),
    "symlink": (_symlink_to_private, "it is a symbolic link"),
    "file": (lambda p: p.write_text(""), "it is not a folder"),
}


@posix_only
@pytest.mark.parametrize("kind", sorted(UNSAFE))
def test_an_unsafe_cache_dir_setting_is_refused(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make, why = UNSAFE[kind]
    folder = tmp_path / "shared"
    make(folder)
    monkeypatch.setenv("GROKXFORM_CACHE_DIR", str(folder))
    with pytest.raises(PermissionError, match=re.escape(f"GROKXFORM_CACHE_DIR={str(folder)!r}")) as err:
        step.load_kernel(SOURCE, "add_one")
    assert why in str(err.value) and f"chmod 700 {folder}" in str(err.value)
    assert not list(tmp_path.rglob("grokxform_kernel_*"))


@posix_only
def test_a_cache_dir_of_another_user_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The folder is this test's (mode 0o700); seen by a process of another user id, it is not
    that user's."""
    folder = tmp_path / "theirs"
    folder.mkdir(mode=0o700)
    monkeypatch.setenv("GROKXFORM_CACHE_DIR", str(folder))
    uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: uid + 1)
    with pytest.raises(PermissionError, match=f"owned by another user \\(uid {uid}\\)"):
        step.cache_dir()


@posix_only
def test_the_folder_is_checked_again_when_it_or_the_setting_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("GROKXFORM_CACHE_DIR", str(a))
    assert step.cache_dir() == str(a)
    monkeypatch.setenv("GROKXFORM_CACHE_DIR", str(b))
    assert step.cache_dir() == str(b)
    b.chmod(0o777)
    with pytest.raises(PermissionError, match="other users may write to it"):
        step.cache_dir()
    monkeypatch.setenv("GROKXFORM_CACHE_DIR", str(a))
    assert step.cache_dir() == str(a)


# -- the default folders ---------------------------------------------------------------------------


def _defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """No GROKXFORM_CACHE_DIR; the user's cache and the temporary folder in this test's folder."""
    monkeypatch.delenv("GROKXFORM_CACHE_DIR")
    xdg, tmp = tmp_path / "xdg", tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return xdg, tmp


@posix_only
def test_the_users_cache_folder_is_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    xdg, _ = _defaults(tmp_path, monkeypatch)
    assert step.cache_dir() == str(xdg / "grokxform" / "kernels")
    assert _mode(xdg / "grokxform" / "kernels") == 0o700


@posix_only
def test_the_temporary_fallback_is_a_folder_of_this_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's cache cannot be created (its parent is a file): the kernels go to
    ``grokxform-kernels-<uid>`` in the temporary folder, created with mode 0o700."""
    xdg, tmp = _defaults(tmp_path, monkeypatch)
    xdg.write_text("")
    folder = tmp / f"grokxform-kernels-{os.getuid()}"
    assert step.cache_dir() == str(folder)
    assert _mode(folder) == 0o700
    assert torch.equal(_run_add_one(), torch.arange(5.0) + 1)
    assert _module_path(folder, SOURCE).exists()


@posix_only
@pytest.mark.parametrize("owner", ["world-writable", "another user's"])
def test_unsafe_default_folders_are_skipped(owner: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's cache folder and the temporary folders (shared and per-user) exist, writable by
    all or (seen from another user id) not this user's: none is used; a new folder of this process,
    mode 0o700, in the temporary folder is."""
    xdg, tmp = _defaults(tmp_path, monkeypatch)
    if owner == "another user's":
        uid = os.getuid()
        monkeypatch.setattr(os, "getuid", lambda: uid + 1)
    unsafe = [xdg / "grokxform" / "kernels", tmp / "grokxform-kernels", tmp / f"grokxform-kernels-{os.getuid()}"]
    for folder in unsafe:
        folder.mkdir(parents=True, mode=0o700)
        if owner == "world-writable":
            folder.chmod(0o777)
    got = Path(step.cache_dir())
    assert got not in unsafe
    assert got.parent == tmp and got.name.startswith("grokxform-kernels-")
    assert _mode(got) == 0o700


def test_without_user_ids_folders_are_not_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the OS has no user ids (Windows: folder mode bits say nothing of who may write) the
    folders are used as they are, and the temporary fallback is named after the user."""
    xdg, tmp = _defaults(tmp_path, monkeypatch)
    xdg.write_text("")
    monkeypatch.delattr(os, "getuid", raising=False)
    monkeypatch.setattr(getpass, "getuser", lambda: "someone")
    assert step.cache_dir() == str(tmp / "grokxform-kernels-someone")
