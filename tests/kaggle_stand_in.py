"""A stand-in Kaggle on 127.0.0.1 for the real `kaggle` client, and a small simulated Kaggle on it.

The client is pointed here by `kaggle_env` (KAGGLE_API_ENVIRONMENT=LOCALHOST, HTTP_PROXY, fake
credentials; see docs/rxrx1-and-kaggle.md). Every call of the client is then
`POST http://localhost/api/v1/<Service>/<Method>` with a camelCase JSON body; file downloads are
GETs and uploads PUTs of the URLs the server hands out.

`StandIn` records every request and answers from per-method handlers; `hook(method, phase)` is
called before a request is handled ("before"), after its handler ran but before the answer
("applied"), and after the answer ("replied"): a test kills the client there, at a chosen moment.
`FakeKaggle` installs handlers that keep kernels, their versions and the runs' states, counts
pushes, and scores submissions.

Where the real Kaggle is less kind, so is the stand-in:
- a version is named `v<N>` (`versionLabel`); a bare number is a 404, as the client's own
  docstring says of the real API, and without a label the answer is for the newest version;
- `FakeKaggle.late`: a new version is shown that many requests about its kernel after the push;
- each version serves its own outputs (those in `FakeKaggle.outputs` when it was pushed);
- an API token must pass `security.OAuthService/IntrospectToken` (`StandIn.tokens`), and a
  request carrying a token Kaggle does not know is a 401; the legacy key (HTTP basic) passes.
"""
import base64
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

KERNELS = "kernels.KernelsApiService/"
SAVE = KERNELS + "SaveKernel"
STATUS = KERNELS + "GetKernelSessionStatus"
GET_KERNEL = KERNELS + "GetKernel"
OUTPUT = KERNELS + "ListKernelSessionOutput"
QUOTA = KERNELS + "GetAcceleratorQuotaStatistics"
COMPETITIONS = "competitions.CompetitionApiService/"
START_UPLOAD = COMPETITIONS + "StartSubmissionUpload"
CREATE_SUBMISSION = COMPETITIONS + "CreateSubmission"
GET_SUBMISSION = COMPETITIONS + "GetSubmission"
INTROSPECT = "security.OAuthService/IntrospectToken"
VERSION_LABEL = re.compile(r"v(\d+)")


