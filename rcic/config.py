"""A recipe: every choice of a training run, as dataclasses that load from and save to YAML.

A recipe is written beside every checkpoint. Its *training hash* covers only the fields that
change what training computes; fields listed in RUN_ONLY_FIELDS (worker counts, checkpoint
interval, logging) may differ between stages without breaking an exact resume.
"""
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rcic.errors import UserError


@dataclass
class DataConfig:
    image_size: int = 32               # pixels per side the model sees (cache size)
    cell_types: list = field(default_factory=list)        # e.g. ["HUVEC"]; empty = all
    val_experiments: list = field(default_factory=list)   # empty = last train experiment of each cell type
    use_controls: bool = False         # train control wells as extra classes
    use_test_controls: bool = False    # test control wells too (their labels are public)
    normalization: str = "experiment"  # image | experiment | plate
    augment: str = "default"           # default | light | none
    batch_size: int = 32
    plate_batches: bool = False        # every batch drawn from one plate (AdaBN style)
    num_workers: int = 0               # loader processes (does not change results)
    cache: str = ""                    # folder of a decoded-image cache; empty = decode PNGs


@dataclass
class ModelConfig:
    backbone: str = "tiny"             # tiny | efficientnet-b0..b7 | densenet121 | resnet50 | ...
    pretrained: str = ""               # local path of 3-channel weights; empty = random init
    stem_init: str = "mean"            # how a 3-channel stem becomes 6 channels: mean | repeat
    neck: bool = False                 # BN-FC-ReLU-BN between pooled features and the head
    neck_dim: int = 512
    cell_type_onehot: bool = False     # concatenate the cell type to the pooled features
    head: str = "linear"               # linear | amsoftmax | arcface | ce+arcface
    margin: float = 0.2
    scale: float = 30.0
    arcface_weight: float = 0.5        # weight of the ArcFace loss in ce+arcface
    dropout: float = 0.0
    # BatchNorm statistics over the whole micro-batch when several processes share it (two
    # all-reduces per BatchNorm layer); one process is unaffected.
    sync_batchnorm: bool = False
    activation_checkpointing: bool = False   # recompute activations in backward: less memory


@dataclass
class OptimConfig:
    optimizer: str = "adam"            # adam | adamw | radam | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    scheduler: str = "cosine"          # none | cosine | exponential | onecycle
    warmup_steps: int = 0
    gamma: float = 0.9                 # ExponentialLR decay per epoch
    accumulation_steps: int = 1        # optimizer step every N batches
    freeze_backbone_epochs: int = 0    # head only for the first N epochs
    ema_decay: float = 0.0             # 0 = no EMA of weights
    amp: bool = True                   # mixed precision where a GPU is present
    channels_last: bool = True         # on a GPU


@dataclass
class TrainConfig:
    epochs: int = 20
    max_steps: int = 0                 # 0 = epochs * steps per epoch
    seed: int = 0
    init_from: str = ""                # final weights of another recipe (two-step training)
    eval_every_steps: int = 0          # 0 = at the end of each epoch
    checkpoint_every_steps: int = 200  # periodic checkpoints inside long epochs
    log_every_steps: int = 10
    # How the run executes, not what it computes (so not in the training hash):
    deterministic: bool = False        # deterministic CUDA kernels, no cuDNN autotuning
    ddp_backend: str = "auto"          # auto (nccl on GPUs, gloo on CPUs) | nccl | gloo


@dataclass
class PseudoConfig:
    enabled: bool = False
    start_epoch: int = 1               # first epoch that trains on pseudo-labels
    fraction_per_epoch: float = 0.25   # share of test wells added each epoch
    max_fraction: float = 1.0


# The defaults are the tiny CPU recipe (configs/tiny-cpu.yaml, kept equal by a test): what runs
# when no --config is given, on the embedded data, in a few minutes on a laptop.
@dataclass
class Recipe:
    name: str = "tiny-cpu"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)

    def to_dict(self):
        return dataclasses.asdict(self)

    def training_hash(self):
        """A short stable hash of the fields that change what training computes."""
        fields = training_fields(self)
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


# Fields that may change between stages of one run without changing the weights it computes.
RUN_ONLY_FIELDS = {
    "name", "data.num_workers", "data.cache", "train.checkpoint_every_steps",
    "train.log_every_steps", "train.eval_every_steps", "train.deterministic",
    "train.ddp_backend",
    # memory, not numbers: gradients and BatchNorm statistics equal those without it
    # (rcic/models/checkpointing.py), so a stage may turn it on to fit a smaller GPU
    "model.activation_checkpointing",
}


