"""fastvae.launch.slurm without a cluster: --dry-run, option checks, sweep expansion."""

import os
import subprocess
import sys

import pytest

from fastvae.errors import UserError
from fastvae.launch import slurm, sweep
from helpers import CONFIGS, ROOT


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fastvae.launch.slurm", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=env)


def test_dry_run_prints_sbatch_script_and_resolved_configs_without_sbatch(tmp_path):
    env = {**os.environ, "PATH": os.path.dirname(sys.executable)}  # no sbatch, sinfo or srun on PATH
    proc = run_cli("--config", str(CONFIGS / "mnist.yaml"), "--dry-run", "--nodes", "2", "--gpus-per-node", "4",
                   "--cpus-per-task", "8", "--partition", "gpu", "--account", "lab", "--qos", "high", "--time", "120",
                   "--sweep", "optim.lr=1e-3,5e-4", "--sweep", "model.latent_dim=2,16", "--max-parallel", "3",
                   f"out_dir={tmp_path / 'grid'}", "train.epochs=5", env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --partition=gpu", "#SBATCH --account=lab",
                 "#SBATCH --qos=high", "#SBATCH --time=120", "#SBATCH --array=0-3%3", "#SBATCH --signal=USR2@90",
                 "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}", "srun"):
        assert line in out, line
    assert out.count("# resolved config for ") == 4
    assert f"out_dir: {tmp_path / 'grid'}/optim.lr=5e-4_model.latent_dim=16" in out
    assert "name: grid-optim.lr=5e-4_model.latent_dim=16" in out and "group: grid" in out
    assert "resume: auto" in out and "epochs: 5" in out
    assert not (tmp_path / "grid").exists()  # nothing submitted, nothing written


