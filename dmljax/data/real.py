"""The benchmark data sets (CUB-200-2011, Cars196, SOP, In-shop), read from their prepared records.

Prepare one once (``python -m dmljax.data.prepare NAME --manual_dir=... --data_dir=...``, see
``docs/data.md``); ``load_dataset(NAME, data_dir=...)`` then returns a :class:`~dmljax.data.Dataset`
whose splits hold :class:`~dmljax.data.records.RecordSplit` views instead of image arrays: the
encoded images stay on disk and the input pipeline (:mod:`dmljax.data.pipeline`) decodes the
records a batch needs.

Splits (class-disjoint everywhere):
  * ``train`` / ``val``: the data set's training classes (CUB 1-100, Cars 1-98, SOP's Ebay_train,
    In-shop's train items), cut by class: ``val_fraction`` of them (a seeded choice,
    ``config.dataset.seed``) for validation, or, with ``protocol_fold=k``, fold ``k`` of the
    4-fold protocol of Musgrave et al. over these classes (:func:`splits.protocol_folds`);
  * ``test``: the data set's test classes, the same for every fold; for In-shop a
    :class:`~dmljax.data.splits.QueryGallery` (its query images searched against its gallery).

Data sets of your own images (``python -m dmljax.data.prepare folder|csv --name=NAME``,
:mod:`dmljax.data.own`) load the same way under their name, with a query / gallery test split
when they were prepared with one. Their validation classes adapt to the number ``T`` of training
classes: ``round(T * val_fraction)`` but at least 2, leaving at least 2 to train (so ``T >= 4``),
and the loader prints what it chose.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from dmljax.data import splits as splits_lib

#: Names accepted by ``load_dataset`` for the prepared benchmark data sets.
REAL_DATASETS = ("cub", "cars", "sop", "inshop")


def default_data_dir() -> str:
  """``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets`` (TFDS's own default)."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"),
                                                          "tensorflow_datasets")


def _split(view) -> splits_lib.Split:
  return splits_lib.Split(images=view, labels=view.labels, class_ids=view.class_ids,
                          class_names=view.class_names)


def is_prepared_name(name: str) -> bool:
  """Whether ``load_dataset(name)`` reads prepared records: a benchmark, or any name that is not
  built in and can name a data set of your own."""
  from dmljax.data import builders  # pylint: disable=g-import-not-at-top
  if name in REAL_DATASETS:
    return True
  try:
    builders.check_own_name(name)
  except ValueError:
    return False
  return True


def own_val_count(num_train_classes: int, val_fraction: float) -> int:
  """Validation classes of a data set of your own: ``round(T * val_fraction)`` within 2 .. T - 2.

  Raises:
    ValueError: fewer than 4 training classes.
  """
  t = int(num_train_classes)
  if t < 4:
    raise ValueError(f"{t} training classes; training and validating by class needs at least 4 "
                     "(2 to train, 2 to validate): prepare the data set with more classes for "
                     "training (a smaller --test_fraction, or more class folders in train/).")
  return int(min(max(int(round(t * float(val_fraction))), 2), t - 2))


def load_prepared(name: str, *, seed: int = 0, data_dir: Optional[str] = None,
                  val_fraction: float = 0.2, protocol_fold: Optional[int] = None,
                  num_folds: int = splits_lib.PROTOCOL_NUM_FOLDS,
                  fold_cuts: str = "even") -> splits_lib.Dataset:
  """A prepared data set (a benchmark or your own) as train / val / test splits of records.

  Args:
    name: one of :data:`REAL_DATASETS`, or the name of a data set of your own.
    seed: seed of the validation classes (ignored with ``protocol_fold``).
    data_dir: the TFDS data folder the data set was prepared into (default
      :func:`default_data_dir`).
    val_fraction: fraction of the training classes held out for validation; 0 trains on all
      of them (the ``val`` split is then empty: the conventional mode of ``dmljax.protocol``
      monitors the test split instead).
    protocol_fold: fold of the 4-fold protocol (its train / val classes) instead of
      ``val_fraction``.
    num_folds: folds of the protocol.
    fold_cuts: how the folds cut the classes (:func:`splits.protocol_folds`).

  Raises:
    dmljax.data.records.DatasetNotPrepared: the data set is not in ``data_dir`` (the message
      gives the prepare command).
    ValueError: bad options.
  """
  from dmljax.data import records  # pylint: disable=g-import-not-at-top
  if not is_prepared_name(name):
    raise ValueError(f"Unknown prepared data set {name!r}; valid: {list(REAL_DATASETS)} or the "
                     "name of a data set of your own.")
  own = name not in REAL_DATASETS
  data_dir = data_dir or default_data_dir()
  prepared = records.open_prepared(name, data_dir)
  source = prepared["train"]
  ids = sorted(int(c) for c in source.class_ids)
  chose = ""
  if protocol_fold is not None:
    if not 0 <= int(protocol_fold) < int(num_folds):
      raise ValueError(f"protocol fold {protocol_fold} is out of range; valid folds: "
                       f"0..{int(num_folds) - 1}.")
    groups = splits_lib.protocol_folds(ids, int(num_folds), fold_cuts)[int(protocol_fold)]
  elif float(val_fraction) == 0.0:
    groups = {"train": list(ids), "val": []}
    chose = f"{len(ids)} training classes, all to train (val_fraction=0)"
  else:
    if not 0 < float(val_fraction) < 1:
      raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction} (set "
                       "--config.dataset.options.val_fraction).")
    if own:
      n_val = own_val_count(len(ids), val_fraction)
      fractions = {"train": (len(ids) - n_val) / len(ids), "val": n_val / len(ids)}
      chose = (f"{len(ids)} training classes: {len(ids) - n_val} to train, {n_val} to validate "
               f"(val_fraction={float(val_fraction):g}, at least 2 each)")
    else:
      fractions = {"train": 1.0 - float(val_fraction), "val": float(val_fraction)}
    groups = splits_lib.partition_classes(ids, fractions, seed)
  out = {"train": _split(source.with_classes(groups["train"])),
         "val": _split(source.with_classes(groups["val"]))}
  if "query" in prepared.splits:
    out["test"] = splits_lib.QueryGallery(query=_split(prepared["query"]),
                                          gallery=_split(prepared["gallery"]))
  else:
    out["test"] = _split(prepared["test"])
  info = {"data_dir": data_dir, "image_copy": prepared.image_copy, "train_classes": groups["train"], "val_classes": groups["val"],
          "prepared": {k: len(v) for k, v in prepared.splits.items()}}
  if protocol_fold is not None:
    test = out["test"]
    test_ids = (np.union1d(test.query.class_ids, test.gallery.class_ids)
                if isinstance(test, splits_lib.QueryGallery) else test.class_ids)
    info["protocol"] = {"fold": int(protocol_fold), "num_folds": int(num_folds),
                        "train_classes": groups["train"], "val_classes": groups["val"],
                        "test_classes": [int(c) for c in test_ids], "class_pool": ids}
  if own:
    if protocol_fold is not None:
      chose = (f"protocol fold {protocol_fold}: {len(groups['train'])} classes to train, "
               f"{len(groups['val'])} to validate")
    test = out["test"]
    info["chose"] = f"{name}: {chose}; test: {test.num_classes} classes, {len(test)} images"
    print(info["chose"], flush=True)
  return splits_lib.Dataset(name=name, splits=out, image_shape=(None, None, 3), info=info)
