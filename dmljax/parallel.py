"""Data parallelism over a ``jax.sharding`` mesh.

One mesh axis, ``"data"``, spans every device of every process. Batches are sharded along it,
everything else (params, optimizer state, proxies, framework state) is replicated. The train step
is a single ``jit`` whose loss sees the *global* batch: the model runs on each device's shard and
XLA gathers the embeddings where the pairwise loss needs them, so pairs span devices and BatchNorm
statistics are over the global batch. The result is the single-device computation, only split.

Multi-process: each process feeds only its own slice of the global batch (the samplers'
``process_index`` / ``process_count``) and :func:`global_batch` assembles the global array with
``jax.make_array_from_process_local_data``.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dmljax import numerics

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices).reshape(-1), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
  """``[k, B, ...]``: k stacked batches (several train steps per dispatch), each split over the
  data axis as :func:`batch_sharding` splits one."""
  return NamedSharding(mesh, P(None, DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "config.batch_size") -> None:
  """ValueError (before anything compiles) if the batch cannot be split evenly."""
  n = mesh.devices.size
  if batch_size % n:
    lo, hi = (batch_size // n) * n, (batch_size // n + 1) * n
    raise ValueError(
        f"{what}={batch_size} is not divisible by the {n} devices of the mesh; use a multiple "
        f"of {n} (e.g. {lo or hi} or {hi}) or run on fewer devices.")
  if batch_size % jax.process_count():
    raise ValueError(f"{what}={batch_size} is not divisible by the process count "
                     f"{jax.process_count()}.")


def global_batch(local_arrays, mesh: Mesh, stacked: bool = False):
  """Builds globally sharded arrays from this process's slice of each (numpy) array.

  Args:
    local_arrays: pytree of numpy arrays, each holding this process's ``B / process_count`` rows
      (``stacked``: ``[k, B / process_count, ...]``, k batches).
    mesh: the data mesh.
    stacked: the arrays are k stacked batches, the batch axis second.

  Returns:
    The same pytree of ``jax.Array`` with global batch dimension ``B``, sharded over ``data``.
  """
  sharding = stacked_batch_sharding(mesh) if stacked else batch_sharding(mesh)
  pc = jax.process_count()
  axis = 1 if stacked else 0

  def build(x):
    x = np.asarray(x)
    global_shape = x.shape[:axis] + (x.shape[axis] * pc,) + x.shape[axis + 1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree.map(build, local_arrays)


def replicate(tree, mesh: Mesh):
  """Places every leaf fully replicated on the mesh (values must agree across processes)."""
  sharding = replicated(mesh)

  def put(x):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  return jax.tree.map(put, tree)


to_host = numerics.to_host  # re-exported: it lives in the leaf module
