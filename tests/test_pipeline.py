"""Host input pipeline: decoding, train/eval transforms, BatchLoader determinism/resume/slices."""
import functools
import io
import json
import multiprocessing
import os
import sys

import numpy as np
import pytest
from PIL import Image

from dmljax.data import pipeline, transforms
from dmljax.data.pipeline import BatchLoader, eval_batches
from dmljax.data.samplers import MPerClassSampler
from dmljax.data.transforms import TransformConfig

SMALL_TRAIN = TransformConfig(kind="train", size=16, resize=20)
SMALL_EVAL = TransformConfig(kind="eval", size=16, resize=20)


def _encode(array, fmt="JPEG", mode=None, **kw):
  im = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
  buf = io.BytesIO()
  im.save(buf, fmt, **({"quality": 92} if fmt == "JPEG" else {}), **kw)
  return buf.getvalue()


def _photo(height, width, seed):
  """Smooth random colours plus a rectangle: compresses like a photo, not like noise."""
  rng = np.random.default_rng(seed)
  coarse = (rng.random((4, 5, 3)) * 255).astype(np.uint8)
  image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC)).copy()
  y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
  image[y:y + height // 3, x:x + width // 3] = rng.integers(0, 256, 3)
  return image


class ListSource:
  """A tiny random-access record source (picklable) like the data set's record readers."""

  def __init__(self, records):
    self.records = records

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[i]


@pytest.fixture(scope="module")
def source():
  records = []
  for i in range(10):
    h, w = (30, 40) if i % 2 else (40, 30)
    records.append({"image": _encode(_photo(h, w, i)),
                    "bbox": np.array([3, 2, w - 4, h - 5], np.float32)})
  return ListSource(records)


@pytest.fixture(params=["pil", "cv2"])
def resizer(request, monkeypatch):
  """Runs a test with each resizer; "pil" also hides OpenCV, as where it is not installed."""
  if request.param == "cv2" and transforms.cv2 is None:
    pytest.skip("OpenCV (opencv-python-headless) is not installed")
  if request.param == "pil":
    monkeypatch.setattr(transforms, "cv2", None)
  monkeypatch.setattr(transforms, "RESIZER", request.param)
  return request.param


def _pil_resize(image, width, height):
  """The independent reference resampling: PIL's antialiased bilinear, as torchvision's."""
  return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((width, height),
                                                                        Image.BILINEAR))


def _assert_close_to_pil(out, ref, mean, peak):
  """``out`` within ``mean`` grey levels of ``ref`` on average and ``peak`` everywhere."""
  diff = np.abs(out.astype(np.int16) - ref.astype(np.int16))
  assert diff.mean() <= mean and diff.max() <= peak, f"mean {diff.mean():.3f}, max {diff.max()}"


def _indices_fn(step, num=10, size=4):
  """A pure, picklable batch-index function (a module-level function: workers import it)."""
  return (np.arange(size) * 3 + step * 5) % num


# ============================================================================= transforms


