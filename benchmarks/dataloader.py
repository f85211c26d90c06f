"""Images/s of the training input pipeline: torchvision DataLoader vs FFCV (raw and JPEG .beton).

A synthetic CelebA in the real on-disk format (178x218 JPEGs), cropped to 148
and resized to 64 like DFC-VAE; batches of float NCHW images in [0, 1] on the CPU.
Second table: the start-up of data.loader=memory, which holds the whole training
set as uint8 (on the GPU when there is one): decoding it image by image (one
process, or DataLoader workers) vs reading a .beton once.

    python benchmarks/dataloader.py [--images 2048] [--batch 256] [--workers 2] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from harness import base_parser, celeba_folder, print_table, write_json  # noqa: E402

from fastvae.config import load_config  # noqa: E402
from fastvae.data import build_datasets  # noqa: E402
from fastvae.data.ffcv import write_beton  # noqa: E402
from fastvae.data.ffcv_loader import FFCVTrainLoader, beton_to_memory  # noqa: E402
from fastvae.data.memory import decode_to_memory  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def epoch_seconds(loader) -> tuple[float, int]:
    start, n = time.perf_counter(), 0
    for x, _, _ in loader:
        n += x.shape[0]
    return time.perf_counter() - start, n


def main(argv=None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.set_defaults(repeats=5)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fastvae-dataloader-"))
    print(f"writing {args.images} synthetic CelebA-format JPEGs and two .beton files in {work} ...", flush=True)
    # every image in the train partition: n / 0.7 images written, the first 70% are train
    root = celeba_folder(work / "celeba", int(args.images / 0.7) + 1)
    cfg = load_config(ROOT / "configs" / "celeba.yaml", [f"data.root={root}"])
    train_set, _ = build_datasets(cfg.data)
    betons = {mode: write_beton(train_set, work / f"{mode}.beton", mode, 90, args.workers) for mode in ("raw", "jpg")}
    device = torch.device("cpu")
    loaders = {
        "torchvision DataLoader": DataLoader(train_set, batch_size=args.batch, shuffle=True, drop_last=True,
                                             num_workers=args.workers, persistent_workers=True),
        "ffcv raw": FFCVTrainLoader(betons["raw"], args.batch, 3, device, seed=0, num_workers=args.workers),
        "ffcv jpg q90": FFCVTrainLoader(betons["jpg"], args.batch, 3, device, seed=0, num_workers=args.workers),
    }
    first_epoch = {}
    for name, loader in loaders.items():  # epoch 1 pays worker start-up and FFCV's numba compilation
        seconds, n = epoch_seconds(loader)
        first_epoch[name] = n / seconds
    samples = {name: [] for name in loaders}
    names = list(loaders)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:  # interleaved, rotating order
            seconds, n = epoch_seconds(loaders[name])
            samples[name].append(n / seconds)
    base = statistics.median(samples["torchvision DataLoader"])
    rows = [{"loader": name, "epoch1_images_per_s": first_epoch[name],
             "epoch1_x_torchvision": first_epoch[name] / first_epoch["torchvision DataLoader"],
             "median_images_per_s": statistics.median(v), "min": min(v), "max": max(v),
             "x_torchvision": statistics.median(v) / base,
             "file_MiB": betons[name.split()[1][:3]].stat().st_size / 2**20 if name.startswith("ffcv") else None}
            for name, v in samples.items()]
    print(f"\n{len(train_set)} images 3x64x64, batch {args.batch}, {args.workers} workers; epoch 1 (start-up and "
          f"compilation), then steady state: median of {args.repeats} interleaved epochs per loader")
    print_table([{**r, "file_MiB": "-" if r["file_MiB"] is None else f"{r['file_MiB']:.1f}"} for r in rows],
                [("loader", "loader", ""), ("epoch1_images_per_s", "epoch 1 img/s", ".0f"),
                 ("epoch1_x_torchvision", "x tv", ".2f"), ("median_images_per_s", "steady img/s", ".0f"),
                 ("min", "min", ".0f"), ("max", "max", ".0f"), ("x_torchvision", "x tv", ".2f"),
                 ("file_MiB", ".beton MiB", "")])
    memory_rows = into_memory(train_set, betons, args.workers, args.repeats)
    write_json(args.json, {"benchmark": "dataloader", "images": len(train_set), "batch": args.batch,
                           "workers": args.workers, "repeats": args.repeats, "results": rows,
                           "into_memory": memory_rows})


def into_memory(train_set, betons: dict, workers: int, repeats: int) -> list[dict]:
    """Seconds to hold the training set in memory as uint8 (data.loader=memory's start-up), interleaved."""
    ways = {"decode image by image, 1 process": lambda: decode_to_memory(train_set),
            f"decode image by image, {workers} workers": lambda: decode_to_memory(train_set, workers),
            "read raw .beton": lambda: beton_to_memory(betons["raw"], 3, num_workers=workers),
            "read jpg .beton": lambda: beton_to_memory(betons["jpg"], 3, num_workers=workers)}
    samples = {name: [] for name in ways}
    names = list(ways)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            images = ways[name]()[0]
            samples[name].append(time.perf_counter() - start)
            assert len(images) == len(train_set)
    base = statistics.median(samples[names[0]])
    rows = [{"way": name, "median_s": statistics.median(v), "images_per_s": len(train_set) / statistics.median(v),
             "x_one_process": base / statistics.median(v)} for name, v in samples.items()]
    print(f"\ndata.loader=memory start-up: {len(train_set)} images into one uint8 tensor, median of {repeats}")
    print_table(rows, [("way", "way", ""), ("median_s", "seconds", ".2f"), ("images_per_s", "img/s", ".0f"),
                       ("x_one_process", "x 1 process", ".2f")])
    return rows


if __name__ == "__main__":
    main()
