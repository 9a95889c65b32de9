"""The whole network: backbone -> pooled features (+ cell-type one-hot) -> neck -> dropout -> head.

`model(x, cell_type)` returns the head's dict of outputs (see heads.py); `model.logits(outputs)`
turns it into the one score per class used for accuracy, prediction and TTA averaging.
"""
import logging

import torch
import torch.nn.functional as F
from torch import nn

from rcic.errors import UserError
from rcic.models import checkpointing
from rcic.models.backbones import create_backbone
from rcic.models.heads import HEADS, Head, neck
from rcic.models.stem import STEM_INITS, load_pretrained

log = logging.getLogger("rcic")


class RcicModel(nn.Module):
    def __init__(self, backbone, num_classes, num_cell_types, model_cfg):
        super().__init__()
        self.backbone = backbone
        # 0 = the cell type is not an input (cell_type may then be None)
        self.num_cell_types = num_cell_types if model_cfg.cell_type_onehot else 0
        features = backbone.num_features + self.num_cell_types
        if model_cfg.neck:
            self.neck = neck(features, model_cfg.neck_dim)
            features = model_cfg.neck_dim
        else:
            self.neck = nn.Identity()
        self.dropout = nn.Dropout(model_cfg.dropout)
        self.head = Head(features, num_classes, model_cfg.head)
        self.scale = model_cfg.scale
        self.arcface_weight = model_cfg.arcface_weight

    def forward(self, x, cell_type=None):
        features = self.backbone(x)
        if self.num_cell_types:
            onehot = F.one_hot(cell_type, self.num_cell_types).to(features.dtype)
            features = torch.cat([features, onehot], dim=1)
        return self.head(self.dropout(self.neck(features)))

    def logits(self, outputs):
        """One float32 score per class, [B, num_classes]: larger is more likely.

        linear: the logits. amsoftmax / arcface: scale * cosine, i.e. the training logits
        without the margin. ce+arcface: the log-probabilities of both heads summed with the
        loss's weights, log p_ce + arcface_weight * log p_arcface, so a head that is sure
        outvotes one that is not, and averaging scores over TTA views averages log-probabilities.
        """
        if "cosine" not in outputs:
            return outputs["logits"].float()
        cosine_logits = self.scale * outputs["cosine"].float()
        if "logits" not in outputs:
            return cosine_logits
        return (F.log_softmax(outputs["logits"].float(), dim=1)
                + self.arcface_weight * F.log_softmax(cosine_logits, dim=1))


def create_model(model_cfg, num_classes, num_cell_types, with_pretrained=True):
    """The RcicModel a recipe's `model` section describes, with pretrained weights if given.

    with_pretrained=False when the weights will come from a checkpoint (resume, prediction):
    the model.pretrained file is then not read, so a submission kernel does not need it.
    """
    if model_cfg.head not in HEADS:
        raise UserError(f"unknown model.head {model_cfg.head!r}: choose one of {', '.join(HEADS)}")
    if model_cfg.stem_init not in STEM_INITS:
        raise UserError(f"unknown model.stem_init {model_cfg.stem_init!r}: choose one of "
                        f"{', '.join(STEM_INITS)}")
    backbone = create_backbone(model_cfg.backbone)
    if with_pretrained:
        start_backbone(backbone, model_cfg)
    model = RcicModel(backbone, num_classes, num_cell_types, model_cfg)
    if model_cfg.activation_checkpointing:
        checkpointing.enable(backbone, model_cfg.backbone)
        checkpointing.keep_running_stats(model)
    return model


def start_backbone(backbone, model_cfg):
    """Pretrained weights from the recipe's local file, or a note that training starts cold."""
    if model_cfg.pretrained:
        load_pretrained(backbone, model_cfg.pretrained, model_cfg.stem_init, model_cfg.backbone)
    elif model_cfg.backbone == "tiny":
        log.info("backbone tiny starts from random weights (it has no pretrained weights)")
    else:
        log.warning("backbone %s starts from random weights: set model.pretrained to a local "
                    "3-channel weights file to start from ImageNet", model_cfg.backbone)


def set_backbone_trainable(model, trainable):
    """Freeze or unfreeze the backbone (head-only epochs). Frozen parameters get no gradient,
    so the optimizer leaves them alone; BatchNorm running statistics still adapt in train mode,
    which is wanted: a 6-channel microscopy batch is not what ImageNet statistics describe."""
    for p in model.backbone.parameters():
        p.requires_grad_(trainable)
