"""Orbax checkpoints: periodic, best, final and on SIGTERM; keep-N retention; auto-resume.

One checkpoint step holds two items written together, so they can never disagree:

* ``state``: the whole :class:`dmljax.state.TrainState` (as a flax state dict of arrays);
* ``host``: a small JSON dict of host-side facts (sampler state, "done" flag, config hash...).

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
(even by SIGKILL) in the middle of a save leaves the previous checkpoint intact; unfinished
temporary directories are ignored on restore. Saving is synchronous: the tiny models here save
in well under a second, and a synchronous save means "saved" is true when ``save`` returns.

The best parameters (by validation MAP@R) are part of the train state (``state.best``); with
``save_best`` they are also written to ``workdir/best`` (params and batch statistics only, latest
best kept) for use outside training.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any, Optional

import flax
import jax
import orbax.checkpoint as ocp


class PreemptionFlag:
  """Sets a flag on SIGTERM (and SIGINT if asked) so the train loop can save and exit cleanly.

  The handler does no work itself (signal handlers must be quick and may run at any point in the
  loop); the loop polls :attr:`is_set` between steps. Previous handlers are restored by
  :meth:`uninstall`.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self._event = threading.Event()
    self._signals = tuple(signals)
    self._previous = {}
    self.received: Optional[int] = None

  def install(self) -> "PreemptionFlag":
    if threading.current_thread() is not threading.main_thread():
      return self  # signal handlers can only be set from the main thread
    for s in self._signals:
      self._previous[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signum
    self._event.set()

  def uninstall(self) -> None:
    for s, h in self._previous.items():
      signal.signal(s, h)
    self._previous = {}

  @property
  def is_set(self) -> bool:
    return self._event.is_set()


class Checkpointer:
  """Wraps one Orbax ``CheckpointManager`` for the train state (+ one for the best params).

  Args:
    workdir: run directory; checkpoints go to ``workdir/checkpoints`` and ``workdir/best``.
    max_to_keep: keep-N retention of the regular checkpoints.
    save_best: also write the best params to ``workdir/best``.
  """

  def __init__(self, workdir: str, *, max_to_keep: int = 3, save_best: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                        enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=opts,
                                         item_names=("state", "host"))
    self.best_manager = None
    if save_best:
      best_opts = ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                               enable_async_checkpointing=False)
      self.best_manager = ocp.CheckpointManager(
          os.path.abspath(os.path.join(workdir, "best")), options=best_opts)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, host: dict[str, Any], *, force: bool = True) -> None:
    """Writes ``state`` and ``host`` as checkpoint ``step`` (replacing an existing one)."""
    if step in self.manager.all_steps():
      return  # already saved at this step (e.g. final right after periodic): same content
    state_dict = flax.serialization.to_state_dict(state)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state_dict), host=ocp.args.JsonSave(host)), force=force)
    self.manager.wait_until_finished()

  def save_best(self, step: int, params, batch_stats) -> None:
    if self.best_manager is None or step in self.best_manager.all_steps():
      return
    self.best_manager.save(step, args=ocp.args.StandardSave(
        {"params": params, "batch_stats": batch_stats}), force=True)
    self.best_manager.wait_until_finished()

  def restore(self, target_state, step: Optional[int] = None):
    """Restores ``(state, host)`` from ``step`` (default: latest) into ``target_state``'s structure.

    ``target_state`` supplies the tree structure, shapes, dtypes and shardings (a freshly
    initialised state); returns ``None`` when no checkpoint exists.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    target = flax.serialization.to_state_dict(target_state)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), host=ocp.args.JsonRestore()))
    state = flax.serialization.from_state_dict(target_state, restored["state"])
    return state, dict(restored["host"])

  def close(self) -> None:
    self.manager.close()
    if self.best_manager is not None:
      self.best_manager.close()
