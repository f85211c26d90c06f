"""What a user gets from a wheel: the `fastvae` command, shipped configs and launch templates,
working from a folder outside the repository."""

import subprocess
import sys
import sysconfig
import zipfile

import pytest

from helpers import ROOT


def test_fastvae_command_lists_and_runs_its_subcommands(tmp_path):
    from fastvae.cli import main

    assert main(["--help"]) == 0
    assert main(["nope"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["train", "--config", str(tmp_path / "missing.yaml")])
    assert exc.value.code == 2


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_trains_with_a_shipped_config_from_any_folder(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("fastvae-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ("fastvae/configs/mnist.yaml", "fastvae/configs/celeba.yaml", "fastvae/launch/train.sbatch",
                    "fastvae/launch/accelerate/cpu_2proc.yaml", "fastvae/kernels/reparam_kl.py"):
        assert shipped in names, shipped
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python3*/site-packages"))
    # the project's environment (torch, accelerate, ...) under the fresh venv instead of reinstalling it
    (site / "project_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                              "--no-deps", str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import fastvae; print(fastvae.__file__)"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr  # the wheel's copy, not the repo's
    run = subprocess.run([str(venv / "bin" / "fastvae"), "train", "--config", "mnist", "train.max_steps=3",
                          "data.limit=256", "data.batch_size=32", "train.samples=4", "out_dir=run"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert (tmp_path / "run" / "summary.json").is_file() and (tmp_path / "run" / "config.yaml").is_file()


# import name -> distribution name, where they differ
DISTRIBUTIONS = {"PIL": "pillow", "yaml": "pyyaml", "torch_fidelity": "torch-fidelity", "mlflow": "mlflow-skinny"}


def imported_packages() -> set[str]:
    """Top-level names of every third-party package the product imports (lazily or not)."""
    import ast

    names = set()
    for folder in ("fastvae", "kernels", "launch"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("fastvae", "__future__")}


def test_every_imported_package_is_declared():
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!;\[ ]", spec)[0].lower()
                for spec in [*project["dependencies"], *sum(project["optional-dependencies"].values(), [])]}
    imported = {DISTRIBUTIONS.get(name, name).lower() for name in imported_packages()}
    assert {"torch", "pillow", "pyyaml", "wandb", "submitit", "ffcv", "triton"} <= imported  # the scan works
    assert imported - declared == set()
    assert {"wandb", "slurm", "ffcv", "test", "all"} <= project["optional-dependencies"].keys()


def test_missing_wandb_names_the_extra(monkeypatch):
    from fastvae.errors import UserError
    from fastvae.tracking import check_wandb_ready

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(UserError, match=r"pip install 'fastvae\[wandb\]'"):
        check_wandb_ready()


@pytest.mark.parametrize("command", ["train", "generate", "evaluate", "ffcv", "slurm"])
def test_command_help_does_not_import_torch(command):
    """`fastvae COMMAND --help` answers without the seconds torch takes to import."""
    code = ("import sys; from fastvae.cli import main\n"
            f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout and proc.stdout.strip().splitlines()[-1] == "False"
