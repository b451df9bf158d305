"""Data sets: digits splits, glyphs class list / merge rule / determinism / cache, registry."""
import os

import numpy as np
import pytest

from dmljax.data import DATASETS, load_dataset
from dmljax.data import digits as digits_lib
from dmljax.data import glyphs as glyphs_lib


def _check_split(split, image_shape):
  assert split.images.dtype == np.float32 and split.images.shape[1:] == image_shape
  assert 0.0 <= split.images.min() and split.images.max() <= 1.0
  assert split.labels.dtype == np.int32
  np.testing.assert_array_equal(np.unique(split.labels), np.arange(split.num_classes))
  assert len(split.class_names) == split.num_classes == len(split.class_ids)


def _sorted_rows(images):
  flat = images.reshape(len(images), -1)
  return flat[np.lexsort(flat.T[::-1])]


def test_digits_class_disjoint_default_split():
  ds = load_dataset("digits")
  assert ds.image_shape == (8, 8, 1)
  for split in ds.splits.values():
    _check_split(split, (8, 8, 1))
  assert [list(ds[s].class_ids) for s in ("train", "val", "test")] == [[0, 1, 2, 3, 4], [5, 6],
                                                                       [7, 8, 9]]
  raw_images, raw_labels = digits_lib.raw_digits()
  assert len(raw_labels) == 1797
  for name, split in ds.splits.items():
    # Every image of exactly these digits, nothing else; original ids recoverable from class_ids.
    want = np.isin(raw_labels, split.class_ids)
    assert len(split) == want.sum()
    np.testing.assert_array_equal(_sorted_rows(split.images), _sorted_rows(raw_images[want]))
    original = split.class_ids[split.labels]
    np.testing.assert_array_equal(np.sort(original), np.sort(raw_labels[want]))
  assert ds.num_classes == {"train": 5, "val": 2, "test": 3}


def test_digits_custom_classes_and_errors():
  ds = load_dataset("digits", val_classes=(0,), test_classes=(1, 2))
  assert list(ds["train"].class_ids) == [3, 4, 5, 6, 7, 8, 9]
  with pytest.raises(ValueError, match="more than one split"):
    load_dataset("digits", val_classes=(1, 2), test_classes=(2, 3))
  with pytest.raises(ValueError, match="unknown classes"):
    load_dataset("digits", val_classes=(11,))


def test_digits_closed_split_by_image():
  ds = load_dataset("digits_closed", seed=3)
  raw_images, raw_labels = digits_lib.raw_digits()
  sizes = {k: len(s) for k, s in ds.splits.items()}
  assert sum(sizes.values()) == 1797
  for split in ds.splits.values():
    _check_split(split, (8, 8, 1))
    np.testing.assert_array_equal(split.class_ids, np.arange(10))
  # Fractions hold per class (floor), and the splits partition the images.
  counts = np.bincount(raw_labels)
  np.testing.assert_array_equal(np.bincount(ds["val"].labels), np.floor(0.15 * counts))
  allimg = np.concatenate([s.images for s in ds.splits.values()])
  np.testing.assert_array_equal(_sorted_rows(allimg), _sorted_rows(raw_images))
  again = load_dataset("digits_closed", seed=3)
  np.testing.assert_array_equal(again["test"].images, ds["test"].images)
  other = load_dataset("digits_closed", seed=4)
  assert not np.array_equal(other["test"].images, ds["test"].images)


def test_registry_errors():
  with pytest.raises(ValueError, match=r"Unknown data set 'mnist'.*digits.*glyphs"):
    load_dataset("mnist")
  with pytest.raises(ValueError, match="Bad option"):
    load_dataset("digits", val_fraction=0.1)
  with pytest.raises(ValueError, match="Unknown glyphs options"):
    load_dataset("glyphs", samples=3)
  assert set(DATASETS) == {"digits", "digits_closed", "glyphs", "cub", "cars", "sop", "inshop"}


def test_default_candidates_and_fonts():
  letters = glyphs_lib.candidate_letters()
  scripts = [s for _, s in letters]
  assert (scripts.count("latin"), scripts.count("greek"), scripts.count("cyrillic")) == (52, 48, 66)
  assert len({ch for ch, _ in letters}) == 166
  paths = glyphs_lib.font_paths()
  assert len(paths) == 16 and all(os.path.isfile(p) for p in paths)
  with pytest.raises(ValueError, match="not in"):
    glyphs_lib.font_paths(("NoSuchFont.ttf",))


def test_confusable_groups_rule_on_synthetic_renders():
  # 3 fonts, 2x2 "images". a (latin) == b (greek) in 2/3 fonts -> merged at min_fraction 0.5, not at
  # 0.9; c (cyrillic) equals a and b only in font 0 -> not merged.
  letters = [("a", "latin"), ("b", "greek"), ("c", "cyrillic")]
  base = np.array([[1, 0], [0, 1]], np.float32)
  r = np.stack([base] * 3)[None].repeat(3, axis=0)  # [F, L, 2, 2]
  r[2, 1] = [[0, 1], [1, 0]]   # b differs from a in font 2
  r[1:, 2] = [[1, 1], [1, 1]]  # c differs from both in fonts 1, 2
  assert glyphs_lib.confusable_groups(letters, r, 0.05, 0.5) == [[0, 1]]
  assert glyphs_lib.confusable_groups(letters, r, 0.05, 0.9) == []
  # A tiny difference (below the relative threshold) still counts as identical.
  r2 = r.copy()
  r2[1:, 2] = base + 0.01
  assert glyphs_lib.confusable_groups(letters, r2, 0.05, 0.5) == [[0, 1, 2]]
  # Identical letters of the same script are never merged.
  same_script = [("a", "latin"), ("b", "latin")]
  assert glyphs_lib.confusable_groups(same_script, r[:, :2] * 0 + base, 0.05, 0.5) == []


