"""Where metrics go: metrics.jsonl in out_dir always, W&B through accelerate's tracker when asked.

Only the main process writes; callers pass values already reduced across ranks.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastvae.config import Config, flatten

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"


class RunLog:
    def __init__(self, accelerator, cfg: Config) -> None:
        self.accelerator = accelerator
        self.path = Path(cfg.out_dir) / METRICS_FILE
        self.use_tracker = cfg.logger != "none"
        if self.use_tracker:
            accelerator.init_trackers(project_name="fastvae", config=flatten(cfg),
                                      init_kwargs={"wandb": {"name": Path(cfg.out_dir).name}})

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

    def close(self) -> None:
        if self.use_tracker:
            self.accelerator.end_training()

    def log_eval(self, report: dict, step: int) -> None:
        """The final evaluation: eval.json in out_dir, and its scalars to the tracker."""
        if self.accelerator.is_main_process:
            (self.path.parent / EVAL_FILE).write_text(json.dumps(report, indent=2))
        if self.use_tracker:
            scalars = {f"eval/{k}": v for k, v in report.items() if isinstance(v, (int, float)) and v is not None}
            self.accelerator.log(scalars, step=step)
