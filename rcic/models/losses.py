"""Losses by head name: cross-entropy, AM-Softmax, ArcFace, and the winners' CE + ArcFace.

The margin losses push each sample's cosine to its own class centre further than plain
softmax would: the target logit is made worse by a margin during training only, so the
network must beat the other classes by that margin.
- AM-Softmax (cosine margin, seed 001):  target logit s * (cos(theta) - m)
- ArcFace (angular margin, 1st and 2nd place): target logit s * cos(theta + m)
All are computed in float32: under mixed precision a half-precision cosine near 1 loses the
small angles the margin is about.
"""
import math

import torch
import torch.nn.functional as F

from rcic.errors import UserError


def am_softmax_logits(cosine, labels, scale, margin):
    target = F.one_hot(labels, cosine.shape[1]).to(torch.bool)
    cosine = cosine.float()
    return scale * torch.where(target, cosine - margin, cosine)


def arcface_logits(cosine, labels, scale, margin):
    target = F.one_hot(labels, cosine.shape[1]).to(torch.bool)
    cosine = cosine.float()
    # cos(theta + m) without acos, whose gradient is infinite at cos = +-1.
    sine = torch.sqrt((1.0 - cosine * cosine).clamp(min=1e-7))
    shifted = cosine * math.cos(margin) - sine * math.sin(margin)
    # Past theta = pi - m, cos(theta + m) would rise again and reward a wrong class; there
    # ArcFace falls back to a linear penalty that keeps the target logit decreasing.
    shifted = torch.where(cosine > math.cos(math.pi - margin), shifted,
                          cosine - math.sin(math.pi - margin) * margin)
    return scale * torch.where(target, shifted, cosine)


def create_loss(model_cfg):
    """loss(outputs, labels) -> scalar, for the head named in model_cfg.head."""
    head, scale, margin = model_cfg.head, model_cfg.scale, model_cfg.margin

    def cross_entropy(outputs, labels):
        return F.cross_entropy(outputs["logits"].float(), labels)

    def am_softmax(outputs, labels):
        return F.cross_entropy(am_softmax_logits(outputs["cosine"], labels, scale, margin), labels)

    def arcface(outputs, labels):
        return F.cross_entropy(arcface_logits(outputs["cosine"], labels, scale, margin), labels)

    def ce_plus_arcface(outputs, labels):
        return cross_entropy(outputs, labels) + model_cfg.arcface_weight * arcface(outputs, labels)

    losses = {"linear": cross_entropy, "amsoftmax": am_softmax, "arcface": arcface,
              "ce+arcface": ce_plus_arcface}
    if head not in losses:
        raise UserError(f"unknown model.head {head!r}: choose one of {', '.join(losses)}")
    return losses[head]
