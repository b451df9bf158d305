"""Memory and time of ``dmljax.search`` on a large gallery, and the gallery page in Chromium.

    python benchmarks/search.py [--gallery 605020] [--queries 6000] [--dim 128] [-k 10]
        [--check 200] [--budget_gb 2] [--html PAGE.html]

1. Writes an index of ``--gallery`` random unit vectors (clustered, so that neighbours are
   meaningful; 605,020 = ten times SOP's 60,502 images) with ``Index.save``.
2. In a fresh process: ``Index.load`` (embeddings memory-mapped), then ``Index.search`` of
   ``--queries`` queries at ``k``, the way ``python -m dmljax.search query`` runs. Reports the
   peak resident memory of that process (``ru_maxrss``, which includes Python, JAX and XLA) and
   the time, and fails if the peak exceeds ``--budget_gb``.
3. Checks the first ``--check`` queries against brute force (float64 numpy, a few queries at a
   time), measured in the same run.
4. With ``--html``: opens that page (a gallery written by dmljax.gallery; default: one drawn here)
   in headless Chromium (Debian's ``chromium``) and checks the framed hits are in the DOM.

Results: docs/use_a_model.md.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_gallery(n, dim, seed=0, centres=5000):
  rng = np.random.default_rng(seed)
  c = rng.standard_normal((centres, dim)).astype(np.float32)
  out = np.empty((n, dim), np.float32)
  for lo in range(0, n, 65536):
    m = min(65536, n - lo)
    x = c[rng.integers(0, centres, m)] + 0.6 * rng.standard_normal((m, dim)).astype(np.float32)
    out[lo:lo + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
  return out


def child(index_dir, queries_path, k, out_path):
  """The measured process: load the index and search, as the command line does."""
  t0 = time.time()
  from dmljax import search  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  jax.numpy.zeros(1).block_until_ready()
  base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  index = search.Index.load(index_dir)
  queries = np.load(queries_path)
  t1 = time.time()
  res = index.search(queries, k)
  t2 = time.time()
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  np.savez(out_path, distances=res.distances, indices=res.indices)
  print(json.dumps({"rss_after_import_gb": base, "peak_rss_gb": peak, "search_s": t2 - t1,
                    "startup_s": t1 - t0, "devices": len(jax.devices())}))


def brute_force(queries, gallery, k):
  idx = np.empty((len(queries), k), np.int64)
  dist = np.empty((len(queries), k), np.float64)
  g = gallery.astype(np.float64)
  gn = np.einsum("nd,nd->n", g, g)
  for i, q in enumerate(queries.astype(np.float64)):
    d = gn - 2 * g @ q + q @ q
    cand = np.argpartition(d, k + 16)[:k + 16]
    order = cand[np.lexsort((cand, d[cand]))][:k]
    idx[i], dist[i] = order, d[order]
  return dist, idx


def chromium_check(page):
  exe = shutil.which("chromium") or shutil.which("chromium-browser")
  if exe is None:
    return "skipped: no chromium on PATH (apt-get install -y chromium)"
  out = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                        "file://" + os.path.abspath(page)], capture_output=True, text=True,
                       timeout=120)
  dom = out.stdout
  images, hit = dom.count("<img"), dom.count('class="hit"')
  ok = out.returncode == 0 and 'id="gallery"' in dom and images > 0
  return (f"chromium rc={out.returncode}, {images} images, {hit} hits in the DOM: "
          f"{'OK' if ok else 'FAILED'}")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--gallery", type=int, default=605020)
  p.add_argument("--queries", type=int, default=6000)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("-k", type=int, default=10)
  p.add_argument("--check", type=int, default=200)
  p.add_argument("--budget_gb", type=float, default=2.0)
  p.add_argument("--html", default=None)
  p.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.child:
    child(a.child[0], a.child[1], int(a.child[2]), a.child[3])
    return
  from dmljax import search  # pylint: disable=g-import-not-at-top
  tmp = tempfile.mkdtemp(prefix="dmljax-search-bench-")
  try:
    gallery = make_gallery(a.gallery, a.dim)
    queries = make_gallery(a.queries, a.dim, seed=1)
    index_dir = os.path.join(tmp, "index")
    search.Index(a.dim).add(gallery).save(index_dir)
    np.save(os.path.join(tmp, "q.npy"), queries)
    out = os.path.join(tmp, "res.npz")
    run = subprocess.run([sys.executable, __file__, "--child", index_dir,
                          os.path.join(tmp, "q.npy"), str(a.k), out], capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    if run.returncode:
      print(run.stderr[-3000:])
      raise SystemExit("search process failed")
    stats = json.loads(run.stdout.strip().splitlines()[-1])
    res = np.load(out)
    t0 = time.time()
    bd, bi = brute_force(queries[:a.check], gallery, a.k)
    brute_s = time.time() - t0
    same = float(np.mean(res["indices"][:a.check] == bi))
    print(f"gallery {a.gallery} x {a.dim}, {a.queries} queries, k={a.k}, "
          f"{stats['devices']} device(s)")
    print(f"search: {stats['search_s']:.1f} s ({a.queries / stats['search_s']:.0f} queries/s); "
          f"peak RSS {stats['peak_rss_gb']:.2f} GB (after importing jax: "
          f"{stats['rss_after_import_gb']:.2f} GB; budget {a.budget_gb} GB)")
    print(f"brute force (float64 numpy) on {a.check} queries: {brute_s:.1f} s "
          f"({a.check / brute_s:.1f} queries/s); neighbours equal: {100 * same:.2f}%, max "
          f"distance difference {np.abs(res['distances'][:a.check] - bd).max():.2e}")
    if a.html is None:
      from dmljax import gallery as gallery_lib  # pylint: disable=g-import-not-at-top
      rng = np.random.default_rng(0)
      imgs = rng.integers(0, 255, (6, 5, 12, 12, 3), dtype=np.uint8)
      a.html = os.path.join(tmp, "page.html")
      gallery_lib.draw(list(imgs[:, 0]), [list(r[1:]) for r in imgs],
                       rng.random((6, 4)) < 0.5, html_path=a.html)
    print(chromium_check(a.html))
    if stats["peak_rss_gb"] > a.budget_gb:
      raise SystemExit(f"peak RSS {stats['peak_rss_gb']:.2f} GB over the budget")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
