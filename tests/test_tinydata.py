"""The tiny data set writers of ``tests/tinydata.py``: layouts that prepare; learnable images."""
import io
import os
import sys
import warnings

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from dmljax.data import builders
from dmljax.data import prepare as prepare_lib
from dmljax.data import records

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tinydata  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

tfds.disable_progress_bar()


def _prepare(name, manual, data_dir):
  """Prepares without any skipped image (a SkippedImageWarning fails the test)."""
  with warnings.catch_warnings():
    warnings.simplefilter("error", builders.SkippedImageWarning)
    summary = prepare_lib.prepare(name, manual, data_dir)
  assert not summary["already_prepared"]
  assert all(not paths for paths in summary["skipped"].values())
  return summary


def _records(split):
  return [split[i] for i in range(len(split))]


def _check_split(split, written_ids, class_ids):
  """Labels and class ids of a prepared split against the class ids the writer wrote."""
  assert list(split.class_ids) == list(class_ids)
  recs = _records(split)
  assert sorted(r["class_id"] for r in recs) == sorted(written_ids)
  np.testing.assert_array_equal(split.labels, [r["label"] for r in recs])
  np.testing.assert_array_equal(split.class_ids[split.labels], [r["class_id"] for r in recs])
  for r in recs:
    with Image.open(io.BytesIO(r["image"])) as im:
      assert im.format == "JPEG" and im.size == (r["width"], r["height"])
    x1, y1, x2, y2 = r["bbox"].tolist()
    assert 0 <= x1 < x2 <= r["width"] and 0 <= y1 < y2 <= r["height"]
  return recs


def _box_means(recs):
  """Mean RGB of the central half of each record's box."""
  out = []
  for r in recs:
    pixels = np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB"), np.float32)
    x1, y1, x2, y2 = r["bbox"].tolist()
    w, h = x2 - x1, y2 - y1
    rows = slice(int(y1 + h / 4), int(np.ceil(y2 - h / 4)))
    cols = slice(int(x1 + w / 4), int(np.ceil(x2 - w / 4)))
    crop = pixels[rows, cols]
    out.append(crop.reshape(-1, 3).mean(0))
  return np.stack(out)


def test_photo_is_deterministic_varied_and_boxed():
  sizes = set()
  for c in (1, 2, 7):
    for k in range(6):
      data, (w, h), (x, y, bw, bh) = tinydata.photo(c, k, salt=5)
      assert data == tinydata.photo(c, k, salt=5)[0]
      assert 0 <= x and x + bw <= w and 0 <= y and y + bh <= h and bw > 0 and bh > 0
      assert 26 <= min(w, h) <= 34 and 36 <= max(w, h) <= 44
      with Image.open(io.BytesIO(data)) as im:
        assert im.format == "JPEG" and im.size == (w, h) and im.mode == "RGB"
      sizes.add((w, h))
  assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes) and len(sizes) > 4
  assert tinydata.photo(1, 0, salt=5)[0] != tinydata.photo(1, 1, salt=5)[0]


def test_scaled_photo_is_the_small_one_enlarged_with_its_box():
  """``scale`` (the benchmarks' Cars-sized photos) enlarges the image and its box alike."""
  small, (w, h), box = tinydata.photo(3, 2, salt=2)
  data, size, big_box = tinydata.photo(3, 2, salt=2, scale=5)
  assert size == (5 * w, 5 * h) and big_box == tuple(5 * v for v in box)
  with Image.open(io.BytesIO(data)) as im, Image.open(io.BytesIO(small)) as sm:
    assert im.size == size
    shrunk = np.asarray(im.convert("RGB").resize((w, h), Image.BILINEAR), np.float32)
    # The same picture: far closer to its own small image than to another class's.
    other = np.asarray(Image.open(io.BytesIO(tinydata.photo(4, 2, salt=2)[0])).convert("RGB")
                       .resize((w, h)), np.float32)
    own = np.abs(shrunk - np.asarray(sm.convert("RGB"), np.float32)).mean()
    assert own < 12 and own < 0.5 * np.abs(shrunk - other).mean()


