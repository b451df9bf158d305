"""Your own images: folders and CSV files prepared into TFDS data sets, read back and trained on.

The tests write their inputs: JPEG and PNG files, grey and colour, one that does not decode,
string labels, class folders with and without split folders above them, CSV files with and without
splits and boxes. ``test_trains_out_of_the_box`` is the issue's acceptance run: 16 classes x 10
images of 160 x 120, 30 steps of ``configs/own_data.py`` (its ``small`` variant).
"""
import colorsys
import importlib.util
import io
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from dmljax import inputs, protocol, train
from dmljax.data import builders, load_dataset, own, real, records, samplers, transforms
from dmljax.data import prepare as prepare_lib
from dmljax.data.splits import QueryGallery

tfds.disable_progress_bar()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def image(class_index, i, fmt="JPEG", mode="RGB", size=(160, 120)):
  """An image of class ``class_index``: the class's colour in stripes of its angle, plus noise."""
  rng = np.random.default_rng([class_index, i])
  w, h = size
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  colour = 255 * np.array(colorsys.hsv_to_rgb((class_index * 0.618034) % 1.0, 0.8, 0.9))
  angle = np.pi * ((class_index * 0.381966) % 1.0)
  stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) / 4 + rng.uniform(0, 6)) > 0
  pixels = np.where(stripes[..., None], colour, 0.4 * colour) + rng.normal(0, 10, (h, w, 3))
  out = io.BytesIO()
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert(mode).save(out, fmt)
  return out.getvalue()


def put(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)


def write_classes(root, names, per_class, size=(40, 30)):
  """``root/NAME/k.jpg|png`` for each class name: every third image a PNG, every fourth grey."""
  for c, name in enumerate(names):
    for i in range(per_class):
      fmt, ext = ("PNG", "png") if i % 3 == 0 else ("JPEG", "jpg")
      put(os.path.join(root, name, f"{i}.{ext}"),
          image(c, i, fmt, "L" if i % 4 == 1 else "RGB", size))


def prepare(capsys, *argv):
  """``python -m dmljax.data.prepare ARGV`` in-process: (exit status, stdout, stderr)."""
  status = prepare_lib.run(list(argv))
  out = capsys.readouterr()
  return status, out.out, out.err


def errors(err):
  return [line for line in err.splitlines() if "error:" in line]


# String labels: spaces, capitals, punctuation, non-ASCII; sorted as strings.
LABELS = ["red mug", "Blue-Cup", "élan", "42", "zebra_pen", "a.b"]


