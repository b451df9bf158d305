"""Input-pipeline benchmark: JPEG decode + train augmentation to 227 x 227, ours vs torch.

Run (about a minute on a 2-core CPU)::

    python benchmarks/input_pipeline.py [--workers W] [--images 300] [--batches 20] [--repeats 2]

What is timed, on ``--images`` photo-like JPEGs of about 500 x 400 pixels (smooth colour fields,
random shapes and a little sensor-like noise, quality 90) written to a temporary directory and
read back from their files on every access:

* ours, in this process on one core: ``transforms.decode`` alone, then decode + the train
  transform (shorter side 256, random resized crop 227 with scale 0.16-1, ratio 3/4-4/3, flip)
  through ``pipeline.load_batch``, with the default resizer (``transforms.RESIZER``: OpenCV where
  installed) and with PIL's (what runs without OpenCV); then decode + the eval transform (shorter
  side 256, centre crop 227);
* ours, ``pipeline.BatchLoader`` with ``W`` grain worker processes at batch 32: the end-to-end
  data path alone (no training step), batches consumed as fast as they come;
* the reference, the same operations written the way torchvision performs them (torchvision
  itself is not installed beside torch here, so its transforms are re-implemented with PIL and
  torch's RNG): PIL decode of the whole file (``Image.open(f).convert("RGB")``), torchvision's
  ``RandomResizedCrop(227, scale=(0.16, 1))`` (crop on the full image, then a bilinear resize),
  ``RandomHorizontalFlip()``, ``ToTensor()`` (float32 CHW in [0, 1]); in this process, and in a
  ``torch.utils.data.DataLoader`` with the same ``W`` workers and batch 32; and its eval
  counterpart ``Resize(256)``, ``CenterCrop(227)``, ``ToTensor()`` in this process. Skipped (with a
  note) when torch is not installed.

Rates are images per second; "per core" divides by the number of worker processes (1 in process).
The goal is at least 2x the reference per core.
Worker rates exclude the start-up (the first batch, reported separately). Ours and the reference
alternate ``--repeats`` times and the median is reported, so that both see the same machine load.
The target is the rate a GPU BN-Inception step needs at batch 32: 320 images/s (CCP paper: about
100 ms per step).
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dmljax.data import pipeline, transforms  # noqa: E402

BATCH = 32
TARGET = 320.0  # images/s: one BN-Inception step of batch 32 per ~100 ms


# ============================================================================= data


def _photo(rng, height, width):
  """A photo-like RGB image: smooth colour fields, a few shapes, mild noise."""
  coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
  base = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
  draw = ImageDraw.Draw(base)
  for _ in range(int(rng.integers(3, 8))):
    x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
    x1, y1 = x0 + int(rng.integers(30, width // 2)), y0 + int(rng.integers(30, height // 2))
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
  detail = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
  detail = np.asarray(Image.fromarray(detail).resize((width, height), Image.BILINEAR), np.float32)
  image = 0.8 * np.asarray(base, np.float32) + 0.2 * detail + rng.normal(0, 4, (height, width, 1))
  return np.clip(image, 0, 255).astype(np.uint8)


def make_jpegs(directory, count, seed=0):
  """Writes ``count`` JPEGs to ``directory``; returns (paths, bboxes)."""
  rng = np.random.default_rng(seed)
  paths, boxes = [], []
  for i in range(count):
    w, h = int(rng.integers(450, 551)), int(rng.integers(350, 451))
    if rng.random() < 0.25:
      w, h = h, w  # some portrait images
    path = os.path.join(directory, f"img_{i:04d}.jpg")
    Image.fromarray(_photo(rng, h, w)).save(path, "JPEG", quality=90)
    paths.append(path)
    boxes.append(np.array([0, 0, w, h], np.float32))
  return paths, boxes


class FileSource:
  """Record source reading each JPEG from its file on every access (picklable)."""

  def __init__(self, paths, boxes):
    self.paths, self.boxes = list(paths), list(boxes)

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, i):
    with open(self.paths[i], "rb") as f:
      return {"image": f.read(), "bbox": self.boxes[i]}


class Cycle:
  """Batch indices of a step: consecutive images, wrapping around (picklable, pure)."""

  def __init__(self, num, batch):
    self.num, self.batch = num, batch

  def __call__(self, step):
    return (np.arange(self.batch) + step * self.batch) % self.num


# ============================================================================= reference


def make_reference(paths):
  """The torch Dataset of the reference pipeline (None without torch)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None

  class Reference(torch.utils.data.Dataset):
    """torchvision-equivalent train pipeline: PIL decode, RandomResizedCrop(227), flip, ToTensor."""

    def __init__(self, files, size=227, scale=(0.16, 1.0), ratio=(3 / 4, 4 / 3)):
      self.files, self.size, self.scale, self.ratio = files, size, scale, ratio

    def __len__(self):
      return len(self.files)

    def _crop_params(self, height, width):
      # torchvision's RandomResizedCrop.get_params, with torch's RNG.
      area = height * width
      log_ratio = torch.log(torch.tensor(self.ratio))
      for _ in range(10):
        target_area = area * torch.empty(1).uniform_(*self.scale).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = int(round((target_area * aspect) ** 0.5))
        h = int(round((target_area / aspect) ** 0.5))
        if 0 < w <= width and 0 < h <= height:
          top = torch.randint(0, height - h + 1, size=(1,)).item()
          left = torch.randint(0, width - w + 1, size=(1,)).item()
          return top, left, h, w
      in_ratio = width / height
      if in_ratio < min(self.ratio):
        w, h = width, int(round(width / min(self.ratio)))
      elif in_ratio > max(self.ratio):
        h, w = height, int(round(height * max(self.ratio)))
      else:
        w, h = width, height
      return (height - h) // 2, (width - w) // 2, h, w

    @staticmethod
    def _to_tensor(im):
      array = torch.from_numpy(np.array(im, np.uint8, copy=True))
      return array.permute(2, 0, 1).contiguous().to(torch.float32).div(255)

    def __getitem__(self, i):
      with open(self.files[i], "rb") as f:
        im = Image.open(f).convert("RGB")
      top, left, h, w = self._crop_params(im.height, im.width)
      im = im.crop((left, top, left + w, top + h)).resize((self.size, self.size), Image.BILINEAR)
      if torch.rand(1) < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
      return self._to_tensor(im)

    def eval_item(self, i, resize=256):
      """torchvision's Resize(256) + CenterCrop(227) + ToTensor of file ``i``."""
      with open(self.files[i], "rb") as f:
        im = Image.open(f).convert("RGB")
      if im.width <= im.height:
        w, h = resize, int(resize * im.height / im.width)
      else:
        w, h = int(resize * im.width / im.height), resize
      im = im.resize((w, h), Image.BILINEAR)
      top, left = int(round((h - self.size) / 2)), int(round((w - self.size) / 2))
      return self._to_tensor(im.crop((left, top, left + self.size, top + self.size)))

  return Reference(paths)


