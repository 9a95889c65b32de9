"""rcic-chain push/status/output/publish-bundle through the real `kaggle` client, pointed at a
stand-in Kaggle server on 127.0.0.1 (tests/kaggle_stand_in.py; how: docs/rxrx1-and-kaggle.md).

The tests assert on what the client sends and on how rcic reads what comes back (the client's
own exit status says nothing). tests/test_chain_driver.py covers the resumable driver, submit,
status and every kernel state.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rcic.budget import parse_duration
from rcic.kaggle.plan import hours

pytest.importorskip("kaggle")

from kaggle_stand_in import (GET_KERNEL, OUTPUT, SAVE, STATUS, kaggle_env,  # noqa: E402
                             render_chain, run_here)


@pytest.fixture
def cli(server, tmp_path, monkeypatch, capsys):
    """rcic-chain, in this process, talking to the stand-in."""
    env = kaggle_env(server, tmp_path)
    return lambda *args: run_here(monkeypatch, capsys, env, *args)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    return render_chain(tmp_path_factory, stages=2)


def statuses(*sequence):
    """A status handler answering the given states in turn, then the last one forever."""
    queue = list(sequence)

    def handler(body):
        state = queue.pop(0) if len(queue) > 1 else queue[0]
        return 200, state if isinstance(state, dict) else {"status": state}
    return handler


def saved(body):
    return 200, {"ref": "/code/" + body["slug"], "url": "http://localhost/code/" + body["slug"],
                 "versionNumber": 1}


def test_push_sends_each_kernel_in_order_after_the_previous_completed(server, cli, tmp_path,
                                                                       chain_dir):
    server.handlers[SAVE] = saved
    server.handlers[STATUS] = statuses("QUEUED", "RUNNING", "COMPLETE",
                                       "QUEUED", "COMPLETE", "RUNNING", "COMPLETE")
    result = cli("push", chain_dir, "--poll-seconds", "0.01")
    assert result.returncode == 0, result.stderr

    pushes = server.bodies(SAVE)
    assert [b["slug"] for b in pushes] == ["jdoe/rcic-b0-stage-01", "jdoe/rcic-b0-stage-02",
                                           "jdoe/rcic-b0-submit"]
    # Each push comes only after the previous kernel's run was seen COMPLETE.
    methods = server.methods()
    first, second = [i for i, m in enumerate(methods) if m == SAVE][:2]
    assert methods[first + 1:second].count(STATUS) == 3
    assert {b["kernelSlug"] for b in server.bodies(STATUS)} >= {"rcic-b0-stage-01"}

    stage2 = pushes[1]
    assert stage2["text"] == (chain_dir / "stage-02" / "stage_kernel.py").read_text()
    assert stage2["newTitle"] == "rcic-b0 stage 02"
    assert stage2["language"] == "python" and stage2["kernelType"] == "script"
    assert stage2["isPrivate"] is True and stage2["enableGpu"] is True
    assert stage2["enableInternet"] is False
    assert stage2["datasetDataSources"] == ["jdoe/rcic-package"]
    assert stage2["competitionDataSources"] == ["recursion-cellular-image-classification"]
    assert stage2["kernelDataSources"] == ["jdoe/rcic-b0-stage-01"]
    assert stage2["machineShape"] == "NvidiaTeslaT4"
    assert pushes[2]["kernelDataSources"] == ["jdoe/rcic-b0-stage-02"]
    assert pushes[2]["enableInternet"] is False
    assert "does not resolve to the specified id" not in result.stdout
    assert "chain complete" in result.stdout


def test_a_rejected_push_stops_the_chain_with_one_line(server, cli, tmp_path, chain_dir):
    server.handlers[SAVE] = lambda body: (200, {"error": "Notebook title is already in use"})
    result = cli("push", chain_dir, "--poll-seconds", "0.01")
    assert result.returncode == 2
    assert result.stderr.strip() == ("rcic-chain: error: Kaggle rejected the push of "
                                     "jdoe/rcic-b0-stage-01: Notebook title is already in use")
    assert server.methods() == [GET_KERNEL, SAVE]


def test_inputs_the_server_did_not_accept_stop_the_chain(server, cli, tmp_path, chain_dir):
    server.handlers[SAVE] = lambda body: (200, {**saved(body)[1],
                                                "invalidDatasetSources": ["jdoe/rcic-package"]})
    result = cli("push", chain_dir, "--poll-seconds", "0.01")
    assert result.returncode == 2
    assert "not its inputs (dataset jdoe/rcic-package)" in result.stderr
    assert "publish-bundle" in result.stderr
    assert "rcic-chain push --from stage-01" in result.stderr
    assert server.methods() == [GET_KERNEL, SAVE]


def test_a_kernel_ending_in_error_stops_the_chain(server, cli, tmp_path, chain_dir):
    server.handlers[SAVE] = saved
    server.handlers[STATUS] = statuses("RUNNING", {"status": "ERROR",
                                                   "failureMessage": "CUDA out of memory"})
    result = cli("push", chain_dir, "--poll-seconds", "0.01")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert ("kernel jdoe/rcic-b0-stage-01 version 1 ended in ERROR: CUDA out of memory"
            in result.stderr)
    assert "rcic-chain push --retry" in result.stderr
    assert server.methods().count(SAVE) == 1     # stage 2 was never pushed


def test_a_stale_final_state_right_after_a_push_is_not_trusted(server, cli, tmp_path, chain_dir):
    # The previous run's COMPLETE is still reported twice before the new run shows up.
    server.handlers[SAVE] = saved
    server.handlers[STATUS] = statuses("COMPLETE", "COMPLETE", "RUNNING", "ERROR")
    result = cli("push", chain_dir, "--poll-seconds", "0.01")
    assert result.returncode == 2 and "ended in ERROR" in result.stderr


def test_missing_credentials_is_one_line_and_no_request(server, tmp_path, chain_dir):
    # One new interpreter for all four commands: `import kaggle` prints its page of help at
    # the first import only, which the first command meets; each command checks credentials.
    commands = ["push", "status", "output", "submit"]
    code = ("import sys; from rcic.cli.chain import main\n"
            "print(*[main([c, sys.argv[1]]) for c in sys.argv[2:]])")
    result = subprocess.run([sys.executable, "-c", code, str(chain_dir), *commands],
                            env=kaggle_env(server, tmp_path, credentials=False),
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2"] * len(commands)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == len(commands)
    assert all(line.startswith("rcic-chain: error: no Kaggle credentials") for line in lines)
    assert "Authentication required" not in result.stdout + result.stderr
    assert server.requests == []


def test_status_lists_every_kernel(server, cli, tmp_path, chain_dir):
    states = {"rcic-b0-stage-01": {"status": "COMPLETE"},
              "rcic-b0-stage-02": {"status": "ERROR", "failureMessage": "killed at 9h"}}
    server.handlers[STATUS] = lambda body: (
        (200, states[body["kernelSlug"]]) if body["kernelSlug"] in states
        else (404, {"code": 404, "message": "Notebook not found"}))
    result = cli("status", chain_dir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # Nothing was pushed from this folder: Kaggle's word on each kernel, said to be no more.
    assert "jdoe/rcic-b0-stage-01  version -  complete" in lines[0]
    assert "jdoe/rcic-b0-stage-02  version -  error" in lines[1] and "killed at 9h" in lines[1]
    assert "jdoe/rcic-b0-submit  version -  unknown" in lines[2] and "HTTP 404" in lines[2]
    assert all("not pushed from this folder" in line for line in lines[:3])
    budget = parse_duration(json.loads((chain_dir / "chain.json").read_text())["budget"])
    assert f"at most 2 stage(s) x the {hours(budget)} budget" in result.stdout


def test_output_downloads_files_and_log_beside_each_kernel(server, cli, tmp_path, chain_dir):
    server.files = {"/files/stage.json": b'{"done": true}', "/files/weights.pt": b"weights"}
    server.handlers[OUTPUT] = lambda body: (200, {
        "files": [{"url": f"http://localhost/files/{name}", "fileName": name}
                  for name in ("stage.json", "weights.pt")],
        "log": f"log of {body['kernelSlug']}"})
    result = cli("output", chain_dir)
    assert result.returncode == 0, result.stderr
    out = chain_dir / "stage-02" / "output"
    assert (out / "weights.pt").read_bytes() == b"weights"
    assert (out / "rcic-b0-stage-02.log").read_text() == "log of rcic-b0-stage-02"
    assert [b["userName"] for b in server.bodies(OUTPUT)] == ["jdoe"] * 3


def test_publish_bundle_creates_the_dataset_then_adds_versions(server, cli, tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name in ("rcic-0.2.0-py3-none-any.whl", "efficientnet_pytorch-0.7.1-py3-none-any.whl"):
        (bundle / name).write_bytes(b"wheel " + name.encode())
    template = json.loads((Path(__file__).resolve().parent.parent
                           / "dataset-metadata.json").read_text())
    (bundle / "dataset-metadata.json").write_text(json.dumps({**template,
                                                              "id": "jdoe/rcic-package"}))
    exists = {"value": False}
    server.handlers["datasets.DatasetApiService/GetDatasetStatus"] = lambda body: (
        (200, {"status": "READY"}) if exists["value"]
        else (404, {"code": 404, "message": "Dataset not found"}))
    server.handlers["blobs.BlobApiService/StartBlobUpload"] = lambda body: (200, {
        "token": "token-" + body["name"], "createUrl": "http://localhost/upload/" + body["name"]})
    server.handlers["datasets.DatasetApiService/CreateDataset"] = lambda body: (200, {
        "ref": "jdoe/rcic-package", "url": "http://localhost/datasets/jdoe/rcic-package"})
    server.handlers["datasets.DatasetApiService/CreateDatasetVersion"] = lambda body: (200, {
        "ref": "jdoe/rcic-package", "url": "http://localhost/datasets/jdoe/rcic-package/2"})
    result = cli("publish-bundle", bundle)
    assert result.returncode == 0, result.stderr
    create = server.bodies("datasets.DatasetApiService/CreateDataset")[-1]
    assert (create["ownerSlug"], create["slug"], create["isPrivate"]) == ("jdoe", "rcic-package",
                                                                          True)
    assert create["title"] == template["title"] and create["licenseName"] == "other"
    assert sorted(f["token"] for f in create["files"]) == [
        "token-efficientnet_pytorch-0.7.1-py3-none-any.whl", "token-rcic-0.2.0-py3-none-any.whl"]
    uploads = {m: b for m, b in server.requests if m.startswith("PUT ")}
    assert uploads["PUT /upload/rcic-0.2.0-py3-none-any.whl"] == b"wheel rcic-0.2.0-py3-none-any.whl"
    assert "created" in result.stdout

    exists["value"] = True
    result = cli("publish-bundle", bundle, "--notes", "second")
    assert result.returncode == 0, result.stderr
    version = server.bodies("datasets.DatasetApiService/CreateDatasetVersion")[-1]
    assert version["ownerSlug"] == "jdoe" and version["datasetSlug"] == "rcic-package"
    assert version["body"]["versionNotes"] == "second" and len(version["body"]["files"]) == 2

    server.handlers["datasets.DatasetApiService/CreateDatasetVersion"] = lambda body: (200, {
        "error": "Dataset is being processed"})
    result = cli("publish-bundle", bundle)
    assert result.returncode == 2
    assert "Kaggle rejected dataset jdoe/rcic-package: Dataset is being processed" in result.stderr


def test_the_stand_in_refuses_a_bare_version_number_as_kaggle_does(server):
    import requests

    from kaggle_stand_in import FakeKaggle

    kaggle = FakeKaggle(server, run=("COMPLETE",))
    for _ in range(2):
        kaggle.save({"slug": "jdoe/rcic-b0-stage-01", "text": ""})

    def status(**label):
        return requests.post(f"http://127.0.0.1:{server.port}/api/v1/{STATUS}", json={
            "userName": "jdoe", "kernelSlug": "rcic-b0-stage-01", **label}).status_code
    assert status(versionLabel="1") == 404
    assert status(versionLabel="v1") == status(versionLabel="v2") == status() == 200
    assert status(versionLabel="v3") == 404
    assert [e[2] for e in kaggle.events if e[0] == "state"] == [1, 2, 2]
