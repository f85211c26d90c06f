"""Which images each process trains on, batch by batch: one rule for every training loader.

Every epoch has one order, a permutation seeded by (seed, epoch): resuming replays it and skips
the batches already trained. A step takes the next global batch of world x batch_size images of
that order, and rank r trains on the r-th contiguous share of it. So N processes x B/N see the
global batches 1 process x B sees, every rank gets the same number of batches, and no image is
seen twice in an epoch. The last partial global batch (data.drop_last=false) is split as evenly as
possible (shares differ by at most one image), and dropped when it holds fewer images than there
are ranks; with data.drop_last=true it is dropped.

accelerate's own sharding of a DataLoader is not used: its even_batches pads the last batches
with repeated images (counted twice in an epoch's metrics), and its rank r takes every N-th batch,
which is not the order a single process with N times the batch trains in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ShardPlan:
    images: int
    batch_size: int  # per process
    seed: int
    rank: int = 0
    world_size: int = 1
    drop_last: bool = True

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        """Batches per epoch, the same on every rank."""
        full, last = divmod(self.images, self.global_batch)
        return full if self.drop_last else full + (last >= self.world_size)

    def epoch_generator(self, epoch: int, stream: int = 0) -> torch.Generator:
        """A CPU generator seeded by (seed, epoch, stream): 0 draws the order, 1 the flips. Its
        numbers never depend on how many batches were drawn before (exact resume)."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 2 + stream)

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's permutation of the data set (int64, on the CPU)."""
        return torch.randperm(self.images, generator=self.epoch_generator(epoch))

    def flips(self, epoch: int) -> torch.Tensor:
        """Which images of the data set `epoch` mirrors (data.flip): one draw per image, indexed like
        the order, so an image's flip does not depend on the rank or batch it lands in."""
        return torch.rand(self.images, generator=self.epoch_generator(epoch, 1)) < 0.5

    def share(self, order: torch.Tensor, batch: int) -> torch.Tensor:
        """This rank's indices of global batch `batch` of an epoch's `order` (on order's device)."""
        global_batch = order[batch * self.global_batch:(batch + 1) * self.global_batch]
        return torch.tensor_split(global_batch, self.world_size)[self.rank]

    def shares(self, epoch: int, start: int = 0):
        """This rank's index batches of `epoch`, from batch `start` on."""
        order = self.order(epoch)
        for b in range(start, len(self)):
            yield self.share(order, b)
