"""Shared fixtures: tiny RxRx1-shaped folders written once per test session."""
import os
import shutil
import sys
from pathlib import Path

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


@pytest.fixture
def own_data(tiny_data, tmp_path):
    """A private copy of the tiny data that a test may break and mend (real copies of the
    files: a change never reaches the session's folder)."""
    return Path(shutil.copytree(tiny_data, tmp_path / "own-data"))


@pytest.fixture
def server():
    """A stand-in Kaggle server on 127.0.0.1 (tests/kaggle_stand_in.py), for one test."""
    from kaggle_stand_in import StandIn
    stand_in = StandIn()
    yield stand_in
    stand_in.close()


@pytest.fixture
def chain_dir(rendered, tmp_path):
    """A private copy of the module's `rendered` chain folder, which a test may push and change."""
    return Path(shutil.copytree(rendered, tmp_path / "chain"))


@pytest.fixture(scope="session", autouse=True)
def rcic_home(tmp_path_factory):
    """Commands run without --data use the embedded data; keep it out of the user's home."""
    home = tmp_path_factory.mktemp("rcic_home")
    os.environ["RCIC_HOME"] = str(home)
    return home


# The suite runs on two workers (`pytest -n 2`, pytest-xdist). A worker takes tests in
# collection order, so a long trial collected last would run alone at the end while the other
# worker idles: the modules holding the long trials (whole stages, chains, DDP, deadlines) go
# first. Their own order, and every other module's, is kept.
LONG_TRIALS_FIRST = ("test_local_chain.py", "test_stage_deadline.py", "test_faults.py",
                     "test_ddp.py", "test_gpu_check.py", "test_pseudo.py", "test_stage.py",
                     "test_progress.py", "test_recipes.py", "test_portable_state.py",
                     "test_report.py", "test_processes.py", "test_activation_checkpointing.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONG_TRIALS_FIRST.index(name) if name in LONG_TRIALS_FIRST else len(LONG_TRIALS_FIRST)
    items.sort(key=rank)
