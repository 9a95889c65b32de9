"""Backbones by name, each taking 6-channel images and returning pooled features [B, F].

Every backbone is a `Backbone`: the library's own network in `.net` (so its state_dict keys
are the ones the library saves, and a pretrained file of that library loads into it), its
classifier removed, and `.classifier_prefix` naming where that classifier lives in such a file
(those weights are skipped when a pretrained file is loaded).

Names: "tiny" (a small CNN for CPU runs), "efficientnet-b0".."efficientnet-b7"
(efficientnet-pytorch), "densenet121/161/201", "resnet50", "resnext50_32x4d" (torchvision),
and "timm:<model name>" for anything in timm's zoo (optional: pip install rcic[timm]).
Nothing here downloads: weights come from a local file only (see stem.py).
"""
from torch import nn

from rcic.errors import UserError

IN_CHANNELS = 6


class Backbone(nn.Module):
    def __init__(self, net, num_features, classifier_prefix):
        super().__init__()
        self.net = net
        self.num_features = num_features
        self.classifier_prefix = classifier_prefix

    def forward(self, x):
        return self.net(x).flatten(1)


def conv_bn_relu(c_in, c_out, stride):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def tiny(in_chans):
    # Four conv-BN-ReLU blocks (about 16 M multiply-adds per 32 px image): enough to read the
    # channel mix and cell size the synthetic classes differ by, fast on a 2-core CPU.
    widths = [32, 64, 128, 256]
    layers, c_in = [], in_chans
    for i, width in enumerate(widths):
        layers.append(conv_bn_relu(c_in, width, stride=1 if i == 0 else 2))
        c_in = width
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1))
    return Backbone(net, widths[-1], classifier_prefix="")


def efficientnet(name, in_chans):
    from efficientnet_pytorch import EfficientNet
    # from_name only: from_pretrained downloads. include_top=False drops dropout and _fc, so the
    # network ends at global average pooling.
    net = EfficientNet.from_name(name, in_channels=in_chans, include_top=False)
    return Backbone(net, net._bn1.num_features, classifier_prefix="_fc.")


def torchvision_model(name, in_chans):
    import torchvision
    net = torchvision.models.get_model(name, weights=None)
    classifier = "fc" if hasattr(net, "fc") else "classifier"
    num_features = getattr(net, classifier).in_features
    setattr(net, classifier, nn.Identity())
    replace_first_conv(net, in_chans)
    return Backbone(net, num_features, classifier_prefix=classifier + ".")


def replace_first_conv(net, in_chans):
    """torchvision builds 3-channel stems only: swap the first conv for an in_chans copy."""
    for module in net.modules():
        for child_name, child in module.named_children():
            if isinstance(child, nn.Conv2d):
                conv = nn.Conv2d(in_chans, child.out_channels, child.kernel_size, child.stride,
                                 child.padding, child.dilation, child.groups,
                                 child.bias is not None)
                # torchvision's own init for its convolutions
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                setattr(module, child_name, conv)
                return


def timm_model(name, in_chans):
    try:
        import timm
    except ImportError:
        raise UserError(f"backbone timm:{name} needs the timm package: pip install rcic[timm] "
                        f"(Kaggle's image already has it)") from None
    try:
        # num_classes=0 leaves the network ending at its global pooling.
        net = timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=0)
    except RuntimeError as err:  # timm's "Unknown model (...)"
        raise UserError(f"backbone timm:{name}: {err}; see timm.list_models() for the "
                        f"names") from None
    classifier = net.pretrained_cfg.get("classifier", "")
    return Backbone(net, net.num_features, classifier_prefix=classifier + "." if classifier else "")


EFFICIENTNETS = [f"efficientnet-b{i}" for i in range(8)]
TORCHVISION = ["densenet121", "densenet161", "densenet201", "resnet50", "resnext50_32x4d"]
NAMES = ["tiny", *EFFICIENTNETS, *TORCHVISION, "timm:<name>"]


def create_backbone(name, in_chans=IN_CHANNELS):
    """A randomly initialised backbone by name (see the module docstring for the names)."""
    if name == "tiny":
        return tiny(in_chans)
    if name in EFFICIENTNETS:
        return efficientnet(name, in_chans)
    if name in TORCHVISION:
        return torchvision_model(name, in_chans)
    if name.startswith("timm:"):
        return timm_model(name[len("timm:"):], in_chans)
    raise UserError(f"unknown backbone {name!r} (model.backbone): choose one of {', '.join(NAMES)}")

