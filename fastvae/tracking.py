"""Where metrics go: metrics.jsonl in out_dir always; W&B, TensorBoard and MLflow through accelerate's
trackers when `logger` names them (one or several).

Only the main process writes; callers pass values already reduced across ranks.
The tracking run's id lives in every checkpoint (and MLflow's run id), so a resumed (or requeued)
run keeps logging into the same W&B / MLflow run, and steps logged before a crash are not logged again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fastvae.config import Config, flatten, loggers
from fastvae.errors import UserError

METRICS_FILE = "metrics.jsonl"
STEPS_FILE = "steps.jsonl"  # the training loss at every log point (train.log_every)
LOGGED_FILE = "logged_steps.json"  # the last step sent to the trackers (LoggedSteps)
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
DEFAULT_PROJECT = "fastvae"
EVAL_FILE = "eval.json"
OFFLINE_MODES = ("offline", "dryrun", "disabled")


def read_records(out_dir: str | Path, name: str = METRICS_FILE) -> list[dict]:
    """The records of a run's metrics.jsonl (one per epoch) or steps.jsonl (STEPS_FILE: one per log
    point), oldest first; a last line cut short by a crash is left out. A run that has written none
    (stopped before its first epoch ended) has none."""
    records = []
    path = Path(out_dir) / name
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def check_wandb_ready() -> None:
    """logger=wandb: fail now, in one line, rather than hang on a login prompt in a batch job."""
    try:
        import wandb
        from wandb.sdk.lib.wbauth import authenticate_session
    except ImportError:
        raise UserError("logger=wandb but wandb is not installed; expected `pip install 'fastvae[wandb]'` "
                        "or logger=none") from None
    settings = wandb.setup().settings
    if settings.mode in OFFLINE_MODES:
        return
    try:
        auth = authenticate_session(host=settings.base_url, source="fastvae", prompt=False, update_session=False)
    except Exception as err:  # wandb raises its own AuthenticationError/UsageError types
        raise UserError(f"W&B credentials are invalid ({err}); expected `wandb login` with a valid API key") from None
    if auth is None:
        raise UserError(f"logger=wandb but W&B is not logged in for {settings.base_url}; expected `wandb login` "
                        f"(or WANDB_API_KEY), or WANDB_MODE=offline to log locally and `wandb sync` later")


def check_tracker_installed(name: str) -> None:
    """logger=tensorboard / mlflow without its package: one line now, not a traceback at the first log."""
    try:  # each tracker's package, and its fastvae extra, has the tracker's name
        __import__(name)
        if name == "mlflow":
            __import__("sqlalchemy"), __import__("alembic")  # its SQLite store
    except ImportError as err:
        raise UserError(f"logger={name} but {err.name} is not installed; expected "
                        f"`pip install 'fastvae[{name}]'` or another logger") from None


def check_trackers_ready(cfg: Config) -> None:
    """Every tracker `logger` names installed (and W&B logged in; MLflow's store reachable), before
    anything else runs."""
    for name in loggers(cfg):
        check_wandb_ready() if name == "wandb" else check_tracker_installed(name)
        if name == "mlflow":
            check_mlflow_store(os.environ.get("MLFLOW_TRACKING_URI", ""))


MLFLOW_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks", "file")
CONNECT_S = 5


def check_mlflow_store(uri: str) -> None:
    """$MLFLOW_TRACKING_URI as MLflow would use it, checked in seconds (MLflow itself retries an
    unreachable server for minutes, then raises): a server that answers on its port, a SQLite file whose
    folder exists, a scheme MLflow knows. Empty: the SQLite store in out_dir."""
    import socket
    from urllib.parse import urlparse

    if not uri:
        return
    parsed = urlparse(uri)
    hint = "expected http(s)://HOST:PORT of a running MLflow server, sqlite:///PATH, or unset for out_dir/mlflow.db"
    if parsed.scheme not in MLFLOW_SCHEMES:
        raise UserError(f"MLFLOW_TRACKING_URI '{uri}': scheme {parsed.scheme or 'none (a plain path)'!r} is not "
                        f"one MLflow stores runs with; {hint}")
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname or "localhost", port), timeout=CONNECT_S).close()
        except OSError as err:
            raise UserError(f"MLFLOW_TRACKING_URI '{uri}' cannot be reached ({err.strerror or type(err).__name__} "
                            f"within {CONNECT_S} s); {hint}") from None
    if parsed.scheme == "sqlite":
        folder = Path(parsed.path[1:]).parent  # sqlite:///rel/x.db, sqlite:////abs/x.db
        if not folder.is_dir():
            raise UserError(f"MLFLOW_TRACKING_URI '{uri}': the database's folder '{folder}' is not a folder; {hint}")
    if parsed.scheme == "file" and not os.environ.get("MLFLOW_ALLOW_FILE_STORE"):
        raise UserError(f"MLFLOW_TRACKING_URI '{uri}': MLflow refuses its file store unless "
                        f"MLFLOW_ALLOW_FILE_STORE=true; {hint}")


class LoggedSteps:
    """What this tracking run has logged last: a step and the kinds of records logged at it.

    W&B keeps the steps of a run increasing and drops a record whose step is below the run's
    last one; TensorBoard and MLflow would keep both copies. After a crash, a resumed run replays
    the steps since its checkpoint, so they are not logged again: the first attempt's values
    stand, and they are the replay's values too, since resuming is exact."""

    def __init__(self, path: Path, run_id: str) -> None:
        self.path, self.run_id, self.step, self.kinds = path, run_id, -1, []
        try:
            saved = json.loads(path.read_text())
            if saved["run_id"] == run_id:
                self.step, self.kinds = saved["step"], saved["kinds"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # none yet, or not this run's

    def is_new(self, step: int, kind: str) -> bool:
        """True (and noted) when a `kind` record at `step` has not been logged to this run yet."""
        if step < self.step or (step == self.step and kind in self.kinds):
            return False
        self.step, self.kinds = step, ([*self.kinds, kind] if step == self.step else [kind])
        self.path.write_text(json.dumps({"run_id": self.run_id, "step": self.step, "kinds": self.kinds}))
        return True


def new_run_id() -> str:
    from wandb.sdk.lib.runid import generate_id

    return generate_id()


def wandb_init_args(w, out_dir: Path, run_id: str | None = None) -> dict:
    """wandb.init's own order for every setting: the config's value, else the WANDB_* variable, else
    our default. Resolved here because an explicit init argument would hide the environment."""
    env = os.environ
    tags = w.tags or [t for t in env.get("WANDB_TAGS", "").split(",") if t]
    return {"project": w.project or env.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            "id": run_id or env.get("WANDB_RUN_ID") or new_run_id(), "resume": env.get("WANDB_RESUME") or "allow",
            "name": w.name or env.get("WANDB_NAME") or out_dir.name, "group": w.group or env.get("WANDB_RUN_GROUP"),
            "tags": tags or None, "entity": w.entity or env.get("WANDB_ENTITY"),
            # by default the run's files sit next to its checkpoints, not in the current folder
            "dir": env.get("WANDB_DIR") or str(out_dir)}


def new_local_run_id() -> str:
    import secrets

    return secrets.token_hex(8)


def scalar_config(cfg: Config) -> dict:
    """The flattened config with lists and mappings as text: TensorBoard's hparams and MLflow's params
    take numbers, strings and booleans only."""
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in flatten(cfg).items()}


def tensorboard_hparams(writer, values: dict) -> None:
    """The config as TensorBoard's hparams, in the run's own event files. SummaryWriter.add_hparams (what
    accelerate's tracker calls) writes them into a new timestamped subfolder, which TensorBoard lists as
    one more run, again after every resume."""
    from torch.utils.tensorboard.summary import hparams

    for summary in hparams(values, {}):
        writer._get_file_writer().add_summary(summary)
    writer.flush()


def mlflow_tracker(out_dir: Path, run_id: str | None):
    """accelerate's MLflowTracker: $MLFLOW_TRACKING_URI, else a SQLite store in out_dir (MLflow's default
    kind of local store since its file store went into maintenance), artifacts beside it."""
    import mlflow
    from accelerate.tracking import MLflowTracker

    artifacts = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):  # (set_tracking_uri sets it: RunLog.close unsets it)
        mlflow.set_tracking_uri(f"sqlite:///{(out_dir / MLFLOW_DB).absolute()}")
        artifacts = (out_dir / MLFLOW_ARTIFACTS).absolute().as_uri()
    return MLflowTracker(os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT, artifacts, run_id,
                         run_name=out_dir.name)