def test_folder_of_classes(tmp_path, capsys):
  root, data_dir = str(tmp_path / "photos"), str(tmp_path / "data")
  write_classes(root, LABELS, 4)
  put(os.path.join(root, "red mug", "broken.jpg"), b"\xff\xd8\xff\xe0 not really a JPEG")
  put(os.path.join(root, "zebra_pen", "alpha.PNG"), image(4, 5, "PNG", "RGBA"))  # any case
  put(os.path.join(root, "zebra_pen", "palette.gif"), image(4, 6, "GIF", "P"))
  put(os.path.join(root, "zebra_pen", "photo.webp"), image(4, 7, "WEBP"))
  put(os.path.join(root, "red mug", "deeper", "more.png"), image(0, 9, "PNG"))  # nested: same class
  put(os.path.join(root, "red mug", "notes.txt"), "not an image")
  put(os.path.join(root, ".hidden", "x.jpg"), image(0, 0))
  put(os.path.join(root, "README.md"), "my photos")
  status, out, err = prepare(capsys, "folder", f"--manual_dir={root}", f"--data_dir={data_dir}",
                             "--name=shop")
  assert status == 0, err
  assert "skipped" in err and "broken.jpg" in err and "does not decode" in err
  names = sorted(LABELS)  # ['42', 'Blue-Cup', 'a.b', 'red mug', 'zebra_pen', 'élan']
  assert "train       12        3        0" in out and "test        16        3        1" in out
  assert "--config.dataset.name=shop" in out and f"--config.dataset.data_dir={data_dir}" in out

  ds = records.open_prepared("shop", data_dir)
  assert list(ds.splits) == ["train", "test"]
  assert ds["train"].class_names == tuple(names[:3]) and ds["test"].class_names == tuple(names[3:])
  assert ds["train"].class_ids.tolist() == [0, 1, 2] and ds["test"].class_ids.tolist() == [3, 4, 5]
  assert ds.metadata["splits"]["test"]["skipped"][0]["path"] == "red mug/broken.jpg"
  assert ds.metadata["ignored"]["count"] == 2  # notes.txt, README.md (hidden files not even seen)
  paths = [ds["test"][i]["path"].decode() for i in range(len(ds["test"]))]
  assert "red mug/deeper/more.png" in paths and not any("hidden" in p for p in paths)
  for split in ds.splits.values():
    for i in range(len(split)):
      r = split[i]
      assert names[r["class_id"]] == split.class_names[r["label"]] == r["path"].decode().split("/")[0]
      pixels = transforms.decode(r["image"])  # grey PNGs and JPEGs alike: RGB uint8
      assert pixels.shape == (r["height"], r["width"], 3) and pixels.dtype == np.uint8
      np.testing.assert_array_equal(r["bbox"], [0, 0, r["width"], r["height"]])
  plain = tfds.data_source("dmljax_shop", data_dir=data_dir, split="train")  # plain TFDS reads it
  assert len(plain) == 12 and plain[0]["path"] == ds["train"][0]["path"]

  # Again: a no-op. Changed since: refused, pointing to --overwrite, which rebuilds.
  version_dir = os.path.join(data_dir, "dmljax_shop", builders.VERSION)
  stamp = os.stat(os.path.join(version_dir, "dataset_info.json")).st_mtime_ns
  status, out, err = prepare(capsys, "folder", f"--manual_dir={root}", f"--data_dir={data_dir}",
                             "--name=shop")
  assert status == 0 and "already prepared" in out and "nothing to do" in out
  assert os.stat(os.path.join(version_dir, "dataset_info.json")).st_mtime_ns == stamp
  put(os.path.join(root, "42", "new.jpg"), image(3, 7))
  argv = ["folder", f"--manual_dir={root}", f"--data_dir={data_dir}", "--name=shop"]
  status, out, err = prepare(capsys, *argv)
  assert status == 2 and len(errors(err)) == 1 and "changed since" in err and "--overwrite" in err
  status, out, err = prepare(capsys, *argv, "--test_fraction=0.34")
  assert status == 2 and "--test_fraction=0.5 then, 0.34 now" in err
  status, out, err = prepare(capsys, *argv, "--overwrite")
  assert status == 0 and "train       13        3        0" in out and "test        16" in out


def test_class_split_by_name_or_seed():
  names = [f"c{i}" for i in range(7)]
  split = own.class_split(names)  # 7 classes: floor(3.5) = 3 train, as protocol_class_halves
  assert [c for c in names if split[c] == "train"] == ["c0", "c1", "c2"]
  assert sum(v == "train" for v in own.class_split(names, 0.25).values()) == 5
  drawn = own.class_split(names, 0.5, shuffle_seed=3)
  assert sum(v == "train" for v in drawn.values()) == 3 and drawn != split
  assert drawn == own.class_split(names[::-1], 0.5, shuffle_seed=3)  # the listing order is moot
  with pytest.raises(ValueError, match="at least 2"):
    own.class_split(["only"])


def test_split_folders_nested_and_forced_layout(tmp_path, capsys):
  root, data_dir = str(tmp_path / "photos"), str(tmp_path / "data")
  write_classes(os.path.join(root, "train"), ["ant", "bee", "cat", "cow"], 3)
  write_classes(os.path.join(root, "query"), ["dog", "eel"], 2)
  write_classes(os.path.join(root, "gallery"), ["dog", "eel", "fox"], 3)
  put(os.path.join(root, "gallery", "fox", "2020", "06", "deep.jpg"), image(5, 8))
  status, out, err = prepare(capsys, "folder", f"--manual_dir={root}", f"--data_dir={data_dir}",
                             "--name=zoo")
  assert status == 0, err
  ds = records.open_prepared("zoo", data_dir)
  assert list(ds.splits) == ["train", "query", "gallery"]
  assert ds["train"].class_names == ("ant", "bee", "cat", "cow")
  # Query and gallery share one label space (the union of their classes); class ids: sorted names.
  assert ds["query"].class_ids.tolist() == ds["gallery"].class_ids.tolist() == [4, 5, 6]
  assert len(ds["gallery"]) == 10 and ds["query"].class_names == ("dog", "eel", "fox")
  assert ds.metadata["layout"] == "splits"

  # Loaded for training: a query / gallery test split, as In-shop's; 2 + 2 training classes.
  loaded = load_dataset("zoo", data_dir=data_dir)
  assert isinstance(loaded["test"], QueryGallery) and len(loaded["test"].query) == 4
  assert len(loaded["train"].class_ids) == len(loaded["val"].class_ids) == 2
  assert "zoo: 4 training classes: 2 to train, 2 to validate" in capsys.readouterr().out

  # The same folder with --layout=classes: train/query/gallery are three classes.
  status, out, err = prepare(capsys, "folder", f"--manual_dir={root}", f"--data_dir={data_dir}",
                             "--name=zoo_classes", "--layout=classes")
  assert status == 0, err
  assert records.open_prepared("zoo_classes", data_dir)["test"].class_names == ("query", "train")

  # Split folders beside a class folder are classes (split folders only when nothing else).
  put(os.path.join(root, "misc", "x.jpg"), image(1, 1))
  status, out, err = prepare(capsys, "folder", f"--manual_dir={root}", f"--data_dir={data_dir}",
                             "--name=zoo_mixed")
  assert status == 0 and records.open_prepared("zoo_mixed", data_dir).metadata["layout"] == "classes"
  status, out, err = prepare(capsys, "folder", f"--manual_dir={root}", f"--data_dir={data_dir}",
                             "--name=zoo_forced", "--layout=splits")
  assert status == 2 and "split names ['misc']" in err


