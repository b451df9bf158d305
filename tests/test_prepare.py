"""Preparing CUB, Cars196, SOP and In-shop from their distributed layouts, and reading them back.

Every data set is written in miniature (16x12 JPEGs, a few classes on both sides of the split's
class cut, one image that does not decode) in the exact file layout of the download, as archives
and as extracted folders.
"""
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest
import scipy.io
import tensorflow_datasets as tfds
from PIL import Image

from dmljax.data import builders
from dmljax.data import prepare as prepare_lib
from dmljax.data import records

tfds.disable_progress_bar()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jpeg(seed: int, size=(16, 12)) -> bytes:
  """A small JPEG, different for every seed."""
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, "JPEG", quality=70)
  return out.getvalue()


def _size(i):
  return (16, 12) if i % 2 else (12, 16)


def _truncated(seed):
  return _jpeg(seed)[:120]


GARBAGE = b"this is not an image at all" * 3


def _write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)


def _tar(manual, folder, archive):
  """Packs manual/folder into manual/archive (gzip) and removes the folder."""
  import shutil
  with tarfile.open(os.path.join(manual, archive), "w:gz") as tar:
    tar.add(os.path.join(manual, folder), arcname=folder)
  shutil.rmtree(os.path.join(manual, folder))


def _zip(manual, folder, archive):
  import shutil
  os.makedirs(os.path.dirname(os.path.join(manual, archive)), exist_ok=True)
  with zipfile.ZipFile(os.path.join(manual, archive), "w") as z:
    for dirpath, _, files in sorted(os.walk(os.path.join(manual, folder))):
      for f in sorted(files):
        full = os.path.join(dirpath, f)
        z.write(full, os.path.relpath(full, manual))
  shutil.rmtree(os.path.join(manual, folder))


def _read_all(data_dir, name):
  ds = records.open_prepared(name, data_dir)
  return ds, {s: [split[i] for i in range(len(split))] for s, split in ds.splits.items()}


def _content(record):
  """What must agree between two preparations of the same images."""
  return (record["image"], record["label"], record["class_id"], tuple(record["bbox"].tolist()),
          record["width"], record["height"])


def _check_labels(ds, recs):
  for split, rs in recs.items():
    meta = ds.splits[split]
    assert meta.labels.dtype == np.int32 and meta.class_ids.dtype == np.int32
    np.testing.assert_array_equal(meta.labels, [r["label"] for r in rs])
    np.testing.assert_array_equal(meta.class_ids[meta.labels], [r["class_id"] for r in rs])
    np.testing.assert_array_equal(np.unique(meta.labels), np.arange(meta.num_classes))
    assert list(meta.class_ids) == sorted(set(meta.class_ids))


# ------------------------------------------------------------------------------------------------
# CUB-200-2011

CUB_CLASSES = (1, 2, 100, 101, 150, 200)


def make_cub(manual, archive=False):
  """CUB_200_2011/ with 2 images per class; image 9 (class 150) is truncated.

  Returns:
    {image id: (class id, path, box x1 y1 x2 y2, file bytes, (width, height))}.
  """
  root = os.path.join(manual, "CUB_200_2011")
  images, labels, boxes, classes, split = [], [], [], [], []
  expected = {}
  image_id = 0
  for c in CUB_CLASSES:
    folder = f"{c:03d}.Bird_{c}"
    classes.append(f"{c} {folder}")
    for k in range(2):
      image_id += 1
      path = f"{folder}/Bird_{c}_{k:04d}_{image_id}.jpg"
      data = _truncated(image_id) if image_id == 9 else _jpeg(image_id, _size(image_id))
      _write(os.path.join(root, "images", path), data)
      x, y, w, h = image_id + 0.5, image_id + 1.0, 5.0 + image_id, 4.0
      images.append(f"{image_id} {path}")
      labels.append(f"{image_id} {c}")
      boxes.append(f"{image_id} {x} {y} {w} {h}")
      split.append(f"{image_id} {k}")
      expected[image_id] = (c, path, (x, y, x + w, y + h), data, _size(image_id))
  rng = np.random.default_rng(0)  # the files are read by id, not in line order
  for name, lines in (("images", images), ("image_class_labels", labels),
                      ("bounding_boxes", boxes), ("classes", classes),
                      ("train_test_split", split)):
    _write(os.path.join(root, f"{name}.txt"), "\n".join(rng.permutation(lines)) + "\n")
  if archive:
    _tar(manual, "CUB_200_2011", "CUB_200_2011.tgz")
  return expected


