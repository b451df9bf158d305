"""Host-side batch samplers: m-per-class, one-per-class (CCP pools), class-representative (PROFS).

Every sampler is a pure function of ``(seed, step)`` over a fixed label array: ``batch(step)`` never
depends on which batches were drawn before, so a resumed run reproduces the exact batches by
restoring only the step (``state_dict`` holds the configuration plus a fingerprint of the labels, so
resuming on a different split fails loudly). Some samplers memoise per-epoch/per-period tables; the
memo is a cache of a pure function, not state.

Multi-process runs: every process calls ``batch(step, process_index, process_count)`` with the same
step; each computes the same global batch and returns its own contiguous slice, so the slices are
disjoint and their concatenation in process order is the global batch.

Randomness comes from two sources, both seeded only by ``(seed, purpose, counter)``:
``np.random.default_rng([seed, tag, counter])`` where a sequential stream is needed, and a
counter-based hash (splitmix64 of ``seed, tag, counters, sample index``) where one random key per
element is needed without materialising a stream (e.g. a fresh within-class permutation for every
cycle of every class).
"""
import math
import zlib

import numpy as np

__all__ = [
    "MPerClassSampler", "OnePerClassSampler", "ClassRepresentativeSampler", "profs_hold_steps",
]

# Distinct stream tags so the samplers never reuse each other's random numbers.
_TAG_EPOCH, _TAG_PASS, _TAG_POOL, _TAG_CLASSES, _TAG_OTHERS = 1, 2, 3, 4, 5
_TAG_REPEAT = 7  # (6 is RandomSampler's)

#: Values of MPerClassSampler's ``small_classes`` option.
SMALL_CLASSES = ("error", "repeat")


def _splitmix64(x):
  x = x + np.uint64(0x9E3779B97F4A7C15)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def _hash(*parts):
  """Counter-based random uint64 keys; ``parts``: non-negative ints/arrays, broadcast together."""
  arrays = [np.asarray(p).astype(np.uint64) for p in parts]
  h = np.zeros(np.broadcast_shapes(*(a.shape for a in arrays)), np.uint64)
  with np.errstate(over="ignore"):  # wrap-around multiplication is the point of the mixer
    for a in arrays:
      h = _splitmix64(h ^ a)
  return h


def _check_seed(seed):
  if int(seed) != seed or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
  return int(seed)


def _labels_fingerprint(labels):
  return zlib.crc32(np.ascontiguousarray(labels, np.int64).tobytes())


