"""Embed a folder (or a list) of images with an exported model.

``python -m dmljax.embed MODEL IMAGES_DIR|FILE_LIST --out EMB.npz`` reads every image under
IMAGES_DIR (recursively; ``.jpg .jpeg .png .bmp .gif .webp .tif .tiff .ppm .pgm``, in sorted path
order) or each path of FILE_LIST (a text file, one path a line; relative paths are relative to
the list's folder), decodes and brings it to the model's input (:meth:`dmljax.export.Model.prepare`:
the decode and resampling of :mod:`dmljax.data.transforms`, the exported eval transform, then
channels and size) in :func:`dmljax.data.pipeline.load_batch` on a few threads, and embeds it in
the model's fixed-size batches, a batch at a time (memory does not grow with the number of
images), with a progress line on stderr.

``EMB.npz`` holds

* ``embeddings`` ``[N, D]`` float32;
* ``paths`` ``[N]``: each image's path relative to IMAGES_DIR (or as the list gives it), keeping
  the class sub-folder (``digit_5/12.png``);
* ``labels`` ``[N]`` int64 and ``class_names`` ``[C]`` when every image lies in a sub-folder:
  the sub-folder (the first component of the path) is its class, numbered in sorted name order;
* ``fingerprint``: the model's (an index refuses embeddings of another model), ``model``: the
  model's directory, ``root``: IMAGES_DIR (or the list's folder), absolute, so that galleries
  find the images.

``python -m dmljax.evaluate EMB.npz`` computes its retrieval metrics (it needs the labels), and
``python -m dmljax.search build EMB.npz --out INDEX`` makes it searchable. An image that does not
decode is skipped, counted and named on stderr; the command still succeeds.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import sys
import time
from typing import Optional, Sequence

import numpy as np

from dmljax import cli

PROG = "python -m dmljax.embed"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                    ".pgm")
#: Keys of an embeddings file besides ``embeddings`` / ``labels`` (metadata).
META_KEYS = ("paths", "class_names", "fingerprint", "model", "root")


def list_images(target: str) -> tuple[str, list[str]]:
  """``(root, paths relative to root)`` of a folder's images or of a file list's entries."""
  if os.path.isdir(target):
    root = os.path.abspath(target)
    found = []
    for d, dirs, files in os.walk(root):
      dirs.sort()
      for name in files:
        if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
          found.append(os.path.relpath(os.path.join(d, name), root))
    if not found:
      raise ValueError(f"{target} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    return root, sorted(p.replace(os.sep, "/") for p in found)
  if os.path.isfile(target):
    if target.lower().endswith(IMAGE_EXTENSIONS):
      return os.path.abspath(os.path.dirname(target)), [os.path.basename(target)]
    root = os.path.abspath(os.path.dirname(target))
    with open(target) as f:
      paths = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    if not paths:
      raise ValueError(f"{target}: the file list is empty (one image path a line).")
    return root, paths
  raise ValueError(f"{target}: no such folder or file list.")


def labels_from_paths(paths: Sequence[str]):
  """``(labels int64 [N], class_names)`` from each path's first folder, or ``(None, None)``
  when some image is not in a sub-folder (or a path is absolute)."""
  parts = [p.replace("\\", "/").split("/") for p in paths]
  if not parts or any(len(p) < 2 or os.path.isabs(q) for p, q in zip(parts, paths)):
    return None, None
  names = sorted({p[0] for p in parts})
  index = {n: i for i, n in enumerate(names)}
  return np.asarray([index[p[0]] for p in parts], np.int64), names


class _Files:
  """Record source of the pipeline: image ``i`` read, decoded and brought to the model's input
  (:meth:`dmljax.export.Model.prepare`); one that fails becomes a blank image, and its reason
  is kept in ``failed`` (thread-safe: one dict entry per image)."""

  def __init__(self, model, root, paths):
    self.model, self.root, self.paths = model, root, list(paths)
    self.failed = {}
    self._blank = np.zeros(model.input_shape, np.uint8)

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, i):
    p = self.paths[int(i)]
    try:
      with open(p if os.path.isabs(p) else os.path.join(self.root, p), "rb") as f:
        return self.model.prepare(f.read())
    except Exception as e:  # pylint: disable=broad-except  (any decoder failure: skip the image)
      why = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", cli.message(e))
      self.failed[int(i)] = f"{type(e).__name__}: {why[:120]}"
      return self._blank


def embed_paths(model, root: str, paths: Sequence[str], *, num_threads: Optional[int] = None,
                progress: bool = True) -> dict:
  """Embeds the images ``root/path`` in the model's batches.

  Each batch of ``model.batch_size`` files is decoded by :func:`dmljax.data.pipeline.load_batch`
  (spread over ``num_threads`` threads) and embedded by ``model.embed``; images that do not
  decode are left out.

  Returns:
    ``{"embeddings": [M, D], "paths": the M embedded paths, "skipped": [(path, reason)]}``.
  """
  from dmljax.data import pipeline, transforms  # pylint: disable=g-import-not-at-top
  threads = num_threads or min(8, os.cpu_count() or 1)
  source = _Files(model, root, paths)
  as_is = transforms.TransformConfig(kind="none")  # the source already applied the transform
  b = model.batch_size
  out, kept = [], []
  t0, last = time.time(), 0.0
  with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="dmljax-embed") as pool:
    for lo in range(0, len(paths), b):
      idx = np.arange(lo, min(lo + b, len(paths)))
      images = pipeline.load_batch(source, as_is, idx, executor=pool, num_threads=threads)
      good = np.asarray([i not in source.failed for i in idx], bool)
      if good.any():
        out.append(model.embed(images[good]))
        kept.extend(paths[i] for i in idx[good])
      done = int(idx[-1]) + 1
      now = time.time()
      if progress and (now - last > 2.0 or done == len(paths)):
        last = now
        nbad = len(source.failed)
        print(f"\rembedded {done}/{len(paths)} images ({done / max(now - t0, 1e-9):.0f}/s"
              f"{f', {nbad} skipped' if nbad else ''})", end="", file=sys.stderr, flush=True)
  if progress:
    print(file=sys.stderr)
  emb = np.concatenate(out) if out else np.zeros((0, model.embedding_dim), np.float32)
  skipped = [(paths[i], why) for i, why in sorted(source.failed.items())]
  return {"embeddings": emb, "paths": kept, "skipped": skipped}


def embed_target(model, target: str, *, num_threads: Optional[int] = None,
                 progress: bool = True) -> dict:
  """Embeds a folder or a file list (:func:`list_images`); returns the ``EMB.npz`` arrays
  (see the module docstring) plus ``skipped``."""
  root, paths = list_images(target)
  got = embed_paths(model, root, paths, num_threads=num_threads, progress=progress)
  data = {"embeddings": got["embeddings"], "paths": np.asarray(got["paths"], dtype=str),
          "fingerprint": np.asarray(model.fingerprint), "model": np.asarray(model.path or ""),
          "root": np.asarray(root)}
  labels, names = labels_from_paths(got["paths"])
  if labels is not None:
    data["labels"], data["class_names"] = labels, np.asarray(names, dtype=str)
  data["skipped"] = got["skipped"]
  return data


def save(path: str, data: dict) -> None:
  """Writes the arrays of :func:`embed_target` (not ``skipped``) to ``path`` (``.npz``)."""
  arrays = {k: v for k, v in data.items() if k != "skipped"}
  tmp = f"{path}.tmp.{os.getpid()}.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def report_skipped(prog: str, skipped, limit: int = 10) -> None:
  if not skipped:
    return
  names = "; ".join(f"{p} ({why})" for p, why in skipped[:limit])
  more = f"; and {len(skipped) - limit} more" if len(skipped) > limit else ""
  print(f"{prog}: skipped {len(skipped)} image(s) that do not decode: {names}{more}",
        file=sys.stderr)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog=PROG, description="Embed a folder or a list of images with "
                              "an exported model (python -m dmljax.export).")
  p.add_argument("model", help="exported model directory")
  p.add_argument("images", help="a folder of images (class sub-folders give labels), or a text "
                 "file with one image path a line")
  p.add_argument("--out", required=True, help="the .npz to write")
  p.add_argument("--threads", type=int, default=None, help="decoding threads (default: cores, "
                 "at most 8)")
  p.add_argument("--quiet", action="store_true", help="no progress line")
  p.add_argument("--verbose", action="store_true", help="show tracebacks with error messages")
  return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  a = parse_args(argv)
  from dmljax import export  # pylint: disable=g-import-not-at-top
  model = export.load_model(a.model)
  data = embed_target(model, a.images, num_threads=a.threads, progress=not a.quiet)
  report_skipped(PROG, data["skipped"])
  if len(data["embeddings"]) == 0:
    raise ValueError(f"none of the images of {a.images} decodes; nothing written.")
  save(a.out, data)
  labelled = (f", {len(data['class_names'])} classes from the sub-folders"
              if "labels" in data else ", no labels (images not in class sub-folders)")
  print(f"wrote {a.out}: {len(data['embeddings'])} embeddings of dimension "
        f"{data['embeddings'].shape[1]}{labelled}")
  return data


def run(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run_main(PROG, main, argv)


if __name__ == "__main__":
  sys.exit(run())
