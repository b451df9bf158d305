"""Geometry: class covering radius (hand case, exact covers by brute force), proxy radius."""
import itertools

import numpy as np
import pytest

from dmljax.metrics import geometry


def test_class_covering_radius_hand_case():
  # Class 0 on a line at 0, 1, 3: best 1-centre is 1 (radius 2); adding the farthest point 3
  # leaves 0 at distance 1; three centres cover exactly -> mean (2 + 1 + 0) / 3 = 1.
  # Class 5 at 10, 14: radius 4 with one centre, 0 with two -> 2.  Class 9: one sample -> 0.
  x = np.array([[0.0], [10.0], [1.0], [3.0], [14.0], [7.0]], np.float32)
  y = np.array([0, 5, 0, 0, 5, 9])
  np.testing.assert_allclose(geometry.class_covering_radii(x, y), [1.0, 2.0, 0.0], atol=1e-6)
  assert geometry.class_covering_radius(x, y) == pytest.approx(1.0)


def exact_radius(points, k):
  return min(max(min(np.linalg.norm(p - points[c]) for c in centres) for p in points)
             for centres in itertools.combinations(range(len(points)), k))


def test_class_covering_radius_against_exact_covers():
  rng = np.random.default_rng(4)
  x = rng.standard_normal((17, 2)).astype(np.float32)
  y = np.array([0] * 6 + [1] * 5 + [2] * 4 + [3] * 2)
  got = geometry.class_covering_radii(x, y)
  for c in range(4):
    pts = x[y == c].astype(np.float64)
    exact = [exact_radius(pts, k) for k in range(1, len(pts) + 1)]
    # k = 1 is exact; greedy k >= 2 is within a factor 2 of the best cover.
    assert np.mean(exact) - 1e-5 <= got[c] <= 2 * np.mean(exact) + 1e-5
  pts = x[y == 3].astype(np.float64)
  assert got[3] == pytest.approx(np.linalg.norm(pts[0] - pts[1]) / 2, rel=1e-5)


def test_proxy_covering_radius_hand_case():
  x = np.array([[0.0], [1.0], [3.0], [10.0], [14.0]], np.float32)
  y = np.array([0, 0, 0, 1, 1])
  proxies = np.array([[0.5], [11.0], [3.0], [-50.0]], np.float32)
  plabels = np.array([0, 1, 0, 7])  # class 7 has no samples: ignored
  # Distances to the nearest own proxy: 0.5, 0.5, 0, 1, 3.
  assert geometry.proxy_covering_radius(x, y, proxies, plabels) == pytest.approx(1.0)
  assert geometry.proxy_covering_radius(x, y, proxies, plabels,
                                        reduction="class_max") == pytest.approx((0.5 + 3) / 2)
  with pytest.raises(ValueError, match="no proxy"):
    geometry.proxy_covering_radius(x, y, proxies[:1], plabels[:1])