def test_config_validation_names_the_key():
  with pytest.raises(ValueError, match="unknown key `sise`"):
    TransformConfig.from_dict({"kind": "train", "sise": 224})
  with pytest.raises(ValueError, match="key `kind`"):
    TransformConfig(kind="test")
  with pytest.raises(ValueError, match="key `scale`"):
    TransformConfig(kind="train", scale=(0.5, 1.5))
  with pytest.raises(ValueError, match="key `ratio`"):
    TransformConfig(kind="train", ratio=(1.0,))
  with pytest.raises(ValueError, match="key `resize`"):
    TransformConfig(kind="eval", size=227, resize=200)
  with pytest.raises(ValueError, match="key `flip`"):
    TransformConfig(kind="train", flip="yes")
  with pytest.raises(ValueError, match="key `resizer`"):
    TransformConfig(kind="train", resizer="skimage")
  cfg = TransformConfig.from_dict({"kind": "train", "size": 224, "scale": [0.2, 1]})
  assert cfg.scale == (0.2, 1.0) and cfg.size == 224
  assert TransformConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_train_augmentation_is_deterministic(source):
  cfg = TransformConfig(kind="train")  # the protocol's 227 x 227 crops
  record = source[1]
  a = transforms.transform_record(record, cfg, transforms.augment_rng(7, 3, 5))
  b = transforms.transform_record(record, cfg, transforms.augment_rng(7, 3, 5))
  assert a.shape == (227, 227, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  others = [transforms.transform_record(record, cfg, transforms.augment_rng(*key))
            for key in [(7, 4, 5), (7, 3, 6), (8, 3, 5)]]
  assert all(not np.array_equal(a, o) for o in others)
  with pytest.raises(ValueError, match="random generator"):
    transforms.transform_record(record, cfg)


def test_crop_box_ranges_and_flip_frequency():
  cfg = TransformConfig(kind="train")
  height, width = 300, 400
  fractions, ratios, flips = [], [], []
  for i in range(3000):
    (top, left, h, w), flip = transforms.sample_augmentation(
        transforms.augment_rng(0, i, 1), height, width, cfg)
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    fractions.append(h * w / (height * width))
    ratios.append(w / h)
    flips.append(flip)
  fractions, ratios = np.array(fractions), np.array(ratios)
  # Bounds up to the rounding of the box to whole pixels.
  assert fractions.min() >= 0.16 * 0.97 and fractions.max() <= 1.0
  assert ratios.min() >= 0.75 * 0.98 and ratios.max() <= 4 / 3 * 1.02
  assert fractions.max() > 0.9 and fractions.min() < 0.2   # the whole range is used
  # Log-uniform ratio: symmetric in log on a square image (where rejections are symmetric too).
  square = [transforms.sample_crop_box(transforms.augment_rng(1, i, 0), 200, 200)
            for i in range(2000)]
  assert np.mean([np.log(w / h) for _, _, h, w in square]) == pytest.approx(0.0, abs=0.02)
  assert np.mean(flips) == pytest.approx(0.5, abs=0.03)
  # A very elongated image: every proposal fails, the fallback is the centred clamped-ratio box.
  top, left, h, w = transforms.sample_crop_box(np.random.default_rng(0), 20, 400)
  assert (top, h) == (0, 20) and w == round(20 * 4 / 3) and left == (400 - w) // 2
  assert not transforms.sample_augmentation(np.random.default_rng(0), 9, 9,
                                            cfg.replace(flip=False))[1]


def test_train_transform_is_the_sampled_crop_resized(source, resizer):
  cfg = TransformConfig(kind="train", size=24, resize=20)
  image = transforms.decode(source[2]["image"])
  for slot in range(6):
    out = transforms.train_transform(image, transforms.augment_rng(1, 0, slot), cfg)
    (top, left, h, w), flip = transforms.sample_augmentation(
        transforms.augment_rng(1, 0, slot), *image.shape[:2], cfg)
    ref = _pil_resize(image[top:top + h, left:left + w], 24, 24)
    ref = ref[:, ::-1] if flip else ref
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    if resizer == "pil":
      np.testing.assert_array_equal(out, ref)
    elif max(h, w) <= 24:  # enlarged: OpenCV's bilinear interpolation is PIL's up to rounding
      _assert_close_to_pil(out, ref, mean=0.5, peak=1)
    else:  # reduced, on a tiny image that is mostly sharp edges
      _assert_close_to_pil(out, ref, mean=1.5, peak=24)


def test_protocol_crops_match_pil_within_tolerance(resizer):
  """227 crops of a photo-like image, mostly reduced (the protocol's case): PIL within tolerance."""
  rng = np.random.default_rng(5)
  image = _photo(400, 500, 5)
  image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)  # fine detail
  cfg = TransformConfig(kind="train")
  reductions = []
  for slot in range(8):
    out = transforms.train_transform(image, transforms.augment_rng(2, 1, slot), cfg)
    (top, left, h, w), flip = transforms.sample_augmentation(
        transforms.augment_rng(2, 1, slot), *image.shape[:2], cfg)
    ref = _pil_resize(image[top:top + h, left:left + w], 227, 227)
    ref = ref[:, ::-1] if flip else ref
    reductions.append(max(h, w) / 227)
    if resizer == "pil":
      np.testing.assert_array_equal(out, ref)
    else:  # about 0.2-0.8 on average; the peaks (~10-25) are on the drawn shapes' sharp edges
      _assert_close_to_pil(out, ref, mean=1.0, peak=40)
  assert max(reductions) > 1.5   # prefiltered reductions are exercised
  # Grayscale ([H, W] and [H, W, 1]) images keep one channel.
  gray = image[:, :, 1]
  for g in (gray, gray[:, :, None]):
    out = transforms.train_transform(g, transforms.augment_rng(2, 1, 0), cfg)
    assert out.shape == (227, 227, 1)


