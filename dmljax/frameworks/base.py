"""The framework plug-in contract.

A framework decides *what is minimised*, *how batches are built* and *what happens between
evaluations*; the trainer (:mod:`dmljax.train`) owns everything else (data, model, optimizer,
mesh, evaluation, checkpoints, logging) and knows no framework by name.

Configuration: a framework with settings names its block (``config_key``, e.g. ``"ccp"``) and
builds it in :meth:`Framework.default_config`; :func:`dmljax.configs.base_config` collects the
blocks of every registered framework, so a framework's defaults live beside its code.

Host-side, before training (plain Python; may call jitted helpers):

* ``validate()``: raise ``ValueError`` for bad settings before anything compiles.
* ``make_sampler(labels)``: the host sampler of training batches (deterministic in
  ``(seed, step)``, with ``state_dict`` / ``from_state_dict``), or ``None`` for the trainer's
  default (``config.sampler``). The trainer checkpoints it.
* ``init(rng, model_params, batch_stats) -> (extra_params, framework_state)``: learnable
  parameters beside the model (e.g. ``{"proxies": [R, D]}``) and framework arrays (dict of
  arrays, all checkpointed; they may hold copies of the model, e.g. CCP's per-projection best).
  Shapes must not depend on anything set later: a resumed run restores into this structure.
* ``on_start(state, ctx) -> state``: once, on a fresh run (never on resume: its effect is in
  the checkpoint), e.g. CCP's first proxies from a k-center pool.

Per step:

* host: ``sample(sampler, state, step, process_index, process_count) -> (indices, extras)``:
  this process's part of the global batch (indices into the training set) and per-sample arrays
  the step needs beside images and labels (``{}`` by default; e.g. PROFS's representative flags);
* traced, inside the single jitted train step:
  ``loss(params, embeddings, labels, state, rng, extras) -> (loss, (metrics, framework_state))``.
  ``embeddings`` ``[B, D]`` are the global batch's (pairs span devices), ``state`` the
  :class:`~dmljax.state.TrainState` before the step, ``rng`` the step's key (``fold_in(rng,
  step)``), ``extras`` the sampler's arrays for the global batch. Returning the framework state
  lets stateful methods (a cross-batch memory, stored representative embeddings) update it inside
  the same compiled step; ``metrics`` is a dict of scalars to log;
* traced: ``after_update(before, after) -> after``: any other change of the state once the
  optimizer has stepped (e.g. moving the proximal anchor every M steps). Identity by default.
  A step whose loss or gradient is not finite is skipped whole, this hook's changes included.

What the jitted step sees of the state (the *lean step*): the state without ``best`` (None)
and without the framework-state entries named in ``held_state_keys`` (state only the host hooks
read and change, e.g. CCP's per-projection copy of the model); the anchor is a read-only input of
the step unless ``step_moves_anchor`` (then it is part of the donated step state, as PROFS moves
it at every hold). Only what the step changes is donated and passed through each dispatch; the
rest stays where it is until an evaluation's hooks change it. Checkpoints hold all of it.

Host-side, between evaluations:

* ``after_eval(state, ctx, metrics) -> (state, events)``: after every validation evaluation
  (``metrics`` the validation metrics, ``metrics["map_at_r"]`` the early-stopping criterion) and
  after the trainer's own best-params bookkeeping, e.g. end a CCP projection. ``events`` is a
  dict of scalars to log.
* ``progress(state) -> str``: a few words for the progress line (e.g. ``"projection 2"``).
* ``plot_points(state) -> {legend: (points [N, 2], classes [N])}``: what to draw over the
  training embeddings in 2-D plots (e.g. proxies).

Everything a framework remembers must be in ``state`` (arrays) or be a deterministic function of
the config and the data, so a resumed run is exact.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax.numpy as jnp
import ml_collections
import numpy as np


@dataclasses.dataclass
class HostContext:
  """Generic services the trainer gives a framework's host-side hooks.

  Attributes:
    config: the run's (locked) ConfigDict.
    tx: the optax optimizer (to re-initialise parts of its state).
    num_classes: training classes (labels are ``0..num_classes-1``).
    train_labels: ``[N]`` numpy labels of the training split.
    embed: ``(model_params, batch_stats, indices, raw=False) -> [len(indices), D]`` numpy:
      training images ``indices`` embedded in inference mode (fixed-size batches, one compile);
      ``raw=True``: the embeddings before the model's normalisation (CCP's k-center pool).
    evaluate: ``(model_params, batch_stats, split) -> dict`` retrieval metrics of ``split``
      (``"val"`` or ``"test"``) as the trainer computes them.
    replicate: places host arrays on the mesh (replicated).
    log: ``(step, dict) -> None`` writes scalars to metrics.jsonl / TensorBoard.
    plot: optional ``(state, name, extra_points) -> None`` writes a 2-D embedding plot, with
      ``extra_points`` as in :meth:`Framework.plot_points` drawn on top.
  """
  config: Any
  tx: Any
  num_classes: int
  train_labels: np.ndarray
  embed: Callable
  evaluate: Callable
  replicate: Callable
  log: Callable
  plot: Optional[Callable] = None


class Framework:
  """Base class: a framework with no settings, no extra parameters, no state and no hooks."""

  name = "base"
  config_key: Optional[str] = None

  def __init__(self, config, *, num_classes: int, embedding_dim: int):
    self.config = config
    self.num_classes = int(num_classes)
    self.embedding_dim = int(embedding_dim)

  @staticmethod
  def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict()

  def validate(self) -> None:
    pass

  def make_sampler(self, labels):
    del labels
    return None

  def init(self, rng, model_params, batch_stats):
    del rng, model_params, batch_stats
    return {}, {}

  def on_start(self, state, ctx: HostContext):
    del ctx
    return state

  #: Framework-state keys that only the host hooks read or change (never :meth:`loss` or
  #: :meth:`after_update`): kept out of the jitted step (see "the lean step" above).
  held_state_keys: tuple = ()

  #: Whether :meth:`after_update` changes ``state.anchor`` (PROFS); otherwise the anchor is a
  #: read-only, non-donated input of the step.
  step_moves_anchor = False

  #: Whether :meth:`sample` reads the train state. When False (the default) the batch of a
  #: step is ``sampler.batch(step, ...)``, a pure function of the step, and the input pipeline
  #: decodes batches ahead in worker processes; a framework that overrides :meth:`sample` to
  #: choose indices from the state sets it True.
  sample_uses_state = False

  def sample(self, sampler, state, step: int, process_index: int = 0, process_count: int = 1):
    del state
    return sampler.batch(step, process_index=process_index, process_count=process_count), {}

  def loss(self, params, embeddings, labels, state, rng, extras=None):
    raise NotImplementedError

  def after_update(self, before, after):
    del before
    return after

  def after_eval(self, state, ctx: HostContext, metrics):
    del ctx, metrics
    return state, {}

  def progress(self, state) -> str:
    del state
    return ""

  def plot_points(self, state) -> dict:
    del state
    return {}


def class_major_labels(num_classes: int, per_class: int):
  """``[C * P]`` proxy class ids, class-major: row ``c * P + k`` is proxy ``k`` of class ``c``."""
  return jnp.repeat(jnp.arange(num_classes, dtype=jnp.int32), per_class)
