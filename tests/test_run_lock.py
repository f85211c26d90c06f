"""One run per out_dir (fastvae/run_lock.py): a second run into a folder in use is refused in one line,
a lock never outlives its run, and file systems without flock get a lock file checked for staleness."""

import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys

import pytest

from fastvae.errors import UserError
from fastvae.run_lock import LOCK_FILE, RunLock
from fastvae.train import main
from helpers import ROOT, TINY, tree_snapshot, wait_until
from test_reliability import ENV, TRAIN, finish, run_until


@pytest.mark.slow
def test_two_runs_started_together_into_one_folder_one_trains_one_is_refused(tmp_path):
    out = tmp_path / "run"
    cmd = [*TRAIN, "train.epochs=4", f"out_dir={out}"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], [(c, e[-1500:]) for c, _, e in results]
    (refusal,) = [err for code, _, err in results if code == 2]
    lines = [line for line in refusal.splitlines() if line.startswith("fastvae: ")]
    assert len(lines) == 1 and f"out_dir '{out}' is in use by another run (pid " in lines[0], lines


@pytest.mark.slow
def test_a_run_in_progress_holds_its_folder_and_a_killed_one_does_not(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["train.epochs=6", "train.checkpoint_every=1"]
    proc = run_until([*TRAIN, *common, f"out_dir={out}"], out, 2)
    try:
        wait_until("the run's lock", lambda: (out / LOCK_FILE).is_file(), 30)
        before = {k: v for k, v in tree_snapshot(out).items() if "checkpoints" not in k and "jsonl" not in k}
        with pytest.raises(SystemExit) as exc:
            main(["--config", "mnist", *TINY, *common, "train.resume=auto", f"out_dir={out}"])
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastvae: ")]
        assert exc.value.code == 2 and len(err) == 1 and f"(pid {proc.pid} on {socket.gethostname()}" in err[0], err
        after = {k: v for k, v in tree_snapshot(out).items() if "checkpoints" not in k and "jsonl" not in k}
        assert after == before  # the refused run wrote nothing
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert (out / LOCK_FILE).is_file()  # left behind by the killed run, but no longer locked
    resumed = finish([*TRAIN, *common, f"out_dir={out}", "train.resume=auto"])
    assert f"out_dir lock of a run that is gone (pid {proc.pid}" in resumed.stdout
    assert not (out / LOCK_FILE).exists()  # released at the end


def test_refused_set_up_releases_the_folder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(SystemExit):
        main(["--config", "mnist", *TINY, "data.batch_size=100000", f"out_dir={out}"])
    assert list(out.iterdir()) == []  # no lock file left behind
    RunLock(out).acquire().release()  # free again


@pytest.fixture
def without_flock(monkeypatch):
    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)


def test_without_flock_a_lock_file_of_a_dead_process_is_named_and_taken_over(tmp_path, without_flock):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_FILE).write_text(f"pid {gone.stdout.strip()} on {socket.gethostname()} since then\n")
    said = []
    lock = RunLock(tmp_path, said.append).acquire()
    assert said == [f"fastvae: out_dir lock of a run that is gone (pid {gone.stdout.strip()} on "
                    f"{socket.gethostname()} since then) taken over"]
    assert f"pid {os.getpid()} on" in (tmp_path / LOCK_FILE).read_text()
    with pytest.raises(UserError, match=f"is in use by another run \\(pid {os.getpid()} on"):
        RunLock(tmp_path).acquire()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


# this process as the live holder: named by a placeholder, as test ids must be the same in every
# pytest-xdist worker (each has its own pid)
@pytest.mark.parametrize("holder", ["pid {this process} on {this host} since now",
                                    "pid 1 on another-node since now", "garbage"])
def test_without_flock_a_live_or_uncheckable_holder_is_refused(tmp_path, without_flock, holder):
    holder = holder.format_map({"this process": os.getpid(), "this host": socket.gethostname()})
    (tmp_path / LOCK_FILE).write_text(holder)
    with pytest.raises(UserError, match="is in use by another run"):
        RunLock(tmp_path).acquire()
    assert (tmp_path / LOCK_FILE).read_text() == holder
