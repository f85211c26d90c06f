"""Where a command may write what it makes (evaluate's --json, generate's and export's --out): never
into a checkpoint folder (a resume would then refuse the checkpoint, or its weights would be gone),
never over an existing file it did not write, never a path with control characters. Checked before
any work is done, in one line naming the flag and the path."""

from __future__ import annotations

import json
from pathlib import Path

from fastvae.config import CONTROL_CHARACTERS
from fastvae.errors import UserError


def checkpoint_holding(path: Path) -> Path | None:
    """The checkpoint folder (one holding fastvae.json) that `path` is, or lies inside; else None."""
    from fastvae.checkpoint import META_FILE  # (torch-free until a command runs)

    for folder in [path, *path.parents]:
        if (folder / META_FILE).is_file():
            return folder
    return None


def checked_output(value: str, flag: str, kind: str, replaceable=None) -> Path:
    """`value` as an output path of kind "file" or "folder", refused in one line when it would write into
    a checkpoint, over a file of another kind or one `replaceable(path)` does not recognize as the
    command's own, or through a link."""
    if CONTROL_CHARACTERS.search(value):
        raise UserError(f"{flag} {value!r}: expected a path without control characters (newline, tab, ...)")
    path = Path(value)
    absolute = path.absolute()
    inside = checkpoint_holding(absolute)
    if inside is not None:
        raise UserError(f"{flag} '{value}' is inside the checkpoint '{inside}'; expected a path outside checkpoint "
                        f"folders (writing there would change what the checkpoint holds)")
    if path.is_symlink():
        raise UserError(f"{flag} '{value}' is a link; expected a new path or a real {kind}")
    for parent in absolute.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{flag} '{value}': '{parent}' is a file; expected a folder there")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise UserError(f"{flag} '{value}' is a file; expected a folder (new or empty) to write into")
    if kind == "file" and path.is_dir():
        raise UserError(f"{flag} '{value}' is a folder; expected a file path (e.g. {Path(value) / 'eval.json'})")
    if kind == "file" and path.exists() and not (replaceable and replaceable(path)):
        raise UserError(f"{flag} '{value}' exists and was not written by this command; expected a new path "
                        f"(nothing else is overwritten)")
    return path


def is_evaluation_report(path: Path) -> bool:
    """A JSON report `fastvae evaluate --json` wrote (an earlier one may be replaced)."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(report, dict) and {"checkpoint", "split", "elbo_nats"} <= set(report)