def test_cub_counts_labels_boxes_and_learnable(tmp_path):
  manual, data_dir = str(tmp_path / "manual"), str(tmp_path / "data")
  written = tinydata.write_cub(manual, train_classes=5, test_classes=3, per_class=3, archive=True)
  assert os.listdir(manual) == ["CUB_200_2011.tgz"]
  summary = _prepare("cub", manual, data_dir)
  assert summary["splits"] == tinydata.expected_splits(written) == {
      "train": {"images": 15, "classes": 5}, "test": {"images": 9, "classes": 3}}
  ds = records.open_prepared("cub", data_dir)
  train = _check_split(ds["train"], written["train"], [1, 2, 3, 4, 5])
  _check_split(ds["test"], written["test"], [101, 102, 103])
  assert ds["test"].class_names == ("101.Tiny_Bird_101", "102.Tiny_Bird_102", "103.Tiny_Bird_103")
  assert list(ds["train"].labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
  # The box is the object: a nearest class mean of its pixels, left out one at a time, is right.
  means, labels = _box_means(train), ds["train"].labels
  for i in range(len(labels)):
    keep = np.arange(len(labels)) != i
    centres = np.stack([means[keep & (labels == c)].mean(0) for c in range(5)])
    assert np.argmin(((centres - means[i]) ** 2).sum(1)) == labels[i]


def test_cars_counts_and_labels(tmp_path):
  manual, data_dir = str(tmp_path / "manual"), str(tmp_path / "data")
  written = tinydata.write_cars(manual, train_classes=6, test_classes=3, per_class=2)
  assert sorted(os.listdir(manual)) == ["car_ims", "cars_annos.mat"]
  summary = _prepare("cars", manual, data_dir)
  assert summary["splits"] == tinydata.expected_splits(written) == {
      "train": {"images": 12, "classes": 6}, "test": {"images": 6, "classes": 3}}
  ds = records.open_prepared("cars", data_dir)
  assert "all images" in ds.metadata["release"]
  _check_split(ds["train"], written["train"], [1, 2, 3, 4, 5, 6])
  test = _check_split(ds["test"], written["test"], [99, 100, 101])
  assert ds["test"].class_names[0] == "Tiny Car Model 99 2012"
  assert list(ds["test"].labels) == [0, 0, 1, 1, 2, 2]  # records ordered by class id
  assert all(r["path"].startswith(b"car_ims/") for r in test)


def test_sop_counts_sizes_and_labels(tmp_path):
  manual, data_dir = str(tmp_path / "manual"), str(tmp_path / "data")
  written = tinydata.write_sop(manual)  # 12 train and 6 test classes, sizes 2, 3, 2, 4, 2, 2
  sizes = tinydata.SOP_SIZES
  summary = _prepare("sop", manual, data_dir)
  assert summary["splits"] == tinydata.expected_splits(written) == {
      "train": {"images": 2 * sum(sizes), "classes": 12},
      "test": {"images": sum(sizes), "classes": 6}}
  ds = records.open_prepared("sop", data_dir)
  _check_split(ds["train"], written["train"], range(1, 13))
  test = _check_split(ds["test"], written["test"], range(13, 19))
  for split, n in (("train", 12), ("test", 6)):
    counts = np.bincount(ds[split].labels)
    np.testing.assert_array_equal(counts, [sizes[i % len(sizes)] for i in range(n)])
    assert (counts < 4).sum() > n // 2  # mostly too small for 4 images per class
  assert [r["image_id"] for r in test] == list(range(2 * sum(sizes) + 1, 3 * sum(sizes) + 1))
  assert ds["train"].class_names[0] == "bicycle/1" and ds["test"].class_names[-1] == "table/18"
  other = tinydata.write_sop(str(tmp_path / "other"), train_classes=3, test_classes=2,
                             sizes=(5,))
  assert tinydata.expected_splits(other) == {"train": {"images": 15, "classes": 3},
                                             "test": {"images": 10, "classes": 2}}


def test_inshop_counts_and_shared_labels(tmp_path):
  manual, data_dir = str(tmp_path / "manual"), str(tmp_path / "data")
  written = tinydata.write_inshop(manual, train_items=7, test_items=4, per_item=3)
  summary = _prepare("inshop", manual, data_dir)
  # Train items hold 3, 2, 1, 3, 2, 1, 3 images; each test item 1 query and 2 gallery images.
  assert summary["splits"] == tinydata.expected_splits(written) == {
      "train": {"images": 15, "classes": 7}, "query": {"images": 4, "classes": 4},
      "gallery": {"images": 8, "classes": 4}}
  ds = records.open_prepared("inshop", data_dir)
  train_ids = [1, 3, 5, 7, 9, 10, 11]  # dealt alternately until the test items run out
  test_ids = [2, 4, 6, 8]
  assert sorted(set(written["train"])) == train_ids
  assert sorted(set(written["query"])) == sorted(set(written["gallery"])) == test_ids
  _check_split(ds["train"], written["train"], train_ids)
  query = _check_split(ds["query"], written["query"], test_ids)
  gallery = _check_split(ds["gallery"], written["gallery"], test_ids)
  assert list(ds["query"].class_ids) == list(ds["gallery"].class_ids)
  np.testing.assert_array_equal(np.bincount(ds["query"].labels), [1, 1, 1, 1])
  np.testing.assert_array_equal(np.bincount(ds["gallery"].labels), [2, 2, 2, 2])
  for r in query:  # a query's label is its gallery matches' label
    assert {g["label"] for g in gallery if g["class_id"] == r["class_id"]} == {r["label"]}
  assert ds["gallery"].class_names[0] == f"id_{test_ids[0]:08d}"


# What each writer's defaults give (what training tests get from ``prepare_tiny(name, root)``).
DEFAULTS = {
    "cub": {"train": (32, 8), "test": (16, 4)},
    "cars": {"train": (32, 8), "test": (16, 4)},
    "sop": {"train": (30, 12), "test": (15, 6)},
    "inshop": {"train": (21, 10), "query": (6, 6), "gallery": (12, 6)},
}


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_prepare_tiny_defaults_quietly(tmp_path, capsys, name):
  data_dir = tinydata.prepare_tiny("dmljax_" + name, tmp_path)
  assert data_dir == str(tmp_path / "data")
  assert sorted(os.listdir(tmp_path)) == ["data", "manual"]
  captured = capsys.readouterr()
  assert captured.out == "" and "%" not in captured.err and "Generating" not in captured.err
  ds = records.open_prepared(name, data_dir)
  assert {s: (len(v), v.num_classes) for s, v in ds.splits.items()} == DEFAULTS[name]
  again = prepare_lib.prepare(name, None, data_dir)
  assert again["already_prepared"]
  assert again["splits"] == {s: {"images": n, "classes": c} for s, (n, c) in DEFAULTS[name].items()}


def test_prepare_tiny_passes_arguments_and_writers_check_them(tmp_path):
  data_dir = tinydata.prepare_tiny("sop", tmp_path, train_classes=4, test_classes=2, sizes=(2, 4))
  np.testing.assert_array_equal(np.bincount(records.open_prepared("sop", data_dir)["train"].labels),
                                [2, 4, 2, 4])
  with pytest.raises(ValueError, match="train_classes must be in 1..100"):
    tinydata.write_cub(str(tmp_path / "bad"), train_classes=101)
  with pytest.raises(ValueError, match="test_classes must be in 1..98"):
    tinydata.write_cars(str(tmp_path / "bad"), test_classes=99)
  with pytest.raises(ValueError, match="per_item must be in 2..5"):
    tinydata.write_inshop(str(tmp_path / "bad"), per_item=1)
