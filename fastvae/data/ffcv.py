"""FFCV on the writing side: any fastvae dataset to a .beton (the reading side: fastvae.data.ffcv_loader).

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

from fastvae.commands import ffcv_parser
from fastvae.config import Config, load_config
from fastvae.data.base import to_uint8
from fastvae.data.ffcv_loader import check_beton, require_ffcv
from fastvae.errors import UserError, exit_on_user_error


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
