"""Train once, use many times: a folder built once per test session and shared by every test and
every pytest-xdist worker that asks for it (the first builds it under a file lock, the others wait
for it and reuse it). Tests read what is in it; a test that changes files copies them first."""

import os
import shutil
from pathlib import Path

from filelock import FileLock

DONE = ".built"


def session_root(tmp_path_factory) -> Path:
    """The folder every worker of this session sees: pytest-xdist gives each worker a base temp
    folder (named after the worker, gw0, gw1, ...) inside the session's."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory, name: str, build) -> Path:
    """Path of the folder `name`, filled by build(folder) the first time any worker asks."""
    folder = session_root(tmp_path_factory) / "shared" / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / DONE).exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed half-way
            folder.mkdir()
            build(folder)
            (folder / DONE).touch()
    return folder
