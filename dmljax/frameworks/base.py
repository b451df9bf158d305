"""The framework plug-in contract.

A framework decides *what is minimised* and *what happens between evaluations*; the trainer
(:mod:`dmljax.train`) owns everything else (data, model, optimizer, mesh, checkpoints, logging).

In-step (traced once, inside the single jitted train step):

* ``loss(params, embeddings, labels, state, rng) -> (loss, (metrics, framework_state))``:
  ``embeddings`` ``[B, D]`` are the global batch's (pairs span devices), ``state`` the
  :class:`~dmljax.state.TrainState` before the step (anchor, framework arrays, step). Returning the
  framework state lets stateful methods (a cross-batch memory, PROFS representatives) update it
  inside the same compiled step; ``metrics`` is a dict of scalars to log.

Host-side (plain Python, between steps; may call jitted helpers):

* ``init(rng, model_params, batch_stats) -> (extra_params, framework_state)``: learnable
  parameters beside the model (e.g. ``{"proxies": [R, D]}``) and framework arrays (dict of
  arrays, all checkpointed; they may hold copies of the model, e.g. CCP's per-projection best).
* ``validate()``: raise ``ValueError`` for bad settings before anything compiles.
* ``on_start(state, ctx) -> state``: once, on a fresh run (never on resume: its effect is in
  the checkpoint), e.g. CCP's first proxies from a k-center pool.
* ``after_eval(state, ctx, metric) -> (state, events)``: after every validation evaluation
  (and after the trainer's own best-params bookkeeping), e.g. end a CCP projection. ``events``
  is a dict of scalars to log.

Everything a framework remembers must be in ``state`` (arrays) so a resumed run is exact.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax.numpy as jnp


@dataclasses.dataclass
class HostContext:
  """Services the trainer gives a framework's host-side hooks.

  Attributes:
    config: the run's (locked) ConfigDict.
    tx: the optax optimizer (to re-initialise parts of its state).
    num_classes: training classes.
    embed_pool: ``(model_params, batch_stats, pool_index) -> (points [C, b, D], mask [C, b])``
      (numpy): pool ``pool_index`` of the one-per-class sampler (``b = pool_size`` distinct
      samples per class, deterministic in ``(seed, pool_index)``; ``mask`` is False for repeats
      in classes smaller than ``b``), embedded in inference mode, rows in class order.
    replicate: places host arrays on the mesh (replicated).
    log: ``(step, dict) -> None`` writes scalars to metrics.jsonl / TensorBoard.
    plot: optional ``(state, name, new_proxies) -> None`` for 2-D embedding plots.
  """
  config: Any
  tx: Any
  num_classes: int
  embed_pool: Callable
  replicate: Callable
  log: Callable
  plot: Optional[Callable] = None


class Framework:
  """Base class: a framework with no extra parameters, no state and no hooks."""

  name = "base"

  def __init__(self, config, *, num_classes: int, embedding_dim: int):
    self.config = config
    self.num_classes = int(num_classes)
    self.embedding_dim = int(embedding_dim)

  def validate(self) -> None:
    pass

  def init(self, rng, model_params, batch_stats):
    """``(extra_params, framework_state)`` for a fresh run; the model's initial params and
    BatchNorm statistics are given so framework state can hold copies of them (shapes must not
    depend on anything set later: a resumed run restores into this structure)."""
    del rng, model_params, batch_stats
    return {}, {}

  def loss(self, params, embeddings, labels, state, rng):
    raise NotImplementedError

  def on_start(self, state, ctx: HostContext):
    del ctx
    return state

  def after_eval(self, state, ctx: HostContext, metric: float):
    del ctx, metric
    return state, {}


def class_major_labels(num_classes: int, per_class: int):
  """``[C * P]`` proxy class ids, class-major: row ``c * P + k`` is proxy ``k`` of class ``c``."""
  return jnp.repeat(jnp.arange(num_classes, dtype=jnp.int32), per_class)
