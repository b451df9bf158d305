"""``train_and_evaluate(config, workdir)``: the dmljax training loop.

Sections: setup (workdir, mesh, checks) -> data -> model -> framework -> state / resume ->
compiled functions -> loop (train step, logging, evaluation + framework hooks, checkpoints,
SIGTERM) -> final (restore the best parameters, evaluate validation and test, print a table).

Exact resumption: every random choice is a function of the seed and the step (per-step keys
``fold_in(rng, step)``, samplers deterministic in ``(seed, step)``, the CCP pool sampler in
``(seed, projection)``), evaluations happen at fixed steps, and all framework / early-stopping
state is part of the checkpointed :class:`~dmljax.state.TrainState`. A checkpoint is written only
after a step's evaluation and hooks, so a run restarted from any checkpoint replays exactly the
computation of an uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Callable

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

SAMPLERS = ("m_per_class",)


# ============================================================================= compiled pieces


def _prepare_images(images):
  """uint8 images to float32 in [0, 1]; float images as given (decided on the static dtype)."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def _variables(model_params, batch_stats):
  v = {"params": model_params}
  if batch_stats:
    v["batch_stats"] = batch_stats
  return v


def make_train_step(model, framework, tx) -> tuple[Callable, list]:
  """The (un-jitted) train step ``(state, images, labels) -> (state, metrics)``.

  Returns the function and a one-element list counting how often it is traced (the tests
  assert it is traced once).
  """
  traces = [0]

  def train_step(state, images, labels):
    traces[0] += 1
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
      loss, (metrics, fstate) = framework.loss(params, emb, labels, state, rng)
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
    new_state = state.replace(
        step=state.step + 1, params=keep(params, state.params),
        batch_stats=keep(new_bs, state.batch_stats),
        opt_state=keep(opt_state, state.opt_state), framework=keep(fstate, state.framework),
        tracker=tracker)
    return new_state, metrics

  return train_step, traces


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def jit_train_step(step_fn, mesh):
  """jit with the batch sharded over ``data``, the state replicated and donated."""
  rep, bat = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(step_fn, in_shardings=(rep, bat, bat), out_shardings=(rep, rep),
                 donate_argnums=(0,))


def make_embed_fn(model, mesh):
  """Jitted inference-mode embedding ``(model_params, batch_stats, images) -> [B, D]`` (replicated)."""
  rep, bat = parallel.replicated(mesh), parallel.batch_sharding(mesh)

  def embed(model_params, batch_stats, images):
    return model.apply(_variables(model_params, batch_stats), _prepare_images(images),
                       train=False)

  return jax.jit(embed, in_shardings=(rep, rep, bat), out_shardings=rep)


def embed_images(embed_fn, mesh, model_params, batch_stats, images: np.ndarray,
                 indices: np.ndarray, batch_size: int) -> np.ndarray:
  """Embeds ``images[indices]`` in fixed-size batches (one compile), returns ``[N, D]`` numpy.

  The last batch is padded by repeating its first index and the padding is cut off. Each process
  feeds its own slice of every batch.
  """
  indices = np.asarray(indices)
  n = len(indices)
  nb = max(1, math.ceil(n / batch_size))
  padded = np.concatenate([indices, np.full(nb * batch_size - n, indices[0] if n else 0)])
  pc, pi = jax.process_count(), jax.process_index()
  per = batch_size // pc
  out = []
  for b in range(nb):
    chunk = padded[b * batch_size:(b + 1) * batch_size][pi * per:(pi + 1) * per]
    x = parallel.global_batch(images[chunk], mesh)
    out.append(parallel.to_host(embed_fn(model_params, batch_stats, x)))
  return np.concatenate(out, axis=0)[:n]


# ============================================================================= host helpers


