"""``train_and_evaluate(config, workdir)``: the dmljax training loop.

The module reads top to bottom as a run does, and each part can be called on its own:

* **input** (:func:`create_input`, :func:`make_sampler`): the data set's splits and the host
  sampler of training batches (the framework's, or ``config.sampler``);
* **state** (:func:`create_state`): model variables, the framework's parameters and arrays, the
  optimizer state, in one :class:`~dmljax.state.TrainState`;
* **step** (:func:`make_train_step`, :func:`jit_train_step`): one jitted step over the mesh; a
  non-finite loss or gradient is never applied;
* **evaluation** (:class:`Evaluator`): inference-mode embedding in fixed-size batches and the
  retrieval (and optionally clustering) metrics of a split;
* **checkpointing** (:func:`restore_or_start`): Orbax restore with the config fingerprint check,
  or a fresh start (framework ``on_start``, the untrained baseline);
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

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dmljax import checkpoint as ckpt_lib
from dmljax import cli
from dmljax import frameworks
from dmljax import models
from dmljax import optim
from dmljax import parallel
from dmljax import state as state_lib

SAMPLERS = ("m_per_class", "random")
BASELINES = ("untrained", "pixels")


# ============================================================================= input


@dataclasses.dataclass
class Input:
  """The splits of a run, the training classes and how their images are read.

  ``split.images`` is a uint8 array ``[N, H, W, C]`` (the embedded data sets) or a record source
  (the prepared benchmark data sets); ``test`` may be a :class:`~dmljax.data.QueryGallery`
  (In-shop). ``image_shape`` is what the model sees after the transforms; ``train_transform``
  and ``eval_transform`` are the pipeline's :class:`~dmljax.data.transforms.TransformConfig`.
  """
  train: Any
  val: Any
  test: Any
  train_labels: np.ndarray
  num_classes: int
  image_shape: tuple
  train_transform: Any
  eval_transform: Any

  @property
  def train_images(self):
    """The training split's image source (array or records)."""
    return self.train.images

  def split(self, name: str):
    return {"train": self.train, "val": self.val, "test": self.test}[name]


def _uint8_split(split):
  """An embedded split with uint8 images (float images in [0, 1] are rounded to 1/255)."""
  from dmljax.data import splits as splits_lib  # pylint: disable=g-import-not-at-top
  if isinstance(split, splits_lib.QueryGallery):
    return splits_lib.QueryGallery(_uint8_split(split.query), _uint8_split(split.gallery))
  images = split.images
  if not isinstance(images, np.ndarray) or images.dtype == np.uint8:
    return split
  images = np.clip(np.rint(np.asarray(images, np.float32) * 255.0), 0, 255).astype(np.uint8)
  return dataclasses.replace(split, images=images)


def input_transforms(config, records: bool):
  """``(train, eval)`` transform configs: the protocol's for records, none for arrays."""
  from dmljax.data import transforms  # pylint: disable=g-import-not-at-top
  ic = config.input
  opts = dict(size=int(ic.size), resize=int(ic.resize), scale=tuple(ic.scale),
              ratio=tuple(ic.ratio), flip=bool(ic.flip), crop_to_bbox=bool(ic.crop_to_bbox))
  try:
    if not records:
      return transforms.TransformConfig(kind="none"), transforms.TransformConfig(kind="none")
    return (transforms.TransformConfig(kind="train" if ic.augment else "eval", **opts),
            transforms.TransformConfig(kind="eval", **opts))
  except ValueError as e:
    raise ValueError(f"{e} (set it with --config.input.<key>)") from None


def create_input(config) -> Input:
  """Loads ``config.dataset`` and picks its train / val / test splits (ValueError if absent)."""
  from dmljax.data import load_dataset, real  # pylint: disable=g-import-not-at-top
  dc = config.dataset
  options = dict(dc.options)
  if dc.name in real.REAL_DATASETS:
    options.setdefault("data_dir", dc.get("data_dir", "") or None)
  ds = load_dataset(dc.name, seed=dc.seed, cache_dir=dc.cache_dir or None, **options)
  for s in (dc.train_split, dc.val_split, dc.test_split):
    if s not in ds.splits:
      raise ValueError(f"Data set {dc.name!r} has no split {s!r}; splits: {sorted(ds.splits)}.")
  train, val, test = (_uint8_split(ds.splits[s])
                      for s in (dc.train_split, dc.val_split, dc.test_split))
  labels = np.asarray(train.labels)
  records = not isinstance(train.images, np.ndarray)
  train_tf, eval_tf = input_transforms(config, records)
  shape = ((eval_tf.size, eval_tf.size, 3) if records else tuple(train.images.shape[1:]))
  return Input(train=train, val=val, test=test, train_labels=labels,
               num_classes=int(np.max(labels)) + 1 if len(labels) else 0, image_shape=shape,
               train_transform=train_tf, eval_transform=eval_tf)


