"""Orbax checkpoints: periodic, best, final and on SIGTERM; keep-N retention; auto-resume.

One checkpoint step holds two items written together, so they can never disagree:

* ``state``: the whole :class:`dmljax.state.TrainState` (as a flax state dict of arrays);
* ``host``: a small JSON dict of host-side facts (sampler state, "done" flag, config hash...).

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
(even by SIGKILL) in the middle of a save leaves the previous checkpoint intact; unfinished
temporary directories are ignored on restore.

Saving is asynchronous by default (Orbax's async path): :meth:`Checkpointer.save` returns once
the arrays are copied to host memory (by the checkpointer itself, into numpy arrays, on a single
process: see :func:`_host_copy`), and the files are written and committed (the rename above)
by a background thread while training goes on. At most one save is in flight: the next save, a
restore, :meth:`Checkpointer.wait_until_finished` and :meth:`Checkpointer.close` wait for it, so
a preemption save (``wait=True``) and the final save are on disk before the process exits. A
save that failed in the background raises at the next of those calls. With several processes,
Orbax's commit waits for every process's files before the rename, as the synchronous save did.
``async_save=False`` writes synchronously.

A finished step can still be damaged afterwards (a truncated file after a full disk, a file lost
in a copy). :meth:`Checkpointer.restore` without an explicit step then falls back to the newest
step that restores, moves each newer, unreadable step out of Orbax's directory to
``workdir/checkpoints_corrupt/<step>-<timestamp>/`` (kept for inspection, never deleted; Orbax no
longer sees it, so the run can save that step number again) and says so in a warning and on
stderr. When no step restores, it raises :class:`CheckpointError` and moves nothing: a run never
starts over silently on top of checkpoints it could not read.

The best parameters (by validation MAP@R) are part of the train state (``state.best``); with
``save_best`` they are also written to ``workdir/best`` (params and batch statistics only, latest
best kept) for use outside training.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from typing import Any, Optional

from absl import logging
import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

CORRUPT_DIRNAME = "checkpoints_corrupt"


class CheckpointError(ValueError):
  """A checkpoint exists but cannot be restored (damaged files, or a target that does not fit)."""


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
    workdir: run directory; checkpoints go to ``workdir/checkpoints`` and ``workdir/best``;
      unreadable steps found by :meth:`restore` are moved to ``workdir/checkpoints_corrupt``.
    max_to_keep: keep-N retention of the regular checkpoints.
    save_best: also write the best params to ``workdir/best``.
    async_save: write in a background thread (see the module docstring).

  Attributes:
    blocked_seconds: time the caller spent inside :meth:`save` and :meth:`save_best` (the
      device-to-host copy, plus waiting for a previous save still in flight).
  """

  def __init__(self, workdir: str, *, max_to_keep: int = 3, save_best: bool = True,
               async_save: bool = True):
    self.directory = _abspath(workdir, "checkpoints")
    self.corrupt_directory = _abspath(workdir, CORRUPT_DIRNAME)
    self.async_save = bool(async_save)
    opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                        enable_async_checkpointing=self.async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=opts,
                                         item_names=("state", "host"))
    self.best_manager = None
    if save_best:
      best_opts = ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                               enable_async_checkpointing=self.async_save)
      self.best_manager = ocp.CheckpointManager(
          _abspath(workdir, "best"), options=best_opts)
    # Steps saved or in flight (an async step joins Orbax's list only once committed).
    self._saved = set(self.manager.all_steps())
    self._best_saved = set(self.best_manager.all_steps()) if self.best_manager else set()
    self._unconfirmed: set[int] = set()  # steps handed to Orbax and not yet known committed
    self.blocked_seconds = 0.0

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, host: dict[str, Any], *, force: bool = True,
           wait: bool = False) -> None:
    """Writes ``state`` and ``host`` as checkpoint ``step`` (kept as is if it already exists).

    ``host`` is any JSON-serialisable dict (nested dicts, lists, strings, numbers, bools, None);
    :meth:`restore` gives it back equal (tuples come back as lists, as in ``json``). Returns once
    the arrays are in host memory (the caller may then donate or change ``state``); ``wait``:
    once the step is committed on disk.
    """
    t0 = time.perf_counter()
    if self._unconfirmed:
      # Orbax waits for the previous save before starting the next one anyway; waiting here
      # first tells a failed earlier step apart from this one (OSError naming it, see below).
      try:
        self._wait_main()
      finally:
        self.blocked_seconds += time.perf_counter() - t0
      t0 = time.perf_counter()
    try:
      if step not in self._saved and step not in self.manager.all_steps():
        # (already saved at this step, e.g. final right after periodic: same content)
        state_dict = flax.serialization.to_state_dict(state)
        if self.async_save:
          state_dict = _host_copy(state_dict)
        self._unconfirmed.add(step)
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state_dict), host=ocp.args.JsonSave(host)), force=force)
        self._saved.add(step)
      if wait or not self.async_save:
        self.manager.wait_until_finished()
        self._unconfirmed.clear()
    except Exception as e:  # pylint: disable=broad-except
      # A synchronous failure, or one of a background save before it (Orbax raises it here).
      raise self._failed_save(e) from e
    finally:
      self.blocked_seconds += time.perf_counter() - t0

  def _failed_save(self, error: Exception) -> OSError:
    """Removes the unfinished temporary folders of the steps not yet committed (a full disk, a
    read-only or vanished file system; with async saves, every step still in flight when the
    error came out) and returns the one-line error to raise: what failed, the step to resume
    from."""
    steps = sorted(self._unconfirmed)
    self._unconfirmed.clear()
    self._saved -= set(steps)
    removed = []
    if jax.process_index() == 0:
      try:
        for s in steps:
          for p in epath.Path(self.directory).glob(f"{s}.orbax-checkpoint-tmp*"):
            if p.is_dir():
              p.rmtree()
            else:
              p.unlink()
            removed.append(p.name)
      except Exception:  # pylint: disable=broad-except
        pass  # the file system is gone: nothing more to clean
    try:
      self.manager.reload()  # the manager caches its step list
      last = self.manager.latest_step()
    except Exception:  # pylint: disable=broad-except
      last = None
    resume = (f"run again to resume from step {last}" if last is not None else
              "run again to start over")
    which = ("step " + ", ".join(map(str, steps)) if steps else "a step")
    return OSError(f"cannot write checkpoint {which} in {self.directory} "
                   f"({_describe(error)}); is the disk full or read-only? Free space or fix the "
                   f"permissions, then {resume}"
                   + (" (its temporary folder was removed)" if removed else ""))

  def save_best(self, step: int, params, batch_stats, *, wait: bool = False) -> None:
    if self.best_manager is None or step in self._best_saved:
      return
    t0 = time.perf_counter()
    tree = {"params": params, "batch_stats": batch_stats}
    self.best_manager.save(step, args=ocp.args.StandardSave(
        _host_copy(tree) if self.async_save else tree), force=True)
    self._best_saved.add(step)
    if wait or not self.async_save:
      self.best_manager.wait_until_finished()
    self.blocked_seconds += time.perf_counter() - t0

  def wait_until_finished(self) -> None:
    """Blocks until every save in flight is committed.

    Raises:
      OSError: a background save failed (its temporary folder removed; see :meth:`save`).
    """
    self._wait_main()
    if self.best_manager is not None:
      self.best_manager.wait_until_finished()

  def _wait_main(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed_save(e) from e
    self._unconfirmed.clear()

  def restore(self, target_state, step: Optional[int] = None):
    """Restores ``(state, host)`` from ``step`` (default: latest) into ``target_state``'s structure.

    ``target_state`` supplies the tree structure, shapes, dtypes and shardings (a freshly
    initialised state); returns ``None`` when no checkpoint exists.

    With ``step=None`` the steps are tried newest first. If the newest fails (truncated host JSON,
    damaged or missing array files, a missing item) but an older one restores into the same
    target, the newer failed steps are damaged: each is moved to
    ``workdir/checkpoints_corrupt/<step>-<timestamp>/`` (with a ``REASON.txt``), reported by
    ``logging.warning`` and on stderr (step, reason, step restored instead), and the older step's
    ``(state, host)`` is returned. If no step restores, nothing is moved (the failures may come
    from the target rather than the files) and :class:`CheckpointError` lists every step's
    error; the run stops instead of starting over. A step set aside is never deleted: if it
    was set aside by mistake (say, a passing I/O error), moving it back restores it. Single host:
    only process 0 moves files.

    An explicit ``step`` never falls back: any failure raises :class:`CheckpointError`.

    Raises:
      CheckpointError: the asked-for step, or every step, cannot be restored.
    """
    self.wait_until_finished()
    if step is not None:
      try:
        return self._restore_step(target_state, step)
      except Exception as e:  # pylint: disable=broad-except
        raise CheckpointError(
            f"Checkpoint step {step} in {self.directory} cannot be restored "
            f"({_describe(e)}); available steps: {self.manager.all_steps()}.") from e
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      return None
    failed: list[tuple[int, Exception]] = []
    for s in steps:
      try:
        restored = self._restore_step(target_state, s)
      except Exception as e:  # pylint: disable=broad-except
        failed.append((s, e))
        continue
      for bad, err in failed:
        self._set_aside(bad, err, restored_step=s)
      if failed:
        self.manager.reload()  # the manager caches its step list
        self._saved = set(self.manager.all_steps())
      return restored
    details = "; ".join(f"step {s}: {_describe(e)}" for s, e in failed)
    raise CheckpointError(
        f"No checkpoint in {self.directory} can be restored ({details}). Nothing was moved or "
        f"deleted. If the files are damaged, move the step directories away (or delete them) "
        f"to start over; if the model or config changed, use a new workdir.") from failed[0][1]

  def _restore_step(self, target_state, step: int):
    target = flax.serialization.to_state_dict(target_state)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), host=ocp.args.JsonRestore()))
    if not isinstance(restored["host"], dict):
      raise CheckpointError(f"host item of step {step} is {type(restored['host']).__name__}, "
                            f"not a JSON object")
    state = flax.serialization.from_state_dict(target_state, restored["state"])
    return state, dict(restored["host"])

  def _set_aside(self, step: int, error: Exception, *, restored_step: int) -> str:
    """Moves damaged ``step`` out of the managed directory; returns where it went."""
    src = str(ocp.step.find_step_path(self.directory, ocp.step.standard_name_format(),
                                      step=step))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    corrupt = epath.Path(self.corrupt_directory)
    dst = corrupt / f"{step}-{stamp}"
    n = 1
    while dst.exists():
      n += 1
      dst = corrupt / f"{step}-{stamp}-{n}"
    if jax.process_index() == 0:
      corrupt.mkdir(parents=True, exist_ok=True)
      if "://" in self.directory:
        epath.Path(src).rename(dst)
      else:
        shutil.move(src, str(dst))
      (dst / "REASON.txt").write_text(f"{_describe(error)}\n")
    dst = str(dst)
    msg = (f"Checkpoint step {step} in {self.directory} is corrupt ({_describe(error)}); "
           f"moved it to {dst} and restored step {restored_step} instead.")
    logging.warning("%s", msg)
    print(f"WARNING: {msg}", file=sys.stderr, flush=True)
    return dst

  def close(self) -> None:
    """Waits for the saves in flight, then releases the managers."""
    try:
      self.wait_until_finished()
    finally:
      self.manager.close()
      if self.best_manager is not None:
        self.best_manager.close()


