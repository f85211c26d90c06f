"""A real two-node SLURM cluster on this machine, for tests, CI and trying the launcher.

    python tools/local_cluster.py start [--dir /tmp/fastvae-slurm]   # prints `export SLURM_CONF=...`
    python tools/local_cluster.py status | stop
    python tools/local_cluster.py install   # only the Debian packages (what the test set-up runs)

Debian's Slurm 22.05 (slurmctld, slurmd, slurmdbd), munge and MariaDB, started by hand as
root (their packaged services don't start without systemd). Everything the daemons write
lives under --dir; nothing in /etc is touched: clients find the cluster through SLURM_CONF.
Why slurmdbd + MariaDB and not accounting_storage/none: without accounting, sacct knows
no job states and submitit waits forever on a cancelled job.

Two nodes: two slurmd (`slurmd -N NAME`, each its own port, spool, pid and log file), named
after this host and `localhost`: both names resolve here, as a job's first node name must (it is
the rendezvous address, MASTER_ADDR). Each declares the whole machine, so a one-node job may
use every CPU and a two-node job really spans two slurmd. Where the host's name is `localhost`
the cluster has one node.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

APT_PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "slurmdbd", "mariadb-server"]
BINARIES = ["slurmctld", "slurmd", "slurmdbd", "sbatch", "munged", "mungekey", "mariadbd", "mariadb-install-db"]
DEFAULT_DIR = Path("/tmp/fastvae-slurm")
CLUSTER_NAME = "fastvae"
PARTITION = "debug"
# Each daemon's TCP port, chosen free when the cluster starts and kept in PORTS_FILE while it runs:
# never a fixed port that another cluster, a test run beside it or a system install may hold.
PORT_NAMES = ("slurmctld", "slurmd", "slurmd_second", "slurmdbd", "mariadb")
PORTS_FILE = "ports.json"
SECOND_NODE = "localhost"
MUNGE_SOCKET = "/run/munge/munge.socket.2"  # the default: sacctmgr and slurmdbd ignore another one


class ClusterError(RuntimeError):
    pass


def why_unavailable() -> str | None:
    """Why a local cluster cannot be started here (None when it can)."""
    if sys.platform != "linux":
        return "a local SLURM cluster needs Linux"
    if os.geteuid() != 0:
        return "starting the SLURM daemons needs root"
    missing = [b for b in BINARIES if not shutil.which(b)]
    if missing and not shutil.which("apt-get"):
        return f"{', '.join(missing)} not installed and no apt-get to install {' '.join(APT_PACKAGES)}"
    return None


def install() -> None:
    """apt-get install the daemons when a binary is missing (idempotent)."""
    if all(shutil.which(b) for b in BINARIES):
        return
    print(f"local_cluster: apt-get install {' '.join(APT_PACKAGES)}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES],
                   check=True, env=env, stdout=subprocess.DEVNULL)


@functools.cache  # is_up polls node_names(): ask slurmd -C once per process
def machine() -> tuple[str, dict, int, int]:
    """(host name, node hardware words, CPUs, memory MB) from `slurmd -C`; memory is lowered a
    little so the node is never 'low memory'."""
    out = subprocess.run(["slurmd", "-C"], check=True, capture_output=True, text=True).stdout
    words = dict(w.split("=", 1) for w in out.split() if "=" in w)
    return words["NodeName"], words, int(words["CPUs"]), int(int(words["RealMemory"]) * 0.9)


def node_names() -> list[str]:
    host = machine()[0]
    return [host] if host == SECOND_NODE else [host, SECOND_NODE]


def saved_ports(root: Path) -> dict | None:
    """The ports the cluster under `root` was started with (None before its first start)."""
    try:
        ports = json.loads((root / PORTS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return ports if isinstance(ports, dict) and set(ports) == set(PORT_NAMES) else None


def choose_ports(root: Path) -> dict:
    """Free ports for every daemon, saved under `root`."""
    from fastvae.launch.processes import free_port

    ports = {}
    while len(set(ports.values())) < len(PORT_NAMES):  # five distinct ones
        ports = {name: free_port() for name in PORT_NAMES}
    (root / PORTS_FILE).write_text(json.dumps(ports))
    return ports


def render_configs(root: Path, ports: dict) -> tuple[str, str]:
    """(slurm.conf, slurmdbd.conf) of the cluster, its daemons on `ports`."""
    host, words, cpus, mem = machine()
    hardware = (f"CPUs={words['CPUs']} Boards={words['Boards']} SocketsPerBoard={words['SocketsPerBoard']} "
                f"CoresPerSocket={words['CoresPerSocket']} ThreadsPerCore={words['ThreadsPerCore']} RealMemory={mem}")
    node_ports = [ports["slurmd"], ports["slurmd_second"]]
    nodes = "\n".join(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} {hardware} State=UNKNOWN"
                      for name, port in zip(node_names(), node_ports))
    conf = f"""# written by tools/local_cluster.py
