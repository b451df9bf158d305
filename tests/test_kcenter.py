"""Greedy k-center (CCP Algorithm 2) against a brute-force per-class Python loop."""
import math

import numpy as np
import pytest

from dmljax.kernels.kcenter import covering_radius, greedy_kcenter


def _brute_kcenter(points, point_mask, seeds, seed_mask, k):
  """Per-class loop from Algorithm 2: argmax over unpicked points of min dist to seeds + picks."""
  num_classes, pool, _ = points.shape
  indices = np.zeros((num_classes, k), np.int64)
  min_dist = np.zeros((num_classes, k))
  valid = np.zeros((num_classes, k), bool)
  for c in range(num_classes):
    chosen = [seeds[c, s].astype(np.float64) for s in range(seeds.shape[1]) if seed_mask[c, s]]
    picked = []
    for j in range(k):
      best, best_d = None, -1.0
      for i in range(pool):
        if not point_mask[c, i] or i in picked:
          continue
        d = min((float(np.sum((points[c, i] - v) ** 2)) for v in chosen), default=math.inf)
        if d > best_d:  # strict: the lowest index wins ties
          best, best_d = i, d
      if best is None:  # exhausted: repeat the first pick, or the first valid point
        valid_idx = np.flatnonzero(point_mask[c])
        best = picked[0] if picked else (valid_idx[0] if len(valid_idx) else 0)
        best_d = 0.0
      else:
        valid[c, j] = True
        picked.append(best)
      chosen.append(points[c, best].astype(np.float64))
      indices[c, j], min_dist[c, j] = best, best_d
  return indices, min_dist, valid


def _brute_radius(points, point_mask, centers, center_mask):
  out = []
  for c in range(points.shape[0]):
    r = 0.0
    for i in range(points.shape[1]):
      if point_mask[c, i]:
        d = min((float(np.linalg.norm(points[c, i] - centers[c, j]))
                 for j in range(centers.shape[1]) if center_mask[c, j]), default=math.inf)
        r = max(r, d)
    out.append(r)
  return np.array(out)


@pytest.fixture(scope="module")
def problem():
  rng = np.random.default_rng(0)
  num_classes, pool, num_seeds, dim = 6, 7, 3, 5
  points = rng.normal(size=(num_classes, pool, dim)).astype(np.float32)
  seeds = rng.normal(size=(num_classes, num_seeds, dim)).astype(np.float32)
  point_mask = np.ones((num_classes, pool), bool)
  seed_mask = np.ones((num_classes, num_seeds), bool)
  point_mask[1, [0, 3]] = False        # padded pool entries
  point_mask[2, 2:] = False            # only 2 valid points < k = 4: picks must repeat
  point_mask[3, :] = False             # empty class
  seed_mask[4, :] = False              # no seeds: first pick is the first valid point
  seed_mask[5, 1] = False              # one seed masked
  point_mask[4, 0] = False
  return points, point_mask, seeds, seed_mask


def test_matches_brute_force_with_masks_and_seeds(problem):
  points, point_mask, seeds, seed_mask = problem
  res = greedy_kcenter(points, point_mask, seeds, seed_mask, k=4)
  idx, dist, valid = _brute_kcenter(points, point_mask, seeds, seed_mask, 4)
  np.testing.assert_array_equal(np.asarray(res.indices), idx)
  np.testing.assert_array_equal(np.asarray(res.valid), valid)
  np.testing.assert_allclose(np.asarray(res.min_dist), dist, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(res.centers), points[np.arange(6)[:, None], idx])
  # Spot checks of the documented conventions.
  assert res.indices[4, 0] == 1 and np.isinf(res.min_dist[4, 0])   # no seeds -> first valid point
  assert list(np.asarray(res.indices[2])) == [int(idx[2, 0]), int(idx[2, 1])] + [int(idx[2, 0])] * 2
  assert not np.asarray(res.valid[3]).any()
  assert set(np.asarray(res.indices[1])).isdisjoint({0, 3})
  # Greedy farthest-point: distances to the growing set never increase (for fresh picks).
  d = np.asarray(res.min_dist)[0]
  assert np.all(np.diff(d) <= 1e-6)


def test_seeds_change_the_picks():
  # 1-D pool on a line: without seeds the first point is picked, then the farthest from it; a seed
  # at the far end pushes the first pick to the near end instead.
  points = np.array([[[0.0], [1.0], [2.0], [10.0]]], np.float32)
  mask = np.ones((1, 4), bool)
  no_seed = greedy_kcenter(points, mask, np.zeros((1, 0, 1), np.float32), np.zeros((1, 0), bool),
                           k=2)
  assert list(np.asarray(no_seed.indices[0])) == [0, 3]
  np.testing.assert_allclose(np.asarray(no_seed.min_dist[0, 1]), 100.0)
  seeded = greedy_kcenter(points, mask, np.array([[[10.0]]], np.float32), np.ones((1, 1), bool),
                          k=2)
  assert list(np.asarray(seeded.indices[0])) == [0, 2]
  np.testing.assert_allclose(np.asarray(seeded.min_dist[0]), [100.0, 4.0])


def test_covering_radius_matches_brute_force(problem):
  points, point_mask, seeds, seed_mask = problem
  got = np.asarray(covering_radius(points, point_mask, seeds, seed_mask))
  want = _brute_radius(points, point_mask, seeds, seed_mask)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert got[3] == 0.0 and np.isinf(got[4])  # empty class; class without valid centers
  # k-center picks (plus seeds) can only shrink the radius.
  res = greedy_kcenter(points, point_mask, seeds, seed_mask, k=4)
  both = np.concatenate([seeds, np.asarray(res.centers)], axis=1)
  both_mask = np.concatenate([seed_mask, np.asarray(res.valid)], axis=1)
  shrunk = np.asarray(covering_radius(points, point_mask, both, both_mask))
  assert np.all(shrunk[[0, 1, 2, 5]] <= got[[0, 1, 2, 5]] + 1e-6)


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match="must match"):
    greedy_kcenter(np.zeros((2, 3, 4)), np.ones((2, 3), bool), np.zeros((3, 1, 4)),
                   np.ones((3, 1), bool), k=1)
  with pytest.raises(ValueError, match="k must be"):
    greedy_kcenter(np.zeros((2, 3, 4)), np.ones((2, 3), bool), np.zeros((2, 1, 4)),
                   np.ones((2, 1), bool), k=0)
