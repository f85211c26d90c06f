"""fastvae.launch.slurm against a real two-node SLURM cluster started on this machine
(tools/local_cluster.py: slurmctld, two slurmd, slurmdbd + MariaDB, munge).

Skips where root or apt is missing; with FASTVAE_REQUIRE_SLURM=1 (CI) a missing
cluster fails instead. Every wait is bounded.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools import local_cluster
from fastvae.launch import slurm
from fastvae.tracking import read_records
from helpers import CONFIGS, ROOT, wait_until
from wandb_records import run_contents

# one cluster for the session: every test here runs on one pytest-xdist worker (tests/conftest.py)
pytestmark = [pytest.mark.slow, pytest.mark.slurm]

TINY_JOB = ["data.limit=256", "data.batch_size=32", "train.samples=16", "train.log_every=4", "train.mixed_precision=no"]
JOB_TIMEOUT = 240  # seconds any one job may take here before the test fails


@pytest.fixture(scope="session")
def cluster():
    why = local_cluster.why_unavailable()
    if why:
        if os.environ.get("FASTVAE_REQUIRE_SLURM") == "1":
            pytest.fail(f"FASTVAE_REQUIRE_SLURM=1 but no SLURM cluster can be started: {why}")
        pytest.skip(f"no local SLURM cluster: {why}")
    root = local_cluster.DEFAULT_DIR
    was_up = local_cluster.is_up(root)
    env = local_cluster.start(root)
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = env["SLURM_CONF"]  # sbatch/sacct here and scontrol inside jobs
    yield root
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous
    if not was_up:
        local_cluster.stop(root)


def launch(*args, timeout=JOB_TIMEOUT, cwd=None):
    """The command a user types, as a subprocess."""
    return subprocess.run([sys.executable, "-m", "fastvae.launch.slurm", "--config", str(CONFIGS / "mnist.yaml"),
                           "--time", "10", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def submit(out_dir, *overrides, **options):
    """Submit through the launcher's own functions; returns the submitit job."""
    argv = ["--config", str(CONFIGS / "mnist.yaml"), "--time", "10"]
    for k, v in options.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    args = slurm.parse_args([*argv, f"out_dir={out_dir}", *TINY_JOB, *overrides])
    slurm.check_options(args)
    runs = slurm.build_submissions(args)
    args.job_name = "fastvae-test"
    (job,) = slurm.submit(slurm.make_executor(args, slurm.log_folder(args, runs), len(runs)), runs)
    return job


def start_now(job_id):
    """A requeued job waits ~2 min for its BeginTime; start it at once. But not in the
    second its old run was killed: slurmd revokes the job's credential with 1-second resolution and
    refuses a relaunch whose credential is from that same second ("Job credential revoked", the job
    then ends FAILED). The ~2 min BeginTime is what protects real requeues from this."""
    time.sleep(5)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, timeout=30)


def read_metrics(out_dir):
    return read_records(out_dir)


def test_a_job_of_a_users_model_completes_with_metrics_and_checkpoint(cluster, tmp_path):
    """The user's module (docs/examples/my_vae.py) is importable where they submit, not where the
    job starts (the job's log folder): the launcher carries its folder on PYTHONPATH."""
    out = tmp_path / "single"
    proc = launch("--wait", "--wait-timeout", str(JOB_TIMEOUT), f"out_dir={out}", *TINY_JOB, "train.epochs=2",
                  "model.name=my_vae:MLPVAE", "model.kwargs.hidden=32", cwd=ROOT / "docs" / "examples")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "submitted job" in proc.stdout and "completed: step 16" in proc.stdout
    assert "fastvae: wrote" in proc.stdout  # the job's log, streamed by --wait
    assert [r["step"] for r in read_metrics(out)] == [8, 16]
    assert (out / "checkpoints" / "step_00000016" / "fastvae.json").is_file()
    assert (out / "samples.png").is_file()
    assert list((out / "slurm").glob("*_0_log.out"))


