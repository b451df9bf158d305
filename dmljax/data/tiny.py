"""Tiny valid copies of CUB, Cars196, SOP and In-shop in their distributed layouts, for training.

Unlike the fixtures of ``tests/test_prepare.py`` (a fixed handful of classes and some corrupt
images, made to test the builders), these writers take the numbers of classes and images per class
as arguments and write only images that decode, so a test can prepare a small data set and train
on it::

    from dmljax.data import tiny as tinydata
    data_dir = tinydata.prepare_tiny("cub", tmp_path, train_classes=6, per_class=4)
    ds = records.open_prepared("cub", data_dir)

Every image is a small photo-like JPEG (about 40x30 or 30x40 pixels, the size varying from image to
image): a noisy background gradient unrelated to the class and, inside a box, an object whose
colour, stripe orientation and stripe frequency depend on the class, plus per-image jitter
(brightness, stripe phase, position, noise). A network, or a nearest class mean of the pixels in the
box, can tell the classes apart. The same arguments always write the same bytes.

Each ``write_*`` function returns what it wrote, ``{split: [class id of each image, in image id
order]}``; :func:`expected_splits` turns that into the ``splits`` part of the summary that
``dmljax.data.prepare.prepare`` returns.
"""
from __future__ import annotations

import colorsys
import contextlib
import io
import os
import shutil
import tarfile
import warnings
from typing import Sequence

import numpy as np
from PIL import Image

__all__ = ["photo", "write_cub", "write_cars", "write_sop", "write_inshop", "WRITERS",
           "expected_splits", "prepare_tiny", "SOP_SIZES"]

#: Default image counts of the SOP classes (cycled): mostly 2, a few larger, like the real data.
SOP_SIZES = (2, 3, 2, 4, 2, 2)

_SOP_SUPER = ("bicycle", "cabinet", "chair", "coffee_maker", "fan", "kettle", "lamp", "mug", "sofa",
              "stapler", "table", "toaster")
_INSHOP_CATEGORIES = (("WOMEN", "Dresses"), ("MEN", "Denim"), ("WOMEN", "Blouses_Shirts"),
                      ("MEN", "Jackets_Vests"), ("WOMEN", "Skirts"), ("MEN", "Tees_Tanks"))
_INSHOP_VIEWS = ("1_front", "2_side", "3_back", "4_full", "7_additional")
_GOLDEN = 0.6180339887498949


def photo(class_id: int, index: int, salt: int = 0, scale: int = 1):
  """A small photo-like JPEG of class ``class_id``.

  Args:
    class_id: the class; it sets the object's colour, shape and stripe pattern.
    index: which image of the class (sets the size, box, jitter and noise).
    salt: varies the whole data set (each writer uses its own).
    scale: 1 gives the ~40 x 30 image; N > 1 that image enlarged N times (bilinear) with fresh
      pixel noise, box scaled alike (19: ~770 x 530, the size of Cars196's photos, for the
      benchmarks' host-side measurements).

  Returns:
    ``(data, (width, height), (x, y, w, h))``: the JPEG bytes, the image size and the object's box
    in whole pixels, inside the image (``x + w <= width``, ``y + h <= height``).
  """
  rng = np.random.default_rng([salt, class_id, index])
  landscape = (class_id + index) % 2 == 0
  width = (40 if landscape else 30) + int(rng.integers(-3, 4))
  height = (30 if landscape else 40) + int(rng.integers(-3, 4))
  bw = int(round(width * rng.uniform(0.55, 0.85)))
  bh = int(round(height * rng.uniform(0.55, 0.85)))
  x0 = int(rng.integers(0, width - bw + 1))
  y0 = int(rng.integers(0, height - bh + 1))

  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  # Background: a dull gradient between two random colours, the same for every class.
  c0, c1 = rng.uniform(40, 200, (2, 3))
  theta = rng.uniform(0, 2 * np.pi)
  t = (xx * np.cos(theta) + yy * np.sin(theta))
  t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
  pixels = c0 + (c1 - c0) * t[..., None]

  # The object: class colour and stripes (orientation and frequency set by the class).
  hue = (class_id * _GOLDEN + salt * 0.137) % 1.0
  colour = 255.0 * np.array(colorsys.hsv_to_rgb(hue, 0.8, 0.95)) * rng.uniform(0.85, 1.1)
  angle = np.pi * ((class_id * 0.3819660112501051) % 1.0)
  cycles = 1.5 + (class_id % 3)
  u = ((xx - x0) * np.cos(angle) + (yy - y0) * np.sin(angle)) / max(bw, bh)
  stripes = np.sin(2 * np.pi * cycles * u + rng.uniform(0, 2 * np.pi)) > 0
  shade = np.where(stripes, 1.0, 0.55)[..., None]
  cx, cy = x0 + (bw - 1) / 2, y0 + (bh - 1) / 2
  if class_id % 2:  # ellipse
    inside = ((xx - cx) / (bw / 2)) ** 2 + ((yy - cy) / (bh / 2)) ** 2 <= 1.0
  else:  # rectangle
    inside = (xx >= x0) & (xx < x0 + bw) & (yy >= y0) & (yy < y0 + bh)
  pixels = np.where(inside[..., None], colour * shade, pixels)
  pixels += rng.normal(0.0, 8.0, pixels.shape)
  out = io.BytesIO()
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
  if scale == 1:
    return out.getvalue(), (width, height), (x0, y0, bw, bh)
  big = Image.open(io.BytesIO(out.getvalue())).convert("RGB").resize(
      (width * scale, height * scale), Image.BILINEAR)
  pixels = np.asarray(big, np.float32) + np.random.default_rng([class_id, index]).normal(
      0, 6, (height * scale, width * scale, 3))
  out = io.BytesIO()
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
  return (out.getvalue(), (width * scale, height * scale),
          (x0 * scale, y0 * scale, bw * scale, bh * scale))