def input_workers(config, data: Input) -> int:
  """Decode processes: ``config.input.num_workers``, or (-1) up to 8 for records, 0 for arrays."""
  n = int(config.input.num_workers)
  if n >= 0:
    return n
  if isinstance(data.train_images, np.ndarray):
    return 0
  return max(1, min(8, (os.cpu_count() or 2)))


def make_train_loader(config, data: Input, framework, sampler, start_step: int):
  """The training input pipeline from ``start_step`` (a :class:`~dmljax.data.pipeline.BatchLoader`).

  Frameworks whose batches are a pure function of the step (``framework.sample_uses_state`` is
  False) have their batches decoded ahead in worker processes; the others (PROFS with hard
  negative class mining picks classes from the train state) decode each batch when it is drawn.
  """
  import functools  # pylint: disable=g-import-not-at-top
  from dmljax.data import pipeline  # pylint: disable=g-import-not-at-top
  pi, pc = jax.process_index(), jax.process_count()
  fn = None
  if not getattr(framework, "sample_uses_state", False):
    fn = functools.partial(sampler.batch, process_index=pi, process_count=pc)
  return pipeline.BatchLoader(
      data.train_images, data.train_transform, config.seed, fn, start_step=start_step,
      num_workers=input_workers(config, data) if fn is not None else 0,
      prefetch=max(1, int(config.input.prefetch)), process_index=pi, process_count=pc)


def make_sampler(config, framework, labels):
  """The framework's sampler, or the default one of ``config.sampler``."""
  sampler = framework.make_sampler(labels)
  if sampler is not None:
    return sampler
  from dmljax.data import samplers  # pylint: disable=g-import-not-at-top
  sc = config.sampler
  if sc.name not in SAMPLERS:
    raise ValueError(f"Unknown sampler {sc.name!r}; valid: {list(SAMPLERS)} "
                     "(set --config.sampler.name).")
  if sc.name == "random":
    return samplers.RandomSampler(labels, config.batch_size, config.seed)
  return samplers.MPerClassSampler(labels, sc.m, config.batch_size, config.seed,
                                   small_classes=sc.get("small_classes", "error"))


# ============================================================================= state


def create_state(config, model, framework, tx, data: Input) -> state_lib.TrainState:
  """The initial train state (host arrays; replicate it on the mesh)."""
  rng = jax.random.PRNGKey(config.seed)
  init_rng, fw_rng, train_rng = jax.random.split(rng, 3)
  dummy = jnp.zeros((1,) + tuple(data.image_shape), jnp.uint8)
  variables = jax.jit(lambda r, x: model.init(r, _prepare_images(x), train=False))(init_rng, dummy)
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


def _prepare_images(images):
  """uint8 images as they are (the model normalises them as its backbone expects, on device);
  other images as float32 (taken as already normalised)."""
  if images.dtype == jnp.uint8:
    return images
  return images.astype(jnp.float32)


def _variables(model_params, batch_stats):
  v = {"params": model_params}
  if batch_stats:
    v["batch_stats"] = batch_stats
  return v


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
    images = _prepare_images(images)
    has_bs = bool(state.batch_stats)

    def loss_fn(params):
      if has_bs:
        emb, mutated = model.apply(_variables(params["model"], state.batch_stats), images,
                                   train=True, mutable=["batch_stats"])
        new_bs = mutated["batch_stats"]
      else:
        emb, new_bs = model.apply(_variables(params["model"], None), images, train=True), {}
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


def make_embed_fn(model, mesh, normalize: bool = True):
  """Jitted inference-mode embedding ``(model_params, batch_stats, images) -> [B, D]`` (replicated);
  ``normalize=False``: the embedding before the model's normalisation."""
  rep, bat = parallel.replicated(mesh), parallel.batch_sharding(mesh)

  extra = {} if normalize else {"normalize": False}

  def embed(model_params, batch_stats, images):
    return model.apply(_variables(model_params, batch_stats), _prepare_images(images),
                       train=False, **extra)

  return jax.jit(embed, in_shardings=(rep, rep, bat), out_shardings=rep)


