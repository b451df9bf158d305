"""What the command-line tools share: one clear message per error, tracebacks on request.

A configuration or data error (``ValueError`` and its subclasses, missing files, a training run
that diverged, a corrupt checkpoint, ...) is printed as one line, ``PROG: error: MESSAGE``, and the
process exits with status 2; anything else is reported as an internal error with its type, exit
status 1. ``--verbose`` on the command line or ``DMLJAX_VERBOSE=1`` in the environment shows the
full traceback instead.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Any, Callable, Optional, Sequence


# The error types and their text live below the command line (the library raises them);
# re-exported here for the tools and for code that imported them from this module.
from dmljax.errors import (USER_ERRORS, ConfigChanged, DmljaxError,  # noqa: F401
                           TrainingDiverged, message)

#: Exit status of a run stopped by SIGTERM after saving its checkpoint (every process saved):
#: not 0, so a scheduler does not take it for a finished run, and not 1 / 2 (errors), so a
#: requeue script can tell it apart (``EX_TEMPFAIL``; see docs/running.md).
EXIT_PREEMPTED = 75


def verbose_requested(argv: Optional[Sequence[str]] = None) -> bool:
  argv = sys.argv if argv is None else argv
  return (os.environ.get("DMLJAX_VERBOSE", "") not in ("", "0")
          or any(a in ("--verbose", "--verbose=true", "--verbose=True") for a in argv))


def report(prog: str, exc: BaseException, argv: Optional[Sequence[str]] = None) -> int:
  """Prints ``exc`` for the user; returns the exit status (2 user error, 1 internal)."""
  if verbose_requested(argv):
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
  if isinstance(exc, USER_ERRORS):
    print(f"{prog}: error: {message(exc)}", file=sys.stderr)
    status = 2
  else:
    print(f"{prog}: internal error ({type(exc).__name__}): {message(exc)}", file=sys.stderr)
    status = 1
  if not verbose_requested(argv):
    print(f"{prog}: (run with --verbose or DMLJAX_VERBOSE=1 for the traceback)", file=sys.stderr)
  sys.stderr.flush()
  return status


def run_main(prog: str, main: Callable[[list], Any], argv: Optional[Sequence[str]] = None) -> int:
  """Calls ``main(argv)`` (default ``sys.argv[1:]``) and turns any error into one message
  (:func:`report`); returns the exit status (0 on success)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    main(argv)
  except Exception as e:  # pylint: disable=broad-except
    return report(prog, e, argv)
  return 0
