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
  #: Which copy of the images the records are: "full" (the files as distributed; also the
  #: embedded arrays) or "short_side_N" (``prepare --short_side=N``).
  image_copy: str = "full"

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


IMAGE_COPY_AUTO = "auto"


def _copy_words(copy: str) -> str:
  from dmljax.data import builders  # pylint: disable=g-import-not-at-top
  if copy == "full":
    return "its full-size images"
  return (f"its copy resized to shorter side {builders.copy_short_side(copy)} (prepare "
          f"--short_side={builders.copy_short_side(copy)})")


def _check_copy(config, image_copy: str, records: bool) -> None:
  """``config.dataset.image_copy`` ("auto" or the copy the run requires) against the data set's,
  and the protocol's resize against a short-side copy (which cannot be enlarged back)."""
  from dmljax.data import builders  # pylint: disable=g-import-not-at-top
  dc = config.dataset
  want = str(dc.get("image_copy", IMAGE_COPY_AUTO))
  if want != IMAGE_COPY_AUTO:
    try:
      builders.copy_short_side(want)
    except ValueError:
      raise ValueError(f"dataset.image_copy={want!r} is not a copy; valid: 'auto' (whatever "
                       "dataset.data_dir holds), 'full' or 'short_side_N' (e.g. "
                       "'short_side_256').") from None
    if want != image_copy:
      where = f" in {dc.get('data_dir') or 'the default data_dir'}" if records else ""
      raise ValueError(f"dataset.image_copy={want!r} but {dc.name!r}{where} holds "
                       f"{_copy_words(image_copy)}; point --config.dataset.data_dir at the "
                       f"{want} copy (python -m dmljax.data.prepare ... --short_side), or set "
                       "--config.dataset.image_copy=auto.")
  short = builders.copy_short_side(image_copy)
  if short and int(config.input.resize) > short:
    raise ValueError(f"input.resize={config.input.resize} needs images with a shorter side of at "
                     f"least {config.input.resize}, but {dc.name!r} in "
                     f"{dc.get('data_dir') or 'the default data_dir'} holds "
                     f"{_copy_words(image_copy)}; use its full copy (another "
                     f"--config.dataset.data_dir) or --config.input.resize={short}.")


def resolve_image_copy(config, data: Input):
  """``config`` with ``dataset.image_copy`` set to the copy the run reads (``"auto"`` resolved),
  so that the run's config.json and checkpoints record it; other configs are returned as they
  are."""
  if config.dataset.get("image_copy", IMAGE_COPY_AUTO) == data.image_copy:
    return config
  config = config.copy_and_resolve_references()
  config.dataset.image_copy = data.image_copy
  return config


def check_image_copy(host: dict, config, workdir: str) -> None:
  """Refuses to resume a run on another copy of its images than the one it trained on.

  ``dataset.data_dir`` may change on resume (the data may move), so the copy is checked on its
  own: the checkpoint's ``config.dataset.image_copy`` (runs from before the option: "full")
  against the one this run reads (``config`` resolved by :func:`resolve_image_copy`).

  Raises:
    dmljax.errors.ConfigChanged: the copies differ (the message names both and the fix).
  """
  from dmljax import errors  # pylint: disable=g-import-not-at-top
  saved_ds = dict(host.get("config", {}).get("dataset", {}))
  then = saved_ds.get("image_copy", "full")
  now = str(config.dataset.get("image_copy", "full"))
  if then in (IMAGE_COPY_AUTO, now) or now == IMAGE_COPY_AUTO:
    return
  then_dir = saved_ds.get("data_dir") or "the default data_dir"
  now_dir = config.dataset.get("data_dir") or "the default data_dir"
  raise errors.ConfigChanged(
      f"{workdir} was trained on {_copy_words(then)} of {config.dataset.name!r} "
      f"(dataset.data_dir={then_dir}), but dataset.data_dir={now_dir} holds "
      f"{_copy_words(now)}: resuming on other pixels breaks exact resumption. Point "
      f"--config.dataset.data_dir at the {then} copy it was trained on, or start a new --workdir "
      "(--allow_config_change continues on this copy).")


def create_input(config) -> Input:
  """Loads ``config.dataset`` and picks its train / val / test splits (ValueError if absent)."""
  from dmljax.data import load_dataset, real  # pylint: disable=g-import-not-at-top
  dc = config.dataset
  options = dict(dc.options)
  if real.is_prepared_name(dc.name):  # the benchmarks and your own images: prepared records
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
  image_copy = str(getattr(train.images, "image_copy", "full")) if records else "full"
  _check_copy(config, image_copy, records)
  return Input(train=train, val=val, test=test, train_labels=labels,
               num_classes=int(np.max(labels)) + 1 if len(labels) else 0, image_shape=shape,
               train_transform=train_tf, eval_transform=eval_tf, image_copy=image_copy)