def take(source, indices):
  """The images of ``source`` at ``indices`` (an array, or a record view), for embedding."""
  indices = np.asarray(indices, np.int64)
  if isinstance(source, np.ndarray):
    return source[indices]
  return _Take(source, indices)


class _Take:
  """A picklable random-access view of some records of a source."""

  def __init__(self, source, indices):
    self.source, self.indices = source, np.asarray(indices, np.int64)

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[i])]


def embed_source(embed_fn, mesh, model_params, batch_stats, source, transform, batch_size: int,
                 num_workers: int = 0, prefetch: int = 2) -> np.ndarray:
  """Embeds every image of ``source`` through the input pipeline; returns ``[N, D]`` numpy.

  Fixed-size global batches (one compile; the last one padded, the padding cut off). Each process
  reads and decodes only its own part of every batch; the embeddings, never the images, are what
  the processes share.
  """
  from dmljax.data import pipeline  # pylint: disable=g-import-not-at-top
  n = len(source)
  if n == 0:
    raise ValueError("Cannot embed an empty split.")
  out = []
  with pipeline.eval_batches(source, transform, batch_size, jax.process_index(),
                             jax.process_count(), num_workers, prefetch) as batches:
    for images, _ in batches:
      x = parallel.global_batch(images, mesh)
      out.append(parallel.to_host(embed_fn(model_params, batch_stats, x)))
  return np.concatenate(out, axis=0)[:n]


# ============================================================================= host helpers




# ============================================================================= evaluation


class Evaluator:
  """Embeds splits in inference mode and computes their metrics, the same way everywhere
  (validation during training, the final table, the frameworks' ``ctx.evaluate``).

  Metrics: retrieval (``config.recall_ks``, ``precision_ks``, ``map_ks``, ``ndcg_ks``; MAP@R,
  R-precision and P@1 always) and, with ``config.clustering``, NMI and pairwise F1 of k-means.
  Embeddings that are not finite raise :class:`dmljax.cli.TrainingDiverged`.
  """

  def __init__(self, config, model, mesh, data: Input):
    self.config, self.mesh, self.data = config, mesh, data
    self.embed_fn = make_embed_fn(model, mesh)
    self.embed_fn_raw = make_embed_fn(model, mesh, normalize=False)  # compiled on first use
    self.checkpointer = None  # named in the divergence message once there is one
    self.step = 0
    self.num_workers = input_workers(config, data)

  def embed(self, model_params, batch_stats, images, indices=None, raw=False) -> np.ndarray:
    """Embeddings of an image source (array or records), or of its ``indices``; ``raw``: before
    the model's normalisation."""
    source = images if indices is None else take(images, indices)
    # Worker processes pay off for large splits only: starting them costs seconds, about what
    # decoding a few thousand images in this process costs.
    workers = self.num_workers if len(source) >= EVAL_WORKERS_MIN_IMAGES else 0
    return embed_source(self.embed_fn_raw if raw else self.embed_fn, self.mesh, model_params,
                        batch_stats, source, self.data.eval_transform,
                        self.config.eval_batch_size, workers,
                        max(1, int(self.config.input.prefetch)))

  def embed_train(self, model_params, batch_stats, indices, raw=False) -> np.ndarray:
    return self.embed(model_params, batch_stats, self.data.train_images, indices, raw=raw)

  def metrics(self, embeddings, labels, gallery_embeddings=None,
              gallery_labels=None) -> dict[str, float]:
    """The configured metrics of one set of embeddings (see :func:`embedding_metrics`)."""
    return embedding_metrics(self.config, embeddings, labels, gallery_embeddings, gallery_labels)

  def _finite(self, emb):
    if not np.all(np.isfinite(emb)):
      # Finite losses can still leave weights that overflow in inference mode.
      bad = int(np.sum(~np.all(np.isfinite(emb), axis=1)))
      raise cli.TrainingDiverged(_diverged(
          self.config, self.checkpointer,
          f"the model's embeddings of {bad} of {len(emb)} evaluation images are not finite at "
          f"step {self.step}"))
    return emb

  def evaluate(self, model_params, batch_stats, split, on_embeddings=None) -> dict[str, float]:
    """Metrics of ``split`` (a name, ``"val"`` / ``"test"``, or a split object);
    ``on_embeddings(embeddings, split)``, if given, sees the (finite) embeddings first (for a
    query / gallery split: the queries' then the gallery's rows, concatenated)."""
    from dmljax.data import splits as splits_lib  # pylint: disable=g-import-not-at-top
    split = self.data.split(split) if isinstance(split, str) else split
    if isinstance(split, splits_lib.QueryGallery):
      q = self._finite(self.embed(model_params, batch_stats, split.query.images))
      g = self._finite(self.embed(model_params, batch_stats, split.gallery.images))
      if on_embeddings is not None:
        on_embeddings(np.concatenate([q, g]), split)
      return self.metrics(q, np.asarray(split.query.labels), g,
                          np.asarray(split.gallery.labels))
    emb = self._finite(self.embed(model_params, batch_stats, split.images))
    if on_embeddings is not None:
      on_embeddings(emb, split)
    return self.metrics(emb, np.asarray(split.labels))

  def pixel_baseline(self) -> dict[str, float]:
    """Raw pixels, flattened and L2-normalised, on the validation and test splits."""
    size = int(np.prod(self.data.image_shape))
    if not isinstance(self.data.val.images, np.ndarray):
      logging.warning("Pixel baseline skipped: the data set's images are records (decoded for "
                      "the model only); remove 'pixels' from config.baselines to silence this.")
      return {}
    if size > PIXEL_BASELINE_MAX_VALUES:
      logging.warning("Pixel baseline skipped: images of %d values (more than %d); remove "
                      "'pixels' from config.baselines to silence this.", size,
                      PIXEL_BASELINE_MAX_VALUES)
      return {}
    out = {}
    for name in ("val", "test"):
      split = self.data.split(name)
      m = self.metrics(pixel_embeddings(split.images), np.asarray(split.labels))
      out.update({f"pixels/{name}/{k}": v for k, v in m.items()})
    return out


