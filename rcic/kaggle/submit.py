"""`rcic-chain submit`: send the submission kernel's submission.csv to the competition and wait
for its public and private scores.

It submits the version of the submission kernel that `rcic-chain push` saw complete, and writes
down in DIR/pushes.json ("submission") what it sent before it waits. Run again for the same
version it waits for (or shows) that submission's scores instead of using another of the day's
submissions; --again submits anew.
"""
import time

from rcic.errors import UserError
from rcic.kaggle import chain, client, lock, metadata
from rcic.kaggle.record import Record

SUBMISSION_FILE = "submission.csv"


def completed_version(api, record, folder, kernel):
    """The submission kernel's version that completed, asking Kaggle if no driver saw it end."""
    attempt = record.current(folder.name)
    if attempt is not None and attempt["version"] is not None and attempt["state"] is None:
        state, message = client.status(api, kernel, attempt["version"])
        if state in client.FINISHED:
            record.update(attempt, state=state, message=message)
    if attempt is None or attempt["state"] != client.COMPLETE:
        raise UserError(f"{kernel} has no completed run pushed from {folder.parent}: run "
                        f"rcic-chain push {folder.parent} until it ends with 'chain complete'")
    return attempt["version"]


def submit_chain(chain_dir, api, message, poll_seconds, again=False, echo=print,
                 sleep=time.sleep):
    with lock.exclusive(chain_dir, f"rcic-chain submit {chain_dir}"):
        record = Record(chain_dir)
        folder = chain.kernel_folders(chain_dir)[-1]
        kernel = chain.kernel_id(folder)
        version = completed_version(api, record, folder, kernel)
        competition = metadata.read_json(folder / metadata.KERNEL_METADATA)[
            "competition_sources"][0]
        sent = record.data.get("submission")
        if sent is None or sent["version"] != version or again:
            sent = send(api, record, folder, kernel, version, competition,
                        message or f"{kernel} version {version} (rcic)", echo)
        elif sent["ref"] is None:
            raise UserError(f"a submission of {kernel} version {version} was being sent when "
                            f"rcic-chain submit stopped, and it cannot tell whether Kaggle took "
                            f"it: look with `kaggle competitions submissions {competition}`; "
                            f"rcic-chain submit --again {chain_dir} submits anyway")
        else:
            echo(f"{kernel} version {version} was submitted before (submission {sent['ref']})")
        public, private = client.wait_for_score(api, sent["ref"], poll_seconds, echo, sleep)
        record.update(sent, public_score=public, private_score=private)
        echo(f"public score {public or 'not shown'}, private score {private or 'not shown'} "
             f"(submission {sent['ref']} to {competition})")


def send(api, record, folder, kernel, version, competition, message, echo):
    files = client.download_version(api, kernel, version, folder / "output",
                                    rf"^{SUBMISSION_FILE}$")
    if SUBMISSION_FILE not in files:
        raise UserError(f"{kernel} version {version} wrote no {SUBMISSION_FILE}: read its log in "
                        f"{folder / 'output' / f'version-{version}'}")
    path = files[SUBMISSION_FILE]
    sent = {"version": version, "sent_at": time.time(), "ref": None, "message": message}
    record.data["submission"] = sent
    record.save()
    try:
        ref = client.submit_file(api, path, competition, message)
    except UserError:
        # Refused: nothing was submitted, so a rerun may submit without --again.
        del record.data["submission"]
        record.save()
        raise
    record.update(sent, ref=ref)
    echo(f"submitted {path} ({kernel} version {version}) to {competition}: "
         f"submission {ref}")
    return sent
