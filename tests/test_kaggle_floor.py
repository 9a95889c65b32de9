"""The oldest kaggle client rcic supports (rcic.kaggle.client.CLIENT_FLOOR) is the one setup.py
requires and CI's floor environment installs (constraints/kaggle-floor.txt), and every call rcic
makes exists in the client installed here: CI runs this file in both environments, the newest
client and the floor."""
import inspect
import re
from pathlib import Path

import pytest

pytest.importorskip("kaggle")

from rcic.errors import UserError  # noqa: E402
from rcic.kaggle import client  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def test_setup_py_ci_and_the_client_check_name_the_same_floor():
    setup = (REPO / "setup.py").read_text()
    assert set(re.findall(r'"kaggle>=([\d.]+)', setup)) == {client.CLIENT_FLOOR}
    pins = dict(line.strip().split("==") for line in
                (REPO / "constraints" / "kaggle-floor.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert pins["kaggle"] == client.CLIENT_FLOOR


def test_every_client_call_rcic_makes_exists_in_the_installed_client():
    from kaggle.api.kaggle_api_extended import KaggleApi

    source = "".join(p.read_text() for p in (REPO / "rcic").rglob("*.py"))
    calls = set(re.findall(r"\bapi\.(\w+)\(", source))
    assert {"kernels_push", "kernels_status", "kernels_output", "get_submission",
            "quota_view"} <= calls
    assert [name for name in sorted(calls) if not hasattr(KaggleApi, name)] == []
    # The version of a kernel is sent as Kaggle wants it (v<N>), by the client itself.
    for name in ("kernels_status", "kernels_output"):
        assert "_kernel_version_label" in inspect.getsource(getattr(KaggleApi, name))
    assert KaggleApi._kernel_version_label("3") == "v3"
    # kagglesdk, called directly for a kernel's metadata: the fields rcic reads.
    from kagglesdk.kernels.types.kernels_api_service import (ApiGetKernelRequest,
                                                             ApiKernelMetadata)
    request = ApiGetKernelRequest()
    request.user_name, request.kernel_slug = "jdoe", "rcic-b0-stage-01"   # frozen: a rename raises
    assert all(hasattr(ApiKernelMetadata(), field)
               for field in ("current_version_number", "docker_image"))


def test_an_older_client_is_refused_in_one_line_before_any_call(monkeypatch):
    from importlib import metadata

    real = metadata.version
    # Only an older client installed would show this; the wheel cannot be installed here.
    monkeypatch.setattr(metadata, "version",
                        lambda name: "2.2.3" if name == "kaggle" else real(name))
    with pytest.raises(UserError) as err:
        client.connect()
    assert str(err.value) == (
        f"kaggle 2.2.3 is installed, and rcic-chain needs kaggle>={client.CLIENT_FLOOR} (older "
        f"clients read a kernel's newest run instead of the recorded one, and cannot fetch a "
        f"submission's score): pip install -U 'kaggle>={client.CLIENT_FLOOR}'")
