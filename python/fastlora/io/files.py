"""The files under both adapter formats: crash-safe directory writes, reads that see one save,
and safetensors bytes.

Every write builds the whole directory next to the target and swaps it in atomically (Linux
``renameat2(RENAME_EXCHANGE)``), so a crash at any point leaves the previous adapter intact and
loadable; it replaces the adapter files of every format, so no earlier save's file outlives it.
Every load reads all its files from one save (one handle on the directory, files read whole).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

logger = logging.getLogger("fastlora")

WEIGHTS = "adapter_model.safetensors"
CONFIG = "fastlora_config.json"
PEFT_CONFIG = "adapter_config.json"
HF_WEIGHTS = "fastlora_adapter.safetensors"  # fastlora's format in a save_pretrained directory
RESUME_WEIGHTS = "model.safetensors"  # transformers' SAFE_WEIGHTS_NAME, what Trainer resumes from
# Marks a RESUME_WEIGHTS file as written by a fastlora save (a model.safetensors without it is the user's).
RESUME_MARK = ("written_by", "fastlora.save_pretrained")
# The adapter files of every format (PEFT's legacy .bin included): each save replaces all of them, so
# that no file of an earlier save outlives a later one and shadows it (see write_directory).
ADAPTER_FILES = (WEIGHTS, CONFIG, PEFT_CONFIG, HF_WEIGHTS, "adapter_model.bin")


class AdapterFormatError(ValueError):
    """An adapter directory is missing, corrupted, or does not fit the model."""


# ---- atomic directory writes --------------------------------------------------------------------


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> None:
    """Atomically swaps two directories (Linux renameat2 RENAME_EXCHANGE); elsewhere two renames
    with a short window in which ``b`` is missing (its old content stays in a sibling)."""
    libc_name = ctypes.util.find_library("c")
    renameat2 = getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None) if libc_name else None
    if renameat2 is not None:
        at_fdcwd, rename_exchange = -100, 2
        if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
            return
    aside = Path(tempfile.mkdtemp(prefix=f".{b.name}.old-", dir=b.parent))
    aside.rmdir()
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)


def _locked(fd: int, blocking: bool = True) -> bool:
    """Takes an exclusive flock on ``fd``; False if another process holds it (non-blocking), or
    where flock does not exist (then nothing is ever taken for stale)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return blocking
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _remove_stale(parent: Path, prefix: str) -> None:
    """Removes temporary directories ``prefix*`` whose writer died (a live writer holds a lock on
    its own; the caller holds the parent's lock, under which writers lock theirs)."""
    for entry in parent.glob(f"{prefix}*"):
        if entry.is_symlink() or not entry.is_dir():
            continue
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            if _locked(fd, blocking=False):
                shutil.rmtree(entry, ignore_errors=True)
                logger.info("fastlora: removed %s, left by an interrupted save", entry)
        finally:
            os.close(fd)


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)  # no data copied: a Trainer folder may hold gigabytes of checkpoints
    except OSError:
        shutil.copy2(src, dst)


