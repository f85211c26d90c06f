"""BatchNorm over the global batch of all processes (train.sync_batchnorm).

Under DDP each process normalizes with the statistics of its own B/N images, so N processes train
another model than one process with batch B. torch's nn.SyncBatchNorm fixes that on GPUs and is
used there; it refuses CPU tensors, so on the CPU (gloo) GlooSyncBatchNorm does the same with one
differentiable sum over ranks of (sum, sum of squares, count) per layer (distributed.global_batch, summed):
its backward sums the gradients of those sums over ranks, as nn.SyncBatchNorm's does.
"""

from __future__ import annotations

import torch
from torch import nn

from fastvae.distributed import global_batch, several_processes


class GlooSyncBatchNorm(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and several_processes()):
            return super().forward(x)
        dims = (0, 2, 3)
        local = torch.cat([x.sum(dims, dtype=torch.float64), (x * x).sum(dims, dtype=torch.float64),
                           x.new_full((1,), x.numel() // x.shape[1], dtype=torch.float64)])
        total = global_batch(local.unsqueeze(0)).sum(0)  # over ranks; the backward sums their gradients
        c = x.shape[1]
        count = total[2 * c]
        mean = total[:c] / count
        var = (total[c:2 * c] / count - mean * mean).clamp_min(0)
        if self.track_running_stats:  # count stays a tensor: no host read per layer (a sync, a graph break)
            self._update_running_stats(mean.detach(), var.detach(), count.detach())
        shape = (1, c, 1, 1)
        scale = torch.rsqrt(var + self.eps).to(x.dtype).view(shape)
        y = (x - mean.to(x.dtype).view(shape)) * scale
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        self.num_batches_tracked += 1
        # momentum None (cumulative average) needs the batch count on the host; the models use 0.1
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = var * count / (count - 1).clamp_min(1)  # running_var is unbiased, as in nn.BatchNorm2d
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """model with every BatchNorm2d synchronized across processes (weights and buffers kept)."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, GlooSyncBatchNorm):
            synced = GlooSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats)
            synced.load_state_dict(child.state_dict())
            setattr(model, name, synced)
        else:
            convert_sync_batchnorm(child, device)
    return model
