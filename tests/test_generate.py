"""fastvae.generate: the API's math, and every command on a tiny checkpoint trained here."""

import json

import pytest
import torch
from PIL import Image

from fastvae.checkpoint import list_checkpoints
from fastvae.data.base import ImageTensorDataset
from fastvae.generate import (LoadedVAE, apply_attribute, attribute_vector, attribute_vector_for, encode,
                              encode_split, images_at, interpolate, load, main, reconstruct)
from fastvae.train import train
from fastvae.run_setup import reset_accelerate_state
from helpers import tiny_config
from shared import built_once


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    def build(folder):
        train(tiny_config(folder / "run", "train.epochs=2", "data.limit=512", "optim.lr=2e-3"))
        reset_accelerate_state()

    return list_checkpoints(built_once(tmp_path_factory, "tiny_2_epochs", build) / "run")[-1]


def png_size(path):
    with Image.open(path) as img:
        return img.size


def test_attribute_vector_is_the_difference_of_group_means():
    mu = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0], [20.0, 0.0], [30.0, 3.0]])
    present = torch.tensor([1, 1, 0, 0, 0])
    torch.testing.assert_close(attribute_vector(mu, present), torch.tensor([2.0 - 20.0, 3.0 - 1.0]))


def test_attribute_vector_needs_both_groups():
    from fastvae.errors import UserError

    with pytest.raises(UserError, match="expected both groups to be non-empty"):
        attribute_vector(torch.zeros(3, 2), torch.ones(3))


def test_alpha_zero_is_the_plain_reconstruction_and_alpha_moves_along_the_vector(checkpoint):
    vae = load(checkpoint, "cpu")
    images = images_at(vae, "test", [0, 1, 2])
    z_diff = torch.tensor([0.7, -0.3])
    alphas = [-2.0, -1.0, 0.0, 1.0, 2.0]
    sweep = apply_attribute(vae, images, z_diff, alphas)
    assert sweep.shape == (3, 5, 1, 28, 28)
    assert torch.equal(sweep[:, 2], reconstruct(vae, images))  # alpha = 0: exactly the reconstruction
    seen = []
    decode = vae.model.decode
    vae.model.decode = lambda z: (seen.append(z.clone()), decode(z))[1]
    apply_attribute(vae, images[:1], z_diff, alphas)
    vae.model.decode = decode
    shift = torch.cat(seen) - encode(vae, images[:1])  # z_new - z_orig, one decode per alpha
    projections = shift @ z_diff / z_diff.norm()
    assert projections.tolist() == pytest.approx([a * z_diff.norm().item() for a in alphas], abs=1e-5)
    assert torch.sign(projections).tolist() == [-1.0, -1.0, 0.0, 1.0, 1.0]


