"""FFCV: .beton round trips against the torchvision path, training from a .beton, bad files."""

import sys

import pytest
import torch
from torch.utils.data import Subset
from torchvision.transforms.v2.functional import to_dtype

ffcv = pytest.importorskip("ffcv", reason="ffcv not installed (scripts/setup.sh installs it)")

from fastvae.config import load_config  # noqa: E402
from fastvae.data import build_datasets  # noqa: E402
from fastvae.data.ffcv import main as ffcv_main, write_beton  # noqa: E402
from fastvae.data.ffcv_loader import check_beton  # noqa: E402
from fastvae.errors import UserError  # noqa: E402
from fastvae.tracking import read_records  # noqa: E402
from fastvae.train import train  # noqa: E402
from tools.celeba_fixture import write_celeba  # noqa: E402
from helpers import CONFIGS, assert_same_weights, final_weights, tiny_config  # noqa: E402


def read_all(path, channels):
    """Every record in file order: (images [N,C,H,W] float, labels, indices)."""
    from ffcv.loader import Loader, OrderOption

    batches = list(Loader(str(path), batch_size=64, order=OrderOption.SEQUENTIAL, drop_last=False,
                          pipelines=_pipelines(channels)))
    xs = to_dtype(torch.cat([b[0] for b in batches])[:, :channels], torch.float32, scale=True)
    return xs, torch.cat([b[1] for b in batches]), torch.cat([b[2] for b in batches])


def _pipelines(channels):
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.transforms import Squeeze, ToTensor, ToTorchImage

    return {"image": [SimpleRGBImageDecoder(), ToTensor(), ToTorchImage()],
            "label": [IntDecoder(), ToTensor(), Squeeze()], "index": [IntDecoder(), ToTensor(), Squeeze()],
            "attributes": None}


@pytest.fixture(scope="module")
def mnist_subset():
    train_set, _ = build_datasets(load_config(CONFIGS / "mnist.yaml", ["data.limit=256"]).data)
    return train_set


def test_raw_beton_is_pixel_identical_to_the_torchvision_path(tmp_path, mnist_subset):
    path = write_beton(mnist_subset, tmp_path / "train.beton", "raw")
    assert check_beton(path) == 256
    x, y, idx = read_all(path, 1)
    ref = torch.stack([mnist_subset[i][0] for i in range(256)])
    assert torch.equal(x, ref)
    assert torch.equal(y, torch.tensor([int(mnist_subset[i][1]) for i in range(256)]))
    assert torch.equal(idx, torch.arange(256))


def test_jpg_beton_is_close(tmp_path, mnist_subset):
    path = write_beton(mnist_subset, tmp_path / "train.beton", "jpg", quality=95)
    x, _, _ = read_all(path, 1)
    ref = torch.stack([mnist_subset[i][0] for i in range(256)])
    err = (x - ref).abs()
    assert err.mean() < 0.01 and err.max() < 0.5  # stated tolerance for JPEG at quality 95
    assert err.max() > 0  # it really is JPEG, not raw pixels


def test_celeba_beton_keeps_crops_and_attributes(tmp_path):
    from ffcv.fields.decoders import NDArrayDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    root = write_celeba(tmp_path / "c", n=30)
    paths = ffcv_main(["--config", str(CONFIGS / "celeba.yaml"), "--out", str(tmp_path / "b"),
                       f"data.root={root}", "data.num_workers=0"])
    assert [p.name for p in paths] == ["train.beton", "test.beton"]
    train_set, _ = build_datasets(load_config(CONFIGS / "celeba.yaml", [f"data.root={root}"]).data)
    x, y, idx = read_all(paths[0], 3)
    assert x.shape == (21, 3, 64, 64)
    assert torch.equal(x, torch.stack([train_set[i][0] for i in range(21)]))
    assert torch.equal(y, train_set.labels)
    pipes = {**_pipelines(3), "attributes": [NDArrayDecoder(), ToTensor()]}
    attrs = torch.cat([b[3] for b in Loader(str(paths[0]), batch_size=8, order=OrderOption.SEQUENTIAL,
                                              drop_last=False, pipelines=pipes)])
    assert torch.equal(attrs, train_set.attributes)


