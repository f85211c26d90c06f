"""The CelebA reader on format-exact fixtures, training on it, and the 'make people smile' sweep."""

import pytest
import torch
from PIL import Image

from fastvae.checkpoint import list_checkpoints
from fastvae.config import load_config
from fastvae.data import build_datasets
from fastvae.errors import UserError
from fastvae.generate import main as generate_main
from fastvae.train import train
from tools.celeba_fixture import ATTRIBUTES, attribute_value, partition, write_celeba
from helpers import CONFIGS


def celeba_config(root, *overrides):
    return load_config(CONFIGS / "celeba.yaml", [f"data.root={root}", "data.num_workers=0",
                                                 "train.mixed_precision=no", *overrides])


@pytest.mark.parametrize("layout", ["official", "torchvision"])
def test_reader_counts_splits_attributes_and_shapes(tmp_path, layout):
    root = write_celeba(tmp_path / "celeba_root", n=60, layout=layout)
    train_set, test_set = build_datasets(celeba_config(root).data)
    expected_train = [i for i in range(60) if partition(i, 60) == 0]
    expected_test = [i for i in range(60) if partition(i, 60) == 2]
    assert (len(train_set), len(test_set)) == (len(expected_train), len(expected_test)) == (42, 9)
    assert train_set.attribute_names == tuple(ATTRIBUTES)
    for name in ("Smiling", "Eyeglasses", "Bald"):
        want = torch.tensor([attribute_value(i, name) == 1 for i in expected_train], dtype=torch.uint8)
        assert torch.equal(train_set.attribute_values(name), want)
    x, label, index = test_set[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert label.item() == (attribute_value(expected_test[0], "Smiling") == 1)
    valid = build_datasets(celeba_config(root, "data.test_split=valid").data)[1]
    assert len(valid) == 9 and valid.files[0] == f"{int(60 * 0.7) + 1:06d}.jpg"
    big = build_datasets(celeba_config(root, "data.image_size=128").data)[0]
    assert big[0][0].shape == (3, 128, 128)


def test_center_crop_is_the_dfc_vae_148_square(tmp_path):
    root = write_celeba(tmp_path / "c", n=10)
    image = torch.zeros(218, 178, 3, dtype=torch.uint8)
    image[35:183, 15:163] = 255  # white exactly where the centered 148x148 crop falls
    Image.fromarray(image.numpy()).save(root / "img_align_celeba" / "000001.jpg", quality=100)
    train_set, _ = build_datasets(celeba_config(root).data)
    assert train_set[0][0].mean().item() > 0.97  # nothing of the black border survives


def corrupt(root, file, edit):
    path = root / file
    path.write_text(edit(path.read_text()))


@pytest.mark.parametrize("damage, message", [
    (lambda r: (r / "list_attr_celeba.txt").unlink(), "CelebA attribute file '{root}/list_attr_celeba.txt' not found"),
    (lambda r: (r / "list_eval_partition.txt").unlink(), "CelebA partition file '{root}/list_eval_partition.txt' not found"),
    (lambda r: corrupt(r, "list_attr_celeba.txt", lambda t: "61" + t[2:]),
     "{root}/list_attr_celeba.txt line 1: says 61 images but the file lists 60"),
    (lambda r: corrupt(r, "list_attr_celeba.txt", lambda t: t.replace("000007.jpg", "000007.jpg  1", 1)),
     "{root}/list_attr_celeba.txt line 9: 41 values; expected 40"),
    (lambda r: corrupt(r, "list_attr_celeba.txt", lambda t: t.replace("000004.jpg -1", "000004.jpg  0", 1)),
     "{root}/list_attr_celeba.txt line 6: values must be 1 or -1"),
    (lambda r: (r / "img_align_celeba" / "000005.jpg").unlink(),
     "{root}/list_attr_celeba.txt line 7: image '{root}/img_align_celeba/000005.jpg' is missing"),
    (lambda r: corrupt(r, "list_eval_partition.txt", lambda t: t.replace("000003.jpg 0\n", "")),
     "{root}/list_eval_partition.txt: no partition for 000003.jpg"),
])
def test_bad_celeba_files_name_the_file_and_line(tmp_path, damage, message):
    root = write_celeba(tmp_path / "c", n=60)
    damage(root)
    with pytest.raises(UserError) as err:
        build_datasets(celeba_config(root).data)
    assert message.format(root=root) in str(err.value)


def test_corrupt_jpeg_names_the_file_or_is_skipped(tmp_path, capsys):
    root = write_celeba(tmp_path / "c", n=10)
    (root / "img_align_celeba" / "000002.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    train_set, _ = build_datasets(celeba_config(root).data)
    with pytest.raises(UserError, match="image '.*000002.jpg' could not be decoded"):
        train_set[1]
    skipping, _ = build_datasets(celeba_config(root, "data.skip_corrupt=true").data)
    assert skipping[1] is None and skipping[0] is not None
    assert "fastvae: skipping image '" in capsys.readouterr().err


def test_training_skips_corrupt_images_when_asked(tmp_path, capsys):
    root = write_celeba(tmp_path / "c", n=60)
    for name in ("000002.jpg", "000005.jpg"):
        (root / "img_align_celeba" / name).write_bytes(b"not a jpeg")
    cfg = celeba_config(root, f"out_dir={tmp_path / 'run'}", "data.batch_size=8", "train.epochs=1",
                        "train.samples=4", "model.latent_dim=8", "data.skip_corrupt=true")
    assert train(cfg)["step"] == 5  # the batches holding them are one image short, nothing stops
    err = capsys.readouterr().err
    assert "000002.jpg" in err and "000005.jpg" in err


def test_train_on_celeba_fixture_then_make_them_smile(tmp_path):
    root = write_celeba(tmp_path / "c", n=60)
    out = tmp_path / "run"
    cfg = celeba_config(root, f"out_dir={out}", "data.batch_size=8", "train.epochs=2", "train.samples=4",
                        "model.latent_dim=16")
    result = train(cfg)
    assert result["step"] == 10  # 42 training images / 8 = 5 steps per epoch
    ckpt = list_checkpoints(out)[-1]
    vector, sweep = generate_main(["attribute", "--checkpoint", str(ckpt), "--attribute", "Smiling",
                                   "--indices", "0", "1", "--alphas", "-1", "0", "1", "--out", str(tmp_path / "g")])
    assert vector.name == "attribute_Smiling.pt"
    with Image.open(sweep) as img:
        assert img.size[0] == 110 + 3 * 66 + 2  # 64 px cells + 2 px padding, no upscale, row labels
    z_diff = torch.load(vector, weights_only=True)["z_diff"]
    assert z_diff.shape == (16,) and torch.isfinite(z_diff).all() and z_diff.norm() > 0