def check_process_count(recipe, processes):
    """Refuse a number of processes that cannot share the recipe's micro-batches equally.

    The recipe fixes the global batch (data.batch_size x optim.accumulation_steps samples an
    optimizer step), its steps and its schedule; N processes each take 1/N of every micro-batch,
    so N must divide data.batch_size."""
    size = recipe.data.batch_size
    if size % processes:
        counts = [n for n in range(1, size + 1) if size % n == 0 and n <= 64]
        raise UserError(f"{processes} processes cannot share recipe {recipe.name}'s micro-batches "
                        f"of {size} samples (data.batch_size) equally: run it on "
                        f"{', '.join(map(str, counts))} processes, or choose a data.batch_size "
                        f"that {processes} divides (the global batch, data.batch_size x "
                        f"optim.accumulation_steps, is the recipe's on any number of processes)")


def flatten(d, prefix=""):
    out = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


# Training fields added after recipes were already running: counted in the hash only when set
# to something other than this default, so a checkpoint written before the field existed
# still resumes under the same recipe.
LATER_FIELDS = {"model.sync_batchnorm": False}


def training_fields(recipe):
    return {k: v for k, v in flatten(recipe.to_dict()).items()
            if k not in RUN_ONLY_FIELDS and not (k in LATER_FIELDS and v == LATER_FIELDS[k])}


def differing_training_fields(a, b):
    """Names of the training fields whose values differ between two recipes."""
    fa, fb = training_fields(a), training_fields(b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))


def from_dict(d, source="recipe"):
    """Build a Recipe from a nested dict, refusing unknown sections and fields by name."""
    d = dict(d or {})
    kwargs = {}
    sections = {f.name: f for f in dataclasses.fields(Recipe)}
    for key, value in d.items():
        if key not in sections:
            raise UserError(f"unknown recipe section {key!r} in {source}: "
                            f"expected one of {', '.join(sections)}")
        if key == "name":
            kwargs[key] = str(value)
            continue
        cls = sections[key].default_factory
        if not isinstance(value, dict):
            raise UserError(f"recipe section {key!r} in {source} must be a mapping")
        known = {f.name: f for f in dataclasses.fields(cls)}
        for sub in value:
            if sub not in known:
                raise UserError(f"unknown recipe field {key}.{sub} in {source}: "
                                f"expected one of {', '.join(known)}")
        kwargs[key] = cls(**{k: _coerce(v, getattr(cls(), k), f"{key}.{k}", source)
                             for k, v in value.items()})
    return Recipe(**kwargs)


# The least value of counts: below it a recipe trains nothing (`epochs: -3` gave total_steps
# -3 and a stage that reported the untrained model as done) or fails deep inside torch.
MINIMUMS = {"data.image_size": 8, "data.batch_size": 1, "data.num_workers": 0,
            "train.epochs": 1, "train.max_steps": 0, "train.checkpoint_every_steps": 0,
            "train.eval_every_steps": 0, "train.log_every_steps": 0,
            "optim.accumulation_steps": 1, "optim.warmup_steps": 0,
            "optim.freeze_backbone_epochs": 0}


def _coerce(value, default, name, source):
    """Check a value against the type of the field's default (YAML gives 1e-3 as a str)."""
    number = _coerce_type(value, default, name, source)
    if name in MINIMUMS and number < MINIMUMS[name]:
        raise UserError(f"recipe field {name} in {source} has value {value!r}: "
                        f"it must be {MINIMUMS[name]} or more")
    return number


def _coerce_type(value, default, name, source):
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            raise ValueError
        if isinstance(default, int):
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if isinstance(default, float):
            return float(value)
        if isinstance(default, list):
            return [str(v) for v in (value if isinstance(value, list) else [value])]
        if isinstance(default, str):
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        pass
    raise UserError(f"recipe field {name} in {source} has value {value!r}: "
                    f"expected a {type(default).__name__}")


def apply_overrides(recipe, overrides, source="--set"):
    """Apply `section.field=value` strings (values parsed as YAML) to a recipe."""
    d = recipe.to_dict()
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"{source} {item!r} is not key=value: write e.g. optim.lr=0.001")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or parts[0] not in d or not isinstance(d[parts[0]], dict):
            raise UserError(f"{source} {key!r} is not a recipe field: write section.field, "
                            f"e.g. train.epochs=3")
        d[parts[0]][parts[1]] = yaml.safe_load(raw)
    return from_dict(d, source)


def load_recipe(path=None, overrides=None):
    """The recipe in a YAML file (or the built-in default), with --set overrides applied."""
    if path is None:
        recipe = Recipe()
    else:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"recipe file {path} does not exist: pass an existing YAML file "
                            f"to --config (see the configs/ folder)")
        try:
            d = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            first = str(err).splitlines()[0]
            raise UserError(f"recipe file {path} is not valid YAML ({first}): fix the file")
        if d is not None and not isinstance(d, dict):
            raise UserError(f"recipe file {path} must hold a mapping of sections")
        recipe = from_dict(d, str(path))
    return apply_overrides(recipe, overrides)


def save_recipe(recipe, path):
    Path(path).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
