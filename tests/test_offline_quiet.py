"""Offline kernels stay quiet and fast: importing rcic (and running a kernel) never reaches for
the network, as albumentations' update check does by default. A guard replaces the socket
calls in a real subprocess; reaching for the network is reported, never waited on."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Runs its arguments like `python ARGS...` after making every name lookup and connection fail
# at once, with a line on stderr saying what was attempted.
GUARD = """
import runpy, socket, sys
def refuse(*args, **kwargs):
    sys.stderr.write(f"NETWORK {args[-1] if args else kwargs}\\n")
    raise OSError("network refused by the test")
socket.getaddrinfo = refuse
socket.socket.connect = refuse
if sys.argv[1] == "-c":
    exec(sys.argv[2])
else:
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def guarded(*args, **env):
    clean = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    return subprocess.run([sys.executable, "-c", GUARD, *args], env=dict(clean, **env),
                          capture_output=True, text=True, timeout=300)


def test_the_guard_sees_albumentations_reach_for_the_network():
    """The control: imported on its own, albumentations does try."""
    assert "NETWORK" in guarded("-c", "import albumentations").stderr


def test_importing_rcic_does_not_reach_for_the_network():
    result = guarded("-c", "import rcic.data.dataset, rcic.predict, rcic.stage")
    assert result.returncode == 0, result.stderr
    assert "NETWORK" not in result.stderr and "albumentations" not in result.stderr.lower()


def test_a_kernel_does_not_reach_for_the_network(tiny_data, tmp_path):
    """The submission kernel imports rcic's prediction (albumentations with it), then stops:
    no weights attached."""
    inputs = tmp_path / "input"
    inputs.mkdir()
    (inputs / "rxrx1").symlink_to(tiny_data, target_is_directory=True)
    result = guarded(str(REPO / "kernels" / "submit_kernel.py"), RCIC_SKIP_INSTALL="1",
                     RCIC_KAGGLE_INPUT=str(inputs), RCIC_KAGGLE_WORKING=str(tmp_path))
    assert result.returncode == 2 and "no weights.pt under" in result.stderr, result.stderr
    assert "NETWORK" not in result.stderr
