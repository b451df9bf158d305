"""Reading the data sets written by ``python -m dmljax.data.prepare`` (no TensorFlow needed).

``open_prepared("cub", data_dir)`` returns a :class:`PreparedDataset` whose ``splits`` map each
split name to a :class:`RecordSplit`: a random-access sequence of records (dicts with the features
listed in :mod:`dmljax.data.builders`: ``image`` bytes, ``label``, ``class_id``, ``image_id``,
``path``, ``bbox`` float32 [4], ``width``, ``height``). ``RecordSplit.labels`` and ``class_ids``
come from the stored metadata, so sampling by class needs no image read. A split pickles without
its open files (they are reopened on first use), so it can be sent to data-loading worker
processes, and ``subset`` / ``with_classes`` carve views out of it, e.g. a class-disjoint
validation split out of the training classes::

    ds = open_prepared("cub", "/data/tfds")
    train = ds.splits["train"]
    val_classes = train.class_ids[::5]                      # every fifth training class
    val = train.with_classes(val_classes)                   # labels renumbered from 0
    rest = train.with_classes(np.setdiff1d(train.class_ids, val_classes))

The records are also readable with plain TFDS: ``tfds.data_source("dmljax_cub", data_dir=...)``
(after ``import dmljax.data.builders``, or from the files alone). Under
``tfds.testing.mock_data(...)``, which redirects TFDS away from ``data_dir``, ``open_prepared``
serves TFDS's random records, and their labels are numbered from their ``class_id``.
"""
from __future__ import annotations

import dataclasses
import glob
import operator
import os
import threading
from typing import Optional, Sequence

import numpy as np
import tensorflow_datasets as tfds

from dmljax.data import builders

__all__ = ["DatasetNotPrepared", "UnknownDataset", "PreparedDataset", "RecordSplit",
           "open_prepared"]

_OPEN_LOCK = threading.Lock()  # loader threads may touch a split's records first at the same time


class DatasetNotPrepared(FileNotFoundError):
  """The data set has not been prepared in this ``data_dir`` (the message gives the command)."""

  @classmethod
  def for_dataset(cls, name: str, data_dir: str, detail: str = "") -> "DatasetNotPrepared":
    if not builders.is_benchmark(name):
      return UnknownDataset(
          f"Unknown data set {name!r}; valid data sets: {sorted(builders.BUILTIN_NAMES)}, or one "
          f"of your own, but none named {name!r} is prepared in {data_dir}{detail} "
          "(config.dataset.data_dir; --data_dir of the prepare command). Prepare your images "
          f"once with: python -m dmljax.data.prepare folder --manual_dir=<your image folder> "
          f"--data_dir={data_dir} --name={name} (or csv --manual_dir=<file.csv>; "
          "docs/own_data.md).")
    return cls(
        f"Data set {name!r} is not prepared in {data_dir}{detail} (config.dataset.data_dir; "
        f"--data_dir of the prepare command). Prepare it once with: python -m "
        f"dmljax.data.prepare {name} --manual_dir=<where you downloaded the files> "
        f"--data_dir={data_dir} (docs/data.md lists the files to download).")


class UnknownDataset(DatasetNotPrepared, ValueError):
  """A name that is neither built in nor a data set of your own prepared in that ``data_dir``."""


