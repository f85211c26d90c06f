"""The in-memory loader: the DataLoader's images, seeded order, disjoint shards, exact resume."""

import pytest
import torch
from torch.utils.data import Subset
from torchvision.transforms.v2.functional import to_dtype

from fastvae.config import load_config
from fastvae.data.loaders import build_train_loader
from fastvae.data.memory import MemoryTrainLoader
from helpers import CPU, tiny_image_dataset as dataset, tiny_memory_loader as loader
from fastvae.errors import UserError



def test_batches_are_the_datasets_items_bit_for_bit():
    data = Subset(dataset(), range(10, 90))  # data.limit gives a Subset: indices are the subset's
    for x, y, index in loader(data):
        assert torch.equal(x, torch.stack([data[i][0] for i in index.tolist()]))
        assert torch.equal(y, torch.stack([data[i][1] for i in index.tolist()]))


def test_skip_first_resumes_inside_an_epoch():
    full = [i.tolist() for _, _, i in loader(dataset())]
    assert [i.tolist() for _, _, i in loader(dataset()).skip_first(5)] == full[5:]


def test_flips_are_seeded_and_flip_about_half():
    data = dataset(200)
    flipped = 0
    for x, _, index in loader(data, flip=True):
        plain = torch.stack([data[i][0] for i in index.tolist()])
        same = (x == plain).flatten(1).all(1)
        mirrored = (x == plain.flip(-1)).flatten(1).all(1)
        assert (same | mirrored).all()
        flipped += int((~same).sum())
    assert 60 < flipped < 140
    a, b = loader(data, flip=True), loader(data, flip=True)
    assert all(torch.equal(x, y) for (x, _, _), (y, _, _) in zip(a, b))


def test_auto_picks_memory_for_tensor_datasets_and_says_what_it_cannot():
    cfg = load_config("mnist", ["data.limit=64", "data.batch_size=16"])
    assert isinstance(build_train_loader(cfg, Subset(dataset(), range(64)), 1, CPU), MemoryTrainLoader)
    torch_cfg = load_config("mnist", ["data.loader=torch", "data.batch_size=16"])
    assert not isinstance(build_train_loader(torch_cfg, dataset(), 1, CPU), MemoryTrainLoader)
    # a data set read item by item, with fastvae's one uint8 -> float conversion (as CelebA's and image folders')
    folder = [(to_dtype(torch.full((1, 4, 4), i, dtype=torch.uint8), torch.float32, scale=True), torch.tensor(i % 3), i)
              for i in range(64)]
    assert not isinstance(build_train_loader(cfg, folder, 1, CPU), MemoryTrainLoader)  # auto: only tensor data sets
    with pytest.raises(UserError, match="data.flip: random flips need data.loader=memory or ffcv"):
        build_train_loader(load_config("mnist", ["data.flip=true", "data.batch_size=16"]), folder, 1, CPU)
    decoded = build_train_loader(load_config("mnist", ["data.loader=memory", "data.batch_size=16"]), folder, 1, CPU)
    assert isinstance(decoded, MemoryTrainLoader)  # decoded once into a uint8 tensor
    for x, y, index in decoded:
        assert torch.equal(x, torch.stack([folder[i][0] for i in index.tolist()]))
        assert torch.equal(y, index % 3)


class CountingReads:
    """A data set read item by item (like CelebA's): fastvae's uint8 -> float conversion, reads counted,
    item 5 undecodable (data.skip_corrupt returns None)."""

    def __init__(self, n=20):
        self.n, self.reads = n, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads += 1
        if i == 5:
            return None
        return to_dtype(torch.full((3, 4, 4), 17 * i % 256, dtype=torch.uint8), torch.float32, scale=True), i % 3, i


def test_test_images_are_decoded_once_and_served_bit_identical():
    from fastvae.data.memory import DecodedOnce, decoded_once

    source = CountingReads()
    kept = DecodedOnce(source, max_items=8)
    first = [kept[i] for i in range(12)]
    again = [kept[i] for i in range(12)]
    assert source.reads == 12 + 4  # items 0-4 and 6-8 kept (8 of them); 5 (None) and 9-11 read again
    assert first[5] is None and again[5] is None
    for i in (0, 7, 11):
        assert torch.equal(again[i][0], source[i][0]) and again[i][1:] == source[i][1:]
    tensors = dataset()
    assert decoded_once(tensors, 8) is tensors  # already in memory: nothing to keep


def test_auto_holds_image_by_image_data_on_a_gpu_where_it_fits(monkeypatch):
    from types import SimpleNamespace

    from fastvae.data.loaders import fits_on_gpu

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * 2**30))
    celeba = load_config("celeba", [])  # 3 x 64 x 64 uint8 = 12,288 bytes per face
    gpu = torch.device("cuda", 0)
    assert fits_on_gpu(celeba, 162_770, gpu)  # 2.0 GB of an 80 GB GPU
    assert not fits_on_gpu(celeba, 2_000_000, gpu)  # 24.6 GB: more than a quarter
    assert not fits_on_gpu(celeba, 10, CPU)  # on a CPU, auto keeps the DataLoader for such data
