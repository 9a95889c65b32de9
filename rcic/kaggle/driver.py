"""`rcic-chain push`: run the chain's kernels in order, each exactly once, surviving its own death.

The driver may be killed at any moment (a laptop that sleeps, an SSH session that drops) in a
chain that takes days. It writes down each push before waiting on it (rcic.kaggle.record), and a
rerun asks Kaggle where each kernel stands instead of pushing again:

    recorded and complete         skipped
    recorded, queued or running   waited for
    recorded, failed              reported; pushed again only with --retry
    pushed but not recorded       found by asking Kaggle for the kernel's version
    never pushed                  pushed, once the kernel before it has completed

Kaggle may show a new version some time after the push that made it, so a push Kaggle does not
show yet is asked about again, VISIBLE_WITHIN_ASKS times a poll apart, before the driver takes
it as never sent (once is enough for an intent older than SETTLED_SECONDS).

Every GPU kernel after the chain's first GPU kernel is pushed with the docker image that one
runs on, as Kaggle reports it (`docker_image` in kernel-metadata.json, recorded in pushes.json
under "images"), and every CPU kernel (the caches) with the first CPU kernel's: the whole chain
runs on one image of each kind where Kaggle allows it.
"""
import time

from rcic.errors import UserError
from rcic.kaggle import chain, client, lock, metadata
from rcic.kaggle.record import Record

VISIBLE_WITHIN_ASKS = 5
SETTLED_SECONDS = 15 * 60


class Driver:
    def __init__(self, chain_dir, api, poll_seconds, echo=print, sleep=time.sleep):
        self.chain_dir, self.api, self.poll_seconds = chain_dir, api, poll_seconds
        self.echo, self.sleep = echo, sleep
        self.record = Record(chain_dir)

    def run(self, retry=False, start_from=None):
        folders = chain.kernel_folders(self.chain_dir)
        self.folders = folders
        if start_from is not None:
            names = [f.name for f in folders]
            if start_from not in names:
                raise UserError(f"--from {start_from}: {self.chain_dir} has no such kernel; "
                                f"choose one of {', '.join(names)}")
            for name in names[names.index(start_from):]:
                self.record.forget(name)
        for folder in folders:
            self.run_kernel(folder, retry)
        self.echo(f"chain complete: rcic-chain submit {self.chain_dir} submits its output")

    def run_kernel(self, folder, retry):
        name, kernel = folder.name, chain.kernel_id(folder)
        attempt = self.resolve_intent(name, kernel)
        if attempt is not None and attempt["state"] not in client.FINISHED:
            self.echo(f"{kernel} version {attempt['version']} was pushed before: waiting for it")
            # Pushed a while ago: its state is this version's, not a previous run's.
            settled = time.time() - attempt["pushed_at"] > 3 * self.poll_seconds
            self.watch(attempt, trust_after_polls=0 if settled else 3)
        if attempt is None or (attempt["state"] in client.FAILED and retry):
            attempt = self.push(name, folder, kernel)
            self.watch(attempt)
        elif attempt["state"] == client.COMPLETE:
            self.echo(f"{kernel} version {attempt['version']}: complete (not pushed again)")
        if attempt["state"] in client.FAILED:
            detail = f": {attempt['message']}" if attempt["message"] else ""
            raise UserError(f"kernel {kernel} version {attempt['version']} ended in "
                            f"{attempt['state'].upper()}{detail}. Its log: rcic-chain output "
                            f"{self.chain_dir} downloads it; rcic-chain push --retry "
                            f"{self.chain_dir} pushes it again")

    def resolve_intent(self, name, kernel):
        """The kernel's current attempt, once an intent left by a killed driver is settled:
        Kaggle's version is newer than the one before the push: the push landed."""
        attempt = self.record.current(name)
        if attempt is None or attempt["version"] is not None:
            return attempt
        recent = time.time() - attempt["intent_at"] < SETTLED_SECONDS
        for ask in range(VISIBLE_WITHIN_ASKS if recent else 1):
            if ask:
                self.sleep(self.poll_seconds)
            version = client.current_version(self.api, kernel, self.poll_seconds, self.echo,
                                             self.sleep)
            if version is not None and (attempt["before"] is None
                                        or version > attempt["before"]):
                self.echo(f"{kernel}: the push sent before the driver stopped reached Kaggle "
                          f"(version {version})")
                self.record.update(attempt, version=version, pushed_at=attempt["intent_at"])
                return attempt
        self.record.drop(name)
        return None

    def version_before(self, name, kernel):
        """The kernel's newest version now: Kaggle's word, or a newer one this folder pushed
        that Kaggle does not show yet."""
        shown = client.current_version(self.api, kernel, self.poll_seconds, self.echo,
                                       self.sleep)
        known = [a["version"] for a in self.record.attempts(name) if a["version"] is not None]
        return max(filter(None, [shown, *known]), default=None)

    def pin_image(self, folder):
        """Give a kernel the image the chain's first kernel of its kind (GPU or CPU) runs on,
        when Kaggle says which (recorded once, so every later kernel gets the same)."""
        path = folder / metadata.KERNEL_METADATA
        meta = metadata.read_json(path)
        kind = "gpu" if meta["enable_gpu"] else "cpu"
        first = next(f for f in self.folders
                     if metadata.read_json(f / metadata.KERNEL_METADATA)["enable_gpu"]
                     == meta["enable_gpu"])
        if first == folder:
            return
        images = self.record.data.setdefault("images", {})
        if kind not in images:
            image = client.kernel_image(self.api, chain.kernel_id(first), self.poll_seconds,
                                        self.echo, self.sleep)
            if image is None:
                return
            images[kind] = image
            self.record.save()
        if meta.get("docker_image") != images[kind]:
            metadata.write_json(path, {**meta, "docker_image": images[kind]})

    def push(self, name, folder, kernel):
        self.pin_image(folder)
        attempt = self.record.intend(name, kernel, self.version_before(name, kernel))
        version, url, problem = client.push(self.api, folder, kernel)
        self.record.update(attempt, version=version, pushed_at=time.time())
        if problem:
            raise UserError(f"{problem}, then run rcic-chain push --from {name} "
                            f"{self.chain_dir}")
        self.echo(f"pushed {kernel} (version {version}): {url}")
        return attempt

    def watch(self, attempt, trust_after_polls=3):
        seen = set()

        def on_state(state):
            now = time.time()
            if state not in client.FINISHED:
                seen.add(state)
                if state == "running" and attempt["running_at"] is None:
                    self.record.update(attempt, running_at=now)
            elif seen:
                # Timed only when the driver saw the run end: one that ended while the driver
                # was away took an unknown time (rcic-chain status reads its stage.json then).
                self.record.update(attempt, finished_at=now)
        state, message = client.wait(self.api, attempt["kernel"], attempt["version"],
                                     self.poll_seconds, self.echo, self.sleep, on_state,
                                     trust_after_polls)
        self.record.update(attempt, state=state, message=message)


def push_chain(chain_dir, api, poll_seconds, retry=False, start_from=None, echo=print):
    with lock.exclusive(chain_dir, f"rcic-chain push {chain_dir}"):
        Driver(chain_dir, api, poll_seconds, echo).run(retry, start_from)
