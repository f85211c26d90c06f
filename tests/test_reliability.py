"""Faults and bad inputs: crashes at any moment, non-finite losses, signals, and one-line errors.

Slow tests start real subprocesses and kill them (SIGKILL / SIGTERM); each wait is bounded.
"""

import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from fastvae.checkpoint import list_checkpoints
from fastvae.loading import load_model
from fastvae.errors import NonFiniteLoss, exit_on_user_error
from fastvae.launch.processes import accelerate_launch
from fastvae.stopping import NonFiniteGuard
from fastvae.tracking import read_records
from fastvae.train import main, train
from fastvae.run_setup import reset_accelerate_state
from helpers import CONFIGS, ROOT, TINY, assert_same_weights, final_weights, tiny_config, tree_snapshot, wait_until
from shared import built_once

TRAIN = [sys.executable, "-m", "fastvae.train", "--config", str(CONFIGS / "mnist.yaml"), *TINY]


def accelerate_2() -> list[str]:
    """Two training processes of the tiny run, on a rendezvous port that is free now."""
    return accelerate_launch(["-m", "fastvae.train", "--config", str(CONFIGS / "mnist.yaml"), *TINY,
                              "data.batch_size=16"], processes=2)


ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}


def newest_step(out: Path) -> int:
    found = list_checkpoints(out)
    return int(found[-1].name.split("_")[1]) if found else 0


def run_until(cmd, out: Path, min_step: int, timeout: float = 120, cwd: Path = ROOT):
    """Start a training subprocess (in `cwd`) and return it once a checkpoint of at least min_step exists."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    ended = lambda: proc.poll() is not None and f"it ended: {proc.stdout.read().decode()[-2000:]}"  # noqa: E731
    try:
        wait_until(f"a checkpoint of step {min_step}", lambda: newest_step(out) >= min_step, timeout, 0.05, ended)
    except AssertionError:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc


def finish(cmd, timeout: float = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


# ---------------------------------------------------------------- crashes


SIGKILL_RUN = ["train.epochs=2", "train.checkpoint_every=1", "train.keep_checkpoints=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The weights of the run the killed runs must end with (trained once for every seed)."""
    folder = built_once(tmp_path_factory, "sigkill_uninterrupted",
                        lambda folder: finish([*TRAIN, *SIGKILL_RUN, f"out_dir={folder / 'run'}"]))
    return final_weights(folder / "run")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 3])
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tmp_path, seed, uninterrupted):
    common = SIGKILL_RUN
    kill_after = random.Random(seed).randint(2, 14)  # any of the 16 steps but the last
    out = tmp_path / "killed"
    proc = run_until([*TRAIN, *common, f"out_dir={out}"], out, kill_after)
    os.killpg(proc.pid, signal.SIGKILL)  # no handler, no cleanup: as if the machine died
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert newest_step(out) < 16
    resumed = finish([*TRAIN, *common, f"out_dir={out}", "train.resume=auto"])
    assert "fastvae: resumed from" in resumed.stdout
    assert_same_weights(final_weights(out), uninterrupted)


@pytest.mark.slow
def test_sigkill_two_process_run_then_resume_is_bit_identical(tmp_path):
    common = ["train.epochs=2", "train.checkpoint_every=1"]
    finish([*accelerate_2(), *common, f"out_dir={tmp_path / 'straight'}"])
    out = tmp_path / "killed"
    proc = run_until([*accelerate_2(), *common, f"out_dir={out}"], out, 5)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
    proc.wait(timeout=30)
    assert newest_step(out) < 16
    finish([*accelerate_2(), *common, f"out_dir={out}", "train.resume=auto"])
    assert json.loads((out / "summary.json").read_text())["ranks_agree"] is True
    assert_same_weights(final_weights(out), final_weights(tmp_path / "straight"))


# ---------------------------------------------------------------- non-finite losses


class PoisonedDataset(torch.utils.data.Dataset):
    """The real training images, with one of them NaN: a bad batch injected on purpose."""

    def __init__(self, base, bad_index):
        self.base, self.bad_index = base, bad_index

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y, idx = self.base[i]
        return (torch.full_like(x, float("nan")) if i == self.bad_index else x), y, idx


