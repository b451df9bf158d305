"""Using a trained model (issue 20): export -> load -> embed, the embed command, the index and its
search, the retrieval gallery, the end-of-run outputs and the one-line errors.

One tiny glyphs run (module fixture) serves every test that needs a trained model."""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

import dmljax
from configs import glyphs_contrastive
from dmljax import embed, evaluate, export, gallery, search, train

LETTERS = tuple("ABCDEFGHKLMNPRSTabdefghkmnr")


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir):
  """A 4-step glyphs run (contrastive loss, 16 x 16 grey images) and its final test embeddings,
  as the trainer made them."""
  del cache_dir
  c = glyphs_contrastive.get_config("small")
  c.dataset.options = dict(letters=LETTERS, samples_per_font=2, image_size=16)
  c.total_steps, c.eval_every_steps, c.checkpoint.every_steps = 4, 2, 2
  c.progress, c.num_devices, c.baselines = False, 1, ()
  c.eval_batch_size = 48  # 160 test images: 3 full batches and a padded one
  workdir = str(tmp_path_factory.mktemp("run"))
  got = {}
  train.train_and_evaluate(c, workdir,
                           on_final_embeddings=lambda n, e, s: got.__setitem__(n, (e, s)))
  return workdir, c, got["test"]


def _write_pngs(split, folder):
  """The split's images as PNG files in class sub-folders; returns each file's relative path."""
  paths = []
  for i, (image, label) in enumerate(zip(split.images, split.labels)):
    rel = f"class_{split.class_names[label]}/{i:04d}.png"
    os.makedirs(os.path.join(folder, os.path.dirname(rel)), exist_ok=True)
    Image.fromarray(image[:, :, 0]).save(os.path.join(folder, rel))
    paths.append(rel)
  return paths