ClusterName={CLUSTER_NAME}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ports['slurmctld']}
SlurmdPort={ports['slurmd']}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU={mem // cpus}
ReturnToService=2
JobRequeue=1
MinJobAge=300
KillWait=10
SchedulerType=sched/backfill
MpiDefault=none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={ports['slurmdbd']}
JobAcctGatherType=jobacct_gather/none
{nodes}
PartitionName={PARTITION} Nodes={",".join(node_names())} Default=YES MaxTime=INFINITE State=UP
"""
    dbd = f"""# written by tools/local_cluster.py
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={ports['slurmdbd']}
SlurmUser=root
PidFile={root}/run/slurmdbd.pid
LogFile={root}/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={ports['mariadb']}
StorageUser=root
StorageLoc=slurm_acct_db
"""
    return conf, dbd


def write_configs(root: Path, ports: dict) -> bool:
    """Write the configs; True when they changed (daemons started from the old ones must restart)."""
    conf, dbd = render_configs(root, ports)
    for sub in ("state", "spool", "log", "run", "db"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name in node_names():
        (root / "spool" / name).mkdir(parents=True, exist_ok=True)
    paths = {root / "slurm.conf": conf, root / "slurmdbd.conf": dbd}
    changed = any(not p.is_file() or p.read_text() != text for p, text in paths.items())
    for path, text in paths.items():
        path.write_text(text)
    (root / "slurmdbd.conf").chmod(0o600)  # slurmdbd refuses a config others can read
    return changed


def _pid_alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text().split()[0]), 0)
        return True
    except (OSError, ValueError):
        return False


def _wait(what: str, ok, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return
        time.sleep(0.25)
    tail = ""
    if log is not None and log.is_file():
        tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    raise ClusterError(f"{what} did not come up within {timeout:.0f}s{tail}")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _start_munge(root: Path) -> None:
    key = root / "munge.key"
    if not key.exists():  # a root-owned key: munged running as root rejects the packaged one
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True)
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    if _munge_works():  # ours from an earlier start, or the machine's own: either serves every daemon
        return
    pid = root / "run" / "munged.pid"
    subprocess.run(["munged", "--force", f"--key-file={key}", f"--pid-file={pid}",
                    f"--log-file={root}/log/munged.log", f"--seed-file={root}/run/munged.seed"], check=True)
    _wait("munged", _munge_works, 10, root / "log" / "munged.log")


def _munge_works() -> bool:
    if not Path(MUNGE_SOCKET).exists():
        return False
    cred = subprocess.run(["munge", "-n"], capture_output=True)
    return cred.returncode == 0 and subprocess.run(["unmunge"], input=cred.stdout, capture_output=True).returncode == 0


def _start_mariadb(root: Path, port: int) -> None:
    data = root / "db"
    pid = root / "run" / "mariadb.pid"
    if _pid_alive(pid):
        return
    if not (data / "mysql").is_dir():
        subprocess.run(["mariadb-install-db", f"--datadir={data}", "--user=root", "--skip-test-db",
                        "--auth-root-authentication-method=normal"], check=True, capture_output=True)
    log = root / "log" / "mariadb.log"
    subprocess.Popen(["mariadbd", f"--datadir={data}", "--user=root", f"--port={port}",
                      "--bind-address=127.0.0.1", f"--socket={root}/run/mariadb.sock", f"--pid-file={pid}",
                      f"--log-error={log}", "--skip-name-resolve"],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)
    _wait("mariadbd", lambda: _port_open(port), 60, log)


def _daemon(root: Path, name: str, args: list[str], ready, timeout: float = 30, instance: str = "") -> None:
    label = f"{name}-{instance}" if instance else name
    if _pid_alive(root / "run" / f"{label}.pid"):
        return
    subprocess.run([name, *args], check=True, env=cluster_env(root))
    _wait(label, ready, timeout, root / "log" / f"{label}.log")


def cluster_env(root: Path = DEFAULT_DIR) -> dict:
    return {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}


def node_states(root: Path = DEFAULT_DIR) -> dict[str, str]:
    """{node name: state} as sinfo reports them ({} when the cluster does not answer)."""
    if not (root / "slurm.conf").is_file() or not shutil.which("sinfo"):
        return {}
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N=%T"], capture_output=True, text=True, env=cluster_env(root),
                         timeout=30)
    return dict(word.split("=", 1) for word in out.stdout.split()) if out.returncode == 0 else {}


def is_up(root: Path = DEFAULT_DIR) -> bool:
    states = node_states(root.resolve())
    return set(states) == set(node_names()) and all(
        s.rstrip("*") in ("idle", "mixed", "allocated", "completing") for s in states.values())


def start(root: Path = DEFAULT_DIR, timeout: float = 90) -> dict:
    """Start (or find running) the cluster; returns the environment clients need (SLURM_CONF)."""
    why = why_unavailable()
    if why:
        raise ClusterError(why)
    install()
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    ports = (saved_ports(root) if is_up(root) else None) or choose_ports(root)  # a running cluster keeps its own
    if write_configs(root, ports):  # other configs (e.g. one node, other ports): the daemons start again
        stop(root)
    _start_munge(root)
    _start_mariadb(root, ports["mariadb"])
    _daemon(root, "slurmdbd", [], lambda: _port_open(ports["slurmdbd"]))
    _daemon(root, "slurmctld", [], lambda: _port_open(ports["slurmctld"]))
    for name in node_names():
        _daemon(root, "slurmd", ["-N", name], lambda: name in node_states(root), timeout, instance=name)
    _wait("every node", lambda: is_up(root), timeout, root / "log" / "slurmctld.log")
    return {"SLURM_CONF": str(root / "slurm.conf")}


def stop(root: Path = DEFAULT_DIR) -> None:
    """Stop every daemon started from `root` (the reverse order); leaves state for the next start."""
    root = root.resolve()
    slurmds = sorted(p.stem for p in (root / "run").glob("slurmd*.pid"))  # slurmd.pid: an older one-node cluster
    for name in (*slurmds, "slurmctld", "slurmdbd", "mariadb", "munged"):
        pid_file = root / "run" / f"{name}.pid"
        if not _pid_alive(pid_file):
            continue
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _pid_alive(pid_file):
            time.sleep(0.2)
        if _pid_alive(pid_file):
            os.kill(pid, signal.SIGKILL)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/local_cluster.py",
                                     description="Start or stop a two-node SLURM cluster on this machine (root).")
    parser.add_argument("action", choices=["install", "start", "stop", "status"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"state, logs and configs (default {DEFAULT_DIR})")
    args = parser.parse_args(argv)
    try:
        if args.action == "install":
            why = why_unavailable()
            if why:  # the SLURM tests then skip (and fail in CI, which sets FASTVAE_REQUIRE_SLURM=1)
                print(f"local_cluster: warning: cannot install the SLURM daemons: {why}", file=sys.stderr)
            else:
                install()
        elif args.action == "start":
            env = start(args.dir)
            print(f"local_cluster: up, partition '{PARTITION}'. Point clients at it with:\n"
                  f"export SLURM_CONF={env['SLURM_CONF']}")
        elif args.action == "stop":
            stop(args.dir)
            print("local_cluster: stopped")
        else:
            states = node_states(args.dir.resolve())
            shown = " ".join(f"{name}={state}" for name, state in sorted(states.items()))
            print(f"local_cluster: nodes {shown or 'unreachable (not started?)'}")
            return 0 if states else 1
    except (ClusterError, subprocess.CalledProcessError) as err:
        print(f"local_cluster: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