class StandIn:
    """A tiny Kaggle: records every request, answers from per-method handlers."""

    def __init__(self):
        self.requests = []              # (method, body) in arrival order
        self.users = []                 # (method, who sent it: "token:T", "key:USER" or None)
        self.tokens = {}                # API token -> user name, for the active tokens
        self.handlers = {}              # "Service/Method" -> f(body) -> (http code, json)
        self.files = {}                 # path -> bytes, served on GET (output downloads)
        self.hook = None                # f(method, phase) -> True to close without answering
        self.lock = threading.Lock()    # one request at a time: the fakes keep state
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
                self.wfile.flush()

            def sender(self):
                kind, _, value = (self.headers.get("Authorization") or "").partition(" ")
                if kind == "Bearer":
                    return f"token:{value}"
                if kind == "Basic":
                    return "key:" + base64.b64decode(value).decode().partition(":")[0]
                return None

            def serve(self, method, body, answer):
                with stand_in.lock:
                    stand_in.requests.append((method, body))
                    who = self.sender()
                    stand_in.users.append((method, who))
                    if stand_in.hook and stand_in.hook(method, "before"):
                        return
                    refused = (method != INTROSPECT and who and who.startswith("token:")
                               and who[len("token:"):] not in stand_in.tokens)
                    code, payload, *kind = ((401, {"code": 401, "message": "Unauthenticated"})
                                            if refused else answer())
                    if stand_in.hook and stand_in.hook(method, "applied"):
                        return
                self.reply(code, payload, *kind)
                if stand_in.hook:
                    stand_in.hook(method, "replied")

            def do_POST(self):
                path = urlsplit(self.path).path
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                method = path.removeprefix("/api/v1/")
                handler = stand_in.handlers.get(method)
                self.serve(method, body, lambda: handler(body) if handler else
                           (404, {"code": 404, "message": f"no handler for {method}"}))

            def do_GET(self):
                path = urlsplit(self.path).path
                self.serve("GET " + path, None, lambda: (
                    (200, stand_in.files[path], "application/octet-stream")
                    if path in stand_in.files else (404, {"code": 404, "message": "no file"})))

            def do_PUT(self):   # blob uploads
                path = urlsplit(self.path).path
                length = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(length)
                self.serve("PUT " + path, data, lambda: (200, {}))

        self.handlers[INTROSPECT] = lambda body: (200, (
            {"active": True, "username": self.tokens[body["token"]]}
            if body.get("token") in self.tokens else {"active": False}))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def methods(self):
        return [m for m, _ in self.requests]

    def bodies(self, method):
        return [b for m, b in self.requests if m == method]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class FakeKaggle:
    """Kernels with versions whose runs step through `run` (one state per status poll of that
    version, then the last state forever), and a competition that scores submissions."""

    def __init__(self, stand_in, run=("QUEUED", "RUNNING", "COMPLETE")):
        self.stand_in, self.run = stand_in, run
        self.runs = {}            # slug -> the states its next run steps through
        self.versions = {}        # slug -> [{"states", "polls", "text", "outputs", ...}, ...]
        self.outputs = {}         # slug -> {file name: bytes} its next versions write
        self.late = 0             # requests about a kernel before its new version shows
        self.images = {True: "gcr.io/kaggle-gpu-images/python@sha256:1111",   # Kaggle's
                       False: "gcr.io/kaggle-images/python@sha256:1111"}      # images now
        self.submissions = []     # {"ref", "polls", "token", "description"}
        self.events = []          # ("push", slug, version) and ("state", slug, version, state)
        self.score = ("PENDING", "COMPLETE")
        self.scores = {"publicScore": "0.97310", "privateScore": "0.98127"}
        self.quota = {"timeUsed": "43200s", "totalTimeAllowed": "108000s"}   # 12 of 30 h
        stand_in.handlers.update({
            SAVE: self.save, STATUS: self.status, GET_KERNEL: self.get_kernel,
            OUTPUT: self.output, QUOTA: lambda body: (200, {"gpuQuota": self.quota}),
            START_UPLOAD: self.start_upload, CREATE_SUBMISSION: self.create_submission,
            GET_SUBMISSION: self.get_submission})

    def pushes(self, slug):
        return len(self.versions.get(slug, []))

    def save(self, body):
        slug = body["slug"].split("/")[-1]
        states = list(self.runs.get(slug, self.run))
        self.versions.setdefault(slug, []).append({
            "states": states, "polls": 0, "text": body["text"], "hidden": self.late,
            "outputs": dict(self.outputs.get(slug, {})),
            "image": body.get("dockerImage") or self.images[bool(body.get("enableGpu"))],
            "pinning": body.get("dockerImagePinningType")})
        number = len(self.versions[slug])
        self.events.append(("push", slug, number))
        return 200, {"ref": f"/code/jdoe/{slug}", "url": f"http://localhost/code/jdoe/{slug}",
                     "versionNumber": number}

    def visible(self, slug):
        """The versions Kaggle shows now; each request about the kernel brings a late one
        closer to being shown."""
        versions = self.versions.get(slug, [])
        for version in versions:
            version["hidden"] = max(0, version["hidden"] - 1)
        # Up to the newest shown one (by position: two versions may be equal dicts).
        shown = [i for i, v in enumerate(versions) if v["hidden"] == 0]
        return versions[:shown[-1] + 1] if shown else []

    def version(self, body):
        """(number, version) that a request names, or None: a 404 for a bare number, as for
        a version not shown (yet)."""
        versions = self.visible(body["kernelSlug"])
        label = body.get("versionLabel")
        if not label:
            return (len(versions), versions[-1]) if versions else None
        match = VERSION_LABEL.fullmatch(label)
        number = int(match[1]) if match else 0
        return (number, versions[number - 1]) if 0 < number <= len(versions) else None

    def state(self, version):
        return version["states"][min(version["polls"], len(version["states"]) - 1)]

    def status(self, body):
        found = self.version(body)
        if found is None:
            return 404, {"code": 404, "message": "Notebook not found"}
        number, version = found
        state = self.state(version)
        version["polls"] += 1
        self.events.append(("state", body["kernelSlug"], number,
                            state["status"] if isinstance(state, dict) else state))
        payload = state if isinstance(state, dict) else {"status": state}
        return 200, payload

    def get_kernel(self, body):
        versions = self.visible(body["kernelSlug"])
        if not versions:
            return 404, {"code": 404, "message": "Notebook not found"}
        return 200, {"metadata": {"ref": f"jdoe/{body['kernelSlug']}",
                                  "slug": body["kernelSlug"],
                                  "currentVersionNumber": len(versions),
                                  "dockerImage": versions[-1]["image"]},
                     "blob": {"source": versions[-1]["text"]}}

    def output(self, body):
        found = self.version(body)
        if found is None:
            return 404, {"code": 404, "message": "Notebook not found"}
        number, version = found
        base = f"/files/{body['kernelSlug']}/{number}"
        for name, data in version["outputs"].items():
            self.stand_in.files[f"{base}/{name}"] = data
        return 200, {"files": [{"url": f"http://localhost{base}/{name}", "fileName": name}
                               for name in version["outputs"]],
                     "log": f"log of {body['kernelSlug']} version {number}"}

    def start_upload(self, body):
        token = f"upload-{len(self.submissions)}-{body['fileName']}"
        return 200, {"token": token, "createUrl": f"http://localhost/upload/{token}"}

    def create_submission(self, body):
        self.submissions.append({"ref": 1000 + len(self.submissions), "polls": 0,
                                 "token": body["blobFileTokens"],
                                 "description": body.get("submissionDescription")})
        return 200, {"ref": self.submissions[-1]["ref"], "message": "Successfully submitted"}

    def get_submission(self, body):
        found = [s for s in self.submissions if s["ref"] == int(body["ref"])]
        if not found:
            return 404, {"code": 404, "message": "Submission not found"}
        submission = found[0]
        state = self.score[min(submission["polls"], len(self.score) - 1)]
        submission["polls"] += 1
        answer = {"ref": submission["ref"], "status": state}
        if state == "COMPLETE":
            answer.update(self.scores)
        elif state == "ERROR":
            answer["errorDescription"] = "Submission has 19896 rows, expected 19897"
        return 200, answer


