"""A retrieval index over embeddings: build it, save it, query it (exact kNN, bounded memory).

Command line::

    python -m dmljax.search build EMB.npz --out INDEX
    python -m dmljax.search query INDEX IMAGE|EMB.npz -k 10 [--model MODEL] [--json]
        [--gallery OUT]

``build`` stores the embeddings of ``python -m dmljax.embed`` (with their paths, labels, class
names and the model's fingerprint) as a folder: ``index.json`` and ``.npy`` arrays, the
embeddings memory-mapped on load. ``query`` finds the ``k`` nearest gallery rows of each query:
every row of a queries ``.npz`` (a query that is also in the gallery may find itself), or an
image file, which is embedded first by the model (``--model``, else the one the index records).
Queries embedded by another model than the index's are refused (their fingerprints differ), as
are queries of another dimension. With ``--json`` the whole output is one JSON document::

    [{"query": PATH, "neighbors": [{"path": PATH, "distance": D, "label": L}, ...]}, ...]

with paths as stored in the embeddings files (null where a file has none), ``D`` the squared
Euclidean distance and ``L`` the integer label (null without labels). ``--gallery OUT`` also
draws the retrievals of the first queries (``OUT.png``, ``OUT.html``; :mod:`dmljax.gallery`).

Python::

    index = Index.from_embeddings("gallery.npz")     # or Index(dim).add(embeddings, labels, paths)
    result = index.search(queries, k=10)             # .distances, .indices  [Q, k]
    index.save("INDEX"); index = Index.load("INDEX")

The search is :func:`dmljax.kernels.knn.knn` (exact, blocked: no query x gallery matrix; on CPU
the compiled selection), called on ``query_chunk`` queries at a time, so memory is the gallery's
own (stored and augmented) plus a fixed working set: benchmarks/search.py measures a 605,020 x 128
gallery (ten times SOP) queried 6,000 at a time at k = 10 (docs/use_a_model.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import NamedTuple, Optional, Sequence

import numpy as np

from dmljax import cli

PROG = "python -m dmljax.search"
INDEX_FILE = "index.json"
#: Queries handed to the kNN per call (its memory does not grow with them beyond [chunk, D]).
QUERY_CHUNK = 8192


class SearchResult(NamedTuple):
  """``distances`` ``[Q, k]`` float32 squared Euclidean, nearest first; ``indices`` ``[Q, k]``
  int64 rows of the index."""
  distances: np.ndarray
  indices: np.ndarray


def _opt_str(value) -> Optional[str]:
  if value is None:
    return None
  value = str(np.asarray(value)) if not isinstance(value, str) else value
  return value or None


class Index:
  """Embeddings (with optional labels and paths) searched by exact kNN.

  Args:
    dim: the embedding dimension (None: taken from the first :meth:`add`).
    fingerprint: the model's fingerprint (queries of another model are refused).
    model: the exported model's directory (to embed image queries), optional.
    root: the folder the paths are relative to, optional.
    class_names: names of the integer labels, optional.
  """

  def __init__(self, dim: Optional[int] = None, *, fingerprint: Optional[str] = None,
               model: Optional[str] = None, root: Optional[str] = None, class_names=None):
    self.dim, self.fingerprint, self.model, self.root = dim, fingerprint, model, root
    self.class_names = None if class_names is None else [str(c) for c in class_names]
    self._chunks, self._labels, self._paths = [], [], []
    self._emb = None

  # ----------------------------------------------------------------------------- content

  def add(self, embeddings, labels=None, paths=None) -> "Index":
    """Appends ``[N, D]`` embeddings (and, for all or none of them, labels and paths)."""
    from dmljax.kernels import knn as knn_lib  # pylint: disable=g-import-not-at-top
    emb = knn_lib.prepare_embeddings(embeddings, "embeddings")
    if self.dim is None:
      self.dim = emb.shape[1]
    if emb.shape[1] != self.dim:
      raise ValueError(f"embeddings of dimension {emb.shape[1]} cannot join an index of "
                       f"dimension {self.dim}; embed them with the index's model.")
    n = len(emb)
    for name, value, store in (("labels", labels, self._labels), ("paths", paths, self._paths)):
      if len(self) and bool(store) != (value is not None):
        raise ValueError(f"{name} must be given for all additions to an index or for none.")
      if value is not None:
        value = np.asarray(value)
        if len(value) != n:
          raise ValueError(f"{n} embeddings but {len(value)} {name}.")
        store.append(value.astype(np.int64) if name == "labels" else value.astype(str))
    self._chunks.append(emb)
    self._emb = None
    return self

  def __len__(self) -> int:
    return sum(len(c) for c in self._chunks)

  @property
  def embeddings(self) -> np.ndarray:
    if self._emb is None:
      self._emb = (self._chunks[0] if len(self._chunks) == 1 else
                   np.concatenate(self._chunks) if self._chunks else
                   np.zeros((0, self.dim or 0), np.float32))
      self._chunks = [self._emb] if len(self._emb) else []
    return self._emb

  @property
  def labels(self) -> Optional[np.ndarray]:
    return np.concatenate(self._labels) if self._labels else None

  @property
  def paths(self) -> Optional[np.ndarray]:
    return np.concatenate(self._paths) if self._paths else None

  # ----------------------------------------------------------------------------- search

  def check_queries(self, queries, fingerprint: Optional[str] = None) -> np.ndarray:
    """The queries as checked float32 ``[Q, D]``; ValueError for another dimension or model."""
    from dmljax.kernels import knn as knn_lib  # pylint: disable=g-import-not-at-top
    q = np.asarray(queries)
    if q.ndim == 1:
      q = q[None]
    if q.ndim != 2 or q.shape[1] != self.dim:
      raise ValueError(f"queries have dimension {q.shape[-1] if q.ndim else '?'} (shape "
                       f"{q.shape}) but the index has dimension {self.dim}; embed the queries "
                       "with the model that built the index.")
    if fingerprint and self.fingerprint and fingerprint != self.fingerprint:
      raise ValueError(f"the queries come from model {fingerprint}, the index from model "
                       f"{self.fingerprint} (fingerprints differ); embed queries and gallery with "
                       "the same exported model, or rebuild the index.")
    return knn_lib.prepare_embeddings(q, "queries")

  def search(self, queries, k: int = 10, *, fingerprint: Optional[str] = None,
             query_chunk: int = QUERY_CHUNK, mesh=None) -> SearchResult:
    """The ``k`` nearest index rows of every query (ties: smaller row first)."""
    from dmljax.kernels import knn as knn_lib  # pylint: disable=g-import-not-at-top
    q = self.check_queries(queries, fingerprint)
    if len(self) == 0:
      raise ValueError("the index is empty; add embeddings first.")
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= len(self):
      raise ValueError(f"k must be between 1 and the index size {len(self)}, got {k!r}.")
    gallery = self.embeddings
    dist = np.empty((len(q), k), np.float32)
    idx = np.empty((len(q), k), np.int64)
    for lo in range(0, len(q), query_chunk):
      r = knn_lib.knn(q[lo:lo + query_chunk], gallery, k=int(k), mesh=mesh)
      dist[lo:lo + len(r.indices)], idx[lo:lo + len(r.indices)] = r.distances, r.indices
    return SearchResult(dist, idx)

  # ----------------------------------------------------------------------------- files

  @classmethod
  def from_embeddings(cls, path: str) -> "Index":
    """An index of an ``EMB.npz`` (``python -m dmljax.embed``, or any file with ``embeddings``)."""
    data = load_embeddings(path)
    index = cls(data["embeddings"].shape[1], fingerprint=_opt_str(data.get("fingerprint")),
                model=_opt_str(data.get("model")), root=_opt_str(data.get("root")),
                class_names=data.get("class_names"))
    return index.add(data["embeddings"], data.get("labels"), data.get("paths"))

  def save(self, path: str) -> str:
    """Writes the index folder ``path`` (``index.json`` + ``.npy`` arrays); returns it."""
    os.makedirs(path, exist_ok=True)
    arrays = {"embeddings": self.embeddings, "labels": self.labels, "paths": self.paths}
    for name, value in arrays.items():
      target = os.path.join(path, f"{name}.npy")
      if value is None:
        if os.path.exists(target):
          os.remove(target)
        continue
      tmp = os.path.join(path, f".{name}.tmp.{os.getpid()}.npy")
      np.save(tmp, value)
      os.replace(tmp, target)
    meta = {"format_version": 1, "size": len(self), "dim": self.dim,
            "fingerprint": self.fingerprint, "model": self.model, "root": self.root,
            "class_names": self.class_names}
    tmp = os.path.join(path, f".{INDEX_FILE}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
      json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(path, INDEX_FILE))
    return path

  @classmethod
  def load(cls, path: str) -> "Index":
    """Reads an index folder (embeddings memory-mapped)."""
    meta_path = os.path.join(path, INDEX_FILE)
    if not os.path.isfile(meta_path):
      raise ValueError(f"{path} is not a dmljax index (no {INDEX_FILE}); build one with "
                       f"{PROG} build EMB.npz --out {path}.")
    with open(meta_path) as f:
      meta = json.load(f)
    index = cls(meta["dim"], fingerprint=meta.get("fingerprint"), model=meta.get("model"),
                root=meta.get("root"), class_names=meta.get("class_names"))
    emb = np.load(os.path.join(path, "embeddings.npy"), mmap_mode="r")
    if emb.shape != (meta["size"], meta["dim"]):
      raise ValueError(f"{path}: embeddings.npy has shape {emb.shape}, index.json says "
                       f"{(meta['size'], meta['dim'])}; build the index again.")
    # pylint: disable=protected-access
    index._chunks, index._emb = [emb], emb
    for name, store in (("labels", index._labels), ("paths", index._paths)):
      p = os.path.join(path, f"{name}.npy")
      if os.path.exists(p):
        store.append(np.load(p))
    return index


def load_embeddings(path: str) -> dict:
  """The arrays of an embeddings ``.npz`` (at least ``embeddings``)."""
  try:
    with np.load(path) as f:
      data = {k: f[k] for k in f.files}
  except FileNotFoundError:
    raise ValueError(f"{path}: no such file; write one with python -m dmljax.embed.") from None
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} is not a readable .npz file ({cli.message(e)}).") from None
  if "embeddings" not in data:
    raise ValueError(f"{path} has no `embeddings` array (keys: {sorted(data)}); write it with "
                     "python -m dmljax.embed.")
  return data


# ============================================================================= command line


def _queries(a, index: Index) -> dict:
  """``{"embeddings", "paths", "labels", "fingerprint", "root"}`` of the query argument."""
  if a.query.endswith(".npz"):
    data = load_embeddings(a.query)
    n = len(data["embeddings"])
    return {"embeddings": data["embeddings"], "labels": data.get("labels"),
            "paths": list(data["paths"]) if "paths" in data else [None] * n,
            "fingerprint": _opt_str(data.get("fingerprint")), "root": _opt_str(data.get("root"))}
  model_path = a.model or index.model
  if not model_path:
    raise ValueError(f"querying the image {a.query} needs the model: pass --model MODEL (the "
                     "index records none).")
  if not os.path.isfile(a.query):
    raise ValueError(f"{a.query}: no such image or .npz file.")
  from dmljax import export  # pylint: disable=g-import-not-at-top
  model = export.load_model(model_path)
  if index.fingerprint and model.fingerprint != index.fingerprint:
    raise ValueError(f"the model {model_path} ({model.fingerprint}) is not the one that built "
                     f"the index ({index.fingerprint}); pass the index's model with --model.")
  with open(a.query, "rb") as f:
    image = f.read()
  try:
    x = model.prepare(image)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{a.query} does not decode as an image ({cli.message(e)}).") from None
  return {"embeddings": model.embed(x[None]), "labels": None, "paths": [a.query],
          "fingerprint": model.fingerprint, "root": os.path.abspath(".")}


def results_json(result: SearchResult, index: Index, query_paths) -> list:
  """The ``--json`` document (see the module docstring)."""
  labels, paths = index.labels, index.paths
  out = []
  for qi, (d_row, i_row) in enumerate(zip(result.distances, result.indices)):
    out.append({"query": None if query_paths[qi] is None else str(query_paths[qi]),
                "neighbors": [{"path": None if paths is None else str(paths[j]),
                               "distance": float(d),
                               "label": None if labels is None else int(labels[j])}
                              for d, j in zip(d_row, i_row)]})
  return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog=PROG, description="Build and query a retrieval index.")
  sub = p.add_subparsers(dest="command", required=True)
  b = sub.add_parser("build", help="index the embeddings of an .npz")
  b.add_argument("embeddings", help="EMB.npz written by python -m dmljax.embed")
  b.add_argument("--out", required=True, help="index folder to write")
  q = sub.add_parser("query", help="the k nearest gallery images of queries")
  q.add_argument("index", help="index folder (python -m dmljax.search build)")
  q.add_argument("query", help="an image file, or an .npz of query embeddings")
  q.add_argument("-k", type=int, default=10, help="neighbours per query (default 10)")
  q.add_argument("--model", default=None, help="exported model to embed an image query "
                 "(default: the index's)")
  q.add_argument("--json", action="store_true", help="print one JSON document")
  q.add_argument("--gallery", default=None, help="also draw the first queries' retrievals to "
                 "GALLERY.png and GALLERY.html")
  q.add_argument("--gallery_queries", type=int, default=8, help="queries drawn (default 8)")
  for s in (b, q):
    s.add_argument("--verbose", action="store_true", help="show tracebacks with error messages")
  return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None):
  a = parse_args(argv)
  if a.command == "build":
    index = Index.from_embeddings(a.embeddings)
    index.save(a.out)
    print(f"wrote {a.out}: {len(index)} embeddings of dimension {index.dim}"
          f"{', labelled' if index.labels is not None else ''}, model "
          f"{index.fingerprint or 'unknown'}")
    return index
  index = Index.load(a.index)
  queries = _queries(a, index)
  result = index.search(queries["embeddings"], a.k, fingerprint=queries["fingerprint"])
  doc = results_json(result, index, queries["paths"])
  if a.gallery:
    from dmljax import gallery  # pylint: disable=g-import-not-at-top
    n = min(a.gallery_queries, len(doc))
    png, html = gallery.from_search(queries, index, result, a.gallery, n)
    if not a.json:
      print(f"wrote {png} and {html}")
  if a.json:
    print(json.dumps(doc))
    return doc
  for item in doc:
    print(f"query {item['query']}:")
    for rank, nb in enumerate(item["neighbors"], 1):
      label = "" if nb["label"] is None else f"  label {nb['label']}"
      print(f"  {rank:>3}. {nb['path']}  distance {nb['distance']:.4f}{label}")
  return doc


def run(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run_main(PROG, main, argv)


if __name__ == "__main__":
  sys.exit(run())