def preempt(job) -> None:
    """The two signals of submitit's `job._interrupt()` (SIGTERM, then SIGUSR2 in a second scancel), the
    other way round: a job that checkpoints and exits on the SIGTERM before the second scancel lands
    completes instead of requeueing (seen on 2 loaded cores). Either order stops the job at the next step;
    a job already requeued by the first refuses the second (pending), which is fine."""
    subprocess.run(["scancel", job.job_id, "--signal", "USR2"], check=True, timeout=30)
    subprocess.run(["scancel", job.job_id, "--signal", "TERM"], timeout=30)


def test_two_node_job_trains_ddp_through_preemption_and_requeue(cluster, tmp_path):
    if len(local_cluster.node_names()) < 2:
        pytest.skip("this host is named localhost: the local cluster has one node")
    out = tmp_path / "two_nodes"
    # one task on each of the two slurmd: the ranks meet at the first node's name (MASTER_ADDR)
    job = submit(out, "data.limit=1024", "train.epochs=2", "train.checkpoint_every=4", nodes=2, tasks_per_node=1)
    wait_until("a first checkpoint", lambda: list(out.glob("checkpoints/step_*/fastvae.json")), JOB_TIMEOUT)
    preempt(job)  # to both tasks
    wait_until("the requeue", lambda: job.state.split()[0] in ("PENDING", "REQUEUED"), timeout=60)
    start_now(job.job_id)
    final = slurm.wait_for([job], JOB_TIMEOUT, stream=False)
    assert final == {job.job_id: "COMPLETED"}, Path(job.paths.stderr).read_text()[-3000:]
    results = job.results()
    assert len(results) == 2 and all(r["ranks_agree"] for r in results)
    assert results[0]["param_checksum"] == results[1]["param_checksum"]
    assert results[0]["step"] == 32  # 2 epochs x 1024 images / (2 ranks x 32): as if never stopped
    log = Path(job.paths.stdout).read_text()
    assert "fastvae: stopped by SIG" in log and "fastvae: resumed from" in log and "2 process(es)" in log
    nodes = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job.job_id, "-o", "NodeList"], capture_output=True,
                           text=True, timeout=30).stdout.split()
    assert set(local_cluster.node_names()) <= set(subprocess.run(
        ["scontrol", "show", "hostnames", nodes[-1]], capture_output=True, text=True, timeout=30).stdout.split())


def test_preempted_job_requeues_resumes_and_continues_the_wandb_run(cluster, tmp_path):
    out = tmp_path / "preempted"
    wandb_root = Path(os.environ["WANDB_DIR"]) / "wandb"
    before = set(wandb_root.glob("offline-run-*"))
    job = submit(out, "data.limit=1024", "train.epochs=3", "train.checkpoint_every=4", "logger=wandb")
    wait_until("a first checkpoint", lambda: list(out.glob("checkpoints/step_*/fastvae.json")), JOB_TIMEOUT)
    preempt(job)
    wait_until("the requeue", lambda: job.state.split()[0] in ("PENDING", "REQUEUED"), timeout=60)
    start_now(job.job_id)
    final = slurm.wait_for([job], JOB_TIMEOUT, stream=False)
    assert final == {job.job_id: "COMPLETED"}, Path(job.paths.stderr).read_text()[-3000:]
    log = Path(job.paths.stdout).read_text()
    assert "fastvae: stopped by SIG" in log and "fastvae: resumed from" in log
    assert job.result()["step"] == 96  # 3 epochs x 1024/32: the same total as an uninterrupted run
    steps = [r["step"] for r in read_metrics(out)]
    assert steps[-1] == 96 and steps == sorted(steps)  # the interrupted epoch's partial record is kept once
    # W&B: the requeued job logged into the same run (same id) and went on from the checkpoint's step
    runs = sorted(set(wandb_root.glob("offline-run-*")) - before)
    contents = [run_contents(r) for r in runs]
    assert len(contents) == 2 and contents[0]["run_id"] == contents[1]["run_id"]
    first, second = ([h["_step"] for h in c["history"]] for c in contents)
    assert max(second) == 96 and min(second) > 0 and min(second) >= min(first)


