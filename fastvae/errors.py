"""Errors a user can cause, reported as one line and a non-zero exit."""

import functools
import json
import os
import sys
from pathlib import Path

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """Bad input from the user: a config key, a path, a value out of range.

    The message names the bad thing and what was expected, on one line.
    """

    exit_code = USER_ERROR_EXIT_CODE


class NonFiniteLoss(UserError):
    """Training produced a NaN/inf loss term; the last good checkpoint is kept."""

    exit_code = 3


class OutputError(UserError):
    """What a run must write could not be written (disk full, read-only): said in one line with what
    is still good, partial files removed."""

    exit_code = 4


class LostRank(UserError):
    """A rank of a multi-process run stopped answering (frozen, its node gone): the others stop."""

    exit_code = 5


class OutOfMemory(UserError):
    """An allocation failed although the size check at set-up (fastvae/sizes.py) let the run start."""

    exit_code = 6


# How torch's CPU and CUDA allocators say that an allocation failed.
ALLOCATION_FAILED = ("can't allocate memory", "out of memory", "not enough memory")


def out_of_memory(err: BaseException) -> OutOfMemory | None:
    """A failed allocation as one line (MemoryError, torch.OutOfMemoryError, the CPU allocator's
    RuntimeError), else None."""
    text = str(err)
    if not (isinstance(err, MemoryError) or any(words in text for words in ALLOCATION_FAILED)):
        return None
    first = text.strip().splitlines()[0][:200] if text.strip() else type(err).__name__
    return OutOfMemory(f"out of memory ({first}); expected a smaller data.batch_size, data.image_size, "
                       f"loss.samples or model (the set-up's size check is rough: docs/reliability.md)")


def exit_on_user_error(main):
    """Turn a UserError escaping `main` into `fastvae: error: ...` and its exit code (2 for bad input)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            try:
                return main(*args, **kwargs)
            except (MemoryError, RuntimeError) as err:  # torch.OutOfMemoryError is a RuntimeError
                oom = out_of_memory(err)
                if oom is None:
                    raise
                raise oom from None
        except UserError as err:
            message = " ".join(str(err).split())  # always one line
            print(f"fastvae: error: {message}", file=sys.stderr, flush=True)
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # gloo's teardown can hang or abort at exit (docs/notes.md)
                sys.stdout.flush()
                os._exit(err.exit_code)
            sys.exit(err.exit_code)

    return wrapper


# What json.loads of a hostile file raises: bad JSON, or an integer of more digits than Python converts
# (ValueError); bytes that are not UTF-8; arrays nested thousands deep (RecursionError)
JSON_ERRORS = (ValueError, UnicodeDecodeError, RecursionError)


def read_json(path: str | Path, refused) -> object:
    """The JSON value in the file `path`; one that cannot be read is UserError(refused(the error))."""
    try:
        return json.loads(Path(path).read_text())
    except JSON_ERRORS as err:
        raise UserError(refused(err)) from None
