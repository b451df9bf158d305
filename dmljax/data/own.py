"""Data sets of your own images: a folder with one sub-folder per class, or a CSV of paths and labels.

::

    python -m dmljax.data.prepare folder --manual_dir=~/photos --data_dir=~/dmljax_data --name=shop
    python -m dmljax.data.prepare csv --manual_dir=~/photos/labels.csv --data_dir=DIR --name=shop

Both write a TFDS data set ``dmljax_NAME`` in ``--data_dir`` with the records and metadata of the
benchmark data sets (:mod:`dmljax.data.builders`), so the same reader, pipeline, trainer, protocol
and evaluation serve it (``--config.dataset.name=NAME --config.dataset.data_dir=DIR``;
``configs/own_data.py``). ``docs/own_data.md`` is the walkthrough.

**Folder.** ``ROOT/CLASS/...`` (images anywhere below a class folder belong to that class), or
split folders above the classes: ``ROOT/train/CLASS/...`` with ``ROOT/test/CLASS/...``, or
``train``, ``query`` and ``gallery`` (query images are searched against the gallery). Split folders
are recognised only when ROOT's sub-folders are nothing but split names and no image lies loose in
ROOT; ``layout="classes"`` or ``"splits"`` overrides the guess. Images are found by extension
(:data:`IMAGE_EXTENSIONS`, any case); hidden files and folders (``.name``) are left out, and other
files are ignored (counted). **CSV.** A header row with ``path`` and ``label`` and optionally
``split`` (train / test / query / gallery, on every row) and ``x1,y1,x2,y2`` (a box in pixels, all
four or none); paths relative to the CSV file's folder (or absolute); extra columns are ignored.

**Classes and splits.** Labels are any strings; the class ids number the class names in sorted
(string) order from 0, and the names are kept. Without split folders or a ``split`` column the
split is class-disjoint as in the benchmarks: the classes sorted by name, the first
``floor(C * (1 - test_fraction))`` (at least one, at most ``C - 1``) for training and the rest for
testing, or, with ``shuffle_seed``, a random choice of them. The split is decided over the classes
listed, before any image is decoded.

**Bad input.** A missing or empty ``manual_dir``, a CSV without its columns or with a bad row, a
name that is taken: one ``ValueError`` / ``FileNotFoundError`` before anything is written. An
image that does not decode, or a CSV row whose file is missing, is skipped: named in a
:class:`~dmljax.data.builders.SkippedImageWarning`, counted, listed in the metadata.

**Preparing again.** The metadata keep a fingerprint of the input (the name, size and
modification time of every image file, the CSV's bytes, and the options): preparing the same input
again is a no-op, and an input that changed since is refused (``--overwrite`` rebuilds).
"""
from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import types
import warnings
from typing import Callable, Optional, Sequence

import numpy as np

from dmljax.data import builders

__all__ = ["KINDS", "LAYOUTS", "IMAGE_EXTENSIONS", "SPLIT_SETS", "Listing", "list_folder",
           "list_csv", "make_plan", "builder_class", "prepare", "class_split"]

#: Input kinds of ``python -m dmljax.data.prepare``.
KINDS = ("folder", "csv")

#: Values of ``--layout`` (folders only).
LAYOUTS = ("auto", "classes", "splits")

#: File name endings taken as images (compared in lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

#: The split names a folder or CSV may use, and the sets of them a data set may have.
SPLIT_NAMES = ("train", "test", "query", "gallery")
SPLIT_SETS = (("train", "test"), ("train", "query", "gallery"))

_CSV_REQUIRED = ("path", "label")
_CSV_BOX = ("x1", "y1", "x2", "y2")
_LISTED = 10  # paths named in a message before "and N more"
_FINGERPRINT_VERSION = 1


def _names(paths: Sequence[str], limit: int = _LISTED) -> str:
  shown = ", ".join(paths[:limit])
  return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _visible(folder: str) -> tuple[list, list]:
  """(sub-folder names, file names) of ``folder``, sorted, hidden ones left out."""
  dirs, files = [], []
  with os.scandir(folder) as it:
    for e in it:
      if e.name.startswith("."):
        continue
      (dirs if e.is_dir() else files).append(e.name)
  return sorted(dirs), sorted(files)


@dataclasses.dataclass
class _Item:
  """One listed image: where it is, its class name, split (None: decided by class) and box."""
  path: str            # relative to the folder / as written in the CSV
  member: str          # path read through the source
  label: str
  split: Optional[str]
  image_id: int
  bbox: Optional[tuple] = None
  missing: bool = False
  where: str = ""      # how a message names it


