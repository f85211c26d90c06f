"""TensorBoard and MLflow beside W&B (logger=tensorboard / mlflow / a list), through accelerate's
trackers: scalars, pictures and the config, each step once after a resume, one line without the extra."""

import json
import shutil

import pytest

from fastvae.checkpoint import list_checkpoints
from fastvae.errors import UserError
from fastvae.train import train
from helpers import tiny_config

COMMON = ["train.epochs=2", "train.log_every=2", "train.checkpoint_every=4"]


def tensorboard_steps(folder, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    runs = EventMultiplexer(size_guidance={"images": 0, "scalars": 0}).AddRunsFromDirectory(str(folder))
    runs.Reload()
    return sorted(e.step for run in runs.Runs() if tag in runs.Runs()[run].get("scalars", [])
                  for e in runs.Scalars(run, tag))


def tensorboard_runs(folder) -> list[str]:
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    runs = EventMultiplexer().AddRunsFromDirectory(str(folder))
    return sorted(runs.Runs())


def tensorboard_tags(folder) -> dict:
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    runs = EventMultiplexer().AddRunsFromDirectory(str(folder))
    runs.Reload()
    tags = {"images": set(), "scalars": set(), "plugins": set()}
    for run in runs.Runs().values():
        tags["images"] |= set(run.get("images", []))
        tags["scalars"] |= set(run.get("scalars", []))
    tags["plugins"] = {"hparams"} if runs.PluginRunToTagToContent("hparams") else set()
    return tags


def mlflow_run(out):
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fastvae")
    (run,) = client.search_runs([experiment.experiment_id])
    return client, run


def test_tensorboard_and_mlflow_hold_each_step_once_after_a_resume(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    train(tiny_config(out, "logger=[tensorboard,mlflow]", *COMMON, "train.max_steps=12"))
    # as if the run died after logging step 12 but before its checkpoint 12 was written
    shutil.rmtree(list_checkpoints(out)[-1])
    train(tiny_config(out, "logger=[tensorboard,mlflow]", *COMMON, "train.resume=auto"))
    assert tensorboard_steps(out / "tensorboard", "train/loss") == [2, 4, 6, 8, 10, 12, 14, 16]
    assert tensorboard_steps(out / "tensorboard", "epoch/test_loss") == [8, 16]  # no row for the stop at 12
    tags = tensorboard_tags(out / "tensorboard")
    assert {"pictures/samples", "pictures/reconstructions", "pictures/latent_scatter"} <= tags["images"]
    assert "hparams" in tags["plugins"]  # the config
    assert tensorboard_runs(out / "tensorboard") == ["."]  # one run in TensorBoard's list, resumed or not
    client, run = mlflow_run(out)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert run.data.params["data.batch_size"] == "32" and run.data.params["model.name"] == "conv_vae"
    pictures = [a.path for a in client.list_artifacts(run.info.run_id, "pictures")]
    assert pictures == ["pictures/step_00000008", "pictures/step_00000016"]
    meta = json.loads((list_checkpoints(out)[-1] / "fastvae.json").read_text())
    assert meta["mlflow_run_id"] == run.info.run_id
    import mlflow

    assert mlflow.get_tracking_uri() != f"sqlite:///{out / 'mlflow.db'}"  # not left for the next run


def test_mlflow_tracking_uri_is_honoured(tmp_path, monkeypatch):
    store = tmp_path / "elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    train(tiny_config(tmp_path / "run", "logger=mlflow", "train.max_steps=2", "wandb.log_images=false"))
    assert store.is_file() and not (tmp_path / "run" / "mlflow.db").exists()


def test_several_trackers_at_once_get_the_same_scalars(tmp_path, monkeypatch):
    from wandb_records import run_contents
    from test_wandb_offline import new_offline_runs, offline_runs

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = set(offline_runs())
    out = tmp_path / "run"
    train(tiny_config(out, "logger=[wandb,tensorboard]", "train.max_steps=4", "train.log_every=2",
                      "wandb.log_images=false"))
    (wandb_run,) = (run_contents(p) for p in new_offline_runs(before))
    assert [h["_step"] for h in wandb_run["history"] if "train/loss" in h] == [2, 4]
    assert tensorboard_steps(out / "tensorboard", "train/loss") == [2, 4]


@pytest.mark.parametrize("logger, message", [
    ("[tensorboard,tensorboard]", "each once"), ("[none,wandb]", "expected none, one of wandb, tensorboard, mlflow"),
    ("neptune", "config key 'logger': 'neptune'"),
])
def test_bad_logger_is_one_line(tmp_path, logger, message):
    with pytest.raises(UserError, match=message):
        train(tiny_config(tmp_path / "run", f"logger={logger}", "train.max_steps=1"))


def test_a_missing_tracker_package_is_one_line(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(UserError, match=r"logger=tensorboard but tensorboard is not installed; expected "
                                        r"`pip install 'fastvae\[tensorboard\]'`"):
        train(tiny_config(tmp_path / "run", "logger=tensorboard", "train.max_steps=1"))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("uri, message", [
    ("http://127.0.0.1:{port}", "cannot be reached"),
    ("sqlite:///{tmp}/a_file/mlflow.db", "is not a folder"),
    ("ftp://example.invalid/x", "scheme 'ftp' is not one MLflow stores runs with"),
    ("{tmp}/plain/path", "a plain path"),
])
def test_an_mlflow_store_that_cannot_be_used_is_one_line_within_seconds(tmp_path, monkeypatch, uri, message):
    """MLflow retries an unreachable server for minutes, then raises a traceback: here a closed port, a
    database under a file, a scheme MLflow has no store for and a plain path stop at once, naming the URI."""
    import time

    from fastvae.launch.processes import free_port

    pytest.importorskip("mlflow")
    (tmp_path / "a_file").write_text("x")
    uri = uri.format(port=free_port(), tmp=tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.monotonic()
    with pytest.raises(UserError, match=message) as err:
        train(tiny_config(tmp_path / "run", "logger=mlflow", "train.max_steps=1"))
    assert time.monotonic() - started < 10 and uri in str(err.value) and not (tmp_path / "run").exists()