def _write(path: str, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)


def _check_count(what: str, value: int, low: int, high: int):
  if not low <= value <= high:
    raise ValueError(f"{what} must be in {low}..{high}, got {value}.")


# ------------------------------------------------------------------------------------------------
# CUB-200-2011


def write_cub(manual: str, train_classes: int = 8, test_classes: int = 4, per_class: int = 4,
              archive: bool = False) -> dict:
  """Writes ``CUB_200_2011/`` (or ``CUB_200_2011.tgz``) into ``manual``.

  Args:
    manual: the folder to write into (made if needed).
    train_classes: classes 1..train_classes (the train split; at most 100).
    test_classes: classes 101..100+test_classes (the test split; at most 100).
    per_class: images per class.
    archive: pack the folder into ``CUB_200_2011.tgz`` (and remove the folder).

  Returns:
    ``{"train": [...], "test": [...]}``: the class id of each image, in image id order.
  """
  _check_count("train_classes", train_classes, 1, 100)
  _check_count("test_classes", test_classes, 1, 100)
  _check_count("per_class", per_class, 1, 10000)
  manual = os.fspath(manual)
  root = os.path.join(manual, "CUB_200_2011")
  files = {n: [] for n in ("images", "image_class_labels", "bounding_boxes", "classes",
                           "train_test_split")}
  written = {"train": [], "test": []}
  image_id = 0
  for c in list(range(1, train_classes + 1)) + list(range(101, 101 + test_classes)):
    bird = f"Tiny_Bird_{c}"
    folder = f"{c:03d}.{bird}"
    files["classes"].append(f"{c} {folder}")
    for k in range(per_class):
      image_id += 1
      data, _, (x, y, w, h) = photo(c, k, salt=1)
      path = f"{folder}/{bird}_{k + 1:04d}_{image_id}.jpg"
      _write(os.path.join(root, "images", path), data)
      files["images"].append(f"{image_id} {path}")
      files["image_class_labels"].append(f"{image_id} {c}")
      files["bounding_boxes"].append(f"{image_id} {float(x)} {float(y)} {float(w)} {float(h)}")
      files["train_test_split"].append(f"{image_id} {int(k % 2 == 0)}")
      written["train" if c <= 100 else "test"].append(c)
  for name, lines in files.items():
    _write(os.path.join(root, f"{name}.txt"), "\n".join(lines) + "\n")
  if archive:
    with tarfile.open(os.path.join(manual, "CUB_200_2011.tgz"), "w:gz") as tar:
      tar.add(root, arcname="CUB_200_2011")
    shutil.rmtree(root)
  return written


# ------------------------------------------------------------------------------------------------
# Cars196, all-images release


def _mat_structs(rows: Sequence[dict], fields: Sequence[str]):
  """A 1xN MATLAB struct array (strings as char arrays, numbers as uint16 scalars)."""
  array = np.zeros((1, len(rows)), dtype=[(f, object) for f in fields])
  for i, row in enumerate(rows):
    array[0, i] = tuple(np.array([v]) if isinstance(v, str) else np.array([[v]], np.uint16)
                        for v in (row[f] for f in fields))
  return array


