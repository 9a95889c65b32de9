"""Backbones, the pretrained 6-channel stem, heads, margin losses (CPU, 32 px, 2 images)."""
import logging
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from efficientnet_pytorch import EfficientNet

from rcic.config import ModelConfig
from rcic.errors import UserError
from rcic.models import create_backbone, create_loss, create_model
from rcic.models.backbones import EFFICIENTNETS, TORCHVISION
from rcic.models.losses import am_softmax_logits, arcface_logits


def first_conv(module):
    return next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))


# One backbone of each family: each family builds its 6-channel stem its own way (its own code
# path in rcic.models.backbones). Every other listed name is built by the test after this one.
FAMILIES = ["tiny", "efficientnet-b0", "densenet121", "resnet50", "timm:xception41"]


@pytest.mark.parametrize("name", FAMILIES)
def test_each_backbone_family_takes_six_channels_forward_and_backward(name):
    torch.manual_seed(0)
    backbone = create_backbone(name)
    assert first_conv(backbone).in_channels == 6
    features = backbone(torch.randn(2, 6, 32, 32))
    assert features.shape == (2, backbone.num_features)
    features.square().mean().backward()
    grad = first_conv(backbone).weight.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("name", [n for n in (*EFFICIENTNETS, *TORCHVISION) if n not in FAMILIES])
def test_every_listed_backbone_builds_with_a_six_channel_stem(name):
    # On the meta device: shapes only, no memory and no initialisation, so a B7 costs little.
    with torch.device("meta"):
        backbone = create_backbone(name)
    assert first_conv(backbone).in_channels == 6
    features = backbone(torch.empty(2, 6, 32, 32, device="meta"))
    assert features.shape == (2, backbone.num_features)