def _is_fastlora_resume_file(path: Path) -> bool:
    """Whether ``path`` (a model.safetensors) was written by a fastlora save (its header holds RESUME_MARK)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size)) if 0 < size <= 100_000_000 else {}
    except (OSError, ValueError):
        return False
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(metadata, dict) and metadata.get(RESUME_MARK[0]) == RESUME_MARK[1]


def _carried_over(entry: Path) -> bool:
    """Whether a save keeps ``entry`` of the folder it replaces: everything but the adapter files of
    every format (and a model.safetensors a fastlora save wrote)."""
    if entry.name in ADAPTER_FILES:
        return False
    return not (entry.name == RESUME_WEIGHTS and entry.is_file() and _is_fastlora_resume_file(entry))


def write_directory(target: Path, write: Callable[[Path], None]) -> None:
    """Writes a directory's files with ``write(tmpdir)`` and puts them in place atomically.

    The save owns the adapter files: those of an earlier save that this one does not write
    (another format's) are gone afterwards, so every reader gets this save or a clear error; the
    user's other files and folders (a README, a Trainer checkpoint's optimizer state) are kept,
    hard-linked into the new directory. A symlink is written through (its target directory is
    replaced); temporary directories left by killed saves of the same target are cleaned up. Two
    processes may create the same new directory at once: the later one swaps its own in."""
    target = Path(target)
    if target.is_symlink():
        target = target.resolve()
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp-"
    parent_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:  # under the parent's lock: a new directory is locked before anyone may look for stale ones
        _locked(parent_fd)
        _remove_stale(target.parent, prefix)
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        tmp_fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        _locked(tmp_fd)
    finally:
        os.close(parent_fd)  # closing releases the lock
    try:
        write(tmp)
        for f in tmp.iterdir():
            _fsync(f)
        written = {f.name for f in tmp.iterdir()}
        while True:
            if target.exists():
                for entry in target.iterdir():
                    if entry.name in written or not _carried_over(entry):
                        continue
                    if entry.is_symlink():
                        os.symlink(os.readlink(entry), tmp / entry.name)
                    elif entry.is_dir():
                        shutil.copytree(entry, tmp / entry.name, symlinks=True, copy_function=_link_or_copy)
                    else:
                        _link_or_copy(entry, tmp / entry.name)
                _fsync(tmp)
                _exchange(tmp, target)
                # Files another process wrote into the folder meanwhile (in DDP, Trainer's other ranks
                # write their rng_state_<rank>.pth while rank 0 saves the model) move on too.
                for entry in tmp.iterdir():
                    if entry.name not in written and _carried_over(entry) and not os.path.lexists(target / entry.name):
                        os.rename(entry, target / entry.name)
                break
            _fsync(tmp)
            try:
                os.rename(tmp, target)
                break
            except OSError as exc:  # another save created the target meanwhile: swap with it instead
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        _fsync(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the old content after an exchange
        os.close(tmp_fd)


def save_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


# ---- consistent reads ----------------------------------------------------------------------------


class Generation:
    """One directory as it was when opened: files are read relative to a handle on it, so a save
    that swaps a new directory in meanwhile is not seen half (the old files stay readable once
    open). ``stale()`` says whether a file was missing because the directory was replaced (and
    the old one emptied) meanwhile: then the read must start over."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise AdapterFormatError(f"{path} is missing or not an adapter directory ({exc.strerror})") from None
        self.missing = False

    def read(self, name: str) -> bytes | None:
        """The whole file ``name``, or None if it does not exist; AdapterFormatError unless it is a
        regular file (a FIFO would block)."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK, dir_fd=self.fd)
        except FileNotFoundError:
            self.missing = True
            return None
        except OSError as exc:
            raise AdapterFormatError(f"{self.path / name} is unreadable ({exc.strerror})") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise AdapterFormatError(f"{self.path / name} is not a regular file")
            with os.fdopen(os.dup(fd), "rb") as f:
                return f.read()
        finally:
            os.close(fd)

    def stale(self) -> bool:
        if not self.missing:
            return False
        try:
            now, mine = os.stat(self.path), os.fstat(self.fd)
        except OSError:
            return True
        return (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino)

    def close(self) -> None:
        os.close(self.fd)


READ_ATTEMPTS = 20


def read_consistently(path: Path, read: Callable[[Generation], Any]) -> Any:
    """``read(generation)`` on one generation of the directory ``path``, started over while a save
    replaced it in the middle of the read."""
    for _ in range(READ_ATTEMPTS):
        generation = Generation(path)
        try:
            try:
                result = read(generation)
            except AdapterFormatError:
                if generation.stale():
                    continue
                raise
            if not generation.stale():
                return result
        finally:
            generation.close()
    raise AdapterFormatError(f"{path} was replaced {READ_ATTEMPTS} times while it was being read; try again")


def parse_safetensors(data: bytes, where: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file's bytes."""
    from safetensors.torch import load

    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + size])
        metadata = header.get("__metadata__") or {}
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error types for corrupted headers
        raise AdapterFormatError(f"{where} is not a readable safetensors file ({exc})") from exc
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFormatError(f"{where}: its metadata is not a mapping of strings")
    return tensors, metadata
