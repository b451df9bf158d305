"""Evaluation: inference-mode embedding of a split and its retrieval / clustering metrics.

:class:`Evaluator` is what the loop, the final table and the frameworks' ``ctx.evaluate`` share;
:func:`embedding_metrics` turns embeddings into the configured metrics; :func:`print_table`
prints the final table beside the trivial baselines (:func:`pixel_embeddings`, and the untrained
network the loop measures before step 1).
"""
from __future__ import annotations

import time
from typing import Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from dmljax import errors
from dmljax import inputs
from dmljax import numerics
from dmljax import parallel

TABLE_METRICS = ("map_at_r", "r_precision", "precision_at_1")


def model_variables(model_params, batch_stats) -> dict:
  """The flax variables of the model (``batch_stats`` only when the model has BatchNorm)."""
  v = {"params": model_params}
  if batch_stats:
    v["batch_stats"] = batch_stats
  return v


def make_embed_fn(model, mesh, normalize: bool = True):
  """Jitted inference-mode embedding ``(model_params, batch_stats, images) -> [B, D]``
  (replicated); ``normalize=False``: the embedding before the model's normalisation."""
  rep, bat = parallel.replicated(mesh), parallel.batch_sharding(mesh)

  extra = {} if normalize else {"normalize": False}

  def embed(model_params, batch_stats, images):
    return model.apply(model_variables(model_params, batch_stats), numerics.prepare_images(images),
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
                 num_workers: int = 0, prefetch: int = 2, batches=None, on_device: bool = False):
  """Embeds every image of ``source`` through the input pipeline; returns ``[N, D]`` numpy.

  Fixed-size global batches (one compile; the last one padded, the padding cut off). Each process
  reads and decodes only its own part of every batch; the embeddings, never the images, are what
  the processes share. Every batch is dispatched before any embedding is read back (one read at
  the end). ``batches``: a live :class:`~dmljax.data.pipeline.EvalBatches` of ``source`` to use
  (kept open: its workers serve the next pass too) instead of a new one. ``on_device``: return
  the (replicated) jax array instead, nothing read back.
  """
  from dmljax.data import pipeline  # pylint: disable=g-import-not-at-top
  n = len(source)
  if n == 0:
    raise ValueError("Cannot embed an empty split.")
  if batches is not None:
    return _embed_batches(embed_fn, mesh, model_params, batch_stats, batches, n, on_device)
  with pipeline.eval_batches(source, transform, batch_size, jax.process_index(),
                             jax.process_count(), num_workers, prefetch) as batches:
    return _embed_batches(embed_fn, mesh, model_params, batch_stats, batches, n, on_device)


def _embed_batches(embed_fn, mesh, model_params, batch_stats, batches, n: int,
                   on_device: bool = False):
  out = [embed_fn(model_params, batch_stats, parallel.global_batch(images, mesh))
         for images, _ in batches]
  return _read_back(out, n, on_device)


def _read_back(outputs, n: int, on_device: bool = False):
  """The rows ``[:n]`` of the concatenated device outputs, read back to the host once (or, with
  ``on_device``, left where they are)."""
  out = jnp.concatenate(outputs, axis=0)[:n] if len(outputs) > 1 else outputs[0][:n]
  return out if on_device else numerics.to_host(out)


# ============================================================================= image caches


#: Where a split's decoded images live during a run (see :class:`ImageCache`).
DEVICE, HOST, STREAM = "device", "host", "stream"


class ImageCache:
  """One split's images under the eval transform, decoded once per run.

  The eval transform is deterministic, so every evaluation of a split feeds the model the same
  uint8 batches; they are decoded at the split's first evaluation and kept, in the layout the
  streaming path produces (this process's rows of each padded global batch, in order), so the
  model sees byte for byte the batches it would have been given by decoding again:

  * ``device``: each global batch is an array on the mesh (sharded over ``data`` like a train
    batch); an evaluation only dispatches;
  * ``host``: this process's rows in one numpy array; each batch is copied to the devices.

  ``rows`` (index order) is a full copy of a split whose arbitrary subsets are embedded (the
  training split, for the frameworks' pools): every process holds every row.
  """

  def __init__(self, where: str, num: int, batch_size: int, host=None, device=None, rows=None):
    self.where, self.num, self.batch_size = where, int(num), int(batch_size)
    self.host, self.device, self.rows = host, device, rows

  @property
  def nbytes(self) -> int:
    if self.device is not None:
      return int(sum(x.nbytes for x in self.device))
    return int((self.host if self.host is not None else self.rows).nbytes)