def write_cars(manual: str, train_classes: int = 8, test_classes: int = 4,
               per_class: int = 4, photo_scale: int = 1) -> dict:
  """Writes the all-images release of Cars196 (``car_ims/`` and ``cars_annos.mat``) into ``manual``.

  Args:
    manual: the folder to write into (made if needed).
    train_classes: classes 1..train_classes (the train split; at most 98).
    test_classes: classes 99..98+test_classes (the test split; at most 98).
    per_class: images per class.
    photo_scale: :func:`photo`'s ``scale`` (19: photos of Cars196's real size).

  Returns:
    ``{"train": [...], "test": [...]}``: the class id of each image, in annotation order (the
    records themselves are ordered by class id, then by the SHA-1 of the image).
  """
  import scipy.io  # pylint: disable=g-import-not-at-top
  _check_count("train_classes", train_classes, 1, 98)
  _check_count("test_classes", test_classes, 1, 98)
  _check_count("per_class", per_class, 1, 10000)
  manual = os.fspath(manual)
  rows, written = [], {"train": [], "test": []}
  for c in list(range(1, train_classes + 1)) + list(range(99, 99 + test_classes)):
    for k in range(per_class):
      data, _, (x, y, w, h) = photo(c, k, salt=2, scale=photo_scale)
      path = f"car_ims/{len(rows) + 1:06d}.jpg"
      _write(os.path.join(manual, path), data)
      # 1-based pixel coordinates, both corners inside the image, as in the real annotations.
      rows.append({"relative_im_path": path, "bbox_x1": x + 1, "bbox_y1": y + 1,
                   "bbox_x2": x + w, "bbox_y2": y + h, "class": c, "test": k % 2})
      written["train" if c <= 98 else "test"].append(c)
  names = np.empty((1, 196), dtype=object)
  for i in range(196):
    names[0, i] = np.array([f"Tiny Car Model {i + 1} 2012"])
  fields = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")
  scipy.io.savemat(os.path.join(manual, "cars_annos.mat"),
                   {"annotations": _mat_structs(rows, fields), "class_names": names})
  return written


# ------------------------------------------------------------------------------------------------
# Stanford Online Products


def write_sop(manual: str, train_classes: int = 12, test_classes: int = 6,
              sizes: Sequence[int] = SOP_SIZES) -> dict:
  """Writes ``Stanford_Online_Products/`` into ``manual``.

  Class ids run 1..train_classes (train) then on (test), image ids 1.. over train then test, and
  each split's classes are spread over the 12 super classes in contiguous blocks, as in the real
  data.

  Args:
    manual: the folder to write into (made if needed).
    train_classes: number of train classes.
    test_classes: number of test classes.
    sizes: images per class, cycled within each split (class ``i`` of a split has
      ``sizes[i % len(sizes)]``); the default is mostly 2, so batches of 4 images per class need
      ``sampler.small_classes="repeat"``.

  Returns:
    ``{"train": [...], "test": [...]}``: the class id of each image, in image id order.
  """
  _check_count("train_classes", train_classes, 1, 100000)
  _check_count("test_classes", test_classes, 1, 100000)
  if not sizes or min(sizes) < 1:
    raise ValueError(f"sizes must be positive image counts, got {tuple(sizes)}.")
  manual = os.fspath(manual)
  root = os.path.join(manual, "Stanford_Online_Products")
  header = "image_id class_id super_class_id path"
  rows, written = {"train": [], "test": []}, {"train": [], "test": []}
  image_id, class_id = 0, 0
  for split, count in (("train", train_classes), ("test", test_classes)):
    for i in range(count):
      class_id += 1
      super_id = i * len(_SOP_SUPER) // count + 1
      for k in range(sizes[i % len(sizes)]):
        image_id += 1
        data, _, _ = photo(class_id, k, salt=3)
        path = f"{_SOP_SUPER[super_id - 1]}_final/{111000000000 + 7919 * class_id}_{k}.JPG"
        _write(os.path.join(root, path), data)
        rows[split].append(f"{image_id} {class_id} {super_id} {path}")
        written[split].append(class_id)
  for name, lines in (("Ebay_train", rows["train"]), ("Ebay_test", rows["test"]),
                      ("Ebay_info", rows["train"] + rows["test"])):
    _write(os.path.join(root, f"{name}.txt"), "\n".join([header] + lines) + "\n")
  return written


# ------------------------------------------------------------------------------------------------
# In-shop Clothes Retrieval