def _slice(global_batch, process_index, process_count):
  """This process's contiguous part of the global batch."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index < process_count, got {process_index} and "
                     f"{process_count}.")
  size = len(global_batch)
  if size % process_count:
    raise ValueError(f"Global batch of {size} is not divisible by process_count={process_count}; "
                     "choose a batch size that is a multiple of the number of processes.")
  per = size // process_count
  return global_batch[process_index * per:(process_index + 1) * per]


class _ClassIndex:
  """Samples grouped by class: ``order[start[c]:start[c] + count[c]]`` are those of class ``c``."""

  def __init__(self, labels):
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"labels must be a non-empty 1-D integer array, got dtype {labels.dtype} "
                       f"and shape {labels.shape}.")
    self.labels = labels
    self.classes, self.class_of = np.unique(labels, return_inverse=True)  # class_of: [N] in 0..L-1
    self.order = np.argsort(self.class_of, kind="stable")
    self.count = np.bincount(self.class_of, minlength=len(self.classes))
    self.start = np.concatenate([[0], np.cumsum(self.count)[:-1]])
    # rank[i]: position of sample i inside its class block of ``order``.
    self.rank = np.empty(len(labels), np.int64)
    self.rank[self.order] = np.arange(len(labels)) - np.repeat(self.start, self.count)
    self.fingerprint = _labels_fingerprint(labels)

  @property
  def num_classes(self):
    return len(self.classes)

  def check_min_count(self, m, what, hint=""):
    small = np.flatnonzero(self.count < m)
    if small.size:
      c = small[0]
      raise ValueError(
          f"Class {self.classes[c]} has {self.count[c]} samples but {what} needs {m} per class "
          f"({small.size} classes are too small); lower the config key `m_per_class` "
          f"(--config.sampler.m) to at most {self.count.min()}{hint} or drop classes smaller "
          f"than {m}.")

  def permuted_order(self, keys):
    """Samples grouped by class, each class block sorted by ``keys`` ([N] per sample)."""
    return np.lexsort((keys, self.class_of))

  def cycle_pass(self, seed, tag, index):
    """One sample per class for pass ``index``: each class walks through a fresh random permutation
    of its samples per cycle of ``count[c]`` passes, so every sample is drawn once per cycle."""
    cycle = index // self.count[self.class_of]
    order = self.permuted_order(_hash(seed, tag, cycle, np.arange(len(self.labels))))
    return order[self.start + index % self.count]


def _check_state(cls, state, labels, names):
  missing = [n for n in names + ("labels_fingerprint",) if n not in state]
  if missing:
    raise ValueError(f"{cls.__name__} state is missing {missing}; was it saved by another sampler?")
  if int(state["labels_fingerprint"]) != _labels_fingerprint(np.asarray(labels)):
    raise ValueError(f"{cls.__name__}: the labels differ from those the checkpoint was made with; "
                     "resume with the same data set, split and seed.")


def _check_class_batches(index, m, batch_size, sampler_name, min_count_hint=None):
  """Validates ``batch_size // m`` classes x ``m`` samples; returns (m, batch_size, classes).

  ``min_count_hint``: None to accept classes smaller than ``m``, else the text appended to the
  error's suggested fixes when some class is smaller than ``m``.
  """
  if m < 1 or batch_size < 1:
    raise ValueError(f"m and batch_size must be >= 1, got m={m}, batch_size={batch_size}.")
  if batch_size % m:
    raise ValueError(f"batch_size={batch_size} is not divisible by m_per_class={m}; use a batch "
                     f"size that is a multiple of m_per_class.")
  classes_per_batch = int(batch_size) // int(m)
  if index.num_classes < classes_per_batch:
    raise ValueError(f"A batch needs {classes_per_batch} distinct classes but the split has "
                     f"{index.num_classes}; lower batch_size or raise m_per_class.")
  if min_count_hint is not None:
    index.check_min_count(int(m), sampler_name, min_count_hint)
  return int(m), int(batch_size), classes_per_batch


class MPerClassSampler:
  """Batches of ``batch_size // m`` distinct classes x ``m`` samples; an epoch covers every sample.

  Epoch ``e`` (a plan computed from ``(seed, e)`` alone):
    1. every class is randomly permuted and cut into ``k_c = ceil(n_c / m)`` chunks of ``m`` samples
       (the last chunk is completed by wrapping to the start of the permutation, so it holds ``m``
       distinct samples because ``n_c >= m``);
    2. chunks are scheduled into ``T = max(ceil(sum_c k_c / K), max_c k_c)`` batches of ``K``
       distinct classes: each batch takes every class whose remaining chunks equal the batches left
       (so none is left over), then fills up with a weighted random choice (weights = remaining
       chunks, which spreads a class's chunks evenly over the epoch). This greedy is always feasible
       for this ``T``;
    3. when fewer than ``K`` classes still have chunks (the epoch's tail), the batch is completed
       with random extra classes and random ``m``-subsets of them, the only samples drawn twice in
       an epoch.

  Step ``s`` is batch ``s % T`` of epoch ``s // T``. Rows of the global batch are classes: the
  global batch is ``[K, m]`` flattened row-major.

  Classes smaller than ``m`` (SOP has classes of 2 images, In-shop of 1-2, while the papers batch 4
  per class): with ``small_classes="error"`` (the default) the constructor refuses them; with
  ``"repeat"`` such a class gets one chunk per epoch whose ``m`` rows walk through consecutive
  random permutations of its ``n_c`` samples (the epoch's permutation first, then fresh ones drawn
  from ``(seed, epoch, cycle)``), i.e. sampling with replacement within the class as PML's
  ``MPerClassSampler`` does; it holds each sample ``floor(m / n_c)`` or ``ceil(m / n_c)`` times.
  Classes with ``n_c >= m`` are sampled exactly as with ``"error"``, so when no class is small
  the two options give identical batches.

  Args:
    labels: [N] integer labels of the split.
    m: samples per class in a batch (config key ``m_per_class``).
    batch_size: global batch size; must be a multiple of ``m``.
    seed: non-negative integer.
    small_classes: ``"error"`` or ``"repeat"`` (config key ``sampler.small_classes``), see above.
  """

  _STATE_KEYS = ("seed", "m", "batch_size")

  def __init__(self, labels, m, batch_size, seed=0, small_classes="error"):
    if small_classes not in SMALL_CLASSES:
      raise ValueError(f"small_classes must be one of {SMALL_CLASSES}, got {small_classes!r} "
                       "(set --config.sampler.small_classes).")
    self.small_classes = str(small_classes)
    self._index = _ClassIndex(labels)
    hint = None if small_classes == "repeat" else (
        ", sample small classes with replacement (--config.sampler.small_classes=repeat)")
    self.m, self.batch_size, self.classes_per_batch = _check_class_batches(
        self._index, m, batch_size, "MPerClassSampler", min_count_hint=hint)
    self.seed = _check_seed(seed)
    self._small = self._index.count < self.m  # [L] classes served with repetition
    self._chunks = -(-self._index.count // self.m)
    self.batches_per_epoch = int(max(-(-self._chunks.sum() // self.classes_per_batch),
                                     self._chunks.max()))
    self._memo = {}

  def _plan(self, epoch):
    """[T, batch_size] sample indices of one epoch (memoised; a pure function of seed and epoch)."""
    if epoch in self._memo:
      return self._memo[epoch]
    idx, m, num_k = self._index, self.m, self.classes_per_batch
    rng = np.random.default_rng([self.seed, _TAG_EPOCH, epoch])
    order = idx.permuted_order(rng.random(len(idx.labels)))
    remaining = self._chunks.copy()
    plan = np.empty((self.batches_per_epoch, num_k, m), np.int64)
    cols = np.arange(m)
    small_rows = self._small_class_rows(epoch, order) if self._small.any() else None
    for t in range(self.batches_per_epoch):
      nonempty = np.flatnonzero(remaining)
      if len(nonempty) <= num_k:
        chosen = nonempty
      else:
        rem = remaining[nonempty]
        # Efraimidis-Spirakis weighted sampling without replacement: the K smallest -log(u)/w.
        keys = -np.log1p(-rng.random(len(nonempty))) / rem
        keys[rem >= self.batches_per_epoch - t] = -np.inf  # tight classes must go now
        chosen = nonempty[np.argpartition(keys, num_k - 1)[:num_k]]
      chunk = self._chunks[chosen] - remaining[chosen]
      remaining[chosen] -= 1
      count = idx.count[chosen][:, None]
      rows = order[idx.start[chosen][:, None] + (chunk[:, None] * m + cols) % count]
      if small_rows is not None:  # classes smaller than m: their (only) chunk of this epoch
        is_small = self._small[chosen]
        rows[is_small] = small_rows[chosen[is_small]]
      if len(chosen) < num_k:  # epoch tail: complete with random other classes
        others = np.setdiff1d(np.arange(idx.num_classes), chosen)
        extra = rng.choice(others, num_k - len(chosen), replace=False)
        extra_rows = [small_rows[c] if self._small[c] else
                      idx.order[idx.start[c] + rng.choice(idx.count[c], m, replace=False)]
                      for c in extra]
        rows = np.concatenate([rows, np.stack(extra_rows)])
      plan[t] = rows[rng.permutation(num_k)]
    plan = plan.reshape(self.batches_per_epoch, -1)
    if len(self._memo) >= 2:
      self._memo.pop(next(iter(self._memo)))
    self._memo[epoch] = plan
    return plan

  def _small_class_rows(self, epoch, order):
    """[L, m] rows of every class smaller than ``m`` for ``epoch`` (other rows are unused).

    Position ``p`` of class ``c``'s row is entry ``p % n_c`` of permutation ``p // n_c`` of the
    class: permutation 0 is the epoch's (``order``), the later ones are fresh, keyed by a hash of
    ``(seed, epoch, cycle, sample)`` so that the epoch's random stream is left untouched.
    """
    idx, m = self._index, self.m
    count = np.maximum(idx.count, 1)[:, None]
    pos = np.arange(m)[None, :]
    cycle, within = pos // count, pos % count                 # [L, m]
    num_cycles = int(-(-m // idx.count[self._small].min()))
    perms = [order] + [
        idx.permuted_order(_hash(self.seed, _TAG_REPEAT, int(epoch), r, np.arange(len(idx.labels))))
        for r in range(1, num_cycles)]
    perms = np.stack(perms)                                   # [cycles, N]
    flat = idx.start[:, None] + within
    rows = perms[np.minimum(cycle, num_cycles - 1), flat]
    return np.where(self._small[:, None], rows, -1)

  def epoch_of(self, step):
    """Epoch that ``step`` belongs to."""
    return int(step) // self.batches_per_epoch

  def global_batch(self, step):
    """The whole [batch_size] batch of ``step`` (all processes)."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}.")
    epoch, i = divmod(int(step), self.batches_per_epoch)
    return self._plan(epoch)[i].copy()  # a copy: callers must not be able to edit the memo

  def batch(self, step, process_index=0, process_count=1):
    """This process's slice of the global batch of ``step``."""
    return _slice(self.global_batch(step), process_index, process_count)

  def state_dict(self):
    """Plain-numpy configuration + label fingerprint (the step lives in the train state)."""
    return {"seed": np.int64(self.seed), "m": np.int64(self.m),
            "batch_size": np.int64(self.batch_size), "small_classes": np.str_(self.small_classes),
            "labels_fingerprint": np.int64(self._index.fingerprint)}

  @classmethod
  def from_state_dict(cls, labels, state):
    """Rebuilds the sampler saved by :meth:`state_dict`; ValueError if the labels changed.

    A state without ``small_classes`` (saved before the option existed) means ``"error"``.
    """
    _check_state(cls, state, labels, cls._STATE_KEYS)
    return cls(labels, m=int(state["m"]), batch_size=int(state["batch_size"]),
               seed=int(state["seed"]), small_classes=str(state.get("small_classes", "error")))


class OnePerClassSampler:
  """One sample of every class per pass: CCP's proxy pool.

  Pass ``p`` picks, for each class ``c`` (in class order), position ``p % n_c`` of a random
  permutation of the class drawn for cycle ``p // n_c``: any ``n_c`` consecutive passes aligned to a
  cycle draw every sample of the class exactly once. :meth:`pool` gives the ``[L, b]`` pool of
  greedy k-center directly (``b`` distinct samples per class when the class is large enough).

  Args:
    labels: [N] integer labels.
    seed: non-negative integer.
  """

  _STATE_KEYS = ("seed",)

  def __init__(self, labels, seed=0):
    self._index = _ClassIndex(labels)
    self.seed = _check_seed(seed)

  @property
  def num_classes(self):
    return self._index.num_classes

  @property
  def classes(self):
    """[L] label value of each row of a pass/pool (sorted unique labels)."""
    return self._index.classes

  def pass_indices(self, pass_index):
    """[L] sample indices, one per class in class order, for pass ``pass_index``."""
    if pass_index < 0:
      raise ValueError(f"pass_index must be >= 0, got {pass_index}.")
    return self._index.cycle_pass(self.seed, _TAG_PASS, int(pass_index))

  def pool(self, round_index, pool_size):
    """The k-center pool of round ``round_index``: ``(indices [L, b], mask [L, b])``.

    Row ``c`` holds the first ``b`` entries of a random permutation of class ``c`` drawn for
    ``(seed, round_index)``; a class with fewer than ``b`` samples repeats its permutation and marks
    the repeats ``False`` in ``mask`` (pass it as ``point_mask`` to greedy k-center).
    """
    if round_index < 0 or pool_size < 1:
      raise ValueError(f"need round_index >= 0 and pool_size >= 1, got {round_index}, {pool_size}.")
    idx = self._index
    order = idx.permuted_order(_hash(self.seed, _TAG_POOL, int(round_index),
                                     np.arange(len(idx.labels))))
    j = np.arange(pool_size)[None, :]
    count = idx.count[:, None]
    return order[idx.start[:, None] + j % count], j < count

  def batch(self, step, process_index=0, process_count=1):
    """This process's slice of pass ``step`` (the class count must divide by process_count)."""
    return _slice(self.pass_indices(step), process_index, process_count)

  def state_dict(self):
    return {"seed": np.int64(self.seed), "labels_fingerprint": np.int64(self._index.fingerprint)}

  @classmethod
  def from_state_dict(cls, labels, state):
    _check_state(cls, state, labels, cls._STATE_KEYS)
    return cls(labels, seed=int(state["seed"]))


def profs_hold_steps(num_classes, batch_size, m, rho=6.0):
  """PROFS' ``M = ceil(rho / p(y))``, ``p(y) = B / (I L)``: steps a representative set is held so
  each representative is used about ``rho`` times (``I = m`` samples per class, ``L`` classes)."""
  return max(1, math.ceil(rho * m * num_classes / batch_size))


class ClassRepresentativeSampler:
  """PROFS batches: class representatives held for ``M`` steps, batches built around them.

  PROFS (Can, Gürbüz, Alatan, Algorithm 1) draws one representative per class, ``R``, keeps it for
  ``M`` steps (one approximate projection), and at each step samples a subset ``R'`` of the
  representatives plus examples ``E`` and builds the exemplar batch from pairs ``(R', E)``. Here:

    * the representatives of period ``q = step // M`` are pass ``q`` of the one-per-class scheme
      (each class cycles through all its samples as representatives over ``n_c`` periods);
    * ``R'`` is ``K = batch_size // m`` classes drawn uniformly without replacement for every step
      (or given by the caller, e.g. from hard negative class mining over stored representative
      embeddings);
    * row ``r`` of the ``[K, m]`` global batch is class ``R'[r]``: its representative first, then
      ``m - 1`` other distinct samples of that class drawn for the step. Positions ``r * m`` of the
      flattened batch are the representatives (:meth:`representative_mask`).

  Args:
    labels: [N] integer labels.
    batch_size: global batch size, a multiple of ``m``.
    m: samples per class in a batch including the representative (``I`` in the paper).
    hold_steps: ``M``; None derives it with :func:`profs_hold_steps` (rho = 6, the paper's value).
    seed: non-negative integer.
  """

  _STATE_KEYS = ("seed", "m", "batch_size", "hold_steps")

  def __init__(self, labels, batch_size, m, hold_steps=None, seed=0):
    self._index = _ClassIndex(labels)
    self.m, self.batch_size, self.classes_per_batch = _check_class_batches(
        self._index, m, batch_size, "ClassRepresentativeSampler", min_count_hint="")
    self.seed = _check_seed(seed)
    if hold_steps is None:
      hold_steps = profs_hold_steps(self._index.num_classes, self.batch_size, self.m)
    if hold_steps < 1:
      raise ValueError(f"hold_steps must be >= 1, got {hold_steps}.")
    self.hold_steps = int(hold_steps)
    self._memo = {}

  @property
  def num_classes(self):
    return self._index.num_classes

  def period(self, step):
    """Index of the representative set in use at ``step``."""
    return int(step) // self.hold_steps

  def representatives(self, step):
    """[L] sample index of every class's representative at ``step`` (class order)."""
    return self._memo_reps(step).copy()

  def _memo_reps(self, step):
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}.")
    q = self.period(step)
    if q not in self._memo:  # memo of a pure function: constant for hold_steps steps
      if len(self._memo) >= 2:
        self._memo.pop(next(iter(self._memo)))
      self._memo[q] = self._index.cycle_pass(self.seed, _TAG_PASS, q)
    return self._memo[q]

  def batch_classes(self, step):
    """[K] class rows (0..L-1) of the batch of ``step``: uniform without replacement."""
    rng = np.random.default_rng([self.seed, _TAG_CLASSES, int(step)])
    return rng.choice(self._index.num_classes, self.classes_per_batch, replace=False)

  def representative_mask(self):
    """[batch_size] bool: True where the global batch holds a representative."""
    return np.arange(self.batch_size) % self.m == 0

  def global_batch(self, step, classes=None):
    """The whole [batch_size] batch of ``step``; ``classes`` ([K] class rows) overrides R'."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}.")
    idx, num_k = self._index, self.classes_per_batch
    if classes is None:
      classes = self.batch_classes(step)
    classes = np.asarray(classes, np.int64)
    if (classes.shape != (num_k,) or len(np.unique(classes)) != num_k or classes.min() < 0
        or classes.max() >= idx.num_classes):
      raise ValueError(f"classes must be {num_k} distinct class rows in [0, {idx.num_classes}), "
                       f"got {classes}.")
    reps = self._memo_reps(step)[classes]
    if self.m == 1:
      return reps
    count = idx.count[classes]
    width = int(count.max())
    pos = np.arange(width)[None, :]
    keys = _hash(self.seed, _TAG_OTHERS, int(step), classes[:, None], pos)
    # Exclude padding and the representative itself, then take the m - 1 smallest keys.
    keys[(pos >= count[:, None]) | (pos == idx.rank[reps][:, None])] = np.iinfo(np.uint64).max
    others = np.argsort(keys, axis=1)[:, :self.m - 1]
    rows = np.concatenate([reps[:, None], idx.order[idx.start[classes][:, None] + others]], axis=1)
    return rows.reshape(-1)

  def batch(self, step, process_index=0, process_count=1, classes=None):
    """This process's slice of the global batch of ``step``."""
    return _slice(self.global_batch(step, classes), process_index, process_count)

  def state_dict(self):
    return {"seed": np.int64(self.seed), "m": np.int64(self.m),
            "batch_size": np.int64(self.batch_size), "hold_steps": np.int64(self.hold_steps),
            "labels_fingerprint": np.int64(self._index.fingerprint)}

  @classmethod
  def from_state_dict(cls, labels, state):
    _check_state(cls, state, labels, cls._STATE_KEYS)
    return cls(labels, batch_size=int(state["batch_size"]), m=int(state["m"]),
               hold_steps=int(state["hold_steps"]), seed=int(state["seed"]))