def test_csv_with_splits_boxes_missing_files_and_extra_columns(tmp_path, capsys):
  base, data_dir = tmp_path / "shop", str(tmp_path / "data")
  rows = ["path,label,split,x1,y1,x2,y2,comment"]
  for c, label in enumerate(["mug", "cup", "pen", "box"]):
    split = "train" if c < 2 else ("query" if c == 2 else "gallery")
    for i in range(3):
      rel = f"img/{label}_{i}.{'png' if i == 2 else 'jpg'}"
      put(str(base / rel), image(c, i, "PNG" if i == 2 else "JPEG", "L" if i == 1 else "RGB",
                                 size=(40, 30)))
      rows.append(f"{rel},{label},{split},2,3,{30 + 20 * (i == 0)},20,any text")
  rows.append("img/gone.jpg,mug,train,0,0,5,5,a missing file")
  rows.append("pen_copy.jpg,pen,gallery,1,1,9,9,")  # the gallery must share query's classes
  put(str(base / "pen_copy.jpg"), image(2, 5))
  csv_path = str(base / "labels.csv")
  put(csv_path, "\n".join(rows) + "\n")
  status, out, err = prepare(capsys, "csv", f"--manual_dir={csv_path}", f"--data_dir={data_dir}",
                             "--name=shop_csv")
  assert status == 0, err
  assert "gone.jpg" in err and "does not exist" in err and "line 14 of labels.csv" in err
  ds = records.open_prepared("shop_csv", data_dir)
  assert list(ds.splits) == ["train", "query", "gallery"]
  assert ds["train"].class_names == ("cup", "mug") and len(ds["train"]) == 6
  assert ds.metadata["splits"]["train"]["skipped"] == [
      {"image_id": 14, "path": "img/gone.jpg", "error": "FileNotFoundError: the file does not exist"}]
  assert ds["gallery"].class_names == ("box", "pen") == ds["query"].class_names
  # Records in CSV row order; line 5 is cup_0, its box (2, 3, 50, 20) clipped to the 40 x 30 image.
  assert [ds["train"][i]["image_id"] for i in range(6)] == [2, 3, 4, 5, 6, 7]
  cup = ds["train"][3]
  assert cup["path"] == b"img/cup_0.jpg" and cup["label"] == 0 and cup["class_id"] == 1
  np.testing.assert_array_equal(cup["bbox"], [2, 3, 40, 20])

  # Without a split column: a class-disjoint split by name (or drawn with --shuffle_seed).
  plain = str(base / "plain.csv")
  put(plain, "Path,Label\n" + "\n".join(f"img/{l}_{i}.{'png' if i == 2 else 'jpg'},{l}"
                                         for l in ["mug", "cup", "pen", "box"] for i in range(3)))
  status, out, err = prepare(capsys, "csv", f"--manual_dir={plain}", f"--data_dir={data_dir}",
                             "--name=plain")
  assert status == 0, err
  ds = records.open_prepared("plain", data_dir)
  assert ds["train"].class_names == ("box", "cup") and ds["test"].class_names == ("mug", "pen")