def poisoned_datasets(bad_index=100):
    """The tiny run's datasets, with one training image NaN."""
    from fastvae.data import build_datasets

    train_set, test_set = build_datasets(tiny_config("unused").data)
    return PoisonedDataset(train_set, bad_index), test_set


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tiny_config(out, "train.epochs=2", "train.checkpoint_every=1")
    with pytest.raises(SystemExit) as exc:
        exit_on_user_error(train)(cfg, datasets=poisoned_datasets())  # as `python -m fastvae.train` reports it
    assert exc.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fastvae: error: non-finite recon at step ")
    assert err.endswith(f"the last good checkpoint is kept: {list_checkpoints(out)[-1]}")
    bad_step = int(err.split("at step ")[1].split(";")[0])
    saved = list_checkpoints(out)
    assert saved and newest_step(out) == bad_step - 1  # everything before the bad step, nothing after
    model, _, _ = load_model(saved[-1])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_skip_policy_continues_and_counts(tmp_path):
    out = tmp_path / "run"
    result = train(tiny_config(out, "train.epochs=2", "train.nonfinite=skip"), datasets=poisoned_datasets())
    assert result["skipped_batches"] == 2  # the poisoned image comes round once per epoch
    assert result["step"] == 14
    records = read_records(out)
    assert [r["skipped_batches"] for r in records] == [1, 2]
    assert all(torch.isfinite(t).all() for t in final_weights(out).values())


class OneProcess:
    num_processes = 1
    device = torch.device("cpu")


def test_guard_names_the_kl_term_when_read_not_in_the_step():
    """Policy stop records the first bad step on the device (no host read in the step) and names it at
    the next read: a log point or a checkpoint."""
    guard = NonFiniteGuard("stop", OneProcess())
    guard.batch_is_bad(0, torch.ones(4), torch.ones(4))
    assert guard.batch_is_bad(4, torch.ones(4), torch.tensor([1.0, float("inf"), 1.0, 1.0])) is False
    guard.batch_is_bad(5, torch.tensor([float("nan")] * 4), torch.ones(4))  # later bad steps keep the first
    with pytest.raises(NonFiniteLoss, match="^non-finite kl at step 5;"):
        guard.raise_if_bad()


