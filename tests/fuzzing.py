"""Property-based fuzzing helpers (hypothesis) for the loaders of files a user may hand over.

Profiles: ``ci`` (the default test run: 120 examples per test, derandomized so that a run is reproducible, about
a minute for every fuzz test together on 2 cores) and ``long`` (``HYPOTHESIS_PROFILE=long``, used by
``benchmarks/test_fuzz_long.py``: 1,000 random examples per test). No example database is written.

A fuzzed loader may return a result or raise the project's own errors -- ValueError (and its subclasses, e.g.
BundleError) or FileNotFoundError -- whose one-line message names the file; any other exception fails the test.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

_COMMON = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow,
                                                                     HealthCheck.function_scoped_fixture])
settings.register_profile("ci", max_examples=120, derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=1000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

#: any JSON value, NaN and infinities and huge integers included
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=10**30) | st.floats() |
    st.text(max_size=12) | st.sampled_from(["", "..", "../x", "/etc/hostname", "a\\b", "\x00", "NaN", "-1"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@st.composite
def mutated(draw, doc: Any, max_edits: int = 3) -> Any:
    """A copy of the JSON document ``doc`` with 1..max_edits edits: a value somewhere replaced by any JSON value,
    or deleted from its object or list, or a list entry duplicated."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, max_edits))):
        parent, key, node = None, None, doc
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            parent, key = node, draw(st.sampled_from(list(node) if isinstance(node, dict) else range(len(node))))
            node = node[key]
        action = draw(st.sampled_from(["replace", "delete", "duplicate"]))
        if parent is None:
            doc = draw(json_values)
        elif action == "replace":
            parent[key] = draw(json_values)
        elif action == "delete":
            del parent[key]
        elif isinstance(parent, list):
            parent.append(copy.deepcopy(parent[key]))
    return doc


@st.composite
def damaged_bytes(draw, data: bytes) -> bytes:
    """``data`` truncated, with bytes overwritten, or replaced by arbitrary bytes."""
    how = draw(st.sampled_from(["truncate", "overwrite", "arbitrary"]))
    if how == "arbitrary" or not data:
        return draw(st.binary(max_size=300))
    at = draw(st.integers(0, len(data) - 1))
    if how == "truncate":
        return data[:at]
    return data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at + 8:]


def json_file_contents(doc: Any, lines: bool = False) -> st.SearchStrategy[bytes]:
    """Bytes of a damaged version of ``doc``: structure-aware (a mutated document, written as JSON or, with
    ``lines``, one JSON value a line when it is a list) or raw (damaged bytes of the valid file)."""
    def dump(d: Any) -> bytes:
        if lines and isinstance(d, list):
            return "".join(json.dumps(x) + "\n" for x in d).encode()
        return json.dumps(d).encode()

    return mutated(doc).map(dump) | damaged_bytes(dump(doc))


def own_errors_only(call: Callable[[], Any], names: Iterable[str]) -> Any:
    """``call()``'s result, or None when it raised ValueError / FileNotFoundError naming one of ``names``
    (file names or paths); any other exception, or a message naming none of them, fails."""
    try:
        return call()
    except (ValueError, FileNotFoundError) as exc:
        msg = str(exc)
        assert any(str(n) in msg for n in names), f"{type(exc).__name__} names no file: {msg[:300]}"
        return None


def write_files(root: Path, files: dict[str, bytes]) -> Path:
    """Write ``relative name -> bytes`` under ``root`` (directories created); returns ``root``."""
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root