# ============================================================================= timings


def time_decode(source, count):
  t = time.perf_counter()
  for i in range(count):
    transforms.decode(source[i % len(source)]["image"], 256)
  return count / (time.perf_counter() - t)


def time_pil_decode(source, count):
  t = time.perf_counter()
  for i in range(count):
    np.asarray(Image.open(io.BytesIO(source[i % len(source)]["image"])).convert("RGB"))
  return count / (time.perf_counter() - t)


def time_ours_inprocess(source, cfg, batches):
  fn = Cycle(len(source), BATCH)
  t = time.perf_counter()
  for step in range(batches):
    pipeline.load_batch(source, cfg, fn(step), seed=0, step=step)
  return batches * BATCH / (time.perf_counter() - t)


def time_ours_workers(source, cfg, workers, batches):
  """(steady images/s, start-up seconds) of BatchLoader with ``workers`` processes."""
  t0 = time.perf_counter()
  with pipeline.BatchLoader(source, cfg, 0, Cycle(len(source), BATCH), num_workers=workers,
                            prefetch=2 * workers) as loader:
    next(loader)
    t1 = time.perf_counter()
    for _ in range(batches):
      _, images, _ = next(loader)
      assert images.shape == (BATCH, 227, 227, 3)
    t2 = time.perf_counter()
  return batches * BATCH / (t2 - t1), t1 - t0


