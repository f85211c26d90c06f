"""Errors a user can cause, reported as one line and a non-zero exit."""

import functools
import os
import sys

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


def exit_on_user_error(main):
    """Turn a UserError escaping `main` into `fastvae: error: ...` and its exit code (2 for bad input)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            message = " ".join(str(err).split())  # always one line
            print(f"fastvae: error: {message}", file=sys.stderr, flush=True)
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # gloo's teardown can hang or abort at exit (docs/notes.md)
                sys.stdout.flush()
                os._exit(err.exit_code)
            sys.exit(err.exit_code)

    return wrapper
