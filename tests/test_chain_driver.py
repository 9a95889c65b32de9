"""The chain's driver with the real `kaggle` client against the simulated Kaggle of
tests/kaggle_stand_in.py: push survives SIGKILL at any moment and runs each kernel once, every
state Kaggle reports is handled, a network failure is retried, one driver per folder, submit
ends at the scores, status shows what the chain costs.

The kill test runs the driver as a real process and SIGKILLs it from inside the server, at
moments a seeded RNG picks: before Kaggle handles a request, after it acted on it but before it
answers, or just after the answer.
"""
import json
import os
import random
import signal
import time

import pytest

pytest.importorskip("kaggle")

from kaggle_stand_in import (CREATE_SUBMISSION, GET_KERNEL, OUTPUT, SAVE,  # noqa: E402
                             START_UPLOAD, STATUS, FakeKaggle, kaggle_env,
                             render_chain, run_here, start_rcic_chain)

SLUGS = ["rcic-b0-stage-01", "rcic-b0-stage-02", "rcic-b0-submit"]
COMPETITION = "recursion-cellular-image-classification"
SUBMISSION = b"id_code,sirna\nHEPG2-08_1_B03,17\n"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    return render_chain(tmp_path_factory, stages=2)


@pytest.fixture
def kaggle(server):
    fake = FakeKaggle(server)
    fake.outputs["rcic-b0-submit"] = {"submission.csv": SUBMISSION}
    return fake


@pytest.fixture
def cli(server, tmp_path, monkeypatch, capsys):
    """rcic-chain, in this process, talking to the stand-in."""
    env = kaggle_env(server, tmp_path)
    return lambda *args: run_here(monkeypatch, capsys, env, *args)


def pushes(kaggle):
    return [kaggle.pushes(slug) for slug in SLUGS]


