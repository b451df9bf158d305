"""Blocked exact kNN: brute-force agreement, tie-breaking by index, devices, bad input."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from dmljax.kernels import knn as knn_lib

BLOCKED = dict(query_block=4, ref_block=8, group=2)
UNBLOCKED = dict(query_block=64, ref_block=64, group=64)


def brute_force(queries, refs, same):
  """Full ranking: squared distance, then index; self removed in same-set mode."""
  d = ((queries[:, None, :].astype(np.float64) - refs[None, :, :]) ** 2).sum(-1)
  order = []
  for i in range(len(queries)):
    idx = [j for j in range(len(refs)) if not (same and j == i)]
    idx.sort(key=lambda j: (d[i, j], j))
    order.append(idx)
  return np.asarray(order), d


def data(n=29, dim=5, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, dim)).astype(np.float32)
  # Exact duplicates: every query sees 3, 11 and 20 at the same distance.
  x[11] = x[3]
  x[20] = x[3]
  return x


NATIVE = [pytest.param(True, id="native"), pytest.param(False, id="xla")]


@pytest.mark.parametrize("use_native", NATIVE)
@pytest.mark.parametrize("blocks", [BLOCKED, UNBLOCKED], ids=["blocked", "unblocked"])
def test_same_set_matches_brute_force(blocks, use_native):
  x = data()
  res = knn_lib.knn(x, k=6, use_native=use_native, **blocks)
  order, d = brute_force(x, x, same=True)
  np.testing.assert_array_equal(res.indices, order[:, :6])
  np.testing.assert_allclose(res.distances, np.take_along_axis(d, order[:, :6], 1),
                             rtol=1e-5, atol=1e-5)
  # The duplicates rank by index: from query 3, 11 then 20 at distance 0; from 11, 3 then 20.
  np.testing.assert_array_equal(res.indices[3, :2], [11, 20])
  np.testing.assert_array_equal(res.indices[11, :2], [3, 20])
  np.testing.assert_array_equal(res.indices[20, :2], [3, 11])


@pytest.mark.parametrize("use_native", NATIVE)
def test_gallery_mode_and_ties_with_equal_distances(use_native):
  x = data()
  q, g = x[:9], x[9:]
  res = knn_lib.knn(q, g, k=5, use_native=use_native, **BLOCKED)
  order, _ = brute_force(q, g, same=False)
  np.testing.assert_array_equal(res.indices, order[:, :5])
  # Gallery rows 2 (=x[11]) and 11 (=x[20]) are the same point: query 3 finds 2 first.
  np.testing.assert_array_equal(res.indices[3, :2], [2, 11])
  # Equal distances from different points: symmetric points on a line around the query.
  line = np.array([[0.0], [1.0], [-1.0], [2.0], [-2.0]], np.float32)
  res = knn_lib.knn(line[:1], line[1:], k=4, use_native=use_native, **BLOCKED)
  np.testing.assert_array_equal(res.indices[0], [0, 1, 2, 3])


@pytest.mark.parametrize("group", [1, 2, 8])
def test_native_and_xla_paths_agree_with_many_ties(group):
  """Small-integer embeddings: every dot product is exact in float32, so both paths and the
  brute force see the same distances, with many ties; k runs up to all references."""
  rng = np.random.default_rng(group)
  x = rng.integers(-2, 3, (70, 3)).astype(np.float32)
  order, d = brute_force(x, x, same=True)
  for k in (1, 5, 40, 69):
    blocks = dict(query_block=16, ref_block=32 if group < 8 else 64, group=group)
    a = knn_lib.knn(x, k=k, use_native=True, **blocks)
    b = knn_lib.knn(x, k=k, use_native=False, **blocks)
    np.testing.assert_array_equal(a.indices, order[:, :k])
    np.testing.assert_array_equal(b.indices, order[:, :k])
    np.testing.assert_array_equal(a.distances, np.take_along_axis(d, order[:, :k], 1))
  q, g = x[:20], x[20:]
  order, _ = brute_force(q, g, same=False)
  a = knn_lib.knn(q, g, k=50, use_native=True, query_block=8, ref_block=16, group=group)
  np.testing.assert_array_equal(a.indices, order[:, :50])
  # One device, larger blocks: same answer.
  one = Mesh(np.asarray(jax.devices()[:1]), ("d",))
  c = knn_lib.knn(x, k=40, use_native=True, mesh=one, query_block=64, ref_block=64, group=group)
  order, _ = brute_force(x, x, same=True)
  np.testing.assert_array_equal(c.indices, order[:, :40])


@pytest.mark.parametrize("use_native", NATIVE)
def test_blocked_equals_unblocked_and_one_vs_eight_devices(use_native):
  x = data(seed=1)
  assert jax.device_count() == 8
  one = Mesh(np.asarray(jax.devices()[:1]), ("d",))
  a = knn_lib.knn(x, k=6, mesh=one, use_native=use_native, **BLOCKED)
  b = knn_lib.knn(x, k=6, use_native=use_native, **BLOCKED)  # all 8 devices
  c = knn_lib.knn(x, k=6, mesh=one, use_native=use_native, **UNBLOCKED)
  np.testing.assert_array_equal(a.indices, b.indices)
  np.testing.assert_array_equal(a.distances, b.distances)
  np.testing.assert_array_equal(a.indices, c.indices)


def test_bfloat16_and_jax_input():
  x = data()
  xb = jnp.asarray(x, jnp.bfloat16)
  res = knn_lib.knn(xb, k=6, **BLOCKED)
  order, _ = brute_force(np.asarray(xb, np.float32), np.asarray(xb, np.float32), same=True)
  np.testing.assert_array_equal(res.indices, order[:, :6])


def test_first_relevant_rank_matches_brute_force():
  x = data()
  labels = np.random.default_rng(2).integers(0, 5, len(x))
  labels[-1] = 99  # a lone query
  order, _ = brute_force(x, x, same=True)
  expected = []
  for i in range(len(x)):
    hits = np.flatnonzero(labels[order[i]] == labels[i])
    expected.append(hits[0] + 1 if hits.size else 0)
  got = knn_lib.first_relevant_rank(x, labels, np.arange(len(x)), x, labels, same_set=True,
                                    query_block=4, ref_block=8)
  np.testing.assert_array_equal(got, expected)
  assert got[-1] == 0
  # Gallery mode, on a subset of queries.
  q, g, lq, lg = x[:9], x[9:], labels[:9], labels[9:]
  order, _ = brute_force(q, g, same=False)
  expected = [(np.flatnonzero(lg[order[i]] == lq[i])[:1] + 1).tolist() or [0] for i in range(9)]
  got = knn_lib.first_relevant_rank(q, lq, np.zeros(9), g, lg, same_set=False,
                                    query_block=4, ref_block=8)
  np.testing.assert_array_equal(got, np.ravel(expected))


@pytest.mark.parametrize("use_native", NATIVE)
def test_bad_input(use_native):
  x = data()
  with pytest.raises(ValueError, match="k=29 is larger than the 28 references"):
    knn_lib.knn(x, k=29, use_native=use_native, **BLOCKED)
  bad = x.copy()
  bad[[2, 5], 0] = np.nan
  bad[7, 1] = np.inf
  with pytest.raises(ValueError, match="3 row"):
    knn_lib.knn(bad, k=2, use_native=use_native, **BLOCKED)
  with pytest.raises(ValueError, match="references has 3 row"):
    knn_lib.knn(x, bad, k=2, use_native=use_native, **BLOCKED)
  with pytest.raises(ValueError, match="empty"):
    knn_lib.knn(np.zeros((0, 4), np.float32), k=1)
  with pytest.raises(ValueError, match="dimension"):
    knn_lib.knn(x, x[:, :3], k=1)
  with pytest.raises(ValueError, match="multiple of group"):
    knn_lib.knn(x, k=1, query_block=4, ref_block=10, group=4)


def test_norms_that_overflow_float32_are_rejected_on_both_paths():
  # Guards: finite embeddings with |x| ~ 3e19 gave NaN scores (self and out-of-range indices).
  from dmljax.metrics import retrieval_metrics
  x = data()
  huge = x * np.float32(3e19)
  for use_native in (True, False):
    with pytest.raises(ValueError, match=r"queries are too large .* row \d+ has norm .*Normalise"):
      knn_lib.knn(huge, k=3, use_native=use_native, **BLOCKED)
    with pytest.raises(ValueError, match="references are too large"):
      knn_lib.knn(x, huge, k=3, use_native=use_native, **BLOCKED)
  with pytest.raises(ValueError, match="embeddings are too large.*rescale"):
    retrieval_metrics(huge, np.arange(len(x)) % 3)
  # Just under the bound (2^60 x a norm of at most 5): accepted, and scaling by a power of two
  # changes no neighbour.
  big = x * np.float32(2.0 ** 60)
  for use_native in (True, False):
    a = knn_lib.knn(x, k=6, use_native=use_native, **BLOCKED)
    b = knn_lib.knn(big, k=6, use_native=use_native, **BLOCKED)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(b.distances, a.distances * np.float32(2.0 ** 120), rtol=1e-5,
                               atol=1e-5 * 2.0 ** 120)


def test_use_cpu_cores_as_devices():
  # Here JAX already runs (8 fake devices from conftest): nothing may change.
  assert not knn_lib.use_cpu_cores_as_devices(2)
  assert jax.device_count() == 8
  # In a fresh process it sets the CPU device count, once; a count in XLA_FLAGS wins.
  code = ("import jax\nfrom dmljax.kernels.knn import use_cpu_cores_as_devices as use\n"
          "applied = use(3)\nprint(applied, len(jax.devices('cpu')), use(2))\n")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300, check=True).stdout.split()
  assert out == ["True", "3", "False"]
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=5"
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300, check=True).stdout.split()
  assert out == ["False", "5", "False"]
  # Once JAX has run something, the count is fixed: no change, no error.
  env.pop("XLA_FLAGS")
  late = ("import jax\njax.numpy.zeros(1)\nfrom dmljax.kernels.knn import use_cpu_cores_as_devices"
          " as use\nprint(use(3), len(jax.devices('cpu')))\n")
  out = subprocess.run([sys.executable, "-c", late], env=env, capture_output=True, text=True,
                       timeout=300, check=True).stdout.split()
  assert out == ["False", "1"]


def test_native_build_errors_and_fallback(tmp_path):
  from dmljax.kernels import native
  # A missing compiler and a failing one: clear errors naming the way out.
  with pytest.raises(native.NativeBuildError, match="DMLJAX_NATIVE=0"):
    native.build_library(tmp_path, cxx=str(tmp_path / "no-such-compiler"))
  with pytest.raises(native.NativeBuildError, match="compiling the kNN selection kernel failed"):
    native.build_library(tmp_path, cxx="false")
  assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob(".knn_select-*"))
  # A build is reused, not redone.
  built = native.build_library(tmp_path)
  mtime = built.stat().st_mtime_ns
  assert native.build_library(tmp_path) == built and built.stat().st_mtime_ns == mtime
  # In a process whose build fails: one warning, the XLA path, and use_native=True refuses.
  code = ("import warnings\nimport numpy as np\nfrom dmljax.kernels import knn\n"
          "x = np.random.default_rng(0).standard_normal((20, 3)).astype(np.float32)\n"
          "with warnings.catch_warnings(record=True) as w:\n"
          "  warnings.simplefilter('always')\n"
          "  a = knn.knn(x, k=3).indices\n  b = knn.knn(x, k=4).indices\n"
          "print(sum('pure XLA path' in str(m.message) for m in w))\n"
          "try:\n  knn.knn(x, k=3, use_native=True)\nexcept RuntimeError as e:\n"
          "  print('refused:', 'unavailable' in str(e))\n")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(DMLJAX_CACHE_DIR=str(tmp_path / "empty"), CXX=str(tmp_path / "no-such-compiler"))
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300, check=True).stdout.split("\n")
  assert out[:2] == ["1", "refused: True"]
  # DMLJAX_NATIVE=0: off without trying to build.
  env.update(DMLJAX_NATIVE="0", DMLJAX_CACHE_DIR=str(tmp_path / "off"))
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300, check=True).stdout.split("\n")
  assert out[:2] == ["0", "refused: True"]
  assert not (tmp_path / "off").exists()


def test_same_set_symmetry_matches_brute_force_and_the_per_block_path():
  """Same-set mode computes each block pair once and feeds both sides; on integer data (exact
  dot products, many ties) both paths, 1 or 3 devices, and the per-query-block path
  (symmetric=False) must give the brute force's order, ties by index, and its distances."""
  rng = np.random.default_rng(7)
  x = rng.integers(-2, 3, (45, 3)).astype(np.float32)
  x[30] = x[2]  # duplicates in different blocks: 2 ranks before 30 from every other query
  order, d = brute_force(x, x, same=True)
  for use_native in (True, False):
    for devices in (1, 3):
      mesh = Mesh(np.asarray(jax.devices()[:devices]), ("q",))
      for k, symmetric in ((1, True), (7, True), (7, False)):
        res = knn_lib.knn(x, k=k, ref_block=16, group=2, mesh=mesh, use_native=use_native,
                          symmetric=symmetric)
        where = dict(use_native=use_native, devices=devices, k=k, symmetric=symmetric)
        np.testing.assert_array_equal(res.indices, order[:, :k], err_msg=str(where))
        np.testing.assert_array_equal(res.distances, np.take_along_axis(d, order[:, :k], 1),
                                      err_msg=str(where))
  with pytest.raises(ValueError, match="same-set"):
    knn_lib.knn(x, x, k=2, symmetric=True)