def _host_copy(tree):
  """``tree`` copied into host (numpy) memory when every array is on this one process, else as
  it is.

  An asynchronous save then hands Orbax numpy arrays: Orbax's per-array work on ``jax.Array``
  leaves (replica-slice planning, sharding metadata), which ran on the caller's thread at about
  1-2 ms per array on the 2-core CPU (2,100 arrays in the CCP paper state), is skipped, and the
  loop waits only for the copy itself. The copies are fresh buffers, so the next (donating) train
  step cannot change what is written. Restoring is unchanged (into the target's ``jax.Array``
  shardings). With several processes the arrays go to Orbax as they are (its multi-host path).
  """
  leaves = jax.tree.leaves(tree)
  if jax.process_count() > 1 or not all(
      not isinstance(x, jax.Array) or x.is_fully_addressable for x in leaves):
    return tree
  for x in leaves:
    if isinstance(x, jax.Array):
      x.copy_to_host_async()  # every transfer started before the first is waited for
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _abspath(workdir: str, name: str) -> str:
  """``workdir/name``, absolute for a local workdir; a bucket path (``gs://...``) as it is."""
  if "://" in str(workdir):
    return f"{str(workdir).rstrip('/')}/{name}"
  return os.path.abspath(os.path.join(workdir, name))


def _describe(e: BaseException, limit: int = 300) -> str:
  text = " ".join(str(e).split())
  if len(text) > limit:
    text = text[:limit] + "..."
  return f"{type(e).__name__}: {text}"