def embedding_metrics(config, embeddings, labels, gallery_embeddings=None,
                      gallery_labels=None) -> dict[str, float]:
  """The metrics ``config`` asks for (``recall_ks``, ``precision_ks``, ``map_ks``, ``ndcg_ks``;
  MAP@R, R-precision and P@1 always; k-means NMI and F1 with ``clustering``) of same-set
  retrieval, or of queries searched against a gallery."""
  from dmljax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  c = config
  m = metrics_lib.retrieval_metrics(
      embeddings, labels, gallery_embeddings=gallery_embeddings, gallery_labels=gallery_labels,
      recall_ks=tuple(c.recall_ks), precision_ks=tuple(c.precision_ks),
      map_ks=tuple(c.map_ks), ndcg_ks=tuple(c.ndcg_ks))
  if c.clustering:
    if gallery_embeddings is not None:
      embeddings = np.concatenate([embeddings, gallery_embeddings])
      labels = np.concatenate([labels, gallery_labels])
    m.update(metrics_lib.clustering_metrics(embeddings, labels, seed=c.seed))
  return {k: float(v) for k, v in m.items()}


def pixel_embeddings(images: np.ndarray) -> np.ndarray:
  """The raw-pixel baseline: images flattened to float32 and L2-normalised."""
  x = np.asarray(images, np.float32).reshape(len(images), -1)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


EVAL_WORKERS_MIN_IMAGES = 4096  # smaller splits are decoded in this process

PIXEL_BASELINE_MAX_VALUES = 16384  # 128 x 128 grey; larger images: set config.baselines


# ============================================================================= checkpointing


# Keys whose change cannot alter what a resumed run computes (logging, retention, paths, device
# count: results do not depend on it). Any other change breaks exact resumption.
RESUME_SAFE_KEYS = ("progress", "log_every_steps", "plot_projections", "checkpoint.max_to_keep",
                    "checkpoint.save_best", "checkpoint.every_steps", "dataset.cache_dir",
                    "max_consecutive_nonfinite", "baselines", "num_devices", "eval_batch_size",
                    "input.num_workers", "input.prefetch", "dataset.data_dir")
SAMPLER_KEYS = ("seed", "batch_size", "sampler.name", "sampler.m", "sampler.small_classes")


def config_dict(config) -> dict:
  """The config as plain JSON data (tuples as lists): what a checkpoint records."""
  return json.loads(json.dumps(config.to_dict(), default=str))


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_changes(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
  """``{key: (saved, current)}`` for every key whose change breaks exact resumption."""
  a, b = _flatten(saved), _flatten(current)
  return {k: (a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b))
          if a.get(k, "<absent>") != b.get(k, "<absent>") and k not in RESUME_SAFE_KEYS}


