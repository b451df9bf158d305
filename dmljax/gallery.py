"""Look at what a model retrieves: retrieval galleries and TensorBoard projector files.

A **retrieval gallery** shows, one row per query, the query image (blue frame) and its ``k``
nearest neighbours, nearest first; a neighbour of the query's class (a hit) is framed green, a
miss is left unframed with a red mark under it. It is written twice: ``PREFIX.png`` (a grid,
drawn with PIL) and ``PREFIX.html`` (one self-contained page: the images are inlined as
``data:`` URIs, no scripts, nothing fetched), with class names and distances as captions.

Where galleries come from:

* every ``dmljax.main`` run, at its end, for the test split with the best parameters:
  ``WORKDIR/plots/retrievals_test.png`` and ``.html`` (:func:`write_run_outputs`), together with
  the **TensorBoard projector** files of the test split under ``WORKDIR/tensorboard`` (embeddings,
  labels and a sprite of at most :data:`PROJECTOR_MAX_POINTS` images; ``tensorboard --logdir
  WORKDIR/tensorboard``, then the PROJECTOR tab; ``pip install tensorboard``);
* ``python -m dmljax.evaluate EMB.npz --gallery OUT`` (files written by ``dmljax.embed``);
* ``python -m dmljax.search query INDEX QUERIES --gallery OUT``.

:func:`hits` is the rule (same label), :func:`draw` the drawing; both are plain functions of the
images, labels and neighbour lists, tested on a hand-made case.
"""
from __future__ import annotations

import base64
import html as html_lib
import io
import json
import os
from typing import Callable, Optional, Sequence

import numpy as np

#: Points of the projector (a deterministic sample of the split beyond that).
PROJECTOR_MAX_POINTS = 2000
#: Queries and neighbours of the end-of-run gallery.
RUN_QUERIES, RUN_K = 8, 8

HIT = (40, 170, 60)      # frame of a correct neighbour
QUERY = (40, 90, 200)    # frame of the query
MISS = (210, 50, 40)     # mark under a wrong neighbour
BACKGROUND = (255, 255, 255)


def hits(query_labels, neighbor_labels) -> np.ndarray:
  """``bool [Q, k]``: neighbour ``j`` of query ``i`` has the query's label."""
  q = np.asarray(query_labels)
  return np.asarray(neighbor_labels) == q[:, None]


def _rgb(image) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = np.clip(np.rint(np.asarray(image, np.float32) * 255.0), 0, 255).astype(np.uint8)
  if image.ndim == 2:
    image = image[:, :, None]
  if image.shape[2] == 1:
    image = np.repeat(image, 3, axis=2)
  return np.ascontiguousarray(image[:, :, :3])


def _thumb(image, cell: int):
  """A PIL image of ``image`` fitted into ``cell`` x ``cell`` (small ones enlarged, sharp)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  im = Image.fromarray(_rgb(image), "RGB")
  scale = cell / max(im.width, im.height)
  size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
  return im.resize(size, Image.NEAREST if scale >= 1 else Image.BILINEAR)


def draw(query_images: Sequence, neighbor_images: Sequence[Sequence], marks: np.ndarray,
         png_path: Optional[str] = None, html_path: Optional[str] = None, *,
         query_captions: Optional[Sequence[str]] = None,
         neighbor_captions: Optional[Sequence[Sequence[str]]] = None, title: str = "",
         cell: int = 96, frame: int = 4):
  """Draws a gallery: ``query_images[i]`` and its ``neighbor_images[i]`` with ``marks[i]``
  (True: framed as a hit). Writes the PNG and/or the HTML page; returns the PNG's PIL image."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  marks = np.asarray(marks, bool)
  nq = len(query_images)
  k = max((len(n) for n in neighbor_images), default=0)
  pad, gap = frame + 2, 12
  step = cell + 2 * pad
  width = step * (k + 1) + gap
  canvas = Image.new("RGB", (width, step * nq), BACKGROUND)
  pen = ImageDraw.Draw(canvas)

  def put(image, x0, y0, color):
    t = _thumb(image, cell)
    canvas.paste(t, (x0 + pad + (cell - t.width) // 2, y0 + pad + (cell - t.height) // 2))
    if color is not None:
      pen.rectangle([x0 + 1, y0 + 1, x0 + step - 2, y0 + step - 2], outline=color, width=frame)

  for i in range(nq):
    y = i * step
    put(query_images[i], 0, y, QUERY)
    for j, image in enumerate(neighbor_images[i]):
      x = step * (j + 1) + gap
      put(image, x, y, HIT if marks[i, j] else None)
      if not marks[i, j]:
        pen.rectangle([x + pad, y + step - pad + 1, x + step - pad, y + step - 2], fill=MISS)
  if png_path:
    _makedirs_for(png_path)
    canvas.save(png_path, format="PNG", compress_level=1)
  if html_path:
    _makedirs_for(html_path)
    page = _html(query_images, neighbor_images, marks, query_captions, neighbor_captions, title,
                 cell)
    with open(html_path, "w", encoding="utf-8") as f:
      f.write(page)
  return canvas


def _data_uri(image, cell: int) -> str:
  buf = io.BytesIO()
  _thumb(image, cell).save(buf, format="PNG", compress_level=1)
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _html(query_images, neighbor_images, marks, query_captions, neighbor_captions, title,
          cell) -> str:
  esc = html_lib.escape
  rows = []
  for i, q in enumerate(query_images):
    qcap = esc(query_captions[i]) if query_captions else ""
    cells = [f'<td class="query"><img src="{_data_uri(q, cell)}" alt="query {i}">'
             f"<div>{qcap}</div></td>"]
    for j, nb in enumerate(neighbor_images[i]):
      kind = "hit" if marks[i, j] else "miss"
      cap = esc(neighbor_captions[i][j]) if neighbor_captions else ""
      cells.append(f'<td class="{kind}"><img src="{_data_uri(nb, cell)}" alt="{kind}">'
                   f"<div>{j + 1}. {cap}</div></td>")
    rows.append("<tr>" + "".join(cells) + "</tr>")
  total, got = marks.size, int(marks.sum())
  summary = f"{got} of {total} neighbours share the query's class" if total else ""
  return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title or 'retrievals')}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