def write_inshop(manual: str, train_items: int = 10, test_items: int = 6,
                 per_item: int = 3) -> dict:
  """Writes ``img/`` and ``Eval/list_eval_partition.txt`` of In-shop into ``manual``.

  Item ids 1..train_items+test_items are dealt alternately to train and test (while both have items
  left), so neither split's ids are contiguous. Train item ``j`` has ``per_item - j % per_item``
  images (3, 2, 1, 3, ... by default), all with status ``train``; every test item has ``per_item``
  images, one ``query`` and the others ``gallery``.

  Args:
    manual: the folder to write into (made if needed).
    train_items: number of train items (classes).
    test_items: number of test items (classes of both query and gallery).
    per_item: most images of a train item, images of every test item (at least 2, at most 5).

  Returns:
    ``{"train": [...], "query": [...], "gallery": [...]}``: the item number (class id) of each
    image, in the order of the partition list.
  """
  _check_count("train_items", train_items, 1, 10000)
  _check_count("test_items", test_items, 1, 10000)
  _check_count("per_item", per_item, 2, len(_INSHOP_VIEWS))
  manual = os.fspath(manual)
  order, left = [], {"train": train_items, "test": test_items}
  while left["train"] or left["test"]:
    for side in ("train", "test"):
      if left[side]:
        order.append(side)
        left[side] -= 1
  lines, written = [], {"train": [], "query": [], "gallery": []}
  counts = {"train": 0, "test": 0}
  for item, side in enumerate(order, 1):
    j = counts[side]
    counts[side] += 1
    gender, category = _INSHOP_CATEGORIES[item % len(_INSHOP_CATEGORIES)]
    item_id = f"id_{item:08d}"
    n = per_item - j % per_item if side == "train" else per_item
    for k in range(n):
      status = "train" if side == "train" else ("query" if k == j % per_item else "gallery")
      data, _, _ = photo(item, k, salt=4)
      path = f"img/{gender}/{category}/{item_id}/{k + 1:02d}_{_INSHOP_VIEWS[k]}.jpg"
      _write(os.path.join(manual, path), data)
      lines.append(f"{path} {item_id} {status}")
      written[status].append(item)
  _write(os.path.join(manual, "Eval", "list_eval_partition.txt"),
         "\n".join([str(len(lines)), "image_name item_id evaluation_status"] + lines) + "\n")
  return written


# ------------------------------------------------------------------------------------------------


#: Short data set name -> its writer.
WRITERS = {"cub": write_cub, "cars": write_cars, "sop": write_sop, "inshop": write_inshop}


def expected_splits(written: dict) -> dict:
  """``{split: {"images", "classes"}}`` (the summary's ``splits``) of what a writer returned."""
  return {split: {"images": len(ids), "classes": len(set(ids))} for split, ids in written.items()}


def prepare_tiny(name: str, root, short_side: int = 0, **kw) -> str:
  """Writes a tiny data set into ``root/manual`` and prepares it into ``root/data``.

  Preparation goes through ``dmljax.data.prepare.prepare``, with TFDS's progress bars, info logs
  and "Downloading and preparing" lines silenced. A data set already prepared in ``root/data`` is
  left as it is.

  Args:
    name: ``cub``, ``cars``, ``sop`` or ``inshop``.
    root: a folder (e.g. pytest's ``tmp_path``).
    short_side: 0 prepares the files as written into ``root/data``; N > 0 the copy resized to
      shorter side N (``prepare --short_side=N``) into ``root/data_short_side_N``.
    **kw: arguments of the writer (:func:`write_cub`, ...).

  Returns:
    The ``data_dir`` to pass to ``dmljax.data.records.open_prepared(name, data_dir)``.

  Raises:
    RuntimeError: an image was skipped (the writers should write only valid ones).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  from dmljax.data import builders  # pylint: disable=g-import-not-at-top
  from dmljax.data import prepare as prepare_lib  # pylint: disable=g-import-not-at-top
  key = builders.short_name(name)
  manual = os.path.join(os.fspath(root), "manual")
  data_dir = os.path.join(os.fspath(root),
                          f"data_short_side_{int(short_side)}" if short_side else "data")
  WRITERS[key](manual, **kw)
  tfds.disable_progress_bar()
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
      warnings.simplefilter("error", builders.SkippedImageWarning)
      summary = prepare_lib.prepare(key, manual, data_dir, short_side=short_side)
  finally:
    absl_logging.set_verbosity(verbosity)
  skipped = [p for paths in summary["skipped"].values() for p in paths]
  if skipped:
    raise RuntimeError(f"{key}: {len(skipped)} tiny image(s) were skipped: {skipped[:5]}")
  return data_dir
