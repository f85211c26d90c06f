"""FFCV on the reading side: check a .beton, read it once into memory, or train from it batch by batch.

The .beton files come from fastvae.data.ffcv (`python -m fastvae.data.ffcv`), which writes them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fastvae.data.base import mirror_where, unit_float
from fastvae.data.sharding import ShardPlan
from fastvae.errors import UserError

INSTALL_HINT = ("apt-get install -y libopencv-dev libturbojpeg0-dev && pip install 'fastvae[ffcv]' "
                "(the Debian packages must come first: the build needs opencv4.pc and libturbojpeg.pc)")
FIELDS = ("image", "label", "index")


def require_ffcv():
    threads = torch.get_num_threads()
    try:
        import ffcv  # noqa: F401
    except ImportError:
        raise UserError(f"data.loader=ffcv needs the ffcv package, which is not installed; expected: "
                        f"{INSTALL_HINT}") from None
    finally:
        # importing ffcv sets torch's intra-op threads to 1 (its pipeline Compiler does, at import):
        # the training step, and every later one in the process, would run on one core
        torch.set_num_threads(threads)


def check_beton(path: str | Path, image_size: tuple[int, int] | None = None) -> int:
    """Number of samples, after checking the file is a complete fastvae .beton (one-line error otherwise)
    whose images are image_size = (height, width) when that is given."""
    require_ffcv()
    from ffcv.reader import Reader

    path = Path(path)
    if not path.is_file():
        raise UserError(f".beton '{path}' not found; expected a file written by `python -m fastvae.data.ffcv`")
    try:
        reader = Reader(str(path))
    except Exception as err:  # numpy/ffcv raise assorted errors on foreign bytes
        raise UserError(f".beton '{path}' is not an FFCV dataset ({type(err).__name__}: {err}); "
                        f"expected a file written by `python -m fastvae.data.ffcv`") from None
    missing = [f for f in FIELDS if f not in reader.field_names]
    if missing:
        raise UserError(f".beton '{path}' has fields {reader.field_names}; expected {list(FIELDS)} "
                        f"(written by fastvae.data.ffcv)")
    size = path.stat().st_size
    table = reader.alloc_table
    table_end = int(reader.header["alloc_table_ptr"]) + table.nbytes
    if len(table) == 0 or table_end != size or int((table["ptr"] + table["size"]).max()) > size:
        raise UserError(f".beton '{path}' is truncated or damaged ({size} bytes; its tables say {table_end}); "
                        f"expected a complete file: write it again")
    if image_size is not None:
        shapes = reader.metadata[f"f{reader.field_names.index('image')}"][["height", "width"]]
        wrong = shapes[(shapes["height"] != image_size[0]) | (shapes["width"] != image_size[1])]
        if len(wrong):
            raise UserError(f".beton '{path}' holds {wrong[0]['height']}x{wrong[0]['width']} images; expected "
                            f"{image_size[0]}x{image_size[1]} (data.image_size): write it with this config")
    return int(reader.num_samples)


def _pipelines(device: torch.device) -> dict:
    """FFCV pipelines giving (uint8 image [B, 3, H, W], label, index) on `device`."""
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

    to_device = ToDevice(device, non_blocking=device.type == "cuda")
    ints = [IntDecoder(), ToTensor(), Squeeze(), to_device]
    return {"image": [SimpleRGBImageDecoder(), ToTensor(), to_device, ToTorchImage()], "label": ints,
            "index": ints, "attributes": None}


def beton_to_memory(path: str | Path, channels: int, image_size: tuple[int, int] | None = None, num_workers: int = 1,
                    progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A whole .beton read once, in record order, into (uint8 images [N, C, H, W], labels, indices):
    data.loader=memory fed by FFCV's decoder instead of decoding image by image."""
    from ffcv.loader import Loader, OrderOption
    from tqdm.auto import tqdm

    check_beton(path, image_size)
    loader = Loader(str(path), batch_size=512, num_workers=num_workers, order=OrderOption.SEQUENTIAL,
                    drop_last=False, pipelines=_pipelines(torch.device("cpu")))
    images, labels, indices = [], [], []
    for image, label, index in tqdm(loader, desc="read .beton into memory", unit="batch", disable=not progress):
        # copies: FFCV hands out views of buffers it refills with later batches
        images.append(image[:, :channels].clone(memory_format=torch.contiguous_format))
        labels.append(label.clone())
        indices.append(index.clone())
    return torch.cat(images), torch.cat(labels), torch.cat(indices)