td {{ text-align: center; vertical-align: top; padding: 3px; font-size: 11px; }}
img {{ width: {cell}px; height: {cell}px; object-fit: contain; image-rendering: pixelated;
      border: 4px solid transparent; }}
td.query img {{ border-color: rgb{QUERY}; }}
td.query {{ padding-right: 16px; }}
td.hit img {{ border-color: rgb{HIT}; }}
td.miss div {{ color: rgb{MISS}; }}
</style></head><body>
<h3>{esc(title)}</h3>
<p>Each row: a query (blue), then its nearest neighbours, nearest first; green frames mark
neighbours of the query's class. {esc(summary)}.</p>
<table id="gallery">
{chr(10).join(rows)}
</table></body></html>
"""


def _makedirs_for(path: str) -> None:
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)


def _name(class_names, label) -> str:
  if label is None:
    return ""
  if class_names is not None and 0 <= int(label) < len(class_names):
    return str(class_names[int(label)])
  return str(int(label))


def gallery(load_query: Callable[[int], np.ndarray], load_neighbor: Callable[[int], np.ndarray],
            query_ids: Sequence[int], neighbors: np.ndarray, distances: np.ndarray, out: str, *,
            query_labels=None, neighbor_labels=None, class_names=None, title: str = ""):
  """Draws the retrievals of some queries from the images the loaders give; writes ``out.png``
  and ``out.html``; returns their paths and the hit marks.

  Args:
    load_query: row -> uint8 image of a query; ``load_neighbor``: row -> image of a neighbour.
    query_ids: the query rows to draw; ``neighbors`` / ``distances``: their ``[n, k]`` results.
    query_labels, neighbor_labels: labels of those rows (``[n]`` and ``[n, k]``), optional.
  """
  neighbors = np.asarray(neighbors)
  if query_labels is not None and neighbor_labels is not None:
    marks = hits(query_labels, neighbor_labels)
  else:
    marks = np.zeros(neighbors.shape, bool)
  qcap = [f"query: {_name(class_names, None if query_labels is None else query_labels[i])}"
          for i in range(len(query_ids))]
  ncap = [[f"{_name(class_names, None if neighbor_labels is None else neighbor_labels[i][j])} "
           f"d={float(distances[i][j]):.3f}" for j in range(neighbors.shape[1])]
          for i in range(len(query_ids))]
  png, html = f"{out}.png", f"{out}.html"
  draw([load_query(int(q)) for q in query_ids],
       [[load_neighbor(int(j)) for j in row] for row in neighbors], marks, png, html,
       query_captions=qcap, neighbor_captions=ncap, title=title)
  return png, html, marks


def nearest(queries: np.ndarray, references: np.ndarray, k: int, exclude=None):
  """``(distances, indices)`` ``[Q, k]`` of the few queries a gallery draws: squared Euclidean in
  float64 numpy (no compile; the same order as the kNN kernel: distance, then index), each
  query's row ``exclude[i]`` of the references left out."""
  q = np.asarray(queries, np.float64)
  r = np.asarray(references, np.float64)
  d = (q * q).sum(1)[:, None] - 2.0 * q @ r.T + (r * r).sum(1)[None]
  d = np.maximum(d, 0.0)
  if exclude is not None:
    d[np.arange(len(q)), np.asarray(exclude)] = np.inf
  k = min(k, r.shape[0] - (0 if exclude is None else 1))
  idx = np.stack([np.lexsort((np.arange(r.shape[0]), row))[:k] for row in d])
  return np.take_along_axis(d, idx, 1).astype(np.float32), idx


