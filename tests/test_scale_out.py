"""N processes train the model one process trains: shards, keyed noise, sharded evaluation, and
loss-trace parity through tools/loss_compare.py (real gloo processes, two 'nodes' on this host)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastvae import noise
from fastvae.data.base import ImageTensorDataset
from fastvae.data.loaders import TorchTrainLoader
from fastvae.data.memory import MemoryTrainLoader, in_memory_tensors
from fastvae.data.sharding import ShardPlan
from fastvae.evaluate import Likelihood, evaluate_model, evaluate_sums, report_of
from fastvae.kernels import fused_reparam_kl
from fastvae.launch.processes import accelerate_launch
from fastvae.models import ConvVAE
from helpers import ROOT, TINY

CPU = torch.device("cpu")


def dataset(n):
    g = torch.Generator().manual_seed(0)
    return ImageTensorDataset(torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=g), torch.arange(n))


def epoch_ids(make_loader, world):
    """[rank][batch] -> sample ids of one epoch."""
    return [[ids.tolist() for _, _, ids in make_loader(rank, world)] for rank in range(world)]


@pytest.mark.parametrize("drop_last", [True, False])
def test_memory_and_torch_loaders_shard_1xB_global_batches_among_N_ranks(drop_last):
    data, batch = dataset(100), 12  # 100 images: no world size x batch divides them
    loaders = {
        "memory": lambda r, w: MemoryTrainLoader(in_memory_tensors(data), batch // w, 5, CPU, drop_last, rank=r,
                                              world_size=w),
        "torch": lambda r, w: TorchTrainLoader(data, ShardPlan(len(data), batch // w, 5, r, w, drop_last), CPU, 0),
    }
    single = epoch_ids(loaders["memory"], 1)[0]
    for name, make in loaders.items():
        for world in (1, 2, 3):
            ranks = epoch_ids(make, world)
            assert len({len(r) for r in ranks}) == 1, f"{name}: every rank gets the same number of batches"
            steps = list(zip(*ranks))
            assert [sum(shares, []) for shares in steps] == single, f"{name} x {world}: the 1 x B global batches"
            seen = [i for r in ranks for b in r for i in b]
            assert len(seen) == len(set(seen)), f"{name}: no image twice in an epoch"
    if not drop_last:
        assert sorted(sum(single, [])) == list(range(100))  # nothing dropped: the last batch is 100 % 12 = 4


def test_the_last_global_batch_is_dropped_when_smaller_than_the_world():
    plan = ShardPlan(images=25, batch_size=4, seed=0, rank=0, world_size=3, drop_last=False)
    assert len(plan) == 2  # 2 x 12 images, then 1 image for 3 ranks: dropped
    assert len(ShardPlan(27, 4, 0, 0, 3, drop_last=False)) == 3  # 3 images: one each


def test_noise_is_keyed_by_sample_and_matches_the_kernels_in_kernel_draws():
    ids, dim, seed = torch.tensor([7, 3, 11, 0, 5]), 33, 1234
    offsets = noise.row_offsets(ids, dim, stream=9)
    eps = noise.keyed_normal(seed, offsets, dim)
    # a sample's eps does not depend on the batch it is in (what N processes x B/N needs)
    assert torch.equal(noise.keyed_normal(seed, offsets[[2, 0]], dim), eps[[2, 0]])
    assert not torch.equal(noise.keyed_normal(seed, noise.row_offsets(ids, dim, 10), dim), eps)  # next step
    z, _ = fused_reparam_kl(torch.zeros(5, dim), torch.zeros(5, dim), seed=torch.tensor(seed), row_offsets=offsets)
    torch.testing.assert_close(z, eps, rtol=0, atol=2e-6)  # Triton's tl.randn, drawn in-kernel (interpreter)
    big = noise.philox_normal(seed, torch.arange(1 << 18))
    assert abs(big.mean()) < 0.01 and abs(big.std() - 1) < 0.01


def test_sharded_evaluation_sums_to_the_single_process_report():
    torch.manual_seed(0)
    model = ConvVAE(latent_dim=3)
    data = ImageTensorDataset(torch.randint(0, 256, (53, 1, 28, 28), dtype=torch.uint8), torch.arange(53) % 10)
    args = dict(iwae_samples=5, chunk=2, max_images=47, binarize=False, seed=3, batch_size=10, progress=False)
    single = evaluate_model(model, data, Likelihood("bce"), **args)
    parts = [evaluate_sums(model, data, Likelihood("bce"), shard=(r, 3), **args) for r in range(3)]
    total = parts[0][0]
    total.values = sum(p[0].values for p in parts)
    sharded = report_of(total, parts[0][1], Likelihood("bce"), False, 5)
    assert sharded["images"] == single["images"] == 47
    for key in ("elbo_nats", "recon_nll_nats", "kl_nats", "iwae_nll_nats", "recon_mse", "unit_activity"):
        assert sharded[key] == pytest.approx(single[key], rel=1e-6), key


def loss_compare(tmp_path, name, *args):
    out = tmp_path / name
    cmd = [sys.executable, str(ROOT / "tools" / "loss_compare.py"), "--out", str(out), "--json", str(out) + ".json",
           "--assert-equal", "--timeout", "300", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=700,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(Path(str(out) + ".json").read_text()), out


@pytest.fixture(scope="module")
def mnist_two_nodes(tmp_path_factory):
    """1 process x 32 vs 2 processes x 16, the 2 as two accelerate launchers (--num_machines 2) on localhost."""
    return loss_compare(tmp_path_factory.mktemp("lc"), "mnist", "--config", "mnist", "--nproc", "2",
                        "--machines", "2", "--steps", "8", "--port", "29533", *TINY)


@pytest.mark.slow
def test_two_nodes_train_the_single_process_model(mnist_two_nodes):
    result, _ = mnist_two_nodes
    assert [r["step"] for r in result["steps"]] == list(range(1, 9)) and not result["missing_steps"]
    assert result["max_loss_rel_diff"] < 1e-4 and result["param_rel_diff"] < 1e-3
    # the epoch's test loss, evaluated by both ranks (each a share), is the single process's
    single, sharded = result["test_loss"]
    assert sharded == pytest.approx(single, rel=1e-5)


@pytest.mark.slow
def test_evaluate_under_accelerate_launch_matches_one_process(mnist_two_nodes, tmp_path):
    from fastvae.checkpoint import list_checkpoints

    _, out = mnist_two_nodes
    ckpt = str(list_checkpoints(out / "1x32")[-1])
    one = tmp_path / "one.json"
    subprocess.run([sys.executable, "-m", "fastvae.evaluate", "--checkpoint", ckpt, "--max-images", "150",
                    "--iwae-samples", "4", "--json", str(one)], cwd=ROOT, check=True, capture_output=True, timeout=300)
    two = tmp_path / "two.json"
    proc = subprocess.run(accelerate_launch(["-m", "fastvae.evaluate", "--checkpoint", ckpt, "--max-images", "150",
                                             "--iwae-samples", "4", "--json", str(two)], processes=2, port=29535),
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["processes"], b["processes"], a["images"], b["images"]) == (1, 2, 150, 150)
    for key in ("elbo_nats", "kl_nats", "iwae_nll_nats", "psnr_db"):
        assert b[key] == pytest.approx(a[key], rel=1e-6), key


@pytest.mark.slow
def test_sync_batchnorm_makes_two_processes_train_the_dfc_vae_one_process_trains(tmp_path):
    from tools.celeba_fixture import write_celeba

    root = write_celeba(tmp_path / "celeba", n=60)
    # SGD: Adam turns rounding into +-lr steps of weights whose gradient is as small as the
    # rounding (e.g. the conv biases before BatchNorm), which hides what this compares (docs/notes.md)
    result, _ = loss_compare(tmp_path, "dfc", "--config", "celeba", "--steps", "4", "--port", "29537",
                             f"data.root={root}", "data.batch_size=16", "data.num_workers=0", "model.dropout=0",
                             "train.mixed_precision=no", "train.samples=16", "train.sync_batchnorm=true",
                             "optim.name=sgd", "optim.lr=0.00001")
    assert result["steps"][0]["rel_diff"] < 1e-5  # without SyncBatchNorm: 2.3e-4 at the first step
