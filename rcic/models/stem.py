"""Pretrained 3-channel weights into a 6-channel backbone, from a local file only.

The file is a state_dict as torchvision, efficientnet-pytorch or timm save or publish it
(`torch.save(model.state_dict(), path)`, a downloaded .pth, or timm's .safetensors).
Every tensor must fit the backbone exactly, except
- the first convolution's kernel [out, 3, k, k], which becomes [out, 6, k, k] by `stem_init`:
    "mean":   the mean over R, G, B, repeated on all six channels (seed 001's choice: no
              channel of a fluorescence image is more "red" than another);
    "repeat": R, G, B tiled twice and halved, so a pixel equal in all channels gives the
              same activation as the RGB network gave it;
- the library's classifier, which is skipped (the head is trained for our classes).
Anything else that does not fit is refused with one line naming the file and the fix: a
silent partial load would train from noise while looking pretrained.
"""
import logging
import re
from pathlib import Path

import torch

from rcic.errors import UserError

STEM_INITS = ("mean", "repeat")
log = logging.getLogger("rcic")


def widen_kernel(kernel, in_chans, stem_init):
    """[out, 3, k, k] -> [out, in_chans, k, k] (in_chans a multiple of 3 for "repeat")."""
    if stem_init == "mean":
        return kernel.mean(dim=1, keepdim=True).repeat(1, in_chans, 1, 1)
    if stem_init == "repeat":
        copies = in_chans // kernel.shape[1]
        return kernel.repeat(1, copies, 1, 1) / copies
    raise ValueError(stem_init)


# torchvision's published DenseNet files still use the old key names ("norm.1" for "norm1");
# torchvision renames them when it loads them, and so do we (its own pattern).
LEGACY_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def loader_for(path):
    if not str(path).endswith(".safetensors"):
        return lambda p: torch.load(p, map_location="cpu", weights_only=True)
    try:   # how timm's model hub ships weights now
        from safetensors.torch import load_file
    except ImportError:
        raise UserError(f"pretrained weights file {path} is a .safetensors file, which needs the "
                        f"safetensors package (timm brings it): pip install safetensors") from None
    return load_file


def read_state_dict(path):
    if not Path(path).is_file():
        raise UserError(f"pretrained weights file {path} does not exist (model.pretrained): "
                        f"give the path of a local 3-channel state_dict, or leave it empty "
                        f"for random init")
    load = loader_for(path)
    try:
        obj = load(path)
    except Exception as err:  # torch.load raises many kinds for a file that is not a checkpoint
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot read pretrained weights file {path} ({first}): save it with "
                        f"torch.save(model.state_dict(), path)") from None
    # Training scripts often wrap the weights ({"state_dict": ...}) or save a DataParallel
    # model ("module." before every key): both are still the same weights.
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"pretrained weights file {path} does not hold a state_dict: save it "
                        f"with torch.save(model.state_dict(), path)")
    state = {}
    for key, value in obj.items():
        key = key.removeprefix("module.")
        legacy = LEGACY_DENSENET_KEY.match(key)
        state[legacy.group(1) + legacy.group(2) if legacy else key] = value
    return state


def load_pretrained(backbone, path, stem_init, backbone_name):
    """Load a local weights file into `backbone.net`, widening the stem to its channels."""
    given = read_state_dict(path)
    own = backbone.net.state_dict()
    loaded, problems = {}, []
    for key, target in own.items():
        if key not in given:
            if key.endswith("num_batches_tracked"):   # files older than torch 0.4.1 lack it
                loaded[key] = target
            else:
                problems.append(f"{key} missing")
            continue
        tensor = given[key]
        if tensor.shape == target.shape:
            loaded[key] = tensor
        elif (tensor.ndim == 4 and tensor.shape[1] == 3 and target.shape[1] % 3 == 0
              and tensor.shape[0] == target.shape[0] and tensor.shape[2:] == target.shape[2:]):
            loaded[key] = widen_kernel(tensor, target.shape[1], stem_init)
        else:
            problems.append(f"{key} is {tuple(tensor.shape)}, expected {tuple(target.shape)}")
    prefix = backbone.classifier_prefix
    problems += [f"unexpected {key}" for key in given
                 if key not in own and not (prefix and key.startswith(prefix))]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"pretrained weights file {path} does not fit backbone {backbone_name}: "
                        f"{'; '.join(problems[:3])}{more}. Give the state_dict of a "
                        f"{backbone_name} (model.pretrained), or leave it empty for random init")
    backbone.net.load_state_dict(loaded)
    log.info("loaded pretrained %s weights from %s (stem: %s)", backbone_name, path, stem_init)