def test_sweep_runs_a_job_array_of_two_distinct_runs(cluster, tmp_path):
    base = tmp_path / "sweep"
    proc = launch("--sweep", "model.latent_dim=2,4", "--max-parallel", "2", "--wait", "--wait-timeout",
                  str(JOB_TIMEOUT), f"out_dir={base}", *TINY_JOB, "train.epochs=1", timeout=JOB_TIMEOUT + 30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "job array" in proc.stdout and proc.stdout.count("completed: step 8") == 2
    runs = sorted(p for p in base.iterdir() if p.name.startswith("model.latent_dim="))
    assert [p.name for p in runs] == ["model.latent_dim=2", "model.latent_dim=4"]
    import json

    summaries = [json.loads((p / "summary.json").read_text()) for p in runs]
    assert summaries[0]["param_checksum"] != summaries[1]["param_checksum"]
    metas = [json.loads(next(p.glob("checkpoints/step_*/fastvae.json")).read_text()) for p in runs]
    assert [m["config"]["model"]["latent_dim"] for m in metas] == [2, 4]
    assert [m["config"]["wandb"]["name"] for m in metas] == ["sweep-model.latent_dim=2", "sweep-model.latent_dim=4"]


def test_cancelled_job_is_reported_not_waited_on(cluster, tmp_path):
    out = tmp_path / "cancelled"
    proc = subprocess.Popen([sys.executable, "-m", "fastvae.launch.slurm", "--config", str(CONFIGS / "mnist.yaml"),
                             "--wait", f"out_dir={out}", "train.epochs=50"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until("the job to start", lambda: list((out / "slurm").glob("*_0_log.out")), timeout=60)
        job_id = next((out / "slurm").glob("*_0_log.out")).name.split("_")[0]
        subprocess.run(["scancel", job_id], check=True, timeout=30)
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 1, stdout + stderr
    assert f"job {job_id} ended CANCELLED" in stderr


def sacct_state(job_id):
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True,
                         timeout=30).stdout.split()
    return out[-1] if out else ""


def test_plain_sbatch_template_trains_ddp_and_requeues_at_the_time_limit(cluster, tmp_path):
    """launch/train.sbatch without submitit, one task on each of two nodes: SIGTERM before the time
    limit -> checkpoint, exit 143, the script requeues the job, the requeued job resumes and
    finishes all steps."""
    from helpers import ROOT

    out = tmp_path / "sbatch"
    two_nodes = len(local_cluster.node_names()) > 1  # the script's multi-node env export, for real
    layout = ["--nodes=2", "--ntasks-per-node=1"] if two_nodes else ["--ntasks-per-node=2"]
    job_id = subprocess.run(
        ["sbatch", "--parsable", *layout, "--cpus-per-task=1", f"--output={tmp_path}/slurm-%j.out",
         f"--export=ALL,FASTVAE_PYTHON={sys.executable}", "launch/train.sbatch", "configs/mnist.yaml",
         f"out_dir={out}", "data.limit=1024", "data.batch_size=32", "train.epochs=6", "train.samples=16",
         "train.checkpoint_every=4"], cwd=ROOT, check=True, capture_output=True, text=True, timeout=30).stdout.strip()
    try:
        wait_until("a first checkpoint", lambda: list(out.glob("checkpoints/step_*/fastvae.json")), JOB_TIMEOUT)
        # what --signal=TERM@120 does at the time limit: SIGTERM to the job's tasks, not to the script
        subprocess.run(["scancel", "--signal=TERM", job_id], check=True, timeout=30)
        wait_until("the requeue", lambda: sacct_state(job_id) in ("PENDING", "REQUEUED"), timeout=60)
        start_now(job_id)
        wait_until("the job to end", lambda: sacct_state(job_id) in slurm.FINAL_STATES, JOB_TIMEOUT)
    finally:
        subprocess.run(["scancel", job_id], timeout=30)
    log = (tmp_path / f"slurm-{job_id}.out").read_text(errors="replace")  # tasks share the file
    assert sacct_state(job_id) == "COMPLETED", log[-3000:]
    assert "requeueing job" in log and "restart 1" in log and "fastvae: resumed from" in log
    assert f"2 process(es) on {2 if two_nodes else 1} node(s)" in log
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 96 and summary["ranks_agree"] is True  # 6 epochs x 1024 / (2 x 32)
