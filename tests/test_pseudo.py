"""Pseudo-labels across stages: chosen at epoch starts, one per plate and class, carried exactly."""
import pandas as pd
import torch

from rcic.config import PseudoConfig
from rcic.pseudo import schedule_fraction
from helpers import assert_same_weights, stage, stage_here

PSEUDO = ["pseudo.enabled=true", "pseudo.start_epoch=1", "pseudo.fraction_per_epoch=0.5",
          "train.epochs=3"]


def test_schedule_grows_from_the_start_epoch_up_to_the_cap():
    cfg = PseudoConfig(enabled=True, start_epoch=2, fraction_per_epoch=0.3, max_fraction=0.8)
    assert [schedule_fraction(cfg, e) for e in range(6)] == [0, 0, 0.3, 0.6, 0.8, 0.8]
    assert schedule_fraction(PseudoConfig(enabled=False), 5) == 0


def test_pseudo_labels_survive_stages_bit_exactly(tiny_data, tmp_path):
    whole = tmp_path / "whole"
    stage_here(tiny_data, whole, sets=PSEUDO)
    split = tmp_path / "split"
    # The stops fall before and after the epoch-1 choice, and inside epoch 2. The middle stage
    # is a process of its own: it resumes from the file alone, with nothing left in memory.
    stage_here(tiny_data, split, "--steps", "5", sets=PSEUDO)
    stage(tiny_data, split, "--steps", "4", sets=PSEUDO)
    stage_here(tiny_data, split, sets=PSEUDO)
    assert_same_weights(split, whole)

    # Plain lists in the state, not a pickled DataFrame: it loads under any pandas, weights-only.
    state = torch.load(next(whole.glob("ckpt-*")) / "state.pt", weights_only=True)
    labels, epoch = pd.DataFrame(state["pseudo"]["labels"]), state["pseudo"]["epoch"]
    assert epoch == 2
    test = pd.read_csv(tiny_data / "test.csv")
    assert len(labels) == round(1.0 * len(test))          # 0.5 a epoch from epoch 1: all by epoch 2
    assert set(labels["id_code"]) <= set(test["id_code"])
    plate = labels["id_code"].str.rsplit("_", n=1).str[0]
    assert not labels.assign(plate=plate).duplicated(["plate", "sirna"]).any()
    split_state = torch.load(next(split.glob("ckpt-*")) / "state.pt", weights_only=True)
    pd.testing.assert_frame_equal(pd.DataFrame(split_state["pseudo"]["labels"]), labels)
