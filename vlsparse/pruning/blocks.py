"""Block shapes of block tickets (``find-ticket --block ROWSxCOLS``): parsing and checking, without torch.

Kept apart from :mod:`vlsparse.pruning.magnitude` (which needs torch) so that the CLI can validate ``--block``
without importing torch: ``vlsparse predict`` on an ONNX bundle runs without it.
"""

from __future__ import annotations


def parse_block(text: str) -> tuple[int, int]:
    """"ROWSxCOLS" (e.g. "1x4") -> (rows, cols), both in [1, 64]; ValueError (one line) otherwise."""
    parts = str(text).lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and 1 <= int(p) <= 64 for p in parts):
        raise ValueError(f"--block must be ROWSxCOLS with sizes in 1..64 (e.g. 1x4), got {str(text)[:40]!r}")
    return int(parts[0]), int(parts[1])


def check_block(shapes: dict[str, tuple[int, ...]], block: tuple[int, int]) -> None:
    """ValueError (one line, naming the first weight) unless ``block`` divides every weight shape (out, in)."""
    r, c = block
    for name, shape in shapes.items():
        if len(shape) != 2 or shape[0] % r or shape[1] % c:
            raise ValueError(f"--block {r}x{c}: {name} of shape {tuple(shape)} does not divide into {r}x{c} blocks")
