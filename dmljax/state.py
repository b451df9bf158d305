"""The train state: one pytree holding everything a run needs to continue exactly.

Nothing lives in Python objects: a checkpoint of :class:`TrainState` (plus the small JSON host
state written in the same checkpoint step, see :mod:`dmljax.checkpoint`) is the whole run.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from dmljax import numerics

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Attributes:
    step: int32 scalar, optimizer steps taken.
    params: ``{"model": flax params, **framework params}`` e.g. ``"proxies": [C*P, D]``.
    batch_stats: BatchNorm running statistics of the model.
    opt_state: optax state over ``params``.
    anchor: proximal anchor, a copy of ``params["model"]`` (CCP's theta^(k-1)).
    best: ``{"params", "batch_stats"}`` of the best validation evaluation so far.
    tracker: early-stopping scalars: ``best_metric`` (float32, -inf before the first eval),
      ``best_step``, ``evals_since_best``, ``num_evals`` (int32); and the health counters of the
      train step: ``nonfinite_steps`` (steps whose update was skipped for a non-finite loss or
      gradient) and ``nonfinite_streak`` (how many of the latest steps in a row were).
    framework: framework state (dict of arrays: projection index, proxy labels, memory, ...).
    rng: legacy uint32[2] PRNG key; per-step keys are ``fold_in(rng, step)``.
  """
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  anchor: PyTree
  best: PyTree
  tracker: dict
  framework: dict
  rng: jax.Array


def new_tracker() -> dict:
  return {
      "best_metric": jnp.asarray(-jnp.inf, jnp.float32),
      "best_step": jnp.asarray(-1, jnp.int32),
      "evals_since_best": jnp.asarray(0, jnp.int32),
      "num_evals": jnp.asarray(0, jnp.int32),
      "nonfinite_steps": jnp.asarray(0, jnp.int32),
      "nonfinite_streak": jnp.asarray(0, jnp.int32),
  }


copy_tree = numerics.copy_tree  # re-exported: it lives in the leaf module


def create_train_state(*, rng, model_params, batch_stats, extra_params, framework_state, tx) -> TrainState:
  """Assembles the initial state; anchor and best start as copies of the initial model."""
  params = {"model": model_params, **extra_params}
  return TrainState(
      step=jnp.asarray(0, jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=tx.init(params),
      anchor=copy_tree(model_params),
      best={"params": copy_tree(params), "batch_stats": copy_tree(batch_stats)},
      tracker=new_tracker(),
      framework=framework_state,
      rng=rng,
  )
