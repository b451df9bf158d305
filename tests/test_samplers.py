"""Host-side samplers: determinism, epoch coverage, class constraints, process slices, state."""
import zlib

import numpy as np
import pytest

from dmljax.data.samplers import (ClassRepresentativeSampler, MPerClassSampler, OnePerClassSampler,
                                  profs_hold_steps)


def _labels(sizes, seed=0):
  """Shuffled labels with the given class sizes (class c has sizes[c] samples)."""
  labels = np.repeat(np.arange(len(sizes)), sizes)
  return np.random.default_rng(seed).permutation(labels)


UNEVEN = _labels([4, 5, 6, 7, 9, 11, 3 + 10, 8])


def _check_mperclass_batch(batch, labels, m):
  rows = labels[batch].reshape(-1, m)
  assert np.all(rows == rows[:, :1]), "each row of m samples is one class"
  assert len(np.unique(rows[:, 0])) == len(rows), "classes of a batch are distinct"
  assert len(np.unique(batch)) == len(batch), "no sample twice in a batch"


@pytest.mark.parametrize("sizes,m,batch_size", [
    ([4, 5, 6, 7, 9, 11, 13, 8], 2, 8),
    ([3, 3, 40, 3, 3], 3, 6),   # one dominant class: the epoch stretches to its chunk count
])
def test_mperclass_epoch_covers_every_sample(sizes, m, batch_size):
  labels = _labels(sizes)
  sampler = MPerClassSampler(labels, m=m, batch_size=batch_size, seed=3)
  chunks = -(-np.array(sizes) // m)
  assert sampler.batches_per_epoch == max(-(-chunks.sum() // (batch_size // m)), chunks.max())
  for epoch in range(2):
    steps = range(epoch * sampler.batches_per_epoch, (epoch + 1) * sampler.batches_per_epoch)
    seen = np.concatenate([sampler.batch(s) for s in steps])
    assert set(seen) == set(range(len(labels)))
    for s in steps:
      _check_mperclass_batch(sampler.global_batch(s), labels, m)
    # Every class appears in at least as many batches as it has chunks of m samples.
    per_class = np.zeros(len(sizes), int)
    for s in steps:
      per_class[np.unique(labels[sampler.global_batch(s)])] += 1
    assert np.all(per_class >= chunks)


def test_mperclass_deterministic_and_stateless():
  a = MPerClassSampler(UNEVEN, m=2, batch_size=8, seed=1)
  b = MPerClassSampler(UNEVEN, m=2, batch_size=8, seed=1)
  steps = [0, 5, 17, 3, 40, 17]
  # Order of calls does not matter (no hidden state); a fresh instance agrees.
  got_a = [a.batch(s) for s in steps]
  got_b = [b.batch(s) for s in reversed(steps)][::-1]
  for x, y in zip(got_a, got_b):
    np.testing.assert_array_equal(x, y)
  c = MPerClassSampler(UNEVEN, m=2, batch_size=8, seed=2)
  assert any(not np.array_equal(a.batch(s), c.batch(s)) for s in range(5))
  # Different epochs use different permutations.
  t = a.batches_per_epoch
  assert any(not np.array_equal(a.batch(s), a.batch(s + t)) for s in range(t))


@pytest.mark.parametrize("make", [
    lambda l: MPerClassSampler(l, m=2, batch_size=8, seed=0),
    lambda l: ClassRepresentativeSampler(l, batch_size=8, m=2, hold_steps=3, seed=0),
])
def test_process_slices_are_disjoint_and_tile_the_global_batch(make):
  sampler = make(UNEVEN)
  for step in (0, 7):
    full = sampler.batch(step)
    for count in (1, 2, 4, 8):
      parts = [sampler.batch(step, process_index=i, process_count=count) for i in range(count)]
      assert all(len(p) == 8 // count for p in parts)
      np.testing.assert_array_equal(np.concatenate(parts), full)
  with pytest.raises(ValueError, match="not divisible by process_count"):
    sampler.batch(0, process_index=0, process_count=3)
  with pytest.raises(ValueError, match="process_index"):
    sampler.batch(0, process_index=2, process_count=2)


def test_constructor_errors():
  with pytest.raises(ValueError, match="not divisible by m_per_class"):
    MPerClassSampler(UNEVEN, m=3, batch_size=8)
  with pytest.raises(ValueError, match=r"Class 0 has 4 samples.*m_per_class"):
    MPerClassSampler(UNEVEN, m=5, batch_size=10)
  with pytest.raises(ValueError, match=r"--config\.sampler\.small_classes=repeat"):
    MPerClassSampler(UNEVEN, m=5, batch_size=10)
  with pytest.raises(ValueError, match="small_classes must be one of"):
    MPerClassSampler(UNEVEN, m=2, batch_size=8, small_classes="drop")
  with pytest.raises(ValueError, match="distinct classes"):
    MPerClassSampler(UNEVEN, m=1, batch_size=9)
  with pytest.raises(ValueError, match="m_per_class"):
    ClassRepresentativeSampler(UNEVEN, batch_size=10, m=5)
  with pytest.raises(ValueError, match="1-D integer"):
    OnePerClassSampler(np.zeros(4, np.float32))
  with pytest.raises(ValueError, match="seed"):
    OnePerClassSampler(UNEVEN, seed=-1)


def test_state_round_trip():
  samplers = [MPerClassSampler(UNEVEN, m=2, batch_size=8, seed=4),
              OnePerClassSampler(UNEVEN, seed=4),
              ClassRepresentativeSampler(UNEVEN, batch_size=8, m=2, hold_steps=5, seed=4)]
  for s in samplers:
    state = s.state_dict()
    assert all(isinstance(v, np.generic) for v in state.values())
    restored = type(s).from_state_dict(UNEVEN, state)
    for step in (0, 9, 23):
      np.testing.assert_array_equal(restored.batch(step), s.batch(step))
    with pytest.raises(ValueError, match="labels differ"):
      type(s).from_state_dict(UNEVEN[::-1], state)


def test_one_per_class_passes_cycle_through_each_class():
  labels = _labels([3] * 5 + [4] * 3)
  sampler = OnePerClassSampler(labels, seed=0)
  passes = np.stack([sampler.pass_indices(p) for p in range(12)])  # [passes, L]
  np.testing.assert_array_equal(labels[passes], np.broadcast_to(np.arange(8), (12, 8)))
  for c, n in enumerate([3] * 5 + [4] * 3):
    for cycle in range(12 // n):
      drawn = passes[cycle * n:(cycle + 1) * n, c]
      assert sorted(drawn) == sorted(np.flatnonzero(labels == c)), "each cycle draws every sample"
  assert any(not np.array_equal(passes[0:3, c], passes[3:6, c]) for c in range(5))  # fresh cycles
  np.testing.assert_array_equal(sampler.batch(7), passes[7])
  np.testing.assert_array_equal(OnePerClassSampler(labels, seed=0).pass_indices(5), passes[5])


def test_one_per_class_pool():
  labels = _labels([2, 5, 7])
  sampler = OnePerClassSampler(labels, seed=1)
  idx, mask = sampler.pool(round_index=0, pool_size=4)
  assert idx.shape == mask.shape == (3, 4)
  np.testing.assert_array_equal(labels[idx], np.broadcast_to(np.arange(3)[:, None], (3, 4)))
  np.testing.assert_array_equal(mask, [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
  assert len(set(idx[0, :2])) == 2 and len(set(idx[1])) == 4 and len(set(idx[2])) == 4
  assert set(idx[0, 2:]) <= set(idx[0, :2])  # repeats of a small class are masked
  idx1, _ = sampler.pool(round_index=1, pool_size=4)
  assert not np.array_equal(idx, idx1)
  np.testing.assert_array_equal(sampler.pool(0, 4)[0], idx)


def test_class_representatives_held_for_hold_steps():
  labels = UNEVEN
  sampler = ClassRepresentativeSampler(labels, batch_size=8, m=2, hold_steps=4, seed=0)
  reps = [sampler.representatives(s) for s in range(12)]
  for s in range(12):
    np.testing.assert_array_equal(labels[reps[s]], np.arange(8))
    same_period = reps[s - s % 4]
    np.testing.assert_array_equal(reps[s], same_period)
  assert not np.array_equal(reps[0], reps[4]) and not np.array_equal(reps[4], reps[8])
  mask = sampler.representative_mask()
  for s in range(12):
    batch = sampler.batch(s)
    rows = batch.reshape(4, 2)
    classes = labels[rows[:, 0]]
    assert len(set(classes)) == 4 and np.all(labels[rows] == classes[:, None])
    np.testing.assert_array_equal(batch[mask], reps[s][classes])   # representative first in a row
    assert np.all(rows[:, 1] != rows[:, 0])
  # Caller-chosen classes (hard class mining) are honoured.
  batch = sampler.batch(5, classes=[7, 0, 3, 1])
  np.testing.assert_array_equal(labels[batch[mask]], [7, 0, 3, 1])
  with pytest.raises(ValueError, match="distinct class rows"):
    sampler.batch(5, classes=[1, 1, 2, 3])


def test_profs_hold_steps_formula():
  # M = ceil(rho / p), p = B / (I L): L = 100, B = 32, I = 4 -> ceil(6 * 400 / 32) = 75.
  assert profs_hold_steps(100, 32, 4) == 75
  assert profs_hold_steps(100, 32, 4, rho=1.0) == 13
  derived = ClassRepresentativeSampler(UNEVEN, batch_size=8, m=2).hold_steps
  assert derived == profs_hold_steps(8, 8, 2) == 12  # ceil(6 * 2 * 8 / 8)


def _batches_crc(sampler, steps):
  return zlib.crc32(np.stack([sampler.global_batch(s) for s in steps]).astype(np.int64).tobytes())


@pytest.mark.parametrize("small_classes", ["error", "repeat"])
def test_mperclass_batches_unchanged_by_small_classes_option(small_classes):
  # Values recorded with the implementation before the option existed: the default (and "repeat",
  # when no class is smaller than m) must keep drawing exactly these batches.
  a = MPerClassSampler(_labels([4, 5, 6, 7, 9, 11, 13, 8]), m=2, batch_size=8, seed=3,
                       small_classes=small_classes)
  assert a.batches_per_epoch == 9
  np.testing.assert_array_equal(a.global_batch(0), [54, 47, 11, 21, 45, 42, 28, 43])
  np.testing.assert_array_equal(a.global_batch(7), [55, 28, 2, 61, 32, 3, 13, 34])
  np.testing.assert_array_equal(a.global_batch(25), [32, 7, 28, 35, 19, 2, 17, 45])
  assert _batches_crc(a, range(40)) == 199411512
  b = MPerClassSampler(_labels([4, 5, 6, 7, 9, 11, 13, 8, 4, 4, 6, 12], seed=1), m=4,
                       batch_size=16, seed=5, small_classes=small_classes)
  np.testing.assert_array_equal(b.global_batch(3), [51, 13, 58, 53, 47, 34, 49, 61, 21, 37, 87, 8,
                                                    83, 11, 9, 60])
  assert _batches_crc(b, range(40)) == 4149375665


def test_mperclass_repeat_serves_small_classes():
  # SOP/In-shop-like class sizes: mostly 2-12 images, some classes of a single image; m = 4.
  rng = np.random.default_rng(0)
  sizes = np.concatenate([rng.integers(2, 13, 40), [1, 1, 1, 2, 3, 3]])
  labels = _labels(sizes, seed=2)
  m, batch_size = 4, 32
  sampler = MPerClassSampler(labels, m=m, batch_size=batch_size, seed=7, small_classes="repeat")
  k, t = batch_size // m, sampler.batches_per_epoch
  for epoch in range(2):
    steps = range(epoch * t, (epoch + 1) * t)
    seen = set()
    for s in steps:
      batch = sampler.global_batch(s)
      assert batch.shape == (batch_size,)
      rows = labels[batch].reshape(k, m)
      assert np.all(rows == rows[:, :1]), "each row of m samples is one class"
      assert len(np.unique(rows[:, 0])) == k, "K distinct classes per batch"
      for row in batch.reshape(k, m):
        n = sizes[labels[row[0]]]
        if n >= m:
          assert len(set(row)) == m
        else:  # every sample of the class, each floor(m / n) or ceil(m / n) times
          _, counts = np.unique(row, return_counts=True)
          assert len(counts) == n and counts.min() >= m // n and counts.max() <= -(-m // n)
      seen.update(batch.tolist())
    assert seen == set(range(len(labels))), "an epoch covers every sample"
  # A pure function of (seed, step): a fresh instance, any call order; state records the option.
  state = sampler.state_dict()
  assert state["small_classes"] == "repeat" and isinstance(state["small_classes"], np.generic)
  restored = MPerClassSampler.from_state_dict(labels, state)
  for s in (3 * t + 1, 0, t + 2):
    np.testing.assert_array_equal(restored.batch(s, 1, 2), sampler.batch(s, 1, 2))
  # Fresh permutations: a class of 2 is not always served as the same pair repeated.
  two = np.flatnonzero(sizes == 2)
  patterns = set()
  for s in range(4 * t):
    for row in sampler.global_batch(s).reshape(k, m):
      if labels[row[0]] in two:
        patterns.add(tuple(row[:2] == row[2:]))
  assert len(patterns) == 2
  # Old checkpoints (no small_classes key) restore the default.
  legacy = {key: v for key, v in MPerClassSampler(UNEVEN, 2, 8).state_dict().items()
            if key != "small_classes"}
  assert MPerClassSampler.from_state_dict(UNEVEN, legacy).small_classes == "error"