@dataclasses.dataclass
class Listing:
  """What a folder or CSV holds, listed (and fingerprinted) before any image is read.

  Attributes:
    kind: ``folder`` or ``csv``.
    manual_dir: the folder or CSV file (absolute).
    items: the images, in image id order.
    layout: ``classes`` / ``splits`` (folders), ``column`` / ``none`` (CSV: a ``split`` column?).
    splits: the split names, in writing order.
    ignored: paths of files that are not images (by extension) or outside any class folder.
    source: what the metadata keep to recognise this input: kind, path, options, fingerprint.
  """
  kind: str
  manual_dir: str
  items: list
  layout: str
  splits: tuple
  ignored: list
  source: dict
  root: str = ""


def _check_split_set(names: Sequence[str], where: str, fix: str) -> tuple:
  present = set(names)
  for split_set in SPLIT_SETS:
    if present == set(split_set):
      return split_set
  unknown = sorted(present - set(SPLIT_NAMES))
  if unknown:
    raise ValueError(f"{where} has split names {unknown} besides the split names; valid: "
                     f"{', '.join(SPLIT_NAMES)} ({fix}).")
  raise ValueError(f"{where} has the splits {sorted(present)}; a data set has train and test, or "
                   f"train, query and gallery ({fix}).")


def class_split(class_names: Sequence[str], test_fraction: float = 0.5,
                shuffle_seed: Optional[int] = None) -> dict:
  """``{class name: "train" | "test"}``: the class-disjoint split of the classes.

  Sorted by name, the first ``floor(C * (1 - test_fraction))`` classes (kept within 1 .. C - 1)
  train and the rest test; with ``shuffle_seed`` the training classes are a random choice of that
  many (``numpy.random.default_rng(shuffle_seed)``), each group still listed in name order.
  """
  names = sorted(set(class_names))
  n = len(names)
  if n < 2:
    raise ValueError(f"found {n} class{'' if n == 1 else 'es'} ({', '.join(names)}); a "
                     "class-disjoint split into train and test needs at least 2 (add class "
                     "folders or labels).")
  n_train = min(max(int(math.floor(n * (1.0 - float(test_fraction)) + 1e-9)), 1), n - 1)
  order = names
  if shuffle_seed is not None:
    order = [names[i] for i in np.random.default_rng(int(shuffle_seed)).permutation(n)]
  train = set(order[:n_train])
  return {c: "train" if c in train else "test" for c in names}


def _stat_key(path: str) -> tuple:
  st = os.stat(path)
  return st.st_size, st.st_mtime_ns


def _fingerprint(kind: str, options: dict, entries: Sequence, extra: bytes = b"") -> str:
  h = hashlib.sha256()
  h.update(json.dumps({"v": _FINGERPRINT_VERSION, "kind": kind, "options": options},
                      sort_keys=True).encode())
  h.update(extra)
  for e in entries:
    h.update(json.dumps(e).encode())
    h.update(b"\n")
  return h.hexdigest()


def _check_root(manual_dir: Optional[str], what: str, kind: str) -> str:
  if not manual_dir:
    raise ValueError(f"--manual_dir is required: {what}.")
  path = os.path.abspath(os.path.expanduser(manual_dir))
  if not os.path.exists(path):
    raise FileNotFoundError(f"--manual_dir={manual_dir} does not exist; give {what}.")
  if kind == "folder" and not os.path.isdir(path):
    hint = (" (for a CSV file use: python -m dmljax.data.prepare csv)"
            if path.lower().endswith(".csv") else "")
    raise ValueError(f"--manual_dir={manual_dir} is a file, not a folder; give {what}{hint}.")
  if kind == "csv" and os.path.isdir(path):
    raise ValueError(f"--manual_dir={manual_dir} is a folder; the csv kind reads a CSV file "
                     "(for a folder of class sub-folders use: python -m dmljax.data.prepare "
                     "folder).")
  return path


