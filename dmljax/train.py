"""``train_and_evaluate(config, workdir)``: the dmljax training loop and what wires it.

The module reads top to bottom as a run does; the parts it wires live in modules of their own:

* **input** (:mod:`dmljax.inputs`): the data set's splits, the host sampler of training batches
  and the worker pipeline that decodes them;
* **state** (:func:`create_state`): model variables, the framework's parameters and arrays, the
  optimizer state, in one :class:`~dmljax.state.TrainState`;
* **step** (:func:`make_train_step`, :class:`StepDispatcher`): one jitted step over the mesh; a
  non-finite loss or gradient is never applied. The step sees the *lean* state: what only
  evaluations change (the best parameters, e.g. CCP's per-projection copy) stays outside and is
  never donated, the proximal anchor is a read-only input; ``config.steps_per_dispatch`` runs
  several steps per dispatch (a scan over prefetched batches, up to each evaluation and
  checkpoint);
* **evaluation** (:mod:`dmljax.evaluation`): inference-mode embedding and the retrieval (and
  optionally clustering) metrics of a split, the final table;
* **the run directory** (:mod:`dmljax.rundir`): metrics.jsonl, TensorBoard, config.json, plots,
  the config comparison that guards exact resumption;
* **checkpointing** (:func:`restore_or_start`): Orbax restore with the config check, or a fresh
  start (framework ``on_start``, the untrained baseline);
* **the loop** (:func:`train_and_evaluate`): steps, logging, evaluations and framework hooks,
  periodic / SIGTERM checkpoints, then the best parameters on validation and test beside the
  trivial baselines.

The trainer knows no framework by name: what differs between methods is behind the contract of
:mod:`dmljax.frameworks.base`.

Exact resumption: every random choice is a function of the seed and the step (per-step keys
``fold_in(rng, step)``, samplers deterministic in ``(seed, step)``), evaluations happen at fixed
steps, and all framework / early-stopping state is part of the checkpointed
:class:`~dmljax.state.TrainState`. A checkpoint is written only after a step's evaluation and
hooks, so a run restarted from any checkpoint replays exactly the computation of an
uninterrupted one.
"""
from __future__ import annotations

import json
import math
import time
from typing import Any, Callable, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dmljax import checkpoint as ckpt_lib
from dmljax import errors
from dmljax import evaluation
from dmljax import frameworks
from dmljax import inputs
from dmljax import models
from dmljax import numerics
from dmljax import optim
from dmljax import parallel
from dmljax import rundir
from dmljax import state as state_lib
from dmljax.evaluation import model_variables
# Names that lived in this module before evaluation, input and the run directory had their own;
# importable from here as before.
from dmljax.evaluation import (EVAL_WORKERS_MIN_IMAGES, PIXEL_BASELINE_MAX_VALUES,  # noqa: F401
                               TABLE_METRICS, Evaluator, embed_source, embedding_metrics,
                               make_embed_fn, pixel_embeddings, take)
from dmljax.inputs import (SAMPLERS, Input, create_input, fit_batch,  # noqa: F401
                           input_transforms, input_workers, make_sampler, make_train_loader)
from dmljax.rundir import (RESUME_SAFE_KEYS, SAMPLER_KEYS, config_changes,  # noqa: F401
                           config_dict, config_fingerprint, is_remote, read_jsonl)

BASELINES = ("untrained", "pixels")


# ============================================================================= state


def create_state(config, model, framework, tx, data: inputs.Input) -> state_lib.TrainState:
  """The initial train state (host arrays; replicate it on the mesh)."""
  rng = jax.random.PRNGKey(config.seed)
  init_rng, fw_rng, train_rng = jax.random.split(rng, 3)
  dummy = jnp.zeros((1,) + tuple(data.image_shape), jnp.uint8)
  variables = jax.jit(lambda r, x: model.init(r, numerics.prepare_images(x), train=False))(
      init_rng, dummy)
  if config.model.get("pretrained", ""):
    # ImageNet trunk weights from the user's PyTorch file (converted once, then cached); the
    # embedding layer keeps its initialisation. Mismatches fail here, before any step.
    variables = models.load_pretrained(config.model, variables)
  batch_stats = variables.get("batch_stats", {})
  extra, fstate = framework.init(fw_rng, variables["params"], batch_stats)
  return state_lib.create_train_state(
      rng=train_rng, model_params=variables["params"], batch_stats=batch_stats,
      extra_params=extra, framework_state=fstate, tx=tx)


