"""FFCV: write any fastvae dataset to a .beton, and load it for training.

    python -m fastvae.data.ffcv --config configs/celeba.yaml --out data/celeba_64 [--mode jpg --quality 90]
        -> data/celeba_64/train.beton and data/celeba_64/test.beton
    python -m fastvae.train --config configs/celeba.yaml data.loader=ffcv data.beton=data/celeba_64/train.beton

Each record holds the image after the dataset's own crop/resize (so the loader
only decodes), its label, its dataset index and, for CelebA, the 40 attributes.
Writes go to a temporary file renamed at the end: an interrupted conversion
never leaves a file that looks complete.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms.v2.functional import to_dtype

from fastvae.commands import ffcv_parser
from fastvae.config import Config, load_config
from fastvae.data.base import mirror_where, to_uint8
from fastvae.data.sharding import ShardPlan
from fastvae.errors import UserError, exit_on_user_error

INSTALL_HINT = ("apt-get install -y libopencv-dev libturbojpeg0-dev && pip install 'fastvae[ffcv]' "
                "(the Debian packages must come first: the build needs opencv4.pc and libturbojpeg.pc)")
FIELDS = ("image", "label", "index")


def require_ffcv():
    try:
        import ffcv  # noqa: F401
    except ImportError:
        raise UserError(f"data.loader=ffcv needs the ffcv package, which is not installed; expected: "
                        f"{INSTALL_HINT}") from None


class _AsFFCVRecords(Dataset):
    """(HWC uint8 RGB image, label, index[, attributes]): what FFCV's fields take.

    FFCV's writer runs this in forked workers and waits forever for a worker that
    died, so an undecodable image must not raise here: it is written as a black
    placeholder and its index logged to `failures`, which the parent reads after.
    """

    def __init__(self, dataset, image_shape: tuple, failures: Path) -> None:
        self.dataset, self.image_shape, self.failures = dataset, image_shape, failures
        self.attributes = getattr(dataset, "attributes", None)
        self.parent_pid = os.getpid()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        if os.getpid() != self.parent_pid and torch.get_num_threads() != 1:
            # FFCV's writer forks workers; an OpenMP thread pool inherited from a parent that
            # already computed in parallel deadlocks the child: run its torch ops on one thread
            torch.set_num_threads(1)
        try:
            item = self.dataset[i]
        except UserError as err:
            item = None
            reason = str(err)
        else:
            reason = "could not be decoded"
        if item is None:  # undecodable (skip_corrupt datasets return None, the others raise)
            with open(self.failures, "a") as fh:
                fh.write(f"{i}\t{reason}\n")
            x, y, index = torch.zeros(self.image_shape), 0, i
        else:
            x, y, index = item
        image = to_uint8(x)
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)  # FFCV stores RGB; the loader keeps one channel again
        record = (np.ascontiguousarray(image.permute(1, 2, 0).numpy()), int(y), int(index))
        if self.attributes is not None:
            record += (self.attributes[i].numpy().astype(np.uint8),)
        return record


def _image_shape(dataset) -> tuple:
    for i in range(len(dataset)):
        try:
            item = dataset[i]
        except UserError:
            continue
        if item is not None:
            return tuple(item[0].shape)
    raise UserError("no image of the dataset could be decoded; expected valid image files")


def write_beton(dataset, path: str | Path, mode: str = "raw", quality: int = 90, num_workers: int = 1,
                skip_corrupt: bool = False) -> Path:
    """Write one split (FFCV's writer shows the progress bar); raw = uncompressed pixels (exact),
    jpg = JPEG at `quality` (smaller, lossy). Undecodable images stop the write with their name,
    or with skip_corrupt are left out and counted."""
    require_ffcv()
    from ffcv.fields import IntField, NDArrayField, RGBImageField
    from ffcv.writer import DatasetWriter

    if mode not in ("raw", "jpg"):
        raise UserError(f"--mode {mode!r}: expected raw or jpg")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    failures = path.with_name(f".{path.name}.failures-{os.getpid()}")
    records = _AsFFCVRecords(dataset, _image_shape(dataset), failures)
    fields = {"image": RGBImageField(write_mode=mode, jpeg_quality=quality), "label": IntField(),
              "index": IntField()}
    if records.attributes is not None:
        fields["attributes"] = NDArrayField(np.dtype("uint8"), (records.attributes.shape[1],))

    def write(indices=None):
        DatasetWriter(str(tmp), fields, num_workers=num_workers).from_indexed_dataset(records, indices=indices)

    try:
        write()
        bad = sorted(failures.read_text().splitlines()) if failures.exists() else []
        if bad:
            first = bad[0].split("\t", 1)[1]
            if not skip_corrupt:
                raise UserError(f"{first} ({len(bad)} undecodable image(s) in total); expected valid images, "
                                f"or --skip-corrupt to leave them out")
            skipped = {int(line.split("\t")[0]) for line in bad}
            failures.unlink()
            write([i for i in range(len(dataset)) if i not in skipped])
            print(f"fastvae: left {len(skipped)} undecodable image(s) out of {path.name}, e.g. {first}",
                  file=sys.stderr)
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, failures):
            if leftover.exists():
                leftover.unlink()
    return path


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
            x = to_dtype(image[:, : self.channels], torch.float32, scale=True)
            if flips is not None:
                x = mirror_where(x, flips[done:done + len(x)])
            done += len(x)
            yield x, label.clone(), index.clone()  # FFCV refills its buffers with later batches

    def __iter__(self):
        return self._batches(0)

    def skip_first(self, n: int):
        """This epoch's batches after the first n (resume inside an epoch); the n are not read."""
        return self._batches(n)


def parse_args(argv):
    return ffcv_parser().parse_args(argv)


@exit_on_user_error
def main(argv=None) -> list[Path]:
    from fastvae.data import build_datasets

    args = parse_args(argv)
    if not 1 <= args.quality <= 100:
        raise UserError(f"--quality {args.quality}: expected 1 to 100")
    require_ffcv()
    cfg: Config = load_config(args.config, args.overrides)
    train_set, test_set = build_datasets(cfg.data)
    out = Path(args.out)
    written = [write_beton(ds, out / f"{name}.beton", args.mode, args.quality, args.workers,
                           args.skip_corrupt or cfg.data.skip_corrupt)
               for name, ds in (("train", train_set), ("test", test_set))]
    for path in written:
        print(f"fastvae: wrote {path} ({check_beton(path)} images, {path.stat().st_size / 2**20:.1f} MiB)")
    return written


if __name__ == "__main__":
    main()