def test_resize_is_antialiased(resizer):
  """1-pixel stripes reduced by 1.8: an antialiased filter gives nearly flat grey, no moire."""
  stripes = np.zeros((180, 180, 3), np.uint8)
  stripes[:, ::2] = 255
  out = transforms.resize(stripes, 100, 100).astype(float)
  assert abs(out.mean() - 127.5) < 3 and out[:, 2:-2].std() < 12
  if resizer == "cv2":  # bilinear interpolation alone aliases (the prefilter is what prevents it)
    plain = transforms.cv2.resize(stripes, (100, 100), interpolation=transforms.cv2.INTER_LINEAR)
    assert plain[:, 2:-2].astype(float).std() > 40
    np.testing.assert_array_equal(transforms.resize(stripes[:, :, :1], 100, 50)[..., 0],
                                  transforms.resize(stripes[:, :, 0], 100, 50))
  with pytest.raises(ValueError, match="unknown resizer"):
    transforms.resize(stripes, 10, 10, resizer="skimage")
  with pytest.raises(ValueError, match="uint8"):
    transforms.resize(stripes.astype(np.float32), 10, 10)


def test_resizer_choice(source, monkeypatch):
  """``TransformConfig.resizer`` overrides the process default ``transforms.RESIZER``."""
  record, rng = source[3], lambda: transforms.augment_rng(0, 1, 2)
  monkeypatch.setattr(transforms, "RESIZER", "pil")
  pil = transforms.transform_record(record, TransformConfig(kind="train"), rng())
  np.testing.assert_array_equal(
      transforms.transform_record(record, TransformConfig(kind="train", resizer="pil"), rng()), pil)
  if transforms.cv2 is not None:
    via_cfg = transforms.transform_record(record, TransformConfig(kind="train", resizer="cv2"),
                                          rng())
    monkeypatch.setattr(transforms, "RESIZER", "cv2")
    np.testing.assert_array_equal(
        transforms.transform_record(record, TransformConfig(kind="train"), rng()), via_cfg)
    _assert_close_to_pil(via_cfg, pil, mean=1.0, peak=40)
  monkeypatch.setattr(transforms, "cv2", None)
  with pytest.raises(ValueError, match="opencv-python-headless"):
    transforms.resize(np.zeros((4, 4, 3), np.uint8), 2, 2, resizer="cv2")