def image_bytes(num: int, image_shape) -> int:
  return int(num) * int(np.prod(image_shape))


def device_memory_bytes() -> int:
  """Memory of the first local accelerator (0 on CPU, or where the backend does not say)."""
  dev = jax.local_devices()[0]
  if dev.platform == "cpu":
    return 0
  try:
    stats = dev.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  (not every backend reports it)
    return 0
  return int(stats.get("bytes_limit", 0))


def cache_budgets(config) -> tuple[int, int]:
  """``(device, host)`` bytes the run may spend on image caches (``config.eval_cache``).

  ``device_mb = -1`` (auto): a quarter of the accelerator's memory, none on CPU (whose "device"
  memory is the host's: the host cache serves it without a second copy); ``host_mb`` caps the
  host copies. 0 turns either off; both 0 stream every evaluation as before caches existed.
  """
  ec = config.get("eval_cache", None)
  device_mb = -1 if ec is None else float(ec.device_mb)
  host_mb = 4096 if ec is None else float(ec.host_mb)
  device = device_memory_bytes() // 4 if device_mb < 0 else int(device_mb * 2**20)
  return int(device), int(max(0.0, host_mb) * 2**20)


class Evaluator:
  """Embeds splits in inference mode and computes their metrics, the same way everywhere
  (validation during training, the final table, the frameworks' ``ctx.evaluate``).

  Metrics: retrieval (``config.recall_ks``, ``precision_ks``, ``map_ks``, ``ndcg_ks``; MAP@R,
  R-precision and P@1 always) and, with ``config.clustering``, NMI and pairwise F1 of k-means.
  Embeddings that are not finite raise :class:`dmljax.errors.TrainingDiverged`.

  Images are decoded once per run: each evaluation split gets an :class:`ImageCache` on the
  devices or in host memory within ``config.eval_cache``'s budgets (planned at construction, the
  validation split first, then test, then the training split under the eval transform for the
  frameworks' pools), built at its first evaluation; a split that fits neither is streamed as
  before, through workers that live until :meth:`close`. Cached or streamed, the model is given
  the same uint8 batches, so the metrics do not depend on where the images came from.
  """

  def __init__(self, config, model, mesh, data: inputs.Input):
    self.config, self.mesh, self.data = config, mesh, data
    self.embed_fn = make_embed_fn(model, mesh)
    self.embed_fn_raw = make_embed_fn(model, mesh, normalize=False)  # compiled on first use
    self.checkpointer = None  # named in the divergence message once there is one
    self.step = 0
    self.num_workers = inputs.input_workers(config, data)
    self.batch_size = int(config.eval_batch_size)
    self.prefetch = max(1, int(config.input.prefetch))
    self.plan: dict[int, str] = {}  # id(source) -> DEVICE / HOST / STREAM
    self.names: dict[int, str] = {}
    self.caches: dict[int, ImageCache] = {}
    self.build_seconds: dict[str, float] = {}
    self._streams: dict = {}
    self._check_knn()
    self._plan_caches()

  def _check_knn(self):
    """``config.eval_knn.approx_recall`` on a backend that has no approximate top-k: refused
    before step 1, not at the first evaluation."""
    from dmljax import config_check  # pylint: disable=g-import-not-at-top
    from dmljax.kernels import knn as knn_lib  # pylint: disable=g-import-not-at-top
    try:
      knn_lib.check_approx(knn_options(self.config).get("approx_recall"),
                           knn_lib.flat_mesh(self.mesh))
    except ValueError as e:
      raise config_check.ConfigError(f"config.eval_knn.approx_recall: {e}") from None

  # --------------------------------------------------------------------------- caches

  def _records(self, source) -> bool:
    return not (isinstance(source, np.ndarray) and self.data.eval_transform.kind == "none")

  def _plan_caches(self):
    from dmljax.data import splits as splits_lib  # pylint: disable=g-import-not-at-top
    device_left, host_left = cache_budgets(self.config)
    pc, ndev = jax.process_count(), max(1, self.mesh.size)
    shape = self.data.image_shape
    sources = []
    for name in ("val", "test"):
      split = self.data.split(name)
      if isinstance(split, splits_lib.QueryGallery):
        sources += [(f"{name}.query", split.query.images),
                    (f"{name}.gallery", split.gallery.images)]
      else:
        sources.append((name, split.images))
    for name, source in sources:
      if id(source) in self.plan:
        continue
      padded = -(-len(source) // self.batch_size) * self.batch_size
      on_device = image_bytes(padded // ndev, shape)
      on_host = image_bytes(padded // pc, shape)
      where = STREAM
      if 0 < on_device <= device_left:
        where, device_left = DEVICE, device_left - on_device
      elif self._records(source) and 0 < on_host <= host_left:
        where, host_left = HOST, host_left - on_host  # arrays are in host memory already
      self.plan[id(source)], self.names[id(source)] = where, name
    ec = self.config.get("eval_cache", None)
    train = self.data.train_images
    if ((ec is None or ec.get("train", True)) and self._records(train)
        and 0 < image_bytes(len(train), shape) <= host_left):
      self.plan[id(train)], self.names[id(train)] = HOST, "train"

  def _workers_for(self, num: int) -> int:
    # Worker processes pay off for large splits only: starting them costs seconds, about what
    # decoding a few thousand images in this process costs.
    return self.num_workers if num >= EVAL_WORKERS_MIN_IMAGES else 0

  def _eval_batches(self, source, process_index, process_count, persistent):
    from dmljax.data import pipeline  # pylint: disable=g-import-not-at-top
    return pipeline.eval_batches(source, self.data.eval_transform, self.batch_size,
                                 process_index, process_count, self._workers_for(len(source)),
                                 self.prefetch, persistent=persistent)

  def cache(self, source) -> Optional[ImageCache]:
    """The cache of ``source`` (built now if planned and not built yet), or None (streamed)."""
    key = id(source)
    where = self.plan.get(key, STREAM)
    if where == STREAM or len(source) == 0:
      return None
    if key not in self.caches:
      t0 = time.perf_counter()
      self.caches[key] = self._build(source, where, rows=self.names[key] == "train")
      self.build_seconds[self.names[key]] = time.perf_counter() - t0
      c = self.caches[key]
      logging.info("Evaluation cache: %s, %d images, %.1f MB in %s memory, decoded in %.2f s.",
                   self.names[key], c.num, c.nbytes / 2**20, where,
                   self.build_seconds[self.names[key]])
    return self.caches[key]

  def _build(self, source, where: str, rows: bool) -> ImageCache:
    n, bsz = len(source), self.batch_size
    if rows:  # every row, in index order, in every process
      out = None
      with self._eval_batches(source, 0, 1, persistent=False) as batches:
        for b, (images, valid) in enumerate(batches):
          if out is None:
            out = np.empty((n,) + images.shape[1:], images.dtype)
          out[b * bsz:b * bsz + valid] = images[:valid]
      return ImageCache(where, n, bsz, rows=out)
    pi, pc = jax.process_index(), jax.process_count()
    with self._eval_batches(source, pi, pc, persistent=False) as batches:
      if where == DEVICE:
        return ImageCache(where, n, bsz,
                          device=[parallel.global_batch(images, self.mesh)
                                  for images, _ in batches])
      out, per = None, bsz // pc
      for b, (images, _) in enumerate(batches):
        if out is None:
          out = np.empty((len(batches) * per,) + images.shape[1:], images.dtype)
        out[b * per:(b + 1) * per] = images
      return ImageCache(where, n, bsz, host=out)

  def _embed_cache(self, model_params, batch_stats, c: ImageCache, embed_fn, on_device=False):
    if c.device is not None:
      out = [embed_fn(model_params, batch_stats, x) for x in c.device]
    else:
      per = c.batch_size // jax.process_count()
      out = [embed_fn(model_params, batch_stats,
                           parallel.global_batch(c.host[b * per:(b + 1) * per], self.mesh))
             for b in range(len(c.host) // per)]
    return _read_back(out, c.num, on_device)

  def _embed_rows(self, model_params, batch_stats, rows, indices, embed_fn, on_device=False):
    """Embeddings of ``rows[indices]`` in the streaming path's batches (padding: the batch's
    first image), built from the cached rows."""
    indices = np.asarray(indices, np.int64)
    n, bsz = len(indices), self.batch_size
    if n == 0:
      raise ValueError("Cannot embed an empty split.")
    pi, per = jax.process_index(), bsz // jax.process_count()
    out = []
    for lo in range(0, n, bsz):
      pos = np.full(bsz, lo, np.int64)
      pos[:min(bsz, n - lo)] = np.arange(lo, min(lo + bsz, n))
      local = rows[indices[pos[pi * per:(pi + 1) * per]]]
      out.append(embed_fn(model_params, batch_stats, parallel.global_batch(local, self.mesh)))
    return _read_back(out, n, on_device)

  def close(self):
    """Stops the streaming workers and drops the caches (idempotent)."""
    for batches in self._streams.values():
      batches.close()
    self._streams.clear()
    self.caches.clear()

  # --------------------------------------------------------------------------- embedding

  def embed(self, model_params, batch_stats, images, indices=None, raw=False, on_device=False):
    """Embeddings of an image source (array or records), or of its ``indices``; ``raw``: before
    the model's normalisation. numpy, or with ``on_device`` the jax array left on the devices."""
    embed_fn = self.embed_fn_raw if raw else self.embed_fn
    c = self.cache(images)
    if c is not None and indices is None and c.rows is None:
      return self._embed_cache(model_params, batch_stats, c, embed_fn, on_device)
    if c is not None and c.rows is not None:
      return self._embed_rows(model_params, batch_stats, c.rows,
                              np.arange(c.num) if indices is None else indices, embed_fn,
                              on_device)
    if indices is None and self.plan.get(id(images)) == STREAM:
      # A planned split too large for the caches: its workers live for the whole run.
      if id(images) not in self._streams:
        self._streams[id(images)] = self._eval_batches(
            images, jax.process_index(), jax.process_count(), persistent=True)
      return embed_source(embed_fn, self.mesh, model_params, batch_stats, images,
                          self.data.eval_transform, self.batch_size,
                          batches=self._streams[id(images)], on_device=on_device)
    source = images if indices is None else take(images, indices)
    return embed_source(embed_fn, self.mesh, model_params, batch_stats, source,
                        self.data.eval_transform, self.batch_size,
                        self._workers_for(len(source)), self.prefetch, on_device=on_device)

  def embed_train(self, model_params, batch_stats, indices, raw=False) -> np.ndarray:
    return self.embed(model_params, batch_stats, self.data.train_images, indices, raw=raw)

  def metrics(self, embeddings, labels, gallery_embeddings=None,
              gallery_labels=None) -> dict[str, float]:
    """The configured metrics of one set of embeddings (see :func:`embedding_metrics`)."""
    # From device arrays: searched on the devices they live on (the run's mesh); from numpy, on
    # all devices as before (the results do not depend on the device count).
    return embedding_metrics(self.config, embeddings, labels, gallery_embeddings, gallery_labels,
                             mesh=self.mesh if isinstance(embeddings, jax.Array) else None)

  def knn_on_device(self) -> bool:
    """Whether evaluations keep the embeddings on the devices for the kNN
    (``config.eval_knn.placement``: "auto" = on GPU/TPU with one process, not on CPU)."""
    from dmljax.kernels import knn as knn_lib  # pylint: disable=g-import-not-at-top
    placement = knn_placement(self.config)
    if placement == "host":
      return False
    return knn_lib.search_on_device(jnp.zeros((1, 1)), True if placement == "device" else None,
                                    knn_lib.flat_mesh(self.mesh))

  def _finite(self, emb):
    if isinstance(emb, jax.Array):  # on the devices: only the count of bad rows is read back
      bad = int(jnp.sum(~jnp.all(jnp.isfinite(emb), axis=1)))
    else:
      bad = int(np.sum(~np.all(np.isfinite(emb), axis=1)))
    if bad:
      # Finite losses can still leave weights that overflow in inference mode.
      raise errors.TrainingDiverged(errors.diverged_message(
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
    dev = self.knn_on_device()  # the kNN then starts from the device arrays
    if isinstance(split, splits_lib.QueryGallery):
      q = self._finite(self.embed(model_params, batch_stats, split.query.images, on_device=dev))
      g = self._finite(self.embed(model_params, batch_stats, split.gallery.images, on_device=dev))
      if on_embeddings is not None:
        on_embeddings(np.concatenate([numerics.to_host(q), numerics.to_host(g)]), split)
      return self.metrics(q, np.asarray(split.query.labels), g,
                          np.asarray(split.gallery.labels))
    emb = self._finite(self.embed(model_params, batch_stats, split.images, on_device=dev))
    if on_embeddings is not None:
      on_embeddings(numerics.to_host(emb), split)
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


def knn_placement(config) -> str:
  """``config.eval_knn.placement`` ("auto" where a config predates it)."""
  ek = config.get("eval_knn", None)
  return "auto" if ek is None else str(ek.get("placement", "auto"))


def knn_options(config) -> dict:
  """The evaluation kNN's keyword arguments from ``config.eval_knn`` (defaults where absent):
  ``sizing``, ``memory_budget`` (bytes; None = from the device's memory), ``approx_recall``."""
  ek = config.get("eval_knn", None)
  if ek is None:
    return {}
  mb = float(ek.get("memory_mb", -1.0))
  return {"sizing": str(ek.get("sizing", "auto")),
          "memory_budget": int(mb * 2**20) if mb > 0 else None,
          "approx_recall": float(ek.get("approx_recall", 0.0)) or None}


def embedding_metrics(config, embeddings, labels, gallery_embeddings=None,
                      gallery_labels=None, mesh=None) -> dict[str, float]:
  """The metrics ``config`` asks for (``recall_ks``, ``precision_ks``, ``map_ks``, ``ndcg_ks``;
  MAP@R, R-precision and P@1 always; k-means NMI and F1 with ``clustering``) of same-set
  retrieval, or of queries searched against a gallery. Embeddings may be numpy or jax arrays;
  jax arrays on a GPU/TPU are searched where they are (``config.eval_knn``)."""
  from dmljax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  c = config
  placement = knn_placement(c)
  m = metrics_lib.retrieval_metrics(
      embeddings, labels, gallery_embeddings=gallery_embeddings, gallery_labels=gallery_labels,
      recall_ks=tuple(c.recall_ks), precision_ks=tuple(c.precision_ks),
      map_ks=tuple(c.map_ks), ndcg_ks=tuple(c.ndcg_ks), mesh=mesh,
      on_device={"auto": None, "device": True, "host": False}[placement], **knn_options(c))
  if c.clustering:
    embeddings = numerics.to_host(embeddings)
    if gallery_embeddings is not None:
      gallery_embeddings = numerics.to_host(gallery_embeddings)
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


def print_table(final: dict[str, float]):
  """The final table: the trained model and, measured in the same run, its trivial baselines."""
  extra = sorted({k.rsplit("/", 1)[1] for k in final
                  if k.startswith("test/") and k.rsplit("/", 1)[1].startswith("recall_at_")})
  cols = list(TABLE_METRICS) + [k for k in extra if k not in TABLE_METRICS]
  lines = ["", f"{'model':<10} {'split':<6} " + " ".join(f"{c:>15}" for c in cols)]
  # With a pretrained trunk "untrained/" is that trunk, not fine-tuned; "random_init/" the
  # randomly initialised network.
  pretrained = "random_init/val/map_at_r" in final
  for model, prefix in (("trained", ""), ("pretrained" if pretrained else "untrained", "untrained/"),
                        ("random", "random_init/"), ("pixels", "pixels/")):
    for split in ("val", "test"):
      if f"{prefix}{split}/map_at_r" not in final:
        continue
      row = [final.get(f"{prefix}{split}/{c}", float("nan")) for c in cols]
      lines.append(f"{model:<10} {split:<6} " + " ".join(f"{v:>15.4f}" for v in row))
  text = "\n".join(lines)
  if jax.process_index() == 0:
    print(text, flush=True)
  return text