def test_a_nonfinite_stop_before_any_checkpoint_says_none_exists(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tiny_config(out, "train.epochs=2", "train.log_every=1")
    with pytest.raises(SystemExit) as exc:
        exit_on_user_error(train)(cfg, datasets=poisoned_datasets(bad_index=0))  # the first batch's image
    assert exc.value.code == 3 and not list_checkpoints(out)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fastvae: error: non-finite recon at step ")
    assert err.endswith("no checkpoint was written before it"), err


# ---------------------------------------------------------------- signals


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_and_exits_cleanly(tmp_path, uninterrupted):
    common = SIGKILL_RUN  # the killed runs' uninterrupted twin is this run's too
    out = tmp_path / "stopped"
    proc = subprocess.Popen([*TRAIN, *common, "train.log_every=1", f"out_dir={out}"], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_until("the first epoch's metrics", (out / "metrics.jsonl").exists, 120, 0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert "fastvae: stopped by SIGTERM at step" in output and "Traceback" not in output
    stopped_at = int(output.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert newest_step(out) == stopped_at
    finish([*TRAIN, *common, f"out_dir={out}", "train.resume=auto"])
    assert_same_weights(final_weights(out), uninterrupted)


# ---------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished tiny run: the files that bad commands must leave untouched. One per worker, not
    shared: a refused command may touch out_dir for a moment (its lock), which another worker's
    snapshot of the same folder would see."""
    out = tmp_path_factory.mktemp("done") / "run"
    train(tiny_config(out, "train.max_steps=3"))
    reset_accelerate_state()
    return out


def bad_inputs(run: Path, tmp: Path):
    truncated = tmp / "truncated"
    truncated.mkdir()
    for f in list_checkpoints(run)[-1].iterdir():
        (truncated / f.name).write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 2)] if f.suffix != ".json"
                                         else f.read_bytes())
    (tmp / "bad.yaml").write_text("train:\n  epochs: [1, 2\n")
    (tmp / "a_file").write_text("not a folder")
    mnist = str(CONFIGS / "mnist.yaml")
    ckpt = list_checkpoints(run)[-1]
    return {
        "nonexistent config": (["--config", str(tmp / "nope.yaml")], f"config file '{tmp / 'nope.yaml'}' not found"),
        "yaml syntax error": (["--config", str(tmp / "bad.yaml")], f"config file '{tmp / 'bad.yaml'}' line 3"),
        "unknown key": (["--config", mnist, "model.latent=3"], "unknown config key 'model.latent'"),
        "wrong type": (["--config", mnist, "data.batch_size=big"], "config key 'data.batch_size': expected int, got 'big'"),
        "negative lr": (["--config", mnist, "optim.lr=-0.001"], "config key 'optim.lr': expected a value > 0"),
        "latent size 0": (["--config", mnist, "model.latent_dim=0"], "config key 'model.latent_dim': expected a value > 0"),
        "batch larger than dataset": (["--config", mnist, "data.limit=64", "data.batch_size=128",
                                       f"out_dir={tmp / 'fresh1'}"], "data.batch_size=128 x 1 process(es) is larger than the 64"),
        "nonexistent data path": (["--config", str(CONFIGS / "fashion_mnist.yaml"), f"data.root={tmp / 'nowhere'}",
                                   f"out_dir={tmp / 'fresh2'}"], f"Fashion-MNIST folder '{tmp / 'nowhere'}' not found"),
        "out_dir not writable": (["--config", mnist, f"out_dir={tmp / 'a_file' / 'run'}"],
                                 f"out_dir '{tmp / 'a_file' / 'run'}' is not writable"),
        "truncated checkpoint": (["--config", mnist, *TINY, f"train.resume={truncated}", f"out_dir={tmp / 'fresh3'}"],
                                 f"checkpoint '{truncated}' cannot be resumed: file "),
        "checkpoint of another model": (["--config", mnist, *TINY, "model.latent_dim=4", f"train.resume={ckpt}",
                                         f"out_dir={tmp / 'fresh4'}"],
                                        "was trained with model.latent_dim=2; expected it to match this run's 4"),
        "resume into another run's dir": (["--config", mnist, *TINY, "model.latent_dim=8", "train.resume=auto",
                                           f"out_dir={run}"], "was trained with model.latent_dim=2; expected it to match"),
        "fresh run into a used dir": (["--config", mnist, *TINY, f"out_dir={run}"],
                                      f"out_dir '{run}' already holds checkpoints (newest: step_00000003)"),
    }


@pytest.mark.parametrize("case", [
    "nonexistent config", "yaml syntax error", "unknown key", "wrong type", "negative lr", "latent size 0",
    "batch larger than dataset", "nonexistent data path", "out_dir not writable", "truncated checkpoint",
    "checkpoint of another model", "resume into another run's dir", "fresh run into a used dir"])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, finished_run, tmp_path, capsys):
    args, message = bad_inputs(finished_run, tmp_path)[case]
    before = tree_snapshot(finished_run)
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2
    assert len(err) == 1 and err[0].startswith("fastvae: error: "), err
    assert message in err[0], err[0]
    assert tree_snapshot(finished_run) == before
    assert not any((tmp_path / f"fresh{i}").exists() for i in range(1, 5))  # not even an empty out_dir


def pid_of_rank(rank: int, marker: str) -> int | None:
    """The training process of `rank` among those started with FASTVAE_TEST_MARK=marker."""
    for proc in Path("/proc").iterdir():
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"FASTVAE_TEST_MARK={marker}".encode() in env and f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


@pytest.mark.slow
def test_a_frozen_rank_is_named_by_the_survivor_within_the_collective_timeout(tmp_path):
    """SIGSTOP on rank 1 (a frozen process, a node gone quiet): rank 0 stops after
    train.collective_timeout_s and says which rank stopped answering, instead of waiting torch's 30 min.
    Once it has said so, the frozen rank is killed (as its scheduler would): the launcher would
    otherwise wait ~30 s more for a process that cannot answer its SIGTERM."""
    out, marker = tmp_path / "run", str(tmp_path)
    cmd = [*accelerate_2(), "train.epochs=50", "train.checkpoint_every=1", "train.collective_timeout_s=8",
           f"out_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**ENV, "FASTVAE_TEST_MARK": marker}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    named = lambda: any("stopped answering" in line for line in lines)  # noqa: E731
    try:
        wait_until("a checkpoint of step 2", lambda: newest_step(out) >= 2, 180, 0.1,
                   lambda: proc.poll() is not None and "the run ended")
        frozen = pid_of_rank(1, marker)
        assert frozen is not None
        os.kill(frozen, signal.SIGSTOP)
        # 8 s timeout + 8 s check + teardown, far below 30 min
        wait_until("the survivor's error", named, 150, 0.2, lambda: proc.poll() is not None and "the run ended")
        os.kill(frozen, signal.SIGKILL)
        proc.wait(timeout=60)
        reader.join(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in filter(None, [pid_of_rank(1, marker)]):
            os.kill(pid, signal.SIGKILL)
    output = "".join(lines)
    errors = [line for line in lines if line.startswith("fastvae: error:")]
    assert any("rank 1 stopped answering: a collective waited 8 s (train.collective_timeout_s)" in line
               for line in errors), output[-3000:]
    assert proc.returncode != 0