def test_interpolation_endpoints_are_the_reconstructions(checkpoint):
    vae = load(checkpoint, "cpu")
    images = images_at(vae, "test", [3, 100, 200])
    recon = reconstruct(vae, images)
    for spherical in (False, True):
        rows = interpolate(vae, images, steps=5, spherical=spherical)
        assert rows.shape == (2, 5, 1, 28, 28)
        torch.testing.assert_close(rows[0, 0], recon[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(rows[0, -1], recon[1], atol=1e-5, rtol=0)
        torch.testing.assert_close(rows[1, -1], recon[2], atol=1e-5, rtol=0)


def test_label_pair_vector_matches_hand_computation(checkpoint):
    vae = load(checkpoint, "cpu")
    z_diff, meta = attribute_vector_for(vae, "test", labels=(0, 1))
    mu, y = encode_split(vae, "test")
    torch.testing.assert_close(z_diff, mu[y == 0].mean(0) - mu[y == 1].mean(0))
    assert meta["present"] == int((y == 0).sum()) and meta["absent"] == int((y == 1).sum())


class AttributeDataset(ImageTensorDataset):
    """A labeled set that also has named 0/1 attributes, the interface CelebA provides."""

    attribute_names = ("Smiling", "Eyeglasses")

    def __init__(self, images, labels, attrs):
        super().__init__(images, labels)
        self.attrs = attrs

    def attribute_values(self, name):
        return self.attrs[:, self.attribute_names.index(name)]


def test_named_attribute_vector(checkpoint):
    vae = load(checkpoint, "cpu")
    base = vae.split("test")
    smiling = (base.labels % 2 == 0).long()
    ds = AttributeDataset(base.images, base.labels, torch.stack([smiling, 1 - smiling], 1))
    named = LoadedVAE(vae.model, vae.cfg, vae.meta, vae.path, vae.device, _datasets=(ds, ds))
    z_diff, meta = attribute_vector_for(named, "test", attribute="Smiling")
    mu, _ = encode_split(named, "test")
    torch.testing.assert_close(z_diff, mu[smiling == 1].mean(0) - mu[smiling == 0].mean(0))
    assert meta["attribute"] == "Smiling"
    from fastvae.errors import UserError

    with pytest.raises(UserError, match="attribute 'Bald' not in mnist; expected one of: Smiling, Eyeglasses"):
        attribute_vector_for(named, "test", attribute="Bald")
    with pytest.raises(UserError, match="dataset mnist has no named attributes"):
        attribute_vector_for(vae, "test", attribute="Smiling")


def run(checkpoint, tmp_path, *args):
    return main([args[0], "--checkpoint", str(checkpoint), "--out", str(tmp_path), *args[1:]])


def expected_size(cols, rows, labeled, title_lines=1):
    """Grid cells are 28 px + 2 px padding (+2 px outer), upscaled 2x; 110 px of row labels;
    a 28 px title band plus 18 px per extra title line."""
    width = (cols * 30 + 2) * 2 + (110 if labeled else 0)
    return width, 28 + 18 * (title_lines - 1) + (rows * 30 + 2) * 2




def test_cli_commands_write_pngs_of_the_expected_size(checkpoint, tmp_path, capsys):
    from fastvae.pictures import wrap_title

    def check(path, cols, rows, labeled, title):
        width = expected_size(cols, rows, labeled)[0]
        assert png_size(path) == expected_size(cols, rows, labeled, len(wrap_title(title, width))), path.name

    (sample,) = run(checkpoint, tmp_path, "sample", "--n", "16")
    check(sample, 4, 4, False, "16 samples from N(0, I), latent dim 2, seed 0")
    (recon,) = run(checkpoint, tmp_path, "reconstruct", "--n", "20")
    assert png_size(recon) == expected_size(10, 4, True)  # 714 x 272: the title fits on one line
    (interp,) = run(checkpoint, tmp_path, "interpolate", "--indices", "0", "250", "499", "--steps", "6")
    assert interp.name == "interpolation_linear.png"
    check(interp, 6, 2, True, "linear interpolation between posterior means (test images)")
    (slerp,) = run(checkpoint, tmp_path, "interpolate", "--indices", "0", "250", "--spherical", "--steps", "4")
    assert slerp.name == "interpolation_spherical.png"
    scatter, manifold = run(checkpoint, tmp_path, "latent-plot", "--grid", "5")
    assert png_size(scatter) == (700, 600)
    check(manifold, 5, 5, False, "Decoded z over [-3, 3]^2 (z[0] left to right, z[1] top to bottom)")
    vector, sweep = run(checkpoint, tmp_path, "attribute", "--labels", "0", "1", "--indices", "0", "1", "2")
    check(sweep, 5, 3, True, "z + alpha * z_diff[label 0 - label 1], alpha = -2, -1, 0, 1, 2")
    meta = json.loads(vector.with_suffix(".json").read_text())
    assert meta["labels"] == [0, 1] and meta["latent_dim"] == 2 and meta["present"] > 0
    (again,) = run(checkpoint, tmp_path, "attribute", "--vector", str(vector), "--alphas", "-1", "1",
                   "--indices", "4")
    check(again, 2, 1, True, "z + alpha * z_diff[label 0 - label 1], alpha = -1, 1")
    out = capsys.readouterr().out
    assert out.count("fastvae: wrote ") == 9


def test_cli_bad_checkpoint_is_one_line_exit_2(tmp_path, capsys, checkpoint):
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--checkpoint", str(tmp_path / "nope")])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"fastvae: error: checkpoint '{tmp_path / 'nope'}' not found; expected a directory written by "
        f"fastvae.train (e.g. runs/mnist/checkpoints/step_00001000)"]
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--checkpoint", str(broken)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "model.safetensors' is unreadable" in err[0]
    with pytest.raises(SystemExit):
        main(["interpolate", "--checkpoint", str(checkpoint), "--indices", "0", "100000"])
    assert "image index 100000: expected 0 <= index < 500" in capsys.readouterr().err


def test_labels_take_class_names_and_an_unknown_one_is_one_line(checkpoint, tmp_path, capsys):
    """MNIST's classes are named "0"-"9": by name or index alike; a name it lacks is one line, not argparse's
    'invalid int value' and its usage."""
    [vector, _] = main(["attribute", "--checkpoint", str(checkpoint), "--labels", "9", "4", "--split", "test",
                        "--alphas", "0", "--out", str(tmp_path)])
    assert vector.name == "attribute_labels_9_minus_4.pt"
    with pytest.raises(SystemExit) as exc:
        main(["attribute", "--checkpoint", str(checkpoint), "--labels", "9", "circle"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "fastvae: error: --labels circle: expected a class index 0-9 or one of: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9"]
