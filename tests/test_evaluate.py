"""Command line `python -m dmljax.evaluate`: called in-process on tiny files."""
import json

import numpy as np
import pytest

from dmljax import evaluate


def tiny(tmp_path, gallery=False):
  # 1-D points: class 0 at 0, 1, 2; class 1 at 10, 11. Every query's nearest other point is of
  # its class, so P@1 = MAP@R = 1.
  x = np.array([[0.0], [10.0], [1.0], [11.0], [2.0]], np.float32)
  y = np.array([0, 1, 0, 1, 0])
  arrays = dict(embeddings=x, labels=y)
  if gallery:
    arrays.update(embeddings=x[:2], labels=y[:2], gallery_embeddings=x[2:], gallery_labels=y[2:])
  path = tmp_path / "emb.npz"
  np.savez(path, **arrays)
  return str(path)


def test_main_prints_table_and_writes_json(tmp_path, capsys):
  out = tmp_path / "m.json"
  res = evaluate.main([tiny(tmp_path), "--out", str(out), "--recall_ks", "1,2", "--ndcg_ks", "2",
                       "--geometry"])
  assert json.loads(out.read_text()) == res
  assert res["precision_at_1"] == 1.0 and res["map_at_r"] == 1.0 and res["recall_at_2"] == 1.0
  assert res["nmi"] == pytest.approx(1.0) and res["f1"] == pytest.approx(1.0)
  # Class covering radii: class 0 (0,1,2) -> (1 + 1 + 0) / 3, class 1 (10,11) -> (1 + 0) / 2.
  assert res["class_covering_radius"] == pytest.approx((2 / 3 + 1 / 2) / 2)
  text = capsys.readouterr().out
  assert "precision_at_1" in text and "100.00%" in text and "num_queries" in text


def test_gallery_file(tmp_path):
  res = evaluate.main([tiny(tmp_path, gallery=True), "--recall_ks", "1", "--no_clustering"])
  assert res["num_queries"] == 2 and res["num_lone_queries"] == 0
  # Query 0 (at 0): gallery ranked 1, 2, 10, 11 -> R = 2 relevant first.
  assert res["r_precision"] == 1.0 and "nmi" not in res


def test_bad_file(tmp_path):
  path = tmp_path / "bad.npz"
  np.savez(path, emb=np.zeros((3, 2), np.float32), labels=np.zeros(3, int))
  with pytest.raises(ValueError, match="lacks key"):
    evaluate.main([str(path)])