@pytest.mark.parametrize("head", ["linear", "amsoftmax", "arcface", "ce+arcface"])
@pytest.mark.parametrize("neck", [False, True])
def test_every_head_trains_with_neck_onehot_and_dropout(head, neck):
    torch.manual_seed(0)
    cfg = ModelConfig(head=head, neck=neck, neck_dim=16, cell_type_onehot=True, dropout=0.2)
    model = create_model(cfg, num_classes=7, num_cell_types=4)
    outputs = model(torch.randn(4, 6, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert model.logits(outputs).shape == (4, 7)
    loss = create_loss(cfg)(outputs, torch.tensor([0, 3, 6, 1]))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for p in [*model.head.parameters(), *model.neck.parameters(), first_conv(model).weight]:
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_cell_type_onehot_reaches_the_head():
    torch.manual_seed(0)
    model = create_model(ModelConfig(cell_type_onehot=True), num_classes=5, num_cell_types=4).eval()
    x = torch.randn(1, 6, 32, 32)
    with torch.no_grad():
        a, b = (model.logits(model(x, torch.tensor([c]))) for c in (0, 2))
    assert not torch.allclose(a, b)
    assert model.head.linear.in_features == model.backbone.num_features + 4


def test_am_softmax_subtracts_the_margin_from_the_target_cosine_only():
    cosine = torch.tensor([[0.5, 0.2, -0.1], [0.3, 0.9, 0.0]])
    labels = torch.tensor([0, 1])
    logits = am_softmax_logits(cosine, labels, scale=30.0, margin=0.35)
    expected = 30.0 * cosine.clone()
    expected[0, 0] = 30.0 * (0.5 - 0.35)
    expected[1, 1] = 30.0 * (0.9 - 0.35)
    torch.testing.assert_close(logits, expected)


def test_arcface_adds_the_margin_to_the_angle():
    theta, margin, scale = 0.5, 0.2, 16.0
    cosine = torch.tensor([[math.cos(theta), 0.3, -0.4]])
    logits = arcface_logits(cosine, torch.tensor([0]), scale, margin)
    torch.testing.assert_close(logits[0, 0], torch.tensor(scale * math.cos(theta + margin)))
    torch.testing.assert_close(logits[0, 1:], scale * cosine[0, 1:])
    # Past pi - m the target logit keeps falling (linear fallback), never rises again.
    far = torch.tensor([[math.cos(math.pi - 0.1)], [math.cos(math.pi - 0.05)]])
    tail = arcface_logits(far.repeat(1, 2), torch.tensor([0, 0]), 1.0, margin)[:, 0]
    torch.testing.assert_close(tail, far[:, 0] - math.sin(math.pi - margin) * margin)
    assert tail[1] < tail[0]


def test_margins_make_every_target_logit_lower_than_the_plain_cosine():
    torch.manual_seed(0)
    cosine = torch.rand(64, 10) * 2 - 1
    labels = torch.randint(0, 10, (64,))
    rows = torch.arange(64)
    for fn in (am_softmax_logits, arcface_logits):
        logits = fn(cosine, labels, 30.0, 0.3)
        assert (logits[rows, labels] < 30.0 * cosine[rows, labels]).all()


def test_ce_plus_arcface_loss_is_the_weighted_sum_and_the_score_combines_both():
    torch.manual_seed(0)
    outputs = {"logits": torch.randn(3, 5), "cosine": torch.rand(3, 5) * 2 - 1}
    labels = torch.tensor([4, 0, 2])
    cfg = ModelConfig(head="ce+arcface", arcface_weight=0.25, scale=8.0, margin=0.3)
    ce = F.cross_entropy(outputs["logits"], labels)
    arc = F.cross_entropy(arcface_logits(outputs["cosine"], labels, 8.0, 0.3), labels)
    torch.testing.assert_close(create_loss(cfg)(outputs, labels), ce + 0.25 * arc)
    model = create_model(cfg, num_classes=5, num_cell_types=1)
    expected = F.log_softmax(outputs["logits"], 1) + 0.25 * F.log_softmax(8 * outputs["cosine"], 1)
    torch.testing.assert_close(model.logits(outputs), expected)
    margin_model = create_model(ModelConfig(head="amsoftmax", scale=8.0), 5, 1)
    torch.testing.assert_close(margin_model.logits({"cosine": outputs["cosine"]}),
                               8.0 * outputs["cosine"])


# -- pretrained stem ------------------------------------------------------------------------

def three_channel_state(name):
    """The state_dict of a 3-channel network as its own library saves it (classifier included)."""
    if name == "resnet50":
        return torchvision.models.resnet50(weights=None).state_dict(), "conv1.weight"
    if name == "efficientnet-b0":
        return EfficientNet.from_name("efficientnet-b0").state_dict(), "_conv_stem.weight"
    return create_backbone("tiny", in_chans=3).net.state_dict(), "0.0.weight"


@pytest.mark.parametrize("name", ["tiny", "resnet50", "efficientnet-b0"])
def test_pretrained_rgb_stem_becomes_the_mean_kernel_on_six_channels(tmp_path, name):
    torch.manual_seed(1)
    state, stem_key = three_channel_state(name)
    path = tmp_path / "rgb.pth"
    torch.save(state, path)
    model = create_model(ModelConfig(backbone=name, pretrained=str(path)), 5, 1)
    net = model.backbone.net.state_dict()
    rgb = state[stem_key]
    assert rgb.shape[1] == 3 and net[stem_key].shape[1] == 6
    torch.testing.assert_close(net[stem_key], rgb.mean(1, keepdim=True).repeat(1, 6, 1, 1))
    for key, value in net.items():      # everything else is copied as it was
        if key != stem_key:
            assert torch.equal(value, state[key]), key


def test_repeat_stem_tiles_rgb_twice_and_halves_it(tmp_path):
    state, stem_key = three_channel_state("tiny")
    torch.save(state, tmp_path / "rgb.pth")
    model = create_model(ModelConfig(pretrained=str(tmp_path / "rgb.pth"), stem_init="repeat"), 5, 1)
    rgb = state[stem_key]
    widened = model.backbone.net.state_dict()[stem_key]
    torch.testing.assert_close(widened, torch.cat([rgb, rgb], 1) / 2)
    # a pixel equal in all six channels gives the activation the RGB stem gave it
    x = torch.randn(1, 1, 8, 8)
    torch.testing.assert_close(F.conv2d(x.repeat(1, 6, 1, 1), widened),
                               F.conv2d(x.repeat(1, 3, 1, 1), rgb))


def test_timm_weights_in_safetensors_get_the_same_stem_rules(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file
    state = timm.create_model("resnet18", pretrained=False).state_dict()   # 3 channels, with fc
    save_file(state, tmp_path / "model.safetensors")
    model = create_model(ModelConfig(backbone="timm:resnet18",
                                     pretrained=str(tmp_path / "model.safetensors")), 5, 1)
    torch.testing.assert_close(model.backbone.net.conv1.weight,
                               state["conv1.weight"].mean(1, keepdim=True).repeat(1, 6, 1, 1))
    assert torch.equal(model.backbone.net.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])


def test_torchvision_published_densenet_key_names_load(tmp_path):
    state = torchvision.models.densenet121(weights=None).state_dict()
    # the downloadable densenet121-a639ec97.pth names "norm1" as "norm.1" and, older than
    # torch 0.4.1, has no num_batches_tracked
    old = {k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v
           for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    torch.save(old, tmp_path / "densenet121-a639ec97.pth")
    model = create_model(ModelConfig(backbone="densenet121",
                                     pretrained=str(tmp_path / "densenet121-a639ec97.pth")), 5, 1)
    key = "features.denseblock4.denselayer16.conv2.weight"
    assert torch.equal(model.backbone.net.state_dict()[key], state[key])


def test_wrapped_and_data_parallel_state_dicts_load(tmp_path):
    state, stem_key = three_channel_state("tiny")
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "w.pth")
    model = create_model(ModelConfig(pretrained=str(tmp_path / "w.pth")), 5, 1)
    torch.testing.assert_close(model.backbone.net.state_dict()[stem_key][:, 0],
                               state[stem_key].mean(1))


def test_bad_weights_files_are_refused_with_the_file_and_the_fix(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(UserError, match=f"{missing}.*does not exist"):
        create_model(ModelConfig(backbone="resnet50", pretrained=str(missing)), 5, 1)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match=f"cannot read .*{garbage}.*torch.save"):
        create_model(ModelConfig(pretrained=str(garbage)), 5, 1)
    other = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), other)
    with pytest.raises(UserError, match=f"{other} does not fit backbone densenet121.*missing"):
        create_model(ModelConfig(backbone="densenet121", pretrained=str(other)), 5, 1)
    tensor_only = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(UserError, match="does not hold a state_dict"):
        create_model(ModelConfig(pretrained=str(tensor_only)), 5, 1)


