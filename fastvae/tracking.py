"""Where metrics go: metrics.jsonl in out_dir always, W&B through accelerate's tracker when asked.

Only the main process writes; callers pass values already reduced across ranks.
The W&B run id lives in every checkpoint, so a resumed (or requeued) run keeps
logging into the same W&B run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fastvae.config import Config, flatten
from fastvae.errors import UserError

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
OFFLINE_MODES = ("offline", "dryrun", "disabled")


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


def new_run_id() -> str:
    from wandb.sdk.lib.runid import generate_id

    return generate_id()


class RunLog:
    def __init__(self, accelerator, cfg: Config, wandb_run_id: str | None = None) -> None:
        self.accelerator = accelerator
        self.path = Path(cfg.out_dir) / METRICS_FILE
        self.use_tracker = cfg.logger == "wandb"
        self.log_images = self.use_tracker and cfg.wandb.log_images
        self.run_id = None
        if self.use_tracker:
            w = cfg.wandb
            # Only the main process's id matters: it alone logs and writes checkpoint metadata.
            self.run_id = wandb_run_id or new_run_id()
            init = {"id": self.run_id, "resume": "allow", "name": w.name or Path(cfg.out_dir).name,
                    "group": w.group or None, "tags": w.tags or None, "entity": w.entity or None}
            if not os.environ.get("WANDB_DIR"):  # by default the run's files sit next to its checkpoints
                init["dir"] = str(cfg.out_dir)
            accelerator.init_trackers(project_name=w.project, config=flatten(cfg), init_kwargs={"wandb": init})

    def trim_after(self, step: int) -> None:
        """On resume: drop the epoch records written after the checkpoint the run resumes from."""
        if not (self.accelerator.is_main_process and self.path.is_file()):
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                pass  # a line cut short by a crash
        self.path.write_text("".join(line + "\n" for line in kept))

    def log_step(self, values: dict, step: int) -> None:
        if self.use_tracker:
            self.accelerator.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def log_epoch(self, record: dict) -> None:
        """One JSON object per epoch in metrics.jsonl (append: a resumed run continues the file)."""
        if self.accelerator.is_main_process:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.use_tracker:
            self.accelerator.log({f"epoch/{k}": v for k, v in record.items()}, step=record["step"])

    def log_pictures(self, paths: dict[str, Path], step: int) -> None:
        """PNG files as wandb.Image under `pictures/<name>` (main process only)."""
        if self.log_images and self.accelerator.is_main_process:
            import wandb

            self.accelerator.log({f"pictures/{k}": wandb.Image(str(p), caption=f"step {step}")
                                  for k, p in paths.items()}, step=step)

    def log_checkpoint(self, path: Path, name: str) -> None:
        """The checkpoint directory as a W&B model artifact (main process only)."""
        if self.use_tracker and self.accelerator.is_main_process:
            import wandb

            run = self.accelerator.get_tracker("wandb", unwrap=True)
            artifact = wandb.Artifact(f"{name}-checkpoint", type="model", metadata={"checkpoint": path.name})
            artifact.add_dir(str(path))
            run.log_artifact(artifact)

    def log_eval(self, report: dict, step: int) -> None:
        """The final evaluation: eval.json in out_dir, and its scalars to the tracker."""
        if self.accelerator.is_main_process:
            (self.path.parent / EVAL_FILE).write_text(json.dumps(report, indent=2))
        if self.use_tracker:
            scalars = {f"eval/{k}": v for k, v in report.items() if isinstance(v, (int, float)) and v is not None}
            self.accelerator.log(scalars, step=step)

    def close(self) -> None:
        if self.use_tracker:
            self.accelerator.end_training()