def test_training_from_a_beton_resumes_bit_identically_with_flips(tmp_path, mnist_subset):
    beton = write_beton(mnist_subset, tmp_path / "train.beton", "raw")
    common = ["data.loader=ffcv", f"data.beton={beton}", "train.epochs=2", "data.flip=true"]
    result = train(tiny_config(tmp_path / "straight", *common))
    assert result["step"] == 16
    records = read_records(tmp_path / "straight")
    assert records[-1]["loss"] < records[0]["loss"]
    out = tmp_path / "interrupted"
    train(tiny_config(out, *common, "train.max_steps=5"))
    train(tiny_config(out, *common, "train.resume=auto"))
    assert_same_weights(final_weights(out), final_weights(tmp_path / "straight"))


def test_training_on_the_celeba_fixture_with_ffcv(tmp_path):
    root = write_celeba(tmp_path / "c", n=60)
    paths = ffcv_main(["--config", str(CONFIGS / "celeba.yaml"), "--out", str(tmp_path / "b"), "--mode", "jpg",
                       f"data.root={root}", "data.num_workers=0"])
    cfg = load_config(CONFIGS / "celeba.yaml", [f"data.root={root}", "data.loader=ffcv", f"data.beton={paths[0]}",
                                                "data.flip=true", "data.batch_size=8", "data.num_workers=0",
                                                "train.epochs=1", "train.mixed_precision=no", "model.latent_dim=8",
                                                "train.samples=4", f"out_dir={tmp_path / 'run'}"])
    assert train(cfg)["step"] == 5  # 42 training faces / 8


@pytest.mark.parametrize("drop_last, flip", [(True, False), (False, True)])
def test_ranks_get_the_shares_every_fastvae_loader_gives(tmp_path, mnist_subset, drop_last, flip):
    from fastvae.data.ffcv_loader import FFCVTrainLoader
    from fastvae.data.memory import MemoryTrainLoader, decode_to_memory

    images = Subset(mnist_subset, range(250))  # 250: no world size x batch divides it
    beton = write_beton(images, tmp_path / "train.beton", "raw")
    in_memory = decode_to_memory(images)
    cpu = torch.device("cpu")
    for world in (1, 2):
        for rank in range(world):
            ffcv = FFCVTrainLoader(beton, 24 // world, 1, cpu, seed=4, flip=flip, drop_last=drop_last, rank=rank,
                                   world_size=world)
            memory = MemoryTrainLoader(in_memory, 24 // world, 4, cpu, drop_last, flip, rank, world)
            for epoch in (0, 1):
                ffcv.set_epoch(epoch)
                memory.set_epoch(epoch)
                pairs = list(zip(ffcv, memory, strict=True))  # as many batches
                assert pairs and all(torch.equal(a[0], b[0]) for a, b in pairs)  # the same images, pixel for pixel


def test_every_loader_trains_the_same_model(tmp_path, mnist_subset):
    """The same images in the same order with the same flips and noise keys: the in-memory loader
    over the data set's tensors, the in-memory loader filled from a .beton, and FFCV's loader."""
    beton = write_beton(mnist_subset, tmp_path / "train.beton", "raw")
    runs = {"auto": [], "memory": ["data.loader=memory", f"data.beton={beton}"],
            "ffcv": ["data.loader=ffcv", f"data.beton={beton}"]}
    for name, extra in runs.items():
        assert train(tiny_config(tmp_path / name, "data.flip=true", "train.epochs=1", *extra))["step"] == 8
    for name in ("memory", "ffcv"):
        assert_same_weights(final_weights(tmp_path / name), final_weights(tmp_path / "auto"))


def test_a_beton_of_another_image_size_is_a_one_line_error(tmp_path, mnist_subset):
    beton = write_beton(mnist_subset, tmp_path / "train.beton", "raw")
    with pytest.raises(UserError, match=r"holds 28x28 images; expected 64x64 \(data.image_size\)"):
        check_beton(beton, image_size=(64, 64))
    assert check_beton(beton, image_size=(28, 28)) == 256


@pytest.mark.parametrize("order", ["random", "quasi_random"])
def test_a_resumed_epoch_reads_only_the_batches_after_the_skipped_ones(tmp_path, mnist_subset, order):
    from fastvae.data.ffcv_loader import FFCVTrainLoader

    beton = write_beton(mnist_subset, tmp_path / "train.beton", "raw")
    loader = FFCVTrainLoader(beton, 32, 1, torch.device("cpu"), seed=3, order=order, flip=True)
    loader.set_epoch(1)
    whole = list(loader)
    again = list(loader)  # the same epoch until set_epoch says otherwise
    resumed = list(loader.skip_first(3))
    assert len(whole) == len(loader) == 8 and len(resumed) == 5
    assert all(torch.equal(a, b) for x, y in zip(whole, again) for a, b in zip(x, y))
    assert all(torch.equal(a, b) for x, y in zip(whole[3:], resumed) for a, b in zip(x, y))  # pixels and flips
    assert len(loader.order.sample_order(1)) == 5 * 32  # what FFCV decodes: the skipped batches are not read
    loader.set_epoch(2)
    assert not torch.equal(torch.cat([b[2] for b in loader]), torch.cat([b[2] for b in whole]))  # a new order


def test_bad_betons_are_one_line_errors(tmp_path, mnist_subset):
    good = write_beton(mnist_subset, tmp_path / "good.beton", "raw")
    truncated = tmp_path / "truncated.beton"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    foreign = tmp_path / "foreign.beton"
    foreign.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(4000))
    with pytest.raises(UserError, match=f".beton '{tmp_path / 'nope.beton'}' not found"):
        check_beton(tmp_path / "nope.beton")
    with pytest.raises(UserError, match=f".beton '{truncated}' is (truncated or damaged|not an FFCV dataset)"):
        check_beton(truncated)
    with pytest.raises(UserError, match=f".beton '{foreign}' is not an FFCV dataset"):
        check_beton(foreign)
    with pytest.raises(UserError, match="config key 'data.beton' is empty"):
        load_config(CONFIGS / "mnist.yaml", ["data.loader=ffcv"])
    with pytest.raises(UserError, match="data.loader=auto would not read it"):
        load_config(CONFIGS / "mnist.yaml", [f"data.beton={good}"])