def test_export_load_embed_bit_for_bit(run, tmp_path, capsys):
  workdir, config, (trainer_emb, split) = run
  out = export.main([workdir, "--out", str(tmp_path / "model"), "--stablehlo"])
  model = dmljax.load_model(out)
  assert model.input_shape == (16, 16, 1) and model.batch_size == config.eval_batch_size
  assert model.meta["source"]["params"] == "best"
  # The exported model embeds the test images exactly as the trainer's final evaluation did.
  emb = model.embed(split.images)
  assert emb.dtype == np.float32 and np.array_equal(emb, trainer_emb)
  # The jax.export artifact runs one batch without dmljax's model code (constants folded: ~ulp).
  import jax  # pylint: disable=g-import-not-at-top
  with open(os.path.join(out, export.SERIALIZED_FILE), "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  got = np.asarray(exported.call(split.images[:model.batch_size]))
  np.testing.assert_allclose(got, trainer_emb[:model.batch_size], atol=1e-6)

  # The same images as PNG files (plus one that does not decode) through `dmljax.embed`.
  images = tmp_path / "images"
  rel = _write_pngs(split, str(images))
  (images / rel[0]).parent.joinpath("broken.png").write_bytes(b"not an image")
  data = embed.main([out, str(images), "--out", str(tmp_path / "emb.npz"), "--quiet"])
  err = capsys.readouterr().err
  assert "skipped 1 image(s)" in err and "broken.png" in err
  with np.load(tmp_path / "emb.npz") as f:
    saved = {k: f[k] for k in f.files}
  order = [rel.index(p) for p in saved["paths"]]
  assert sorted(order) == list(range(len(rel)))           # every image once, broken one skipped
  assert np.array_equal(saved["embeddings"], trainer_emb[order])
  assert str(saved["fingerprint"]) == model.fingerprint == data["fingerprint"]
  names = [f"class_{n}" for n in split.class_names]
  assert list(saved["class_names"]) == sorted(names)
  assert [saved["class_names"][l] for l in saved["labels"]] == [p.split("/")[0]
                                                                for p in saved["paths"]]
  # Any size and mode comes to the input shape: a 40 x 30 RGB of a test image embeds like it.
  big = np.repeat(np.repeat(split.images[5], 3, axis=0), 2, axis=1)
  assert model.prepare(np.repeat(big, 3, axis=2)).shape == (16, 16, 1)
  # An index of the file, queried with one of its images: the model the index records embeds
  # it, and it finds itself first.
  search.main(["build", str(tmp_path / "emb.npz"), "--out", str(tmp_path / "index")])
  capsys.readouterr()
  search.main(["query", str(tmp_path / "index"), str(images / rel[7]), "-k", "2", "--json"])
  doc = json.loads(capsys.readouterr().out)
  assert doc[0]["query"] == str(images / rel[7]) and doc[0]["neighbors"][0]["path"] == rel[7]
  assert doc[0]["neighbors"][0]["distance"] < 1e-6
  # `dmljax.evaluate` reads the file (its metrics are those of the trainer's embeddings).
  res = evaluate.main([str(tmp_path / "emb.npz"), "--no_clustering", "--gallery",
                       str(tmp_path / "g")])
  ref = evaluate.evaluate({"embeddings": trainer_emb, "labels": np.asarray(split.labels)},
                          clustering=False)
  assert res["map_at_r"] == pytest.approx(ref["map_at_r"])
  assert (tmp_path / "g.png").is_file() and (tmp_path / "g.html").is_file()


def test_export_steps_and_live_run(run, tmp_path):
  workdir, _, _ = run
  live = str(tmp_path / "live")
  shutil.copytree(workdir, live)
  # A save in progress (Orbax's temporary directory) is not a checkpoint yet.
  os.makedirs(os.path.join(live, "checkpoints", "6.orbax-checkpoint-tmp-1"))
  last = export.load_model(export.export(live, str(tmp_path / "last"), "last"))
  assert last.meta["source"]["checkpoint_step"] == 4
  two = export.load_model(export.export(live, str(tmp_path / "two"), "2"))
  assert two.meta["source"]["checkpoint_step"] == 2 and two.fingerprint != last.fingerprint
  # The checkpoint records the model's input shape, so exporting needs no data set.
  assert export.read_run(workdir, "last")["host"]["pipeline"]["image_shape"] == [16, 16, 1]


def test_end_of_run_gallery_and_projector(run):
  workdir, _, (emb, _) = run
  for f in ("plots/retrievals_test.png", "plots/retrievals_test.html",
            "tensorboard/projector_config.pbtxt", "tensorboard/projector/test/sprite.png"):
    assert os.path.isfile(os.path.join(workdir, f)), f
  tb = os.path.join(workdir, "tensorboard")
  assert np.loadtxt(os.path.join(tb, "projector/test/tensors.tsv")).shape == emb.shape
  with open(os.path.join(tb, "projector/test/metadata.tsv")) as f:
    assert len(f.read().splitlines()) == len(emb) + 1        # a header, then one row each
  assert 'tensor_path: "projector/test/tensors.tsv"' in open(
      os.path.join(tb, "projector_config.pbtxt")).read()


def _brute(queries, gallery_emb, k):
  q, g = queries.astype(np.float64), gallery_emb.astype(np.float64)
  d = (q * q).sum(1)[:, None] - 2 * q @ g.T + (g * g).sum(1)[None]
  order = np.lexsort((np.broadcast_to(np.arange(len(g)), d.shape), d), axis=1)[:, :k]
  return order


def test_search_equals_brute_force(tmp_path, capsys):
  rng = np.random.default_rng(0)
  g = rng.integers(-3, 4, (300, 5)).astype(np.float32)      # small integers: exact distances, ties
  g[17] = g[3]                                               # a duplicate: order by index
  q = np.concatenate([rng.integers(-3, 4, (40, 5)).astype(np.float32), g[[3, 50]]])
  labels = rng.integers(0, 6, 300)
  index = search.Index().add(g[:120], labels[:120], [f"a/{i}.png" for i in range(120)])
  index.add(g[120:], labels[120:], [f"a/{i}.png" for i in range(120, 300)])
  res = index.search(q, k=7, query_chunk=16)                  # several chunks
  assert np.array_equal(res.indices, _brute(q, g, 7))
  np.testing.assert_allclose(res.distances, ((q[:, None] - g[res.indices]) ** 2).sum(-1))
  index.save(str(tmp_path / "index"))
  again = search.Index.load(str(tmp_path / "index"))
  assert np.array_equal(again.search(q, k=7).indices, res.indices)
  # The command line's JSON: every query row, its neighbours with paths, distances, labels.
  np.savez(tmp_path / "q.npz", embeddings=q, paths=np.array([f"q{i}" for i in range(len(q))]))
  search.main(["query", str(tmp_path / "index"), str(tmp_path / "q.npz"), "-k", "3", "--json"])
  doc = json.loads(capsys.readouterr().out)
  assert len(doc) == len(q) and doc[0]["query"] == "q0"
  assert doc[-2]["neighbors"][0] == {"path": "a/3.png", "distance": 0.0, "label": int(labels[3])}
  assert doc[-2]["neighbors"][1]["path"] == "a/17.png"       # the duplicate, after the smaller
  assert [n["path"] for n in doc[5]["neighbors"]] == [f"a/{j}.png" for j in res.indices[5, :3]]


def test_gallery_marks_hits_on_a_hand_made_case(tmp_path):
  # Two queries (labels 0, 1), three neighbours each; hits: (T, F, T) and (F, F, T).
  colours = {0: (200, 0, 200), 1: (0, 200, 200)}
  img = lambda c: np.full((10, 10, 3), colours[c], np.uint8)
  nb_labels = np.array([[0, 1, 0], [0, 0, 1]])
  marks = gallery.hits(np.array([0, 1]), nb_labels)
  assert marks.tolist() == [[True, False, True], [False, False, True]]
  canvas = gallery.draw([img(0), img(1)], [[img(c) for c in row] for row in nb_labels], marks,
                        str(tmp_path / "g.png"), str(tmp_path / "g.html"), cell=20, frame=3)
  px = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
  assert px.shape[:2] == (canvas.height, canvas.width)
  step, gap = 20 + 2 * (3 + 2), 12
  for i in range(2):
    assert tuple(px[i * step + 2, 2]) == gallery.QUERY
    for j in range(3):
      x = step * (j + 1) + gap
      framed = tuple(px[i * step + 2, x + step // 2]) == gallery.HIT
      red = tuple(px[i * step + step - 3, x + step // 2]) == gallery.MISS
      assert framed == marks[i, j] and red == (not marks[i, j]), (i, j)
  page = (tmp_path / "g.html").read_text()
  assert page.count('class="hit"') == 3 and page.count('class="miss"') == 3
  assert page.count("data:image/png;base64,") == 8 and "http" not in page.replace(
      "http-equiv", "")


def test_gallery_page_opens_in_headless_chromium(tmp_path):
  exe = shutil.which("chromium") or shutil.which("chromium-browser")
  if exe is None:
    pytest.skip("no chromium on PATH (Debian: apt-get install -y chromium)")
  marks = np.array([[True, False]])
  im = np.zeros((8, 8, 3), np.uint8)
  gallery.draw([im], [[im, im]], marks, html_path=str(tmp_path / "p.html"))
  out = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                        f"file://{tmp_path / 'p.html'}"], capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-500:]
  assert 'id="gallery"' in out.stdout and out.stdout.count("<img") == 3
  assert out.stdout.count('class="hit"') == 1


def test_bad_input_is_one_line(run, tmp_path, capsys):
  workdir, _, _ = run
  # A run directory without a model.
  assert export.run([str(tmp_path)]) == 2
  err = capsys.readouterr().err.splitlines()
  assert "holds no model" in err[0] and len(err) == 2      # the message, the --verbose hint
  model_dir = export.export(workdir, str(tmp_path / "m"))
  fp = export.load_model(model_dir).fingerprint
  index = str(tmp_path / "index")
  search.Index(4, fingerprint=fp).add(np.eye(4, dtype=np.float32)).save(index)
  # A query of the wrong dimension.
  np.savez(tmp_path / "q3.npz", embeddings=np.ones((2, 3), np.float32))
  assert search.run(["query", index, str(tmp_path / "q3.npz")]) == 2
  assert "dimension 3" in capsys.readouterr().err
  # Queries (or an index) of another model.
  np.savez(tmp_path / "q4.npz", embeddings=np.ones((2, 4), np.float32), fingerprint="0" * 16)
  assert search.run(["query", index, str(tmp_path / "q4.npz"), "-k", "2"]) == 2
  assert "fingerprints differ" in capsys.readouterr().err
  img = tmp_path / "x.png"
  Image.fromarray(np.zeros((5, 5), np.uint8)).save(img)
  other = str(tmp_path / "index_other")
  search.Index(16, fingerprint="f" * 16).add(np.eye(16, dtype=np.float32)).save(other)
  assert search.run(["query", other, str(img), "--model", model_dir]) == 2
  assert "is not the one that built the index" in capsys.readouterr().err
  # An index folder that is not one; a model folder that is not one.
  assert search.run(["query", str(tmp_path), str(tmp_path / "q4.npz")]) == 2
  assert embed.run([workdir, str(tmp_path), "--out", str(tmp_path / "e.npz")]) == 2
  assert "export it first" in capsys.readouterr().err
