"""Evaluation: inference-mode embedding of a split and its retrieval / clustering metrics.

:class:`Evaluator` is what the loop, the final table and the frameworks' ``ctx.evaluate`` share;
:func:`embedding_metrics` turns embeddings into the configured metrics; :func:`print_table`
prints the final table beside the trivial baselines (:func:`pixel_embeddings`, and the untrained
network the loop measures before step 1).
"""
from __future__ import annotations

from absl import logging
import jax
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


def make_embed_fn(model, mesh):
  """Jitted inference-mode embedding ``(model_params, batch_stats, images) -> [B, D]`` (replicated)."""
  rep, bat = parallel.replicated(mesh), parallel.batch_sharding(mesh)

  def embed(model_params, batch_stats, images):
    return model.apply(model_variables(model_params, batch_stats), numerics.prepare_images(images),
                       train=False)

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


class Evaluator:
  """Embeds splits in inference mode and computes their metrics, the same way everywhere
  (validation during training, the final table, the frameworks' ``ctx.evaluate``).

  Metrics: retrieval (``config.recall_ks``, ``precision_ks``, ``map_ks``, ``ndcg_ks``; MAP@R,
  R-precision and P@1 always) and, with ``config.clustering``, NMI and pairwise F1 of k-means.
  Embeddings that are not finite raise :class:`dmljax.errors.TrainingDiverged`.
  """

  def __init__(self, config, model, mesh, data: inputs.Input):
    self.config, self.mesh, self.data = config, mesh, data
    self.embed_fn = make_embed_fn(model, mesh)
    self.checkpointer = None  # named in the divergence message once there is one
    self.step = 0
    self.num_workers = inputs.input_workers(config, data)

  def embed(self, model_params, batch_stats, images, indices=None) -> np.ndarray:
    """Embeddings of an image source (array or records), or of its ``indices``."""
    source = images if indices is None else take(images, indices)
    # Worker processes pay off for large splits only: starting them costs seconds, about what
    # decoding a few thousand images in this process costs.
    workers = self.num_workers if len(source) >= EVAL_WORKERS_MIN_IMAGES else 0
    return embed_source(self.embed_fn, self.mesh, model_params, batch_stats, source,
                        self.data.eval_transform, self.config.eval_batch_size,
                        workers, max(1, int(self.config.input.prefetch)))

  def embed_train(self, model_params, batch_stats, indices) -> np.ndarray:
    return self.embed(model_params, batch_stats, self.data.train_images, indices)

  def metrics(self, embeddings, labels, gallery_embeddings=None,
              gallery_labels=None) -> dict[str, float]:
    """The configured metrics of one set of embeddings (see :func:`embedding_metrics`)."""
    return embedding_metrics(self.config, embeddings, labels, gallery_embeddings, gallery_labels)

  def _finite(self, emb):
    if not np.all(np.isfinite(emb)):
      # Finite losses can still leave weights that overflow in inference mode.
      bad = int(np.sum(~np.all(np.isfinite(emb), axis=1)))
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


def print_table(final: dict[str, float]):
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
