"""BatchNorm statistics over the whole micro-batch when several processes share it.

With N processes each rank sees 1/N of every micro-batch, and plain BatchNorm normalises with
the statistics of that share (of 8 samples, say, where one process would use 16). With
`model.sync_batchnorm: true` the statistics are those of the whole micro-batch again, as on one
process, at the cost of two all-reduces per BatchNorm layer and step.

On GPUs this is torch's SyncBatchNorm. torch's refuses CPU tensors, so on CPUs (gloo: the
tests, a CPU cluster) `CpuSyncBatchNorm` does the same with torch.distributed.nn's
differentiable all-reduce: the global mean first, then the global variance around it (two
passes, as accurate as one process's).
"""
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of every rank's batch together."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        total = dist_fn.all_reduce(torch.cat([x.sum(dims), count]))
        n = total[-1]
        mean = total[:-1] / n
        centred = x - mean.reshape(shape)
        var = dist_fn.all_reduce((centred * centred).sum(dims)) / n      # biased, as BN's
        y = centred / torch.sqrt(var + self.eps).reshape(shape)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                          else self.momentum)
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                unbiased = var.detach() * n / (n - 1).clamp_min(1)
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        return y


def convert(model, on_gpu):
    """`model` with every BatchNorm synchronised across the processes (in place where it can)."""
    if on_gpu:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert_cpu(model)


def _convert_cpu(module):
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CpuSyncBatchNorm):
        synced = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats)
        synced.load_state_dict(module.state_dict())
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        module.add_module(name, _convert_cpu(child))
    return module
