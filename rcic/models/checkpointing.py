"""Activation checkpointing: keep fewer activations for the backward pass, recompute the rest.

`model.activation_checkpointing: true` makes each block of the backbone keep only its input;
the backward pass runs the block's forward again to get what it needs. Memory for activations
drops (see `rcic-chain plan`), a step costs about one more forward, and the numbers stay the
same:
- gradients: torch's non-reentrant checkpoint recomputes with the RNG state of the first run
  (dropout, EfficientNet's drop-connect draw the same masks), so they equal those without it
  (tests/test_activation_checkpointing.py, per family);
- BatchNorm running statistics: a recomputed BatchNorm in train mode would update them a second
  time from the same batch (torchvision's memory-efficient DenseNet and timm's own
  checkpointing do), which is momentum 0.19 instead of 0.1. `keep_running_stats` undoes that:
  it notes every buffer after the forward and puts it back when the backward ends.
So the field changes memory and time, not the trained weights, and may differ between the
stages of one run (it is not part of the recipe's training hash).

Which blocks, per family: torchvision's DenseNets their own memory-efficient mode (each dense
layer's concatenation and bottleneck); torchvision's ResNets and ResNeXts each bottleneck
block; efficientnet-pytorch each MBConv block; timm its own `set_grad_checkpointing`; the tiny
CNN each conv-BN-ReLU block.
"""
import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from rcic.errors import UserError


def recompute_in_backward(forward, *args, **kwargs):
    """`forward(*args, **kwargs)`, keeping only its inputs for the backward pass."""
    if not torch.is_grad_enabled():     # evaluation: nothing is kept anyway
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_each(blocks):
    """Make every block recompute its forward in the backward pass. The block's own forward is
    wrapped on the instance, so the module tree and its state_dict keys stay as they were."""
    for block in blocks:
        block.forward = functools.partial(recompute_in_backward, block.forward)


def enable(backbone, name):
    """Turn activation checkpointing on in a backbone built by create_backbone(name)."""
    net = backbone.net
    if name.startswith("timm:"):
        try:
            net.set_grad_checkpointing(True)
        except (AssertionError, NotImplementedError, AttributeError):
            raise UserError(f"backbone {name} does not support activation checkpointing "
                            f"(timm's set_grad_checkpointing): set "
                            f"model.activation_checkpointing=false") from None
    elif name.startswith("densenet"):
        for module in net.modules():
            if hasattr(module, "memory_efficient"):   # torchvision's _DenseLayer
                module.memory_efficient = True
    elif name.startswith(("resnet", "resnext")):
        checkpoint_each(block for layer in (net.layer1, net.layer2, net.layer3, net.layer4)
                        for block in layer)
    elif name.startswith("efficientnet"):
        checkpoint_each(net._blocks)
    elif name == "tiny":
        checkpoint_each(m for m in net if isinstance(m, nn.Sequential))
    else:
        raise UserError(f"backbone {name} has no activation checkpointing in rcic: set "
                        f"model.activation_checkpointing=false")


def keep_running_stats(model):
    """Make a training forward of `model` update its buffers (BatchNorm's running statistics)
    exactly once, however often the backward pass recomputes blocks: a forward hook copies
    every buffer after the forward and writes the copies back when the backward has ended."""

    def after_forward(module, inputs, output):
        if not (module.training and torch.is_grad_enabled()):
            return
        saved = [b.detach().clone() for b in module.buffers()]

        def restore():
            with torch.no_grad():
                for buffer, value in zip(module.buffers(), saved):
                    buffer.copy_(value)

        def backward_started(grads):
            # Called when the backward reaches the outputs, before any recomputation; the
            # engine's callback (what DDP uses to finish its reduction) runs once the whole
            # backward is done.
            torch.autograd.Variable._execution_engine.queue_callback(restore)

        outputs = [t for t in output.values() if t.requires_grad]
        if outputs:
            torch.autograd.graph.register_multi_grad_hook(outputs, backward_started, mode="any")

    model.register_forward_hook(after_forward)
