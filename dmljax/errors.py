"""dmljax's user-facing error types and their one-line text.

The library raises these; the command-line tools (:mod:`dmljax.cli`, which re-exports them) print
them. Keeping them here, below every command line, lets the trainer and the protocol raise them
without importing a command-line module.
"""
from __future__ import annotations


class DmljaxError(Exception):
  """Base of dmljax's own user-facing errors (the message says what is wrong and the fix)."""


class TrainingDiverged(DmljaxError, RuntimeError):
  """Too many consecutive non-finite losses or gradients (see ``config.max_consecutive_nonfinite``)."""


class ConfigChanged(DmljaxError, ValueError):
  """A resumed run's config differs from the checkpoint's in a way that breaks exact resumption."""


#: Error types whose message is meant for the user as it is.
USER_ERRORS = (DmljaxError, ValueError, OSError, KeyError)


def message(exc: BaseException) -> str:
  """The one-line text for ``exc`` (KeyError's repr quoting removed, also when wrapped)."""
  while exc.args and isinstance(exc.args[0], BaseException):
    exc = exc.args[0]  # ml_collections wraps a KeyError in an AttributeError
  text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
  return " ".join(str(text).split())


def diverged_message(config, checkpointer, what: str, more: str = "") -> str:
  """The divergence message: what happened, the last good checkpoint, the likely cause."""
  last_good = checkpointer.latest_step() if checkpointer is not None else None
  where = (f"the last good checkpoint is step {last_good} in {checkpointer.directory} (running "
           "the same command again resumes from it)" if last_good is not None else
           "no checkpoint was written yet")
  causes = [f"a learning rate too high (optim.learning_rate={config.optim.learning_rate})"]
  if not config.optim.grad_clip_norm:
    causes.append("no gradient clipping (optim.grad_clip_norm=0)")
  return (f"training diverged: {what}; {where}. Likely cause: {' or '.join(causes)}; lower the "
          f"learning rate or clip gradients{more}.")
