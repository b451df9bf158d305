"""TFDS builders for the four metric-learning benchmarks, made from the files as distributed.

The data sets cannot be downloaded automatically (their licences ask each user to fetch them), so
these are *manual download* builders: the user puts the files as distributed (archives, or the
folders they extract to) in a ``manual_dir`` and runs ``python -m dmljax.data.prepare NAME
--manual_dir=DIR --data_dir=DIR`` (see ``docs/data.md``). Importing this module registers:

* ``dmljax_cub``: CUB-200-2011, train = classes 1-100, test = classes 101-200;
* ``dmljax_cars``: Cars196 (either release: all images with ``cars_annos.mat``, or the
  train/test split release with its devkit), train = classes 1-98, test = classes 99-196;
* ``dmljax_sop``: Stanford Online Products, train = ``Ebay_train.txt``, test = ``Ebay_test.txt``;
* ``dmljax_inshop``: In-shop Clothes Retrieval, splits train / query / gallery of
  ``list_eval_partition.txt``.

Every record has the same features, so one reader serves all four (:mod:`dmljax.data.records`):
``image`` (the image file's bytes exactly as distributed, not re-encoded), ``label`` (int64,
contiguous ``0 .. C-1`` within the split, in the order of the original class ids; query and gallery
of In-shop share one label space, the union of their items), ``class_id`` (int64, the data set's
own class id; In-shop: the number in the item id), ``image_id`` (int64: CUB and SOP ids; Cars the
1-based index of the annotation; In-shop the 1-based entry of the partition list), ``path``
(bytes, the image's path as written in the annotation file), ``bbox`` (float32 [4], x1 y1 x2 y2 in
pixels; the whole image ``0 0 w h`` for SOP and In-shop, which have no boxes) and ``width``,
``height`` (int64, of the full image).

**Short-side copy** (``prepare --short_side=256``): every image is stored resized so that its
shorter side is 256 (:func:`shrink_image`: torchvision's ``Resize(256)``, a JPEG of quality 95),
its box and size in the copy's pixels, so the protocol's resize-then-crop reads a small file. The
metadata's ``image_copy`` says which copy a data set is (``"full"``, or ``"short_side_256"`` with
``short_side`` and ``jpeg_quality``); a run records the copy it trained on and refuses to resume
on the other one (:func:`dmljax.inputs.check_image_copy`).

Records are written in a fixed order (``disable_shuffling``): by ``image_id``, except Cars196, whose
records are ordered by class id and then by the SHA-1 of the image bytes, so that both releases
(whose file names and annotation orders differ) give the same records in the same order. Each
split's labels in record order, its class ids (the original id of each label), class names and the
skipped images are stored in the data set's metadata (``metadata.json``), so a reader has all
labels without touching an image.

Every image is decoded once while preparing (at a reduced JPEG scale, which checks the whole
stream); one that does not decode is skipped with a :class:`SkippedImageWarning` and listed in the
metadata. Missing input files, or folders without the expected layout, are reported all at once
before anything is written. TFDS writes into an ``incomplete.*`` folder that it renames only when
everything is written, so an interrupted preparation never looks finished.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import os
import re
import shutil
import tarfile
import tempfile
import warnings
import zipfile
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow_datasets as tfds

__all__ = [
    "NAMES", "BUILTIN_NAMES", "VERSION", "SPLITS", "SkippedImageWarning", "Plan", "make_plan",
    "tfds_name", "short_name", "full_name", "is_benchmark", "check_own_name", "builder_class",
    "summarize", "image_size", "shrink_image", "image_copy_name", "copy_short_side",
    "check_copy", "DmljaxCub", "DmljaxCars", "DmljaxSop", "DmljaxInshop",
]

VERSION = "1.0.0"

#: Short names accepted by the command line, in the order of the documentation.
NAMES = ("cub", "cars", "sop", "inshop")

#: Split names of each data set, in the order they are written.
SPLITS = {
    "cub": ("train", "test"),
    "cars": ("train", "test"),
    "sop": ("train", "test"),
    "inshop": ("train", "query", "gallery"),
}

#: Every data set name dmljax knows without preparation or as a benchmark: a data set of your own
#: (``python -m dmljax.data.prepare folder|csv --name=NAME``) may not take one of them.
BUILTIN_NAMES = NAMES + ("digits", "digits_closed", "glyphs")

# Names of your own data sets: lower-case letters, digits and underscores, starting with a letter
# (TFDS's naming rule, which the folder ``dmljax_NAME`` in --data_dir follows).
_OWN_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")

# Splits whose labels are numbered together (In-shop queries are matched against the gallery).
_LABEL_GROUPS = {"inshop": (("train",), ("query", "gallery"))}

# Images named in one error message before "and N more".
_MAX_LISTED = 20


class SkippedImageWarning(UserWarning):
  """An image that does not decode was left out of the prepared data set."""


def tfds_name(name: str) -> str:
  """The registered TFDS name (``cub`` -> ``dmljax_cub``); ValueError for an unknown data set."""
  return "dmljax_" + short_name(name)


def short_name(name: str) -> str:
  """The short name (``dmljax_cub`` or ``cub`` -> ``cub``); ValueError for an unknown data set."""
  key = name[len("dmljax_"):] if name.startswith("dmljax_") else name
  if key not in NAMES:
    raise ValueError(f"Unknown data set {name!r}; valid names: {', '.join(NAMES)}.")
  return key


def is_benchmark(name: str) -> bool:
  """Whether ``name`` (``cub`` or ``dmljax_cub``, ...) is one of the four benchmarks."""
  return (name[len("dmljax_"):] if name.startswith("dmljax_") else name) in NAMES


def check_own_name(name: str) -> str:
  """``name`` if it can name a data set of your own; else ValueError saying why and what to do."""
  if not name:
    raise ValueError("--name is required: the name to give the data set (e.g. --name=shop); "
                     "train on it with --config.dataset.name=shop.")
  if name in BUILTIN_NAMES or is_benchmark(name):
    raise ValueError(f"--name={name} is a data set built into dmljax ({', '.join(BUILTIN_NAMES)} "
                     "are taken); choose another --name for your own images.")
  if name.startswith("dmljax_"):
    raise ValueError(f"--name={name}: leave out the dmljax_ prefix, it is added to the folder "
                     f"name in --data_dir (--name={name[len('dmljax_'):]}).")
  if not _OWN_NAME.fullmatch(name):
    suggestion = re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_")
    if not suggestion or not suggestion[0].isalpha():
      suggestion = "my_" + suggestion
    raise ValueError(f"--name={name!r} is not a valid data set name: use lower-case letters, "
                     f"digits and underscores, starting with a letter, at most 64 characters "
                     f"(e.g. --name={suggestion[:64]}).")
  return name


def full_name(name: str) -> str:
  """The TFDS name of a benchmark (``cub`` -> ``dmljax_cub``) or of a data set of your own
  (``shop`` -> ``dmljax_shop``); ValueError for a name that can be neither."""
  if is_benchmark(name):
    return tfds_name(name)
  return "dmljax_" + check_own_name(name)


# ------------------------------------------------------------------------------------------------
# Where the input files are read from: a folder, a zip archive read in place, or a tar archive
# unpacked once into a scratch folder (gzip has no random access, so reading its members in record
# order would decompress the archive again and again).


class _Folder:
  """Files under ``root``; member names are relative paths with forward slashes."""

  def __init__(self, root: str):
    self.root = root

  def has(self, name: str) -> bool:
    return os.path.isfile(os.path.join(self.root, name))

  def read(self, name: str) -> bytes:
    with open(os.path.join(self.root, name), "rb") as f:
      return f.read()

  def where(self, name: str) -> str:
    return os.path.join(self.root, name)

  def describe(self) -> str:
    return self.root

  def close(self):
    pass


class _Zip:
  """Members of a zip archive, read in place (zip has an index, so any member is one seek away)."""

  def __init__(self, path: str):
    self.path = path
    self._zip = zipfile.ZipFile(path)
    self._names = {_clean_member(i.filename) for i in self._zip.infolist() if not i.is_dir()}
    self._stored = {_clean_member(i.filename): i.filename for i in self._zip.infolist()}

  def has(self, name: str) -> bool:
    return name in self._names

  def read(self, name: str) -> bytes:
    return self._zip.read(self._stored[name])

  def where(self, name: str) -> str:
    return f"{name} inside {self.path}"

  def describe(self) -> str:
    return self.path

  def close(self):
    self._zip.close()


class _Tar(_Folder):
  """Members of a tar archive under ``prefix``, unpacked in one pass into a scratch folder."""

  def __init__(self, path: str, prefix: str, scratch: "_Scratch"):
    super().__init__(tempfile.mkdtemp(prefix="tar_", dir=scratch.path()))
    self.path = path
    with tarfile.open(path, "r|*") as tar:  # streaming: one sequential read of the archive
      for member in tar:
        name = _clean_member(member.name)
        if not member.isfile() or not name.startswith(prefix) or not _safe_member(name):
          continue
        target = os.path.join(self.root, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with tar.extractfile(member) as src, open(target, "wb") as dst:
          shutil.copyfileobj(src, dst)

  def where(self, name: str) -> str:
    return f"{name} inside {self.path}"

  def describe(self) -> str:
    return self.path


def _clean_member(name: str) -> str:
  name = name.replace("\\", "/")
  while name.startswith("./"):
    name = name[2:]
  return name


def _safe_member(name: str) -> bool:
  parts = name.split("/")
  return not name.startswith("/") and ".." not in parts and ":" not in parts[0]


class _Scratch:
  """A temporary folder made on first use (for unpacked tar archives and TFDS's download dir)."""

  def __init__(self, parent: Optional[str]):
    self.parent = parent
    self._path = None

  def path(self) -> str:
    if self._path is None:
      if self.parent:
        os.makedirs(self.parent, exist_ok=True)
      self._path = tempfile.mkdtemp(prefix=".dmljax_prepare_", dir=self.parent)
    return self._path

  def cleanup(self):
    if self._path is not None:
      shutil.rmtree(self._path, ignore_errors=True)
      self._path = None


class _Inputs:
  """Finds the input files in ``manual_dir``, collecting every missing one for a single error."""

  def __init__(self, name: str, manual_dir: str, scratch: _Scratch):
    self.name = name
    self.manual_dir = manual_dir
    self.scratch = scratch
    self.sources = []
    self.missing = []

  def part(self, folder: str, archives: Sequence[str], subdirs: Sequence[str] = ("",)):
    """The folder ``folder`` (or an archive holding it) in ``manual_dir`` or one of its ``subdirs``.

    Returns a source whose member names start with ``folder + "/"``, or None (recorded as missing).
    ``manual_dir`` may also be that folder itself.
    """
    dirs = [os.path.join(self.manual_dir, s) if s else self.manual_dir for s in subdirs]
    for d in dirs:
      if os.path.isdir(os.path.join(d, folder)):
        return self._add(_Folder(d))
    here = os.path.normpath(self.manual_dir)
    if os.path.basename(here) == folder:
      return self._add(_Folder(os.path.dirname(here)))
    for d in dirs:
      for archive in archives:
        path = os.path.join(d, archive)
        if os.path.isfile(path):
          return self._add(self._open_archive(path, folder))
    looked = " or ".join(d.rstrip(os.sep) for d in dirs)
    self.missing.append(f"{' or '.join(archives)} or its extracted folder {folder}/ "
                        f"(looked for in {looked})")
    return None

  def file(self, name: str, subdirs: Sequence[str] = ("",)) -> Optional[str]:
    """The path of a loose file in ``manual_dir`` or one of its ``subdirs``, or None if missing."""
    dirs = [os.path.join(self.manual_dir, s) if s else self.manual_dir for s in subdirs]
    for d in dirs:
      if os.path.isfile(os.path.join(d, name)):
        return os.path.join(d, name)
    self.missing.append(f"{name} (looked for in {' or '.join(d.rstrip(os.sep) for d in dirs)})")
    return None

  def members(self, source, names: Sequence[str]) -> bool:
    """Records which of ``names`` ``source`` lacks; True when it has them all."""
    if source is None:
      return False
    absent = [n for n in names if not source.has(n)]
    for n in absent:
      self.missing.append(f"{os.path.basename(n)} (looked for as {source.where(n)})")
    return not absent

  def images(self, source, names: Sequence[str], listed_in: str):
    """Records the images of ``listed_in`` that ``source`` lacks (a few named, all counted)."""
    absent = [n for n in names if not source.has(n)]
    if absent:
      shown = ", ".join(source.where(n) for n in absent[:_MAX_LISTED])
      more = f" and {len(absent) - _MAX_LISTED} more" if len(absent) > _MAX_LISTED else ""
      self.missing.append(f"{len(absent)} of the {len(names)} images listed in {listed_in}: "
                          f"{shown}{more}")

  def check(self, instructions: str):
    """Raises one FileNotFoundError naming every missing file, if any."""
    if self.missing:
      raise FileNotFoundError(
          f"{self.name}: {len(self.missing)} missing input(s) in --manual_dir={self.manual_dir}: "
          + "; ".join(self.missing) + f". Nothing was written. {instructions}")

  def _add(self, source):
    self.sources.append(source)
    return source

  def _open_archive(self, path: str, folder: str):
    try:
      if zipfile.is_zipfile(path):
        return _Zip(path)
      return _Tar(path, folder + "/", self.scratch)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
      raise ValueError(f"{path} is not a readable archive ({type(e).__name__}: {e}); download it "
                       f"again, or extract it yourself so that {folder}/ is in "
                       f"{os.path.dirname(path)}.") from None

  def close(self):
    for s in self.sources:
      s.close()
    self.sources = []


# ------------------------------------------------------------------------------------------------
# Annotation parsing: each data set's scanner returns the images it lists as _Entry objects.


@dataclasses.dataclass
class _Entry:
  split: str
  image_id: int
  class_id: int
  path: str           # as written in the annotation file
  source: object
  member: str         # name inside the source
  bbox: Optional[tuple] = None  # (x1, y1, x2, y2); None: the whole image


@dataclasses.dataclass
class _Scan:
  entries: list
  class_names: dict   # class id -> readable name
  info: dict          # extra metadata (which release, which files were read)


def _text_rows(source, name: str, fields: int, header: bool = False, skip: int = 0):
  """[(line number, [fields])] of a whitespace-separated text file; ValueError on a bad row."""
  where = source.where(name)
  try:
    lines = source.read(name).decode("utf-8").splitlines()
  except UnicodeDecodeError as e:
    raise ValueError(f"{where} is not a text file ({e}); download the data set again.") from None
  rows = []
  for number, line in enumerate(lines, 1):
    if number <= skip + int(header) or not line.strip():
      continue
    parts = line.split()
    if len(parts) != fields:
      raise ValueError(f"{where}, line {number}: expected {fields} fields, got {line.strip()!r}; "
                       "the file is damaged or not the one distributed with the data set.")
    rows.append((number, parts))
  return rows


def _number(text: str, where: str, number: int, kind=int):
  try:
    return kind(text)
  except ValueError:
    raise ValueError(f"{where}, line {number}: {text!r} is not a number; the file is damaged or "
                     "not the one distributed with the data set.") from None


def _id_table(source, name: str, fields: int, kinds) -> dict:
  """{first field (int): tuple of the other fields converted by ``kinds``}."""
  where = source.where(name)
  table = {}
  for number, parts in _text_rows(source, name, fields):
    key = _number(parts[0], where, number)
    table[key] = tuple(_number(p, where, number, k) if k is not str else p
                       for p, k in zip(parts[1:], kinds))
  return table


_CUB_FOLDER = "CUB_200_2011"
_CUB_FILES = ("images.txt", "image_class_labels.txt", "bounding_boxes.txt", "classes.txt")


def _scan_cub(inputs: _Inputs) -> _Scan:
  root = inputs.part(_CUB_FOLDER, ("CUB_200_2011.tgz", "CUB_200_2011.tar.gz", "CUB_200_2011.tar"))
  names = [f"{_CUB_FOLDER}/{f}" for f in _CUB_FILES]
  if not inputs.members(root, names):
    inputs.check(DmljaxCub.MANUAL_DOWNLOAD_INSTRUCTIONS)
  images, labels, boxes, classes = (_id_table(root, names[0], 2, (str,)),
                                    _id_table(root, names[1], 2, (int,)),
                                    _id_table(root, names[2], 5, (float,) * 4),
                                    _id_table(root, names[3], 2, (str,)))
  for table, name in ((labels, names[1]), (boxes, names[2])):
    absent = sorted(set(images) - set(table))
    if absent:
      raise ValueError(f"{root.where(name)} has no line for image id(s) {absent[:_MAX_LISTED]} of "
                       f"{root.where(names[0])}; the files do not belong together.")
  entries = []
  for image_id in sorted(images):
    path, = images[image_id]
    class_id, = labels[image_id]
    x, y, w, h = boxes[image_id]
    entries.append(_Entry("train" if class_id <= 100 else "test", image_id, class_id, path, root,
                          f"{_CUB_FOLDER}/images/{path}", (x, y, x + w, y + h)))
  inputs.images(root, [e.member for e in entries], "images.txt")
  return _Scan(entries, {c: n for c, (n,) in classes.items()},
               {"inputs": [root.describe()]})


def _mat_structs(source, name: str, key: str, fields: Sequence[str]) -> list:
  """The elements of the MATLAB struct array ``key`` as dicts of ``fields`` (scalars, strings)."""
  import scipy.io  # pylint: disable=g-import-not-at-top
  where = source.where(name)
  try:
    mat = scipy.io.loadmat(io.BytesIO(source.read(name)), squeeze_me=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{where} is not a readable MATLAB file ({type(e).__name__}: {e}); download "
                     "it again.") from None
  if key not in mat:
    found = sorted(k for k in mat if not k.startswith("__"))
    raise ValueError(f"{where} has no variable {key!r} (found {found}); it is not the file "
                     "distributed with the data set.")
  array = np.atleast_1d(mat[key])
  absent = [f for f in fields if f not in (array.dtype.names or ())]
  if absent:
    raise ValueError(f"{where}: the struct array {key!r} lacks the field(s) {absent} (it has "
                     f"{list(array.dtype.names or ())}); it is not the file distributed with the "
                     "data set.")
  return [{f: np.asarray(element[f]).ravel()[0] if np.size(element[f]) else None for f in fields}
          for element in array]


def _mat_class_names(source, name: str) -> dict:
  """{1-based class id: name} from a MATLAB file's ``class_names`` cell array, if it has one."""
  import scipy.io  # pylint: disable=g-import-not-at-top
  try:
    mat = scipy.io.loadmat(io.BytesIO(source.read(name)), squeeze_me=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{source.where(name)} is not a readable MATLAB file ({type(e).__name__}: "
                     f"{e}); download it again.") from None
  if "class_names" not in mat:
    return {}
  return {i + 1: str(n) for i, n in enumerate(np.atleast_1d(mat["class_names"]))}


_CARS_BOX = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")


def _cars_entry(annotation: dict, image_id: int, path: str, source, where: str) -> _Entry:
  try:
    class_id = int(annotation["class"])
    box = tuple(float(annotation[k]) for k in _CARS_BOX)
  except (TypeError, ValueError):
    raise ValueError(f"{where}: annotation {image_id} has a non-numeric class or box "
                     f"({annotation}); it is not the file distributed with the data set.") from None
  return _Entry("train" if class_id <= 98 else "test", image_id, class_id, path, source, path, box)


def _scan_cars(inputs: _Inputs) -> _Scan:
  manual = inputs.manual_dir
  here = lambda *names: any(os.path.exists(os.path.join(manual, n)) for n in names)  # noqa: E731
  has_all_images = here("car_ims", "car_ims.tgz", "cars_annos.mat", "devkit/cars_annos.mat")
  has_split = here("cars_train", "cars_train.tgz", "cars_test", "cars_test.tgz", "devkit",
                   "car_devkit.tgz", "cars_test_annos_withlabels.mat")
  # All-images release first (when it is complete); else the split release.
  if has_all_images or not has_split:
    probe = _Inputs(inputs.name, manual, inputs.scratch)
    annos = probe.file("cars_annos.mat", ("", "devkit"))
    images = probe.part("car_ims", ("car_ims.tgz", "car_ims.tar.gz", "car_ims.tar"))
    if not probe.missing:
      inputs.sources += probe.sources
      return _scan_cars_all_images(inputs, annos, images)
    probe.close()
    if not has_split:
      inputs.missing.append("either the all-images release (" + "; ".join(probe.missing) +
                            ") or the split release (cars_train.tgz, cars_test.tgz, "
                            "car_devkit.tgz and cars_test_annos_withlabels.mat)")
      inputs.check(DmljaxCars.MANUAL_DOWNLOAD_INSTRUCTIONS)
    all_images_missing = probe.missing
  else:
    all_images_missing = []
  train = inputs.part("cars_train", ("cars_train.tgz", "cars_train.tar.gz", "cars_train.tar"))
  test = inputs.part("cars_test", ("cars_test.tgz", "cars_test.tar.gz", "cars_test.tar"))
  devkit = inputs.part("devkit", ("car_devkit.tgz", "car_devkit.tar.gz", "car_devkit.tar"))
  inputs.members(devkit, ["devkit/cars_train_annos.mat", "devkit/cars_meta.mat"])
  test_annos = inputs.file("cars_test_annos_withlabels.mat", ("", "devkit"))
  if inputs.missing and all_images_missing:
    inputs.missing = (["split release: " + m for m in inputs.missing]
                      + ["all-images release: " + m for m in all_images_missing])
  inputs.check(DmljaxCars.MANUAL_DOWNLOAD_INSTRUCTIONS)
  return _scan_cars_split(inputs, train, test, devkit, test_annos)


def _scan_cars_all_images(inputs: _Inputs, annos: str, images) -> _Scan:
  folder = _Folder(os.path.dirname(annos))
  name = os.path.basename(annos)
  fields = ("relative_im_path",) + _CARS_BOX + ("class",)
  entries = []
  for i, a in enumerate(_mat_structs(folder, name, "annotations", fields), 1):
    path = _clean_member(str(a["relative_im_path"]))
    entries.append(_cars_entry(a, i, path, images, annos))
  inputs.images(images, [e.member for e in entries], "cars_annos.mat")
  inputs.check(DmljaxCars.MANUAL_DOWNLOAD_INSTRUCTIONS)
  return _Scan(entries, _mat_class_names(folder, name),
               {"release": "all images (car_ims + cars_annos.mat)",
                "inputs": [images.describe(), annos]})


def _scan_cars_split(inputs: _Inputs, train, test, devkit, test_annos: str) -> _Scan:
  fields = ("fname",) + _CARS_BOX + ("class",)
  train_annos = _mat_structs(devkit, "devkit/cars_train_annos.mat", "annotations", fields)
  test_folder = _Folder(os.path.dirname(test_annos))
  test_list = _mat_structs(test_folder, os.path.basename(test_annos), "annotations", fields)
  entries = []
  for i, a in enumerate(train_annos, 1):
    entries.append(_cars_entry(a, i, f"cars_train/{a['fname']}", train,
                               devkit.where("devkit/cars_train_annos.mat")))
  for i, a in enumerate(test_list, len(train_annos) + 1):
    entries.append(_cars_entry(a, i, f"cars_test/{a['fname']}", test, test_annos))
  inputs.images(train, [e.member for e in entries if e.source is train], "cars_train_annos.mat")
  inputs.images(test, [e.member for e in entries if e.source is test],
                "cars_test_annos_withlabels.mat")
  inputs.check(DmljaxCars.MANUAL_DOWNLOAD_INSTRUCTIONS)
  return _Scan(entries, _mat_class_names(devkit, "devkit/cars_meta.mat"),
               {"release": "train/test split (cars_train, cars_test, devkit)",
                "inputs": [train.describe(), test.describe(), devkit.describe(), test_annos]})


_SOP_FOLDER = "Stanford_Online_Products"


def _scan_sop(inputs: _Inputs) -> _Scan:
  root = inputs.part(_SOP_FOLDER, ("Stanford_Online_Products.zip",))
  lists = {"train": f"{_SOP_FOLDER}/Ebay_train.txt", "test": f"{_SOP_FOLDER}/Ebay_test.txt"}
  if not inputs.members(root, list(lists.values())):
    inputs.check(DmljaxSop.MANUAL_DOWNLOAD_INSTRUCTIONS)
  entries, names = [], {}
  for split, name in lists.items():
    where = root.where(name)
    if not root.read(name).startswith(b"image_id"):
      raise ValueError(f"{where} does not start with the header line 'image_id class_id "
                       "super_class_id path'; it is not the file distributed with the data set.")
    for number, (image_id, class_id, _, path) in _text_rows(root, name, 4, header=True):
      class_id = _number(class_id, where, number)
      entries.append(_Entry(split, _number(image_id, where, number), class_id, path, root,
                            f"{_SOP_FOLDER}/{path}"))
      names[class_id] = f"{path.split('/')[0].removesuffix('_final')}/{class_id}"
    inputs.images(root, [e.member for e in entries if e.split == split], os.path.basename(name))
  return _Scan(entries, names, {"inputs": [root.describe()]})


_INSHOP_STATUS = ("train", "query", "gallery")


def _scan_inshop(inputs: _Inputs) -> _Scan:
  images = inputs.part("img", ("img.zip",), ("", "Img"))
  partition = inputs.file("list_eval_partition.txt", ("Eval", ""))
  inputs.check(DmljaxInshop.MANUAL_DOWNLOAD_INSTRUCTIONS)
  folder = _Folder(os.path.dirname(partition))
  name = os.path.basename(partition)
  rows = _text_rows(folder, name, 3, skip=2)
  first, header = (folder.read(name).decode("utf-8").split("\n", 2) + ["", ""])[:2]
  first = first.strip()
  if not header.startswith("image_name"):
    raise ValueError(f"{partition}: the second line should be the header 'image_name item_id "
                     "evaluation_status'; it is not the file distributed with the data set.")
  if not first.isdigit() or int(first) != len(rows):
    raise ValueError(f"{partition}: the first line says {first!r} entries but {len(rows)} follow; "
                     "the file is damaged or not the one distributed with the data set.")
  entries, names = [], {}
  for image_id, (number, (path, item, status)) in enumerate(rows, 1):
    if status not in _INSHOP_STATUS or not item.startswith("id_") or not item[3:].isdigit():
      raise ValueError(f"{partition}, line {number}: expected 'image_name item_id status' with "
                       f"status one of {list(_INSHOP_STATUS)}, got "
                       f"{' '.join((path, item, status))!r}.")
    class_id = int(item[3:])
    entries.append(_Entry(status, image_id, class_id, path, images, _clean_member(path)))
    names[class_id] = item
  inputs.images(images, [e.member for e in entries], "list_eval_partition.txt")
  return _Scan(entries, names, {"inputs": [images.describe(), partition]})


_SCANNERS = {"cub": _scan_cub, "cars": _scan_cars, "sop": _scan_sop, "inshop": _scan_inshop}


# ------------------------------------------------------------------------------------------------
# The plan: every image checked, split, ordered and labelled before TFDS writes anything.


def image_size(data: bytes) -> tuple:
  """(width, height) of an encoded image, after decoding all of it (JPEGs at 1/8 scale).

  Raises:
    Exception: whatever the decoder raises for a damaged or unknown file.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(data)) as image:
    width, height = image.size
    image.draft("RGB", (max(1, width // 8), max(1, height // 8)))  # no-op for non-JPEG files
    image.load()
  return width, height


#: JPEG quality of the short-side copies (``prepare --short_side``; ``--jpeg_quality``).
FULL_QUALITY = 95


@dataclasses.dataclass
class Example:
  """One image that will be written: its annotation plus what decoding it told."""
  split: str
  image_id: int
  class_id: int
  path: str
  source: object
  member: str
  bbox: tuple
  width: int
  height: int
  digest: str
  label: int = -1

  def record(self, data: bytes, short_side: int = 0, quality: int = FULL_QUALITY) -> dict:
    """The record of this image: its file as distributed, or (``short_side`` > 0) the
    short-side copy of it (:func:`shrink_image`), box and size in the copy's pixels."""
    bbox, width, height = self.bbox, self.width, self.height
    if short_side:
      data, (width, height), (sx, sy) = shrink_image(data, short_side, quality)
      x1, y1, x2, y2 = bbox
      bbox = (x1 * sx, y1 * sy, x2 * sx, y2 * sy)
    return {"image": data, "label": self.label, "class_id": self.class_id,
            "image_id": self.image_id, "path": self.path.encode("utf-8"),
            "bbox": np.asarray(bbox, np.float32), "width": width, "height": height}


def image_copy_name(short_side: int) -> str:
  """What a data set's metadata calls its copy: ``"full"`` (the files as distributed) or
  ``"short_side_N"`` (every image resized to shorter side N, ``prepare --short_side=N``)."""
  return f"short_side_{int(short_side)}" if short_side else "full"


def copy_short_side(image_copy: str) -> int:
  """The N of ``"short_side_N"``; 0 for ``"full"``."""
  if image_copy == "full":
    return 0
  if image_copy.startswith("short_side_") and image_copy[len("short_side_"):].isdigit():
    return int(image_copy[len("short_side_"):])
  raise ValueError(f"unknown image copy {image_copy!r}; expected 'full' or 'short_side_N'.")


def shrink_image(data: bytes, short_side: int, quality: int = FULL_QUALITY):
  """The image resized so its shorter side is ``short_side``, as a JPEG.

  The whole image is decoded (no reduced-scale decode) and resized with PIL's antialiased
  bilinear filter, torchvision's ``Resize(short_side)``: the same size (long side
  ``int(short_side * long / short)``) and resampling as the protocol's first step, so the eval
  transform's resize of the copy is the identity. An image whose shorter side is already at most
  ``short_side`` is kept as it is (never enlarged; re-encoded only if it is not a JPEG).
  Orientation is the stored pixel order (EXIF is ignored, as the pipeline's decoder does).

  Returns:
    ``(jpeg bytes, (width, height), (scale_x, scale_y))``: the new file, its size, and the factor
    from the original's pixel coordinates to the copy's (for the bounding box).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(data)) as image:
    width, height = image.size
    is_jpeg = image.format == "JPEG"
    if min(width, height) <= short_side and is_jpeg and image.mode in ("RGB", "L"):
      return data, (width, height), (1.0, 1.0)
    rgb = image.convert("RGB") if image.mode != "RGB" else image
    if min(width, height) > short_side:
      if height <= width:
        size = (int(short_side * width / height), short_side)
      else:
        size = (short_side, int(short_side * height / width))
      rgb = rgb.resize(size, Image.BILINEAR)
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=int(quality))
  new_w, new_h = rgb.size
  return out.getvalue(), (new_w, new_h), (new_w / width, new_h / height)


def _inspect(entry: _Entry):
  """(Example, None), or (None, reason) when the image cannot be read or decoded."""
  try:
    data = entry.source.read(entry.member)
    width, height = image_size(data)
  except Exception as e:  # pylint: disable=broad-except  # any decoder failure skips the image
    from PIL import UnidentifiedImageError  # pylint: disable=g-import-not-at-top
    if isinstance(e, UnidentifiedImageError):  # its text names a BytesIO object: say what it means
      return None, "UnidentifiedImageError: not in an image format PIL knows"
    return None, f"{type(e).__name__}: {e}"
  bbox = entry.bbox if entry.bbox is not None else (0.0, 0.0, float(width), float(height))
  return Example(entry.split, entry.image_id, entry.class_id, entry.path, entry.source,
                 entry.member, tuple(float(b) for b in bbox), width, height,
                 hashlib.sha1(data).hexdigest()), None


@dataclasses.dataclass
class Plan:
  """What a preparation will write, computed (and every image decoded) before anything is written.

  Attributes:
    name: short data set name.
    splits: split -> the examples in record order, labels assigned.
    class_ids: split -> original class id of each contiguous label.
    class_names: class id -> readable name.
    skipped: split -> [{"image_id", "path", "error"}] of images that did not decode.
    info: release and input files.
  """
  name: str
  splits: dict
  class_ids: dict
  class_names: dict
  skipped: dict
  info: dict
  _inputs: Optional[_Inputs] = None
  _scratch: Optional[_Scratch] = None
  #: 0: the image files as distributed; N > 0: each resized to shorter side N (a JPEG of
  #: ``quality``), boxes and sizes rescaled (``prepare --short_side=N``).
  short_side: int = 0
  quality: int = FULL_QUALITY
  workers: int = 0  # threads making the short-side copies (0: up to 8)

  def metadata(self) -> dict:
    """The JSON-able metadata stored with the data set (see the module docstring)."""
    splits = {}
    for split, examples in self.splits.items():
      ids = [int(c) for c in self.class_ids[split]]
      splits[split] = {
          "labels": [ex.label for ex in examples], "class_ids": ids,
          "class_names": [self.class_names.get(c, str(c)) for c in ids],
          "skipped": self.skipped[split]}
    copy = {"image_copy": image_copy_name(self.short_side)}
    if self.short_side:
      copy.update(short_side=int(self.short_side), jpeg_quality=int(self.quality))
    return {"dataset": self.name, **self.info, **copy, "splits": splits}

  def scratch(self) -> str:
    """A temporary folder removed by :meth:`close`."""
    return self._scratch.path()

  def close(self):
    """Closes the input archives and removes unpacked files."""
    if self._inputs is not None:
      self._inputs.close()
    if self._scratch is not None:
      self._scratch.cleanup()


def make_plan(name: str, manual_dir: str, *, scratch_dir: Optional[str] = None,
              workers: Optional[int] = None, log: Optional[Callable[[str], None]] = None) -> Plan:
  """Reads the annotations in ``manual_dir``, decodes every image, and splits and labels them.

  Args:
    name: ``cub``, ``cars``, ``sop`` or ``inshop`` (or the ``dmljax_`` names).
    manual_dir: the folder holding the downloaded files (archives or extracted folders).
    scratch_dir: where a temporary folder for unpacked tar archives is made (default: the system's
      temporary folder); it is removed by ``Plan.close()`` or on error.
    workers: threads decoding images (default: up to 8, one per CPU core).
    log: called with progress lines (None: silent).

  Returns:
    A :class:`Plan`; call ``close()`` when done with it.

  Raises:
    FileNotFoundError: input files missing (all named in one message).
    ValueError: a damaged annotation file or archive, or a split left without images.
  """
  key = short_name(name)
  log = log or (lambda text: None)
  if not os.path.isdir(manual_dir):
    raise FileNotFoundError(f"--manual_dir={manual_dir} is not a folder; give the folder holding "
                            "the downloaded files. "
                            + _builders()[key].MANUAL_DOWNLOAD_INSTRUCTIONS)
  scratch = _Scratch(scratch_dir)
  inputs = _Inputs(key, manual_dir, scratch)
  try:
    log(f"{key}: reading the annotations in {manual_dir}")
    scan = _SCANNERS[key](inputs)
    inputs.check(_builders()[key].MANUAL_DOWNLOAD_INSTRUCTIONS)
    workers = workers or min(8, os.cpu_count() or 1)
    log(f"{key}: decoding {len(scan.entries)} images to check them ({workers} threads)")
    results = []
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      for result in pool.map(_inspect, scan.entries):
        results.append(result)
        if len(results) % 10000 == 0:
          log(f"{key}: {len(results)} of {len(scan.entries)} images decoded")
    splits = {s: [] for s in SPLITS[key]}
    skipped = {s: [] for s in SPLITS[key]}
    for entry, (example, error) in zip(scan.entries, results):
      if example is None:
        skipped[entry.split].append({"image_id": entry.image_id, "path": entry.path,
                                     "error": error})
        warnings.warn(f"{key}: skipped {entry.source.where(entry.member)}, which does not decode "
                      f"({error})", SkippedImageWarning, stacklevel=2)
      else:
        splits[entry.split].append(example)
    empty = [s for s, examples in splits.items() if not examples]
    if empty:
      raise ValueError(f"{key}: no readable images in split(s) {empty}; check the files in "
                       f"--manual_dir={manual_dir}.")
    class_ids = _assign_labels(key, splits)
    for examples in splits.values():
      examples.sort(key=(lambda e: (e.class_id, e.digest, e.image_id)) if key == "cars"
                    else (lambda e: e.image_id))
  except BaseException:
    inputs.close()
    scratch.cleanup()
    raise
  log(f"{key}: " + ", ".join(f"{s} {len(e)} images" for s, e in splits.items())
      + f"; {sum(map(len, skipped.values()))} skipped")
  return Plan(key, splits, class_ids, scan.class_names, skipped, scan.info, inputs, scratch)


def _assign_labels(key: str, splits: dict, groups: Optional[Sequence[Sequence[str]]] = None
                   ) -> dict:
  """Numbers the classes of each label group 0..C-1 by original id; split -> class ids.

  ``groups``: the splits numbered together (default: the data set's, each split alone but
  In-shop's query and gallery).
  """
  class_ids = {}
  if groups is None:
    groups = _LABEL_GROUPS.get(key, tuple((s,) for s in SPLITS[key]))
  for group in groups:
    ids = np.unique([e.class_id for s in group for e in splits[s]])
    position = {int(c): i for i, c in enumerate(ids)}
    for s in group:
      for e in splits[s]:
        e.label = position[e.class_id]
      class_ids[s] = [int(c) for c in ids]
  return class_ids


def summarize(metadata) -> dict:
  """{"splits": {split: {"images", "classes"}}, "skipped": {split: [paths]}} from the metadata."""
  splits, skipped = {}, {}
  for split, m in metadata["splits"].items():
    splits[split] = {"images": len(m["labels"]), "classes": len(set(m["labels"]))}
    skipped[split] = [s["path"] for s in m["skipped"]]
  return {"splits": splits, "skipped": skipped}


def check_copy(builder, short_side: int, data_dir: str) -> None:
  """Refuses to treat a prepared data set as ready when it is the other copy than the one asked
  for (``prepare --short_side``), so that the full copy is never taken for the small one."""
  held = dict(builder.info.metadata or {}).get("image_copy", "full")
  want = image_copy_name(short_side)
  if held != want:
    def words(copy):
      return ("its full-size images (as distributed)" if copy == "full" else
              f"its copy resized to shorter side {copy_short_side(copy)} (--short_side="
              f"{copy_short_side(copy)})")
    raise ValueError(
        f"{builder.name} in {data_dir} holds {words(held)}, but this command asks for "
        f"{words(want)}; prepare it into another --data_dir (both copies can be kept, a run reads "
        "the one its dataset.data_dir names), or add --overwrite to replace this one.")


# ------------------------------------------------------------------------------------------------
# The TFDS builders.


def _features():
  scalar = lambda doc: tfds.features.Tensor(shape=(), dtype=np.int64, doc=doc)  # noqa: E731
  return tfds.features.FeaturesDict({
      "image": tfds.features.Tensor(shape=(), dtype=np.object_,
                                    doc="the image file's bytes as distributed (JPEG)"),
      "label": scalar("contiguous class index 0..C-1 within the split (by original class id)"),
      "class_id": scalar("the data set's own class id"),
      "image_id": scalar("the data set's image id"),
      "path": tfds.features.Tensor(shape=(), dtype=np.object_,
                                   doc="path of the image as written in the annotation file"),
      "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32,
                                   doc="x1, y1, x2, y2 in pixels (the whole image if no box)"),
      "width": scalar("width of the full image in pixels"),
      "height": scalar("height of the full image in pixels"),
  })


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared code: the plan made before writing (by ``prepare`` or here), records in its order."""

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {str(VERSION): "Metric-learning splits; raw image bytes; labels in the metadata."}
  KEY = ""
  DESCRIPTION = ""
  HOMEPAGE = ""
  CITATION = ""

  #: A :class:`Plan` made beforehand (``dmljax.data.prepare`` sets it, to check every input
  #: before TFDS writes anything); without one the builder makes and closes its own.
  plan: Optional[Plan] = None

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):  # pylint: disable=invalid-overridden-method
    # Where TFDS looks for a checksums file next to the builder's code. Manual builders download
    # nothing, and TFDS's own lookup needs the ``importlib_resources`` back-port, which it does not
    # install: there is no such file to find.
    return None

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION, features=_features(),
        homepage=self.HOMEPAGE, citation=self.CITATION, metadata=tfds.core.MetadataDict(),
        disable_shuffling=True)

  def _download_and_prepare(self, dl_manager, download_config):  # pylint: disable=arguments-differ
    own = self.plan is None
    if own:
      self.plan = make_plan(self.KEY, os.fspath(dl_manager.manual_dir),
                            scratch_dir=os.fspath(self.data_dir_root))
    try:
      return super()._download_and_prepare(dl_manager, download_config)
    finally:
      if own:
        self.plan.close()
        self.plan = None

  def _split_generators(self, dl_manager):
    del dl_manager  # the plan already knows every file
    self.info.metadata.update(self.plan.metadata())
    return {split: self._generate_examples(examples)
            for split, examples in self.plan.splits.items()}

  def _generate_examples(self, examples):  # pylint: disable=arguments-differ
    # With shuffling disabled TFDS writes the records sorted by key: the key is the position.
    plan = self.plan
    if not plan.short_side:
      for position, example in enumerate(examples):
        yield position, example.record(example.source.read(example.member))
      return
    # Short-side copies: decode, resize and encode in threads (PIL releases the GIL), in order,
    # at most a window of images in flight.
    def make(example):
      return example.record(example.source.read(example.member), plan.short_side, plan.quality)
    workers = plan.workers or min(8, os.cpu_count() or 1)
    window = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      for position, example in enumerate(examples):
        window.append(pool.submit(make, example))
        if len(window) >= 4 * workers:
          yield position - len(window) + 1, window.popleft().result()
      first = len(examples) - len(window)
      for i, future in enumerate(window):
        yield first + i, future.result()


class DmljaxCub(_Builder):
  """CUB-200-2011 with the metric-learning split (train classes 1-100, test 101-200)."""
  KEY = "cub"
  DESCRIPTION = ("Caltech-UCSD Birds-200-2011: 11,788 photos of 200 bird species with boxes; "
                 "metric-learning split by class (train 1-100, test 101-200).")
  HOMEPAGE = "https://www.vision.caltech.edu/datasets/cub_200_2011/"
  CITATION = ("Wah, Branson, Welinder, Perona, Belongie. The Caltech-UCSD Birds-200-2011 Dataset. "
              "Caltech technical report CNS-TR-2011-001, 2011.")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download CUB_200_2011.tgz from https://www.vision.caltech.edu/datasets/cub_200_2011/ and "
      "put it, or the folder CUB_200_2011/ it extracts to, in --manual_dir (docs/data.md).")