def _cgroup_cpu_limit():
  """The cgroup (v2) CPU quota in cores, rounded up (``cpu.max``: "quota period"), or None."""
  try:
    with open("/sys/fs/cgroup/cpu.max") as f:
      quota, period = f.read().split()[:2]
  except (OSError, ValueError):
    return None
  if quota == "max":
    return None
  return max(1, -(-int(quota) // int(period)))


def available_cores() -> int:
  """CPU cores this process may use: its affinity mask (``os.sched_getaffinity``: a batch
  scheduler's or ``taskset``'s allotment, not the machine's count), further limited by a cgroup
  CPU quota (``cpu.max``, e.g. ``docker --cpus``) where one is set; at least 1."""
  try:
    cores = len(os.sched_getaffinity(0))
  except (AttributeError, OSError):  # not on Linux
    cores = os.cpu_count() or 1
  limit = _cgroup_cpu_limit()
  return max(1, min(cores, limit) if limit else cores)


def input_workers(config, data: Input) -> int:
  """Decode processes: ``config.input.num_workers``, or (-1) one per available core
  (:func:`available_cores`) for records, 0 for arrays."""
  n = int(config.input.num_workers)
  if n >= 0:
    return n
  if isinstance(data.train_images, np.ndarray):
    return 0
  return available_cores()


def make_train_loader(config, data: Input, framework, sampler, start_step: int):
  """The training input pipeline from ``start_step`` (a :class:`~dmljax.data.pipeline.BatchLoader`).

  Frameworks whose batches are a pure function of the step (``framework.sample_uses_state`` is
  False) have their batches decoded ahead in worker processes. PROFS with hard negative class
  mining picks a hold's classes from a table in the train state: the loop publishes that table
  once per hold (``framework.hold_batch_indices``, a :class:`~dmljax.data.pipeline.HoldBoard`)
  and the workers decode the hold's batches ahead from it. Other frameworks whose batches depend
  on the state decode each batch when it is drawn.
  """
  import functools  # pylint: disable=g-import-not-at-top
  from dmljax.data import pipeline  # pylint: disable=g-import-not-at-top
  pi, pc = jax.process_index(), jax.process_count()
  fn = None
  if not getattr(framework, "sample_uses_state", False):
    fn = functools.partial(sampler.batch, process_index=pi, process_count=pc)
  elif hasattr(framework, "hold_batch_indices"):
    fn = framework.hold_batch_indices(sampler, pi, pc, pipeline.HoldBoard())
  return pipeline.BatchLoader(
      data.train_images, data.train_transform, config.seed, fn, start_step=start_step,
      num_workers=input_workers(config, data) if fn is not None else 0,
      prefetch=max(1, int(config.input.prefetch)), process_index=pi, process_count=pc)


def make_sampler(config, framework, labels, class_names=None):
  """The framework's sampler, or the default one of ``config.sampler`` (``class_names``: a name
  per label, for its messages)."""
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
                                   small_classes=sc.get("small_classes", "error"),
                                   class_names=class_names)


def fit_batch(config, data: Input, num_devices: int):
  """``config`` with ``batch_size`` fitted to the training classes (``sampler.fit_batch``: an
  m-per-class batch of at most as many classes as the split has); prints what it chose."""
  from dmljax.data import samplers  # pylint: disable=g-import-not-at-top
  sc = config.sampler
  if not sc.get("fit_batch", False) or sc.name != "m_per_class":
    return config
  size, message = samplers.fit_classes_per_batch(len(np.unique(data.train_labels)),
                                                 config.batch_size, sc.m, num_devices)
  if message and jax.process_index() == 0:
    print(f"{config.dataset.name}: {message}", flush=True)
  if size == config.batch_size:
    return config
  import copy  # pylint: disable=g-import-not-at-top
  config = copy.deepcopy(config)
  config.batch_size = size
  return config


def pipeline_state(step: int, data: Input, config) -> dict:
  """What a checkpoint records of the input pipeline: the next batch and how batches are made."""
  return {"next_step": int(step), "seed": int(config.seed), "image_copy": data.image_copy,
          "train_transform": data.train_transform.to_dict(),
          "eval_transform": data.eval_transform.to_dict(),
          "image_shape": [int(v) for v in data.image_shape]}