def list_folder(manual_dir: str, layout: str = "auto", test_fraction: float = 0.5,
                shuffle_seed: Optional[int] = None) -> Listing:
  """Lists the images of a folder of class sub-folders (see the module docstring).

  Raises:
    FileNotFoundError: ``manual_dir`` does not exist.
    ValueError: it is empty, holds no images, or its split folders are not a valid set.
  """
  what = "the folder holding one sub-folder of images per class (docs/own_data.md)"
  root = _check_root(manual_dir, what, "folder")
  if layout not in LAYOUTS:
    raise ValueError(f"--layout={layout} is not one of {', '.join(LAYOUTS)}.")
  top_dirs, top_files = _visible(root)
  if not top_dirs and not top_files:
    raise ValueError(f"--manual_dir={manual_dir} is empty; put one sub-folder per class in it, "
                     "each holding that class's images (docs/own_data.md).")
  loose = [f for f in top_files if _is_image(f)]
  resolved = layout
  if layout == "auto":
    resolved = ("splits" if top_dirs and set(top_dirs) <= set(SPLIT_NAMES) and not loose
                else "classes")
  if resolved == "splits":
    splits = _check_split_set(top_dirs, f"--manual_dir={manual_dir}",
                              "--layout=classes reads its sub-folders as classes")
    groups = [(s, os.path.join(root, s), s + "/") for s in splits]
  else:
    splits = ("train", "test")
    groups = [(None, root, "")]
  found, stats = [], []
  ignored = list(top_files)  # files outside the class folders, and (below) files not images
  for split, folder, prefix in groups:
    class_dirs, files = _visible(folder)
    if split is not None:
      ignored += [prefix + f for f in files]
    for name in class_dirs:
      base = os.path.join(folder, name)
      seen = {os.path.realpath(base)}
      for here, subdirs, names in os.walk(base, followlinks=True):
        # Hidden folders are left out; a linked folder is read once (a link to a parent would
        # otherwise be walked forever).
        subdirs[:] = [d for d in sorted(subdirs) if not d.startswith(".")
                      and os.path.realpath(os.path.join(here, d)) not in seen]
        seen.update(os.path.realpath(os.path.join(here, d)) for d in subdirs)
        rel_here = os.path.relpath(here, root).replace(os.sep, "/")
        for f in sorted(names):
          if f.startswith("."):
            continue
          rel = f"{rel_here}/{f}"
          if not _is_image(f):
            ignored.append(rel)
            continue
          found.append((rel, name, split))
          stats.append([rel, *_stat_key(os.path.join(here, f))])
  if not found:
    raise ValueError(f"--manual_dir={manual_dir} holds no images in class sub-folders (looked "
                     f"for files ending in {', '.join(IMAGE_EXTENSIONS)} inside "
                     f"{'train/CLASS/, ...' if resolved == 'splits' else 'ROOT/CLASS/'}); "
                     "put each class's images in a sub-folder named after the class.")
  found.sort(key=lambda f: f[0])
  stats.sort(key=lambda s: s[0])
  options = {"layout": layout, "test_fraction": float(test_fraction),
             "shuffle_seed": shuffle_seed}
  if resolved == "classes":
    by_class = class_split([f[1] for f in found], test_fraction, shuffle_seed)
    found = [(rel, label, by_class[label]) for rel, label, _ in found]
  items = [_Item(rel, rel, label, split, i + 1, where=os.path.join(root, rel))
           for i, (rel, label, split) in enumerate(found)]
  source = {"kind": "folder", "manual_dir": root, "options": options, "files": len(items),
            "fingerprint": _fingerprint("folder", options, stats)}
  return Listing("folder", root, items, resolved, splits, ignored, source, root=root)


def _csv_text(path: str, manual_dir: str) -> tuple[bytes, str]:
  with open(path, "rb") as f:
    data = f.read()
  try:
    return data, data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise ValueError(f"--manual_dir={manual_dir} is not a UTF-8 text file ({e}); save the CSV "
                     "as UTF-8.") from None