def time_ref_inprocess(ref, batches, evaluation=False):
  fn = Cycle(len(ref), BATCH)
  item = ref.eval_item if evaluation else ref.__getitem__
  t = time.perf_counter()
  for step in range(batches):
    for i in fn(step):
      item(int(i))
  return batches * BATCH / (time.perf_counter() - t)


def time_ref_workers(ref, workers, batches):
  import torch  # pylint: disable=g-import-not-at-top
  fn = Cycle(len(ref), BATCH)
  sampler = [fn(step).tolist() for step in range(batches + 1)]
  t0 = time.perf_counter()
  loader = torch.utils.data.DataLoader(ref, batch_sampler=sampler, num_workers=workers,
                                       prefetch_factor=2 if workers else None)
  it = iter(loader)
  next(it)
  t1 = time.perf_counter()
  for images in it:
    assert images.shape == (BATCH, 3, 227, 227)
  t2 = time.perf_counter()
  del it
  return batches * BATCH / (t2 - t1), t1 - t0


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                      help="worker processes for both loaders (default: the usable cores)")
  parser.add_argument("--images", type=int, default=300, help="JPEGs generated")
  parser.add_argument("--batches", type=int, default=20, help="timed batches of 32 per run")
  parser.add_argument("--repeats", type=int, default=2, help="alternating runs (median)")
  args = parser.parse_args(argv)

  ref_torch = None
  try:
    import torch  # pylint: disable=g-import-not-at-top
    ref_torch = torch.__version__
    torch.set_num_threads(1)
  except ImportError:
    pass
  import grain  # pylint: disable=g-import-not-at-top
  import PIL  # pylint: disable=g-import-not-at-top
  cfg = transforms.TransformConfig(kind="train")
  eval_cfg = transforms.TransformConfig(kind="eval")
  opencv = transforms.cv2.__version__ if transforms.cv2 is not None else "not installed"
  with tempfile.TemporaryDirectory() as tmp:
    t = time.perf_counter()
    paths, boxes = make_jpegs(tmp, args.images)
    source = FileSource(paths, boxes)
    sizes = [os.path.getsize(p) for p in paths]
    print(f"{args.images} JPEGs ~500x400 (quality 90, mean {np.mean(sizes) / 1024:.0f} KiB) "
          f"made in {time.perf_counter() - t:.1f} s; {os.cpu_count()} CPUs, {args.workers} "
          f"workers; decoder {transforms.DECODER}, resizer {transforms.RESIZER}; grain "
          f"{grain.__version__}, Pillow {PIL.__version__}, OpenCV {opencv}, torch "
          f"{ref_torch or 'not installed'}", flush=True)
    ref = make_reference(paths)
    if ref is None:
      print("torch is not installed: the reference rows are skipped "
            "(pip install torch for the comparison).")
    count = min(args.images, args.batches * BATCH)
    rows = {k: [] for k in ("dec", "dec_pil", "ours1", "ours1_pil", "ref1", "eval1", "eval_ref1",
                            "oursW", "refW")}
    startup = {"oursW": [], "refW": []}
    for r in range(args.repeats):
      rows["dec"].append(time_decode(source, count))
      rows["dec_pil"].append(time_pil_decode(source, count))
      rows["ours1"].append(time_ours_inprocess(source, cfg, args.batches))
      if transforms.RESIZER != "pil":
        rows["ours1_pil"].append(time_ours_inprocess(source, cfg.replace(resizer="pil"),
                                                     args.batches))
      if ref is not None:
        rows["ref1"].append(time_ref_inprocess(ref, args.batches))
      rows["eval1"].append(time_ours_inprocess(source, eval_cfg, args.batches))
      if ref is not None:
        rows["eval_ref1"].append(time_ref_inprocess(ref, args.batches, evaluation=True))
      rate, start = time_ours_workers(source, cfg, args.workers, args.batches)
      rows["oursW"].append(rate)
      startup["oursW"].append(start)
      if ref is not None:
        rate, start = time_ref_workers(ref, args.workers, args.batches)
        rows["refW"].append(rate)
        startup["refW"].append(start)
      print(f"  repeat {r + 1}/{args.repeats} done", flush=True)

  med = {k: statistics.median(v) if v else None for k, v in rows.items()}
  w = args.workers
  table = [
      ("decode only, ours (" + transforms.DECODER + ", DCT-scaled to >= 256)", "1 (in process)",
       med["dec"], 1, None),
      ("decode only, PIL full size (reference decode)", "1 (in process)", med["dec_pil"], 1, None),
      (f"decode + train aug 227, ours (load_batch, resizer {transforms.RESIZER})", "1 (in process)",
       med["ours1"], 1, None),
      ("decode + train aug 227, ours (load_batch, resizer pil: no OpenCV)", "1 (in process)",
       med["ours1_pil"], 1, None),
      ("decode + train aug 227, reference (PIL + torchvision-style + ToTensor)", "1 (in process)",
       med["ref1"], 1, None),
      (f"decode + eval 256 / centre 227, ours (load_batch, resizer {transforms.RESIZER})",
       "1 (in process)", med["eval1"], 1, None),
      ("decode + eval 256 / centre 227, reference (PIL + torchvision-style + ToTensor)",
       "1 (in process)", med["eval_ref1"], 1, None),
      (f"end-to-end data path, ours: BatchLoader (grain mp_prefetch), batch {BATCH}", str(w),
       med["oursW"], w, statistics.median(startup["oursW"])),
      (f"end-to-end data path, reference: torch DataLoader, batch {BATCH}", str(w), med["refW"], w,
       statistics.median(startup["refW"]) if startup["refW"] else None),
  ]
  print()
  print("| pipeline | workers | images/s | images/s per core | start-up s |")
  print("| --- | --- | --- | --- | --- |")
  for name, workers, rate, cores, start in table:
    if rate is None:
      why = "same as the row above" if "resizer pil" in name else "skipped (no torch)"
      print(f"| {name} | {workers} | {why} | | |")
      continue
    start_s = f"{start:.2f}" if start is not None else ""
    print(f"| {name} | {workers} | {rate:.0f} | {rate / cores:.0f} | {start_s} |")
  print()
  ours_w = med["oursW"]
  print(f"Target: a GPU BN-Inception step at batch {BATCH} takes ~100 ms (CCP paper) -> "
        f"{TARGET:.0f} images/s. Ours with {w} workers: {ours_w:.0f} images/s = "
        f"{ours_w / TARGET:.2f}x the target; at {med['ours1']:.0f} images/s per core the target "
        f"needs ~{TARGET / med['ours1']:.1f} cores.")
  if med["refW"]:
    ratios = (med["ours1"] / med["ref1"], med["eval1"] / med["eval_ref1"], ours_w / med["refW"])
    print(f"Ours vs reference per core (goal >= 2x): train {ratios[0]:.2f}x, eval {ratios[1]:.2f}x "
          f"in process; {ratios[2]:.2f}x end to end with {w} workers"
          + (f"; train with the PIL resizer {med['ours1_pil'] / med['ref1']:.2f}x."
             if med["ours1_pil"] else "."))
  print("Reference: torchvision's transforms re-implemented with PIL + torch RNG (torchvision is "
        "not installed beside torch here), inside torch.utils.data.DataLoader with the same "
        "number of workers; its batches are float32 CHW tensors (ToTensor), ours uint8 HWC "
        "(normalised on device). Resizer cv2: OpenCV's bilinear interpolation with a Gaussian "
        "prefilter on reduced axes (within ~0.4 grey levels of PIL's antialiased bilinear on "
        "average); pil: PIL's, exactly torchvision's.")


if __name__ == "__main__":
  main()