def test_eval_transform_matches_resize_then_centre_crop(resizer):
  yy, xx = np.mgrid[0:300, 0:512]
  image = np.stack([xx * 255 // 511, yy * 255 // 299, (xx + yy) % 256], -1).astype(np.uint8)
  data = _encode(image)
  cfg = TransformConfig(kind="eval")
  decoded = transforms.decode(data, cfg.resize)
  assert min(decoded.shape[:2]) >= 256
  out = transforms.transform_record({"image": data}, cfg)
  h, w = decoded.shape[:2]
  new_w = int(256 * w / h)  # torchvision Resize(256): the long side truncated
  ref = _pil_resize(decoded, new_w, 256)
  top, left = int(round((256 - 227) / 2)), int(round((new_w - 227) / 2))
  ref = ref[top:top + 227, left:left + 227]
  assert out.shape == (227, 227, 3) and out.flags.c_contiguous
  if resizer == "pil":  # exactly torchvision's Resize(256) + CenterCrop(227)
    np.testing.assert_array_equal(out, ref)
  else:  # the same geometry; the resampling differs (most on the blue channel's sharp wrap)
    _assert_close_to_pil(out, ref, mean=0.5, peak=20)
  # Portrait orientation: the width becomes 256.
  tall = transforms.eval_transform(np.ascontiguousarray(image.transpose(1, 0, 2)), cfg)
  assert tall.shape == (227, 227, 3)


@pytest.mark.parametrize("decoder", ["default", "pil"])
def test_reduced_scale_decode_never_below_target(decoder, monkeypatch):
  if decoder == "pil":
    monkeypatch.setattr(transforms, "simplejpeg", None)
  for (h, w), min_side, expect in [((520, 700), 256, (260, 350)), ((1030, 1100), 256, (258, 275)),
                                   ((300, 512), 256, None), ((520, 700), 100, (130, 175))]:
    data = _encode(_photo(h, w, 0))
    image, scale = transforms.decode_scaled(data, min_side)
    assert min(image.shape[:2]) >= min_side
    assert image.shape[:2] == (expect or (h, w))   # the largest power-of-two reduction that fits
    assert scale == (1 / round(w / image.shape[1]),) * 2   # the exact DCT factor, 1/s
    full = transforms.decode(data)
    assert full.shape == (h, w, 3)
  # A bounding box: the box (not the image) must keep its shorter side >= min_side, and the box
  # is rescaled by the decode's exact factor.
  data = _encode(_photo(1040, 1200, 1))
  bbox = np.array([100.0, 200.0, 700.0, 900.0], np.float32)   # 600 x 700 pixels
  image, scale = transforms.decode_scaled(data, 256, bbox=bbox)
  assert scale == (0.5, 0.5) and image.shape[:2] == (520, 600)
  x1, y1, x2, y2 = transforms.bbox_region(bbox, scale, *image.shape[:2])
  assert (x1, y1, x2, y2) == (50, 100, 350, 450) and min(x2 - x1, y2 - y1) >= 256
  image, scale = transforms.decode_scaled(data, 256, bbox=[0, 0, 400, 400])
  assert scale == (1.0, 1.0)  # a 400-pixel box cannot be halved


def test_grayscale_cmyk_and_png_inputs():
  rgb = _photo(30, 40, 3)
  gray = np.asarray(Image.fromarray(rgb).convert("L"))
  cases = {
      "gray_jpeg": _encode(gray),
      "cmyk_jpeg": _encode(rgb, mode="CMYK"),
      "png": _encode(rgb, "PNG"),
      "rgba_png": _encode(rgb, "PNG", mode="RGBA"),
      "palette_png": _encode(rgb, "PNG", mode="P"),
      "gray_png": _encode(gray, "PNG"),
  }
  for name, data in cases.items():
    image = transforms.decode(data, 256)
    assert image.shape == (30, 40, 3) and image.dtype == np.uint8, name
    out = transforms.transform_record({"image": data}, SMALL_EVAL)
    assert out.shape == (16, 16, 3), name
  np.testing.assert_array_equal(transforms.decode(cases["png"]), rgb)  # lossless
  g = transforms.decode(cases["gray_png"])
  assert np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 0], gray)
  g = transforms.decode(cases["gray_jpeg"])
  assert np.array_equal(g[..., 0], g[..., 2]) and np.abs(g[..., 0] - gray.astype(int)).max() < 12
  assert np.abs(transforms.decode(cases["cmyk_jpeg"]).astype(int) - rgb).mean() < 8


def test_bbox_crop(resizer):
  image = np.zeros((60, 80, 3), np.uint8)
  image[:, :40] = (255, 0, 0)
  image[10:50, 45:75] = (0, 0, 255)     # the object: x 45..75, y 10..50
  record = {"image": _encode(image, "PNG"), "bbox": np.array([45, 10, 75, 50], np.float32)}
  for cfg in (SMALL_EVAL.replace(crop_to_bbox=True), SMALL_TRAIN.replace(crop_to_bbox=True)):
    out = transforms.transform_record(record, cfg, transforms.augment_rng(0, 0, 0))
    assert out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out, np.broadcast_to([0, 0, 255], out.shape))
  kind_none = transforms.transform_record(record, TransformConfig(crop_to_bbox=True))
  assert kind_none.shape == (40, 30, 3)
  # Out-of-range and fractional boxes are clamped to whole pixels inside the image.
  assert transforms.bbox_region([-5.5, 2.2, 99.0, 7.9], (1.0, 1.0), 60, 80) == (0, 2, 80, 8)
  with pytest.raises(ValueError, match="bbox"):
    transforms.transform_record({"image": record["image"]}, SMALL_EVAL.replace(crop_to_bbox=True))