def list_csv(manual_dir: str, test_fraction: float = 0.5,
             shuffle_seed: Optional[int] = None) -> Listing:
  """Lists the images of a CSV file (see the module docstring); missing files are marked.

  Raises:
    FileNotFoundError: the CSV file does not exist.
    ValueError: missing columns, no rows, or a bad row (its line named).
  """
  what = "a CSV file with the columns path,label (docs/own_data.md)"
  path = _check_root(manual_dir, what, "csv")
  data, text = _csv_text(path, manual_dir)
  reader = csv.reader(io.StringIO(text, newline=""))
  try:
    header = next(reader, None)
    rows = [(reader.line_num, row) for row in reader]
  except csv.Error as e:
    raise ValueError(f"{path}, line {reader.line_num}: not valid CSV ({e}).") from None
  if not header or not any(h.strip() for h in header):
    raise ValueError(f"{path} is empty; it needs a header row path,label[,split][,x1,y1,x2,y2] "
                     "and one row per image.")
  columns = [h.strip().lower() for h in header]
  missing = [c for c in _CSV_REQUIRED if c not in columns]
  if missing:
    raise ValueError(f"{path} has no column{'s' if len(missing) > 1 else ''} "
                     f"{', '.join(missing)} (its header: {','.join(h.strip() for h in header)}); "
                     "the first row must name the columns path,label and optionally split and "
                     "x1,y1,x2,y2.")
  box_cols = [c for c in _CSV_BOX if c in columns]
  if box_cols and len(box_cols) != 4:
    raise ValueError(f"{path} has the box column(s) {', '.join(box_cols)} but not "
                     f"{', '.join(c for c in _CSV_BOX if c not in columns)}; give all four of "
                     "x1,y1,x2,y2 or none.")
  col = {c: columns.index(c) for c in columns}
  has_split = "split" in col
  base = os.path.dirname(path)
  items, stats = [], []
  for line, row in rows:
    if not any(cell.strip() for cell in row):
      continue
    row = row + [""] * (len(columns) - len(row))  # fields left out at the end are empty
    value = lambda c: row[col[c]].strip()  # noqa: E731  pylint: disable=cell-var-from-loop
    rel, label = value("path"), value("label")
    if not rel or not label:
      raise ValueError(f"{path}, line {line}: an empty {'path' if not rel else 'label'}; every "
                       "row needs an image path and its label.")
    split = None
    if has_split:
      split = value("split").lower()
      if split not in SPLIT_NAMES:
        raise ValueError(f"{path}, line {line}: split {value('split')!r} is not one of "
                         f"{', '.join(SPLIT_NAMES)}.")
    bbox = None
    if box_cols:
      try:
        bbox = tuple(float(value(c)) for c in _CSV_BOX)
      except ValueError:
        raise ValueError(f"{path}, line {line}: the box {[value(c) for c in _CSV_BOX]} is not "
                         "four numbers x1,y1,x2,y2 (pixels).") from None
      if not (all(map(math.isfinite, bbox)) and bbox[2] > bbox[0] and bbox[3] > bbox[1]):
        raise ValueError(f"{path}, line {line}: the box {bbox} is empty; it needs x2 > x1 and "
                         "y2 > y1 (pixels).")
    full = os.path.normpath(os.path.join(base, os.path.expanduser(rel)))
    exists = os.path.isfile(full)
    stats.append([rel, label, split, bbox, *(_stat_key(full) if exists else (None, None))])
    items.append(_Item(rel, full, label, split, line, bbox, missing=not exists,
                       where=f"{full} (line {line} of {os.path.basename(path)})"))
  if not items:
    raise ValueError(f"{path} has a header but no rows; add one row per image "
                     "(path,label[,split]).")
  options = {"test_fraction": float(test_fraction), "shuffle_seed": shuffle_seed}
  if has_split:
    splits = _check_split_set({it.split for it in items}, f"{path} (column split)",
                              "or leave the split column out for a class-disjoint split")
    layout = "column"
  else:
    splits, layout = ("train", "test"), "none"
    by_class = class_split([it.label for it in items], test_fraction, shuffle_seed)
    for it in items:
      it.split = by_class[it.label]
  source = {"kind": "csv", "manual_dir": path, "options": options, "files": len(items),
            "fingerprint": _fingerprint("csv", options, stats, data)}
  return Listing("csv", path, items, layout, splits, [], source, root=base)


# ------------------------------------------------------------------------------------------------
# The plan and the builder.


