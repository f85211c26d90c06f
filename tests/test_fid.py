"""FID and KID: the formulas against float64 references written from the papers, the image pipeline
against torch-fidelity's own, the weights file's trust rules, and evaluate's --fid/--rfid/--kid
(cached real features; samples; several processes). Inception runs with random weights here
(tests/support/inception.py): plumbing, not real FIDs."""

import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from fastvae import fid
from fastvae.errors import UserError
from helpers import ROOT, tiny_config
from inception import inception_weights


def reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Heusel et al. 2017: ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2), scipy's sqrtm, float64."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * root))


def reference_kid(a: np.ndarray, b: np.ndarray) -> float:
    """Binkowski et al. 2018: the unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, over all images."""
    d, m, n = a.shape[1], len(a), len(b)
    k = lambda x, y: (x @ y.T / d + 1) ** 3  # noqa: E731
    k_aa, k_bb, k_ab = k(a, a), k(b, b), k(a, b)
    return float((k_aa.sum() - np.trace(k_aa)) / (m * (m - 1)) + (k_bb.sum() - np.trace(k_bb)) / (n * (n - 1))
                 - 2 * k_ab.mean())


def features(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + shift


def test_frechet_distance_is_the_papers_formula():
    a, b = features(400, 32, 0), features(300, 32, 1, shift=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer than 2,048 images: the bias warning
        assert fid.frechet_distance(a, b) == pytest.approx(reference_fid(a.numpy(), b.numpy()), rel=1e-9)
        assert abs(fid.frechet_distance(a, a)) < 1e-9  # a set against itself
        # fewer images than dimensions (the nuclear-norm form): scipy's sqrtm of the singular product is the
        # less exact of the two here
        a, b = features(30, 64, 6), features(20, 64, 7, shift=0.3)
        assert fid.frechet_distance(a, b) == pytest.approx(reference_fid(a.numpy(), b.numpy()), rel=1e-6)
        assert abs(fid.frechet_distance(a, a)) < 1e-9


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel():
    a, b = features(50, 16, 2), features(50, 16, 3, shift=0.2)
    # one subset of all 50 images of each (a permutation: the MMD does not change)
    mean, std, size = fid.kernel_inception_distance(a, b, subsets=1, subset_size=1000)
    assert (size, std) == (50, 0) and mean == pytest.approx(reference_kid(a.numpy(), b.numpy()), rel=1e-9)
    mean_other, _, _ = fid.kernel_inception_distance(a, features(50, 16, 4, shift=0.2), subsets=1)
    assert mean_other != pytest.approx(mean, rel=1e-3)  # it depends on the sets (not a constant)


def test_too_few_images_warn_and_never_give_a_complex_number():
    a, b = features(20, 64, 4), features(20, 64, 5)  # fewer images than feature dimensions
    with pytest.warns(UserWarning, match="FID"):
        value = fid.frechet_distance(a, b)
    assert isinstance(value, float) and np.isfinite(value)
    with pytest.raises(UserError, match="1 generated image"):
        fid.frechet_distance(a, b[:1])


def test_images_reach_inception_as_their_png_would(tmp_path):
    """uint8 by rounding (a float of k/255 times 255 can be below k), greyscale repeated to RGB: what
    torch-fidelity reads from the PNGs torchvision writes."""
    from PIL import Image
    from torchvision.utils import save_image

    grey = torch.randint(0, 256, (3, 1, 9, 7)).float() / 255
    rgb = torch.rand(3, 3, 9, 7)
    for images in (grey, rgb):
        for i, image in enumerate(images):
            save_image(image, tmp_path / f"{i}.png")
        png = torch.stack([torch.from_numpy(np.array(Image.open(tmp_path / f"{i}.png").convert("RGB"))).permute(2, 0, 1)
                           for i in range(3)])
        assert torch.equal(fid.inception_input(images), png)


def test_features_equal_torch_fidelitys_on_the_same_png_folders(tmp_path_factory, tmp_path):
    import torch_fidelity
    from torchvision.utils import save_image

    weights = inception_weights(tmp_path_factory)
    g = torch.Generator().manual_seed(0)
    sets = {"real": torch.rand(12, 1, 28, 28, generator=g), "fake": torch.rand(12, 1, 28, 28, generator=g) ** 2}
    for name, images in sets.items():
        (tmp_path / name).mkdir()
        for i, image in enumerate(images):
            save_image(image, tmp_path / name / f"{i:02d}.png")
    # KID only: it is computed from the features, so equal KIDs mean equal features (their FID takes the
    # eigenvalues of a 2048 x 2048 product, ~30 s here; the formula is compared below on small features)
    theirs = torch_fidelity.calculate_metrics(input1=str(tmp_path / "fake"), input2=str(tmp_path / "real"),
                                              kid=True, kid_subset_size=12, kid_subsets=3, cuda=False, verbose=False,
                                              feature_extractor_weights_path=weights, cache=False)
    model, _ = fid.load_inception(weights)
    real, fake = (fid.inception_features(model, sets[k]) for k in ("real", "fake"))
    kid_mean, _, _ = fid.kernel_inception_distance(fake, real, subsets=3, subset_size=12)
    assert kid_mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-4)


def test_frechet_distance_equals_torch_fidelitys():
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    for (n1, n2, d), rel in (((400, 300, 32), 1e-9), ((30, 20, 64), 1e-6)):  # (their eigvals: less exact when singular)
        a, b = features(n1, d, 8), features(n2, d, 9, shift=0.1)
        theirs = fid_statistics_to_metric(fid_features_to_statistics(a), fid_features_to_statistics(b), False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert fid.frechet_distance(a, b) == pytest.approx(theirs["frechet_inception_distance"], rel=rel)


def test_inception_weights_missing_or_holding_code_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError) as err:
        fid.load_inception()
    message = str(err.value)
    assert fid.INCEPTION_FILE in message and str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert fid.INCEPTION_URL in message and "--inception-weights" in message
    bad = tmp_path / fid.INCEPTION_FILE
    torch.save({"x": torch.zeros(1), "code": UserError("a pickled object")}, bad)
    with pytest.raises(UserError, match="not plain tensors"):
        fid.load_inception(str(bad))
    torch.save({"x": torch.zeros(1)}, bad)
    with pytest.raises(UserError, match="does not fit Inception-v3"):
        fid.load_inception(str(bad))
    torch.save([torch.zeros(1)], bad)
    with pytest.raises(UserError, match="holds a list that is not a mapping of tensors"):
        fid.load_inception(str(bad))
    torch.save({"conv.weight": torch.full((2,), float("nan"))}, bad)
    with pytest.raises(UserError, match="conv.weight holds NaN or infinite values"):
        fid.load_inception(str(bad))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from fastvae.checkpoint import list_checkpoints
    from fastvae.train import train
    from shared import built_once

    folder = built_once(tmp_path_factory, "fid_tiny_run",
                        lambda f: train(tiny_config(f / "run", "train.max_steps=4")))
    return list_checkpoints(folder / "run")[-1]


def copied_run(checkpoint, tmp_path):
    """The run folder copied (evaluate writes its FID cache there)."""
    shutil.copytree(checkpoint.parent.parent, tmp_path / "run")
    return tmp_path / "run" / "checkpoints" / checkpoint.name


def test_evaluate_reports_fid_rfid_kid_and_caches_the_real_features(tiny_run, tmp_path_factory, tmp_path,
                                                                     monkeypatch, capsys):
    from fastvae.evaluate import main

    ckpt = copied_run(tiny_run, tmp_path)
    weights = inception_weights(tmp_path_factory)
    args = ["--checkpoint", str(ckpt), "--max-images", "10", "--fid", "--rfid", "--kid", "--kid-subsets", "4",
            "--num-samples", "8", "--inception-weights", weights, "--json", str(tmp_path / "eval.json")]
    calls = []
    original = fid.inception_features
    monkeypatch.setattr(fid, "inception_features", lambda m, x: calls.append(len(x)) or original(m, x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = main(args)
        seen_first, calls[:] = sum(calls), []
        second = main(args)
    assert (seen_first, sum(calls)) == (10 + 10 + 8, 10 + 8)  # the second run read the real features
    assert len(list((tmp_path / "run" / "fid_features").glob("real-*.safetensors"))) == 1
    for key in ("fid", "rfid", "kid_mean", "rkid_mean"):
        assert first[key] == pytest.approx(second[key], rel=1e-9) and first[key] > 0, key
    assert (first["fid_real_images"], first["fid_images"], first["rfid_images"], first["kid_subset_size"],
            first["rkid_subset_size"]) == (10, 8, 10, 8, 10)
    assert json.loads((tmp_path / "eval.json").read_text())["fid"] == second["fid"]
    printed = capsys.readouterr().out
    assert "FID (8 samples vs 10 images)" in printed and "rFID (10 reconstructions vs 10 images)" in printed
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", str(ckpt), "--kid"])
    assert exc.value.code == 2 and "--kid and --num-samples go with --fid or --rfid" in capsys.readouterr().err


@pytest.mark.slow
def test_fid_under_accelerate_launch_matches_one_process(tiny_run, tmp_path_factory, tmp_path):
    """Each process embeds its share; the features are gathered in order, every image counted once."""
    from fastvae.launch.processes import accelerate_launch

    weights = inception_weights(tmp_path_factory)
    reports = {}
    for processes in (1, 2):
        ckpt = copied_run(tiny_run, tmp_path / str(processes))
        args = ["-m", "fastvae.evaluate", "--checkpoint", str(ckpt), "--max-images", "9", "--fid", "--rfid",
                "--kid", "--kid-subsets", "4", "--inception-weights", weights, "--json", str(tmp_path / f"{processes}.json")]
        cmd = accelerate_launch(args, processes=2) if processes == 2 else [sys.executable, *args]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        reports[processes] = json.loads((tmp_path / f"{processes}.json").read_text())
        cached = next((tmp_path / str(processes) / "run" / "fid_features").glob("*.safetensors"))
        reports[processes]["real"] = fid.read_cached(cached)
    one, two = reports[1], reports[2]
    assert two["processes"] == 2 and two["fid_real_images"] == one["fid_real_images"] == 9
    assert torch.allclose(two["real"], one["real"], rtol=1e-5, atol=1e-4)
    for key in ("fid", "rfid", "kid_mean", "rkid_mean", "psnr_db"):
        assert two[key] == pytest.approx(one[key], rel=1e-5), key


def test_training_logs_image_quality_every_n_epochs(tmp_path_factory, tmp_path, monkeypatch):
    """eval.fid_every=2 of 3 epochs: FID, KID, SSIM and PSNR at epoch 2 only, in metrics.jsonl and the tracker."""
    from fastvae.tracking import read_records
    from fastvae.train import train
    from test_trackers import tensorboard_steps

    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(tiny_config(out, "train.epochs=3", "train.max_steps=0", "data.limit=64", "eval.fid_every=2",
                          "eval.metrics=[fid,kid,ssim]", "eval.images=8", "logger=tensorboard",
                          f"eval.inception_weights={inception_weights(tmp_path_factory)}"))
    records = read_records(out)
    assert [("test_fid" in r) for r in records] == [False, True, False]
    second = records[1]
    assert second["test_fid"] > 0 and second["test_fid_images"] == second["test_fid_real_images"] == 8
    assert 0 < second["test_ssim"] <= 1 and second["test_psnr_db"] > 0 and "test_kid_mean" in second
    assert tensorboard_steps(out / "tensorboard", "epoch/test_fid") == [second["step"]]
    assert len(list((out / "fid_features").glob("*.safetensors"))) == 1


def test_training_metrics_need_their_weights_before_the_run_starts(tmp_path, monkeypatch):
    from fastvae.train import train

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError, match=fid.INCEPTION_FILE) as err:
        train(tiny_config(tmp_path / "run", "eval.fid_every=1", "train.max_steps=1"))
    assert "give eval.inception_weights=PATH" in str(err.value)  # the key, not evaluate's flag
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="eval.metrics"):
        train(tiny_config(tmp_path / "run", "eval.fid_every=1", "eval.metrics=[kid]", "train.max_steps=1"))


def write_pngs(folder, seed: int) -> None:
    """2 classes x 8 RGB images of 16 x 16, the same names whatever the seed."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i in range(8):
            pixels = torch.randint(0, 256, (16, 16, 3), dtype=torch.uint8, generator=g)
            Image.fromarray(pixels.numpy()).save(folder / cls / f"{i}.png")


def test_the_real_feature_cache_follows_the_images_and_a_damaged_one_is_computed_again(tmp_path_factory, tmp_path,
                                                                                       capsys):
    """Every PNG overwritten (same names, same count): the features are computed again, not read from the
    cache of the old images; a cache cut to 3 rows, or a file of another kind, is said in one line and
    replaced, never compared."""
    from safetensors.torch import load_file, save_file

    from fastvae.checkpoint import list_checkpoints
    from fastvae.config import load_config
    from fastvae.evaluate import main
    from fastvae.train import train

    folder, run = tmp_path / "images", tmp_path / "run"
    write_pngs(folder, 0)
    train(load_config("imagefolder", [f"data.root={folder}", "data.image_size=16", "data.batch_size=4",
                                      "data.test_fraction=0.5", "train.max_steps=1", "train.samples=4",
                                      "train.mixed_precision=no", f"out_dir={run}"]))
    ckpt = list_checkpoints(run)[-1]
    args = ["--checkpoint", str(ckpt), "--fid", "--num-samples", "4", "--inception-weights",
            inception_weights(tmp_path_factory)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = main(args)["fid"]
        write_pngs(folder, 1)
        after = main(args)["fid"]
        caches = sorted((run / "fid_features").glob("real-*.safetensors"), key=lambda p: p.stat().st_mtime)
        assert after != before and len(caches) == 2
        newest = caches[-1]
        save_file({"features": load_file(str(newest))["features"][:3].contiguous()}, str(newest))
        capsys.readouterr()
        again = main(args)["fid"]
        assert f"the cached real-image features {newest} are damaged (shape (3, 2048)" in capsys.readouterr().out
        newest.write_bytes(b"\x80\x04not a safetensors file")
        assert main(args)["fid"] == pytest.approx(again, rel=1e-12) == pytest.approx(after, rel=1e-9)
    assert "are damaged (unreadable" in capsys.readouterr().out
    assert load_file(str(newest))["features"].shape == (8, 2048)
