"""``python -m torch.distributed.run ... tests/dist_entry.py ARGS``: ``vlsparse.cli.main`` (the entry point of
``-m vlsparse``) with test probes, set by environment variables:

- ``VLSPARSE_TEST_WRITES=PREFIX``: every ``os.replace`` (how :mod:`vlsparse.atomic` publishes a file) appends its
  destination to ``PREFIX.<rank>``, so a test sees which process wrote which file.
- ``VLSPARSE_TEST_FAIL=RANK:CALL``: rank RANK raises ``RuntimeError("injected failure on rank RANK")`` at its
  CALL-th IMP training round (1 = level 0).
- ``VLSPARSE_TEST_TASK=NAME=TASK:DIR``: registers task NAME, task TASK read from ``--data-dir`` DIR (``transfer``
  has no ``--data-dir``).
- ``VLSPARSE_TEST_COMMANDS=JSON``: a list of argument lists, run one after the other as ``vlsparse`` commands in
  one process group (one torchrun start-up for several commands; ARGS is then ignored), through the CLI's own
  :func:`vlsparse.training.distributed.run_main`.
"""

import dataclasses
import json
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
if task := os.environ.get("VLSPARSE_TEST_TASK"):
    from vlsparse.data import TASKS

    name, rest = task.split("=", 1)
    base, data_dir = rest.split(":", 1)
    TASKS[name] = lambda tokenizer, options, **kw: TASKS[base](tokenizer, dataclasses.replace(options,
                                                                                              data_dir=data_dir), **kw)

sys.argv[0] = "vlsparse"
from vlsparse.cli import _error_line, app, main  # noqa: E402

if commands := os.environ.get("VLSPARSE_TEST_COMMANDS"):
    from vlsparse.training import distributed

    def run_all() -> None:
        for args in json.loads(commands):
            app(args, prog_name="vlsparse", standalone_mode=False)

    distributed.run_main(run_all, _error_line)
main()