class DmljaxCars(_Builder):
  """Cars196 with the metric-learning split (train classes 1-98, test 99-196)."""
  KEY = "cars"
  DESCRIPTION = ("Stanford Cars: 16,185 photos of 196 car models with boxes; metric-learning "
                 "split by class (train 1-98, test 99-196).")
  HOMEPAGE = "https://ai.stanford.edu/~jkrause/cars/car_dataset.html"
  CITATION = ("Krause, Stark, Deng, Fei-Fei. 3D Object Representations for Fine-Grained "
              "Categorization. 3dRR workshop at ICCV 2013.")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put in --manual_dir either the all-images release, car_ims.tgz (or its folder car_ims/) "
      "with cars_annos.mat, or the split release, cars_train.tgz, cars_test.tgz, car_devkit.tgz "
      "(or their folders cars_train/, cars_test/, devkit/) with cars_test_annos_withlabels.mat "
      "(docs/data.md).")


class DmljaxSop(_Builder):
  """Stanford Online Products with its own split (Ebay_train.txt / Ebay_test.txt)."""
  KEY = "sop"
  DESCRIPTION = ("Stanford Online Products: 120,053 photos of 22,634 products from eBay in 12 "
                 "categories; train 11,318 products, test 11,316.")
  HOMEPAGE = "https://cvgl.stanford.edu/projects/lifted_struct/"
  CITATION = ("Oh Song, Xiang, Jegelka, Savarese. Deep Metric Learning via Lifted Structured "
              "Feature Embedding. CVPR 2016.")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download Stanford_Online_Products.zip from "
      "https://cvgl.stanford.edu/projects/lifted_struct/ and put it, or the folder "
      "Stanford_Online_Products/ it extracts to, in --manual_dir (docs/data.md).")


class DmljaxInshop(_Builder):
  """DeepFashion In-shop Clothes Retrieval with its own split (train / query / gallery)."""
  KEY = "inshop"
  DESCRIPTION = ("DeepFashion In-shop Clothes Retrieval: 52,712 photos of 7,982 clothing items; "
                 "train 3,997 items, query and gallery 3,985 items sharing one label space.")
  HOMEPAGE = "https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html"
  CITATION = ("Liu, Luo, Qiu, Wang, Tang. DeepFashion: Powering Robust Clothes Recognition and "
              "Retrieval with Rich Annotations. CVPR 2016.")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download img.zip (folder Img/) and list_eval_partition.txt (folder Eval/) of the In-shop "
      "Clothes Retrieval benchmark and put them in --manual_dir, as img.zip or its folder img/ "
      "(beside it or in Img/) and list_eval_partition.txt (in Eval/ or beside img) "
      "(docs/data.md).")


def _builders() -> dict:
  return {"cub": DmljaxCub, "cars": DmljaxCars, "sop": DmljaxSop, "inshop": DmljaxInshop}


def builder_class(name: str):
  """The builder class of a data set (short or ``dmljax_`` name)."""
  return _builders()[short_name(name)]
