import os
from pathlib import Path

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
MNIST = FIXTURES / "mnist_subset.npz"

# The default run ("ci") draws the same examples every time (derandomize): a test run that
# gates a landing or a release must not pass or fail by the luck of the draw. "explore"
# draws fresh examples each run, "fuzz" and "fuzz-short" many more; pick one with
# HYPOTHESIS_PROFILE=explore python -m pytest -q  (a failure prints its reproduce blob).
settings.register_profile("ci", deadline=None, print_blob=True, derandomize=True,
                          database=None)
settings.register_profile("explore", deadline=None, print_blob=True)
settings.register_profile("fuzz", deadline=None, max_examples=10_000)
settings.register_profile("fuzz-short", deadline=None, max_examples=1_000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES
