"""Host input pipeline: record decoding + augmentation in worker processes, built on grain.

Sources. A split's images are either
  (a) a numpy array ``[N, H, W, C]`` (the embedded data sets): with transform kind "none" a batch is
      plain indexing in the calling process (no workers, no copy beyond the gather); or
  (b) a random-access record source (``__len__``, ``__getitem__(i) -> dict`` with ``image``: the
      encoded file bytes, and ``bbox``: float32 ``[x1, y1, x2, y2]``), picklable, so that worker
      processes can read it.

Training (:class:`BatchLoader`). Step ``s``'s batch is a pure function of ``(seed, s)``: its record
indices come from ``batch_indices_fn(s)`` (the sampler's slice for this process) and image ``j``
of the global batch draws its augmentation from ``transforms.augment_rng(seed, s, j)``. Hence the
batches do not depend on the number of workers, and a loader started (or restored) at step ``k``
yields exactly what an uninterrupted one yields from step ``k`` on.

How grain is used: the steps are a ``grain.MapDataset.range(start_step, stop)`` mapped by a
picklable step -> batch function (decode + augment the batch's images, stack them), converted with
``to_iter_dataset`` (no reader threads) and prefetched by ``mp_prefetch`` in ``num_workers`` spawned
processes: worker ``w`` computes steps ``start + w, start + w + W, ...`` and grain interleaves them
back in step order; each worker keeps ``ceil(prefetch / num_workers)`` finished batches buffered.
A worker reads a batch's records in one batched read and writes each transformed image straight
into a batch array allocated in grain's shared memory, which grain hands to the main process by
name: the main process maps it and yields a plain view of it, without copying (the block is freed
with the last array viewing it). Batches that depend on the train state once per *hold* (PROFS
with hard negative class mining) are computed ahead too: the loop publishes each hold's value on a
:class:`HoldBoard` and the workers' :class:`HoldIndices` wait for it. The loader's checkpoint state is only
the next step (plus the seed, as a check), not grain's per-worker state: it is JSON-able,
independent of ``num_workers``, and :meth:`BatchLoader.set_state` rebuilds the grain pipeline at
that step (lazily, on the next batch).

Evaluation (:func:`eval_batches`): the split in order, in fixed-size global batches; the last one
is padded by repeating its first index and comes with the number of valid rows.
"""
import atexit
import concurrent.futures
import math
import os
import threading
import time
import weakref

import numpy as np

from dmljax.data import transforms
from dmljax.data.transforms import TransformConfig

__all__ = ["BatchLoader", "EvalBatches", "eval_batches", "load_batch", "as_transform_config"]

_FOREVER = 1 << 62  # stop of the step range of an endless loader


def as_transform_config(cfg):
  """A :class:`TransformConfig` from a config, a mapping (``from_dict``) or None ("none")."""
  if cfg is None:
    return TransformConfig(kind="none")
  if isinstance(cfg, TransformConfig):
    return cfg
  if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict
    cfg = cfg.to_dict()
  return TransformConfig.from_dict(cfg)


def _is_array_source(source):
  return isinstance(source, np.ndarray)


def _check_source(source, cfg):
  if _is_array_source(source):
    if source.ndim not in (3, 4):
      raise ValueError(f"array sources must be [N, H, W] or [N, H, W, C], got {source.shape}.")
    if cfg.kind != "none" and source.dtype != np.uint8:
      raise ValueError(f"transform kind {cfg.kind!r} needs uint8 images, got {source.dtype}.")
    if cfg.crop_to_bbox:
      raise ValueError("crop_to_bbox needs a record source with bounding boxes, not an array.")
  elif not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
    raise ValueError(f"source must be a numpy array or a random-access record source with "
                     f"__len__ and __getitem__, got {type(source).__name__}.")


def _read_records(source, indices):
  """The records ``indices`` of a record source: one batched read (``__getitems__``, e.g. one
  array_record read for the whole batch) where the source has one, else one read per record."""
  getitems = getattr(source, "__getitems__", None)
  if getitems is not None:
    records = getitems([int(i) for i in indices])
    if len(records) != len(indices):
      raise RuntimeError(f"the source returned {len(records)} records for {len(indices)} indices.")
    return records
  return [source[int(i)] for i in indices]


def _load_range(records, cfg, seed, step, first_slot, lo, hi, out):
  """Transforms ``records[lo:hi]`` into ``out[lo:hi]`` (a list, or an array written in place)."""
  for j in range(lo, hi):
    rng = transforms.augment_rng(seed, step, first_slot + j) if cfg.kind == "train" else None
    out[j] = transforms.transform_record(records[j], cfg, rng)


def _new_array(shape, dtype, shared):
  """An output array: in grain's shared memory (``shared``: a worker hands it to the main process
  without copying it), else an ordinary one."""
  if shared:
    from grain._src.python.ipc import shared_memory_array  # pylint: disable=g-import-not-at-top
    return shared_memory_array.SharedMemoryArray(shape, dtype)
  return np.empty(shape, dtype)


def load_batch(source, cfg, indices, *, seed=0, step=0, first_slot=0, executor=None,
               num_threads=1, shared_output=False):
  """Decodes and transforms the records ``indices`` of ``source``: one batch, computed here.

  The records are read in one batched read where the source has ``__getitems__``
  (:class:`dmljax.data.records.RecordSplit`: one array_record read), and each transformed image is
  written straight into the batch array (no stacking copy).

  Args:
    source: a numpy array or a record source (see the module docstring).
    cfg: a :class:`TransformConfig`.
    indices: [B] record indices.
    seed: the augmentation seed.
    step: the step whose randomness to use.
    first_slot: position of ``indices[0]`` in the global batch of ``step`` (image ``j`` uses
      ``augment_rng(seed, step, first_slot + j)``).
    executor: optional ``concurrent.futures`` thread pool to spread the images over (the JPEG
      decode and PIL's resampling release the GIL); with ``num_threads`` contiguous chunks.
    num_threads: number of chunks for ``executor``.
    shared_output: allocate the batch in grain's shared memory (in a worker process: the main
      process then maps it instead of receiving a copy).

  Returns:
    ``uint8 [B, size, size, C]`` for "train"/"eval"; for "none" the stacked images as stored (an
    array source's dtype is kept) or as decoded (all must have the same shape).
  """
  indices = np.asarray(indices, np.int64).reshape(-1)
  if _is_array_source(source) and cfg.kind == "none":
    return source[indices]
  count = len(indices)
  if count == 0:
    return np.zeros((0, cfg.size, cfg.size, 3), np.uint8)
  records = ([source[int(i)] for i in indices] if _is_array_source(source)
             else _read_records(source, indices))
  if cfg.kind == "none":  # sizes unknown before decoding: a list, then stacked
    images = [None] * count
    _spread(records, cfg, seed, step, first_slot, 0, count, images, executor, num_threads)
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
      raise ValueError(f"images of a batch differ in shape ({sorted(shapes)[:3]}...); use "
                       "transform kind 'train' or 'eval' to bring records to a common size.")
    return np.stack(images)
  # The first image gives the output's shape; every image is then written into the batch array.
  first = [None]
  _load_range(records, cfg, seed, step, first_slot, 0, 1, first)
  images = _new_array((count,) + first[0].shape, first[0].dtype, shared_output)
  images[0] = first[0]
  _spread(records, cfg, seed, step, first_slot, 1, count, images, executor, num_threads)
  return images


def _spread(records, cfg, seed, step, first_slot, lo, hi, out, executor, num_threads):
  """:func:`_load_range` over ``lo:hi``, in ``num_threads`` contiguous chunks on ``executor``."""
  if executor is not None and num_threads > 1 and hi - lo > 1:
    bounds = np.linspace(lo, hi, min(num_threads, hi - lo) + 1).astype(int)
    futures = [executor.submit(_load_range, records, cfg, seed, step, first_slot, a, b, out)
               for a, b in zip(bounds[:-1], bounds[1:])]
    for f in futures:
      f.result()
  else:
    _load_range(records, cfg, seed, step, first_slot, lo, hi, out)


class _StepBatch:
  """Picklable step -> ``(step, images, indices)``: what every grain worker runs."""

  def __init__(self, source, cfg, seed, batch_indices_fn, process_index, shared_output=False):
    self.source, self.cfg, self.seed = source, cfg, seed
    self.batch_indices_fn, self.process_index = batch_indices_fn, process_index
    self.shared_output = shared_output

  def in_workers(self, generation=0):
    """This function as the grain workers run it: output in shared memory; hold-dependent
    indices (:class:`HoldIndices`) tied to the loader's current ``generation``."""
    fn = self.batch_indices_fn
    if isinstance(fn, HoldIndices):
      fn = fn.with_generation(generation)
    return _StepBatch(self.source, self.cfg, self.seed, fn, self.process_index,
                      shared_output=True)

  def __call__(self, step):
    step = int(step)
    indices = np.asarray(self.batch_indices_fn(step), np.int64).reshape(-1)
    images = load_batch(self.source, self.cfg, indices, seed=self.seed, step=step,
                        first_slot=self.process_index * len(indices),
                        shared_output=self.shared_output)
    return np.int64(step), images, indices


class HoldClosed(RuntimeError):
  """The loader stopped while a worker waited for a hold's value (the worker ends there)."""


_BOARD_PREFIX = "dmljax-holds-"


def _board_dir():
  """A folder for :class:`HoldBoard` files: shared memory (``/dev/shm``) where there is one.

  Its name carries the creating process's pid (``dmljax-holds-<pid>-<random>``). A run killed
  with SIGKILL cannot remove its folder, so the folders of processes that no longer exist are
  removed here, when the next board is made (a folder whose pid is alive, or of another user, is
  left alone)."""
  import tempfile  # pylint: disable=g-import-not-at-top
  shm = "/dev/shm"
  base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()
  remove_stale_boards(base)
  return tempfile.mkdtemp(prefix=f"{_BOARD_PREFIX}{os.getpid()}-", dir=base)


def remove_stale_boards(base: str) -> list[str]:
  """Removes the :class:`HoldBoard` folders in ``base`` whose creating process has ended;
  returns their paths."""
  import shutil  # pylint: disable=g-import-not-at-top
  removed = []
  try:
    names = os.listdir(base)
  except OSError:
    return removed
  for name in names:
    pid = name[len(_BOARD_PREFIX):].split("-", 1)[0]
    if not name.startswith(_BOARD_PREFIX) or not pid.isdigit() or int(pid) == os.getpid():
      continue
    try:
      os.kill(int(pid), 0)
    except ProcessLookupError:  # the process is gone: its board is stale
      path = os.path.join(base, name)
      shutil.rmtree(path, ignore_errors=True)
      removed.append(path)
    except (PermissionError, OverflowError):  # alive under another user / not a pid
      pass
  return removed


class HoldBoard:
  """Values the training loop publishes once per *hold* (a run of steps whose batches depend on
  the train state only through that value), read by the loader's worker processes.

  PROFS with hard negative class mining draws the classes of every batch of hold ``k`` from a
  neighbour table the train state holds at the start of hold ``k`` and that changes only at the
  end of a hold. The loop reads it once per hold (:meth:`publish`); the workers, which compute
  steps ahead, wait in :meth:`read` until the table of their step's hold is there, so every batch
  of a hold after its first is decoded ahead, as for any step-determined batch. Values are small
  ``.npy`` files in a folder (in ``/dev/shm`` where it exists); only the folder's path is pickled.
  """

  _NONE = np.zeros((0,), np.int32)  # how None is stored

  def __init__(self):
    self.directory = _board_dir()

  def _path(self, hold):
    return os.path.join(self.directory, f"hold-{int(hold)}.npy")

  def _stop_path(self, generation):
    return os.path.join(self.directory, f"stop-{int(generation)}")

  def publish(self, hold, value):
    """Publishes ``value`` (an int array, or None) for ``hold``; the first value of a hold stays.
    Values of holds older than ``hold - 1`` are removed."""
    path = self._path(hold)
    if os.path.exists(path):
      return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
      np.save(f, self._NONE if value is None else np.asarray(value))
    os.replace(tmp, path)  # atomic: a reader sees the whole file or none
    old = self._path(int(hold) - 2)
    if os.path.exists(old):
      os.remove(old)

  def read(self, hold, generation=0):
    """The value of ``hold`` (None if None was published), waiting until it is published.

    Raises:
      HoldClosed: the loader stopped this ``generation`` of workers meanwhile.
    """
    path, delay = self._path(hold), 1e-4
    while True:
      try:
        with open(path, "rb") as f:
          value = np.load(f)
        return None if value.size == 0 else value
      except FileNotFoundError:
        if os.path.exists(self._stop_path(generation)) or not os.path.isdir(self.directory):
          raise HoldClosed(f"the loader stopped while waiting for hold {hold}.") from None
        time.sleep(delay)
        delay = min(2 * delay, 5e-3)

  def stop(self, generation):
    """Releases the workers of ``generation`` that wait in :meth:`read`."""
    if os.path.isdir(self.directory):
      open(self._stop_path(generation), "w").close()

  def close(self):
    """Removes the folder (also releases every waiting worker)."""
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(self.directory, ignore_errors=True)


class HoldIndices:
  """Picklable ``step -> indices`` for batches that depend on a per-hold value: ``fn(step,
  board.read(step // hold_steps))``. The training loop publishes each hold's value on ``board``
  (before it asks the loader for that hold's first batch); the workers wait for it."""

  def __init__(self, fn, board, hold_steps, generation=0):
    if int(hold_steps) < 1:
      raise ValueError(f"hold_steps must be >= 1, got {hold_steps}.")
    self.fn, self.board, self.hold_steps = fn, board, int(hold_steps)
    self.generation = int(generation)
    self._last = (None, None)  # (hold, value) read last, in this process

  def with_generation(self, generation):
    return HoldIndices(self.fn, self.board, self.hold_steps, generation)

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_last"] = (None, None)
    return state

  def __call__(self, step):
    hold = int(step) // self.hold_steps
    if self._last[0] != hold:
      self._last = (hold, self.board.read(hold, self.generation))
    return self.fn(int(step), self._last[1])


# Holders with a live grain iterator, closed by an exit hook that runs before multiprocessing's
# own (atexit is last-in first-out and the hook is registered after grain imports multiprocessing):
# an orderly close instead of grain's finalisers racing its prefetch threads at shutdown.
_OPEN = {}
_EXIT_HOOK = []


def _close_open_at_exit():
  for holder in list(_OPEN.values()):
    _close_all(holder, True)


def _grain_iterator(items, fn, num_workers, prefetch, holder):
  """Puts in ``holder`` a grain iterator of ``fn(item)`` over the MapDataset ``items``, computed
  in ``num_workers`` processes; returns it."""
  import grain  # pylint: disable=g-import-not-at-top  (heavy-ish: only where workers are used)
  if not _EXIT_HOOK:
    atexit.register(_close_open_at_exit)
    _EXIT_HOOK.append(True)
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():  # grain reads its absl flags; outside absl.app: the defaults
    flags.FLAGS.mark_as_parsed()
  ds = items.map(fn).to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  if num_workers > 0:
    per_worker = max(1, math.ceil(max(1, prefetch) / num_workers))
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=per_worker))
  holder["iterator"] = iter(ds)
  _OPEN[id(holder)] = holder
  return holder["iterator"]


def _own_arrays(element):
  """A worker's output as plain numpy arrays, without copying: grain hands the batch over in a
  shared-memory block that the main process maps (the worker wrote the batch there directly), and
  the block is unlinked when the last array viewing it is garbage-collected. A plain ``ndarray``
  view keeps that block alive as its base, so the caller may keep the batch as long as it likes
  (e.g. in a device transfer that reads it asynchronously)."""
  return tuple(x.view(np.ndarray) if isinstance(x, np.ndarray) and type(x) is not np.ndarray
               else x for x in element)


def _close_grain(iterator):
  """Closes a grain iterator, stopping its worker processes in parallel.

  grain's ``close()`` stops an ``mp_prefetch`` pipeline's workers one after the other, each taking
  a fraction of a second (finish the element in hand, exit the interpreter). The interleaved
  per-worker branches are independent, so they are closed concurrently first (each in grain's own
  order: its reader thread, then its process); the final ``close()`` then finds them closed. If
  grain's layout is not the expected one, this is a plain ``close()``.
  """
  branches = getattr(iterator, "_iterators_in_use", None)
  if isinstance(branches, list) and len(branches) > 1:
    threads = [threading.Thread(target=b.close, name="dmljax-close") for b in branches
               if hasattr(b, "close")]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  iterator.close()


