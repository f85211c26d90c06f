"""Read what an offline W&B run logged, from its `run-<id>.wandb` file.

wandb 0.31 ships no Python reader for these files (its writer is the Go core), so
tests parse the format here: a 7-byte file header (":W&B", magic 0xBEE1, version 0),
then a LevelDB-style log of 32 KiB blocks; each chunk has a 7-byte header
(crc32c, little-endian uint16 length, type FULL=1 FIRST=2 MIDDLE=3 LAST=4) and the
chunks of one record concatenate to a serialized `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
FILE_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> list:
    data = Path(path).read_bytes()
    assert data[:7] == FILE_HEADER, f"{path} is not a W&B run file"
    out, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # the block's tail is padding
            pos += left_in_block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if length == 0 and kind == 0:  # zero padding
            pos += left_in_block
            continue
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def _value(item) -> object:
    return json.loads(item.value_json)


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def finished_records(run_dir: str | Path, wait_s: float = 60.0) -> list:
    """The run file's records once it holds its `exit` record. wandb's service process writes the
    file on its own schedule: `finish()` can return before the file is flushed (a CI run read a file
    with no `run` record yet, 2026-12-07), so a test waits for the end, bounded."""
    (path,) = Path(run_dir).glob("run-*.wandb")
    deadline = time.monotonic() + wait_s
    while True:
        got = records(path) if path.stat().st_size >= len(FILE_HEADER) else []
        kinds = [rec.WhichOneof("record_type") for rec in got]
        if "exit" in kinds:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: no exit record after {wait_s:.0f} s (records: {kinds})")
        time.sleep(0.2)


def run_contents(run_dir: str | Path) -> dict:
    """{"run_id", "name", "group", "tags", "project", "config": {...}, "history": [{...}, ...],
    "artifacts": [names]} from one offline run directory."""
    out = {"config": {}, "history": [], "artifacts": []}
    for rec in finished_records(run_dir):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(run_id=rec.run.run_id, name=rec.run.display_name, group=rec.run.run_group,
                       tags=list(rec.run.tags), project=rec.run.project)
            for item in rec.run.config.update:
                out["config"][_key(item)] = _value(item)
        elif kind == "config":
            for item in rec.config.update:
                out["config"][_key(item)] = _value(item)
        elif kind == "history":
            out["history"].append({_key(item): _value(item) for item in rec.history.item})
        elif kind == "artifact":
            out["artifacts"].append(rec.artifact.name)
    return out
