"""Old import paths that still work for one release, with a DeprecationWarning naming the new one."""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable


def moved(module: str, new_homes: dict[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``module`` that forwards each name of ``new_homes``
    (name -> the module it moved to) there, warning once per access with a DeprecationWarning.

    Raises:
        AttributeError: for any other name (as a plain module would).
    """

    def __getattr__(name: str) -> Any:
        if name not in new_homes:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warnings.warn(f"{module}.{name} moved to {new_homes[name]}.{name}; the old path will be removed "
                      "in the next release", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(new_homes[name]), name)

    return __getattr__
