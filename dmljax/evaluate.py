"""Evaluate saved embeddings: ``python -m dmljax.evaluate FILE.npz [--out metrics.json] ...``.

The ``.npz`` file (``np.savez(path, embeddings=..., labels=...)``) holds:

* ``embeddings``: ``[N, D]`` float (float32, float16 or bfloat16 saved as float32), the queries;
* ``labels``: ``[N]`` integer class ids;
* optional ``gallery_embeddings`` ``[M, D]`` and ``gallery_labels`` ``[M]``: query/gallery mode
  (In-shop); without them every embedding is queried against all the others (CUB, Cars, SOP);
* optional metadata, as ``python -m dmljax.embed`` writes it: ``paths``, ``class_names``,
  ``fingerprint``, ``model``, ``root`` (with ``--gallery`` the retrievals of some queries are
  drawn from the images at ``root/paths``).

Prints a table and, with ``--out``, writes the metrics as JSON. Examples::

    python -m dmljax.evaluate test_embeddings.npz --recall_ks 1,2,4,8 --out metrics.json
    python -m dmljax.evaluate sop.npz --recall_ks 1,10,100,1000 --ndcg_ks 10,100 --no_clustering
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

import numpy as np

from dmljax import cli
from dmljax import metrics
from dmljax.kernels import knn as knn_lib

KEYS = ("embeddings", "labels", "gallery_embeddings", "gallery_labels")
#: Metadata that ``python -m dmljax.embed`` writes beside them (read by the gallery, else ignored).
META_KEYS = ("paths", "class_names", "fingerprint", "model", "root")


def _ints(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in text.split(",") if v.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m dmljax.evaluate",
                              description="Retrieval and clustering metrics of saved embeddings.")
  p.add_argument("file", help=f".npz with keys {', '.join(KEYS)} (gallery optional)")
  p.add_argument("--out", default=None, help="write the metrics to this JSON file")
  p.add_argument("--recall_ks", type=_ints, default=(1, 2, 4, 8))
  p.add_argument("--ndcg_ks", type=_ints, default=())
  p.add_argument("--map_ks", type=_ints, default=())
  p.add_argument("--no_clustering", action="store_true",
                 help="skip k-means NMI/F1 (slow for many classes)")
  p.add_argument("--geometry", action="store_true", help="also report the class covering radius")
  p.add_argument("--seed", type=int, default=0, help="k-means++ seed (and the gallery's queries)")
  p.add_argument("--gallery", default=None, metavar="OUT",
                 help="also draw sampled queries' retrievals to OUT.png and OUT.html (needs the "
                 "paths that python -m dmljax.embed stores)")
  p.add_argument("--verbose", action="store_true", help="show tracebacks with error messages")
  return p.parse_args(argv)


def load(path: str) -> dict[str, np.ndarray]:
  """Reads the documented keys; ValueError naming missing or unknown ones."""
  try:
    with np.load(path) as f:
      data = {k: f[k] for k in f.files}
  except FileNotFoundError:
    raise ValueError(f"{path}: no such file; give the .npz written with np.savez(path, "
                     "embeddings=..., labels=...).") from None
  except (OSError, ValueError, EOFError) as e:  # EOFError: an empty or truncated file
    raise ValueError(f"{path} is not a readable .npz file ({cli.message(e)}); save it with "
                     "np.savez(path, embeddings=..., labels=...).") from None
  missing = [k for k in ("embeddings", "labels") if k not in data]
  if missing:
    raise ValueError(f"{path} lacks key(s) {missing}; save with np.savez(path, embeddings=..., "
                     f"labels=...[, gallery_embeddings=..., gallery_labels=...]). "
                     f"Found: {sorted(data)}.")
  unknown = sorted(set(data) - set(KEYS) - set(META_KEYS))
  if unknown:
    raise ValueError(f"{path} has unknown key(s) {unknown}; expected {list(KEYS)}.")
  return data


def evaluate(data: dict[str, np.ndarray], *, recall_ks=(1, 2, 4, 8), ndcg_ks=(), map_ks=(),
             clustering: bool = True, geometry: bool = False, seed: int = 0) -> dict:
  """All metrics of one set of embeddings (see the module docstring for the keys)."""
  out = metrics.retrieval_metrics(
      data["embeddings"], data["labels"], gallery_embeddings=data.get("gallery_embeddings"),
      gallery_labels=data.get("gallery_labels"), recall_ks=recall_ks, ndcg_ks=ndcg_ks,
      map_ks=map_ks)
  if clustering:
    out.update(metrics.clustering_metrics(data["embeddings"], data["labels"], seed=seed))
  if geometry:
    out["class_covering_radius"] = metrics.class_covering_radius(data["embeddings"],
                                                                 data["labels"])
  return out


def format_table(results: dict) -> str:
  width = max(len(k) for k in results)
  lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
  for k, v in results.items():
    value = f"{v:d}" if isinstance(v, (int, np.integer)) else f"{100 * v:.2f}%" \
        if k not in ("class_covering_radius",) else f"{v:.4f}"
    lines.append(f"{k:<{width}}  {value}")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  """Command-line entry point; returns the metrics dict (so tests can call it in-process)."""
  a = parse_args(argv)
  # One XLA device per CPU core: the kNN's selections then run in parallel (no-op once JAX runs).
  knn_lib.use_cpu_cores_as_devices()
  data = load(a.file)
  results = evaluate(data, recall_ks=a.recall_ks, ndcg_ks=a.ndcg_ks, map_ks=a.map_ks,
                     clustering=not a.no_clustering, geometry=a.geometry, seed=a.seed)
  print(format_table(results))
  if a.gallery:
    from dmljax import gallery  # pylint: disable=g-import-not-at-top
    png, html = gallery.from_embeddings_file(data, a.gallery, seed=a.seed)
    print(f"wrote {png} and {html}")
  if a.out:
    with open(a.out, "w") as f:
      json.dump(results, f, indent=1)
    print(f"wrote {a.out}")
  return results


def run(argv: Optional[Sequence[str]] = None) -> int:
  """``main`` with errors as one message (exit status 2) instead of a traceback."""
  return cli.run_main("python -m dmljax.evaluate", main, argv)


if __name__ == "__main__":
  sys.exit(run())