class RunLog:
    def __init__(self, accelerator, cfg: Config, run_id: str | None = None, mlflow_run_id: str | None = None) -> None:
        self.accelerator = accelerator
        self.path = Path(cfg.out_dir) / METRICS_FILE
        self.steps_path = Path(cfg.out_dir) / STEPS_FILE
        self.trackers = loggers(cfg)
        self.use_tracker = bool(self.trackers)
        self.log_images = self.use_tracker and cfg.wandb.log_images
        self.run_id, self.mlflow_run_id, self.mlflow_uri_set, self.closed = None, mlflow_run_id, False, False
        if self.use_tracker and accelerator.is_main_process:
            self._start(cfg, run_id)

    def _start(self, cfg: Config, run_id: str | None) -> None:
        """The trackers, built here because their folders and run ids come from the run: accelerate's
        init_trackers starts what `accelerator.log_with` holds (tracker objects are taken as they are)."""
        out = Path(cfg.out_dir)
        init, project = {}, DEFAULT_PROJECT
        if "wandb" in self.trackers:
            init = wandb_init_args(cfg.wandb, out, run_id)
            project, run_id = init.pop("project"), init["id"]
        self.run_id = run_id or new_local_run_id()
        self.logged = LoggedSteps(out / LOGGED_FILE, self.run_id)
        from accelerate.tracking import TensorBoardTracker

        # fastvae's store is the tracking URI (to unset at close) where the environment names none
        self.mlflow_uri_set = "mlflow" in self.trackers and not os.environ.get("MLFLOW_TRACKING_URI")
        made = {"wandb": lambda: "wandb", "tensorboard": lambda: TensorBoardTracker(TENSORBOARD_DIR, out),
                "mlflow": lambda: mlflow_tracker(out, self.mlflow_run_id)}
        self.accelerator.log_with = [made[name]() for name in self.trackers]
        self.accelerator.init_trackers(project_name=project, init_kwargs={"wandb": init})
        for tracker in self.accelerator.trackers:
            if tracker.name == "wandb":
                tracker.store_init_configuration(flatten(cfg))
            elif tracker.name == "tensorboard":
                tensorboard_hparams(tracker.writer, scalar_config(cfg))
            elif not (tracker.name == "mlflow" and self.mlflow_run_id):  # MLflow's params cannot change on resume
                tracker.store_init_configuration(scalar_config(cfg))
            if tracker.name == "mlflow":
                self.mlflow_run_id = tracker.tracker.info.run_id

    def trim_after(self, step: int) -> None:
        """On resume: drop the step and epoch records written after the checkpoint the run resumes from."""
        for path in (self.path, self.steps_path):
            if not (self.accelerator.is_main_process and path.is_file()):
                continue
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass  # a line cut short by a crash
            path.write_text("".join(line + "\n" for line in kept))

    def _to_tracker(self, step: int, kind: str) -> bool:
        return self.use_tracker and self.accelerator.is_main_process and self.logged.is_new(step, kind)

    def log_step(self, values: dict, step: int) -> None:
        """A log point: a line of steps.jsonl, and the tracker's train/ panel."""
        if self.accelerator.is_main_process:
            with open(self.steps_path, "a") as fh:
                fh.write(json.dumps({"step": step, **values}) + "\n")
        if self._to_tracker(step, "train"):
            self.accelerator.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def log_epoch(self, record: dict) -> None:
        """One JSON object per epoch in metrics.jsonl (append: a resumed run continues the file)."""
        if self.accelerator.is_main_process:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        if self._to_tracker(record["step"], "epoch"):
            self.accelerator.log({f"epoch/{k}": v for k, v in record.items()}, step=record["step"])

    def log_pictures(self, paths: dict[str, Path], step: int) -> None:
        """PNG files under `pictures/<name>` (main process only): wandb.Image in W&B, an image in
        TensorBoard, artifacts pictures/step_N/ in MLflow."""
        if not (self.log_images and self._to_tracker(step, "pictures")):
            return
        for tracker in self.accelerator.trackers:
            if tracker.name == "wandb":
                import wandb

                tracker.log({f"pictures/{k}": wandb.Image(str(p), caption=f"step {step}") for k, p in paths.items()},
                            step=step)
            elif tracker.name == "tensorboard":
                import numpy as np
                from PIL import Image

                for k, p in paths.items():
                    with Image.open(p) as image:
                        tracker.writer.add_image(f"pictures/{k}", np.asarray(image.convert("RGB")), step,
                                                 dataformats="HWC")
                tracker.writer.flush()
            elif tracker.name == "mlflow":
                import mlflow

                for p in paths.values():
                    mlflow.log_artifact(str(p), artifact_path=f"pictures/step_{step:08d}", run_id=self.mlflow_run_id)

    def log_checkpoint(self, path: Path, name: str) -> None:
        """The checkpoint directory as a W&B model artifact (main process only)."""
        if "wandb" in self.trackers and self.accelerator.is_main_process:
            import wandb

            run = self.accelerator.get_tracker("wandb", unwrap=True)
            artifact = wandb.Artifact(f"{name}-checkpoint", type="model", metadata={"checkpoint": path.name})
            artifact.add_dir(str(path))
            run.log_artifact(artifact)

    def log_eval(self, report: dict, step: int) -> None:
        """The final evaluation: eval.json in out_dir, and its scalars to the tracker."""
        if self.accelerator.is_main_process:
            (self.path.parent / EVAL_FILE).write_text(json.dumps(report, indent=2))
        if self._to_tracker(step, "eval"):
            scalars = {f"eval/{k}": v for k, v in report.items() if isinstance(v, (int, float)) and v is not None}
            self.accelerator.log(scalars, step=step)

    def close(self) -> None:
        """The trackers' runs ended (also after an error: an MLflow run left active would refuse the next
        run in this process); again is a no-op."""
        if self.use_tracker and not self.closed:
            self.closed = True
            self.accelerator.end_training()
        if self.mlflow_uri_set:  # the next run in this process chooses its own store
            import mlflow

            mlflow.set_tracking_uri(None)
            self.mlflow_uri_set = False
