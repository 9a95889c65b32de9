"""Push, watch and download kernels, submit, and publish the bundle, through the real `kaggle`
client.

The client reports most server-side failures in what it returns, not by raising or by its
exit status (a rejected push is a response with `error` set; a failed kernel is a status of
ERROR), so every call here reads the answer and turns a failure into one UserError line.
`kaggle` is imported only here and only when called: its import authenticates.
"""
import contextlib
import io
import time
from pathlib import Path

from rcic.errors import UserError

# The states Kaggle reports for a kernel's run (kagglesdk's KernelWorkerStatus), lower-cased.
WAITING = {"queued", "running", "new_script"}       # new_script: saved, not yet queued
COMPLETE = "complete"
# A run being cancelled will not complete either: the chain cannot go on from it.
FAILED = {"error", "cancel_requested", "cancel_acknowledged"}
FINISHED = FAILED | {COMPLETE}

# A network failure while waiting is retried after poll_seconds, then twice as long each time,
# up to MAX_BACKOFF_SECONDS apart; after NETWORK_RETRIES failures in a row the driver stops
# (what it pushed is recorded: rerunning it continues).
NETWORK_RETRIES = 8
MAX_BACKOFF_SECONDS = 30 * 60


# The oldest client that has every call rcic makes and reads the version it is asked for:
# `get_submission` arrived in 2.2.5, and through 2.2.4 `kernels_status` and `kernels_output`
# dropped the N of owner/slug/N, so Kaggle answered for the newest run (docs/rxrx1-and-kaggle.md).
# setup.py and constraints/kaggle-floor.txt say the same; a test keeps the three equal.
CLIENT_FLOOR = "2.2.5"

# Both ways of giving credentials, as Kaggle's settings page offers them (2026-12).
WAYS = ("an API token (kaggle.com > Settings > API > Generate New Token) in KAGGLE_API_TOKEN or "
        "~/.kaggle/access_token, or the legacy key kaggle.json in ~/.kaggle/ or "
        "$KAGGLE_CONFIG_DIR (or KAGGLE_USERNAME and KAGGLE_KEY)")
TOKEN_PLACES = {"KAGGLE_API_TOKEN": "KAGGLE_API_TOKEN", "access_token": "~/.kaggle/access_token"}


def require_client():
    """A UserError when the installed kaggle client is older than CLIENT_FLOOR."""
    from importlib import metadata

    from packaging.version import Version

    installed = metadata.version("kaggle")
    if Version(installed) < Version(CLIENT_FLOOR):
        raise UserError(f"kaggle {installed} is installed, and rcic-chain needs kaggle>="
                        f"{CLIENT_FLOOR} (older clients read a kernel's newest run instead of "
                        f"the recorded one, and cannot fetch a submission's score): pip install "
                        f"-U 'kaggle>={CLIENT_FLOOR}'")


def connect():
    """An authenticated KaggleApi, or a UserError saying how to give it credentials."""
    require_client()
    api, refused = authenticate()
    if refused:
        raise UserError(f"Kaggle refused the API token in {refused} (expired or revoked?): give "
                        f"{WAYS}, and remove the refused token")
    if api is None:
        raise UserError(f"no Kaggle credentials: give {WAYS}")
    return api


def authenticate():
    """(the KaggleApi, or None when it found no credentials it could use; where the API token
    Kaggle refused is, or None)."""
    import requests

    # Importing kaggle tries to authenticate and, without credentials, prints a page of help.
    with contextlib.redirect_stdout(io.StringIO()):
        from kaggle.api.kaggle_api_extended import AuthMethod, KaggleApi
        from kagglesdk import get_access_token_from_env
        api = KaggleApi()
        token, source = get_access_token_from_env()
        try:
            api.authenticate()
        except SystemExit:
            api = None
        except requests.HTTPError as err:   # the client lets a 401 of its token check through
            if not token or http_status(err) != 401:
                with calling("the check of your API token"):
                    raise
            api = None
    # The client asks Kaggle whom a token belongs to; a refused one (expired, revoked) it skips
    # without a word, and its HTTP layer would still send it with every call.
    by_token = api is not None and (api.config_values.get(api.CONFIG_NAME_AUTH_METHOD)
                                    == str(AuthMethod.ACCESS_TOKEN))
    return api, (TOKEN_PLACES.get(source, source) if token and not by_token else None)


@contextlib.contextmanager
def calling(what):
    """Turn the client's exceptions (HTTP errors, its own checks, no network) into one line."""
    import requests

    try:
        yield
    except requests.HTTPError as err:
        code = err.response.status_code if err.response is not None else "?"
        raise UserError(f"Kaggle refused {what} (HTTP {code}: {err})") from None
    except requests.ConnectionError as err:
        raise UserError(f"cannot reach Kaggle for {what} ({type(err).__name__}): check the "
                        f"network and try again") from None
    except ValueError as err:
        raise UserError(f"the kaggle client refused {what}: {err}") from None