def one_line(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    return lines[0].removeprefix("rcic-chain: error: ")


def record(chain_dir):
    return json.loads((chain_dir / "pushes.json").read_text())


# -- dying and resuming ------------------------------------------------------------------------
def test_a_driver_killed_at_any_moment_and_restarted_runs_each_kernel_once(server, kaggle,
                                                                           tmp_path, chain_dir):
    rng = random.Random(16)
    kaggle.run = ("QUEUED", "RUNNING", "RUNNING", "COMPLETE")
    kaggle.late = 2          # and Kaggle shows each new version two requests after its push
    # First the moments around a push (its answer lost, never sent, answered and then killed
    # before or while it is written down), then a poll at a random moment, then wherever the
    # dice fall: the n-th request of a run. (Each run is a new interpreter: a second or more.)
    phases = ["before", "applied", "replied"]
    plan = [(SAVE, "applied", 1), (GET_KERNEL, "before", 1), (SAVE, "before", 1),
            (SAVE, "replied", 1), (STATUS, rng.choice(phases), rng.randint(1, 3)),
            (None, rng.choice(phases), rng.randint(1, 4))]
    now = {"proc": None, "target": None, "requests": 0}
    killed = []

    def hook(method, phase):
        if phase == "before":
            now["requests"] += 1
        if now["target"] is None:
            return False
        wanted, when, nth = now["target"]
        if phase != when or (wanted or method) != method or now["requests"] < nth:
            return False
        now["target"] = None
        if phase == "replied":
            time.sleep(rng.uniform(0, 0.02))   # perhaps before, perhaps after it is recorded
        os.kill(now["proc"].pid, signal.SIGKILL)
        killed.append((method, phase))
        return True                              # the client hears nothing more

    server.hook = hook
    env, outputs = kaggle_env(server, tmp_path), []
    for run in range(len(plan) + 3):
        now.update(target=plan[run] if run < len(plan) else None, requests=0)
        now["proc"] = start_rcic_chain(env, "push", chain_dir, "--poll-seconds", "0.01")
        out, err = now["proc"].communicate(timeout=120)
        outputs.append(out)
        if now["proc"].returncode == 0:
            break
        assert now["proc"].returncode == -signal.SIGKILL, err
    assert now["proc"].returncode == 0 and "chain complete" in outputs[-1]
    assert killed[:4] == [(SAVE, "applied"), (GET_KERNEL, "before"), (SAVE, "before"),
                          (SAVE, "replied")]
    assert killed[4][0] == STATUS and len(killed) == len(plan), killed
    # The push whose answer was lost was found on Kaggle, not sent again.
    assert "the push sent before the driver stopped reached Kaggle (version 1)" in outputs[1] \
        + outputs[2]

    assert pushes(kaggle) == [1, 1, 1]
    # Each kernel was pushed only after the one before it was seen complete.
    events = kaggle.events
    for before, after in zip(SLUGS, SLUGS[1:]):
        pushed = events.index(("push", after, 1))
        assert ("state", before, 1, "COMPLETE") in events[:pushed]
    kernels = record(chain_dir)["kernels"]
    assert [(a[-1]["version"], a[-1]["state"]) for a in kernels.values()] == [(1, "complete")] * 3


def test_a_second_driver_on_the_same_folder_refuses_and_a_killed_one_leaves_no_lock(
        server, kaggle, cli, tmp_path, chain_dir):
    kaggle.run = ("RUNNING",)                    # stage 1 runs until the test ends it
    first = start_rcic_chain(kaggle_env(server, tmp_path), "push", chain_dir,
                             "--poll-seconds", "0.05")
    deadline = time.time() + 60
    while not server.bodies(STATUS) and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    assert server.bodies(STATUS), first.communicate()
    lock = chain_dir / ".rcic-chain.lock"
    for command in ("push", "submit"):
        assert one_line(cli(command, chain_dir)) == (
            f"another rcic-chain push or submit is running on {chain_dir} (it holds {lock}): "
            f"let it finish or stop it, then run rcic-chain {command} {chain_dir} again")
    first.kill()                                 # SIGKILL: the lock goes with the process
    first.communicate()
    kaggle.versions["rcic-b0-stage-01"][0]["states"] = ["COMPLETE"]
    kaggle.run = ("QUEUED", "COMPLETE")
    result = cli("push", chain_dir, "--poll-seconds", "0.01")
    assert result.returncode == 0, result.stderr
    assert "rcic-b0-stage-01 version 1 was pushed before: waiting for it" in result.stdout
    assert pushes(kaggle) == [1, 1, 1]


def test_from_restarts_the_chain_at_a_chosen_kernel(kaggle, cli, chain_dir):
    assert cli("push", chain_dir, "--poll-seconds", "0.001").returncode == 0
    result = cli("push", chain_dir, "--from", "stage-02", "--poll-seconds", "0.001")
    assert result.returncode == 0, result.stderr
    assert "rcic-b0-stage-01 version 1: complete (not pushed again)" in result.stdout
    assert "pushed jdoe/rcic-b0-stage-02 (version 2)" in result.stdout
    assert pushes(kaggle) == [1, 2, 2]


def test_bad_driver_arguments_are_one_line_before_any_request(server, kaggle, cli, chain_dir):
    assert one_line(cli("push", chain_dir, "--from", "stage-9")) == (
        f"--from stage-9: {chain_dir} has no such kernel; choose one of stage-01, stage-02, "
        f"submit")
    for command in ("push", "submit"):
        assert "'0' is not a number of seconds above 0" in one_line(
            cli(command, chain_dir, "--poll-seconds", "0"))
    assert server.requests == []


def test_a_damaged_record_is_one_line_and_pushes_nothing(server, kaggle, cli, chain_dir):
    (chain_dir / "pushes.json").write_text('{"kernels": {"stage-01": [{"kern')
    assert one_line(cli("push", chain_dir)).startswith(
        f"cannot read {chain_dir / 'pushes.json'} (Unterminated string")
    assert pushes(kaggle) == [0, 0, 0]


# -- every state -------------------------------------------------------------------------------
def test_waiting_states_are_waited_through_and_an_unknown_one_is_named(kaggle, cli, chain_dir):
    kaggle.run = ("NEW_SCRIPT", "QUEUED", "PAUSED_BY_KAGGLE", "RUNNING", "COMPLETE")
    result = cli("push", chain_dir, "--poll-seconds", "0.001")
    assert result.returncode == 0, result.stderr
    for state in ("new_script", "queued", "running", "complete"):
        assert f"jdoe/rcic-b0-stage-01 version 1: {state}\n" in result.stdout
    assert ("jdoe/rcic-b0-stage-01 version 1: paused_by_kaggle (a state rcic does not know: it "
            "keeps waiting for a known one)") in result.stdout
    assert pushes(kaggle) == [1, 1, 1]


@pytest.mark.parametrize("failed", ["ERROR", "CANCEL_REQUESTED", "CANCEL_ACKNOWLEDGED"])
def test_a_failed_kernel_stops_the_chain_and_is_pushed_again_only_with_retry(failed, kaggle, cli,
                                                                             chain_dir):
    kaggle.runs["rcic-b0-stage-02"] = ("RUNNING", {"status": failed,
                                                   "failureMessage": "stopped at 9 h"})
    line = (f"kernel jdoe/rcic-b0-stage-02 version 1 ended in {failed}: stopped at 9 h. Its log: "
            f"rcic-chain output {chain_dir} downloads it; rcic-chain push --retry {chain_dir} "
            f"pushes it again")
    assert one_line(cli("push", chain_dir, "--poll-seconds", "0.001")) == line
    assert pushes(kaggle) == [1, 1, 0]
    assert one_line(cli("push", chain_dir, "--poll-seconds", "0.001")) == line
    assert pushes(kaggle) == [1, 1, 0]

    del kaggle.runs["rcic-b0-stage-02"]
    result = cli("push", chain_dir, "--retry", "--poll-seconds", "0.001")
    assert result.returncode == 0, result.stderr
    assert pushes(kaggle) == [1, 2, 1]
    attempts = record(chain_dir)["kernels"]["stage-02"]
    assert [(a["version"], a["state"]) for a in attempts] == [(1, failed.lower()),
                                                              (2, "complete")]


def test_a_kernel_that_failed_while_no_driver_watched_is_reported_on_resume(kaggle, cli,
                                                                            chain_dir):
    kaggle.run = ("RUNNING",)
    kaggle.runs["rcic-b0-stage-01"] = ("QUEUED", "QUEUED", "ERROR")
    # A driver that stops (here: lost Kaggle) after the push, and a rerun that finds it failed.
    kaggle.stand_in.hook = lambda method, phase: (
        method == STATUS and phase == "before" and len(kaggle.stand_in.bodies(STATUS)) > 1)
    assert "did not answer" in one_line(cli("push", chain_dir, "--poll-seconds", "0.0001"))
    kaggle.stand_in.hook = None
    assert "stage-01 version 1 ended in ERROR" in one_line(cli("push", chain_dir,
                                                               "--poll-seconds", "0.001"))
    assert pushes(kaggle) == [1, 0, 0]


# -- the network -------------------------------------------------------------------------------
def test_network_failures_while_waiting_are_retried_with_backoff(server, kaggle, cli, chain_dir):
    answer, polls = server.handlers[STATUS], {"n": 0}

    def flaky(body):
        polls["n"] += 1
        if polls["n"] in (3, 4):
            return 503, {"code": 503, "message": "Service Unavailable"}
        return answer(body)
    server.handlers[STATUS] = flaky
    # The second poll: the connection drops without an answer.
    server.hook = lambda method, phase: (method == STATUS and phase == "before"
                                         and len(server.bodies(STATUS)) == 2)
    result = cli("push", chain_dir, "--poll-seconds", "0.01")
    assert result.returncode == 0, result.stderr
    what = "no answer from Kaggle for the status of jdoe/rcic-b0-stage-01 version 1"
    # The stand-in is the client's proxy: requests calls a dropped connection a ProxyError.
    assert f"{what} (ProxyError): trying again in 0.01 s" in result.stdout
    assert f"{what} (HTTPError 503): trying again in 0.01 s" in result.stdout
    assert f"{what} (HTTPError 503): trying again in 0.02 s" in result.stdout
    assert pushes(kaggle) == [1, 1, 1]


def test_a_network_that_stays_down_is_one_line_and_a_rerun_continues(server, kaggle, cli,
                                                                      chain_dir):
    answer = server.handlers[STATUS]
    server.handlers[STATUS] = lambda body: (503, {"code": 503, "message": "Service Unavailable"})
    assert one_line(cli("push", chain_dir, "--poll-seconds", "0.0001")) == (
        "Kaggle did not answer the status of jdoe/rcic-b0-stage-01 version 1 9 times in a row "
        "(HTTPError 503): what was pushed is recorded: run rcic-chain push DIR again to continue")
    server.handlers[STATUS] = answer
    assert cli("push", chain_dir, "--poll-seconds", "0.001").returncode == 0
    assert pushes(kaggle) == [1, 1, 1]


# -- submit ------------------------------------------------------------------------------------
@pytest.fixture
def pushed(kaggle, cli, chain_dir):
    assert cli("push", chain_dir, "--poll-seconds", "0.001").returncode == 0
    return chain_dir


def test_submit_sends_the_submission_kernels_output_and_prints_both_scores(server, kaggle, cli,
                                                                          pushed):
    kaggle.score = ("PENDING", "RESCORING", "COMPLETE")     # a state rcic does not know
    result = cli("submit", pushed, "-m", "b0 chain", "--poll-seconds", "0.001")
    assert result.returncode == 0, result.stderr
    assert "submission 1000: rescoring (a state rcic does not know" in result.stdout
    assert "public score 0.97310, private score 0.98127 (submission 1000" in result.stdout
    # The output of the version that completed, uploaded as it was.
    assert server.bodies(OUTPUT)[-1]["kernelSlug"] == "rcic-b0-submit"
    assert server.bodies(OUTPUT)[-1]["versionLabel"] == "v1"
    start = server.bodies(START_UPLOAD)[0]
    assert (start["competitionName"], start["fileName"], start["contentLength"]) == (
        COMPETITION, "submission.csv", len(SUBMISSION))
    assert [data for method, data in server.requests if method.startswith("PUT ")] == [SUBMISSION]
    create = server.bodies(CREATE_SUBMISSION)[0]
    assert (create["competitionName"], create["submissionDescription"]) == (COMPETITION,
                                                                           "b0 chain")
    # Run again: the same submission's scores, not another of the day's submissions.
    result = cli("submit", pushed, "--poll-seconds", "0.001")
    assert result.returncode == 0 and "was submitted before (submission 1000)" in result.stdout
    assert len(kaggle.submissions) == 1
    result = cli("submit", pushed, "--again", "--poll-seconds", "0.001")
    assert "private score 0.98127 (submission 1001" in result.stdout
    assert len(kaggle.submissions) == 2


RULES = "You must accept this competition's rules before you can submit"
LIMIT = "Your team has used its daily Submission allowance (5) today"


@pytest.mark.parametrize("refusal, line", [
    ((403, RULES), f"Kaggle refused the submission to {COMPETITION} (HTTP 403: {RULES})"),
    ((400, LIMIT), f"Kaggle refused the submission to {COMPETITION} (HTTP 400: {LIMIT})"),
    (None, "Kaggle could not score submission 1000: Submission has 19896 rows, expected 19897"),
])
def test_a_refused_or_unscored_submission_is_one_line(refusal, line, server, kaggle, cli, pushed):
    if refusal is None:
        kaggle.score = ("PENDING", "ERROR")
    else:
        code, message = refusal
        server.handlers[CREATE_SUBMISSION] = lambda body: (code, {"code": code,
                                                                  "message": message})
    assert one_line(cli("submit", pushed, "--poll-seconds", "0.001")) == line
    # A refusal submitted nothing: a rerun may submit without --again.
    assert ("submission" in record(pushed)) == (refusal is None)


def test_submit_before_the_chain_completed_is_one_line(kaggle, cli, chain_dir):
    assert one_line(cli("submit", chain_dir)) == (
        f"jdoe/rcic-b0-submit has no completed run pushed from {chain_dir}: run rcic-chain "
        f"push {chain_dir} until it ends with 'chain complete'")
    assert kaggle.submissions == []


# -- status ------------------------------------------------------------------------------------
def test_status_shows_versions_run_times_and_what_the_rest_should_cost(kaggle, cli, chain_dir):
    kaggle.runs["rcic-b0-stage-02"] = ("RUNNING", "ERROR")
    kaggle.outputs["rcic-b0-stage-01"] = {"stage.json": json.dumps({
        "seconds_used": 30240, "steps_this_stage": 900, "samples_per_second": 41.5,
        "stages_left_estimate": 2}).encode()}
    assert cli("push", chain_dir, "--poll-seconds", "0.001").returncode == 2
    # Stage 1 ended while no driver watched (its stage.json times it); stage 2 ran 1 hour.
    data = record(chain_dir)
    data["kernels"]["stage-01"][0].update(running_at=None, finished_at=None)
    data["kernels"]["stage-02"][0].update(running_at=1000.0, finished_at=4600.0)
    (chain_dir / "pushes.json").write_text(json.dumps(data))

    result = cli("status", chain_dir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "stage-01   jdoe/rcic-b0-stage-01  version 1  complete  run time 8.40 h"
    assert lines[1] == "stage-02   jdoe/rcic-b0-stage-02  version 1  error  run time 1.00 h"
    assert lines[2].startswith("submit     jdoe/rcic-b0-submit  version -  unknown  run time -")
    assert lines[3] == "GPU time used by this chain: 9.40 h"
    assert lines[4] == ("Kaggle's weekly GPU quota: 12.0 of 30.0 h used (this account, every "
                        "notebook)")
    assert lines[5] == (
        "remaining: about 8.40 h of GPU (2 more stage(s) at 41.5 samples/s, 8.40 h each as "
        "measured; the chain has only 1 stage(s) left: render a longer one with rcic-chain "
        "init), plus the submission kernel; fits in the 18.0 h of weekly GPU quota left")
    # stage.json was fetched once, from the version that completed, and kept beside it.
    assert (chain_dir / "stage-01" / "output" / "version-1" / "stage.json").is_file()
    assert [b["versionLabel"] for b in kaggle.stand_in.bodies(OUTPUT)] == ["v1"]


# -- Kaggle as it is: late versions, each version's own outputs, one image -------------------
def test_a_push_kaggle_shows_late_is_found_and_not_sent_again(server, kaggle, cli, chain_dir):
    # Kaggle shows each new version only 3 requests after its push, and the first push's
    # answer is lost: the driver stops with an intent it cannot settle yet.
    kaggle.late = 3
    lost = []

    def hook(method, phase):
        if method == SAVE and phase == "applied" and not lost:
            lost.append(method)
            return True
        return False
    server.hook = hook
    assert one_line(cli("push", chain_dir, "--poll-seconds", "0.001")).startswith(
        "cannot reach Kaggle for the push of jdoe/rcic-b0-stage-01")
    assert record(chain_dir)["kernels"]["stage-01"][0]["version"] is None
    server.hook = None
    result = cli("push", chain_dir, "--poll-seconds", "0.001")
    assert result.returncode == 0, result.stderr
    # Asked again until Kaggle showed it, then waited for, not pushed a second time.
    assert "the push sent before the driver stopped reached Kaggle (version 1)" in result.stdout
    assert pushes(kaggle) == [1, 1, 1]
    # The later pushes were answered, and their runs were polled until Kaggle showed them.
    assert "(HTTPError 404): trying again" in result.stdout


def test_submit_reads_the_version_that_completed_not_a_newer_one(server, kaggle, cli, pushed):
    # The submission kernel is pushed again outside rcic (from the web): its newest run wrote
    # another submission.csv and is still running.
    kaggle.outputs["rcic-b0-submit"] = {"submission.csv": b"id_code,sirna\nHEPG2-08_1_B03,99\n"}
    kaggle.runs["rcic-b0-submit"] = ("RUNNING",)
    kaggle.save({"slug": "jdoe/rcic-b0-submit", "text": "edited on the web"})
    result = cli("submit", pushed, "--poll-seconds", "0.001")
    assert result.returncode == 0, result.stderr
    assert [data for method, data in server.requests if method.startswith("PUT ")] == [SUBMISSION]
    assert server.bodies(OUTPUT)[-1]["versionLabel"] == "v1"


def test_a_stale_submission_of_another_version_is_never_sent(server, kaggle, cli, pushed):
    # Version 1 wrote no submission.csv; one from an earlier read lies in the output folder.
    kaggle.versions["rcic-b0-submit"][0]["outputs"] = {}
    stale = pushed / "submit" / "output" / "version-1" / "submission.csv"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(SUBMISSION)
    assert one_line(cli("submit", pushed, "--poll-seconds", "0.001")).startswith(
        "jdoe/rcic-b0-submit version 1 wrote no submission.csv")
    assert kaggle.submissions == []


def test_later_kernels_are_pushed_with_the_image_the_chain_started_on(server, kaggle, cli,
                                                                      chain_dir):
    started_on = kaggle.images[True]
    # Kaggle moves to a new image just after the first push.
    server.hook = lambda method, phase: (phase == "replied" and method == SAVE and
                                         kaggle.images.update({True: "gpu@sha256:2222"}))
    result = cli("push", chain_dir, "--poll-seconds", "0.001")
    assert result.returncode == 0, result.stderr
    saves = server.bodies(SAVE)
    assert [b.get("dockerImagePinningType") for b in saves] == ["original"] * 3
    assert "dockerImage" not in saves[0]
    assert [b["dockerImage"] for b in saves[1:]] == [started_on, started_on]
    assert [v[0]["image"] for v in kaggle.versions.values()] == [started_on] * 3
    assert record(chain_dir)["images"] == {"gpu": started_on}
    meta = json.loads((chain_dir / "stage-02" / "kernel-metadata.json").read_text())
    assert meta["docker_image"] == started_on


def test_cache_kernels_keep_the_cpu_image_and_stages_the_gpu_one(server, kaggle, cli, tmp_path):
    from rcic.cli.chain import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: t\ndata:\n  image_size: 24\ntrain:\n  epochs: 1\n")
    out = tmp_path / "cached"
    assert main(["init", "--owner", "jdoe", "--prefix", "rcic-b0", "--stages", "2", "--cache",
                 "24", "--config", str(recipe), "--out", str(out)]) == 0
    cpu = kaggle.images[False]

    def new_images_after_each_push(method, phase):   # Kaggle's images after push n: "...@n"
        if phase == "replied" and method == SAVE:
            n = len(server.bodies(SAVE))
            kaggle.images.update({True: f"gpu@{n}", False: f"cpu@{n}"})
    server.hook = new_images_after_each_push
    result = cli("push", out, "--poll-seconds", "0.001")
    assert result.returncode == 0, result.stderr
    pinned = {b["slug"].split("/")[1]: b.get("dockerImage") for b in server.bodies(SAVE)}
    # stage-01, the first GPU kernel (third push), ran on the GPU image of its day; the GPU
    # kernels after it follow it, the second cache kernel follows the first.
    assert pinned == {"rcic-b0-cache-train": None, "rcic-b0-cache-test": cpu,
                      "rcic-b0-stage-01": None, "rcic-b0-stage-02": "gpu@2",
                      "rcic-b0-submit": "gpu@2"}
    assert kaggle.versions["rcic-b0-stage-01"][0]["image"] == "gpu@2"
    assert record(out)["images"] == {"cpu": cpu, "gpu": "gpu@2"}


def manifest(**versions):
    return json.dumps({"format": 1, "step": 1, "versions": {
        "python": "3.12.3", "torch": "2.10.0+cu128", "numpy": "2.0.2", "gpu": "Tesla T4",
        **versions}}).encode()


def test_status_shows_the_versions_each_stage_ran_under_and_flags_a_change(kaggle, cli,
                                                                         chain_dir):
    report = json.dumps({"seconds_used": 41000, "steps_this_stage": 900,
                         "samples_per_second": 41.5, "stages_left_estimate": 0}).encode()
    kaggle.outputs["rcic-b0-stage-01"] = {"stage.json": report,
                                          "ckpt-000000900/MANIFEST.json": manifest()}
    kaggle.outputs["rcic-b0-stage-02"] = {
        "stage.json": report,
        "ckpt-000001800/MANIFEST.json": manifest(python="3.13.1", torch="2.11.0+cu128")}
    assert cli("push", chain_dir, "--poll-seconds", "0.001").returncode == 0
    result = cli("status", chain_dir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-2] == ("stage-01   ran under python 3.12.3, torch 2.10.0+cu128, numpy 2.0.2, "
                         "gpu Tesla T4")
    assert lines[-1] == (
        "stage-02   ran under python 3.13.1, torch 2.11.0+cu128, numpy 2.0.2, gpu Tesla T4  "
        "CHANGED since stage-01: python 3.12.3 -> 3.13.1, torch 2.10.0+cu128 -> 2.11.0+cu128 "
        "(Kaggle's image moved; the resume is exact only under the same versions)")


def test_a_version_kaggle_lists_late_is_not_taken_for_the_push_that_followed(server, kaggle,
                                                                            cli, chain_dir):
    assert cli("push", chain_dir, "--poll-seconds", "0.001").returncode == 0
    # Kaggle's list of stage-02's versions lags: version 1 (complete) is not shown when the
    # driver notes the version before pushing again, and the new push's answer is lost.
    kaggle.versions["rcic-b0-stage-02"][0]["hidden"] = 2
    kaggle.late = 4
    server.hook = lambda method, phase: method == SAVE and phase == "applied"
    assert one_line(cli("push", chain_dir, "--from", "stage-02", "--poll-seconds",
                        "0.001")).startswith("cannot reach Kaggle for the push")
    server.hook = None
    result = cli("push", chain_dir, "--poll-seconds", "0.001")
    assert result.returncode == 0, result.stderr
    # Version 1 showing up first is not the new push: the driver waits for version 2.
    assert "reached Kaggle (version 2)" in result.stdout
    attempts = record(chain_dir)["kernels"]["stage-02"]
    assert [(a["version"], a["state"]) for a in attempts] == [(1, "complete"), (2, "complete")]
    assert pushes(kaggle) == [1, 2, 2]