_TAG_RANDOM = 6


class RandomSampler:
  """Uniformly random batches, as the SoftTriple and MPA papers sample ("random sampling").

  Epoch ``e`` is a random permutation of all samples drawn from ``(seed, e)``; step ``s`` takes
  the next ``batch_size`` entries of it, continuing into the next epoch's permutation at the end
  (so every sample is drawn once per epoch, up to the batch that straddles two epochs). Batches
  have no class structure: a class may appear once, several times or not at all.

  Args:
    labels: [N] integer labels of the split (only their count and fingerprint are used).
    batch_size: global batch size, at most N.
    seed: non-negative integer.
  """

  _STATE_KEYS = ("seed", "batch_size")

  def __init__(self, labels, batch_size, seed=0):
    labels = np.asarray(labels)
    if labels.ndim != 1 or not len(labels):
      raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}.")
    if int(batch_size) != batch_size or not 1 <= batch_size <= len(labels):
      raise ValueError(f"RandomSampler: batch_size must be in [1, {len(labels)}] (the number of "
                       f"training samples), got {batch_size} (set --config.batch_size).")
    self.batch_size, self.num = int(batch_size), len(labels)
    self.seed = _check_seed(seed)
    self._fingerprint = _labels_fingerprint(labels)
    self._memo = {}

  def _perm(self, epoch):
    if epoch not in self._memo:
      if len(self._memo) >= 2:
        self._memo.pop(next(iter(self._memo)))
      rng = np.random.default_rng([self.seed, _TAG_RANDOM, epoch])
      self._memo[epoch] = rng.permutation(self.num)
    return self._memo[epoch]

  def global_batch(self, step):
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}.")
    start = int(step) * self.batch_size
    out, filled = np.empty(self.batch_size, np.int64), 0
    while filled < self.batch_size:
      epoch, offset = divmod(start + filled, self.num)
      take = min(self.batch_size - filled, self.num - offset)
      out[filled:filled + take] = self._perm(epoch)[offset:offset + take]
      filled += take
    return out

  def batch(self, step, process_index=0, process_count=1):
    return _slice(self.global_batch(step), process_index, process_count)

  def state_dict(self):
    return {"seed": np.int64(self.seed), "batch_size": np.int64(self.batch_size),
            "labels_fingerprint": np.int64(self._fingerprint)}

  @classmethod
  def from_state_dict(cls, labels, state):
    _check_state(cls, state, labels, cls._STATE_KEYS)
    return cls(labels, batch_size=int(state["batch_size"]), seed=int(state["seed"]))