def _bad_inputs(tmp):
  empty = tmp / "empty"
  empty.mkdir()
  loose = tmp / "loose"
  put(str(loose / "readme.txt"), "no class folders, no images")
  put(str(tmp / "no_label.csv"), "path,split\na.jpg,train\n")
  put(str(tmp / "half_box.csv"), "path,label,x1,y1\na.jpg,x,1,2\n")
  put(str(tmp / "bad_split.csv"), "path,label,split\na.jpg,x,validation\n")
  put(str(tmp / "no_rows.csv"), "path,label\n")
  put(str(tmp / "only_train.csv"), "path,label,split\na.jpg,x,train\n")
  ok = tmp / "ok"
  write_classes(str(ok), ["a", "b"], 2, size=(8, 8))
  return [
      (["folder", f"--manual_dir={tmp / 'missing'}"], "does not exist"),
      (["folder", f"--manual_dir={empty}"], "is empty"),
      (["folder", f"--manual_dir={loose}"], "holds no images"),
      (["folder"], "--manual_dir is required"),
      (["csv", f"--manual_dir={tmp / 'gone.csv'}"], "does not exist"),
      (["csv", f"--manual_dir={tmp / 'no_label.csv'}"], "has no column label"),
      (["csv", f"--manual_dir={tmp / 'half_box.csv'}"], "x1, y1 but not x2, y2"),
      (["csv", f"--manual_dir={tmp / 'bad_split.csv'}"], "line 2: split 'validation'"),
      (["csv", f"--manual_dir={tmp / 'no_rows.csv'}"], "no rows"),
      (["csv", f"--manual_dir={tmp / 'only_train.csv'}"], "train and test, or train, query"),
      (["csv", f"--manual_dir={ok}"], "is a folder"),
      (["folder", f"--manual_dir={ok}", "--name=cub"], "built into dmljax"),
      (["folder", f"--manual_dir={ok}", "--name=glyphs"], "built into dmljax"),
      (["folder", f"--manual_dir={ok}", "--name=My Photos"], "e.g. --name=my_photos"),
      (["folder", f"--manual_dir={ok}", "--test_fraction=1"], "--test_fraction must be"),
  ]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
  data_dir = tmp_path / "data"
  for argv, message in _bad_inputs(tmp_path):
    if not any(a.startswith("--name") for a in argv):
      argv = argv + ["--name=mine"]
    status, out, err = prepare(capsys, *argv, f"--data_dir={data_dir}")
    assert status == 2, (argv, out, err)
    assert len(errors(err)) == 1 and message in errors(err)[0], (argv, err)
    assert not data_dir.exists(), argv


def test_small_class_is_named_with_the_fix_and_batches_fit_the_classes(tmp_path, capsys,
                                                                        monkeypatch):
  labels = np.repeat(np.arange(3), [4, 2, 5])
  with pytest.raises(ValueError, match=r"Class 'blue cup' has 2 images .*"
                                       r"--config.sampler.small_classes=repeat"):
    samplers.MPerClassSampler(labels, 4, 8, class_names=["red", "blue cup", "green"])
  assert samplers.fit_classes_per_batch(6, 32, 4) == (
      24, "batches of 6 classes x 4 images = 24 (batch_size=32 asks for 8 classes; the training "
      "split has 6)")
  assert samplers.fit_classes_per_batch(7, 32, 4, multiple_of=8)[0] == 24  # 6 x 4, a multiple of 8
  assert samplers.fit_classes_per_batch(9, 32, 4)[0] == 32
  with pytest.raises(ValueError, match="3 training classes"):
    real.own_val_count(3, 0.2)
  assert [real.own_val_count(t, 0.2) for t in (4, 8, 20, 100)] == [2, 2, 4, 20]

  # Through the trainer, before anything compiles: the class is named by its folder's name.
  root, data_dir = str(tmp_path / "photos"), str(tmp_path / "data")
  write_classes(root, [f"class {c}" for c in range(8)], 4, size=(16, 12))
  for c in range(5):  # 5 of the 6 training classes hold 2 images: 3 of them or more train
    for i in range(2):
      os.remove(os.path.join(root, f"class {c}", f"{i}.{'png' if i == 0 else 'jpg'}"))
  assert prepare(capsys, "folder", f"--manual_dir={root}", f"--data_dir={data_dir}",
                 "--name=tiny", "--test_fraction=0.25")[0] == 0
  c = load_config("small")
  c.dataset.name, c.dataset.data_dir, c.dataset.options.val_fraction = "tiny", data_dir, 0.01
  c.num_devices = 1
  monkeypatch.setattr(train, "make_train_step", lambda *a: pytest.fail("reached compile"))
  with pytest.raises(ValueError, match=r"Class 'class \d' has 2 images .*small_classes=repeat"):
    train.train_and_evaluate(c, str(tmp_path / "run"))