class EpochOrder:
    """An FFCV TraversalOrder: the records this rank reads in an epoch, batch after batch, from
    batch `start` on. data.order=random: its shares of fastvae.data.sharding's global batches
    (FFCV's own distributed order pads shards with repeated images); quasi_random: FFCV's
    page-local order, for one process. Knowing which record lands where lets the loader resume
    without decoding the batches it skips, and flip by fastvae's per-image draw. FFCV's Loader
    takes an order as an object it calls with itself (ffcv/loader/loader.py), hence __call__."""

    def __init__(self, plan: ShardPlan, quasi_random: bool) -> None:
        self.plan, self.quasi_random, self.start = plan, quasi_random, 0
        self.quasi, self._cached = None, (None, None)

    def __call__(self, loader):
        if self.quasi_random:
            from ffcv.traversal_order import QuasiRandom

            self.quasi = QuasiRandom(loader)  # seeded by (loader seed, epoch)
        return self

    def positions(self, epoch: int) -> np.ndarray:
        """Every record this rank reads in `epoch`, in order: batch b starts at b x batch_size."""
        if self._cached[0] != epoch:
            if self.quasi is not None:
                order = self.quasi.sample_order(epoch)[: len(self.plan) * self.plan.batch_size]
            else:
                shares = list(self.plan.shares(epoch))
                order = torch.cat(shares).numpy() if shares else np.zeros(0, dtype=np.int64)
            self._cached = (epoch, order)
        return self._cached[1]

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.positions(epoch)[self.start * self.plan.batch_size:]


class FFCVTrainLoader:
    """Training batches (image float NCHW in [0, 1] on the device, label, index) from a .beton.

    Order: fastvae's (EpochOrder). Flips: fastvae.data.sharding's per-image draw, applied on the
    device after decoding, as the in-memory loader does; FFCV's RandomHorizontalFlip draws from
    numba's generator, which nothing seeds: no two runs (or resumes, or ranks) would flip alike.
    """

    def __init__(self, path: str | Path, batch_size: int, channels: int, device: torch.device, seed: int,
                 order: str = "random", flip: bool = False, drop_last: bool = True, rank: int = 0,
                 world_size: int = 1, num_workers: int = 1, image_size: tuple[int, int] | None = None) -> None:
        images = check_beton(path, image_size)
        if order == "quasi_random" and world_size > 1:
            raise UserError(f"data.order=quasi_random with {world_size} processes: FFCV cannot shard that "
                            f"order; expected data.order=random")
        from ffcv.loader import Loader
        from ffcv.traversal_order.base import TraversalOrder

        self.channels, self.device, self.flip, self.epoch = channels, device, flip, 0
        TraversalOrder.register(EpochOrder)  # what FFCV's Loader checks an order object for
        self.plan = ShardPlan(images, batch_size, seed, rank, world_size, drop_last)
        self.order = EpochOrder(self.plan, order == "quasi_random")
        self.loader = Loader(str(path), batch_size=batch_size, num_workers=num_workers, seed=seed,
                             order=self.order, drop_last=drop_last, pipelines=_pipelines(device))

    def __len__(self) -> int:
        return len(self.plan)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self, start: int):
        # FFCV's Loader counts epochs itself (+1 per iteration): set it to ours before each one
        self.loader.next_epoch, self.order.start = self.epoch, start
        read = self.order.positions(self.epoch)[start * self.plan.batch_size:]
        flips = self.plan.flips(self.epoch)[read].to(self.device) if self.flip else None
        done = 0
        for image, label, index in self.loader:
            # RGB on disk, one channel kept for greyscale; the torchvision path's own uint8 -> float
            # conversion, so both loaders give bit-identical inputs
            x = unit_float(image[:, : self.channels])
            if flips is not None:
                x = mirror_where(x, flips[done:done + len(x)])
            done += len(x)
            yield x, label.clone(), index.clone()  # FFCV refills its buffers with later batches

    def __iter__(self):
        return self._batches(0)

    def skip_first(self, n: int):
        """This epoch's batches after the first n (resume inside an epoch); the n are not read."""
        return self._batches(n)