def transient(err):
    """Whether a failed call is worth repeating: no network, a timeout, Kaggle busy or down."""
    import requests

    if isinstance(err, (requests.ConnectionError, requests.Timeout)):
        return True
    if isinstance(err, requests.HTTPError) and err.response is not None:
        return err.response.status_code == 429 or err.response.status_code >= 500
    return False


def http_status(err):
    response = getattr(err, "response", None)
    return response.status_code if response is not None else None


def patiently(call, what, poll_seconds, echo, sleep, then, retry_missing=False):
    """call(), repeating it after a network failure with growing pauses; any other failure,
    or NETWORK_RETRIES failures in a row, is one line. `then` says how to carry on after that.
    `retry_missing`: a 404 is also repeated (a version just pushed may not be visible yet)."""
    for failures in range(NETWORK_RETRIES + 1):
        try:
            return call()
        except Exception as err:   # the client raises requests', urllib3's and its own types
            if not (transient(err) or (retry_missing and http_status(err) == 404)):
                with calling(what):
                    raise
            reason = f"{type(err).__name__}" + (f" {http_status(err)}" if http_status(err) else "")
            if failures == NETWORK_RETRIES:
                raise UserError(f"Kaggle did not answer {what} {failures + 1} times in a row "
                                f"({reason}): {then}") from None
            delay = min(poll_seconds * 2 ** failures, MAX_BACKOFF_SECONDS)
            echo(f"no answer from Kaggle for {what} ({reason}): trying again in {delay:g} s")
            sleep(delay)


def push(api, folder, kernel):
    """Push one kernel folder; returns (version number, url, problem): a rejected push is a
    UserError; `problem` says which inputs Kaggle did not accept for a kernel it saved."""
    with calling(f"the push of {kernel}"):
        response = api.kernels_push(str(folder))
    if response is None:
        raise UserError(f"Kaggle rejected the push of {kernel}: the client got no answer")
    if response.error:
        raise UserError(f"Kaggle rejected the push of {kernel}: {response.error}")
    invalid = {"dataset": response.invalid_dataset_sources,
               "competition": response.invalid_competition_sources,
               "kernel": response.invalid_kernel_sources}
    listed = "; ".join(f"{kind} {', '.join(names)}" for kind, names in invalid.items() if names)
    problem = None
    if listed:
        # The kernel was saved, but it runs without these inputs and fails.
        problem = (f"Kaggle accepted {kernel} but not its inputs ({listed}): publish the bundle "
                   f"(rcic-chain publish-bundle) and join the competition")
    return response.version_number, response.url, problem


def current_version(api, kernel, poll_seconds=60.0, echo=print, sleep=time.sleep):
    """The number of the kernel's newest version on Kaggle, or None when it has none. Kaggle
    may show a version only a while after the push that made it."""
    meta = kernel_metadata(api, kernel, poll_seconds, echo, sleep)
    return meta.current_version_number if meta is not None else None


def kernel_image(api, kernel, poll_seconds=60.0, echo=print, sleep=time.sleep):
    """The docker image Kaggle says the kernel's newest version runs on, or None if it says
    none (or the kernel has no version)."""
    meta = kernel_metadata(api, kernel, poll_seconds, echo, sleep)
    return (meta.docker_image or None) if meta is not None else None


def kernel_metadata(api, kernel, poll_seconds, echo, sleep):
    """kagglesdk's metadata of the kernel's newest version, or None when it has none. (The
    client has no call for it: kernels_pull writes files.)"""
    import requests
    from kagglesdk.kernels.types.kernels_api_service import ApiGetKernelRequest

    request = ApiGetKernelRequest()
    request.user_name, request.kernel_slug = kernel.split("/")

    def call():
        try:
            with api.build_kaggle_client() as kaggle:
                return kaggle.kernels.kernels_api_client.get_kernel(request).metadata
        except requests.HTTPError as err:
            if http_status(err) == 404:
                return None
            raise
    return patiently(call, f"the versions of {kernel}", poll_seconds, echo, sleep,
                     "run the same command again once Kaggle answers")


def read_status(api, kernel, version=None):
    """(state, failure message) of a kernel's latest run, or of `version`; raises what the
    client raises. state is lower-case, e.g. 'running', or the name of a state rcic does not
    know (kagglesdk cannot parse one: the KeyError it raises carries the name)."""
    try:
        response = api.kernels_status(f"{kernel}/{version}" if version else kernel)
    except KeyError as err:
        return (str(err.args[0]).lower() if err.args else "unknown"), ""
    return response.status.name.lower(), response.failure_message or ""


def status(api, kernel, version=None):
    with calling(f"the status of {kernel}"):
        return read_status(api, kernel, version)


