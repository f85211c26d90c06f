"""A DDP diagnostic for tests: training that also writes the dataset indices each rank trained on,
to OUT_DIR/sample_ids_rank{R}.json. Run it in place of `-m fastvae.train` (same arguments):

    accelerate launch ... tests/support/record_sample_ids.py --config configs/mnist.yaml ...

or submit RecordingTrainJob in place of fastvae.launch.job.TrainJob (needs submitit)."""

import json
import sys

from fastvae import train as train_cli
from fastvae.launch.job import TrainJob
from fastvae.trainer import Trainer

FILE = "sample_ids_rank{}.json"


def record_sample_ids() -> None:
    """Wrap Trainer.train_step to note each batch's indices, and write them when the run ends."""
    step, finish = Trainer.train_step, Trainer._finish

    def train_step(self, batch):
        self.__dict__.setdefault("sample_ids", []).extend(batch[2].tolist())
        return step(self, batch)

    def _finish(self):
        path = self.out_dir / FILE.format(self.accelerator.process_index)
        path.write_text(json.dumps(self.__dict__.get("sample_ids", [])))
        return finish(self)

    Trainer.train_step, Trainer._finish = train_step, _finish


def read_sample_ids(out_dir, rank: int) -> list[int]:
    return json.loads((out_dir / FILE.format(rank)).read_text())


class RecordingTrainJob(TrainJob):
    """A SLURM job (fastvae.launch.job.TrainJob) that records sample ids."""

    def __call__(self):
        record_sample_ids()
        return super().__call__()


if __name__ == "__main__":
    record_sample_ids()
    train_cli.main(sys.argv[1:])
