"""Atomic file writes: write to a temporary file in the target's directory, then ``os.replace``.

An interrupted write never leaves a partial file under the final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


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