def config_fingerprint(cfg: dict) -> str:
  import hashlib  # pylint: disable=g-import-not-at-top
  return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def _save_config(config, workdir):
  if jax.process_index() == 0:
    _write_atomic(_join(workdir, "config.json"),
                  config.to_json_best_effort(indent=2, sort_keys=True))


TABLE_METRICS = ("map_at_r", "r_precision", "precision_at_1")


def restore_or_start(config, workdir, checkpointer, state, framework, ctx_factory, evaluator,
                     sampler, mesh, allow_config_change: bool = False):
  """Resumes from the newest intact checkpoint, or starts fresh.

  Resuming checks the config against the checkpoint's (:func:`config_changes`) and raises
  :class:`dmljax.cli.ConfigChanged` for a change that breaks exact resumption unless
  ``allow_config_change``; the checkpointed sampler is continued unless its settings changed.
  A fresh start runs the framework's ``on_start`` and measures the untrained baseline.

  Returns:
    ``(state, host, sampler, ctx, logger, resumed)``; ``ctx_factory(logger)`` builds the
    frameworks' :class:`~dmljax.frameworks.HostContext`.
  """
  restored = checkpointer.restore(state) if checkpointer is not None else None
  cfg_now, changed = config_dict(config), {}
  if restored is not None:
    host = restored[1]
    changed = config_changes(host["config"], cfg_now) if "config" in host else {}
    if changed and not allow_config_change:
      listing = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
      checkpointer.close()
      raise cli.ConfigChanged(
          f"the config differs from the one {workdir} was trained with, which breaks exact "
          f"resumption: {listing}. Run with the old values, use a new --workdir, or pass "
          "--allow_config_change to continue with the new values.")
    if changed:  # allowed: refuse what the resumed run would not honour
      from dmljax import extend  # pylint: disable=g-import-not-at-top
      try:
        extend.check_changes(config, host, parallel.to_host(restored[0].tracker), changed,
                             workdir)
      except cli.ConfigChanged:
        checkpointer.close()
        raise
  logger = _Logger(workdir, None if restored is None else int(restored[1]["step"]))
  ctx = ctx_factory(logger)
  if restored is not None:
    state, host = restored
    from dmljax import extend  # pylint: disable=g-import-not-at-top
    host = extend.reopen(config, host, parallel.to_host(state.tracker), workdir)
    state = parallel.replicate(state, mesh)
    if changed:
      logging.warning("Continuing %s with changed config keys: %s", workdir, sorted(changed))
    if host.get("sampler") and not set(changed) & set(SAMPLER_KEYS):
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
  host["sampler"] = _jsonable(host.get("sampler", {}))
  host["config"], host["config_fingerprint"] = cfg_now, config_fingerprint(cfg_now)
  _save_config(config, workdir)
  return state, host, sampler, ctx, logger, restored is not None


# ============================================================================= host helpers


def is_remote(path: str) -> bool:
  """A bucket path (``gs://...``): written through ``etils.epath``, which Orbax uses too."""
  return "://" in str(path)


def _path(path: str):
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(path)


def _join(*parts: str) -> str:
  return "/".join([parts[0].rstrip("/")] + list(parts[1:])) if is_remote(parts[0]) else \
      os.path.join(*parts)


