"""The options of ``vlsparse serve`` and their defaults, checked on construction: :class:`Settings`."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

__all__ = ["Settings"]

MB = 1_000_000  # bytes


@dataclass(frozen=True)
class Settings:
    """Server options (``vlsparse serve --help`` lists them with the same names, ``_`` written ``-``).

    Attributes:
        host: interface to listen on (default 127.0.0.1: this machine only).
        port: TCP port (default 8000; 0 picks a free one).
        max_batch: most requests run as one batch through the Pipeline (default 32).
        max_wait_ms: how long, in milliseconds, the first request of a batch waits for others (default 5).
        workers: batches run at once, each in its own thread (default 1; onnxruntime sessions and the
            Pipeline are safe to call from several threads).
        threads: CPU threads per model call (onnxruntime intra-op threads, our op's OpenMP threads, torch
            threads for csr bundles); None keeps the runtime's default.
        max_upload_mb: largest request body, in MB of 10^6 bytes (default 10); larger bodies get 413.
        max_question_chars: longest question, in characters (default 500); longer ones get 422.
        max_image_side: largest image width or height, in pixels (default 4096); larger images get 422.
        timeout_s: seconds from a request's arrival to its answer (default 30); later gets 504.
        max_queue: most requests waiting for a batch (default 256); more get 503 with Retry-After.
        default_top_k: answers returned when a request gives no top_k (default 5).

    Raises:
        ValueError: an option out of its range, naming the option (e.g. ``max_batch must be >= 1, got 0``).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32
    max_wait_ms: float = 5.0
    workers: int = 1
    threads: Optional[int] = None
    max_upload_mb: float = 10.0
    max_question_chars: int = 500
    max_image_side: int = 4096
    timeout_s: float = 30.0
    max_queue: int = 256
    default_top_k: int = 5

    def __post_init__(self):
        def need(name: str, ok: bool, what: str):
            if not ok:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be {what}, got {getattr(self, name)!r}")

        for name in ("max_batch", "workers", "max_question_chars", "max_image_side", "max_queue", "default_top_k"):
            value = getattr(self, name)
            need(name, isinstance(value, int) and not isinstance(value, bool) and value >= 1, "an integer >= 1")
        need("port", isinstance(self.port, int) and 0 <= self.port <= 65535, "an integer in [0, 65535]")
        need("threads", self.threads is None or (isinstance(self.threads, int) and self.threads >= 1),
             "None or an integer >= 1")
        for name, low in (("max_wait_ms", 0.0), ("max_upload_mb", 1e-6), ("timeout_s", 1e-3)):
            value = getattr(self, name)
            need(name, isinstance(value, (int, float)) and math.isfinite(value) and value >= low, f"a number >= {low:g}")
        need("host", isinstance(self.host, str) and bool(self.host.strip()), "a host name or address")

    @property
    def max_upload_bytes(self) -> int:
        """The largest request body in bytes."""
        return int(self.max_upload_mb * MB)

    @classmethod
    def from_options(cls, **options) -> "Settings":
        """Settings from keyword options, where None means "the default" (how the CLI passes them).

        Raises:
            TypeError: an unknown option name; ValueError: as the constructor.
        """
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unknown serve option(s): {', '.join(unknown)}")
        return cls(**{k: v for k, v in options.items() if v is not None})