@pytest.mark.parametrize("archive", [False, True], ids=["folder", "tgz"])
def test_cub_splits_records_and_skipped(tmp_path, archive):
  manual, data_dir = str(tmp_path / "manual"), str(tmp_path / "data")
  expected = make_cub(manual, archive=archive)
  with pytest.warns(builders.SkippedImageWarning, match=r"Bird_150_0000_9\.jpg"):
    summary = prepare_lib.prepare("cub", manual, data_dir)
  assert summary["splits"] == {"train": {"images": 6, "classes": 3},
                               "test": {"images": 5, "classes": 3}}
  assert summary["skipped"] == {"train": [], "test": ["150.Bird_150/Bird_150_0000_9.jpg"]}
  ds, recs = _read_all(data_dir, "cub")
  _check_labels(ds, recs)
  assert list(ds["train"].class_ids) == [1, 2, 100]
  assert list(ds["test"].class_ids) == [101, 150, 200]
  assert ds["test"].class_names == ("101.Bird_101", "150.Bird_150", "200.Bird_200")
  assert [r["image_id"] for r in recs["train"]] == [1, 2, 3, 4, 5, 6]
  assert [r["image_id"] for r in recs["test"]] == [7, 8, 10, 11, 12]
  assert list(ds["test"].labels) == [0, 0, 1, 2, 2]
  for r in recs["train"] + recs["test"]:
    c, path, box, data, (w, h) = expected[r["image_id"]]
    assert r["class_id"] == c and r["path"] == path.encode()
    assert r["image"] == data  # the file's bytes, not re-encoded
    assert r["bbox"].dtype == np.float32 and r["bbox"].shape == (4,)
    np.testing.assert_allclose(r["bbox"], box)
    assert (r["width"], r["height"]) == (w, h)
  skipped = ds.metadata["splits"]["test"]["skipped"]
  assert [s["image_id"] for s in skipped] == [9] and "OSError" in skipped[0]["error"]
  assert sorted(os.listdir(data_dir)) == ["dmljax_cub"]  # the scratch folder is gone


def test_cub_archive_and_folder_give_the_same_records(tmp_path):
  out = []
  for archive in (False, True):
    manual, data_dir = str(tmp_path / f"m{archive}"), str(tmp_path / f"d{archive}")
    make_cub(manual, archive=archive)
    with pytest.warns(builders.SkippedImageWarning):
      prepare_lib.prepare("cub", manual, data_dir)
    out.append({s: [(r["image_id"], r["path"], *_content(r)) for r in rs]
                for s, rs in _read_all(data_dir, "cub")[1].items()})
  assert out[0] == out[1]


# ------------------------------------------------------------------------------------------------
# Cars196: both releases of the same images.

CARS_CLASSES = (1, 2, 98, 99, 150, 196)


def _mat_structs(rows, fields):
  array = np.zeros((1, len(rows)), dtype=[(f, object) for f in fields])
  for i, row in enumerate(rows):
    array[0, i] = tuple(np.array([v]) if isinstance(v, str) else np.array([[v]], np.uint16)
                        for v in (row[f] for f in fields))
  return array


def _mat_names(n):
  names = np.empty((1, n), dtype=object)
  for i in range(n):
    names[0, i] = np.array([f"Car model {i + 1}"])
  return names


