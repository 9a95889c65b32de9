"""What sits on the pooled features: an optional neck, then a linear and/or a cosine classifier.

A head returns a dict: "logits" from a plain linear layer (trained with cross-entropy) and/or
"cosine", the cosine between the normalised features and each normalised class centre
(trained with a margin loss, see losses.py). Margins live in the loss, not here, because they
need the labels and must not touch the scores used for prediction.
"""
import torch
import torch.nn.functional as F
from torch import nn

# head name -> (has a linear classifier, has a cosine classifier)
HEADS = {
    "linear": (True, False),
    "amsoftmax": (False, True),
    "arcface": (False, True),
    "ce+arcface": (True, True),
}


def neck(in_features, dim):
    """BN-FC-ReLU-BN: an embedding whose scale the cosine head and the margins can rely on."""
    return nn.Sequential(nn.BatchNorm1d(in_features), nn.Linear(in_features, dim),
                         nn.ReLU(inplace=True), nn.BatchNorm1d(dim))


class CosineClassifier(nn.Module):
    def __init__(self, in_features, num_classes):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x):
        return F.linear(F.normalize(x), F.normalize(self.weight))


class Head(nn.Module):
    def __init__(self, in_features, num_classes, name):
        super().__init__()
        has_linear, has_cosine = HEADS[name]
        self.linear = nn.Linear(in_features, num_classes) if has_linear else None
        self.cosine = CosineClassifier(in_features, num_classes) if has_cosine else None

    def forward(self, x):
        out = {}
        if self.linear is not None:
            out["logits"] = self.linear(x)
        if self.cosine is not None:
            out["cosine"] = self.cosine(x)
        return out