def sample_queries(num: int, count: int, seed: int = 0) -> np.ndarray:
  """``count`` distinct rows of ``num`` (sorted), the same for the same seed."""
  count = min(count, num)
  return np.sort(np.random.default_rng(seed).choice(num, count, replace=False))


# ============================================================================= from files


def _file_loader(root: Optional[str], paths) -> Callable[[int], np.ndarray]:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  def load(i):
    p = str(paths[i])
    p = p if os.path.isabs(p) or not root else os.path.join(root, p)
    try:
      with Image.open(p) as im:
        im.thumbnail((256, 256))
        return np.asarray(im.convert("RGB"))
    except Exception:  # pylint: disable=broad-except  (a gallery shows what it can)
      return np.full((8, 8, 3), 128, np.uint8)
  return load


def from_embeddings_file(data: dict, out: str, *, num_queries: int = RUN_QUERIES,
                         k: int = RUN_K, seed: int = 0):
  """Gallery of an ``EMB.npz`` of ``python -m dmljax.embed`` (same-set retrieval: a query's own
  row is left out); returns ``(png, html)``."""
  from dmljax.kernels import knn as knn_lib  # pylint: disable=g-import-not-at-top
  if "paths" not in data:
    raise ValueError("--gallery needs the image paths (`paths`, `root`) that python -m "
                     "dmljax.embed writes into the .npz.")
  emb = data["embeddings"]
  labels = data.get("labels")
  k = min(k, len(emb) - 1)
  ids = sample_queries(len(emb), num_queries, seed)
  res = knn_lib.knn(emb, k=k)  # same-set: every row's neighbours, self excluded
  nb, dist = res.indices[ids], res.distances[ids]
  root = data.get("root")
  root = str(root) if root is not None else None
  load = _file_loader(root, data["paths"])
  png, html, _ = gallery(load, load, ids, nb, dist, out,
                         query_labels=None if labels is None else labels[ids],
                         neighbor_labels=None if labels is None else labels[nb],
                         class_names=data.get("class_names"), title="retrievals")
  return png, html


def from_search(queries: dict, index, result, out: str, num_queries: int):
  """Gallery of ``python -m dmljax.search query ... --gallery OUT`` (the first queries)."""
  if index.paths is None or any(p is None for p in queries["paths"][:num_queries]):
    raise ValueError("--gallery needs the image paths of the queries and of the index (embed "
                     "them with python -m dmljax.embed).")
  ids = np.arange(num_queries)
  nb = result.indices[:num_queries]
  labels = index.labels
  qlab = queries.get("labels")
  png, html, _ = gallery(_file_loader(queries.get("root"), queries["paths"]),
                         _file_loader(index.root, index.paths), ids, nb,
                         result.distances[:num_queries], out,
                         query_labels=None if qlab is None else np.asarray(qlab)[ids],
                         neighbor_labels=None if labels is None or qlab is None else labels[nb],
                         class_names=index.class_names, title="retrievals")
  return png, html


# ============================================================================= end of a run


def _split_images(split, transform):
  """``(row -> uint8 image, labels, class_names)`` of a split (array or records)."""
  from dmljax.data import transforms  # pylint: disable=g-import-not-at-top
  images = split.images

  def load(i):
    if isinstance(images, np.ndarray):
      return images[int(i)]
    return transforms.transform_record(images[int(i)], transform)
  return load, np.asarray(split.labels), tuple(split.class_names)


def run_gallery(embeddings: np.ndarray, split, transform, out: str, *, seed: int = 0,
                num_queries: int = RUN_QUERIES, k: int = RUN_K):
  """The retrievals of sampled queries of an evaluated split (same-set, or queries against the
  gallery of a query / gallery split); returns ``(png, html, marks)``."""
  from dmljax.data import splits as splits_lib  # pylint: disable=g-import-not-at-top
  if isinstance(split, splits_lib.QueryGallery):
    nq = len(split.query.labels)
    q_emb, g_emb = embeddings[:nq], embeddings[nq:]
    load_q, q_lab, names = _split_images(split.query, transform)
    load_g, g_lab, _ = _split_images(split.gallery, transform)
    ids = sample_queries(nq, num_queries, seed)
    dist, nb = nearest(q_emb[ids], g_emb, k)
  else:
    load_q, q_lab, names = _split_images(split, transform)
    load_g, g_lab = load_q, q_lab
    ids = sample_queries(len(embeddings), num_queries, seed)
    dist, nb = nearest(embeddings[ids], embeddings, k, exclude=ids)  # same-set: self left out
  # Split labels index the split's own class_names.
  return gallery(load_q, load_g, ids, nb, dist, out, query_labels=q_lab[ids],
                 neighbor_labels=g_lab[nb], class_names=names,
                 title=f"retrievals ({len(embeddings)} embeddings)")