def test_random_init_says_so_in_one_warning_and_with_pretrained_false_reads_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger="rcic"):
        create_model(ModelConfig(backbone="resnet50"), 5, 1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "resnet50 starts from random weights" in warnings[0]
    # resume / prediction: the weights come from a checkpoint, the file need not exist
    create_model(ModelConfig(pretrained="/no/such/file.pth"), 5, 1, with_pretrained=False)


def test_unknown_names_are_user_errors(monkeypatch):
    with pytest.raises(UserError, match="unknown backbone 'resnet9000'"):
        create_model(ModelConfig(backbone="resnet9000"), 5, 1)
    with pytest.raises(UserError, match="unknown model.head 'softmax'"):
        create_model(ModelConfig(head="softmax"), 5, 1)
    with pytest.raises(UserError, match="unknown model.head"):
        create_loss(ModelConfig(head="softmax"))
    with pytest.raises(UserError, match="unknown model.stem_init"):
        create_model(ModelConfig(stem_init="red"), 5, 1)
    with pytest.raises(UserError, match="timm:not_a_model"):
        create_backbone("timm:not_a_model")
    monkeypatch.setitem(__import__("sys").modules, "timm", None)   # as if timm were not installed
    with pytest.raises(UserError, match=r"pip install rcic\[timm\]"):
        create_backbone("timm:seresnext101_32x4d")
