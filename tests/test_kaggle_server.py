"""rcic-chain push/status/output/publish-bundle through the real `kaggle` client, pointed at a
stand-in Kaggle server on 127.0.0.1 (how: ../shared/FACTS.md, "Kaggle mechanics").

Every call of the client is `POST http://localhost/api/v1/<Service>/<Method>` with a camelCase
JSON body, sent through HTTP_PROXY, which is this server. The tests assert on what the client
sends and on how rcic reads what comes back (the client's own exit status says nothing).
"""
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

pytest.importorskip("kaggle")

from rcic.cli.chain import main as chain_main   # noqa: E402

SAVE = "kernels.KernelsApiService/SaveKernel"
STATUS = "kernels.KernelsApiService/GetKernelSessionStatus"
OUTPUT = "kernels.KernelsApiService/ListKernelSessionOutput"


class StandIn:
    """A tiny Kaggle: records every request, answers from per-method handlers."""

    def __init__(self):
        self.requests = []              # (method, body) in arrival order
        self.handlers = {}              # "Service/Method" -> f(body) -> (http code, json)
        self.files = {}                 # path -> bytes, served on GET (output downloads)
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code, payload, content_type="application/json"):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                path = urlsplit(self.path).path
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                method = path.removeprefix("/api/v1/")
                stand_in.requests.append((method, body))
                handler = stand_in.handlers.get(method)
                if handler is None:
                    self.reply(404, {"code": 404, "message": f"no handler for {method}"})
                else:
                    self.reply(*handler(body))

            def do_GET(self):
                path = urlsplit(self.path).path
                stand_in.requests.append(("GET " + path, None))
                if path in stand_in.files:
                    self.reply(200, stand_in.files[path], "application/octet-stream")
                else:
                    self.reply(404, {"code": 404, "message": "no such file"})

            def do_PUT(self):   # blob uploads
                path = urlsplit(self.path).path
                length = int(self.headers.get("Content-Length") or 0)
                stand_in.requests.append(("PUT " + path, self.rfile.read(length)))
                self.reply(200, {})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def methods(self):
        return [m for m, _ in self.requests]

    def bodies(self, method):
        return [b for m, b in self.requests if m == method]


@pytest.fixture
def server():
    s = StandIn()
    yield s
    s.server.shutdown()


def kaggle_env(server, tmp_path, credentials=True):
    env = {k: v for k, v in os.environ.items()
           if k.upper() not in ("NO_PROXY", "KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN")}
    proxy = f"http://127.0.0.1:{server.port}"
    config = tmp_path / "kaggle-config"
    config.mkdir(exist_ok=True)
    env.update(KAGGLE_API_ENVIRONMENT="LOCALHOST", HTTP_PROXY=proxy, http_proxy=proxy,
               KAGGLE_CONFIG_DIR=str(config), HOME=str(tmp_path))
    if credentials:
        env.update(KAGGLE_USERNAME="jdoe", KAGGLE_KEY="not-a-real-key")
    return env


def rcic_chain(env, *args):
    """rcic-chain in its own process: `import kaggle` reads credentials once, at import."""
    code = "import sys; from rcic.cli.chain import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def chain_dir(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: t\ntrain:\n  epochs: 1\n")
    out = tmp_path / "chain"
    assert chain_main(["init", "--owner", "jdoe", "--prefix", "rcic-b0", "--stages", "2",
                       "--config", str(recipe), "--out", str(out)]) == 0
    return out


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


def test_push_sends_each_kernel_in_order_after_the_previous_completed(server, tmp_path,
                                                                       chain_dir):
    server.handlers[SAVE] = saved
    server.handlers[STATUS] = statuses("QUEUED", "RUNNING", "COMPLETE",
                                       "QUEUED", "COMPLETE", "RUNNING", "COMPLETE")
    result = rcic_chain(kaggle_env(server, tmp_path), "push", chain_dir, "--poll-seconds", "0.01")
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


def test_a_rejected_push_stops_the_chain_with_one_line(server, tmp_path, chain_dir):
    server.handlers[SAVE] = lambda body: (200, {"error": "Notebook title is already in use"})
    result = rcic_chain(kaggle_env(server, tmp_path), "push", chain_dir, "--poll-seconds", "0.01")
    assert result.returncode == 2
    assert result.stderr.strip() == ("rcic-chain: error: Kaggle rejected the push of "
                                     "jdoe/rcic-b0-stage-01: Notebook title is already in use")
    assert server.methods() == [SAVE]


def test_inputs_the_server_did_not_accept_stop_the_chain(server, tmp_path, chain_dir):
    server.handlers[SAVE] = lambda body: (200, {**saved(body)[1],
                                                "invalidDatasetSources": ["jdoe/rcic-package"]})
    result = rcic_chain(kaggle_env(server, tmp_path), "push", chain_dir, "--poll-seconds", "0.01")
    assert result.returncode == 2
    assert "not its inputs (dataset jdoe/rcic-package)" in result.stderr
    assert "publish-bundle" in result.stderr
    assert server.methods() == [SAVE]