def read_jsonl(path: str) -> list[dict]:
  """The records of a ``metrics.jsonl``; a partial or garbled line (a run killed mid-write) is
  dropped, never an error."""
  out = []
  with open(path) as f:
    for line in f:
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
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class _Logger:
  """metrics.jsonl + TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, resume_step: int | None):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.writer = None
    if not self.active:
      return
    if resume_step is not None and os.path.exists(self.path):
      # Drop lines written after the checkpoint we resume from (they will be written again) and
      # any partial line; the rewrite is atomic, so a kill here loses nothing.
      keep = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
      _write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))
    elif resume_step is None and os.path.exists(self.path):
      os.remove(self.path)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def log(self, step: int, values: dict[str, Any], kind: str = "train"):
    if not self.active:
      return
    clean = {}
    for k, v in values.items():
      v = np.asarray(v)
      clean[k] = v.item() if v.ndim == 0 else v.tolist()
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), "kind": kind, **clean}) + "\n")
    for k, v in clean.items():
      if isinstance(v, (int, float)) and not isinstance(v, bool):
        self.writer.add_scalar(f"{kind}/{k}" if "/" not in k else k, v, step)
    self.writer.flush()

  def close(self):
    if self.writer is not None:
      self.writer.close()


def _make_sampler(config, labels):
  from dmljax.data import samplers  # pylint: disable=g-import-not-at-top
  sc = config.sampler
  if sc.name not in SAMPLERS:
    raise ValueError(f"Unknown sampler {sc.name!r}; valid: {list(SAMPLERS)} "
                     "(set --config.sampler.name).")
  return samplers.MPerClassSampler(labels, sc.m, config.batch_size, config.seed)


def _num_classes(labels) -> int:
  return int(np.max(labels)) + 1 if len(labels) else 0


# Keys whose change cannot alter what a resumed run computes (logging, retention, paths, device
# count: results do not depend on it). Any other change breaks exact resumption.
RESUME_SAFE_KEYS = ("progress", "log_every_steps", "plot_projections", "checkpoint.max_to_keep",
                    "checkpoint.save_best", "checkpoint.every_steps", "dataset.cache_dir",
                    "max_consecutive_nonfinite", "baselines", "num_devices", "eval_batch_size")
SAMPLER_KEYS = ("seed", "batch_size", "sampler.name", "sampler.m")


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
    _write_atomic(os.path.join(workdir, "config.json"),
                  config.to_json_best_effort(indent=2, sort_keys=True))


TABLE_METRICS = ("map_at_r", "r_precision", "precision_at_1")


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


def pixel_embeddings(images: np.ndarray) -> np.ndarray:
  """The raw-pixel baseline: images flattened to float32 and L2-normalised."""
  x = np.asarray(images, np.float32).reshape(len(images), -1)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


PIXEL_BASELINE_MAX_VALUES = 16384  # 128 x 128 grey; larger images: set config.baselines


def _make_plotter(config, workdir, model_embed: Callable, train_images, train_labels, rng_seed):
  """PNG of the training embeddings (subset) and the proxies, for 2-D embeddings."""
  if not config.plot_projections or config.model.embedding_dim != 2 or jax.process_index():
    return None
  os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
  sub = np.random.default_rng(rng_seed).permutation(len(train_labels))[:1500]

  def plot(state, name, new_proxies):
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    emb = model_embed(state.params["model"], state.batch_stats, sub)
    lab = train_labels[sub]
    fig, ax = plt.subplots(figsize=(6, 6))
    cmap = plt.get_cmap("tab10" if lab.max() < 10 else "tab20")
    ax.scatter(emb[:, 0], emb[:, 1], c=cmap(lab % cmap.N), s=4, alpha=0.5)
    if "proxies" in state.params:
      prox = parallel.to_host(state.params["proxies"])
      plab = parallel.to_host(state.framework["proxy_labels"])
      ax.scatter(prox[:, 0], prox[:, 1], c=cmap(plab % cmap.N), marker="s", s=60,
                 edgecolors="k", label="converged proxies")
      if new_proxies is not None:
        newp = np.asarray(new_proxies)
        ax.scatter(newp[:, 0], newp[:, 1], c=cmap(plab % cmap.N), marker="o", s=60,
                   edgecolors="k", label="next proxies (k-center)")
      ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"{name} (step {int(parallel.to_host(state.step))})")
    ax.set_aspect("equal")
    fig.savefig(os.path.join(workdir, "plots", f"{name}.png"), dpi=90)
    plt.close(fig)

  return plot


# ============================================================================= main entry


def train_and_evaluate(config, workdir: str, *, allow_config_change: bool = False
                       ) -> dict[str, Any]:
  """Trains and evaluates the model described by ``config``; returns the final metrics.

  Args:
    config: a ConfigDict as built by ``configs/*.py``.
    workdir: run directory (checkpoints, metrics.jsonl, tensorboard/, config.json, plots/).
      An existing checkpoint there is resumed automatically.
    allow_config_change: resume even if ``config`` differs from the checkpoint's config in keys
      that break exact resumption (:data:`RESUME_SAFE_KEYS` may always change), continuing with
      the new values; otherwise such a change raises :class:`dmljax.cli.ConfigChanged`.

  Returns:
    ``{"val/<metric>": ..., "test/<metric>": ..., "untrained/val/<metric>": ...,
    "pixels/test/<metric>": ..., "step": ..., "best_step": ..., "nonfinite_steps": ...,
    "train_step_traces": ...}``, or ``{"preempted": True, "step": ...}`` after a SIGTERM.

  Raises:
    dmljax.cli.TrainingDiverged: ``config.max_consecutive_nonfinite`` steps in a row had a
      non-finite loss or gradient (none of them was applied).
  """
  # ------------------------------------------------------------------- setup
  os.makedirs(workdir, exist_ok=True)
  if config.num_devices < 0 or config.num_devices > jax.device_count():
    raise ValueError(f"config.num_devices={config.num_devices} but there are "
                     f"{jax.device_count()} devices; use 0 (all) or 1..{jax.device_count()}.")
  mesh = parallel.make_mesh(jax.devices()[:config.num_devices] if config.num_devices else None)
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval_batch_size, mesh, "config.eval_batch_size")
  if config.eval_every_steps < 1 or config.total_steps < 1:
    raise ValueError("config.total_steps and config.eval_every_steps must be >= 1.")
  if config.max_consecutive_nonfinite < 1:
    raise ValueError("config.max_consecutive_nonfinite must be >= 1, got "
                     f"{config.max_consecutive_nonfinite}.")
  unknown = sorted(set(config.baselines) - {"untrained", "pixels"})
  if unknown:
    raise ValueError(f"Unknown config.baselines {unknown}; valid: 'untrained', 'pixels'.")

  # ------------------------------------------------------------------- data
  from dmljax.data import load_dataset  # pylint: disable=g-import-not-at-top
  from dmljax.data import samplers as samplers_lib  # pylint: disable=g-import-not-at-top
  from dmljax.metrics import retrieval_metrics  # pylint: disable=g-import-not-at-top
  dc = config.dataset
  ds = load_dataset(dc.name, seed=dc.seed, cache_dir=dc.cache_dir or None, **dict(dc.options))
  for s in (dc.train_split, dc.val_split, dc.test_split):
    if s not in ds.splits:
      raise ValueError(f"Data set {dc.name!r} has no split {s!r}; splits: {sorted(ds.splits)}.")
  train, val, test = ds.splits[dc.train_split], ds.splits[dc.val_split], ds.splits[dc.test_split]
  train_images, train_labels = np.asarray(train.images), np.asarray(train.labels)
  num_classes = _num_classes(train_labels)
  sampler = _make_sampler(config, train_labels)  # m > class size fails here
  pool_sampler = samplers_lib.OnePerClassSampler(train_labels, config.seed + 1)

  # ------------------------------------------------------------------- model + framework
  model = models.get_model(config.model)
  framework = frameworks.get_framework(config, num_classes=num_classes,
                                       embedding_dim=config.model.embedding_dim)
  tx = optim.make_optimizer(config.optim, config.total_steps)

  # ------------------------------------------------------------------- state
  rng = jax.random.PRNGKey(config.seed)
  init_rng, fw_rng, train_rng = jax.random.split(rng, 3)
  dummy = jnp.zeros((1,) + tuple(train_images.shape[1:]), train_images.dtype)
  variables = jax.jit(lambda r, x: model.init(r, _prepare_images(x), train=False))(init_rng, dummy)
  extra, fstate = framework.init(fw_rng, variables["params"], variables.get("batch_stats", {}))
  state = state_lib.create_train_state(
      rng=train_rng, model_params=variables["params"],
      batch_stats=variables.get("batch_stats", {}), extra_params=extra,
      framework_state=fstate, tx=tx)
  state = parallel.replicate(state, mesh)

  # ------------------------------------------------------------------- compiled functions
  step_fn, traces = make_train_step(model, framework, tx)
  train_step = jit_train_step(step_fn, mesh)
  embed_fn = make_embed_fn(model, mesh)

  def embed_split(model_params, batch_stats, images, indices=None):
    idx = np.arange(len(images)) if indices is None else indices
    return embed_images(embed_fn, mesh, model_params, batch_stats, images, idx,
                        config.eval_batch_size)

  def evaluate(model_params, batch_stats, split) -> dict[str, float]:
    emb = embed_split(model_params, batch_stats, np.asarray(split.images))
    if not np.all(np.isfinite(emb)):
      # Finite losses can still leave weights that overflow in inference mode.
      bad = int(np.sum(~np.all(np.isfinite(emb), axis=1)))
      raise cli.TrainingDiverged(_diverged(
          config, checkpointer,
          f"the model's embeddings of {bad} of {len(emb)} evaluation images are not finite at "
          f"step {int(parallel.to_host(state.step))}"))
    m = retrieval_metrics(emb, np.asarray(split.labels), recall_ks=tuple(config.recall_ks))
    return {k: float(v) for k, v in m.items()}

  def embed_pool(model_params, batch_stats, pool_index):
    # Pool ``pool_index``: b distinct samples per class (fewer, masked, for small classes);
    # rows are in class order (labels are contiguous 0..C-1).
    idx, mask = pool_sampler.pool(pool_index, framework.pool_size)
    emb = embed_split(model_params, batch_stats, train_images, idx.reshape(-1))
    return emb.reshape(idx.shape + (emb.shape[-1],)), np.asarray(mask, bool)

  # ------------------------------------------------------------------- resume
  checkpointer = None
  if config.checkpoint.enabled:
    checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=config.checkpoint.max_to_keep,
                                         save_best=config.checkpoint.save_best)
  restored = checkpointer.restore(state) if checkpointer else None
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
  logger = _Logger(workdir, None if restored is None else int(restored[1]["step"]))
  plot = _make_plotter(config, workdir,
                       lambda p, bs, idx: embed_split(p, bs, train_images, idx),
                       train_images, train_labels, config.seed)
  ctx = frameworks.HostContext(
      config=config, tx=tx, num_classes=num_classes, embed_pool=embed_pool,
      replicate=lambda t: parallel.replicate(t, mesh), log=logger.log, plot=plot)
  if restored is not None:
    state, host = restored
    state = parallel.replicate(state, mesh)
    if changed:
      logging.warning("Continuing %s with changed config keys: %s", workdir, sorted(changed))
    if host.get("sampler") and not set(changed) & set(SAMPLER_KEYS):
      # Continue with the checkpointed sampler; its labels fingerprint makes a data set that
      # changed under the run fail here instead of silently drawing other batches.
      sampler = type(sampler).from_state_dict(train_labels, host["sampler"])
    if jax.process_index() == 0:
      print(f"Resumed from step {host['step']} of {workdir}", flush=True)
  else:
    state = framework.on_start(state, ctx)
    state = parallel.replicate(state, mesh)
    host = {"step": 0, "done": False, "sampler": sampler.state_dict() if hasattr(
        sampler, "state_dict") else {}}
    if "untrained" in config.baselines:
      # The untrained network (after the framework's start, e.g. CCP's first proxies: the model
      # is still the initial one), measured before step 1 and kept with the checkpoints.
      host["baselines"] = {f"untrained/{name}/{k}": v for name, split in (("val", val),
                                                                           ("test", test))
                           for k, v in evaluate(state.params["model"], state.batch_stats,
                                                split).items()}
  host["sampler"] = _jsonable(host.get("sampler", {}))
  host["config"], host["config_fingerprint"] = cfg_now, config_fingerprint(cfg_now)
  _save_config(config, workdir)

  def save(step):
    if checkpointer is not None:
      checkpointer.save(step, state, dict(host, step=step))

  # ------------------------------------------------------------------- loop
  step = int(host["step"])
  preempt = ckpt_lib.PreemptionFlag().install()
  pi, pc = jax.process_index(), jax.process_count()
  t0, t_steps, last, pending = time.time(), 0, {}, None
  try:
    while not host["done"] and step < config.total_steps:
      idx = np.asarray(sampler.batch(step, process_index=pi, process_count=pc))
      images, labels = parallel.global_batch(
          (train_images[idx], train_labels[idx].astype(np.int32)), mesh)
      state, last = train_step(state, images, labels)
      step += 1
      t_steps += 1
      # The previous step's health, read while this one runs (no stall of the pipeline).
      if pending is not None:
        _check_finite(config, pending, step - 1, checkpointer, workdir)
      pending = last

      if step % config.log_every_steps == 0 or step == config.total_steps:
        vals = parallel.to_host(last)
        rate = t_steps / max(time.time() - t0, 1e-9)
        logger.log(step, dict(vals, steps_per_second=rate))
        _progress(config, step, rate, vals, state)
        t0, t_steps = time.time(), 0

      if step % config.eval_every_steps == 0 or step == config.total_steps:
        _check_finite(config, pending, step, checkpointer, workdir)
        state, stop = _eval_and_hooks(state, step, evaluate, val, framework, ctx, config,
                                      logger, checkpointer)
        host["done"] = bool(stop or step >= config.total_steps)
        t0, t_steps = time.time(), 0  # steps/s counts training only

      if preempt.is_set:
        host["step"] = step
        save(step)
        logging.warning("Signal %s received: saved step %d, exiting.", preempt.received, step)
        logger.close()
        if checkpointer is not None:
          checkpointer.close()
        return {"preempted": True, "step": step}
      if (config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0
          and not host["done"]):
        _check_finite(config, pending, step, checkpointer, workdir)
        host["step"] = step
        save(step)
    _check_finite(config, pending, step, checkpointer, workdir)
  except BaseException:
    logger.close()
    if checkpointer is not None:
      checkpointer.close()
    raise
  finally:
    preempt.uninstall()

  # ------------------------------------------------------------------- final
  host["done"], host["step"] = True, step
  save(step)  # final checkpoint (a restart from here only re-runs the final evaluation)
  if _progress_enabled(config):
    print(flush=True)
  best = state.best
  tracker = parallel.to_host(state.tracker)
  final: dict[str, Any] = {"step": step, "best_step": int(tracker["best_step"]),
                           "nonfinite_steps": int(tracker["nonfinite_steps"]),
                           "train_step_traces": traces[0]}
  for name, split in (("val", val), ("test", test)):
    for k, v in evaluate(best["params"]["model"], best["batch_stats"], split).items():
      final[f"{name}/{k}"] = v
  final.update(host.get("baselines", {}))
  if "pixels" in config.baselines:
    final.update(_pixel_baseline(config, val, test))
  final["table"] = _print_table(final)
  logger.log(step, {k: v for k, v in final.items() if isinstance(v, (int, float))},
             kind="final")
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump({k: v for k, v in final.items() if k != "table"}, f, indent=2, sort_keys=True)
  logger.close()
  if checkpointer is not None:
    checkpointer.close()
  return final


def _eval_and_hooks(state, step, evaluate, val, framework, ctx, config, logger, checkpointer):
  """Validation MAP@R, best-params bookkeeping, the framework's hook, overall early stopping."""
  metrics = evaluate(state.params["model"], state.batch_stats, val)
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
  state, events = framework.after_eval(state, ctx, metric)
  logger.log(step, {**{f"val/{k}": v for k, v in metrics.items()},
                    "val/best_map_at_r": float(tracker["best_metric"]), **events}, kind="eval")
  stop = int(tracker["evals_since_best"]) >= config.patience_evals
  return state, stop


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


def _pixel_baseline(config, val, test) -> dict[str, float]:
  """Raw pixels, flattened and L2-normalised, on the validation and test splits."""
  from dmljax.metrics import retrieval_metrics  # pylint: disable=g-import-not-at-top
  size = int(np.prod(np.shape(val.images)[1:]))
  if size > PIXEL_BASELINE_MAX_VALUES:
    logging.warning("Pixel baseline skipped: images of %d values (more than %d); remove "
                    "'pixels' from config.baselines to silence this.", size,
                    PIXEL_BASELINE_MAX_VALUES)
    return {}
  out = {}
  for name, split in (("val", val), ("test", test)):
    m = retrieval_metrics(pixel_embeddings(split.images), np.asarray(split.labels),
                          recall_ks=tuple(config.recall_ks))
    out.update({f"pixels/{name}/{k}": float(v) for k, v in m.items()})
  return out


def _progress_enabled(config) -> bool:
  return bool(config.progress) and jax.process_index() == 0


def _progress(config, step, rate, vals, state):
  if not _progress_enabled(config):
    return
  proj = ""
  if "projection" in state.framework:
    proj = f" | projection {int(parallel.to_host(state.framework['projection']))}"
  line = (f"step {step}/{config.total_steps} | {rate:.1f} steps/s | "
          f"loss {float(vals['loss']):.4f}{proj}")
  if sys.stdout.isatty():
    print("\r" + line.ljust(78), end="", flush=True)
  else:
    print(line, flush=True)


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