def make_cars(manual, release="all", archive=False):
  """Cars196 with 3 images per class, in the all-images or the split release; one does not decode.

  Both releases hold the same images (the split release in a shuffled order, like the real one).
  """
  images = []
  for c in CARS_CLASSES:
    for k in range(3):
      i = len(images) + 1
      data = GARBAGE if i == 11 else _jpeg(100 + i, _size(i))
      box = {"bbox_x1": i, "bbox_y1": i + 1, "bbox_x2": i + 10, "bbox_y2": i + 8}
      images.append(dict(box, **{"class": c, "test": k % 2, "data": data}))
  if release == "all":
    rows = []
    for i, im in enumerate(images, 1):
      _write(os.path.join(manual, "car_ims", f"{i:06d}.jpg"), im["data"])
      rows.append(dict(im, relative_im_path=f"car_ims/{i:06d}.jpg"))
    fields = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")
    scipy.io.savemat(os.path.join(manual, "cars_annos.mat"),
                     {"annotations": _mat_structs(rows, fields), "class_names": _mat_names(196)})
    if archive:
      _tar(manual, "car_ims", "car_ims.tgz")
    return images
  rng = np.random.default_rng(1)
  fields = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
  for part, flag in (("train", 0), ("test", 1)):
    chosen = [im for im in images if im["test"] == flag]
    rows = []
    for j, k in enumerate(rng.permutation(len(chosen)), 1):
      _write(os.path.join(manual, f"cars_{part}", f"{j:05d}.jpg"), chosen[k]["data"])
      rows.append(dict(chosen[k], fname=f"{j:05d}.jpg"))
    target = (os.path.join(manual, "devkit", "cars_train_annos.mat") if part == "train"
              else os.path.join(manual, "cars_test_annos_withlabels.mat"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    scipy.io.savemat(target, {"annotations": _mat_structs(rows, fields)})
  scipy.io.savemat(os.path.join(manual, "devkit", "cars_meta.mat"),
                   {"class_names": _mat_names(196)})
  if archive:
    _tar(manual, "cars_train", "cars_train.tgz")
    _tar(manual, "cars_test", "cars_test.tgz")
    _tar(manual, "devkit", "car_devkit.tgz")
  return images


def test_cars_both_releases_give_the_same_records(tmp_path):
  results = {}
  for release in ("all", "split"):
    for archive in (False, True):
      manual, data_dir = (str(tmp_path / f"m_{release}_{archive}"),
                          str(tmp_path / f"d_{release}_{archive}"))
      images = make_cars(manual, release, archive)
      with pytest.warns(builders.SkippedImageWarning, match="does not decode"):
        summary = prepare_lib.prepare("cars", manual, data_dir)
      assert summary["splits"] == {"train": {"images": 9, "classes": 3},
                                   "test": {"images": 8, "classes": 3}}
      assert sum(map(len, summary["skipped"].values())) == 1
      ds, recs = _read_all(data_dir, "cars")
      _check_labels(ds, recs)
      assert list(ds["train"].class_ids) == [1, 2, 98]
      assert list(ds["test"].class_ids) == [99, 150, 196]
      assert ds["train"].class_names[2] == "Car model 98"
      results[release, archive] = {s: [_content(r) for r in rs] for s, rs in recs.items()}
      if release == "all":
        for r in recs["train"] + recs["test"]:
          im = images[r["image_id"] - 1]  # image_id: 1-based index in cars_annos.mat
          assert r["path"] == f"car_ims/{r['image_id']:06d}.jpg".encode()
          assert r["image"] == im["data"] and r["class_id"] == im["class"]
          np.testing.assert_array_equal(
              r["bbox"], [im["bbox_x1"], im["bbox_y1"], im["bbox_x2"], im["bbox_y2"]])
        assert "all images" in ds.metadata["release"]
      else:
        assert all(r["path"].startswith(b"cars_t") for r in recs["train"] + recs["test"])
        assert "split" in ds.metadata["release"]
  first = results["all", False]
  assert all(r == first for r in results.values())
  manual, data_dir = str(tmp_path / "m_both"), str(tmp_path / "d_both")
  make_cars(manual, "all")
  make_cars(manual, "split")
  with pytest.warns(builders.SkippedImageWarning, match="not in an image format PIL knows"):
    prepare_lib.prepare("cars", manual, data_dir)
  assert "all images" in records.open_prepared("cars", data_dir).metadata["release"]


# ------------------------------------------------------------------------------------------------
# Stanford Online Products

SOP_TRAIN, SOP_TEST = (1, 2, 3), (4, 5, 6)


def make_sop(manual, archive=False):
  root = os.path.join(manual, "Stanford_Online_Products")
  rows = {"train": [], "test": []}
  image_id = 0
  for split, classes in (("train", SOP_TRAIN), ("test", SOP_TEST)):
    for c in classes:
      super_id, folder = (1, "bicycle_final") if c % 2 else (2, "chair_final")
      for k in range(2 + c % 2):
        image_id += 1
        path = f"{folder}/{1000 + c}_{k}.JPG"
        data = _truncated(image_id) if image_id == 4 else _jpeg(200 + image_id, _size(image_id))
        _write(os.path.join(root, path), data)
        rows[split].append(f"{image_id} {c} {super_id} {path}")
  header = "image_id class_id super_class_id path\n"
  for split in ("train", "test"):
    _write(os.path.join(root, f"Ebay_{split}.txt"), header + "\n".join(rows[split]) + "\n")
  _write(os.path.join(root, "Ebay_info.txt"),
         header + "\n".join(rows["train"] + rows["test"]) + "\n")
  if archive:
    _zip(manual, "Stanford_Online_Products", "Stanford_Online_Products.zip")


@pytest.mark.parametrize("archive", [False, True], ids=["folder", "zip"])
def test_sop_splits(tmp_path, archive):
  manual, data_dir = str(tmp_path / "manual"), str(tmp_path / "data")
  make_sop(manual, archive)
  with pytest.warns(builders.SkippedImageWarning, match=r"1002_0\.JPG"):
    summary = prepare_lib.prepare("sop", manual, data_dir)
  # classes 1..6 hold 3, 2, 3, 2, 3, 2 images; image 4 (class 2) does not decode.
  assert summary["splits"] == {"train": {"images": 7, "classes": 3},
                               "test": {"images": 7, "classes": 3}}
  ds, recs = _read_all(data_dir, "sop")
  _check_labels(ds, recs)
  assert list(ds["train"].class_ids) == [1, 2, 3] and list(ds["test"].class_ids) == [4, 5, 6]
  assert [r["image_id"] for r in recs["train"]] == [1, 2, 3, 5, 6, 7, 8]
  assert ds["test"].class_names[0] == "chair/4"
  for r in recs["train"] + recs["test"]:
    assert r["path"].startswith((b"bicycle_final/", b"chair_final/"))
    np.testing.assert_array_equal(r["bbox"], [0, 0, r["width"], r["height"]])  # whole image
    assert (r["width"], r["height"]) == _size(r["image_id"])


# ------------------------------------------------------------------------------------------------
# In-shop Clothes Retrieval


def make_inshop(manual, archive=False):
  """Train items 2, 7; query items 5, 9; gallery items 5, 9, 12 (item 12 only in the gallery)."""
  plan = [("2", "train"), ("2", "train"), ("7", "train"), ("7", "train"), ("7", "train"),
          ("5", "query"), ("5", "gallery"), ("5", "gallery"), ("9", "query"), ("9", "gallery"),
          ("12", "gallery"), ("9", "gallery")]
  lines = []
  for i, (item, status) in enumerate(plan, 1):
    item_id = f"id_{int(item):08d}"
    name = f"img/WOMEN/Dresses/{item_id}/{i:02d}_1_front.jpg"
    data = GARBAGE if i == 12 else _jpeg(300 + i, _size(i))
    _write(os.path.join(manual, name), data)
    lines.append(f"{name} {item_id} {status}")
  partition = f"{len(lines)}\nimage_name item_id evaluation_status\n" + "\n".join(lines) + "\n"
  if archive:  # img.zip in Img/, the list beside it in the download's root
    _zip(manual, "img", "Img/img.zip")
    _write(os.path.join(manual, "list_eval_partition.txt"), partition)
  else:
    _write(os.path.join(manual, "Eval", "list_eval_partition.txt"), partition)


@pytest.mark.parametrize("archive", [False, True], ids=["folder", "zip"])
def test_inshop_query_and_gallery_share_labels(tmp_path, archive):
  manual, data_dir = str(tmp_path / "manual"), str(tmp_path / "data")
  make_inshop(manual, archive)
  with pytest.warns(builders.SkippedImageWarning, match=r"12_1_front\.jpg"):
    summary = prepare_lib.prepare("inshop", manual, data_dir)
  assert summary["splits"] == {"train": {"images": 5, "classes": 2},
                               "query": {"images": 2, "classes": 2},
                               "gallery": {"images": 4, "classes": 3}}
  ds, recs = _read_all(data_dir, "inshop")
  _check_labels(ds, {"train": recs["train"], "gallery": recs["gallery"]})
  np.testing.assert_array_equal(ds["query"].class_ids[ds["query"].labels],
                                [r["class_id"] for r in recs["query"]])
  assert list(ds["train"].class_ids) == [2, 7]
  assert list(ds["query"].class_ids) == list(ds["gallery"].class_ids) == [5, 9, 12]
  assert ds["gallery"].class_names == ("id_00000005", "id_00000009", "id_00000012")
  assert [r["label"] for r in recs["query"]] == [0, 1]
  assert [(r["class_id"], r["label"]) for r in recs["gallery"]] == [(5, 0), (5, 0), (9, 1),
                                                                    (12, 2)]
  assert [r["image_id"] for r in recs["gallery"]] == [7, 8, 10, 11]  # entry 12 did not decode
  for r in recs["query"]:  # a query's label is its gallery matches' label
    assert {g["label"] for g in recs["gallery"] if g["class_id"] == r["class_id"]} == {r["label"]}
  for r in recs["train"] + recs["query"] + recs["gallery"]:
    assert r["path"].startswith(b"img/WOMEN/Dresses/id_")
    np.testing.assert_array_equal(r["bbox"], [0, 0, r["width"], r["height"]])


# ------------------------------------------------------------------------------------------------
# Missing inputs: one error naming every missing file, nothing written.


def _remove(manual, *names):
  for n in names:
    os.remove(os.path.join(manual, n))


@pytest.mark.parametrize("name, make, remove, count, expected", [
    ("cub", make_cub, ["CUB_200_2011/bounding_boxes.txt", "CUB_200_2011/classes.txt"], 2,
     ["bounding_boxes.txt (looked for as {m}/CUB_200_2011/bounding_boxes.txt)",
      "classes.txt (looked for as {m}/CUB_200_2011/classes.txt)"]),
    ("cub", make_cub, ["CUB_200_2011/images/001.Bird_1/Bird_1_0001_2.jpg"], 1,
     ["1 of the 12 images listed in images.txt: "
      "{m}/CUB_200_2011/images/001.Bird_1/Bird_1_0001_2.jpg"]),
    ("cars", lambda m: make_cars(m, "all"), ["cars_annos.mat"], 1,
     ["cars_annos.mat (looked for in {m} or {m}/devkit)", "cars_train.tgz, cars_test.tgz"]),
    ("cars", lambda m: make_cars(m, "split"),
     ["devkit/cars_meta.mat", "cars_test_annos_withlabels.mat"], 2,
     ["cars_meta.mat (looked for as {m}/devkit/cars_meta.mat)",
      "cars_test_annos_withlabels.mat (looked for in {m} or {m}/devkit)"]),
    ("sop", make_sop, ["Stanford_Online_Products/Ebay_test.txt"], 1,
     ["Ebay_test.txt (looked for as {m}/Stanford_Online_Products/Ebay_test.txt)"]),
    ("inshop", make_inshop, ["Eval/list_eval_partition.txt"], 1,
     ["list_eval_partition.txt (looked for in {m}/Eval or {m})"]),
], ids=["cub-annotations", "cub-image", "cars-all", "cars-split", "sop", "inshop"])
def test_missing_inputs_are_all_named(tmp_path, name, make, remove, count, expected):
  manual, data_dir = str(tmp_path / "manual"), str(tmp_path / "data")
  make(manual)
  _remove(manual, *remove)
  with pytest.raises(FileNotFoundError) as info:
    prepare_lib.prepare(name, manual, data_dir)
  text = str(info.value)
  assert f"{count} missing input(s)" in text
  for e in expected:
    assert e.format(m=manual) in text
  assert "Nothing was written" in text
  assert not os.path.exists(data_dir) or not os.listdir(data_dir)


def test_empty_manual_dir_names_the_download(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  with pytest.raises(FileNotFoundError, match=r"CUB_200_2011\.tgz or CUB_200_2011\.tar\.gz or "
                     r"CUB_200_2011\.tar or its extracted folder CUB_200_2011/"):
    prepare_lib.prepare("cub", str(manual), str(tmp_path / "data"))
  with pytest.raises(FileNotFoundError, match=r"either the all-images release .*car_ims\.tgz.* "
                     r"or the split release"):
    prepare_lib.prepare("cars", str(manual), str(tmp_path / "data"))
  with pytest.raises(FileNotFoundError, match="is not a folder"):
    prepare_lib.prepare("sop", str(tmp_path / "nowhere"), str(tmp_path / "data"))


# ------------------------------------------------------------------------------------------------
# Preparing: twice, interrupted, through plain TFDS, from the command line.


def test_prepare_twice_and_overwrite(tmp_path):
  manual, data_dir = str(tmp_path / "manual"), str(tmp_path / "data")
  make_sop(manual)
  with pytest.warns(builders.SkippedImageWarning):
    assert not prepare_lib.prepare("sop", manual, data_dir)["already_prepared"]
  again = prepare_lib.prepare("sop", None, data_dir)  # the inputs are not needed any more
  assert again["already_prepared"] and again["splits"]["train"]["images"] == 7
  _write(os.path.join(manual, "Stanford_Online_Products", "chair_final", "1002_0.JPG"), _jpeg(9))
  rebuilt = prepare_lib.prepare("sop", manual, data_dir, overwrite=True)
  assert not rebuilt["already_prepared"] and rebuilt["splits"]["train"]["images"] == 8
  assert len(records.open_prepared("sop", data_dir)["train"]) == 8


def test_interrupted_preparation_is_not_taken_for_complete(tmp_path, monkeypatch):
  manual, data_dir = str(tmp_path / "manual"), str(tmp_path / "data")
  make_cub(manual, archive=True)
  original, calls = builders.Example.record, []

  def failing(self, data):
    calls.append(1)
    if len(calls) == 4:
      raise RuntimeError("interrupted half way")
    return original(self, data)

  monkeypatch.setattr(builders.Example, "record", failing)
  with pytest.warns(builders.SkippedImageWarning), pytest.raises(RuntimeError, match="half way"):
    prepare_lib.prepare("cub", manual, data_dir)
  with pytest.raises(records.DatasetNotPrepared, match="not prepared"):
    records.open_prepared("cub", data_dir)
  assert os.listdir(data_dir) == ["dmljax_cub"]  # no scratch folder left
  # A killed run leaves TFDS's incomplete folder behind: never read, and no obstacle.
  leftover = os.path.join(data_dir, "dmljax_cub", "incomplete.ABC123_1.0.0")
  _write(os.path.join(leftover, "dmljax_cub-train.array_record-00000-of-00001"), b"half")
  with pytest.raises(records.DatasetNotPrepared, match="interrupted preparation left"):
    records.open_prepared("cub", data_dir)
  monkeypatch.setattr(builders.Example, "record", original)
  with pytest.warns(builders.SkippedImageWarning):
    assert prepare_lib.prepare("cub", manual, data_dir)["splits"]["test"]["images"] == 5
  assert len(records.open_prepared("cub", data_dir)["train"]) == 6


def test_plain_tfds_builder_and_data_source(tmp_path):
  manual, data_dir = str(tmp_path / "manual"), str(tmp_path / "data")
  make_inshop(manual, archive=True)
  builder = tfds.builder("dmljax_inshop", data_dir=data_dir)
  assert builder.MANUAL_DOWNLOAD_INSTRUCTIONS
  config = tfds.download.DownloadConfig(manual_dir=manual, try_download_gcs=False)
  with pytest.warns(builders.SkippedImageWarning):
    builder.download_and_prepare(download_config=config, file_format="array_record",
                                 download_dir=str(tmp_path / "downloads"))
  assert sorted(os.listdir(data_dir)) == ["dmljax_inshop"]  # the builder's own scratch is gone
  sources = tfds.data_source("dmljax_inshop", data_dir=data_dir, download=False)
  assert {s: len(v) for s, v in sources.items()} == {"train": 5, "query": 2, "gallery": 4}
  record = sources["query"][1]
  assert set(record) == {"image", "label", "class_id", "image_id", "path", "bbox", "width",
                         "height"}
  assert record["class_id"] == 9 and record["label"] == 1


def test_cli_json_and_one_line_errors(tmp_path, capsys):
  manual, data_dir = str(tmp_path / "manual"), str(tmp_path / "data")
  make_sop(manual, archive=True)
  out_json = str(tmp_path / "sop.json")
  argv = ["sop", f"--manual_dir={manual}", f"--data_dir={data_dir}", f"--json={out_json}"]
  assert prepare_lib.run(argv) == 0
  captured = capsys.readouterr()
  assert "warning: sop: skipped" in captured.err and "1002_0.JPG" in captured.err
  assert "train        7        3        1" in captured.out
  with open(out_json) as f:
    summary = json.load(f)
  assert summary["name"] == "sop" and summary["tfds_name"] == "dmljax_sop"
  assert summary["splits"] == {"train": {"images": 7, "classes": 3},
                               "test": {"images": 7, "classes": 3}}
  assert summary["skipped"] == {"train": ["chair_final/1002_0.JPG"], "test": []}
  assert prepare_lib.run(argv) == 0
  assert "already prepared" in capsys.readouterr().out
  assert prepare_lib.run(["imagenet", f"--data_dir={data_dir}"]) == 2
  assert "valid names: cub, cars, sop, inshop" in capsys.readouterr().err
  assert prepare_lib.run(["cars", f"--manual_dir={manual}"]) == 2
  assert "--data_dir is required" in capsys.readouterr().err


def test_cli_subprocess_exit_code_and_message(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  result = subprocess.run(
      [sys.executable, "-m", "dmljax.data.prepare", "inshop", f"--manual_dir={empty}",
       f"--data_dir={tmp_path / 'data'}"], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=120)
  assert result.returncode == 2, result.stderr
  errors = [line for line in result.stderr.splitlines() if "error:" in line]
  assert len(errors) == 1
  assert errors[0].startswith("python -m dmljax.data.prepare: error: inshop: 2 missing input(s)")
  assert "img.zip or its extracted folder img/" in errors[0]
  assert "list_eval_partition.txt" in errors[0]
  assert not (tmp_path / "data").exists()


# ------------------------------------------------------------------------------------------------
# Reading


@pytest.fixture(scope="module")
def cub_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("cub")
  make_cub(str(root / "manual"))
  with pytest.warns(builders.SkippedImageWarning):
    prepare_lib.prepare("cub", str(root / "manual"), str(root / "data"))
  return str(root / "data")


def test_not_prepared_message_gives_the_command(tmp_path):
  data_dir = str(tmp_path / "nothing_here")
  with pytest.raises(records.DatasetNotPrepared) as info:
    records.open_prepared("cub", data_dir)
  assert isinstance(info.value, FileNotFoundError)
  assert (f"python -m dmljax.data.prepare cub --manual_dir=<where you downloaded the files> "
          f"--data_dir={data_dir}") in str(info.value)
  with pytest.raises(ValueError, match="Unknown data set 'mnist'"):
    records.open_prepared("mnist", data_dir)


def test_record_split_views_indexing_and_pickling(cub_dir):
  ds = records.open_prepared("dmljax_cub", cub_dir)
  train = ds["train"]
  assert len(train) == 6 and train.num_classes == 3
  assert train[np.int64(-1)]["image_id"] == 6 and train[np.int32(0)]["image_id"] == 1
  with pytest.raises(IndexError):
    train[6]
  with pytest.raises(TypeError):
    train[1.0]
  batch = train.__getitems__([np.int64(4), 0])
  assert [r["image_id"] for r in batch] == [5, 1] and [r["label"] for r in batch] == [2, 0]
  val = train.with_classes([2, 100])
  assert list(val.class_ids) == [2, 100] and list(val.labels) == [0, 0, 1, 1]
  assert [val[i]["class_id"] for i in range(len(val))] == [2, 2, 100, 100]
  assert [val[i]["label"] for i in range(len(val))] == [0, 0, 1, 1]
  assert val.class_names == ("002.Bird_2", "100.Bird_100")
  part = val.subset(np.array([False, False, True, True]))
  assert list(part.labels) == [0, 0] and list(part.class_ids) == [100]
  assert list(part.indices) == [4, 5] and part[1]["image_id"] == 6
  with pytest.raises(ValueError, match="class ids \\[101\\] are not in"):
    train.with_classes([101])
  clone = pickle.loads(pickle.dumps(val))
  assert clone._source is None  # reopened on first use, in whatever process
  assert clone[3]["image"] == val[3]["image"] and clone[3]["label"] == 1
  np.testing.assert_array_equal(clone.labels, val.labels)


def test_record_split_reads_after_unpickling_in_another_process(cub_dir):
  view = records.open_prepared("cub", cub_dir)["test"].with_classes([150, 200])
  view[0]  # opened here; the pickle must not carry the open files
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  code = ("import pickle, sys; s = pickle.load(sys.stdin.buffer); "
          "print([(int(s[i]['image_id']), int(s[i]['label'])) for i in range(len(s))])")
  result = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(view), env=env,
                          capture_output=True, timeout=120)
  assert result.returncode == 0, result.stderr.decode()
  assert result.stdout.decode().split() == "[(10, 0), (11, 1), (12, 1)]".split()


def test_reading_under_tfds_mock_data(tmp_path):
  with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = records.open_prepared("cars", str(tmp_path / "not_prepared"))
    assert sorted(ds.splits) == ["test", "train"]
    train = ds["train"]
    assert len(train) == 5
    np.testing.assert_array_equal(np.unique(train.labels), np.arange(train.num_classes))
    record = train[0]
    assert set(record) >= {"image", "label", "class_id", "bbox", "width", "height"}
    assert record["bbox"].shape == (4,) and record["label"] == train.labels[0]