def make_plan(name: str, listing: Listing, *, workers: Optional[int] = None,
              log: Optional[Callable[[str], None]] = None) -> builders.Plan:
  """Decodes every listed image and numbers the classes: the :class:`~builders.Plan` to write.

  Raises:
    ValueError: a split left without a readable image.
  """
  log = log or (lambda text: None)
  source = builders._Folder(listing.root)  # pylint: disable=protected-access
  names = sorted({it.label for it in listing.items})
  class_id = {c: i for i, c in enumerate(names)}
  entries = [builders._Entry(it.split, it.image_id, class_id[it.label], it.path, source,  # pylint: disable=protected-access
                             it.member, it.bbox) for it in listing.items]
  present = [i for i, it in enumerate(listing.items) if not it.missing]
  workers = workers or min(8, os.cpu_count() or 1)
  log(f"{name}: decoding {len(present)} images to check them ({workers} threads)")
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    results = dict(zip(present, pool.map(builders._inspect,  # pylint: disable=protected-access
                                         [entries[i] for i in present])))
  splits = {s: [] for s in listing.splits}
  skipped = {s: [] for s in listing.splits}
  for i, (it, entry) in enumerate(zip(listing.items, entries)):
    example, error = results.get(i, (None, "FileNotFoundError: the file does not exist"))
    if example is None:
      skipped[it.split].append({"image_id": it.image_id, "path": it.path, "error": error})
      why = "which does not exist" if it.missing else f"which does not decode ({error})"
      warnings.warn(f"{name}: skipped {it.where}, {why}", builders.SkippedImageWarning,
                    stacklevel=2)
      continue
    x1, y1, x2, y2 = example.bbox  # a CSV box is kept inside the image
    example.bbox = (min(max(x1, 0.0), example.width), min(max(y1, 0.0), example.height),
                    min(max(x2, 0.0), example.width), min(max(y2, 0.0), example.height))
    if example.bbox[2] <= example.bbox[0] or example.bbox[3] <= example.bbox[1]:
      example.bbox = (0.0, 0.0, float(example.width), float(example.height))
      warnings.warn(f"{name}: the box of {it.where} lies outside its {example.width}x"
                    f"{example.height} image; the whole image is used", UserWarning,
                    stacklevel=2)
    splits[it.split].append(example)
  empty = [s for s, examples in splits.items() if not examples]
  if empty:
    raise ValueError(f"{name}: no readable images in split(s) {empty} (of {listing.manual_dir}); "
                     "nothing was written.")
  groups = (("train",), ("query", "gallery")) if "query" in splits else (("train",), ("test",))
  class_ids = builders._assign_labels(name, splits, groups)  # pylint: disable=protected-access
  for examples in splits.values():
    examples.sort(key=lambda e: e.image_id)
  log(f"{name}: " + ", ".join(f"{s} {len(e)} images" for s, e in splits.items())
      + f"; {sum(map(len, skipped.values()))} skipped")
  info = {"source": listing.source, "layout": listing.layout,
          "ignored": {"count": len(listing.ignored), "first": listing.ignored[:_LISTED]}}
  return builders.Plan(name, splits, class_ids, dict(enumerate(names)), skipped, info)


def _download_and_prepare(self, dl_manager, download_config):
  if self.plan is None:
    raise ValueError(f"{self.name} is a data set of your own images: prepare it with python -m "
                     "dmljax.data.prepare folder|csv --manual_dir=... --data_dir=... "
                     f"--name={self.KEY}.")
  return builders._Builder._download_and_prepare(self, dl_manager, download_config)  # pylint: disable=protected-access


def builder_class(name: str):
  """A TFDS builder class for the data set ``name`` of your own (``dmljax_NAME``, unregistered:
  plain TFDS reads the prepared files, ``tfds.data_source("dmljax_NAME", data_dir=...)``)."""
  full = builders.full_name(name)
  if builders.is_benchmark(name):
    raise ValueError(f"{name} is a benchmark data set, not one of your own.")
  body = {"KEY": name, "__module__": __name__,
          "DESCRIPTION": f"{name}: your own images, prepared by python -m dmljax.data.prepare.",
          "MANUAL_DOWNLOAD_INSTRUCTIONS": "Your own images: a folder or a CSV file "
                                          "(docs/own_data.md).",
          "_download_and_prepare": _download_and_prepare}
  cls = types.new_class("".join(p.capitalize() for p in full.split("_")), (builders._Builder,),  # pylint: disable=protected-access
                        {"skip_registration": True}, lambda ns: ns.update(body))
  cls.name = full
  return cls


def _same_source(stored: dict, now: dict) -> Optional[str]:
  """None if ``stored`` describes the input ``now``; else what differs, in words."""
  if not stored:
    return "holds no record of the input it was prepared from"
  if stored.get("kind") != now["kind"]:
    return f"was prepared from a {stored.get('kind')} input, not a {now['kind']}"
  if stored.get("manual_dir") != now["manual_dir"]:
    return f"was prepared from {stored.get('manual_dir')}, not {now['manual_dir']}"
  if stored.get("options") != now["options"]:
    then, cur = stored.get("options", {}), now["options"]
    diff = ", ".join(f"--{k}={then.get(k)} then, {cur.get(k)} now" for k in sorted(cur)
                     if then.get(k) != cur.get(k))
    return f"was prepared with other options ({diff})"
  if stored.get("fingerprint") != now["fingerprint"]:
    what = "images" if now["kind"] == "folder" else "rows or files"
    return (f"was prepared from {now['manual_dir']}, which changed since: {stored.get('files')} "
            f"{what} then, {now['files']} now, and a file was added, removed or modified")
  return None


