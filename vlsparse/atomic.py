"""Atomic file writes: write to a temporary file in the target's directory, then ``os.replace``.

An interrupted write never leaves a partial file under the final name: a killed writer leaves a temporary
``.NAME.xxxxxxxx.tmp`` beside it, which the next run in that directory removes (:func:`run_lock`,
:func:`remove_temporaries`; also export's ``.NAME.tmp-xxxxxxxx/`` directories).

Run directories are locked (:func:`run_lock`): ``fcntl.flock`` on ``DIR/.vlsparse.lock``, held for the whole
command; a second process is refused with one line naming the holder's PID, and the lock of a killed process
(the kernel releases it) is taken over.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

#: the lock file of a run directory
LOCK_NAME = ".vlsparse.lock"
#: what killed writers leave: atomic_write's ``.NAME.<8 of [a-z0-9_]>.tmp`` and export's ``.NAME.tmp-<8>`` directories
_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp|\..+\.tmp-[a-z0-9_]{8}")
_held: dict[str, int] = {}  # lock file (resolved) -> depth, for the locks this process holds
_held_lock = threading.Lock()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """Permissions a plain open()/mkdir() would give under the current umask (0o644 / 0o755 usually)."""
    return (0o777 if directory else 0o666) & ~_umask()


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` to ``path`` atomically; returns ``path``.

    The temporary file is removed if ``write`` raises. Parent directories are created. The file
    gets the usual permissions (umask), not mkstemp's private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def cpu_state(model) -> dict:
    """A copy of ``model.state_dict()`` as detached, contiguous CPU tensors (never aliases the model)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def save_weights(path: str | Path, model, metadata: dict[str, str] | None = None) -> Path:
    """Atomically write ``model``'s state_dict to ``path`` as safetensors (string ``metadata`` in the header)."""
    from safetensors.torch import save_file  # the `train` extra (torch): the torch-free runtime imports this module

    state = cpu_state(model)
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj) -> Path:
    """Atomically write ``obj`` as indented JSON to ``path``."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


class RunLockedError(ValueError):
    """A run directory that another living process holds (the message names its PID)."""


@contextlib.contextmanager
def run_lock(directory: str | Path, name: str = LOCK_NAME, clean: str | None = "",
             remove: bool = False) -> Iterator[Path]:
    """Hold the exclusive lock of ``directory`` (created if missing) for the ``with`` block and yield it.

    The lock is ``fcntl.flock`` on ``directory/name`` (default ``.vlsparse.lock``), which records the holder's PID;
    the kernel releases it when the holder dies, so a killed process's lock file is taken over. A process may
    re-enter a lock it holds. Once the lock is taken, temporary files of killed writers are removed
    (:func:`remove_temporaries` with ``only=clean``; ``clean=None`` removes nothing). ``remove``: delete the lock
    file when done (a lock beside an output, e.g. an export's, leaves nothing behind). A directory this call
    created is removed again when the command leaves it empty (a refused command leaves nothing).

    Under torchrun only rank 0 (the one process that writes) takes the lock; the other ranks of the same
    job (environment ``RANK`` > 0) pass through.

    Raises:
        RunLockedError: another process holds it (one line naming the directory and the holder's PID).
    """
    directory = Path(directory)
    if os.environ.get("RANK", "0") not in ("", "0"):  # a torchrun rank > 0: rank 0 holds the job's lock
        yield directory
        return
    created = [d for d in (directory, *directory.parents) if not d.exists()]  # removed again if left empty
    directory.mkdir(parents=True, exist_ok=True)
    path = str((directory / name).resolve())
    with _held_lock:
        if path in _held:
            _held[path] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield directory
        finally:
            with _held_lock:
                _held[path] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunLockedError(f"{directory}: in use by another vlsparse process (PID {holder}); wait for it "
                                 "to finish, or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        with _held_lock:
            _held[path] = 1
        if clean is not None:
            remove_temporaries(directory, only=clean)
        yield directory
    finally:
        with _held_lock:
            held = _held.pop(path, None)
        if held and (remove or created and os.listdir(directory) == [name]):  # a failed command leaves nothing
            Path(path).unlink(missing_ok=True)  # still held: who opened it meanwhile is refused, later ones make anew
        os.close(fd)  # releases the lock
        for d in created:  # deepest first
            with contextlib.suppress(OSError):
                d.rmdir()  # only when empty


def remove_temporaries(directory: str | Path, only: str = "", depth: int = 2) -> list[Path]:
    """Remove what killed writers left in ``directory`` and ``depth`` levels of subdirectories: temporary files
    of :func:`atomic_write` (``.NAME.xxxxxxxx.tmp``) and export directories (``.NAME.tmp-xxxxxxxx``), those whose
    NAME starts with ``only`` when given. Call it while holding :func:`run_lock`. Returns what was removed."""
    removed: list[Path] = []
    for p in sorted(Path(directory).iterdir()):
        if _TEMPORARY.fullmatch(p.name) and p.name.startswith("." + only):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            removed.append(p)
        elif depth > 0 and not only and p.is_dir() and not p.is_symlink():
            removed += remove_temporaries(p, only, depth - 1)
    return removed


def locked(param: str, sibling: bool = False):
    """Decorator: the call holds :func:`run_lock` on its argument ``param`` (a directory) from start to end.

    ``sibling=True`` (an output directory that must not exist yet, e.g. an export): the lock is
    ``PARENT/.NAME.lock`` beside it, and only ``.NAME.tmp-*`` leftovers are removed.

    Raises (from the call): RunLockedError when another process holds the lock.
    """
    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            path = Path(sig.bind_partial(*args, **kwargs).arguments[param])
            lock = (run_lock(path.parent, name=f".{path.name}.lock", clean=f"{path.name}.tmp-", remove=True)
                    if sibling else run_lock(path))
            with lock:
                return fn(*args, **kwargs)
        return call
    return wrap