def kaggle_env(stand_in, tmp_path, credentials=True, token=None):
    """The environment that points the real client at the stand-in: with the legacy key
    (`credentials`), and/or an API token in KAGGLE_API_TOKEN."""
    env = {k: v for k, v in os.environ.items()
           if k.upper() not in ("NO_PROXY", "KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN")}
    proxy = f"http://127.0.0.1:{stand_in.port}"
    config = tmp_path / "kaggle-config"
    config.mkdir(exist_ok=True)
    env.update(KAGGLE_API_ENVIRONMENT="LOCALHOST", HTTP_PROXY=proxy, http_proxy=proxy,
               KAGGLE_CONFIG_DIR=str(config), HOME=str(tmp_path))
    if credentials:
        env.update(KAGGLE_USERNAME="jdoe", KAGGLE_KEY="not-a-real-key")
    if token:
        env.update(KAGGLE_API_TOKEN=token)
    return env


def render_chain(tmp_path_factory, stages):
    """A rendered chain (jdoe/rcic-b0-stage-NN ... jdoe/rcic-b0-submit), made once: rendering
    builds the recipe's model, which imports torch."""
    from rcic.cli.chain import main

    root = tmp_path_factory.mktemp(f"chain{stages}")
    recipe = root / "recipe.yaml"
    recipe.write_text("name: t\ntrain:\n  epochs: 1\n")
    assert main(["init", "--owner", "jdoe", "--prefix", "rcic-b0", "--stages", str(stages),
                 "--config", str(recipe), "--out", str(root / "chain")]) == 0
    return root / "chain"


RCIC_CHAIN = ["-c", "import sys; from rcic.cli.chain import main; sys.exit(main(sys.argv[1:]))"]


def rcic_chain(env, *args, timeout=120):
    """rcic-chain in its own process: `import kaggle` reads credentials once, at import."""
    return subprocess.run([sys.executable, *RCIC_CHAIN, *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def start_rcic_chain(env, *args):
    return subprocess.Popen([sys.executable, *RCIC_CHAIN, *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_here(monkeypatch, capsys, env, *args):
    """rcic-chain in this process with `env` (a new interpreter costs seconds: importing kaggle
    and pandas), answered like subprocess.run's."""
    import rcic.cli.chain

    for name in [n for n in os.environ if n not in env]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    from kaggle.api.kaggle_api_extended import KaggleApi
    # The client reads KAGGLE_API_ENVIRONMENT once, when it is first imported: say it again.
    monkeypatch.setattr(KaggleApi, "args", ["--local"])
    capsys.readouterr()
    code = rcic.cli.chain.main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)