def wait(api, kernel, version, poll_seconds, echo=print, sleep=time.sleep, on_state=None,
         trust_after_polls=3):
    """Poll a kernel's run until it has finished; returns (state, failure message).

    Just after a push the server may still answer with the previous run's final state, so a
    finished state is trusted once the run was seen waiting, or after `trust_after_polls` polls
    (0 for a run pushed long ago). `on_state(state)` hears every change of state.
    """
    seen_waiting, last, polls = False, None, 0
    ref = f"{kernel} version {version}" if version else kernel
    while True:
        state, message = patiently(lambda: read_status(api, kernel, version),
                                   f"the status of {ref}", poll_seconds, echo, sleep,
                                   "what was pushed is recorded: run rcic-chain push DIR again "
                                   "to continue", retry_missing=True)
        polls += 1
        if state != last:
            known = state in WAITING or state in FINISHED
            echo(f"{ref}: {state}" + ("" if known else " (a state rcic does not know: it "
                                                        "keeps waiting for a known one)"))
            last = state
            if on_state is not None:
                on_state(state)
        if state not in FINISHED:
            seen_waiting = True
        elif seen_waiting or polls >= trust_after_polls:
            return state, message
        sleep(poll_seconds)


def download_output(api, kernel, dest, version=None, pattern=None):
    """Download a kernel's outputs (those whose name matches the regex `pattern`, and the log)
    into `dest`; returns the files written."""
    dest.mkdir(parents=True, exist_ok=True)
    with calling(f"the outputs of {kernel}"):
        files, _ = api.kernels_output(f"{kernel}/{version}" if version else kernel, str(dest),
                                      file_pattern=pattern, force=True, quiet=True)
    return files


def download_version(api, kernel, version, dest, pattern=None):
    """Download what run `version` of `kernel` wrote (the files matching `pattern`, and its log)
    into dest/version-N; returns {name: path} of the files this call wrote.

    The read is pinned to the version (the client sends it as `versionLabel`: without one
    Kaggle answers for the newest run), and only files written for it are returned: a file a
    read of another version left in `dest` is never taken for this one's."""
    if version is None:
        raise UserError(f"no recorded version of {kernel} to read: run rcic-chain push first")
    folder = Path(dest) / f"version-{version}"
    files = download_output(api, kernel, folder, version, pattern)
    return {Path(f).relative_to(folder).as_posix(): Path(f) for f in files}


def submit_file(api, path, competition, message):
    """Upload a submission file to the competition; returns Kaggle's ref of the submission."""
    with calling(f"the submission to {competition}"):
        response = api.competition_submit(str(path), message, competition, quiet=True)
    if response is None or not response.ref:
        reason = (response.message if response is not None else "") or "no answer"
        raise UserError(f"Kaggle did not take the submission to {competition}: {reason}")
    return response.ref


def read_submission(api, ref):
    """(state, public score, private score, error) of a submission; raises what the client
    raises. A state kagglesdk cannot parse comes back by its name, as in read_status."""
    try:
        submission = api.get_submission(ref)
    except KeyError as err:
        return (str(err.args[0]).lower() if err.args else "unknown"), None, None, None
    return (submission.status.name.lower(), submission.public_score, submission.private_score,
            (submission.error_description or "").strip())


def wait_for_score(api, ref, poll_seconds, echo=print, sleep=time.sleep):
    """Poll a submission until Kaggle has scored it; returns (public, private) scores."""
    last = None
    while True:
        state, public, private, error = patiently(
            lambda: read_submission(api, ref), f"the score of submission {ref}", poll_seconds,
            echo, sleep, "run rcic-chain submit DIR again to keep waiting", retry_missing=True)
        if state != last:
            known = state in ("pending", "complete", "error")
            echo(f"submission {ref}: {state}" + ("" if known else " (a state rcic does not "
                                                                  "know: it keeps waiting)"))
            last = state
        if state == "complete":
            return public, private
        if state == "error":
            raise UserError(f"Kaggle could not score submission {ref}: "
                            f"{error or 'no reason given'}")
        sleep(poll_seconds)


def gpu_quota(api):
    """(hours used, hours allowed) of the account's weekly GPU quota, or None if not told."""
    import requests

    try:
        quota = api.quota_view().gpu_quota
    except (requests.RequestException, ValueError):
        return None
    if quota is None or quota.total_time_allowed is None or quota.time_used is None:
        return None
    return quota.time_used.total_seconds() / 3600, quota.total_time_allowed.total_seconds() / 3600


def publish_dataset(api, folder, ref, notes):
    """Create the dataset `ref` from `folder`, or add a version when it exists already."""
    import requests

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            api.dataset_status(ref)
        exists = True
    except requests.HTTPError:
        exists = False
    with calling(f"the upload of dataset {ref}"):
        if exists:
            response = api.dataset_create_version(str(folder), notes, quiet=True)
        else:
            response = api.dataset_create_new(str(folder), public=False, quiet=True)
    if response is None or response.error:
        reason = response.error if response is not None else "the client got no answer"
        raise UserError(f"Kaggle rejected dataset {ref}: {reason}")
    return ("new version of " if exists else "created ") + (response.url or ref)
