"""Exact k-nearest-neighbour search in blocks: no N x N matrix, one compile per shape.

Distances are squared Euclidean on the embeddings as given (what faiss' ``IndexFlatL2`` and so
pytorch-metric-learning's ``AccuracyCalculator`` rank by). The ranking never forms a distance:
for a query ``q`` the score of a reference ``r`` is ``q.r - |r|^2 / 2``, which orders references
exactly as ``-|q - r|^2 / 2`` does (``|q|^2`` is the same for every reference). Each reference is
stored *augmented* as ``[r, -|r|^2/2]`` and each query as ``[q, 1]``, so that a score is one
single dot product: every score comes out of one matrix product with no fused epilogue, hence
identical references give bit-identical scores and ties are real ties.

Order: a reference ranks before another if its squared distance is smaller, or if the distances
are equal and its index is smaller. In same-set mode (no separate references) the query itself is
excluded by index, never by distance.

How the search stays cheap (on a 2-core CPU the matrix product is most of the time, so anything
done per score must cost about as little as a running maximum):

1. For a block of ``query_block`` queries, scan the references in blocks of ``ref_block``; of each
   block's scores keep only the maximum over consecutive groups of ``group`` references, in a
   ``[query_block, N / group]`` buffer.
2. Take the best ``k`` groups (``k + 1`` in same-set mode, as the query's own group may be won
   by the query itself). The ``k`` nearest references always lie in those groups: a reference
   outside them has ``k`` groups ranked before its own, each holding a reference ranked before it.
3. Re-score the ``k * group`` candidates of each query exactly (a batched dot product, candidates
   in increasing index order) and take the top ``k`` with ``lax.top_k``, which is stable, so
   equal scores keep the smaller index first.

Steps 1 and 3 compute the same dot products with different kernels (a matrix product and a
batched dot); they can round differently in the last bit, which only matters for two references
whose distances to a query differ by about one float32 ulp: the filter could then, in principle,
keep the one the exact re-scoring ranks second. Identical references are not affected (both
kernels give both the same score).

On CPU devices, steps 2 and 3 run by default in one compiled call
(:mod:`dmljax.kernels.native`, an XLA FFI kernel built on first use): XLA's CPU ``top_k`` and
gather cost a few nanoseconds per element, which made them almost half as expensive as the
matrix product at k = 101; the compiled call does the same selection, in the same order, in a
fraction of that (docs/benchmarks_retrieval.md). Its re-scored dot products may round differently
from XLA's batched dot in the last bit; nothing else differs. ``use_native=False`` (or
``DMLJAX_NATIVE=0``) keeps everything in XLA; GPU and TPU always use the XLA path. The compiled
call spreads a block's query rows over XLA's intra-op thread pool, with as many threads as the
mesh has cores per device (``DMLJAX_NATIVE_THREADS`` sets it); with more than one, a second
compiled call also writes each reference block's group maxima into the buffer in place over the
pool (XLA's own update runs on one thread). The matrix product and its group maxima are one fused
XLA kernel on the pool anyway, so with JAX's default single CPU device no step of the search keeps
one core busy while the others idle.

Same-set mode (no separate references) scores each pair of rows once. The dot products are
symmetric, so the rows are cut into blocks of ``ref_block`` and only the block pairs ``(I, J)``
with ``J >= I`` are multiplied; ``P = X_I X_J^T`` then feeds both the queries of block I (its
rows) and those of block J (its columns), as ``S = P - (h_i + h_j)`` with ``h = |x|^2 / 2``:
``-|x_i - x_j|^2 / 2``, the very same float for the pair seen from either side (the sum of the two
half norms is commutative, and a matrix product sums the same products in the same order for
``x_i . x_j`` and ``x_j . x_i``). Each query keeps a running list of its best candidates, which
block pairs touching it update:

* compiled CPU path: the k best references themselves (a list of up to 2k, compacted to the
  best k by (score, index) when full; scores below the list's k-th are rejected by a vectorised
  compare), so no re-scoring is needed: the scores are ``S`` and the distances ``-2 S``;
* XLA path: the k + 1 best groups (group maxima of ``S``, merged with ``lax.top_k``; a device's
  block pairs reach each list in increasing group index, so the stable top-k keeps ties by
  index), then steps 2-3 above re-score their references.

With several devices each one takes every n-th row block and keeps lists for all rows; their
union (an all-gather) holds every pair once. The lists cost ``O(N k)`` memory per device
(:data:`MAX_SYMMETRIC_STATE` bounds it; larger sets use the per-query-block path). Ties: equal
distances from identical rows are equal scores, ranked by index. Two references whose float64
distances differ by about a float32 rounding of ``S`` can come in either order, and in a
different order than on the per-query-block path or in faiss (which round differently again).

Block sizes by backend (``sizing``, :mod:`dmljax.kernels.sizing`): the defaults above
(:data:`REF_BLOCK`, :func:`auto_blocks`' 64 MB buffer, the symmetric path) are the CPU's. On a
GPU/TPU the accelerator sizing (:func:`accelerator_blocks`) takes one query block per device
against all references in a single step where a share of the device's memory allows, else the
largest blocks that fit; the neighbours are the same. There, ``approx_recall`` may replace the
exact top-k of step 2 by TPU's ``lax.approx_max_k`` (opt-in, TPU only). Device arrays are
searched where they are (``on_device``): checks, augmented rows and the search run on the device
and only the ``[Q, k]`` results are read back.

Inputs are checked (:func:`prepare_embeddings`): NaN/inf values, and rows whose squared norm
could make a float32 score overflow, are rejected with the row and the fix. Should non-finite
scores still arise, both selection paths rank them last, never return a query as its own
neighbour and never return a padding index.

Memory is ``O(query_block * (N / group + ref_block + k * group * D))`` per device, whatever the
number of queries. Query blocks are sharded over the devices of a mesh (``jax.shard_map``);
references are replicated. Each block's arithmetic does not depend on how many devices there are,
so results are identical on 1 and on 8 devices. On a CPU host the default single device is within
about 10 % of one XLA device per core (:func:`use_cpu_cores_as_devices`), since the compiled
calls use the thread pool (docs/benchmarks_retrieval.md).
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dmljax.kernels import native
from dmljax.kernels import sizing as sizing_lib

__all__ = ["KNNResult", "knn", "first_relevant_rank", "prepare_embeddings", "flat_mesh",
           "auto_blocks", "accelerator_blocks", "use_cpu_cores_as_devices"]

#: Default block sizes, tuned on a 2-core CPU for 128-d embeddings
#: (see docs/benchmarks_retrieval.md).
#: ``None`` picks them from the problem size (:func:`auto_blocks`).
QUERY_BLOCK = None
REF_BLOCK = 2048
GROUP = None
#: Upper bounds of the automatic choice: candidates re-scored per query, group-max buffer floats.
_MAX_CANDIDATES = 512
_MAX_BUFFER = 1 << 24


def auto_blocks(num_refs: int, k: int, query_block=None, group=None, ref_block=REF_BLOCK):
  """Fills in ``query_block`` and ``group`` when None.

  ``group``: the largest power of two <= 8 with (k + 1) * group <= 512 candidates per query
  (re-scoring gathers them, which costs memory traffic; small k affords coarse groups).
  ``query_block``: the largest power of two in [32, 512] whose group-max buffer
  ``query_block * num_refs / group`` stays under 16M floats (64 MB).
  """
  if group is None:
    group = 8
    while group > 1 and (k + 1) * group > _MAX_CANDIDATES:
      group //= 2
    while ref_block % group:
      group //= 2
  if query_block is None:
    groups = -(-num_refs // group)
    query_block = 512
    while query_block > 32 and query_block * groups > _MAX_BUFFER:
      query_block //= 2
  return query_block, group


def _accel_cost(qb: int, rb: int, n: int, dim: int, kg: int, group: int) -> int:
  """Bytes of one query block's intermediates on the per-query-block path: scores and their
  group maxima for one reference block, the group-max buffer (twice: its update may copy), the
  re-scored candidates' rows and the top-k outputs."""
  n_pad = _round_up(n, rb)
  return 4 * qb * (rb + rb // group + 2 * (n_pad // group) + kg * group * (dim + 2) + 2 * kg)


def accelerator_blocks(num_queries: int, num_refs: int, dim: int, k: int, group: int,
                       budget: int, num_devices: int = 1) -> tuple[int, int]:
  """``(query_block, ref_block)`` of the accelerator sizing (:mod:`dmljax.kernels.sizing`).

  A single pass where ``budget`` (bytes per device) allows it: one query block holding each
  device's share of the queries, scanned against all references in one block. Otherwise the
  query blocks are halved first (down to 256 rows), then the references are cut into equal
  blocks (down to :data:`REF_BLOCK`), then the query blocks again (down to 8 rows). Sizes are
  multiples of 8 (queries) and of ``group`` (references), not powers of two: padding stays under
  8 rows per block.
  """
  kg = k + 1
  n = _round_up(max(num_refs, kg * group), group)
  per_device = max(1, -(-num_queries // max(1, num_devices)))
  blocks, steps = 1, 1
  qb, rb = _round_up(per_device, 8), n

  def cost():
    return _accel_cost(qb, rb, n, dim, kg, group)

  while cost() > budget and qb > 256:
    blocks *= 2
    qb = _round_up(-(-per_device // blocks), 8)
  while cost() > budget and rb > max(REF_BLOCK, group):
    steps *= 2
    rb = _round_up(-(-n // steps), group)
  while cost() > budget and qb > 8:
    blocks *= 2
    qb = _round_up(-(-per_device // blocks), 8)
  return qb, rb


def _accelerator_sym_block(num_rows: int, group: int, budget: int, state: int) -> int:
  """Rows per block of the same-set symmetric path under the accelerator sizing: the largest
  equal cut whose block pair (its product, scores and group maxima, ~3 blocks x blocks floats)
  fits ``budget`` beside the running lists (``state`` bytes)."""
  n = _round_up(num_rows, group)
  steps, b = 1, n
  while 12 * b * b + state > budget and b > max(REF_BLOCK, group):
    steps *= 2
    b = _round_up(-(-n // steps), group)
  return b


def use_cpu_cores_as_devices(num: Optional[int] = None) -> bool:
  """Asks XLA's CPU backend for one device per core; call it right after ``import jax``.

  The search shards query blocks over the devices of the mesh. With the compiled CPU kernels
  (:mod:`dmljax.kernels.native`) the default single CPU device is about as fast: every step of
  the search then uses XLA's thread pool (on the 2-core benchmark machine the SOP-sized
  evaluation took 9.7-10.3 s on one device against 8.9-10.0 s with a device per core, and
  11.9-12.5 s on one device before: docs/benchmarks_retrieval.md), so nobody needs to call this.
  With the pure XLA path (``DMLJAX_NATIVE=0``) XLA's top-k and gathers run on one thread per
  device, and a device per core still helps. Results do not depend on the number of devices.
  ``python -m dmljax.evaluate`` calls this; library users may do the same, or set
  ``jax.config.update("jax_num_cpu_devices", n)`` themselves.

  Args:
    num: number of CPU devices; None = ``os.cpu_count()``.

  Returns:
    True if applied. False, changing nothing, if JAX has already run something (the device
    count is fixed then), or if a count was already chosen (``jax_num_cpu_devices`` or
    ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``).
  """
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return False
  if jax.config.jax_num_cpu_devices != -1:
    return False
  try:
    jax.config.update("jax_num_cpu_devices", int(num or os.cpu_count() or 1))
  except RuntimeError:  # backends already initialised
    return False
  return True


class KNNResult(NamedTuple):
  """Nearest neighbours of each query, nearest first.

  Attributes:
    distances: ``[Q, k]`` float32 squared Euclidean distances.
    indices: ``[Q, k]`` int32 indices into the references.
  """
  distances: np.ndarray
  indices: np.ndarray


#: Largest squared row norm accepted (2^126, a norm of about 9.2e18). A score is
#: ``q.r - |r|^2 / 2``, at most ``|q| |r| + |r|^2 / 2`` in size (as is every partial sum of the
#: dot product), so under this bound no score, and no intermediate of one, overflows float32
#: (max ~3.4e38 = 2^128); above it, scores can become inf or NaN and the ranking is meaningless.
MAX_SQUARED_NORM = 2.0 ** 126


def prepare_embeddings(x, name: str = "embeddings") -> np.ndarray:
  """Converts numpy/jax float32 or bfloat16 embeddings to a checked float32 ``[N, D]`` array.

  Raises:
    ValueError: if the array is not 2-D, is empty, holds NaN or infinite values, or has rows so
      large that the kNN's float32 scores would overflow (squared norm >= ``MAX_SQUARED_NORM``).
  """
  x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"{name} must have shape [num, dim], got shape {x.shape}.")
  if x.shape[0] == 0 or x.shape[1] == 0:
    raise ValueError(f"{name} is empty (shape {x.shape}); pass at least one embedding.")
  if not (np.issubdtype(x.dtype, np.floating) or x.dtype.name == "bfloat16"):
    raise ValueError(f"{name} must be float32 or bfloat16, got dtype {x.dtype}.")
  x = np.asarray(x, np.float32)
  bad = ~np.isfinite(x).all(axis=1)
  if bad.any():
    raise ValueError(
        f"{name} has {int(bad.sum())} row(s) with NaN or infinite values (first: row "
        f"{int(np.argmax(bad))}); fix or drop them before evaluating.")
  _check_norms(x, name)
  return x


def _check_norms(x: np.ndarray, name: str) -> None:
  """Raises if a row's squared norm reaches ``MAX_SQUARED_NORM`` (computed in float64)."""
  amax = float(np.abs(x).max())
  if amax * amax * x.shape[1] < MAX_SQUARED_NORM:  # the common case: no row can be that large
    return
  sq = np.empty(x.shape[0], np.float64)
  for i in range(0, x.shape[0], 8192):  # float64 copies of a few rows at a time
    c = x[i:i + 8192].astype(np.float64)
    sq[i:i + 8192] = np.einsum("nd,nd->n", c, c)
  worst = int(np.argmax(sq))
  if sq[worst] >= MAX_SQUARED_NORM:
    raise ValueError(
        f"{name} are too large for float32 distance arithmetic: row {worst} has norm "
        f"{np.sqrt(sq[worst]):.3g} ({int((sq >= MAX_SQUARED_NORM).sum())} row(s) with a norm "
        f"of 2^63 = {np.sqrt(MAX_SQUARED_NORM):.3g} or more), and squared norms or dot products "
        f"that large overflow. Normalise the embeddings (e.g. to unit L2 norm) or rescale them "
        f"(multiply all by one small factor; the neighbours do not change).")


@jax.jit
def _device_checks(x):
  """Per-array facts :func:`prepare_device` needs, computed where ``x`` lives (scalars only)."""
  bad = ~jnp.isfinite(x).all(axis=1)
  sq = jnp.sum(jnp.square(jnp.where(bad[:, None], 0.0, x)), axis=1)  # float32; inf on overflow
  big = sq >= MAX_SQUARED_NORM
  return (bad.sum(), jnp.argmax(bad), big.sum(), jnp.argmax(sq), jnp.sqrt(jnp.max(sq)))


def prepare_device(x, name: str = "embeddings") -> jax.Array:
  """:func:`prepare_embeddings` for a jax array that stays on its device: the same checks and
  messages, computed on the device (only five scalars are read back); returns float32 ``[N, D]``.
  Squared norms are float32 sums here (the host checks in float64), which matters only for rows
  within a rounding of the :data:`MAX_SQUARED_NORM` bound."""
  if x.ndim != 2:
    raise ValueError(f"{name} must have shape [num, dim], got shape {x.shape}.")
  if x.shape[0] == 0 or x.shape[1] == 0:
    raise ValueError(f"{name} is empty (shape {x.shape}); pass at least one embedding.")
  if not (jnp.issubdtype(x.dtype, jnp.floating)):
    raise ValueError(f"{name} must be float32 or bfloat16, got dtype {x.dtype}.")
  x = x.astype(jnp.float32)
  nbad, first, nbig, worst, norm = (np.asarray(v) for v in _device_checks(x))
  if nbad:
    raise ValueError(
        f"{name} has {int(nbad)} row(s) with NaN or infinite values (first: row {int(first)}); "
        f"fix or drop them before evaluating.")
  if nbig:
    raise ValueError(
        f"{name} are too large for float32 distance arithmetic: row {int(worst)} has norm "
        f"{float(norm):.3g} ({int(nbig)} row(s) with a norm of 2^63 = "
        f"{np.sqrt(MAX_SQUARED_NORM):.3g} or more), and squared norms or dot products that large "
        f"overflow. Normalise the embeddings (e.g. to unit L2 norm) or rescale them (multiply "
        f"all by one small factor; the neighbours do not change).")
  return x


@functools.partial(jax.jit, static_argnames=("rows",))
def _augment_refs_device(refs, rows: int):
  """:func:`_augment_refs` on the device (``rows`` padded rows); the half squared norms are
  float32 sums of float32 squares (the host path rounds a float64 sum)."""
  n, d = refs.shape
  h = -0.5 * jnp.sum(jnp.square(refs), axis=1)
  body = jnp.concatenate([refs, h[:, None]], axis=1)
  pad = jnp.zeros((rows - n, d + 1), jnp.float32).at[:, d].set(-jnp.inf)
  return jnp.concatenate([body, pad], axis=0)


@functools.partial(jax.jit, static_argnames=("rows",))
def _augment_queries_device(queries, rows: int):
  n, d = queries.shape
  q = jnp.concatenate([queries, jnp.zeros((rows - n, d), jnp.float32)], axis=0)
  return jnp.concatenate([q, jnp.ones((rows, 1), jnp.float32)], axis=1)


def _aug_refs(refs, ref_block: int, min_rows: int):
  """Augmented references, on the host (numpy in) or on the device (jax in)."""
  if isinstance(refs, np.ndarray):
    return _augment_refs(refs, ref_block, min_rows)
  return _augment_refs_device(refs, _round_up(max(refs.shape[0], min_rows), ref_block))


def _aug_queries(queries, rows: int):
  if isinstance(queries, np.ndarray):
    return _augment_queries(queries, rows)
  return _augment_queries_device(queries, rows)


def _sq_norms_host(x) -> np.ndarray:
  """float64 squared norms of the rows of ``x`` (numpy, or a device array: summed there in
  float32, only ``[N]`` read back)."""
  if isinstance(x, np.ndarray):
    return np.einsum("nd,nd->n", x.astype(np.float64), x)
  return np.asarray(jnp.sum(jnp.square(x), axis=1)).astype(np.float64)


def search_on_device(x, on_device: Optional[bool], mesh: Mesh) -> bool:
  """Whether the search runs from the device arrays (see :func:`knn`'s ``on_device``)."""
  if on_device is None:
    on_cpu = all(d.platform == "cpu" for d in np.asarray(mesh.devices).reshape(-1))
    return isinstance(x, jax.Array) and not on_cpu and jax.process_count() == 1
  if on_device and jax.process_count() > 1:
    raise ValueError("on_device=True needs a single process; with several processes the kNN "
                     "reads the embeddings to each host (leave on_device=None).")
  return bool(on_device)


def check_approx(approx_recall, mesh: Mesh) -> float:
  """0.0 (exact) or a recall target for ``lax.approx_max_k`` on TPU; ValueError otherwise."""
  if approx_recall is None or approx_recall == 0:
    return 0.0
  if isinstance(approx_recall, bool) or not isinstance(approx_recall, (int, float)) or not (
      0.0 < float(approx_recall) < 1.0):
    raise ValueError(f"approx_recall must be a recall target in (0, 1) (or 0 for the exact "
                     f"search), got {approx_recall!r}.")
  found = sizing_lib.platforms(mesh.devices)
  if not found <= set(APPROX_PLATFORMS):
    raise ValueError(
        f"approx_recall={approx_recall} asks for jax.lax.approx_max_k, which is an approximate "
        f"(fast) search on TPU only, but the kNN runs on {'/'.join(sorted(found))}: set "
        f"approx_recall to 0 (the exact search) here.")
  return float(approx_recall)


#: Platforms where ``approx_recall`` is accepted (``lax.approx_max_k`` is TPU's approximate
#: top-k; elsewhere it is an exact sort, slower than the exact path's ``top_k``).
APPROX_PLATFORMS = ("tpu",)


def flat_mesh(mesh: Optional[Mesh]) -> Mesh:
  """A 1-D mesh over all devices of ``mesh`` (all local devices when None), axis name "q"."""
  devices = jax.devices() if mesh is None else list(np.asarray(mesh.devices).reshape(-1))
  return Mesh(np.asarray(devices), ("q",))


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _augment_refs(refs: np.ndarray, ref_block: int, min_rows: int) -> np.ndarray:
  """``[Np, D + 1]`` rows ``[r, -|r|^2 / 2]``; padding rows score -inf against every query."""
  n, d = refs.shape
  n_pad = _round_up(max(n, min_rows), ref_block)
  out = np.zeros((n_pad, d + 1), np.float32)
  out[:n, :d] = refs
  for i in range(0, n, 65536):  # float64 norms a slice at a time: no float64 copy of all rows
    c = refs[i:i + 65536].astype(np.float64)
    out[i:i + len(c), d] = -0.5 * np.einsum("nd,nd->n", c, c).astype(np.float32)
  out[n:, d] = -np.inf
  return out


def _augment_queries(queries: np.ndarray, rows: int) -> np.ndarray:
  """``[rows, D + 1]`` rows ``[q, 1]``; padding rows are ``[0, 1]`` (finite scores, discarded)."""
  n, d = queries.shape
  out = np.zeros((rows, d + 1), np.float32)
  out[:n, :d] = queries
  out[:, d] = 1.0
  return out


def _pad_rows(x: np.ndarray, rows: int, value) -> np.ndarray:
  out = np.full((rows,) + x.shape[1:], value, x.dtype)
  out[:x.shape[0]] = x
  return out


def _query_layout(num_queries: int, query_block: int, num_devices: int) -> tuple[int, int]:
  """Padded number of queries and of query blocks per device."""
  blocks = _round_up(-(-num_queries // query_block), num_devices) // num_devices
  return blocks * num_devices * query_block, blocks


# ----------------------------------------------------------------------------- top-k kernel


def _worst_to_lowest(x):
  """NaN (of either sign) and -inf become the lowest finite float32.

  Checked inputs (:func:`prepare_embeddings`) give finite scores for real references and -inf
  for padding ones, so for them this changes no order. Should scores ever overflow, NaN would
  otherwise rank anywhere in ``top_k`` (+NaN first, -NaN, what ``inf - inf`` gives on x86, last)
  and padding or the query itself (-inf) could be picked over real references; with this, equal
  lowest scores go by index, real references first, and the query's -inf is strictly last.
  """
  lowest = jnp.finfo(jnp.float32).min
  return jnp.where(x >= lowest, x, lowest)


def _topk_blocks(qa, qidx, ra, *, k, ref_block, group, exclude_self, use_native,
                 native_threads=0, approx_recall=0.0):
  """Top-k of every query of this device's blocks. qa: [nb, qb, Da], qidx: [nb, qb]."""
  n_pad = ra.shape[0]
  num_groups_per_block = ref_block // group
  num_groups = n_pad // group
  kg = k + int(exclude_self)

  def one_block(args):
    q, qi = args
    qb = q.shape[0]

    def scan_refs(j, gmax):
      r = jax.lax.dynamic_slice_in_dim(ra, j * ref_block, ref_block)
      s = jnp.dot(q, r.T, precision=jax.lax.Precision.HIGHEST)
      g = s.reshape(qb, num_groups_per_block, group).max(axis=2)
      if use_native and native_threads > 1:
        # In place, rows over the thread pool: XLA's own in-place update of the buffer runs on
        # one thread and, with one CPU device, cost ~10% of the scan. (The compiled selection
        # ranks NaN as -inf itself; with one device per core XLA's update overlaps the other
        # devices' work and stays.)
        offset = jnp.reshape(j * num_groups_per_block, (1,)).astype(jnp.int32)
        return jax.ffi.ffi_call(native.PUT_COLUMNS, jax.ShapeDtypeStruct(gmax.shape, gmax.dtype),
                                input_output_aliases={0: 0})(
                                    gmax, g, offset, max_threads=np.int64(native_threads))
      if not use_native:
        g = _worst_to_lowest(g)
      return jax.lax.dynamic_update_slice_in_dim(gmax, g, j * num_groups_per_block, axis=1)

    gmax = jax.lax.fori_loop(0, n_pad // ref_block, scan_refs,
                             jnp.full((qb, num_groups), -jnp.inf, jnp.float32))
    if use_native:  # steps 2-3 in one compiled CPU call (dmljax/kernels/native)
      out_types = (jax.ShapeDtypeStruct((qb, k), jnp.float32),
                   jax.ShapeDtypeStruct((qb, k), jnp.int32))
      return jax.ffi.ffi_call(native.KNN_SELECT, out_types)(
          q, qi, gmax, ra, k=np.int64(k), group=np.int64(group),
          exclude_self=np.int64(exclude_self), max_threads=np.int64(native_threads))
    if approx_recall:  # TPU only (_check_approx): the groups kept may miss some of the best
      _, best_groups = jax.lax.approx_max_k(gmax, kg, recall_target=approx_recall)
    else:
      _, best_groups = jax.lax.top_k(gmax, kg)
    return _rescore_xla(q, qi, best_groups, ra, k=k, group=group, exclude_self=exclude_self)

  return jax.lax.map(one_block, (qa, qidx))


def _rescore_xla(q, qi, best_groups, ra, *, k, group, exclude_self):
  """Step 3 on the XLA path: the exact top-k among the references of ``best_groups`` [qb, kg]."""
  qb, kg = best_groups.shape
  # Candidates in increasing reference index, so that the stable top_k below breaks ties by index.
  best_groups = jnp.sort(best_groups, axis=1)
  cand = (best_groups[:, :, None] * group + jnp.arange(group)).reshape(qb, kg * group)
  scores = _worst_to_lowest(
      jnp.einsum("qd,qcd->qc", q, ra[cand], precision=jax.lax.Precision.HIGHEST))
  if exclude_self:  # below every other candidate, whatever its score
    scores = jnp.where(cand == qi[:, None], -jnp.inf, scores)
  top, pos = jax.lax.top_k(scores, k)
  return top, jnp.take_along_axis(cand, pos, axis=1)


# ----------------------------------------------------------------------------- same-set symmetry


def _sym_cap(k: int, use_native: bool) -> int:
  """Entries of a query's running list: the compiled merge keeps references (a full list of 2 k
  is compacted to k), the XLA path the best k + 1 groups."""
  return 2 * k if use_native else k + 1


def _sym_blocks(blocks, ra, *, num_blocks, block, k, group, use_native, num_devices,
                native_threads=0):
  """Same-set top-k with each pair of blocks' dot products computed once.

  blocks: [nblk] this device's row blocks in increasing order (>= num_blocks: none);
  ra: [Np, D + 1] augmented rows (the references and, with a 1 for the last entry, the queries).
  Returns this device's [nblk, block, k] scores and indices.
  """
  n_pad, da = ra.shape
  d = da - 1
  kg = k + 1
  gpb = block // group
  cap = _sym_cap(k, use_native)
  x = ra[:, :d]
  h = -ra[:, d]  # |x|^2 / 2; +inf on padding rows
  highest = jax.lax.Precision.HIGHEST
  if use_native:
    state = (jnp.full((n_pad, cap), -jnp.inf, jnp.float32), jnp.full((n_pad, cap), -1, jnp.int32),
             jnp.zeros((n_pad,), jnp.int32), jnp.full((n_pad,), -jnp.inf, jnp.float32),
             jnp.full((n_pad,), -1, jnp.int32))
    merge = jax.ffi.ffi_call(native.SYM_MERGE, tuple(jax.ShapeDtypeStruct(a.shape, a.dtype)
                                                      for a in state),
                             input_output_aliases={i: i for i in range(5)})
  else:
    # Entries not yet filled rank below every real group (-inf < the lowest finite score, what
    # _worst_to_lowest makes of -inf), and lose ties to them by coming first in no list.
    state = (jnp.full((n_pad, cap), -jnp.inf, jnp.float32), jnp.full((n_pad, cap), -1, jnp.int32))

  def merge_xla(st, rows0, new, base):
    """Running lists of rows rows0.. take groups base.. (new: [block, gpb] maxima). Groups reach a
    device's lists in increasing index, so the stable top_k keeps (value desc, index asc)."""
    vals, ids = st
    v = jax.lax.dynamic_slice_in_dim(vals, rows0, block)
    i = jax.lax.dynamic_slice_in_dim(ids, rows0, block)
    new_i = jnp.broadcast_to(base + jnp.arange(gpb, dtype=jnp.int32), (block, gpb))
    top, pos = jax.lax.top_k(jnp.concatenate([v, _worst_to_lowest(new)], axis=1), kg)
    top_i = jnp.take_along_axis(jnp.concatenate([i, new_i], axis=1), pos, axis=1)
    return (jax.lax.dynamic_update_slice_in_dim(vals, top, rows0, 0),
            jax.lax.dynamic_update_slice_in_dim(ids, top_i, rows0, 0))

  def row_step(t, st):
    bi = blocks[t]
    xi = jax.lax.dynamic_slice_in_dim(x, bi * block, block)
    hi = jax.lax.dynamic_slice_in_dim(h, bi * block, block)

    def col_step(bj, st):
      xj = jax.lax.dynamic_slice_in_dim(x, bj * block, block)
      prod = jnp.dot(xi, xj.T, precision=highest)  # once for both sides
      if use_native:
        offsets = jnp.stack([bi * block, bj * block]).astype(jnp.int32)
        return merge(*st, prod, h, offsets, k=np.int64(k), max_threads=np.int64(native_threads))
      hj = jax.lax.dynamic_slice_in_dim(h, bj * block, block)
      s = prod - (hi[:, None] + hj[None, :])  # the same number from either side
      st = merge_xla(st, bi * block, s.reshape(block, gpb, group).max(axis=2), bj * gpb)
      # Columns: the queries of block bj against the groups of block bi (not on the diagonal,
      # whose pairs the rows already took).
      return jax.lax.cond(
          bi == bj, lambda st: st,
          lambda st: merge_xla(st, bj * block, s.reshape(gpb, group, block).max(axis=1).T,
                               bi * gpb), st)

    return jax.lax.fori_loop(bi, num_blocks, col_step, st)

  state = jax.lax.fori_loop(0, blocks.shape[0], row_step, state)
  # Every device's lists hold the groups of its own block pairs: the union is all of them.
  lists = [jax.lax.all_gather(a, "q") if num_devices > 1 else a[None]
           for a in state[:3 if use_native else 2]]

  def select(bi):
    bi = jnp.minimum(bi, num_blocks - 1)  # a device's spare slots (results dropped)
    rows = bi * block
    q = jnp.concatenate([jax.lax.dynamic_slice_in_dim(x, rows, block),
                         jnp.ones((block, 1), jnp.float32)], axis=1)
    qi = rows + jnp.arange(block, dtype=jnp.int32)
    part = [jax.lax.dynamic_slice_in_dim(a, rows, block, axis=1) for a in lists]
    if use_native:
      out_types = (jax.ShapeDtypeStruct((block, k), jnp.float32),
                   jax.ShapeDtypeStruct((block, k), jnp.int32))
      return jax.ffi.ffi_call(native.SYM_SELECT, out_types)(
          *part, max_threads=np.int64(native_threads))
    vals, ids = (jnp.moveaxis(a, 0, 1).reshape(block, -1) for a in part)
    # The best kg by (value desc, group index asc) across the devices' lists.
    _, ids = jax.lax.sort((-vals, ids), dimension=1, num_keys=2)
    return _rescore_xla(q, qi, ids[:, :kg], ra, k=k, group=group, exclude_self=True)

  return jax.lax.map(select, blocks)


@functools.lru_cache(maxsize=64)
def _sym_fn(mesh: Mesh, num_blocks: int, block: int, k: int, group: int, use_native: bool,
            native_threads: int = 0):
  body = functools.partial(_sym_blocks, num_blocks=num_blocks, block=block, k=k, group=group,
                           use_native=use_native, num_devices=mesh.size,
                           native_threads=native_threads)
  return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("q"), P()),
                               out_specs=(P("q"), P("q")), check_vma=False))


#: Same-set mode scores each pair of blocks once when a device's running lists (and their union
#: over the devices) stay under this many bytes; above it, the per-query-block path.
MAX_SYMMETRIC_STATE = 1 << 29


def _sym_state_bytes(num_rows: int, k: int, use_native: bool, num_devices: int) -> int:
  per_list = num_rows * _sym_cap(k, use_native) * 8
  return per_list * (1 + (num_devices if num_devices > 1 else 0))


@functools.lru_cache(maxsize=64)
def _topk_fn(mesh: Mesh, k: int, ref_block: int, group: int, exclude_self: bool,
             use_native: bool, native_threads: int = 0, approx_recall: float = 0.0):
  body = functools.partial(_topk_blocks, k=k, ref_block=ref_block, group=group,
                           exclude_self=exclude_self, use_native=use_native,
                           native_threads=native_threads, approx_recall=approx_recall)
  return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("q"), P("q"), P()),
                               out_specs=(P("q"), P("q")), check_vma=False))


def _global_inputs(mesh: Mesh, *arrays_and_specs):
  """The kernels' numpy inputs as arrays on ``mesh``.

  One process: the numpy arrays as they are (jit places them). Several processes (the mesh
  spans hosts): every process holds the same numpy arrays (the embeddings, gathered once) and
  builds the global array from its own devices' slices, so each device receives only its query
  blocks; the references are replicated and streamed block by block inside each device.
  """
  if jax.process_count() == 1:
    return [a for a, _ in arrays_and_specs]
  return [jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec),
                                       lambda index, a=a: a[index])
          for a, spec in arrays_and_specs]


def _gather(x) -> np.ndarray:
  """Numpy value of a kernel output; across processes only the ``[Q, k]`` results travel."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _resolve_native(use_native: Optional[bool], mesh: Mesh) -> bool:
  """Whether the kNN uses the compiled CPU selection (see :func:`knn`)."""
  on_cpu = all(d.platform == "cpu" for d in np.asarray(mesh.devices).reshape(-1))
  if use_native is None:
    return on_cpu and native.available()
  if not use_native:
    return False
  if not on_cpu:
    raise RuntimeError("use_native=True needs CPU devices; the compiled kNN kernel is CPU-only "
                       "(on GPU/TPU leave use_native=None).")
  if not native.available():
    raise RuntimeError(f"use_native=True but the compiled kNN kernel is unavailable: "
                       f"{native.error() or 'disabled by DMLJAX_NATIVE=0'}")
  return True


def _cpu_count() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return os.cpu_count() or 1


def _native_threads(num_devices: int) -> int:
  """Threads of one compiled selection call: ``$DMLJAX_NATIVE_THREADS`` if set, else the cores
  per device of the mesh (with one CPU device per core, each device's call stays on its own
  thread, as the devices already keep every core busy)."""
  return native.max_threads() or max(1, _cpu_count() // max(1, num_devices))


def _check_blocks(query_block: int, ref_block: int, group: int):
  for name, v in (("query_block", query_block), ("ref_block", ref_block), ("group", group)):
    if not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{name} must be a positive integer, got {v!r}.")
  if ref_block % group:
    raise ValueError(f"ref_block ({ref_block}) must be a multiple of group ({group}).")


def knn(queries, references=None, *, k: int, query_block: Optional[int] = QUERY_BLOCK,
        ref_block: Optional[int] = None, group: Optional[int] = GROUP,
        mesh: Optional[Mesh] = None, use_native: Optional[bool] = None,
        symmetric: Optional[bool] = None, sizing: str = "auto",
        memory_budget: Optional[int] = None, approx_recall: Optional[float] = None,
        on_device: Optional[bool] = None) -> KNNResult:
  """Exact k nearest references of each query by squared Euclidean distance.

  Args:
    queries: ``[Q, D]`` float32 or bfloat16 (numpy or jax).
    references: ``[N, D]``, or None for same-set search (each query is excluded by index).
    k: number of neighbours, at most the number of references (minus one in same-set mode).
    query_block: queries per block (per device step); None: by ``sizing``.
    ref_block: references per scanned block; a multiple of ``group``. None: by ``sizing``
      (:data:`REF_BLOCK` on the CPU sizing).
    group: references per group of the max filter (see the module docstring); None:
      :func:`auto_blocks`.
    mesh: devices to shard query blocks over; None uses all devices.
    use_native: do steps 2-3 (selection and re-scoring) in the compiled CPU kernel of
      :mod:`dmljax.kernels.native`. None: when every device of the mesh is a CPU and the kernel
      builds (else the pure XLA path, with a warning if the build failed). True: require it.
    symmetric: same-set mode only: compute each pair of ``ref_block``-sized blocks' dot products
      once and feed both sides (see the module docstring). None: on the CPU sizing when the
      running lists fit in :data:`MAX_SYMMETRIC_STATE` bytes per device, never on the
      accelerator sizing (whose single pass has no block pairs to share); False: the
      per-query-block path.
    sizing: ``"cpu"`` (blocks tuned on a 2-core CPU: a 64 MB group-max buffer per query block,
      :data:`REF_BLOCK` references per scan step), ``"accelerator"`` (:func:`accelerator_blocks`:
      a single pass where ``memory_budget`` allows, else blocks sized from it) or ``"auto"``
      (``"cpu"`` on CPU devices, else ``"accelerator"``; :mod:`dmljax.kernels.sizing`). Explicit
      ``query_block`` / ``ref_block`` win. Every sizing gives the same neighbours.
    memory_budget: bytes per device the accelerator sizing may use; None: a quarter of the
      device memory (:func:`dmljax.kernels.sizing.memory_budget`).
    approx_recall: TPU only, where exactness is not required: keep each query's best groups with
      ``lax.approx_max_k`` at this recall target in (0, 1) instead of the exact ``top_k`` (the
      neighbours found are then exact distances but may miss some true neighbours). None or 0:
      exact (the default). ValueError on any other backend, and with ``symmetric=True``.
    on_device: search from device arrays without reading them back. None: when ``queries`` is a
      jax array on a GPU/TPU and one process runs (on CPU the host path is used: the arrays are
      in host memory already, and the compiled selection takes them as they are); True: also on
      CPU (tests); False: always via numpy. Only the ``[Q, k]`` results (and, on the XLA same-set
      path, ``[Q]`` norms) are read back. On the device the references' half norms are float32
      sums (the host rounds a float64 sum), which can only swap two references whose distances
      to a query differ by about one float32 rounding.

  Returns:
    A :class:`KNNResult`; ties are broken by the smaller reference index.

  Raises:
    ValueError: on bad shapes, NaN/inf values, rows whose squared norm would overflow float32
      scores (:data:`MAX_SQUARED_NORM`: normalise or rescale), ``k`` larger than the
      references, an unknown ``sizing`` or an ``approx_recall`` outside TPU or (0, 1).
    RuntimeError: ``use_native=True`` on non-CPU devices or when the kernel cannot be built.
  """
  mesh = flat_mesh(mesh)
  sizing = sizing_lib.resolve(sizing, mesh.devices)
  approx = check_approx(approx_recall, mesh)
  dev = search_on_device(queries, on_device, mesh)
  prep = prepare_device if dev else prepare_embeddings
  q = prep(_as_device(queries, mesh) if dev else queries, "queries")
  same = references is None
  r = q if same else prep(_as_device(references, mesh) if dev else references, "references")
  if r.shape[1] != q.shape[1]:
    raise ValueError(f"references have dimension {r.shape[1]} but queries {q.shape[1]}.")
  available = r.shape[0] - int(same)
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k must be a positive integer, got {k!r}.")
  if k > available:
    raise ValueError(f"k={k} is larger than the {available} references available to each query; "
                     f"ask for at most {available} neighbours.")
  if symmetric and not same:
    raise ValueError("symmetric=True needs same-set mode (references=None).")
  if symmetric and approx:
    raise ValueError("approx_recall applies to the per-query-block search; pass symmetric=False "
                     "(or None) with it.")
  native_on = _resolve_native(use_native, mesh)
  threads = _native_threads(mesh.size) if native_on else 0
  kg = k + int(same)
  if sizing == "accelerator":
    budget = sizing_lib.memory_budget(mesh.devices, memory_budget)
    group = auto_blocks(r.shape[0], int(k), 1, group, 1 << 30)[1] if group is None else group
    use_sym = same and bool(symmetric) and not approx
    if use_sym and ref_block is None:
      ref_block = _accelerator_sym_block(
          r.shape[0], group, budget, _sym_state_bytes(r.shape[0], int(k), native_on, mesh.size))
    elif query_block is None or ref_block is None:
      qb, rb = accelerator_blocks(q.shape[0], r.shape[0], q.shape[1], int(k) + 1, group, budget,
                                  mesh.size)
      query_block = qb if query_block is None else query_block
      ref_block = rb if ref_block is None else ref_block
    _check_blocks(query_block or 1, ref_block, group)
    ref_block = min(ref_block, _round_up(max(r.shape[0], kg * group), group))
    ra = _aug_refs(r, ref_block, min_rows=kg * group)
  else:
    ref_block = REF_BLOCK if ref_block is None else ref_block
    if query_block is None:
      # Small query sets: a block no larger than the queries. Not a function of the number of
      # devices, so that 1 and 8 devices run the same arithmetic.
      query_block = min(auto_blocks(r.shape[0], int(k), None, group, ref_block)[0],
                        max(8, 1 << (q.shape[0] - 1).bit_length()))
    query_block, group = auto_blocks(r.shape[0], int(k), query_block, group, ref_block)
    _check_blocks(query_block, ref_block, group)
    # Small reference sets: one block just large enough.
    ref_block = min(ref_block, _round_up(max(r.shape[0], (k + int(same)) * group), group))
    ra = _aug_refs(r, ref_block, min_rows=kg * group)
    use_sym = same and not approx and (symmetric if symmetric is not None else _sym_state_bytes(
        ra.shape[0], int(k), native_on, mesh.size) <= MAX_SYMMETRIC_STATE)
  if use_sym:
    num_blocks = ra.shape[0] // ref_block
    per_device = -(-num_blocks // mesh.size)
    # Device d takes blocks d, d + n, d + 2n, ... (about equal shares of the block pairs).
    assign = np.arange(per_device * mesh.size, dtype=np.int32).reshape(per_device, mesh.size).T
    fn = _sym_fn(mesh, num_blocks, ref_block, int(k), group, native_on, threads)
    top, idx = fn(*_global_inputs(mesh, (assign.reshape(-1), P("q")), (ra, P())))
    top = _gather(top).reshape(-1, ref_block, k)
    idx = _gather(idx).reshape(-1, ref_block, k)
    keep = assign.reshape(-1) < num_blocks
    order = np.argsort(assign.reshape(-1)[keep])
    top = top[keep][order].reshape(-1, k)[:q.shape[0]]
    idx = idx[keep][order].reshape(-1, k)[:q.shape[0]]
    if native_on:  # the scores are -|q - r|^2 / 2 themselves
      dist = np.maximum(-2.0 * top.astype(np.float64), 0.0).astype(np.float32)
      return KNNResult(dist, idx.astype(np.int32))
    return _result(q, top, idx)
  rows, _ = _query_layout(q.shape[0], query_block, mesh.size)
  qa = _aug_queries(q, rows).reshape(-1, query_block, q.shape[1] + 1)
  qidx = np.arange(rows, dtype=np.int32).reshape(-1, query_block)
  fn = _topk_fn(mesh, int(k), ref_block, group, same, native_on, threads, approx)
  top, idx = fn(*_global_inputs(mesh, (qa, P("q")), (qidx, P("q")), (ra, P())))
  top = _gather(top).reshape(rows, k)[:q.shape[0]]
  idx = _gather(idx).reshape(rows, k)[:q.shape[0]]
  return _result(q, top, idx)


def _as_device(x, mesh: Mesh) -> jax.Array:
  """``x`` as a jax array on exactly the devices of ``mesh`` (replicated there if it lives on
  other devices, e.g. a training mesh over fewer devices than the kNN's)."""
  x = x if isinstance(x, jax.Array) else jnp.asarray(x)
  if set(x.devices()) != set(np.asarray(mesh.devices).reshape(-1)):
    x = jax.device_put(x, NamedSharding(mesh, P()))
  return x


def _result(q, top: np.ndarray, idx: np.ndarray) -> KNNResult:
  """Squared distances |q|^2 - 2 score (float64, clipped at 0) and indices."""
  sq = _sq_norms_host(q)
  dist = np.maximum(sq[:, None] - 2.0 * top.astype(np.float64), 0.0).astype(np.float32)
  return KNNResult(dist, idx.astype(np.int32))


# ----------------------------------------------------------------------------- first relevant rank


def _first_rank_blocks(qa, qidx, qlab, ra, rlab, *, ref_block, exclude_self):
  """Rank (1-based) of the best relevant reference of each query; 0 if it has none."""
  n_pad = ra.shape[0]
  ridx_all = jnp.arange(n_pad, dtype=jnp.int32)
  steps = n_pad // ref_block

  def scores(q, j):
    r = jax.lax.dynamic_slice_in_dim(ra, j * ref_block, ref_block)
    return jnp.dot(q, r.T, precision=jax.lax.Precision.HIGHEST)

  def one_block(args):
    q, qi, ql = args
    qb = q.shape[0]

    def best_relevant(j, carry):
      best, best_i = carry
      s = scores(q, j)
      ri = jax.lax.dynamic_slice_in_dim(ridx_all, j * ref_block, ref_block)
      rl = jax.lax.dynamic_slice_in_dim(rlab, j * ref_block, ref_block)
      rel = rl[None, :] == ql[:, None]
      if exclude_self:
        rel &= ri[None, :] != qi[:, None]
      s = jnp.where(rel, s, -jnp.inf)
      m = s.max(axis=1)
      a = jnp.argmax(s, axis=1).astype(jnp.int32) + j * ref_block  # first of equal maxima
      better = m > best  # strict: an earlier block (smaller indices) keeps ties
      return jnp.where(better, m, best), jnp.where(better, a, best_i)

    best, best_i = jax.lax.fori_loop(
        0, steps, best_relevant,
        (jnp.full((qb,), -jnp.inf, jnp.float32), jnp.full((qb,), -1, jnp.int32)))

    def count(j, c):
      s = scores(q, j)
      ri = jax.lax.dynamic_slice_in_dim(ridx_all, j * ref_block, ref_block)
      before = (s > best[:, None]) | ((s == best[:, None]) & (ri[None, :] < best_i[:, None]))
      if exclude_self:
        before &= ri[None, :] != qi[:, None]
      return c + before.sum(axis=1, dtype=jnp.int32)

    c = jax.lax.fori_loop(0, steps, count, jnp.zeros((qb,), jnp.int32))
    return jnp.where(best_i >= 0, c + 1, 0)

  return jax.lax.map(one_block, (qa, qidx, qlab))


@functools.lru_cache(maxsize=64)
def _first_rank_fn(mesh: Mesh, ref_block: int, exclude_self: bool):
  body = functools.partial(_first_rank_blocks, ref_block=ref_block, exclude_self=exclude_self)
  return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("q"),) * 3 + (P(), P()),
                               out_specs=P("q"), check_vma=False))


def first_relevant_rank(queries, query_labels: np.ndarray, query_ids: np.ndarray,
                        references, ref_labels: np.ndarray, *, same_set: bool,
                        query_block: Optional[int] = QUERY_BLOCK, ref_block: Optional[int] = None,
                        mesh: Optional[Mesh] = None, sizing: str = "auto",
                        memory_budget: Optional[int] = None) -> np.ndarray:
  """1-based rank of the nearest relevant (same-label) reference of each query; 0 if none.

  Used for Recall@k with k beyond the neighbours kept by :func:`knn`: two blocked passes (best
  relevant score, then how many references rank before it), O(1) extra work per score, so it
  stays cheap however large k is. Same order as :func:`knn` (distance, then index).

  Args:
    queries: ``[Q, D]`` checked float32 queries (numpy, or a jax array kept on its device).
    query_labels: ``[Q]`` int labels (non-negative).
    query_ids: ``[Q]`` each query's index among the references in same-set mode (its own row
      is excluded); ignored otherwise.
    references: ``[N, D]`` checked float32 (numpy or jax, as ``queries``).
    ref_labels: ``[N]`` int labels.
    same_set: whether queries are references (self excluded by ``query_ids``).
    query_block, ref_block, mesh, sizing, memory_budget: as in :func:`knn` (the CPU sizing: 256
      queries, :data:`REF_BLOCK` references).

  Returns:
    ``[Q]`` int64 ranks.
  """
  mesh = flat_mesh(mesh)
  if sizing_lib.resolve(sizing, mesh.devices) == "accelerator" and (
      query_block is None or ref_block is None):
    qb, rb = accelerator_blocks(queries.shape[0], references.shape[0], queries.shape[1], 0, 1,
                                sizing_lib.memory_budget(mesh.devices, memory_budget), mesh.size)
    query_block = qb if query_block is None else query_block
    ref_block = rb if ref_block is None else ref_block
  if isinstance(queries, jax.Array):
    queries, references = _as_device(queries, mesh), _as_device(references, mesh)
  if query_block is None:
    query_block = 256  # no group-max buffer here: the [query_block, ref_block] scores only
  ref_block = REF_BLOCK if ref_block is None else ref_block
  _check_blocks(query_block, ref_block, 1)
  nq = queries.shape[0]
  # Bucket the padded size to a power of two number of blocks so that varying subset sizes
  # reuse a few compiled shapes.
  blocks = max(1, -(-nq // (query_block * mesh.size)))
  blocks = 1 << (blocks - 1).bit_length()
  rows = blocks * query_block * mesh.size
  qa = _aug_queries(queries, rows).reshape(-1, query_block, queries.shape[1] + 1)
  qi = _pad_rows(np.asarray(query_ids, np.int32), rows, -1).reshape(-1, query_block)
  ql = _pad_rows(np.asarray(query_labels, np.int32), rows, -2).reshape(-1, query_block)
  ra = _aug_refs(references, ref_block, min_rows=1)
  rl = _pad_rows(np.asarray(ref_labels, np.int32), ra.shape[0], -1)
  out = _first_rank_fn(mesh, ref_block, same_set)(*_global_inputs(
      mesh, (qa, P("q")), (qi, P("q")), (ql, P("q")), (ra, P()), (rl, P())))
  return _gather(out).reshape(rows)[:nq].astype(np.int64)