def _makedirs(path: str) -> None:
  if is_remote(path):
    _path(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def read_jsonl(path: str) -> list[dict]:
  """The records of a ``metrics.jsonl``; a partial or garbled line (a run killed mid-write) is
  dropped, never an error."""
  out = []
  text = _path(path).read_text() if is_remote(path) else open(path).read()
  for line in text.splitlines():
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(rec, dict):
      out.append(rec)
  return out


def _write_atomic(path: str, text: str) -> None:
  if is_remote(path):  # an object store replaces an object whole: no temporary name needed
    _path(path).write_text(text)
    return
  tmp = f"{path}.tmp.{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:  # a full or read-only disk: no temporary file left behind
    if os.path.exists(tmp):
      os.remove(tmp)
    raise OSError(f"cannot write {path} ({e.strerror or e}); is the disk full or read-only?") from e


def _exists(path: str) -> bool:
  return _path(path).exists() if is_remote(path) else os.path.exists(path)


class _Logger:
  """metrics.jsonl + TensorBoard (process 0 only).

  Local workdirs append to ``metrics.jsonl``; bucket workdirs (``gs://``), where objects cannot
  be appended to, rewrite it whole at each log call. TensorBoard writes to the workdir where
  tensorboardX can (a bucket needs ``google-cloud-storage``), else to a local folder it names.
  """

  def __init__(self, workdir: str, resume_step: int | None):
    self.active = jax.process_index() == 0
    self.path = _join(workdir, "metrics.jsonl")
    self.remote = is_remote(workdir)
    self.writer = None
    self.lines: list[str] = []
    if not self.active:
      return
    if resume_step is not None and _exists(self.path):
      # Drop lines written after the checkpoint we resume from (they will be written again) and
      # any partial line; the rewrite is atomic, so a kill here loses nothing.
      keep = [r for r in read_jsonl(self.path)
              if r.get("step", 0) <= resume_step and r.get("kind") != "final"]
      self.lines = [json.dumps(r) + "\n" for r in keep]
      _write_atomic(self.path, "".join(self.lines))
    elif resume_step is None and _exists(self.path):
      _path(self.path).unlink() if self.remote else os.remove(self.path)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    tb = _join(workdir, "tensorboard")
    # A resumed run writes the steps after its checkpoint again: TensorBoard drops the points
    # at and after purge_step that an earlier process wrote, so no step appears twice.
    purge = None if resume_step is None else resume_step + 1
    try:
      self.writer = SummaryWriter(tb, purge_step=purge)
    except Exception as e:  # pylint: disable=broad-except
      import hashlib, tempfile  # pylint: disable=g-import-not-at-top,multiple-imports
      local = os.path.join(tempfile.gettempdir(), "dmljax-tensorboard",
                           hashlib.sha256(workdir.encode()).hexdigest()[:12])
      logging.warning("TensorBoard cannot write to %s (%s); writing to %s instead.", tb,
                      cli.message(e), local)
      self.writer = SummaryWriter(local, purge_step=purge)

  def log(self, step: int, values: dict[str, Any], kind: str = "train"):
    if not self.active:
      return
    clean = {}
    for k, v in values.items():
      v = np.asarray(v)
      clean[k] = v.item() if v.ndim == 0 else v.tolist()
    line = json.dumps({"step": int(step), "kind": kind, **clean}) + "\n"
    if self.remote:
      self.lines.append(line)
      _write_atomic(self.path, "".join(self.lines))
    else:
      with open(self.path, "a") as f:
        f.write(line)
    for k, v in clean.items():
      if isinstance(v, (int, float)) and not isinstance(v, bool):
        self.writer.add_scalar(f"{kind}/{k}" if "/" not in k else k, v, step)
    self.writer.flush()

  def close(self):
    if self.writer is not None:
      self.writer.close()




def _print_table(final: dict[str, float]):
  """The final table: the trained model and, measured in the same run, its trivial baselines."""
  extra = sorted({k.rsplit("/", 1)[1] for k in final
                  if k.startswith("test/") and k.rsplit("/", 1)[1].startswith("recall_at_")})
  cols = list(TABLE_METRICS) + [k for k in extra if k not in TABLE_METRICS]
  lines = ["", f"{'model':<10} {'split':<6} " + " ".join(f"{c:>15}" for c in cols)]
  for model, prefix in (("trained", ""), ("untrained", "untrained/"), ("pixels", "pixels/")):
    for split in ("val", "test"):
      if f"{prefix}{split}/map_at_r" not in final:
        continue
      row = [final.get(f"{prefix}{split}/{c}", float("nan")) for c in cols]
      lines.append(f"{model:<10} {split:<6} " + " ".join(f"{v:>15.4f}" for v in row))
  text = "\n".join(lines)
  if jax.process_index() == 0:
    print(text, flush=True)
  return text


def _make_plotter(config, workdir, framework, embed_train: Callable, train_labels):
  """PNG of the training embeddings (subset) and the framework's points, for 2-D embeddings."""
  if not config.plot_projections or config.model.embedding_dim != 2 or jax.process_index():
    return None
  _makedirs(_join(workdir, "plots"))
  sub = np.random.default_rng(config.seed).permutation(len(train_labels))[:1500]

  def plot(state, name, extra_points=None):
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    emb = embed_train(state.params["model"], state.batch_stats, sub)
    lab = train_labels[sub]
    fig, ax = plt.subplots(figsize=(6, 6))
    cmap = plt.get_cmap("tab10" if lab.max() < 10 else "tab20")
    ax.scatter(emb[:, 0], emb[:, 1], c=cmap(lab % cmap.N), s=4, alpha=0.5)
    points = {**framework.plot_points(state), **(extra_points or {})}
    for marker, (legend, (pts, cls)) in zip(("s", "o", "^", "D", "v"), points.items()):
      pts, cls = np.asarray(pts), np.asarray(cls)
      ax.scatter(pts[:, 0], pts[:, 1], c=cmap(cls % cmap.N), marker=marker, s=60,
                 edgecolors="k", label=legend)
    if points:
      ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"{name} (step {int(parallel.to_host(state.step))})")
    ax.set_aspect("equal")
    with (_path(_join(workdir, "plots", f"{name}.png")).open("wb") if is_remote(workdir)
          else open(os.path.join(workdir, "plots", f"{name}.png"), "wb")) as f:
      fig.savefig(f, dpi=90, format="png")
    plt.close(fig)

  return plot