# ============================================================================= loaders


def _take(loader, count):
  return [next(loader) for _ in range(count)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for (sa, ia, xa), (sb, ib, xb) in zip(a, b):
    assert sa == sb
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(xa, xb)


def test_resumed_loader_gives_identical_batches(source):
  full = _take(BatchLoader(source, SMALL_TRAIN, 3, _indices_fn), 6)
  assert [s for s, _, _ in full] == list(range(6))
  assert full[0][1].shape == (4, 16, 16, 3) and full[0][1].dtype == np.uint8
  np.testing.assert_array_equal(full[2][2], _indices_fn(2))
  assert not np.array_equal(full[0][1], full[2][1])
  _assert_same(_take(BatchLoader(source, SMALL_TRAIN, 3, _indices_fn, start_step=3), 3), full[3:])
  first = BatchLoader(source, SMALL_TRAIN, 3, _indices_fn)
  _take(first, 2)
  state = json.loads(json.dumps(first.get_state()))
  assert state["next_step"] == 2
  resumed = BatchLoader(source, SMALL_TRAIN, 3, _indices_fn)
  resumed.set_state(state)
  _assert_same(_take(resumed, 4), full[2:])
  with pytest.raises(ValueError, match="seed"):
    BatchLoader(source, SMALL_TRAIN, 4, _indices_fn).set_state(state)
  other_seed = next(BatchLoader(source, SMALL_TRAIN, 4, _indices_fn))
  assert not np.array_equal(other_seed[1], full[0][1])
  finite = BatchLoader(source, SMALL_TRAIN, 3, _indices_fn, start_step=4, num_steps=2)
  _assert_same(list(finite), full[4:6])


def test_process_slices_tile_the_global_batch(source):
  labels = np.arange(10) // 2
  sampler = MPerClassSampler(labels, m=2, batch_size=4, seed=0)
  one = BatchLoader(source, SMALL_TRAIN, 5, functools.partial(sampler.batch, process_index=0,
                                                              process_count=1))
  parts = [BatchLoader(source, SMALL_TRAIN, 5, functools.partial(
      sampler.batch, process_index=i, process_count=2), process_index=i, process_count=2)
           for i in range(2)]
  for _ in range(3):
    step, images, indices = next(one)
    (s0, im0, ix0), (s1, im1, ix1) = next(parts[0]), next(parts[1])
    assert s0 == s1 == step and len(ix0) == len(ix1) == 2
    assert not set(ix0) & set(ix1)
    np.testing.assert_array_equal(np.concatenate([ix0, ix1]), indices)
    np.testing.assert_array_equal(np.concatenate([im0, im1]), images)
    # The synchronous path: same randomness for the same (step, indices), here or in threads.
    np.testing.assert_array_equal(parts[1].load(step, ix1), im1)
    np.testing.assert_array_equal(one.load(step, indices), images)
  threaded = BatchLoader(source, SMALL_TRAIN, 5, _indices_fn, num_workers=2)
  with threaded:
    np.testing.assert_array_equal(threaded.load(4, _indices_fn(4)), one.load(4, _indices_fn(4)))


def test_eval_batches_padding_and_slices(source):
  n, batch = len(source), 4
  expect = np.stack([transforms.transform_record(source[i], SMALL_EVAL) for i in range(n)])
  batches = eval_batches(source, SMALL_EVAL, batch)
  assert len(batches) == 3
  got = list(batches)
  assert [v for _, v in got] == [4, 4, 2]
  np.testing.assert_array_equal(np.concatenate([im for im, _ in got])[:n], expect)
  np.testing.assert_array_equal(got[-1][0][2:], expect[[8, 8]])   # padded with the first index
  for i in range(2):
    local = list(eval_batches(source, SMALL_EVAL, batch, process_index=i, process_count=2))
    for (im, v), (full, fv) in zip(local, got):
      assert v == fv and len(im) == 2
      np.testing.assert_array_equal(im, full[2 * i:2 * i + 2])
  with pytest.raises(ValueError, match="not divisible by process_count"):
    eval_batches(source, SMALL_EVAL, 5, process_count=2)


def test_numpy_sources_fast_path():
  images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 1), dtype=np.uint8)
  loader = BatchLoader(images, None, 0, _indices_fn, num_workers=4)  # no workers are started
  step, batch, indices = next(loader)
  assert step == 0 and not loader._holder
  np.testing.assert_array_equal(batch, images[indices])
  got = list(eval_batches(images, {"kind": "none"}, 4, process_index=1, process_count=2,
                          num_workers=2))
  assert [v for _, v in got] == [4, 4, 2]
  np.testing.assert_array_equal(got[0][0], images[2:4])
  np.testing.assert_array_equal(got[2][0], images[[8, 8]])
  # Arrays can also be augmented (no decoding): channels are kept.
  aug = next(BatchLoader(images, SMALL_TRAIN, 0, _indices_fn))[1]
  assert aug.shape == (4, 16, 16, 1)
  with pytest.raises(ValueError, match="uint8"):
    BatchLoader(images.astype(np.float32), SMALL_TRAIN, 0, _indices_fn)


