"""Models: 6-channel backbones, the pretrained-stem rules, heads, margin losses.

    model = create_model(recipe.model, num_classes, num_cell_types)
    outputs = model(x, cell_type)          # dict of named tensors
    scores = model.logits(outputs)         # [B, num_classes]
    loss = create_loss(recipe.model)(outputs, labels)
"""
from rcic.models.backbones import create_backbone
from rcic.models.losses import create_loss
from rcic.models.model import RcicModel, create_model, set_backbone_trainable

__all__ = ["RcicModel", "create_backbone", "create_loss", "create_model", "set_backbone_trainable"]
