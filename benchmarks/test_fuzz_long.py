"""The fuzz tests of tests/ with a long budget: ``pytest benchmarks/test_fuzz_long.py`` runs every loader fuzz test
with hypothesis's ``long`` profile (1,000 random examples per test, not derandomized: each run tries new inputs;
about 5 minutes on 2 cores). The default test run uses the ``ci`` profile (120 fixed examples per test).
``HYPOTHESIS_PROFILE=long pytest tests/test_fuzz_*.py`` does the same."""

import os

os.environ.setdefault("HYPOTHESIS_PROFILE", "long")  # read when tests.fuzzing is first imported, just below

from tests.test_fuzz_bundle import *  # noqa: E402,F401,F403
from tests.test_fuzz_features import *  # noqa: E402,F401,F403
from tests.test_fuzz_loaders import *  # noqa: E402,F401,F403
from tests.test_fuzz_ticket import *  # noqa: E402,F401,F403