def _progress_enabled(config) -> bool:
  return bool(config.progress) and jax.process_index() == 0


def _check_finite(config, metrics, step, checkpointer, workdir):
  """Raises TrainingDiverged once ``max_consecutive_nonfinite`` steps in a row were skipped."""
  if metrics is None:
    return
  streak = int(parallel.to_host(metrics["nonfinite_streak"]))
  if streak < config.max_consecutive_nonfinite:
    return
  raise cli.TrainingDiverged(_diverged(
      config, checkpointer, f"steps {step - streak + 1}-{step} ({streak} in a row) had a "
      "non-finite loss or gradient and none of them was applied",
      " or raise config.max_consecutive_nonfinite"))


def _diverged(config, checkpointer, what: str, more: str = "") -> str:
  """The divergence message: what happened, the last good checkpoint, the likely cause."""
  last_good = checkpointer.latest_step() if checkpointer is not None else None
  where = (f"the last good checkpoint is step {last_good} in {checkpointer.directory} (running "
           "the same command again resumes from it)" if last_good is not None else
           "no checkpoint was written yet")
  causes = [f"a learning rate too high (optim.learning_rate={config.optim.learning_rate})"]
  if not config.optim.grad_clip_norm:
    causes.append("no gradient clipping (optim.grad_clip_norm=0)")
  return (f"training diverged: {what}; {where}. Likely cause: {' or '.join(causes)}; lower the "
          f"learning rate or clip gradients{more}.")




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
  _makedirs(workdir)
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
      the new values; otherwise such a change raises :class:`dmljax.cli.ConfigChanged`.
    on_final_embeddings: called as ``on_final_embeddings(name, embeddings, split)`` with the
      best parameters' ``[N, D]`` numpy embeddings of the "val" and "test" splits at the final
      evaluation, before ``final_metrics.json`` is written (``dmljax.protocol`` saves them).

  Returns:
    ``{"val/<metric>": ..., "test/<metric>": ..., "untrained/val/<metric>": ...,
    "pixels/test/<metric>": ..., "step": ..., "best_step": ..., "nonfinite_steps": ...,
    "train_step_traces": ...}``, or ``{"preempted": True, "step": ...}`` after a SIGTERM.

  Raises:
    dmljax.cli.TrainingDiverged: ``config.max_consecutive_nonfinite`` steps in a row had a
      non-finite loss or gradient (none of them was applied), or evaluation embeddings were not
      finite.
  """
  # ------------------------------------------------------------------- setup
  _makedirs(workdir)  # a local folder, or a bucket path (gs://...)
  if config.num_devices < 0 or config.num_devices > jax.device_count():
    raise ValueError(f"config.num_devices={config.num_devices} but there are "
                     f"{jax.device_count()} devices; use 0 (all) or 1..{jax.device_count()}.")
  mesh = parallel.make_mesh(jax.devices()[:config.num_devices] if config.num_devices else None)
  _check_config(config, mesh)

  # ------------------------------------------------------------------- input, model, state
  from dmljax import console as console_lib  # pylint: disable=g-import-not-at-top
  console_lib.phase(f"Loading data set {config.dataset.name!r} for {workdir}")
  data = create_input(config)
  console_lib.phase(f"Building {config.model.name} and the {config.framework} train state "
                    f"({data.num_classes} training classes, {len(data.train_labels)} images)")
  model = models.get_model(config.model)
  framework = frameworks.get_framework(config, num_classes=data.num_classes,
                                       embedding_dim=config.model.embedding_dim)
  sampler = make_sampler(config, framework, data.train_labels)  # m > class size fails here
  tx = optim.make_optimizer(config.optim, config.total_steps,
                            steps_per_epoch=math.ceil(len(data.train_labels) / config.batch_size))
  state = parallel.replicate(create_state(config, model, framework, tx, data), mesh)

  # ------------------------------------------------------------------- compiled functions
  step_fn, traces = make_train_step(model, framework, tx)
  train_step = jit_train_step(step_fn, mesh)
  evaluator = Evaluator(config, model, mesh, data)

  # ------------------------------------------------------------------- resume or start
  checkpointer = None
  if config.checkpoint.enabled:
    checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=config.checkpoint.max_to_keep,
                                         save_best=config.checkpoint.save_best)
  evaluator.checkpointer = checkpointer
  plot = _make_plotter(config, workdir, framework, evaluator.embed_train, data.train_labels)

  def ctx_factory(logger):
    return frameworks.HostContext(
        config=config, tx=tx, num_classes=data.num_classes, train_labels=data.train_labels,
        embed=evaluator.embed_train, evaluate=evaluator.evaluate,
        replicate=lambda t: parallel.replicate(t, mesh), log=logger.log, plot=plot)

  state, host, sampler, ctx, logger = restore_or_start(
      config, workdir, checkpointer, state, framework, ctx_factory, evaluator, sampler, mesh,
      allow_config_change)[:5]

  def save(step):
    if checkpointer is not None:
      # The pipeline's state is that of this same step: the batches of steps > step are
      # recomputed from (seed, step) on resume, whatever had been prefetched.
      checkpointer.save(step, state, dict(host, step=step,
                                          pipeline=_pipeline_state(step, data, config)))

  loader = None

  def close():
    logger.close()
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
  console = console_lib.Console(config.total_steps, step, _progress_enabled(config))
  try:
    while not host["done"] and step < config.total_steps:
      idx, extras = framework.sample(sampler, state, step, pi, pc)
      idx = np.asarray(idx)
      if loader.batch_indices_fn is None:  # indices chosen from the state: decode them now
        batch = loader.load(step, idx)
      else:  # decoded ahead by the workers; the same indices by construction
        got_step, batch, got_idx = next(loader)
        if got_step != step or not np.array_equal(got_idx, idx):
          raise RuntimeError(f"input pipeline out of step: it produced step {got_step}, the "
                             f"loop is at step {step}.")
      extras = dict(extras, **{PREEMPT_KEY: np.full(len(idx), preempt.is_set)})
      images, labels, extras = parallel.global_batch(
          (batch, data.train_labels[idx].astype(np.int32), extras), mesh)
      state, last = train_step(state, images, labels, extras)
      step += 1
      t_steps += 1
      evaluator.step = step
      # The previous step's health and the agreed preemption flag, read while this step runs
      # (no stall of the pipeline); every process reads the same values.
      preempted = False
      if pending is not None:
        _check_finite(config, pending, step - 1, checkpointer, workdir)
        preempted = bool(parallel.to_host(pending[PREEMPT_KEY]))
      pending = last

      if step % config.log_every_steps == 0 or step == config.total_steps:
        vals = parallel.to_host(last)
        rate = t_steps / max(time.time() - t0, 1e-9)
        logger.log(step, dict(vals, steps_per_second=rate))
        console.train(step, rate, float(vals["loss"]), framework.progress(state))
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
        save(step)
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
    hook = (None if on_final_embeddings is None else
            lambda emb, split, name=name: on_final_embeddings(name, emb, split))
    for k, v in evaluator.evaluate(best["params"]["model"], best["batch_stats"], name,
                                   on_embeddings=hook).items():
      final[f"{name}/{k}"] = v
  final.update(host.get("baselines", {}))
  if "pixels" in config.baselines:
    final.update(evaluator.pixel_baseline())
  final["table"] = _print_table(final)
  logger.log(step, {k: v for k, v in final.items() if isinstance(v, (int, float))},
             kind="final")
  if jax.process_index() == 0:
    _write_atomic(_join(workdir, "final_metrics.json"),
                  json.dumps({k: v for k, v in final.items() if k != "table"}, indent=2,
                             sort_keys=True))
  close()
  console_lib.results(workdir, plot is not None)
  return final


def _pipeline_state(step: int, data: Input, config) -> dict:
  """What a checkpoint records of the input pipeline: the next batch and how batches are made."""
  return {"next_step": int(step), "seed": int(config.seed),
          "train_transform": data.train_transform.to_dict(),
          "eval_transform": data.eval_transform.to_dict()}


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


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, np.generic):
    return x.item()
  return x