def test_dry_run_shows_requeues_extra_sbatch_options_and_clock_time_limits(tmp_path):
    proc = run_cli("--config", str(CONFIGS / "mnist.yaml"), "--dry-run", "--time", "1-02:30:10",
                   "--sbatch", "constraint=a100", "--sbatch", "exclude=node[1-3]", "--sbatch", "reservation=lab",
                   "--max-requeues", "7", f"out_dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr
    for line in ("#SBATCH --constraint=a100", "#SBATCH --exclude='node[1-3]'", "#SBATCH --reservation=lab",
                 "#SBATCH --time=1591"):  # 1 day + 2 h 30 min + 10 s, rounded up to whole minutes
        assert line in proc.stdout, line
    args = slurm.parse_args(["--max-requeues", "7", "--dry-run", f"out_dir={tmp_path / 'run'}"])
    slurm.check_options(args)
    executor = slurm.make_executor(args, tmp_path / "logs", 1)
    assert executor._executor.max_num_timeout == 7  # submitit requeues up to 7 times at the time limit


@pytest.mark.parametrize("text, minutes", [("90", 90), ("01:30:00", 90), ("45:30", 46), ("2-00:00:00", 2880)])
def test_time_limit_formats(text, minutes):
    assert slurm.time_limit_minutes(text) == minutes


def test_missing_submitit_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    with pytest.raises(SystemExit) as exc:
        slurm.main(["--config", str(CONFIGS / "mnist.yaml"), "--dry-run", f"out_dir={tmp_path / 'run'}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == ("fastvae: error: the SLURM launcher needs submitit, which is not installed; expected: "
                   "pip install 'fastvae[slurm]' (or pip install submitit==1.5.4)")


@pytest.mark.parametrize("args, expected", [
    (["--nodes", "0"], "--nodes 0: expected a whole number >= 1"),
    (["--gpus-per-node", "-1"], "--gpus-per-node -1: expected a number >= 0"),
    (["--gpus-per-node", "4", "--tasks-per-node", "2"], "expected equal numbers (one training process per GPU)"),
    (["--time", "1", "--signal-delay", "90"], "--signal-delay 90: expected 1 <= seconds < --time (60 s)"),
    (["--gpus", "1"], "unrecognized arguments: --gpus"),
    (["--constraint", "a100"], "unrecognized arguments: --constraint"),
    (["--nodes", "two"], "argument --nodes: invalid int value: 'two'"),
    (["--time", "1:2:3:4"], "invalid time '1:2:3:4'; expected minutes or [D-]HH:MM:SS"),
    (["--sbatch", "constraint"], "invalid sbatch option 'constraint'; expected KEY=VALUE"),
    (["--max-requeues", "-1"], "--max-requeues -1: expected a number >= 0"),
    (["--sweep", "optim.lr"], "--sweep 'optim.lr': expected key=value1,value2"),
    (["--sweep", "optim.lr=1,1"], "a value is repeated"),
    (["--sweep", "optim.nope=1,2"], "unknown config key 'optim.nope'"),
    (["--sweep", "optim.lr=-1,1"], "config key 'optim.lr': expected a value > 0, got -1.0"),
    (["--wait-timeout", "5"], "--wait-timeout without --wait"),
    (["train.epochs=x"], "config key 'train.epochs': expected int, got 'x'"),
])
def test_bad_options_fail_in_one_line_before_submission(tmp_path, args, expected):
    proc = run_cli("--config", str(CONFIGS / "mnist.yaml"), "--dry-run", *args, f"out_dir={tmp_path / 'x'}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastvae: error: ") and expected in lines[0], proc.stderr


def test_no_sbatch_is_a_one_line_error(tmp_path):
    env = {**os.environ, "PATH": os.path.dirname(sys.executable)}
    proc = run_cli("--config", str(CONFIGS / "mnist.yaml"), f"out_dir={tmp_path / 'x'}", env=env)
    assert proc.returncode == 2 and "sbatch not found" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_out_dir_with_checkpoints_needs_resume(tmp_path):
    (tmp_path / "old" / "checkpoints" / "step_00000008").mkdir(parents=True)
    (tmp_path / "old" / "checkpoints" / "step_00000008" / "fastvae.json").write_text("{}")
    args = slurm.parse_args(["--config", str(CONFIGS / "mnist.yaml"), f"out_dir={tmp_path / 'old'}"])
    with pytest.raises(UserError, match="already holds checkpoints"):
        slurm.build_submissions(args)
    args = slurm.parse_args(["--config", str(CONFIGS / "mnist.yaml"), f"out_dir={tmp_path / 'old'}",
                             "train.resume=auto"])
    assert slurm.build_submissions(args)[0].cfg.train.resume == "auto"


def test_sweep_grid_and_value_splitting():
    assert sweep.split_values("[0.5,0.9],[0.9,0.99]") == ["[0.5,0.9]", "[0.9,0.99]"]
    assert sweep.split_values("'a,b',c") == ["'a,b'", "c"]
    assert sweep.expand([]) == [[]]
    grid = sweep.expand(["optim.lr=1e-3,5e-4", "model.latent_dim=2,8,16"])
    assert len(grid) == 6 and grid[0] == ["optim.lr=1e-3", "model.latent_dim=2"]
    assert len({sweep.run_tag(c) for c in grid}) == 6
    assert sweep.run_tag(["optim.betas=[0.5, 0.9]"]) == "optim.betas=-0.5-0.9"
    with pytest.raises(UserError, match="given twice"):
        sweep.expand(["optim.lr=1,2", "optim.lr=3,4"])


def test_checkpoint_resubmits_the_same_run_resuming():
    from fastvae.config import load_config
    from fastvae.launch.job import TrainJob

    cfg = load_config(CONFIGS / "mnist.yaml", ["train.resume=runs/x/checkpoints/step_00000010"])
    delayed = TrainJob(cfg).checkpoint()
    assert isinstance(delayed.function, TrainJob) and delayed.function.cfg.train.resume == "auto"
    assert cfg.train.resume.endswith("step_00000010")  # the original is untouched


def test_wandb_not_logged_in_is_refused_before_submission(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path), WANDB_MODE="online",
               NETRC=str(tmp_path / "no-netrc"))
    proc = run_cli("--config", str(CONFIGS / "mnist.yaml"), "--dry-run", "logger=wandb",
                   f"out_dir={tmp_path / 'x'}", env=env)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and "wandb login" in proc.stderr


# ---------------------------------------------------------------- hostile input


def hostile(sentinel):
    return {
        "newline in out_dir (a shared YAML)": ("yaml", f'out_dir: "/tmp/x\\ntouch {sentinel}\\n"'),
        "newline in an sbatch value": ("args", ["--sbatch", f"comment=x\ntouch {sentinel}"]),
        "newline in an sbatch key": ("args", ["--sbatch", f"x\ntouch {sentinel}\n#=1"]),
        "space in an sbatch key": ("args", ["--sbatch", f"x --wrap=touch {sentinel}=1"]),
        "newline in the job name": ("args", ["--job-name", f"a\ntouch {sentinel}"]),
        "newline in the partition": ("args", ["--partition", f"gpu\ntouch {sentinel}"]),
        "tab in data.root": ("args", ["data.root=/d\t/x"]),
    }


@pytest.mark.parametrize("case", list(hostile("S")))
def test_control_characters_that_would_reach_the_sbatch_script_are_refused(case, tmp_path):
    sentinel = tmp_path / "injected"
    kind, value = hostile(sentinel)[case]
    if kind == "yaml":
        (tmp_path / "shared.yaml").write_text(value + "\n")
        args = ["--config", str(tmp_path / "shared.yaml"), "--dry-run"]
    else:
        args = ["--config", str(CONFIGS / "mnist.yaml"), "--dry-run", f"out_dir={tmp_path / 'run'}", *value]
    proc = run_cli(*args)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "control characters" in proc.stderr or "invalid sbatch option" in proc.stderr, proc.stderr
    assert not sentinel.exists()


def test_quotes_and_shell_syntax_reach_the_script_quoted_and_run_nothing(tmp_path):
    """Accepted values with shell syntax: the script sbatch would get runs none of it (bash runs it here,
    with an srun that does nothing)."""
    sentinel = tmp_path / "injected"
    out = tmp_path / f"run $(touch {sentinel}) `touch {sentinel}` ';touch {sentinel};'"
    proc = run_cli("--config", str(CONFIGS / "mnist.yaml"), "--dry-run", f"out_dir={out}", "--sbatch",
                   f"comment=$(touch {sentinel});'\"", "--job-name", f"j;touch {sentinel}")
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout.split("# resolved config")[0]
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    ran = subprocess.run(["bash", "-c", script], env={**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"},
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert not sentinel.exists()


def test_a_sweep_whose_values_sanitize_alike_gets_one_folder_per_run(tmp_path):
    args = slurm.parse_args(["--config", str(CONFIGS / "mnist.yaml"), "--sweep", "data.root=/d/a b,/d/a-b,/d/a/b",
                             f"out_dir={tmp_path}"])
    runs = slurm.build_submissions(args)
    assert len({r.cfg.out_dir for r in runs}) == 3 and len({r.cfg.wandb.name for r in runs}) == 3
    assert [r.cfg.data.root for r in runs] == ["/d/a b", "/d/a-b", "/d/a/b"]


def test_a_swept_wandb_group_wins_over_the_launchers_default(tmp_path):
    args = slurm.parse_args(["--config", str(CONFIGS / "mnist.yaml"), "--sweep", "wandb.group=g1,g2",
                             "--sweep", "optim.lr=1e-3,5e-4", f"out_dir={tmp_path / 'grid'}"])
    groups = [r.cfg.wandb.group for r in slurm.build_submissions(args)]
    assert groups == ["g1", "g1", "g2", "g2"]