def test_merge_rule_on_real_fonts():
  # Renders these letters in all 16 faces (cheap) and applies the documented rule.
  config = glyphs_lib.GlyphConfig(letters=tuple("AKQoΑΚΓΟοАГКо"))
  classes, merged = glyphs_lib.class_list(config)
  names = [name for _, _, name in classes]
  assert sorted(map(tuple, merged)) == sorted([("A", "Α", "А"), ("K", "Κ"), ("o", "ο", "о"),
                                               ("Γ", "Г")])
  assert "A/Α/А" in names and "Q" in names and "Ο" in names  # Q and omicron differ
  assert "К" in names  # Cyrillic Ka differs from Latin K in most faces
  for ch in "ΑАΚοо":
    assert ch not in names, f"{ch} should be merged away"


TINY = dict(letters="AΑbБжy", fonts=("DejaVuSans.ttf", "STIXGeneralItalic.ttf"), samples_per_font=3)


@pytest.fixture(scope="module")
def tiny_glyphs(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("glyphs"))
  return cache, load_dataset("glyphs", seed=0, cache_dir=cache, **TINY)


def test_glyphs_tiny_dataset(tiny_glyphs):
  _, ds = tiny_glyphs
  assert ds.info["generation_seconds"] > 0 and ds.image_shape == (32, 32, 1)
  names = sorted(n for s in ds.splits.values() for n in s.class_names)
  assert names == sorted(["A/Α", "b", "y", "Б", "ж"])  # Greek Alpha merged into A; 5 classes
  assert ds.info["merged"] == ["A/Α"]
  ids = [set(s.class_ids.tolist()) for s in ds.splits.values()]
  assert ids[0].isdisjoint(ids[1]) and ids[0].isdisjoint(ids[2]) and ids[1].isdisjoint(ids[2])
  for name, split in ds.splits.items():
    _check_split(split, (32, 32, 1))
    assert len(split) == split.num_classes * 2 * 3   # classes x fonts x samples
    assert split.images.std() > 0.05                 # not blank
    np.testing.assert_array_equal(np.bincount(ds.info["fonts"][name]), [3 * split.num_classes] * 2)
  # A different seed re-partitions the classes, from the same cache file.
  other = load_dataset("glyphs", seed=1, cache_dir=tiny_glyphs[0], **TINY)
  assert other.info["generation_seconds"] == 0.0
  assert other.info["cache_file"] == ds.info["cache_file"]


def test_glyphs_cache_hit_and_determinism(tiny_glyphs, tmp_path):
  cache, ds = tiny_glyphs
  mtime = os.path.getmtime(ds.info["cache_file"])
  hit = load_dataset("glyphs", seed=0, cache_dir=cache, **TINY)
  assert hit.info["generation_seconds"] == 0.0 and os.path.getmtime(hit.info["cache_file"]) == mtime
  np.testing.assert_array_equal(hit["train"].images, ds["train"].images)
  # Regenerating elsewhere from the same parameters gives identical pixels.
  fresh = load_dataset("glyphs", seed=0, cache_dir=str(tmp_path), **TINY)
  assert fresh.info["generation_seconds"] > 0
  for s in ("train", "val", "test"):
    np.testing.assert_array_equal(fresh[s].images, ds[s].images)
  # Another render seed changes the jitter (and the cache key).
  reseeded = glyphs_lib.generate_glyphs(glyphs_lib.GlyphConfig(
      **{**TINY, "letters": tuple(TINY["letters"])}, render_seed=1))
  original = np.load(ds.info["cache_file"])["images"]
  assert reseeded["images"].shape == original.shape
  assert not np.array_equal(reseeded["images"], original)


def test_glyphs_corrupt_cache_names_the_file(tiny_glyphs, tmp_path):
  cache, ds = tiny_glyphs
  bad_dir = tmp_path / "bad"
  bad_dir.mkdir()
  bad = bad_dir / os.path.basename(ds.info["cache_file"])
  bad.write_bytes(b"not a zip file")
  with pytest.raises(ValueError, match=f"{bad}.*corrupt.*delete"):
    load_dataset("glyphs", seed=0, cache_dir=str(bad_dir), **TINY)


def test_contact_sheet(tiny_glyphs, tmp_path):
  _, ds = tiny_glyphs
  path = tmp_path / "sheet.png"
  glyphs_lib.save_contact_sheet(ds["train"].images, str(path), ds["train"].labels, per_class=4)
  from PIL import Image
  with Image.open(path) as im:
    assert im.size == (4 * 33 * 2, ds["train"].num_classes * 33 * 2)
