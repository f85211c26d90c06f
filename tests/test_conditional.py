"""The conditional VAE (model.condition): digits of the asked class, checked by a classifier fitted on
the real digits; CelebA-format faces whose Smiling follows the condition; the CLI around them.
(Exact resume and 2 processes = 1: with the objectives in tests/test_objectives.py.)"""

import os
import subprocess
import sys

import warnings

import pytest
import torch
import torch.nn.functional as F

from fastvae.checkpoint import list_checkpoints
from fastvae.config import load_config
from fastvae.errors import UserError
from fastvae.generate import load, main as generate, sample
from fastvae.train import train
from helpers import ROOT, TINY, tiny_config
from shared import built_once


def nearest_class_mean(images: torch.Tensor, labels: torch.Tensor, classes: int):
    """A classifier fitted on real images: the nearest class mean by cosine (indifferent to how
    bright a sample is)."""
    means = F.normalize(torch.stack([images[labels == c].mean(0) for c in range(classes)]).flatten(1), dim=1)
    return lambda x: (F.normalize(x.flatten(1), dim=1) @ means.T).argmax(1)


@pytest.fixture(scope="module")
def mnist_cvae(tmp_path_factory):
    """A labels-conditional conv VAE, 3 epochs on the 4,500 embedded real MNIST digits (~25 s)."""
    def build(folder):
        train(load_config("mnist", [f"out_dir={folder / 'run'}", "train.epochs=3", "model.condition=labels",
                                    "train.mixed_precision=no"]))

    return list_checkpoints(built_once(tmp_path_factory, "mnist_cvae", build) / "run")[-1]


def test_generated_digits_are_of_the_asked_class(mnist_cvae):
    vae = load(mnist_cvae, "cpu")
    train_set, test_set = vae.split("train"), vae.split("test")
    classify = nearest_class_mean(train_set.images.float() / 255, train_set.labels, 10)
    on_real = (classify(test_set.images.float() / 255) == test_set.labels).float().mean().item()
    hits = torch.stack([(classify(sample(vae, 50, seed=1, condition=vae.conditioning.class_vector(str(c)))) == c)
                        .float().mean() for c in range(10)])
    # the classifier gets ~82% of the real test digits right; chance is 10%
    assert on_real > 0.75 and hits.mean() > 0.8 and hits.min() > 0.4, (on_real, hits)
    by_name = sample(vae, 4, seed=2, condition=vae.conditioning.class_vector("7"))
    assert torch.equal(by_name, sample(vae, 4, seed=2, condition=torch.eye(10)[7]))


def test_generate_commands_on_a_conditional_model(mnist_cvae, tmp_path, capsys):
    out = tmp_path / "gen"
    [path] = generate(["sample", "--checkpoint", str(mnist_cvae), "--condition", "3", "--n", "9", "--out", str(out)])
    assert path.is_file()
    [rows] = generate(["sample", "--checkpoint", str(mnist_cvae), "--n", "20", "--out", str(out / "rows")])
    assert rows.is_file()  # one row per class
    for command in (["reconstruct", "--n", "10"], ["interpolate", "--indices", "0", "5"],
                    ["latent-plot", "--max-points", "200", "--condition", "1"]):
        assert all(p.is_file() for p in generate([*command, "--checkpoint", str(mnist_cvae), "--out", str(out)]))
    for bad, message in ((["sample", "--condition", "12"], "--condition 12: expected a class index 0-9 or one of"),
                         (["sample", "--attributes", "Smiling=1"], "this model is conditioned on labels"),
                         (["attribute", "--labels", "8", "1"], "is of a conditional model")):
        with pytest.raises(SystemExit) as exc:
            generate([*bad, "--checkpoint", str(mnist_cvae)])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def test_evaluate_gives_the_model_each_images_condition(mnist_cvae):
    from fastvae.evaluate import main as evaluate

    report = evaluate(["--checkpoint", str(mnist_cvae), "--max-images", "100", "--iwae-samples", "5"])
    assert report["images"] == 100 and report["iwae_nll_nats"] < -report["elbo_nats"] + 1.0
    # the same images given the wrong classes explain them worse: the condition reaches the model
    from fastvae.evaluation import Likelihood, evaluate_model

    vae = load(mnist_cvae, "cpu")
    test_set = vae.split("test")
    right = evaluate_model(vae.model, test_set, Likelihood("bce"), max_images=100,
                           conditioning=vae.conditioning_for("test"))
    shifted = type(test_set)(test_set.images, (test_set.labels + 1) % 10, test_set.class_names)
    wrong = evaluate_model(vae.model, shifted, Likelihood("bce"), max_images=100,
                           conditioning=vae.conditioning_for("test"))
    assert right["elbo_nats"] == pytest.approx(report["elbo_nats"], rel=1e-9)
    assert wrong["elbo_nats"] < right["elbo_nats"] - 5