def _close_all(holder, final=False):
  """Finaliser: closes what a loader holds (a grain iterator, a thread pool; with ``final``, its
  :class:`HoldBoard`). Workers waiting on the board for a hold are released first."""
  _OPEN.pop(id(holder), None)
  it, pool = holder.pop("iterator", None), holder.pop("pool", None)
  board = holder.get("board")
  if it is not None:
    if board is not None:
      board.stop(holder["generation"])
      holder["generation"] += 1
    _close_grain(it)
  if pool is not None:
    pool.shutdown(wait=True, cancel_futures=True)
  if final and board is not None:
    holder.pop("board").close()


def _check_workers(num_workers, prefetch):
  if int(num_workers) != num_workers or num_workers < 0:
    raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}.")
  if int(prefetch) != prefetch or prefetch < 0:
    raise ValueError(f"prefetch must be a non-negative integer, got {prefetch!r}.")
  return int(num_workers), int(prefetch)


class BatchLoader:
  """Training batches ``(step, images, indices)`` for ``step = start_step, start_step + 1, ...``.

  Args:
    source: a numpy array ``[N, H, W, C]`` or a picklable record source.
    transform_cfg: a :class:`TransformConfig` (or a mapping of its options).
    seed: augmentation seed (a non-negative integer).
    batch_indices_fn: ``step -> int64 [B_local]``, a pure, picklable function giving this
      process's record indices (e.g. ``functools.partial(sampler.batch, process_index=i,
      process_count=n)``).
    start_step: first step to yield.
    num_workers: worker processes decoding/augmenting (0: in this process, synchronously).
    prefetch: batches computed ahead of the consumer (with workers).
    process_index, process_count: this process among the training processes; image ``j`` of
      this process's slice is slot ``process_index * B_local + j`` of the global batch, so the
      augmentation of an image does not depend on how the batch is split over processes.
    num_steps: optional number of steps to yield (default: endless).

  Yields:
    ``(step, images uint8 [B_local, S, S, C], indices int64 [B_local])``.

  Close it (``close()`` or a ``with`` block) to stop the worker processes; an unclosed loader is
  closed when garbage-collected.
  """

  def __init__(self, source, transform_cfg, seed, batch_indices_fn, start_step=0, num_workers=0,
               prefetch=2, process_index=0, process_count=1, num_steps=None):
    self.cfg = as_transform_config(transform_cfg)
    _check_source(source, self.cfg)
    if int(seed) != seed or seed < 0:
      raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    if int(start_step) != start_step or start_step < 0:
      raise ValueError(f"start_step must be a non-negative integer, got {start_step!r}.")
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"need 0 <= process_index < process_count, got {process_index} and "
                       f"{process_count}.")
    self.num_workers, self.prefetch = _check_workers(num_workers, prefetch)
    self.source, self.seed = source, int(seed)
    self.batch_indices_fn = batch_indices_fn
    self.process_index, self.process_count = int(process_index), int(process_count)
    self._stop = _FOREVER if num_steps is None else int(start_step) + int(num_steps)
    self._next_step = int(start_step)
    self._fast = _is_array_source(source) and self.cfg.kind == "none"
    self._fn = _StepBatch(source, self.cfg, self.seed, batch_indices_fn, self.process_index)
    self._holder = {}  # the grain iterator and the thread pool, closed by close() or the finaliser
    if isinstance(batch_indices_fn, HoldIndices):  # the loader owns the board from now on
      self._holder.update(board=batch_indices_fn.board, generation=0)
    self._finalizer = weakref.finalize(self, _close_all, self._holder, True)
    self._iter_start = None  # step at which the current grain iterator started

  # ----------------------------------------------------------------------------- iteration

  def __iter__(self):
    return self

  def __next__(self):
    step = self._next_step
    if step >= self._stop:
      raise StopIteration
    if self._fast or self.num_workers == 0:
      out = self._fn(step)
    else:
      it = self._holder.get("iterator")
      if it is None:
        import grain  # pylint: disable=g-import-not-at-top
        it = _grain_iterator(grain.MapDataset.range(step, self._stop),
                             self._fn.in_workers(self._holder.get("generation", 0)),
                             self.num_workers, self.prefetch, self._holder)
      out = _own_arrays(next(it))
      if int(out[0]) != step:  # cannot happen with grain's in-order interleave; guard anyway
        raise RuntimeError(f"the input pipeline produced step {int(out[0])}, expected {step}.")
    self._next_step = step + 1
    return int(out[0]), out[1], out[2]

  @property
  def next_step(self):
    """The step the next batch will be."""
    return self._next_step

  # ----------------------------------------------------------------------------- state

  def get_state(self):
    """JSON-able state: the next step to yield (and the seed, checked on restore)."""
    return {"next_step": int(self._next_step), "seed": int(self.seed)}

  def set_state(self, state):
    """Continues at ``state["next_step"]``: the following batches are exactly those an
    uninterrupted loader yields from that step (the workers restart there, on the next batch)."""
    if "next_step" not in state:
      raise ValueError(f"BatchLoader state needs `next_step`, got keys {sorted(state)}.")
    if "seed" in state and int(state["seed"]) != self.seed:
      raise ValueError(f"BatchLoader state was saved with seed {state['seed']}, this loader has "
                       f"seed {self.seed}; resume with the same seed.")
    step = int(state["next_step"])
    if step < 0:
      raise ValueError(f"next_step must be >= 0, got {step}.")
    if step != self._next_step:
      _close_all(self._holder)
    self._next_step = step

  # ----------------------------------------------------------------------------- synchronous path

  def load(self, step, indices):
    """The batch of ``step`` for the given record ``indices`` (this process's slice), computed now.

    For frameworks whose indices depend on device state. Same augmentation as the prefetched path
    for the same ``(step, indices)``. The records are read in one batched read here; with
    ``num_workers > 1`` their decoding and transforms are spread over that many threads of this
    process (decoding and resampling release the GIL).
    """
    indices = np.asarray(indices, np.int64).reshape(-1)
    pool = None
    if self.num_workers > 1 and not self._fast:
      pool = self._holder.get("pool")
      if pool is None:
        pool = concurrent.futures.ThreadPoolExecutor(self.num_workers,
                                                     thread_name_prefix="dmljax-load")
        self._holder["pool"] = pool
    return load_batch(self.source, self.cfg, indices, seed=self.seed, step=int(step),
                      first_slot=self.process_index * len(indices), executor=pool,
                      num_threads=self.num_workers)

  # ----------------------------------------------------------------------------- shutdown

  def close(self):
    """Stops the worker processes and threads (idempotent)."""
    _close_all(self._holder, True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class _EvalBatch:
  """Picklable batch number -> ``(images_local, valid_global_count, batch number)``."""

  def __init__(self, source, cfg, batch_size, process_index, process_count, seed):
    self.source, self.cfg, self.batch_size = source, cfg, batch_size
    self.process_index, self.process_count, self.seed = process_index, process_count, seed
    self.num = len(source)
    self.shared_output = False

  def in_workers(self):
    """This function as grain's workers run it: the batch written in shared memory."""
    import copy  # pylint: disable=g-import-not-at-top
    fn = copy.copy(self)
    fn.shared_output = True
    return fn

  def global_indices(self, b):
    """``([batch_size] indices, valid count)`` of global batch ``b``: padded with its first."""
    lo = int(b) * self.batch_size
    hi = min(lo + self.batch_size, self.num)
    indices = np.full(self.batch_size, lo, np.int64)
    indices[:hi - lo] = np.arange(lo, hi)
    return indices, hi - lo

  def __call__(self, b):
    indices, valid = self.global_indices(b)
    per = self.batch_size // self.process_count
    local = indices[self.process_index * per:(self.process_index + 1) * per]
    images = load_batch(self.source, self.cfg, local, seed=self.seed, step=int(b),
                        first_slot=self.process_index * per, shared_output=self.shared_output)
    return images, np.int64(valid), np.int64(b)


class EvalBatches:
  """Iterable over the evaluation batches of a split; see :func:`eval_batches`.

  Each ``iter()`` runs over the whole split again; ``len()`` is the number of global batches.
  With workers and ``persistent=True`` the worker processes outlive a pass: the grain dataset is
  the batch range repeated endlessly, so after a full pass the workers are already preparing the
  first batches of the next one (identical, the eval transform being deterministic) and a later
  evaluation pays neither the spawn nor the shutdown of the workers. A pass abandoned half-way
  restarts the workers at the next ``iter()``. ``close()`` (or a ``with`` block, or garbage
  collection) stops them.
  """

  def __init__(self, source, transform_cfg, batch_size, process_index=0, process_count=1,
               num_workers=0, prefetch=2, seed=0, persistent=True):
    self.cfg = as_transform_config(transform_cfg)
    _check_source(source, self.cfg)
    if int(batch_size) != batch_size or batch_size < 1:
      raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"need 0 <= process_index < process_count, got {process_index} and "
                       f"{process_count}.")
    if batch_size % process_count:
      raise ValueError(f"eval batch size {batch_size} is not divisible by process_count="
                       f"{process_count}; use a multiple of the number of processes.")
    self.num_workers, self.prefetch = _check_workers(num_workers, prefetch)
    self.source, self.batch_size = source, int(batch_size)
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.persistent = bool(persistent)
    self._fn = _EvalBatch(source, self.cfg, self.batch_size, self.process_index,
                          self.process_count, int(seed))
    self._fast = _is_array_source(source) and self.cfg.kind == "none"
    self._holder = {}
    self._finalizer = weakref.finalize(self, _close_all, self._holder)
    self._at_pass_start = False  # whether the live grain iterator's next batch is batch 0

  def __len__(self):
    return -(-len(self.source) // self.batch_size)

  def __iter__(self):
    num = len(self)
    if self._fast or self.num_workers == 0 or num == 0:
      for b in range(num):
        images, valid, _ = self._fn(b)
        yield images, int(valid)
      return
    if not (self.persistent and self._at_pass_start and self._holder.get("iterator")):
      import grain  # pylint: disable=g-import-not-at-top
      _close_all(self._holder)  # an unfinished pass
      batches = grain.MapDataset.range(num)
      if self.persistent:
        batches = batches.repeat()
      _grain_iterator(batches, self._fn.in_workers(), self.num_workers, self.prefetch,
                      self._holder)
    token = id(self._holder["iterator"])
    self._at_pass_start = False
    finished = False
    try:
      # The generator's frame keeps no reference to the grain iterator between batches, so that
      # close() (or the finaliser at exit) really releases the workers of a suspended pass.
      for b in range(num):
        if id(self._holder.get("iterator")) != token:
          raise RuntimeError("the evaluation batches were closed or restarted during a pass.")
        images, valid, got = _own_arrays(next(self._holder["iterator"]))
        if int(got) != b:  # cannot happen with grain's in-order interleave; guard anyway
          raise RuntimeError(f"the input pipeline produced eval batch {int(got)}, expected {b}.")
        # The pipeline stands at the next pass once the last batch is out of it, even if the
        # consumer never asks the generator for the end.
        finished = b == num - 1
        yield images, int(valid)
    finally:
      if id(self._holder.get("iterator")) == token:
        if finished and self.persistent:
          self._at_pass_start = True
        else:
          _close_all(self._holder)

  def close(self):
    """Stops the worker processes (idempotent)."""
    _close_all(self._holder)
    self._at_pass_start = False

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def eval_batches(source, transform_cfg, batch_size, process_index=0, process_count=1,
                 num_workers=0, prefetch=2, persistent=True):
  """The whole split in order, in global batches of ``batch_size``, for evaluation.

  Global batch ``b`` holds records ``b * batch_size ...`` (the last one padded to ``batch_size``
  by repeating its first index); process ``i`` gets the contiguous part ``i * per:(i + 1) * per``
  of it (``per = batch_size // process_count``).

  Args:
    source: a numpy array or a record source.
    transform_cfg: a :class:`TransformConfig` (usually kind "eval"; "none" for arrays).
    batch_size: the global batch size, a multiple of ``process_count``.
    process_index, process_count: this process among the evaluating processes.
    num_workers: worker processes (0: in this process).
    prefetch: batches prepared ahead (with workers).
    persistent: keep the workers between passes (see :class:`EvalBatches`); close the returned
      object when done.

  Returns:
    An :class:`EvalBatches` iterable yielding ``(images_local uint8 [per, S, S, C],
    valid_global_count)``; rows at global positions ``>= valid_global_count`` are padding.
  """
  return EvalBatches(source, transform_cfg, batch_size, process_index, process_count,
                     num_workers, prefetch, persistent=persistent)