def test_a_kernel_ending_in_error_stops_the_chain(server, tmp_path, chain_dir):
    server.handlers[SAVE] = saved
    server.handlers[STATUS] = statuses("RUNNING", {"status": "ERROR",
                                                   "failureMessage": "CUDA out of memory"})
    result = rcic_chain(kaggle_env(server, tmp_path), "push", chain_dir, "--poll-seconds", "0.01")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert ("kernel jdoe/rcic-b0-stage-01 ended in ERROR: CUDA out of memory"
            in result.stderr)
    assert server.methods().count(SAVE) == 1     # stage 2 was never pushed


def test_a_stale_final_state_right_after_a_push_is_not_trusted(server, tmp_path, chain_dir):
    # The previous run's COMPLETE is still reported twice before the new run shows up.
    server.handlers[SAVE] = saved
    server.handlers[STATUS] = statuses("COMPLETE", "COMPLETE", "RUNNING", "ERROR")
    result = rcic_chain(kaggle_env(server, tmp_path), "push", chain_dir, "--poll-seconds", "0.01")
    assert result.returncode == 2 and "ended in ERROR" in result.stderr


def test_missing_credentials_is_one_line_and_no_request(server, tmp_path, chain_dir):
    env = kaggle_env(server, tmp_path, credentials=False)
    for command in (["push", chain_dir], ["status", chain_dir], ["output", chain_dir]):
        result = rcic_chain(env, *command)
        assert result.returncode == 2
        assert result.stderr.strip().startswith("rcic-chain: error: no Kaggle credentials")
        assert len(result.stderr.strip().splitlines()) == 1
        assert "Authentication required" not in result.stdout + result.stderr
    assert server.requests == []


def test_status_lists_every_kernel(server, tmp_path, chain_dir):
    states = {"rcic-b0-stage-01": {"status": "COMPLETE"},
              "rcic-b0-stage-02": {"status": "ERROR", "failureMessage": "killed at 9h"}}
    server.handlers[STATUS] = lambda body: (
        (200, states[body["kernelSlug"]]) if body["kernelSlug"] in states
        else (404, {"code": 404, "message": "Notebook not found"}))
    result = rcic_chain(kaggle_env(server, tmp_path), "status", chain_dir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "jdoe/rcic-b0-stage-01: complete" in lines[0]
    assert "jdoe/rcic-b0-stage-02: error (killed at 9h)" in lines[1]
    assert "jdoe/rcic-b0-submit: unknown" in lines[2] and "HTTP 404" in lines[2]


def test_output_downloads_files_and_log_beside_each_kernel(server, tmp_path, chain_dir):
    server.files = {"/files/stage.json": b'{"done": true}', "/files/weights.pt": b"weights"}
    server.handlers[OUTPUT] = lambda body: (200, {
        "files": [{"url": f"http://localhost/files/{name}", "fileName": name}
                  for name in ("stage.json", "weights.pt")],
        "log": f"log of {body['kernelSlug']}"})
    result = rcic_chain(kaggle_env(server, tmp_path), "output", chain_dir)
    assert result.returncode == 0, result.stderr
    out = chain_dir / "stage-02" / "output"
    assert (out / "weights.pt").read_bytes() == b"weights"
    assert (out / "rcic-b0-stage-02.log").read_text() == "log of rcic-b0-stage-02"
    assert [b["userName"] for b in server.bodies(OUTPUT)] == ["jdoe"] * 3


def test_publish_bundle_creates_the_dataset_then_adds_versions(server, tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name in ("rcic-0.1.0-py3-none-any.whl", "efficientnet_pytorch-0.7.1-py3-none-any.whl"):
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
    env = kaggle_env(server, tmp_path)

    result = rcic_chain(env, "publish-bundle", bundle)
    assert result.returncode == 0, result.stderr
    create = server.bodies("datasets.DatasetApiService/CreateDataset")[-1]
    assert (create["ownerSlug"], create["slug"], create["isPrivate"]) == ("jdoe", "rcic-package",
                                                                          True)
    assert create["title"] == template["title"] and create["licenseName"] == "other"
    assert sorted(f["token"] for f in create["files"]) == [
        "token-efficientnet_pytorch-0.7.1-py3-none-any.whl", "token-rcic-0.1.0-py3-none-any.whl"]
    uploads = {m: b for m, b in server.requests if m.startswith("PUT ")}
    assert uploads["PUT /upload/rcic-0.1.0-py3-none-any.whl"] == b"wheel rcic-0.1.0-py3-none-any.whl"
    assert "created" in result.stdout

    exists["value"] = True
    result = rcic_chain(env, "publish-bundle", bundle, "--notes", "second")
    assert result.returncode == 0, result.stderr
    version = server.bodies("datasets.DatasetApiService/CreateDatasetVersion")[-1]
    assert version["ownerSlug"] == "jdoe" and version["datasetSlug"] == "rcic-package"
    assert version["body"]["versionNotes"] == "second" and len(version["body"]["files"]) == 2

    server.handlers["datasets.DatasetApiService/CreateDatasetVersion"] = lambda body: (200, {
        "error": "Dataset is being processed"})
    result = rcic_chain(env, "publish-bundle", bundle)
    assert result.returncode == 2
    assert "Kaggle rejected dataset jdoe/rcic-package: Dataset is being processed" in result.stderr
