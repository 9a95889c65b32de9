"""Shared fixtures: tiny RxRx1-shaped folders written once per test session."""
import os
import sys

import pytest

from rcic.data.synthetic import SynthSpec, generate

# Two cores on CI: one torch thread per test process keeps subprocess tests from thrashing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Console scripts (rcic-stage, ...) live beside the interpreter running the tests.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]

TINY = SynthSpec(n_classes=8, n_positive_controls=1, image_size=16, train_experiments=2,
                 test_experiments=1, cell_types=["HUVEC", "RPE"])


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A complete synthetic RxRx1 folder: 2 cell types, 8 classes, 16 px (read-only in tests)."""
    return generate(tmp_path_factory.mktemp("data") / "tiny", TINY)


@pytest.fixture(scope="session", autouse=True)
def rcic_home(tmp_path_factory):
    """Commands run without --data use the embedded data; keep it out of the user's home."""
    home = tmp_path_factory.mktemp("rcic_home")
    os.environ["RCIC_HOME"] = str(home)
    return home