# ============================================================================= step


def make_train_step(model, framework, tx) -> tuple[Callable, list]:
  """The (un-jitted) train step ``(state, images, labels, extras) -> (state, metrics)``.

  Returns the function and a one-element list counting how often it is traced (the tests
  assert it is traced once).
  """
  traces = [0]

  def train_step(state, images, labels, extras):
    traces[0] += 1
    extras = dict(extras)
    # Each process's rows carry its own SIGTERM flag; their OR comes back in the metrics, so all
    # processes read the same agreed value (see ``PREEMPT_KEY``).
    preempt = extras.pop(PREEMPT_KEY, None)
    rng = jax.random.fold_in(state.rng, state.step)
    images = numerics.prepare_images(images)
    has_bs = bool(state.batch_stats)

    def loss_fn(params):
      if has_bs:
        emb, mutated = model.apply(model_variables(params["model"], state.batch_stats), images,
                                   train=True, mutable=["batch_stats"])
        new_bs = mutated["batch_stats"]
      else:
        emb, new_bs = model.apply(model_variables(params["model"], None), images, train=True), {}
      loss, (metrics, fstate) = framework.loss(params, emb, labels, state, rng, extras)
      return loss, (metrics, fstate, new_bs)

    (loss, (metrics, fstate, new_bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite loss, gradient or result is never applied: the whole update (params,
    # optimizer moments, BatchNorm statistics, framework state) is skipped and counted; the
    # step counter still advances so the next step draws the next batch.
    ok = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(params)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    tracker = dict(state.tracker)
    tracker["nonfinite_steps"] = state.tracker["nonfinite_steps"] + jnp.where(ok, 0, 1)
    tracker["nonfinite_streak"] = jnp.where(ok, 0, state.tracker["nonfinite_streak"] + 1)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                   nonfinite_steps=tracker["nonfinite_steps"],
                   nonfinite_streak=tracker["nonfinite_streak"])
    if preempt is not None:
      metrics[PREEMPT_KEY] = jnp.any(preempt)
    stepped = framework.after_update(state, state.replace(
        step=state.step + 1, params=params, batch_stats=new_bs, opt_state=opt_state,
        framework=fstate))
    new_state = keep(stepped, state).replace(step=state.step + 1, tracker=tracker)
    return new_state, metrics

  return train_step, traces


#: The extras key of the per-row preemption flag (the trainer adds it; frameworks never see it).
#: Preemption is agreed through the train step itself: every process puts its own SIGTERM flag
#: in its rows of the global batch, the step returns their OR, and every process reads that
#: result one step later (when it also reads the step's health), so all processes decide to save
#: at the same step and enter the collective save together, without an extra collective.
PREEMPT_KEY = "_preempt"


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def jit_train_step(step_fn, mesh):
  """jit with the batch sharded over ``data``, the state replicated and donated."""
  rep, bat = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(step_fn, in_shardings=(rep, bat, bat, bat), out_shardings=(rep, rep),
                 donate_argnums=(0,))


# ============================================================================= dispatch


def resolve_steps_per_dispatch(config, framework) -> int:
  """``config.steps_per_dispatch``, with 0 (auto) resolved: 8 on GPU/TPU, 1 on CPU (a step takes
  seconds there, dispatch is noise) and for frameworks whose batches are chosen from the train
  state (those need the state after every step).

  Raises:
    ValueError: more than one step per dispatch for a framework that samples from the state.
  """
  k = int(config.get("steps_per_dispatch", 0))
  uses_state = bool(getattr(framework, "sample_uses_state", False))
  if k == 0:
    return 1 if uses_state or jax.default_backend() == "cpu" else AUTO_STEPS_PER_DISPATCH
  if k > 1 and uses_state:
    raise ValueError(f"config.steps_per_dispatch={k}, but {config.framework} chooses each batch "
                     "from the train state after the previous step (PROFS with HNCM); set "
                     "--config.steps_per_dispatch=1 (or 0, auto).")
  return k


#: ``config.steps_per_dispatch = 0`` on an accelerator.
AUTO_STEPS_PER_DISPATCH = 8


class StepDispatcher:
  """The trainer's train steps over the lean state: one step, or a scan over ``k`` stacked batches.

  The jitted functions never see what only evaluations change (:func:`dmljax.state.
  split_for_step`): ``best`` and the framework's ``held_state_keys`` entries stay outside, the
  anchor is a read-only input (unless ``framework.step_moves_anchor``), and only the rest is
  donated. With ``k > 1`` one dispatch runs ``k`` steps with ``jax.lax.scan`` over batches stacked
  ``[k, B, ...]`` (sharded over ``data`` on their second axis) and returns every step's metrics
  stacked ``[k]``; each step is the same function as a single step (a non-finite one is skipped
  on its own), so the result equals ``k`` single steps.

  ``dispatch(state, images, labels, extras, steps)`` -> ``(state, metrics)`` takes and returns the
  whole :class:`~dmljax.state.TrainState`; ``steps`` is 1 or ``k``.
  """

  def __init__(self, step_fn: Callable, framework, mesh, k: int = 1):
    self.k = int(k)
    self.held_keys = tuple(getattr(framework, "held_state_keys", ()))
    self.anchor_in_step = bool(getattr(framework, "step_moves_anchor", False))
    const_anchor = not self.anchor_in_step

    def one(carry, anchor, images, labels, extras):
      state = carry.replace(anchor=anchor) if const_anchor else carry
      new, metrics = step_fn(state, images, labels, extras)
      return (new.replace(anchor=None) if const_anchor else new), metrics

    def many(carry, anchor, images, labels, extras):
      return jax.lax.scan(lambda c, xs: one(c, anchor, *xs), carry, (images, labels, extras))

    rep = parallel.replicated(mesh)

    def jit(fn, bat):
      return jax.jit(fn, in_shardings=(rep, rep, bat, bat, bat), out_shardings=(rep, rep),
                     donate_argnums=(0,))
    self._fns = {1: jit(one, parallel.batch_sharding(mesh))}
    if self.k > 1:
      self._fns[self.k] = jit(many, parallel.stacked_batch_sharding(mesh))

  def __call__(self, state, images, labels, extras, steps: int = 1):
    carry, anchor, held = state_lib.split_for_step(state, self.held_keys, self.anchor_in_step)
    carry, metrics = self._fns[steps](carry, anchor, images, labels, extras)
    return state_lib.merge_after_step(carry, anchor, held), metrics


def dispatch_length(step: int, k: int, config) -> int:
  """Steps of the next dispatch from ``step``: ``k`` when the next evaluation, periodic
  checkpoint and the end of training are all at least ``k`` steps away, else 1 (the steps up to
  such a boundary run one at a time, so only two functions ever compile). A pure function of the
  step: a run resumed at any dispatch boundary dispatches as the uninterrupted one."""
  if k <= 1:
    return 1
  ends = [config.total_steps, (step // config.eval_every_steps + 1) * config.eval_every_steps]
  every = int(config.checkpoint.every_steps or 0) if config.checkpoint.enabled else 0
  if every:
    ends.append((step // every + 1) * every)
  return k if min(ends) - step >= k else 1


def _row(metrics: dict, i: int) -> dict:
  """Step ``i`` of a dispatch's host metrics (scalars for a single step, ``[k]`` for a scan)."""
  return {key: (v[i] if np.ndim(v) else v) for key, v in metrics.items()}


# ============================================================================= precision


def resolve_precision(config):
  """``config`` with ``model.dtype="auto"`` replaced by the dtype it means on this backend
  (:func:`dmljax.models.layers.auto_dtype`), so the run's config.json and checkpoints record the
  dtype actually used; other configs are returned as they are."""
  from dmljax.models import layers  # pylint: disable=g-import-not-at-top
  if config.model.get("dtype", "float32") != layers.AUTO_DTYPE:
    return config
  config = config.copy_and_resolve_references()
  config.model.dtype = layers.auto_dtype()
  logging.info("model.dtype='auto' on %s: %s compute.", jax.default_backend(), config.model.dtype)
  return config


def precision_record(config) -> dict:
  """What a checkpoint records of the numerics: backend, compute dtype, float32 matmul precision.

  ``matmul_precision`` is JAX's ``jax_default_matmul_precision`` (None: XLA's default, which on
  NVIDIA GPUs from Ampere on runs float32 matmuls and convolutions in TF32, and on TPU in
  bfloat16 passes; "highest" asks for full float32).
  """
  return {"backend": jax.default_backend(), "model_dtype": str(config.model.dtype),
          "matmul_precision": jax.config.jax_default_matmul_precision}


# ============================================================================= checkpointing


def _random_init_variables(config, image_shape) -> dict:
  """The model's variables as :func:`create_state` initialises them, before any pretrained load."""
  init_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)[0]
  model = models.get_model(config.model)
  dummy = jnp.zeros((1,) + tuple(image_shape), jnp.uint8)
  init = jax.jit(lambda r, x: model.init(r, numerics.prepare_images(x), train=False))
  return init(init_rng, dummy)


def restore_or_start(config, workdir, checkpointer, state, framework, ctx_factory, evaluator,
                     sampler, mesh, allow_config_change: bool = False):
  """Resumes from the newest intact checkpoint, or starts fresh.

  Resuming checks the config against the checkpoint's (:func:`config_changes`) and raises
  :class:`dmljax.errors.ConfigChanged` for a change that breaks exact resumption unless
  ``allow_config_change``; the checkpointed sampler is continued unless its settings changed.
  A fresh start runs the framework's ``on_start`` and measures the untrained baseline.

  Returns:
    ``(state, host, sampler, ctx, logger, resumed)``; ``ctx_factory(logger)`` builds the
    frameworks' :class:`~dmljax.frameworks.HostContext`.
  """
  restored = checkpointer.restore(state) if checkpointer is not None else None
  cfg_now, changed = rundir.config_dict(config), {}
  if restored is not None:
    host = restored[1]
    changed = rundir.config_changes(host["config"], cfg_now) if "config" in host else {}
    if not allow_config_change:
      try:
        inputs.check_image_copy(host, config, workdir)  # dataset.image_copy: not another copy
      except errors.ConfigChanged:
        checkpointer.close()
        raise
    backend = host.get("precision", {}).get("backend")
    if "model.dtype" in changed and backend and backend != jax.default_backend():
      logging.warning("%s was trained on %s with model.dtype=%s; this run is on %s with "
                      "model.dtype=%s.", workdir, backend, changed["model.dtype"][0],
                      jax.default_backend(), changed["model.dtype"][1])
    if changed and not allow_config_change:
      listing = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
      why = ""
      if "model.dtype" in changed and backend and backend != jax.default_backend():
        why = (f" (the run was trained on {backend}; model.dtype='auto' means bfloat16 on an "
               "accelerator and float32 on CPU: pass the old dtype explicitly to continue "
               "it here)")
      checkpointer.close()
      raise errors.ConfigChanged(
          f"the config differs from the one {workdir} was trained with, which breaks exact "
          f"resumption: {listing}{why}. Run with the old values, use a new --workdir, or pass "
          "--allow_config_change to continue with the new values.")
    if changed:  # allowed: refuse what the resumed run would not honour
      from dmljax import extend  # pylint: disable=g-import-not-at-top
      try:
        extend.check_changes(config, host, parallel.to_host(restored[0].tracker), changed,
                             workdir)
      except errors.ConfigChanged:
        checkpointer.close()
        raise
  logger = rundir.Logger(workdir, None if restored is None else int(restored[1]["step"]))
  ctx = ctx_factory(logger)
  if restored is not None:
    state, host = restored
    from dmljax import extend  # pylint: disable=g-import-not-at-top
    host = extend.reopen(config, host, parallel.to_host(state.tracker), workdir)
    state = parallel.replicate(state, mesh)
    if changed:
      logging.warning("Continuing %s with changed config keys: %s", workdir, sorted(changed))
    if host.get("sampler") and not set(changed) & set(rundir.SAMPLER_KEYS):
      # Continue with the checkpointed sampler; its labels fingerprint makes a data set that
      # changed under the run fail here instead of silently drawing other batches.
      sampler = type(sampler).from_state_dict(ctx.train_labels, host["sampler"])
    if jax.process_index() == 0:
      print(f"Resumed from step {host['step']} of {workdir}", flush=True)
  else:
    state = parallel.replicate(framework.on_start(state, ctx), mesh)
    host = {"step": 0, "done": False,
            "sampler": sampler.state_dict() if hasattr(sampler, "state_dict") else {}}
    if "untrained" in config.baselines:
      from dmljax import console  # pylint: disable=g-import-not-at-top
      console.phase("Measuring the untrained network (the baseline row of the final table)")
      # The untrained network (after the framework's start, e.g. CCP's first proxies: the model
      # is still the initial one), measured before step 1 and kept with the checkpoints.
      host["baselines"] = {
          f"untrained/{name}/{k}": v for name in ("val", "test")
          for k, v in evaluator.evaluate(state.params["model"], state.batch_stats, name).items()}
      if config.model.get("pretrained", ""):
        # With a pretrained trunk the row above is that trunk without fine-tuning (and its
        # untrained head); the randomly initialised network is measured beside it.
        rand = parallel.replicate(_random_init_variables(config, evaluator.data.image_shape), mesh)
        host["baselines"].update({
            f"random_init/{name}/{k}": v for name in ("val", "test")
            for k, v in evaluator.evaluate(rand["params"], rand.get("batch_stats", {}),
                                           name).items()})
  host["sampler"] = rundir.jsonable(host.get("sampler", {}))
  host["precision"] = precision_record(config)
  host["config"], host["config_fingerprint"] = cfg_now, rundir.config_fingerprint(cfg_now)
  rundir.save_config(config, workdir)
  return state, host, sampler, ctx, logger, restored is not None


def _check_finite(config, metrics, step, checkpointer, workdir):
  """Raises TrainingDiverged once ``max_consecutive_nonfinite`` steps in a row were skipped.

  ``metrics``: a dispatch's metrics (``[k]`` for k steps per dispatch), ``step`` its last step.
  """
  if metrics is None:
    return
  streaks = np.atleast_1d(parallel.to_host(metrics["nonfinite_streak"]))
  over = np.flatnonzero(streaks >= config.max_consecutive_nonfinite)
  if not len(over):
    return
  step, streak = step - len(streaks) + 1 + int(over[0]), int(streaks[over[0]])
  raise errors.TrainingDiverged(errors.diverged_message(
      config, checkpointer, f"steps {step - streak + 1}-{step} ({streak} in a row) had a "
      "non-finite loss or gradient and none of them was applied",
      " or raise config.max_consecutive_nonfinite"))


# ============================================================================= the loop


def _check_config(config, mesh):
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval_batch_size, mesh, "config.eval_batch_size")
  if config.eval_every_steps < 1 or config.total_steps < 1:
    raise ValueError("config.total_steps and config.eval_every_steps must be >= 1.")
  if config.max_consecutive_nonfinite < 1:
    raise ValueError("config.max_consecutive_nonfinite must be >= 1, got "
                     f"{config.max_consecutive_nonfinite}.")
  unknown = sorted(set(config.baselines) - set(BASELINES))
  if unknown:
    raise ValueError(f"Unknown config.baselines {unknown}; valid: {list(BASELINES)}.")


def train_and_evaluate(config, workdir: str, *, allow_config_change: bool = False,
                       on_final_embeddings: Optional[Callable] = None) -> dict[str, Any]:
  """Checks ``config``, locks ``workdir`` and runs :func:`_train_and_evaluate` (same
  arguments and result); a run already finished with this config returns its final metrics
  without loading, compiling or evaluating anything (:mod:`dmljax.extend`).

  Raises:
    dmljax.lock.WorkdirLocked: another live run holds ``workdir``.
    dmljax.config_check.ConfigError: a bad value, loss argument, weight file or data set.
  """
  from dmljax import config_check, extend, lock as lock_lib  # pylint: disable=g-import-not-at-top
  config_check.check_values(config)  # before anything is created or compiled
  config = resolve_precision(config)  # as recorded in config.json (model.dtype='auto' resolved)
  rundir.makedirs(workdir)
  lock = lock_lib.acquire_for_run(workdir)
  try:
    final = extend.finished_result(config, workdir)
    if final is not None:
      extend.announce_finished(workdir, final)
      return final
    return _train_and_evaluate(config, workdir, allow_config_change=allow_config_change,
                               on_final_embeddings=on_final_embeddings)
  finally:
    if lock is not None:
      lock.release()


def _train_and_evaluate(config, workdir: str, *, allow_config_change: bool = False,
                        on_final_embeddings: Optional[Callable] = None) -> dict[str, Any]:
  """Trains and evaluates the model described by ``config``; returns the final metrics.

  Args:
    config: a ConfigDict as built by ``configs/*.py``.
    workdir: run directory (checkpoints, metrics.jsonl, tensorboard/, config.json, plots/).
      An existing checkpoint there is resumed automatically.
    allow_config_change: resume even if ``config`` differs from the checkpoint's config in keys
      that break exact resumption (:data:`RESUME_SAFE_KEYS` may always change), continuing with
      the new values; otherwise such a change raises :class:`dmljax.errors.ConfigChanged`.
    on_final_embeddings: called as ``on_final_embeddings(name, embeddings, split)`` with the
      best parameters' ``[N, D]`` numpy embeddings of the "val" and "test" splits at the final
      evaluation, before ``final_metrics.json`` is written (``dmljax.protocol`` saves them).

  Returns:
    ``{"val/<metric>": ..., "test/<metric>": ..., "untrained/val/<metric>": ...,
    "pixels/test/<metric>": ..., "step": ..., "best_step": ..., "nonfinite_steps": ...,
    "train_step_traces": ...}``, or ``{"preempted": True, "step": ...}`` after a SIGTERM.

  Raises:
    dmljax.errors.TrainingDiverged: ``config.max_consecutive_nonfinite`` steps in a row had a
      non-finite loss or gradient (none of them was applied), or evaluation embeddings were not
      finite.
  """
  # ------------------------------------------------------------------- setup
  rundir.makedirs(workdir)  # a local folder, or a bucket path (gs://...)
  rundir.enable_compilation_cache(config)
  config = resolve_precision(config)
  if config.num_devices < 0 or config.num_devices > jax.device_count():
    raise ValueError(f"config.num_devices={config.num_devices} but there are "
                     f"{jax.device_count()} devices; use 0 (all) or 1..{jax.device_count()}.")
  mesh = parallel.make_mesh(jax.devices()[:config.num_devices] if config.num_devices else None)
  _check_config(config, mesh)

  # ------------------------------------------------------------------- input, model, state
  from dmljax import console as console_lib  # pylint: disable=g-import-not-at-top
  console_lib.phase(f"Loading data set {config.dataset.name!r} for {workdir}")
  data = create_input(config)
  config = fit_batch(config, data, mesh.size)  # sampler.fit_batch: as many classes as there are
  config = inputs.resolve_image_copy(config, data)  # dataset.image_copy as read, recorded
  console_lib.phase(f"Building {config.model.name} and the {config.framework} train state "
                    f"({data.num_classes} training classes, {len(data.train_labels)} images)")
  model = models.get_model(config.model)
  framework = frameworks.get_framework(config, num_classes=data.num_classes,
                                       embedding_dim=config.model.embedding_dim)
  sampler = make_sampler(config, framework, data.train_labels,  # m > class size fails here
                         class_names=getattr(data.train, "class_names", None))
  tx = optim.make_optimizer(config.optim, config.total_steps,
                            steps_per_epoch=math.ceil(len(data.train_labels) / config.batch_size))
  state = parallel.replicate(create_state(config, model, framework, tx, data), mesh)

  # ------------------------------------------------------------------- compiled functions
  step_fn, traces = make_train_step(model, framework, tx)
  k = resolve_steps_per_dispatch(config, framework)
  train_step = StepDispatcher(step_fn, framework, mesh, k)
  evaluator = Evaluator(config, model, mesh, data)

  # ------------------------------------------------------------------- resume or start
  checkpointer = None
  if config.checkpoint.enabled:
    checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=config.checkpoint.max_to_keep,
                                         save_best=config.checkpoint.save_best,
                                         async_save=config.checkpoint.get("async_save", True))
  evaluator.checkpointer = checkpointer
  plot = rundir.make_plotter(config, workdir, framework, evaluator.embed_train, data.train_labels)

  def ctx_factory(logger):
    return frameworks.HostContext(
        config=config, tx=tx, num_classes=data.num_classes, train_labels=data.train_labels,
        embed=evaluator.embed_train, evaluate=evaluator.evaluate,
        replicate=lambda t: parallel.replicate(t, mesh), log=logger.log, plot=plot)

  state, host, sampler, ctx, logger = restore_or_start(
      config, workdir, checkpointer, state, framework, ctx_factory, evaluator, sampler, mesh,
      allow_config_change)[:5]

  def save(step, wait=False):
    if checkpointer is not None:
      # The pipeline's state is that of this same step: the batches of steps > step are
      # recomputed from (seed, step) on resume, whatever had been prefetched. The save returns
      # once the arrays are in host memory; the files are written while training goes on.
      checkpointer.save(step, state, dict(host, step=step,
                                          pipeline=inputs.pipeline_state(step, data, config)),
                        wait=wait)

  loader = None

  def close():
    logger.close()
    evaluator.close()
    if loader is not None:
      loader.close()
    if checkpointer is not None:
      checkpointer.close()

  # ------------------------------------------------------------------- loop
  step = int(host["step"])
  # The pipeline restarts at the checkpoint's step: batches are a function of (seed, step), so
  # whatever had been decoded ahead before the stop is simply decoded again.
  loader = make_train_loader(config, data, framework, sampler, step)
  preempt = ckpt_lib.PreemptionFlag().install()
  pi, pc = jax.process_index(), jax.process_count()
  t0, t_steps, last, pending = time.time(), 0, {}, None
  if not host["done"] and step < config.total_steps:
    console_lib.phase(f"Training from step {step} to {config.total_steps} (the first step "
                      "compiles)")
  console = console_lib.Console(config.total_steps, step, rundir.progress_enabled(config))
  try:
    while not host["done"] and step < config.total_steps:
      n = dispatch_length(step, k, config)
      rows = []
      for s in range(step, step + n):
        idx, extras = framework.sample(sampler, state, s, pi, pc)
        idx = np.asarray(idx)
        if loader.batch_indices_fn is None:  # indices chosen from the state: decode them now
          batch = loader.load(s, idx)
        else:  # decoded ahead by the workers; the same indices by construction
          got_step, batch, got_idx = next(loader)
          if got_step != s or not np.array_equal(got_idx, idx):
            raise RuntimeError(f"input pipeline out of step: it produced step {got_step}, the "
                               f"loop is at step {s}.")
        extras = dict(extras, **{PREEMPT_KEY: np.full(len(idx), preempt.is_set)})
        rows.append((batch, data.train_labels[idx].astype(np.int32), extras))
      local = rows[0] if n == 1 else jax.tree.map(lambda *x: np.stack(x), *rows)
      images, labels, extras = parallel.global_batch(local, mesh, stacked=n > 1)
      state, last = train_step(state, images, labels, extras, n)
      first, step = step, step + n
      t_steps += n
      evaluator.step = step
      # The previous dispatch's health and the agreed preemption flag, read while this one runs
      # (no stall of the pipeline); every process reads the same values.
      preempted = False
      if pending is not None:
        _check_finite(config, pending, first, checkpointer, workdir)
        preempted = bool(np.any(parallel.to_host(pending[PREEMPT_KEY])))
      pending = last

      logged = [s for s in range(first + 1, step + 1)
                if s % config.log_every_steps == 0 or s == config.total_steps]
      if logged:  # every step's metrics came back: each logged step gets its own
        vals = parallel.to_host(last)
        rate = t_steps / max(time.time() - t0, 1e-9)
        for s in logged:
          row = _row(vals, s - first - 1)
          logger.log(s, dict(row, steps_per_second=rate))
        console.train(logged[-1], rate, float(row["loss"]), framework.progress(state))
        t0, t_steps = time.time(), 0

      if step % config.eval_every_steps == 0 or step == config.total_steps:
        _check_finite(config, pending, step, checkpointer, workdir)
        state, stop = _eval_and_hooks(state, step, evaluator, framework, ctx, config, logger,
                                      checkpointer, console)
        host["done"] = bool(stop or step >= config.total_steps)
        if stop and step < config.total_steps:
          tr = parallel.to_host(state.tracker)
          console.early_stop(step, int(tr["evals_since_best"]), config.patience_evals,
                             float(tr["best_metric"]), int(tr["best_step"]))
        t0, t_steps = time.time(), 0  # steps/s counts training only

      if preempted:
        # Every process gets here at the same step (the flag is the OR over processes of the
        # previous step's input), so all of them write this step together and exit.
        host["step"] = step
        save(step, wait=True)  # on disk before the process exits
        console.close()
        from dmljax import distributed  # pylint: disable=g-import-not-at-top
        distributed.barrier("dmljax_preemption_saved")  # every process has saved: then exit
        logging.warning("Preemption (signal %s on this or another process): saved step %d, "
                        "exiting.", preempt.received, step)
        close()
        return {"preempted": True, "step": step}
      if (config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0
          and not host["done"]):
        _check_finite(config, pending, step, checkpointer, workdir)
        host["step"] = step
        save(step)
    _check_finite(config, pending, step, checkpointer, workdir)
  except BaseException:
    console.close()
    close()
    raise
  finally:
    preempt.uninstall()

  # ------------------------------------------------------------------- final
  host["done"], host["step"] = True, step
  save(step)  # final checkpoint (a restart from here only re-runs the final evaluation)
  console.close()
  best = state.best
  tracker = parallel.to_host(state.tracker)
  console_lib.phase(f"Final evaluation of the best parameters (step {int(tracker['best_step'])}"
                    ") on the validation and test splits")
  final: dict[str, Any] = {"step": step, "best_step": int(tracker["best_step"]),
                           "nonfinite_steps": int(tracker["nonfinite_steps"]),
                           "train_step_traces": traces[0]}
  for name in ("val", "test"):
    def hook(emb, split, name=name):
      if on_final_embeddings is not None:
        on_final_embeddings(name, emb, split)
      if name == "test":  # plots/retrievals_test.{png,html} and the TensorBoard projector
        from dmljax import gallery  # pylint: disable=g-import-not-at-top
        gallery.write_run_outputs(workdir, name, emb, split, data.eval_transform, seed=config.seed)
    for k, v in evaluator.evaluate(best["params"]["model"], best["batch_stats"], name,
                                   on_embeddings=hook).items():
      final[f"{name}/{k}"] = v
  final.update(host.get("baselines", {}))
  if "pixels" in config.baselines:
    final.update(evaluator.pixel_baseline())
  final["table"] = evaluation.print_table(final)
  logger.log(step, {k: v for k, v in final.items() if isinstance(v, (int, float))},
             kind="final")
  if jax.process_index() == 0:
    rundir.write_atomic(rundir.join(workdir, "final_metrics.json"),
                  json.dumps({k: v for k, v in final.items() if k != "table"}, indent=2,
                             sort_keys=True))
  close()
  console_lib.results(workdir, plot is not None)
  return final


def _eval_and_hooks(state, step, evaluator, framework, ctx, config, logger, checkpointer,
                    console=None):
  """Validation metrics, best-params bookkeeping, the framework's hook, overall early stopping."""
  metrics = evaluator.evaluate(state.params["model"], state.batch_stats, "val")
  metric = metrics["map_at_r"]
  tr = parallel.to_host(state.tracker)
  improved = metric > float(tr["best_metric"])
  tracker = {
      **tr,
      "best_metric": np.float32(metric if improved else tr["best_metric"]),
      "best_step": np.int32(step if improved else tr["best_step"]),
      "evals_since_best": np.int32(0 if improved else tr["evals_since_best"] + 1),
      "num_evals": np.int32(tr["num_evals"] + 1),
  }
  best = state.best
  if improved:
    best = {"params": state_lib.copy_tree(state.params),
            "batch_stats": state_lib.copy_tree(state.batch_stats)}
    if checkpointer is not None:
      checkpointer.save_best(step, best["params"], best["batch_stats"])
  state = state.replace(tracker=ctx.replicate(tracker), best=best)
  state, events = framework.after_eval(state, ctx, metrics)
  logger.log(step, {**{f"val/{k}": v for k, v in metrics.items()},
                    "val/best_map_at_r": float(tracker["best_metric"]), **events}, kind="eval")
  stop = int(tracker["evals_since_best"]) >= config.patience_evals
  if console is not None:
    console.evaluation(step, metrics, float(tracker["best_metric"]), int(tracker["best_step"]),
                       events)
  return state, stop