def test_worker_processes_match_in_process(source):
  """The only test with worker processes (spawning them costs seconds)."""
  def children():  # ignoring any child process this test did not start
    return {p.pid for p in multiprocessing.active_children()} - before

  before = {p.pid for p in multiprocessing.active_children()}
  reference = _take(BatchLoader(source, SMALL_TRAIN, 9, _indices_fn, start_step=2), 5)
  eval_ref = list(eval_batches(source, SMALL_EVAL, 4))
  with BatchLoader(source, SMALL_TRAIN, 9, _indices_fn, start_step=2, num_workers=2,
                   prefetch=3) as loader:
    _assert_same(_take(loader, 3), reference[:3])
    assert loader.get_state() == {"next_step": 5, "seed": 9}
    loader.set_state({"next_step": 3, "seed": 9})  # restarts the workers at step 3
    _assert_same(_take(loader, 4), reference[1:])
    assert len(children()) == 2
  assert id(loader._holder) not in pipeline._OPEN and not children()
  with eval_batches(source, SMALL_EVAL, 4, num_workers=2, prefetch=2) as batches:
    passes = [list(batches)]
    workers = children()
    passes.append(list(batches))  # persistent workers: the same processes serve the next pass
    assert children() == workers and len(workers) == 2
    it = iter(batches)            # all batches taken, the generator never asked for the end
    passes.append([next(it) for _ in range(len(batches))])
    del it
    assert children() == workers
    next(iter(batches))           # an abandoned pass: the next one starts over
    passes.append(list(batches))
  for got in passes:
    assert [v for _, v in got] == [4, 4, 2]
    for (a, va), (b, vb) in zip(got, eval_ref):
      assert va == vb
      np.testing.assert_array_equal(a, b)
  assert id(batches._holder) not in pipeline._OPEN and not children()


def test_stale_hold_boards_are_removed(tmp_path):
  """A run killed with SIGKILL leaves its HoldBoard folder behind; the next board removes the
  folders of processes that have ended and leaves live ones and other files alone."""
  import subprocess  # pylint: disable=g-import-not-at-top
  from dmljax.data import pipeline  # pylint: disable=g-import-not-at-top
  ended = subprocess.Popen([sys.executable, "-c", "pass"])
  ended.wait()
  dead = tmp_path / f"dmljax-holds-{ended.pid}-abc"
  live = tmp_path / f"dmljax-holds-{os.getppid()}-def"
  mine = tmp_path / f"dmljax-holds-{os.getpid()}-ghi"
  other = tmp_path / "dmljax-holds-notapid"
  for d in (dead, live, mine, other):
    d.mkdir()
  (dead / "hold-3.npy").write_bytes(b"x")
  assert pipeline.remove_stale_boards(str(tmp_path)) == [str(dead)]
  assert not dead.exists() and live.is_dir() and mine.is_dir() and other.is_dir()
  board = pipeline.HoldBoard()
  try:
    assert os.path.basename(board.directory).startswith(f"dmljax-holds-{os.getpid()}-")
  finally:
    board.close()
  assert not os.path.exists(board.directory)
