"""What a run prints while it runs (process 0 only): phases, progress, evaluations, the end.

* **Phases** (:func:`phase`): a line as each slow part starts (loading the data set, building
  the state, the untrained baseline, compiling, the final evaluation), so the first seconds of a
  run are never silent.
* **Progress** (:class:`Console`): on a terminal a progress bar (tqdm) with the loss, the rate
  and the ETA; in a log file (stdout not a terminal) one plain line per ``log_every_steps``::

      step 40/200 | 12.3 steps/s | loss 0.8123 | ETA 0:00:13

* **Evaluations**: one line each, with the validation metrics, the best so far and the
  framework's events (a CCP projection ending, ...)::

      eval step 40/200 | val MAP@R 0.3863 R-prec 0.5609 P@1 0.8540 | best 0.4182 (step 20) | ccp/projection 1

* **The end**: an early stop is announced with its reason; the last lines say where the results
  are (``final_metrics.json``, ``metrics.jsonl``, the TensorBoard folder, the plots).

``config.progress = False`` silences the progress and evaluation lines (the phases and the end
are still printed).
"""
from __future__ import annotations

import sys
import time
from typing import Any, Optional

_T0 = time.time()


def _primary() -> bool:
  try:
    import jax  # pylint: disable=g-import-not-at-top
    return jax.process_index() == 0
  except Exception:  # pylint: disable=broad-except
    return True


def say(text: str, primary_only: bool = True) -> None:
  """One line on stdout (process 0; any process with ``primary_only=False``)."""
  if not primary_only or _primary():
    print(text, flush=True)


def elapsed() -> float:
  """Seconds since this module was imported (about when the process started)."""
  return time.time() - _T0


def phase(text: str) -> None:
  """A line naming what starts now, with the seconds since the process started."""
  say(f"[{time.time() - _T0:6.1f}s] {text}")


def eta(seconds: float) -> str:
  if not seconds == seconds or seconds == float("inf"):  # NaN / inf
    return "?"
  seconds = int(round(max(0.0, seconds)))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


_NAMES = {"map_at_r": "MAP@R", "r_precision": "R-prec", "precision_at_1": "P@1"}


def format_metrics(metrics: dict[str, Any], prefix: str = "val ") -> str:
  parts = [f"{_NAMES[k]} {metrics[k]:.4f}" for k in _NAMES if k in metrics]
  parts += [f"{k} {v:.4f}" for k, v in sorted(metrics.items())
            if k.startswith("recall_at_") and k != "recall_at_1" and isinstance(v, float)]
  return prefix + " ".join(parts)


class Console:
  """Progress, evaluation and end-of-run lines of one run (see the module docstring)."""

  def __init__(self, total_steps: int, start_step: int, enabled: bool = True,
               stream=None):
    self.total = int(total_steps)
    self.start = int(start_step)
    self.enabled = bool(enabled) and _primary()
    self.stream = stream if stream is not None else sys.stdout
    self.t_start = time.time()
    self.bar = None
    if self.enabled and getattr(self.stream, "isatty", lambda: False)():
      try:
        from tqdm import tqdm  # pylint: disable=g-import-not-at-top
        self.bar = tqdm(total=self.total, initial=self.start, unit="step", dynamic_ncols=True,
                        file=self.stream, leave=True)
      except ImportError:
        self.bar = None

  def remaining(self, step: int) -> float:
    done = step - self.start
    if done <= 0:
      return float("nan")
    return (self.total - step) * (time.time() - self.t_start) / done

  def _write(self, line: str) -> None:
    if self.bar is not None:
      self.bar.write(line, file=self.stream)
    else:
      print(line, file=self.stream, flush=True)

  def train(self, step: int, rate: float, loss: float, extra: str = "") -> None:
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.n = step
      self.bar.set_postfix_str(f"loss {loss:.4f}{' | ' + extra if extra else ''}", refresh=False)
      self.bar.refresh()
      return
    self._write(f"step {step}/{self.total} | {rate:.1f} steps/s | loss {loss:.4f}"
                f"{' | ' + extra if extra else ''} | ETA {eta(self.remaining(step))}")

  def evaluation(self, step: int, metrics: dict, best: float, best_step: int,
                 events: Optional[dict] = None) -> None:
    if not self.enabled:
      return
    ev = " ".join(f"| {k} {v:g}" for k, v in sorted((events or {}).items())
                  if isinstance(v, (int, float)) and v)
    self._write(f"eval step {step}/{self.total} | {format_metrics(metrics)} | best {best:.4f} "
                f"(step {best_step}){' ' + ev if ev else ''}")

  def early_stop(self, step: int, since: int, patience: int, best: float, best_step: int):
    self.close()
    say(f"Early stop at step {step} of {self.total}: validation MAP@R has not improved for "
        f"{since} evaluations (patience_evals={patience}); best {best:.4f} at step {best_step}.")

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None


def results(workdir: str, plots: bool) -> None:
  """The closing lines: where the results of ``workdir`` are."""
  join = (lambda *p: "/".join([workdir.rstrip("/")] + list(p))) if "://" in workdir else None
  if join is None:
    import os  # pylint: disable=g-import-not-at-top
    join = lambda *p: os.path.join(workdir, *p)
  say(f"Results: {join('final_metrics.json')} (the table above), per-step metrics in "
      f"{join('metrics.jsonl')}, TensorBoard: tensorboard --logdir {join('tensorboard')}"
      + (f", plots in {join('plots')}" if plots else "") + ".")
