import os
from pathlib import Path

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
MNIST = FIXTURES / "mnist_subset.npz"

settings.register_profile("ci", deadline=None, print_blob=True)
settings.register_profile("fuzz", deadline=None, max_examples=10_000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES
settings.register_profile("fuzz-short", deadline=None, max_examples=1_000)
