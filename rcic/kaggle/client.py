"""Push, watch and download kernels, and publish the bundle, through the real `kaggle` client.

The client reports most server-side failures in what it returns, not by raising or by its
exit status (a rejected push is a response with `error` set; a failed kernel is a status of
ERROR), so every call here reads the answer and turns a failure into one UserError line.
`kaggle` is imported only here and only when called: its import authenticates.
"""
import contextlib
import io
import time

from rcic.errors import UserError

FINISHED = {"complete", "error", "cancel_requested", "cancel_acknowledged"}
FAILED = FINISHED - {"complete"}


def connect():
    """An authenticated KaggleApi, or a UserError saying how to give it credentials."""
    # Importing kaggle tries to authenticate and, without credentials, prints a page of help.
    with contextlib.redirect_stdout(io.StringIO()):
        from kaggle.api.kaggle_api_extended import KaggleApi
        api = KaggleApi()
        try:
            api.authenticate()
        except SystemExit:
            raise UserError("no Kaggle credentials: put kaggle.json (from kaggle.com > Settings "
                            "> API > Create New Token) in ~/.kaggle/ or $KAGGLE_CONFIG_DIR, or "
                            "set KAGGLE_USERNAME and KAGGLE_KEY") from None
    return api


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


def push(api, folder, kernel):
    """Push one kernel folder; returns (version number, url). A rejected push is a UserError."""
    with calling(f"the push of {kernel}"):
        response = api.kernels_push(str(folder))
    if response is None:
        raise UserError(f"Kaggle rejected the push of {kernel}: the client got no answer")
    if response.error:
        raise UserError(f"Kaggle rejected the push of {kernel}: {response.error}")
    invalid = {"dataset": response.invalid_dataset_sources,
               "competition": response.invalid_competition_sources,
               "kernel": response.invalid_kernel_sources}
    invalid = {kind: names for kind, names in invalid.items() if names}
    if invalid:
        listed = "; ".join(f"{kind} {', '.join(names)}" for kind, names in invalid.items())
        # The kernel was saved, but it would run without these inputs and fail: stop here.
        raise UserError(f"Kaggle accepted {kernel} but not its inputs ({listed}): publish the "
                        f"bundle (rcic-chain publish-bundle), join the competition, and push "
                        f"the kernels in order")
    return response.version_number, response.url


def status(api, kernel):
    """(state, failure message) of a kernel's latest run; state is e.g. 'running', 'error'."""
    with calling(f"the status of {kernel}"):
        response = api.kernels_status(kernel)
    state = getattr(response.status, "name", str(response.status)).lower()
    return state, response.failure_message or ""


def wait(api, kernel, poll_seconds, echo=print, sleep=time.sleep, trust_after_polls=3):
    """Poll until the kernel's run has finished; a run that failed is a UserError.

    Just after a push the server may still answer with the previous run's final state, so a
    finished state is trusted once a run was seen queued or running, or after a few polls.
    """
    seen_active, last, polls = False, None, 0
    while True:
        state, message = status(api, kernel)
        polls += 1
        if state != last:
            echo(f"{kernel}: {state}")
            last = state
        if state not in FINISHED:
            seen_active = True
        elif seen_active or polls >= trust_after_polls:
            break
        sleep(poll_seconds)
    if state in FAILED:
        detail = f": {message}" if message else ""
        raise UserError(f"kernel {kernel} ended in {state.upper()}{detail}. Its log: "
                        f"rcic-chain output DIR downloads it beside the outputs")
    return state


def download_output(api, kernel, dest):
    """Download a kernel's outputs and log into `dest`; returns the files written."""
    dest.mkdir(parents=True, exist_ok=True)
    with calling(f"the outputs of {kernel}"):
        files, _ = api.kernels_output(kernel, str(dest), force=True, quiet=True)
    return files


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