class RecordSplit:
  """One split of a prepared data set, or a view over some of its records.

  Attributes:
    name: short data set name (``cub``, ...).
    data_dir: the TFDS data folder.
    split: split name in the prepared data set.
    labels: [N] int32 contiguous labels in record order (this view's numbering).
    class_ids: [C] int32 original class id of each label.
    class_names: C readable class names.
    indices: [N] int64 record numbers in the prepared split (``arange(N)`` for a whole split).
    image_copy: which copy of the images the data set holds: ``"full"`` (the files as
      distributed) or ``"short_side_N"`` (``prepare --short_side=N``).
  """

  def __init__(self, name: str, data_dir: str, split: str, labels, class_ids,
               class_names: Optional[Sequence[str]] = None, indices=None,
               image_copy: str = "full"):
    self.name = name
    self.data_dir = data_dir
    self.split = split
    self.labels = np.asarray(labels, np.int32)
    self.class_ids = np.asarray(class_ids, np.int32)
    self.class_names = tuple(class_names) if class_names is not None else tuple(
        str(c) for c in self.class_ids)
    self.indices = (np.arange(len(self.labels), dtype=np.int64) if indices is None
                    else np.asarray(indices, np.int64))
    self.image_copy = str(image_copy)
    if len(self.indices) != len(self.labels):
      raise ValueError(f"{len(self.indices)} record indices but {len(self.labels)} labels.")
    self._source = None

  @property
  def num_classes(self) -> int:
    return len(self.class_ids)

  def __len__(self) -> int:
    return len(self.labels)

  def __repr__(self) -> str:
    return (f"RecordSplit({self.name}/{self.split}: {len(self)} records, {self.num_classes} "
            "classes)")

  def _open(self):
    if self._source is None:
      with _OPEN_LOCK:
        if self._source is None:
          self._source = tfds.data_source(builders.full_name(self.name), data_dir=self.data_dir,
                                          split=self.split, download=False)
    return self._source

  def _position(self, i) -> int:
    i = operator.index(i)  # numpy integers too; floats and arrays are refused
    if i < 0:
      i += len(self)
    if not 0 <= i < len(self):
      raise IndexError(f"record {i} is out of range for {self!r}.")
    return i

  def __getitem__(self, i) -> dict:
    """The record ``i`` of this view (its ``label`` in this view's numbering)."""
    i = self._position(i)
    record = dict(self._open()[int(self.indices[i])])
    record["label"] = int(self.labels[i])
    return record

  def __getitems__(self, positions: Sequence[int]) -> list:
    """Several records in one read (what the loader's batches and grain's batched reads call:
    one array_record read of all of them instead of one per record)."""
    positions = [self._position(i) for i in positions]
    records = self._open().__getitems__([int(self.indices[i]) for i in positions])
    out = []
    for i, record in zip(positions, records):
      record = dict(record)
      record["label"] = int(self.labels[i])
      out.append(record)
    return out

  def subset(self, positions) -> "RecordSplit":
    """A view over the records at ``positions`` of this view, labels renumbered contiguously.

    Args:
      positions: indices into this view (an integer array or a boolean mask of length N).

    Returns:
      A :class:`RecordSplit` whose labels are ``0 .. C'-1`` over the classes present, in the order
      of their original class ids.
    """
    positions = np.asarray(positions)
    if positions.dtype == bool:
      if positions.shape != (len(self),):
        raise ValueError(f"a boolean mask must have length {len(self)}, got {positions.shape}.")
      positions = np.flatnonzero(positions)
    positions = positions.astype(np.int64).ravel()
    if positions.size and (positions.min() < -len(self) or positions.max() >= len(self)):
      raise IndexError(f"positions out of range for {self!r}.")
    present, labels = np.unique(self.labels[positions], return_inverse=True)
    return RecordSplit(self.name, self.data_dir, self.split, labels.astype(np.int32),
                       self.class_ids[present], [self.class_names[k] for k in present],
                       self.indices[positions], self.image_copy)

  def with_classes(self, class_ids) -> "RecordSplit":
    """A view over the records whose original class id is in ``class_ids`` (relabelled)."""
    class_ids = np.asarray(class_ids, np.int64).ravel()
    unknown = np.setdiff1d(class_ids, self.class_ids)
    if unknown.size:
      raise ValueError(f"class ids {unknown[:10].tolist()} are not in {self!r}; its class ids "
                       f"run from {self.class_ids.min()} to {self.class_ids.max()}.")
    return self.subset(np.flatnonzero(np.isin(self.class_ids[self.labels], class_ids)))

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_source"] = None  # reopened lazily in the process that unpickles it
    return state


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
  """A prepared data set.

  Attributes:
    name: short name (``cub``, ``cars``, ``sop``, ``inshop``).
    tfds_name: registered TFDS name (``dmljax_cub``, ...).
    data_dir: the TFDS data folder.
    splits: split name -> :class:`RecordSplit`.
    metadata: what the preparation stored (per split: labels, class ids and names, skipped
      images; the release and input files; ``image_copy``).
  """
  name: str
  tfds_name: str
  data_dir: str
  splits: dict
  metadata: dict

  @property
  def image_copy(self) -> str:
    """``"full"`` (the image files as distributed) or ``"short_side_N"`` (``prepare
    --short_side=N``); data sets prepared before the option existed are full."""
    return str(self.metadata.get("image_copy", "full"))

  def __getitem__(self, split: str) -> RecordSplit:
    if split not in self.splits:
      raise ValueError(f"Data set {self.name!r} has no split {split!r}; splits: "
                       f"{list(self.splits)}.")
    return self.splits[split]


