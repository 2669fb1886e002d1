"""``python -m torch.distributed.run ... tests/dist_entry.py ARGS``: ``vlsparse.cli.main`` (the entry point of
``-m vlsparse``) with two test probes, set by environment variables:

- ``VLSPARSE_TEST_WRITES=PREFIX``: every ``os.replace`` (how :mod:`vlsparse.atomic` publishes a file) appends its
  destination to ``PREFIX.<rank>``, so a test sees which process wrote which file.
- ``VLSPARSE_TEST_FAIL=RANK:CALL``: rank RANK raises ``RuntimeError("injected failure on rank RANK")`` at its
  CALL-th IMP training round (1 = level 0).
"""

import os
import sys

rank = os.environ.get("RANK", "0")
if prefix := os.environ.get("VLSPARSE_TEST_WRITES"):
    replace = os.replace

    def logged(src, dst, *a, **kw):
        replace(src, dst, *a, **kw)
        with open(f"{prefix}.{rank}", "a") as f:
            f.write(f"{dst}\n")

    os.replace = logged
if fail := os.environ.get("VLSPARSE_TEST_FAIL"):
    import vlsparse.lottery.imp as imp

    fail_rank, fail_call = fail.split(":")
    original, calls = imp.train, []

    def failing(*a, **kw):
        calls.append(1)
        if rank == fail_rank and len(calls) == int(fail_call):
            raise RuntimeError(f"injected failure on rank {rank}")
        return original(*a, **kw)

    imp.train = failing

sys.argv[0] = "vlsparse"
from vlsparse.cli import main  # noqa: E402

main()