def test_interrupted_write_leaves_nothing_that_looks_complete(tmp_path, mnist_subset, monkeypatch):
    from ffcv.writer import DatasetWriter

    def crash(self, dataset, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(DatasetWriter, "from_indexed_dataset", crash)
    with pytest.raises(KeyboardInterrupt):
        write_beton(mnist_subset, tmp_path / "train.beton")
    assert list(tmp_path.iterdir()) == []


def test_missing_ffcv_says_how_to_install(monkeypatch):
    from fastvae.data.ffcv_loader import require_ffcv

    monkeypatch.setitem(sys.modules, "ffcv", None)  # as if not installed
    with pytest.raises(UserError, match=r"apt-get install -y libopencv-dev libturbojpeg0-dev && pip install 'fastvae\[ffcv\]'"):
        require_ffcv()


def test_corrupt_image_stops_the_write_or_is_left_out(tmp_path, capsys):
    root = write_celeba(tmp_path / "c", n=30)
    (root / "img_align_celeba" / "000003.jpg").write_bytes(b"not a jpeg")
    args = ["--config", str(CONFIGS / "celeba.yaml"), "--out", str(tmp_path / "b"), f"data.root={root}",
            "data.num_workers=0"]
    with pytest.raises(SystemExit) as exc:
        ffcv_main(args)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exc.value.code == 2 and "000003.jpg' could not be decoded" in err and "--skip-corrupt" in err
    assert not (tmp_path / "b").exists() or list((tmp_path / "b").iterdir()) == []
    paths = ffcv_main([*args, "--skip-corrupt"])
    assert check_beton(paths[0]) == 20  # 21 training images, one left out
    assert "left 1 undecodable image(s) out of train.beton" in capsys.readouterr().err


def test_importing_ffcv_leaves_torchs_threads_as_they_were():
    """FFCV's import sets torch's threads to 1; fastvae's import of it puts them back (the step would
    run on one core, and give other sums than the loaders that never import FFCV)."""
    import subprocess
    import sys

    code = ("import torch; torch.set_num_threads(2); from fastvae.data.ffcv_loader import require_ffcv; "
            "require_ffcv(); print(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "2", out.stderr[-2000:]
