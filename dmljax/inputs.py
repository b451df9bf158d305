"""The input of a run: its splits, transforms, host sampler and training batch pipeline.

:func:`create_input` loads ``config.dataset`` into an :class:`Input`; :func:`make_sampler` picks
the host sampler of training batches (the framework's, or ``config.sampler``);
:func:`make_train_loader` starts the worker pipeline that decodes them ahead of the loop. The
evaluation side (:mod:`dmljax.evaluation`) reads the same :class:`Input`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

SAMPLERS = ("m_per_class", "random")


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


def pipeline_state(step: int, data: Input, config) -> dict:
  """What a checkpoint records of the input pipeline: the next batch and how batches are made."""
  return {"next_step": int(step), "seed": int(config.seed),
          "train_transform": data.train_transform.to_dict(),
          "eval_transform": data.eval_transform.to_dict(),
          "image_shape": [int(v) for v in data.image_shape]}