def test_unconditional_checkpoint_refuses_a_condition(tmp_path, capsys):
    train(tiny_config(tmp_path / "plain", "train.max_steps=2"))
    with pytest.raises(SystemExit) as exc:
        generate(["sample", "--checkpoint", str(list_checkpoints(tmp_path / "plain")[-1]), "--condition", "7"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--condition 7: checkpoint" in err and "is of an unconditional model" in err


def test_a_users_conditional_model_trains_and_samples(tmp_path, tmp_path_factory):
    out = tmp_path / "user"
    train(tiny_config(out, "model.name=conditional_models:TinyConditionalVAE", "model.condition=labels",
                      "model.latent_dim=3", "train.max_steps=4"))
    vae = load(list_checkpoints(out)[-1], "cpu", trust_model="conditional_models")
    assert vae.model.condition_dim == 10 and sample(vae, 2, condition=torch.eye(10)[4]).shape == (2, 1, 28, 28)
    # a user's (conditional) model gets FID of its samples and reconstructions like ours
    from fastvae.evaluate import main as evaluate
    from inception import inception_weights

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FID from 6 images: the bias warning
        report = evaluate(["--checkpoint", str(list_checkpoints(out)[-1]), "--trust-model", "conditional_models",
                           "--max-images", "6", "--fid", "--rfid", "--inception-weights",
                           inception_weights(tmp_path_factory)])
    assert report["fid_images"] == report["rfid_images"] == 6 and report["fid"] > 0 and report["rfid"] > 0


def test_fid_samples_have_the_test_images_conditions(mnist_cvae):
    """--fid on a conditional model: sample i is drawn given test image i's class."""
    from fastvae.evaluation import add_sample_features

    vae = load(mnist_cvae, "cpu")
    test_set = vae.split("test")

    class Kept:
        fid, num_samples, images = True, 60, []

        def add(self, name, images):
            self.images.append(images)

    kept = Kept()
    add_sample_features(vae.model, test_set, 30, kept, 0, 16, (0, 1), vae.conditioning_for("test"))
    samples = torch.cat(kept.images).float()
    train_set = vae.split("train")
    classify = nearest_class_mean(train_set.images.float() / 255, train_set.labels, 10)
    wanted = test_set.labels[torch.arange(60) % 30]  # 60 samples over 30 test images: their classes, twice
    assert samples.shape == (60, 1, 28, 28) and (classify(samples) == wanted).float().mean() > 0.6


@pytest.mark.parametrize("bad, message", [
    (["model.condition=attributes"], "data.name=mnist has no attributes; expected model.condition=labels"),
    (["model.condition=labels", "model.name=conditional_models:UnconditionalMLP"],
     "needs a conditional model; expected a constructor parameter condition_dim"),
    (["model.condition=given"], "model.condition"),
])
def test_bad_conditional_settings_are_one_line(tmp_path, bad, message):
    with pytest.raises(UserError, match=message):
        train(tiny_config(tmp_path / "bad", *bad, "train.max_steps=1"))
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_an_image_folder_needs_two_classes_to_condition_on(tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    (root / "cats").mkdir(parents=True)
    for i in range(8):
        Image.new("L", (12, 12), color=i * 30).save(root / "cats" / f"{i}.png")
    with pytest.raises(UserError, match="data.name=imagefolder has 1 class"):
        train(load_config("mnist", [*TINY, "data.name=imagefolder", f"data.root={root}", "data.image_size=12",
                                    "data.limit=0", "data.batch_size=4", "data.test_fraction=0.25", "model.condition=labels",
                                    f"out_dir={tmp_path / 'run'}"]))


@pytest.mark.slow
def test_celeba_faces_follow_the_smiling_condition(tmp_path, capsys):
    """On the CelebA-format fixture a smile is a bright band: given Smiling=1 the samples have it, given
    Smiling=0 they do not, by a classifier fitted on the fixture's images. beta = 50 makes the band
    cheaper to take from the condition than to carry in z."""
    fixture = tmp_path / "celeba"
    subprocess.run([sys.executable, str(ROOT / "tools" / "celeba_fixture.py"), str(fixture), "--n", "120"],
                   check=True, capture_output=True, timeout=120)
    out = tmp_path / "faces"
    train(load_config("celeba", [f"data.root={fixture}", "model.condition=attributes", "model.latent_dim=8",
                                 "model.dropout=0", "data.batch_size=16", "train.epochs=12", "optim.lr=0.002",
                                 "loss.beta=50", "train.mixed_precision=no", "data.num_workers=0",
                                 "train.samples=16", f"out_dir={out}"]))
    vae = load(list_checkpoints(out)[-1], "cpu")
    train_set = vae.split("train")
    images = torch.stack([train_set[i][0] for i in range(len(train_set))])
    classify = nearest_class_mean(images, train_set.attribute_values("Smiling").long(), 2)
    smiling = [classify(sample(vae, 32, seed=1, condition=vae.conditioning.attribute_vector(f"Smiling={v}")))
               .float().mean().item() for v in (0, 1)]
    assert smiling[0] < 0.1 and smiling[1] > 0.9, smiling
    [path] = generate(["sample", "--checkpoint", str(vae.path), "--attributes", "Smiling=1,Male=0", "--n", "4"])
    assert path.is_file() and os.path.getsize(path) > 0
    with pytest.raises(SystemExit):
        generate(["sample", "--checkpoint", str(vae.path), "--attributes", "Grinning=1"])
    assert "expected NAME=0 or NAME=1 with NAME one of: 5_o_Clock_Shadow" in capsys.readouterr().err