def load_config(variant):
  path = os.path.join(REPO, "configs", "own_data.py")
  spec = importlib.util.spec_from_file_location("cfg_own_data", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert "--config=configs/own_data.py" in module.__doc__.split("\n\n")[1]
  return module.get_config(variant)


def test_config_variants():
  default, bn, small = (load_config(v) for v in ("", "bn_inception", "small"))
  assert default.dataset.name == "" and default.model.name == "small_cnn"
  assert default.framework == bn.framework == "ccp" and default.sampler.fit_batch
  assert bn.model.name == "bn_inception" and bn.model.pretrained.endswith(
      "bn_inception-52deb4733.pth") and bn.sampler.fit_batch and bn.dataset.name == ""
  assert bn.dataset.options.to_dict() == default.dataset.options.to_dict() == {"val_fraction": 0.2}
  assert small.model.widths == (4, 8) and small.total_steps == 30
  with pytest.raises(ValueError, match="Unknown variant 'large'"):
    load_config("large")
  with pytest.raises(ValueError, match="config.dataset.name is empty"):
    load_dataset("")


@pytest.fixture(scope="module")
def sixteen(tmp_path_factory):
  """16 classes x 10 images of 160 x 120 (JPEG and PNG, grey and colour), prepared."""
  tmp = tmp_path_factory.mktemp("sixteen")
  root, data_dir = str(tmp / "photos"), str(tmp / "data")
  write_classes(root, [f"product_{c:02d}" for c in range(16)], 10, size=(160, 120))
  summary = own.prepare("folder", root, data_dir, name="sixteen")
  assert summary["splits"] == {"train": {"images": 80, "classes": 8},
                               "test": {"images": 80, "classes": 8}}
  return data_dir


def test_trains_out_of_the_box(sixteen, tmp_path, capsys):
  c = load_config("small")  # configs/own_data.py with a tiny network: 30 steps
  c.dataset.name, c.dataset.data_dir = "sixteen", sixteen
  c.progress, c.baselines, c.num_devices, c.checkpoint.enabled = False, (), 1, False
  out = train.train_and_evaluate(c, str(tmp_path))
  printed = capsys.readouterr().out
  assert "sixteen: 8 training classes: 6 to train, 2 to validate" in printed
  assert "sixteen: batches of 6 classes x 4 images = 24 (batch_size=32 asks for 8" in printed
  assert out["step"] == 30 and out["nonfinite_steps"] == 0
  for split in ("val", "test"):
    assert 0.0 < out[f"{split}/map_at_r"] <= 1.0
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["batch_size"] == 24  # what the run used
  assert os.path.isfile(tmp_path / "final_metrics.json")


def test_protocol_folds_over_the_prepared_training_classes(sixteen, capsys):
  ds = load_dataset("sixteen", data_dir=sixteen, protocol_fold=1)
  assert "protocol fold 1: 6 classes to train, 2 to validate; test: 8 classes" in (
      capsys.readouterr().out)
  assert ds.info["protocol"]["class_pool"] == list(range(8))
  assert ds.info["protocol"]["val_classes"] == [0, 1] and ds["test"].class_ids.tolist() == list(
      range(8, 16))
  assert not isinstance(ds["test"], QueryGallery)
  # python -m dmljax.protocol: the folds it records are the ones the loader trains, read from
  # dataset.data_dir; the conventional mode trains on all 8 training classes.
  c = load_config("small")
  c.dataset.name, c.dataset.data_dir = "sixteen", sixteen
  folds = protocol.class_folds(c)
  assert folds["trainval"] == list(range(8)) and folds["test"] == list(range(8, 16))
  assert folds["folds"][1] == {"train": ds.info["protocol"]["train_classes"],
                               "val": ds.info["protocol"]["val_classes"]}
  conventional = inputs.create_input(protocol.conventional_config(c))
  assert "sixteen: 8 training classes, all to train (val_fraction=0); test: 8 classes" in (
      capsys.readouterr().out)
  assert sorted(set(conventional.train_labels.tolist())) == list(range(8))
