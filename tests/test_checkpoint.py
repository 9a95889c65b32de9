"""rcic.checkpoint: atomic commits, verified discovery, refusals, and real kills and disk errors."""
import json
import logging
import multiprocessing
import os
import random
import re
import resource
import signal
import time
from pathlib import Path

import pytest
import torch

from rcic import __version__
from rcic.checkpoint import copy_checkpoint, find_checkpoints, load_state, save_checkpoint
from rcic.errors import UserError

# Forked children start at once (a fresh interpreter would spend seconds importing torch) and
# are still real processes that receive real signals and hit real resource limits. They only
# save tensors made here beforehand: torch's thread pool may not survive a fork.
fork = multiprocessing.get_context("fork")
SMALL = torch.arange(10, dtype=torch.float32)
MEDIUM = torch.randn(100_000, generator=torch.Generator().manual_seed(1))  # 400 kB
BIG = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))  # 4 MB: kills land in saves


def newest(roots, recipe_hash=None):
    """The newest valid checkpoint, as the stage picks it (find_checkpoints is newest first)."""
    found = find_checkpoints(roots, recipe_hash)
    return found[0] if found else None


def _save(out, step, recipe="r1", keep=1, x=SMALL, **kw):
    state = {"step": step, "x": x}
    return save_checkpoint(out, state, step=step, epoch=step // 10, recipe_hash=recipe, keep=keep, **kw)


def _committed(out):
    return sorted(p.name for p in Path(out).iterdir())


def test_round_trip(tmp_path):
    path = _save(tmp_path, 7, done=True, extra_files={"recipe.yaml": "a: 1\n", "w.bin": b"\x00\x01"},
                 info={"seconds_used": 12.5})
    assert path == tmp_path / "ckpt-000000007"
    ref = newest([tmp_path])
    assert ref.path == path
    assert (ref.step, ref.epoch, ref.recipe_hash, ref.done) == (7, 0, "r1", True)
    assert ref.info == {"seconds_used": 12.5}
    assert set(ref.manifest["files"]) == {"state.pt", "recipe.yaml", "w.bin"}
    assert ref.manifest["files"]["w.bin"]["bytes"] == 2
    state = load_state(ref)
    assert state["step"] == 7 and torch.equal(state["x"], SMALL)
    assert (path / "recipe.yaml").read_text() == "a: 1\n"
    assert _committed(tmp_path) == ["ckpt-000000007"]  # no temporary folder left behind


def test_keep_prunes_older_checkpoints_of_the_same_recipe_only(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step, keep=2)
    assert _committed(tmp_path) == ["ckpt-000000002", "ckpt-000000003"]
    _save(tmp_path / "b", 5, recipe="other")
    _save(tmp_path / "b", 9)
    assert _committed(tmp_path / "b") == ["ckpt-000000005", "ckpt-000000009"]
    _save(tmp_path / "b", 10)
    assert _committed(tmp_path / "b") == ["ckpt-000000005", "ckpt-000000010"]


def test_saving_a_step_again_replaces_it(tmp_path):
    _save(tmp_path, 4, info={"v": 1})
    _save(tmp_path, 4, info={"v": 2})
    assert _committed(tmp_path) == ["ckpt-000000004"]
    assert newest(tmp_path).info == {"v": 2}


def test_damaged_checkpoints_are_skipped_with_a_warning(tmp_path, caplog):
    for step in range(1, 6):
        _save(tmp_path, step, keep=5, x=MEDIUM)
    truncated, tampered, no_manifest, bad_manifest = (tmp_path / f"ckpt-00000000{s}" for s in (5, 4, 3, 2))
    data = (truncated / "state.pt").read_bytes()
    (truncated / "state.pt").write_bytes(data[: len(data) // 2])
    data = bytearray((tampered / "state.pt").read_bytes())
    data[-1000] ^= 0xFF  # same size, one byte changed: only the sha256 can tell
    (tampered / "state.pt").write_bytes(bytes(data))
    (no_manifest / "MANIFEST.json").unlink()
    (bad_manifest / "MANIFEST.json").write_text('{"format": 1, "step": ')
    with caplog.at_level(logging.WARNING, logger="rcic"):
        ref = newest([tmp_path])
    assert ref.step == 1 and load_state(ref)["step"] == 1
    warned = "\n".join(r.getMessage() for r in caplog.records)
    assert f"{truncated}: state.pt has" in warned and "truncated" in warned
    assert f"{tampered}: state.pt does not match its sha256" in warned
    assert f"{no_manifest}: no MANIFEST.json" in warned
    assert f"{bad_manifest}: MANIFEST.json cannot be read" in warned
    assert [r.step for r in find_checkpoints(tmp_path)] == [1]


def test_search_is_recursive_across_roots(tmp_path):
    # Kaggle mounts kernel outputs at varying depths under /kaggle/input.
    _save(tmp_path / "input" / "notebooks" / "me" / "stage-1" / "out", 10)
    _save(tmp_path / "input" / "stage-2", 20)
    _save(tmp_path / "input" / "a" / "b" / "c", 30, recipe="r2")
    _save(tmp_path / "working", 15)
    os.symlink(tmp_path / "input", tmp_path / "input" / "a" / "loop")  # must not hang
    roots = [tmp_path / "input", tmp_path / "working", tmp_path / "missing", tmp_path / "input"]
    assert [(r.step, r.recipe_hash) for r in find_checkpoints(roots)] == \
        [(30, "r2"), (20, "r1"), (15, "r1"), (10, "r1")]
    assert newest(roots, recipe_hash="r1").step == 20
    assert newest(roots, recipe_hash="r3") is None
    assert newest(tmp_path / "working" / "ckpt-000000015").step == 15  # a root may be one


def test_a_checkpoint_renamed_aside_by_an_interrupted_replace_is_still_found(tmp_path):
    path = _save(tmp_path, 3)
    path.rename(tmp_path / "ckpt-000000003.old-1a2b3c4d")  # killed between the two renames
    ref = newest(tmp_path)
    assert ref.step == 3 and load_state(ref)["step"] == 3
    _save(tmp_path, 3)
    assert _committed(tmp_path) == ["ckpt-000000003"]  # the leftover goes after the next commit


def test_checkpoint_of_a_newer_rcic_is_refused(tmp_path):
    path = _save(tmp_path, 1)
    manifest = json.loads((path / "MANIFEST.json").read_text())
    manifest["package_version"] = "0.3.0"
    (path / "MANIFEST.json").write_text(json.dumps(manifest))
    ref = newest(tmp_path)
    with pytest.raises(UserError, match=rf"checkpoint .*ckpt-000000001 was written by rcic 0.3.0, "
                                        rf"this is {re.escape(__version__)}: upgrade rcic \(pip install -U"):
        load_state(ref)
    manifest["package_version"] = __version__.rsplit(".0", 1)[0]  # the same release written differently
    (path / "MANIFEST.json").write_text(json.dumps(manifest))
    assert load_state(newest(tmp_path))["step"] == 1


def test_a_checkpoint_damaged_after_discovery_fails_to_load_with_one_line(tmp_path):
    ref = newest(_save(tmp_path, 1, x=MEDIUM).parent)
    data = (ref.path / "state.pt").read_bytes()
    (ref.path / "state.pt").write_bytes(data[:1000])
    with pytest.raises(UserError) as err:
        load_state(ref)
    assert str(err.value).startswith(f"checkpoint {ref.path} cannot be loaded (")
    assert "\n" not in str(err.value)


def test_copy_carries_a_checkpoint_forward(tmp_path):
    ref = newest(_save(tmp_path / "old", 8, done=True, extra_files={"w.bin": b"abc"}).parent)
    copied = copy_checkpoint(ref, tmp_path / "new")
    assert copied == tmp_path / "new" / "ckpt-000000008"
    new = newest(tmp_path / "new")
    assert new.manifest == ref.manifest and load_state(new)["step"] == 8
    assert copy_checkpoint(new, tmp_path / "new") == copied  # onto itself: nothing to do
    # A source damaged after discovery is not committed at the destination.
    (ref.path / "w.bin").write_bytes(b"xyz")
    with pytest.raises(UserError, match="changed while it was copied"):
        copy_checkpoint(ref, tmp_path / "third")
    assert _committed(tmp_path / "third") == []


def test_unwritable_output_folder_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UserError, match=f"could not save a checkpoint in {tmp_path / 'file' / 'out'}"):
        _save(tmp_path / "file" / "out", 1)


def _save_under_file_size_limit(out, limit, extra_files, message_path):
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # longer files fail with EFBIG
    try:
        _save(out, 2, x=MEDIUM, extra_files=extra_files)
    except UserError as err:
        Path(message_path).write_text(str(err))
        os._exit(3)
    os._exit(0)


@pytest.mark.parametrize("limit, extra_files", [
    (100_000, {}),                         # fails inside torch.save
    (500_000, {"big.bin": b"0" * 600_000}),  # state.pt written, fails in a later file
])
def test_disk_error_during_a_save_leaves_the_previous_checkpoint(tmp_path, limit, extra_files):
    out = tmp_path / "out"
    _save(out, 1)
    child = fork.Process(target=_save_under_file_size_limit,
                         args=(out, limit, extra_files, tmp_path / "msg"))
    child.start()
    child.join(30)
    assert child.exitcode == 3
    message = (tmp_path / "msg").read_text()
    assert message.startswith(f"could not save a checkpoint in {out}: File too large;")
    assert "intact" in message
    assert _committed(out) == ["ckpt-000000001"]  # no half-written folder, previous one kept
    assert load_state(newest(out))["step"] == 1


def _save_forever(out, first_step, log_path):
    """Save each step twice (the second replaces the first), logging begin/end of every save."""
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    step = first_step
    while True:
        for attempt in "ab":
            os.write(log, f"begin {step}\n".encode())
            _save(out, step, x=BIG, extra_files={"note.txt": f"step {step} {attempt}"})
            os.write(log, f"end {step}\n".encode())
        step += 1


def test_sigkill_at_random_moments_never_loses_the_last_commit(tmp_path):
    out, log_path = tmp_path / "out", tmp_path / "log"
    rng = random.Random(0)
    killed_inside_a_save = newest_committed = 0
    # 20 trials, or more until 5 kills have landed inside a save: how many do in 20 depends on
    # how fast this machine saves, not on whether commits survive.
    for trial in range(80):
        if trial >= 20 and killed_inside_a_save >= 5:
            break
        ref = newest(out)
        first = ref.step + 1 if ref else 1
        log_path.write_text("")
        child = fork.Process(target=_save_forever, args=(out, first, log_path))
        child.start()
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        events = [line.split() for line in log_path.read_text().splitlines()]
        ended = [int(step) for kind, step in events if kind == "end"]
        began = [int(step) for kind, step in events if kind == "begin"]
        killed_inside_a_save += len(began) > len(ended)
        newest_committed = max([newest_committed] + ended)
        refs = find_checkpoints(out)
        if newest_committed:
            # The newest committed save survives (even when this trial committed none);
            # nothing newer than the last save begun appears.
            assert newest_committed <= refs[0].step <= max([newest_committed] + began), (trial, events)
        # A folder that bears a checkpoint's name is always a whole checkpoint: commits and
        # removals both happen by rename.
        assert len(refs) == len([n for n in _committed(out) if n.startswith("ckpt-")]), _committed(out)
        for ref in refs:  # every checkpoint found is whole and consistent with its manifest
            state = load_state(ref)
            assert state["step"] == ref.step
            assert torch.equal(state["x"], BIG)
            assert (ref.path / "note.txt").read_text().startswith(f"step {ref.step} ")
    assert killed_inside_a_save >= 5, "the kills should land inside saves"
    final = _save(out, 10_000)
    assert _committed(out) == [final.name]  # the next commit clears every leftover


def test_a_state_other_environments_could_not_load_is_refused_before_anything_is_written(tmp_path):
    import numpy as np
    with pytest.raises(TypeError, match=r"^state\['rng'\]\[1\] is a numpy.ndarray"):
        save_checkpoint(tmp_path / "out", {"rng": ("MT19937", np.zeros(3))}, step=1, epoch=0,
                        recipe_hash="r1")
    assert not (tmp_path / "out").exists()


def test_the_manifest_records_the_versions_that_decide_exactness(tmp_path):
    from rcic.versions import environment
    ref = newest(_save(tmp_path, 1).parent)
    assert ref.versions == environment()
    assert set(ref.versions) >= {"python", "torch", "cuda", "cudnn", "numpy", "opencv",
                                 "albumentations"}