def _not_prepared_detail(data_dir: str, full: str) -> str:
  leftovers = sorted(glob.glob(os.path.join(glob.escape(data_dir), full, "incomplete.*")))
  if leftovers:
    return (f" (an interrupted preparation left {leftovers[0]}: it is never read, and can be "
            "deleted)")
  if os.path.isdir(os.path.join(data_dir, full)):
    return f" ({os.path.join(data_dir, full)} holds no finished version {builders.VERSION})"
  return ""


def _labels_from_records(full: str, data_dir: str, split: str):
  """Labels numbered from each record's class_id (data without the stored metadata)."""
  source = tfds.data_source(full, data_dir=data_dir, split=split, download=False)
  ids = np.array([int(np.asarray(source[i]["class_id"])) for i in range(len(source))], np.int64)
  class_ids, labels = np.unique(ids, return_inverse=True)
  return labels, class_ids, None


def open_prepared(name: str, data_dir: str) -> PreparedDataset:
  """Opens a data set prepared by ``python -m dmljax.data.prepare``.

  Args:
    name: ``cub``, ``cars``, ``sop`` or ``inshop`` (or ``dmljax_cub``, ...), or the ``--name`` of
      a data set of your own images (``python -m dmljax.data.prepare folder|csv``).
    data_dir: the ``--data_dir`` it was prepared into.

  Returns:
    A :class:`PreparedDataset`.

  Raises:
    DatasetNotPrepared: no finished preparation in ``data_dir`` (the message has the command).
    ValueError: an unknown name.
  """
  data_dir = os.path.expanduser(os.fspath(data_dir))
  if not builders.is_benchmark(name):
    return _open_own(name, data_dir)
  key = builders.short_name(name)
  full = builders.tfds_name(key)
  builder = tfds.builder(full, data_dir=data_dir)
  # tfds.testing.mock_data points every builder at its own folder: then let TFDS serve the data.
  redirected = (os.path.realpath(os.fspath(builder.data_dir_root))
                != os.path.realpath(data_dir))
  if not redirected and not builder.is_prepared():
    raise DatasetNotPrepared.for_dataset(key, data_dir, _not_prepared_detail(data_dir, full))
  metadata = dict(builder.info.metadata or {})
  stored = metadata.get("splits", {})
  splits = {}
  for split in builders.SPLITS[key]:
    if split in stored:
      m = stored[split]
      labels, class_ids, names = m["labels"], m["class_ids"], m.get("class_names")
    else:
      labels, class_ids, names = _labels_from_records(full, data_dir, split)
    splits[split] = RecordSplit(key, data_dir, split, labels, class_ids, names,
                                image_copy=metadata.get("image_copy", "full"))
  return PreparedDataset(key, full, data_dir, splits, metadata)


def _open_own(name: str, data_dir: str) -> PreparedDataset:
  """A data set of your own images (unregistered: TFDS reads it from its files)."""
  full = builders.full_name(name)
  version_dir = os.path.join(data_dir, full, builders.VERSION)
  from etils import epath  # pylint: disable=g-import-not-at-top  (TFDS's path library: gs:// too)
  if not epath.Path(version_dir, "dataset_info.json").exists():
    raise DatasetNotPrepared.for_dataset(name, data_dir, _not_prepared_detail(data_dir, full))
  metadata = dict(tfds.builder_from_directory(version_dir).info.metadata or {})
  stored = metadata.get("splits", {})
  if not stored:
    raise DatasetNotPrepared.for_dataset(
        name, data_dir, f" ({version_dir} was not written by python -m dmljax.data.prepare)")
  splits = {split: RecordSplit(name, data_dir, split, m["labels"], m["class_ids"],
                               m.get("class_names"),
                               image_copy=metadata.get("image_copy", "full"))
            for split, m in stored.items()}
  return PreparedDataset(name, full, data_dir, splits, metadata)