def write_projector(logdir: str, name: str, embeddings: np.ndarray, labels, class_names,
                    load_image: Optional[Callable[[int], np.ndarray]] = None, *,
                    max_points: int = PROJECTOR_MAX_POINTS, seed: int = 0,
                    thumb: int = 48) -> str:
  """TensorBoard projector files for ``embeddings`` (at most ``max_points`` rows, sampled):
  ``logdir/projector/NAME/{tensors.tsv, metadata.tsv, sprite.png}`` and an entry in
  ``logdir/projector_config.pbtxt``. Returns the folder written."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  n = len(embeddings)
  ids = sample_queries(n, max_points, seed) if n > max_points else np.arange(n)
  folder = os.path.join(logdir, "projector", name)
  os.makedirs(folder, exist_ok=True)
  np.savetxt(os.path.join(folder, "tensors.tsv"), np.asarray(embeddings)[ids], delimiter="\t",
             fmt="%.6g")
  labels = np.asarray(labels)
  with open(os.path.join(folder, "metadata.tsv"), "w", encoding="utf-8") as f:
    f.write("label\tclass\n")
    for i in ids:
      cls = _name(class_names, labels[i]).replace("\t", " ").replace("\n", " ")
      f.write(f"{int(labels[i])}\t{cls}\n")
  sprite = ""
  if load_image is not None:
    side = int(np.ceil(np.sqrt(len(ids))))
    canvas = Image.new("RGB", (side * thumb, side * thumb), (0, 0, 0))
    for pos, i in enumerate(ids):
      t = Image.fromarray(_rgb(load_image(int(i))), "RGB").resize((thumb, thumb),
                                                                   Image.BILINEAR)
      canvas.paste(t, ((pos % side) * thumb, (pos // side) * thumb))
    canvas.save(os.path.join(folder, "sprite.png"), compress_level=1)
    sprite = (f'  sprite {{\n    image_path: "projector/{name}/sprite.png"\n'
              f"    single_image_dim: {thumb}\n    single_image_dim: {thumb}\n  }}\n")
  entry = (f"embeddings {{\n  tensor_name: {json.dumps(name)}\n"
           f'  tensor_path: "projector/{name}/tensors.tsv"\n'
           f'  metadata_path: "projector/{name}/metadata.tsv"\n{sprite}}}\n')
  # Keep the other tensors' entries (one block per tensor_name).
  config_path = os.path.join(logdir, "projector_config.pbtxt")
  blocks = []
  if os.path.exists(config_path):
    text = open(config_path, encoding="utf-8").read()
    for block in text.split("embeddings {")[1:]:
      if f"tensor_name: {json.dumps(name)}" not in block:
        blocks.append("embeddings {" + block.rstrip() + "\n")
  with open(config_path, "w", encoding="utf-8") as f:
    f.write("".join(blocks + [entry]))
  return folder


def write_run_outputs(workdir: str, name: str, embeddings: np.ndarray, split, transform, *,
                      seed: int = 0) -> None:
  """End of a ``dmljax.main`` run: ``plots/retrievals_NAME.{png,html}`` and the projector files
  of split ``NAME`` (process 0, local workdirs). A failure is logged, never raised: the run's
  results are already computed."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return
  if "://" in str(workdir):
    logging.warning("Retrieval gallery and projector not written: %s is not a local folder.",
                    workdir)
    return
  try:
    emb = np.asarray(embeddings, np.float32)
    run_gallery(emb, split, transform, os.path.join(workdir, "plots", f"retrievals_{name}"),
                seed=seed)
    from dmljax.data import splits as splits_lib  # pylint: disable=g-import-not-at-top
    parts = [split.query, split.gallery] if isinstance(split, splits_lib.QueryGallery) else [split]
    loaders = [_split_images(p, transform) for p in parts]
    sizes = np.cumsum([0] + [len(p.labels) for p in parts])
    names = loaders[0][2]

    def load(i):
      part = int(np.searchsorted(sizes, i, side="right")) - 1
      return loaders[part][0](i - sizes[part])
    labels = np.concatenate([l[1] for l in loaders])
    write_projector(os.path.join(workdir, "tensorboard"), name, emb, labels, names, load,
                    seed=seed)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("Retrieval gallery / projector of %s not written: %s: %s", name,
                    type(e).__name__, e)