def prepare(kind: str, manual_dir: Optional[str], data_dir: str, *, name: str,
            layout: Optional[str] = None, test_fraction: Optional[float] = None,
            shuffle_seed: Optional[int] = None, overwrite: bool = False,
            workers: Optional[int] = None, short_side: int = 0,
            jpeg_quality: Optional[int] = None,
            log: Optional[Callable[[str], None]] = None) -> dict:
  """Prepares (or recognises as already prepared) the data set ``name`` of your own images.

  Args:
    kind: ``folder`` or ``csv``.
    manual_dir: the folder, or the CSV file.
    data_dir: the TFDS data folder to write ``dmljax_NAME`` to.
    name: the data set's name.
    layout: ``auto`` (default), ``classes`` or ``splits`` (folders only).
    test_fraction: fraction of the classes for testing when the input has no splits (default 0.5).
    shuffle_seed: draw the training classes at random with this seed instead of by name.
    overwrite: rebuild a data set already prepared under this name.
    workers: threads decoding the images.
    short_side: N > 0 stores each image resized to shorter side N (``--short_side``).
    jpeg_quality: JPEG quality of that copy (default 95).
    log: called with progress lines.

  Returns:
    The summary of :func:`dmljax.data.prepare.prepare`, plus ``kind``, ``manual_dir`` and
    ``data_dir``.

  Raises:
    FileNotFoundError, ValueError: bad input or a changed input without ``overwrite``; nothing is
      written then.
  """
  from dmljax.data import prepare as prepare_lib  # pylint: disable=g-import-not-at-top
  if kind not in KINDS:
    raise ValueError(f"unknown input kind {kind!r}; valid: {', '.join(KINDS)}.")
  builders.check_own_name(name)
  quality = prepare_lib.check_copy_options(short_side, jpeg_quality)
  if kind == "csv" and layout not in (None, "auto"):
    raise ValueError("--layout is for folders; a CSV gives its splits in a split column.")
  test_fraction = 0.5 if test_fraction is None else float(test_fraction)
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"--test_fraction must be between 0 and 1 (exclusive), got {test_fraction}.")
  if shuffle_seed is not None and int(shuffle_seed) < 0:
    raise ValueError(f"--shuffle_seed must be >= 0, got {shuffle_seed}.")
  if kind == "folder":
    listing = list_folder(manual_dir, layout or "auto", test_fraction, shuffle_seed)
  else:
    listing = list_csv(manual_dir, test_fraction, shuffle_seed)
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  cls = builder_class(name)
  builder = cls(data_dir=data_dir, file_format="array_record")
  already = False
  if builder.is_prepared():
    stored = dict(builder.info.metadata or {}).get("source", {})
    differs = _same_source(stored, listing.source)
    if differs is None and not overwrite:
      builders.check_copy(builder, short_side, data_dir)
      already = True
    elif differs is not None and not overwrite:
      raise ValueError(f"{builder.name} in {data_dir} {differs}; --overwrite rebuilds it from "
                       "the input as it is now (or choose another --name).")
  if not already:
    if log:
      log(f"{name}: {len(listing.items)} images listed in {listing.manual_dir} (layout "
          f"{listing.layout}; splits {', '.join(listing.splits)})"
          + (f"; {len(listing.ignored)} other files ignored (not images, or outside the class "
             "folders)" if listing.ignored else ""))
    plan = make_plan(name, listing, workers=workers, log=log)
    plan.short_side, plan.quality, plan.workers = int(short_side), quality, workers or 0
    prepare_lib.write(builder, plan, listing.root, overwrite=overwrite, log=log)
    builder = cls(data_dir=data_dir)  # re-read what was written
  summary = builders.summarize(builder.info.metadata)
  return {"name": name, "tfds_name": builder.name, "path": os.fspath(builder.data_path),
          "already_prepared": already,
          "image_copy": dict(builder.info.metadata or {}).get("image_copy", "full"), "kind": kind, "manual_dir": listing.manual_dir,
          "data_dir": data_dir, **summary}
