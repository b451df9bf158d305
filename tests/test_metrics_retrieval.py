"""Retrieval metrics: hand-computed rankings, MPA Table 3, brute-force oracle, modes, devices."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from dmljax.metrics import metrics_from_relevance, retrieval_metrics

BLOCKS = dict(query_block=8, ref_block=16, group=4)


def test_hand_computed_rankings():
  # Query A: R=3, ranking 1 0 1 0 1 0.  Query B: R=2, ranking 0 1 0 0 1 0.  Query C: lone.
  rel = np.array([[1, 0, 1, 0, 1, 0], [0, 1, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0]], bool)
  m = metrics_from_relevance(rel, np.array([3, 2, 0]), recall_ks=(1, 2), precision_ks=(4,),
                             ndcg_ks=(3,), map_ks=(2, 4), map_min_r_ks=(4,))
  assert m["num_queries"] == 3 and m["num_lone_queries"] == 1
  assert m["precision_at_1"] == pytest.approx((1 + 0) / 2)
  assert m["r_precision"] == pytest.approx((2 / 3 + 1 / 2) / 2)
  # AP@R: A = (1/1 + 2/3) / 3, B = (1/2) / 2.
  assert m["map_at_r"] == pytest.approx(((1 + 2 / 3) / 3 + (1 / 2) / 2) / 2)
  assert m["recall_at_1"] == pytest.approx(0.5)
  assert m["recall_at_2"] == pytest.approx(1.0)
  # nDCG@3: A = (1 + 1/log2 4) / (1 + 1/log2 3 + 1/log2 4); B = (1/log2 3) / (1 + 1/log2 3).
  a = (1 + 1 / 2) / (1 + 1 / math.log2(3) + 1 / 2)
  b = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
  assert m["ndcg_at_3"] == pytest.approx((a + b) / 2)
  # P@4: A = 2/4, B = 1/4.
  assert m["precision_at_4"] == pytest.approx((2 / 4 + 1 / 4) / 2)
  # MAP@k divides by k: MAP@2: A = (1/1) / 2, B = (1/2) / 2; MAP@4: A = (1 + 2/3) / 4, B = 1/2 / 4.
  assert m["map_at_2"] == pytest.approx((1 / 2 + 1 / 4) / 2)
  # guards: MAP@k divided by k, not min(k, R) (issue 12; the two agree at k=2 here, not at k=4)
  assert m["map_at_4"] == pytest.approx(((1 + 2 / 3) / 4 + (1 / 2) / 4) / 2)
  # The min(k, R) variant: A = (1 + 2/3) / min(4, 3), B = (1/2) / min(4, 2).
  assert m["map_at_4_min_r"] == pytest.approx(((1 + 2 / 3) / 3 + (1 / 2) / 2) / 2)


def test_all_lone_gives_nan_for_every_cut_off():
  # guards: the new cut-offs also leave lone queries out (NaN when no query has a relevant item)
  m = metrics_from_relevance(np.zeros((2, 3), bool), np.array([0, 0]), precision_ks=(2,),
                             map_ks=(2,), map_min_r_ks=(2,))
  assert m["num_lone_queries"] == 2
  for key in ("precision_at_2", "map_at_2", "map_at_2_min_r"):
    assert math.isnan(m[key]), key


# MPA paper (003_*.txt), Table 3: one query with R = 4 relevant references, the first 10 ranked
# results as listed; columns Recall@10, Precision@10, MAP@R, MAP@10, nDCG@10 (x 100).
TABLE_3 = [
    ([1, 0, 0, 0, 0, 0, 0, 0, 0, 0], 100, 10, 25.0, 10.0, 39.0),
    ([1, 0, 0, 0, 0, 0, 0, 0, 0, 1], 100, 20, 25.0, 12.0, 50.3),
    ([1, 0, 1, 0, 0, 0, 0, 0, 0, 0], 100, 20, 41.7, 16.7, 58.6),
    ([1, 0, 1, 0, 0, 0, 1, 0, 0, 1], 100, 40, 41.7, 25.0, 82.9),
    ([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], 100, 40, 100.0, 40.0, 100.0),
]
# Not in the table: the same sums divided by min(10, R) = 4 (a perfect ranking scores 100).
MAP_10_MIN_R = [25.0, 30.0, 41.7, 62.4, 100.0]


@pytest.mark.parametrize("i", range(len(TABLE_3)))
def test_mpa_table_3_every_column(i):
  # guards: every Table 3 column, incl. Precision@10 and MAP@10 divided by k (issue 12)
  row, recall, precision, map_r, map_10, ndcg = TABLE_3[i]
  m = metrics_from_relevance(np.array([row], bool), np.array([4]), recall_ks=(10,),
                             precision_ks=(10,), ndcg_ks=(10,), map_ks=(10,),
                             map_min_r_ks=(10,))
  got = {key: round(100 * m[key], 1) for key in m if key not in ("num_queries",
                                                                 "num_lone_queries")}
  assert got["recall_at_10"] == recall
  assert got["precision_at_10"] == precision
  assert got["map_at_r"] == map_r
  assert got["map_at_10"] == map_10
  assert got["ndcg_at_10"] == ndcg
  assert got["map_at_10_min_r"] == MAP_10_MIN_R[i]


def test_mpa_table_3_rows_as_one_batch():
  # guards: the per-query values average correctly when the five rankings are evaluated together
  rel = np.array([t[0] for t in TABLE_3], bool)
  m = metrics_from_relevance(rel, np.full(5, 4), precision_ks=(10,), map_ks=(10,), ndcg_ks=(10,))
  for key, col in (("precision_at_10", 2), ("map_at_r", 3), ("map_at_10", 4), ("ndcg_at_10", 5)):
    assert 100 * m[key] == pytest.approx(np.mean([t[col] for t in TABLE_3]), abs=0.05), key


def test_recall_beyond_searched_depth_uses_first_rank():
  rel = np.array([[0, 0], [0, 1], [0, 0]], bool)
  m = metrics_from_relevance(rel, np.array([1, 1, 1]), recall_ks=(2, 5),
                             first_rank=np.array([4, 0, 9]))
  assert m["recall_at_2"] == pytest.approx(1 / 3)
  assert m["recall_at_5"] == pytest.approx(2 / 3)  # row 0 (rank 4) and row 1 (hit at 2)


# ----------------------------------------------------------------------------- oracle


def oracle(q, lq, g, lg, same, recall_ks, precision_ks, ndcg_ks, map_ks, map_min_r_ks):
  """Per-query Python loops over a full ranking (distance, then index), from the formulas."""
  sums, n_ok, lone = {}, 0, 0
  for i in range(len(q)):
    d = [(float(((q[i].astype(np.float64) - g[j]) ** 2).sum()), j) for j in range(len(g))
         if not (same and j == i)]
    ranking = [j for _, j in sorted(d)]
    rel = [int(lg[j] == lq[i]) for j in ranking]
    r = sum(rel)
    if r == 0:
      lone += 1
      continue
    n_ok += 1
    vals = {"precision_at_1": rel[0], "r_precision": sum(rel[:r]) / r}
    vals["map_at_r"] = sum(sum(rel[:p + 1]) / (p + 1) for p in range(r) if rel[p]) / r
    for k in recall_ks:
      vals[f"recall_at_{k}"] = float(any(rel[:k]))
    for k in precision_ks:
      vals[f"precision_at_{k}"] = sum(rel[:k]) / k
    for k in ndcg_ks:
      dcg = sum(rel[p] / math.log2(p + 2) for p in range(k))
      idcg = sum(1 / math.log2(p + 2) for p in range(min(k, r)))
      vals[f"ndcg_at_{k}"] = dcg / idcg
    for k in map_ks + map_min_r_ks:
      ap = sum(sum(rel[:p + 1]) / (p + 1) for p in range(k) if rel[p])
      if k in map_ks:
        vals[f"map_at_{k}"] = ap / k
      if k in map_min_r_ks:
        vals[f"map_at_{k}_min_r"] = ap / min(k, r)
    for key, v in vals.items():
      sums[key] = sums.get(key, 0.0) + v
  out = {key: v / n_ok for key, v in sums.items()}
  out["num_queries"], out["num_lone_queries"] = len(q), lone
  return out


def clustered(n=40, classes=9, dim=6, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, classes, n)
  centres = rng.standard_normal((classes, dim))
  x = (centres[labels] + 0.9 * rng.standard_normal((n, dim))).astype(np.float32)
  labels[:2] = [100, 101]  # two singleton classes: lone queries in same-set mode
  x[5] = x[9]  # a duplicate, for ties
  return x, labels


KS = dict(recall_ks=(1, 3, 20), precision_ks=(2, 9), ndcg_ks=(4,), map_ks=(3, 9),
          map_min_r_ks=(3, 9))


def assert_same(got, want):
  assert set(got) == set(want)
  for key in want:
    assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_same_set_matches_oracle():
  x, y = clustered()
  got = retrieval_metrics(x, y, **KS, **BLOCKS)
  assert got["num_lone_queries"] == 2
  assert 0 < got["map_at_r"] < 1 and 0 < got["recall_at_3"] < 1
  assert got["map_at_9"] < got["map_at_9_min_r"]  # k > R for most queries: the two differ
  assert_same(got, oracle(x, y, x, y, True, **KS))


def test_gallery_mode_matches_oracle():
  x, y = clustered(seed=1)
  q, lq, g, lg = x[:15], y[:15], x[15:], y[15:]
  lq = lq.copy()
  lq[3] = 555  # a query whose class is not in the gallery
  got = retrieval_metrics(q, lq, gallery_embeddings=g, gallery_labels=lg, **KS, **BLOCKS)
  assert got["num_lone_queries"] >= 1
  assert_same(got, oracle(q, lq, g, lg, False, **KS))


def test_devices_blocks_k_and_dtypes_do_not_change_values():
  x, y = clustered()
  one = Mesh(np.asarray(jax.devices()[:1]), ("d",))
  base = retrieval_metrics(x, y, **KS, **BLOCKS, mesh=one)
  assert retrieval_metrics(x, y, **KS, **BLOCKS) == base  # 8 devices
  assert retrieval_metrics(x, y, **KS, query_block=64, ref_block=64, group=8) == base
  assert retrieval_metrics(x, y, **KS, **BLOCKS, k=25) == base  # deeper search, same values
  xb = jnp.asarray(x, jnp.bfloat16)
  assert retrieval_metrics(xb, jnp.asarray(y), **KS, **BLOCKS) == retrieval_metrics(
      np.asarray(xb, np.float32), y, **KS, **BLOCKS)


def test_bad_input():
  x, y = clustered()
  with pytest.raises(ValueError, match="labels must have shape"):
    retrieval_metrics(x, y[:-1])
  bad = x.copy()
  bad[[3, 4], 1] = np.nan
  with pytest.raises(ValueError, match="2 row"):
    retrieval_metrics(bad, y)
  with pytest.raises(ValueError, match="empty"):
    retrieval_metrics(np.zeros((0, 3), np.float32), np.zeros((0,), int))
  with pytest.raises(ValueError, match="recall_ks"):
    retrieval_metrics(x, y, recall_ks=(1, 40))  # 39 references per query
  with pytest.raises(ValueError, match="precision_ks"):
    retrieval_metrics(x, y, precision_ks=(40,))
  with pytest.raises(ValueError, match="map_min_r_ks"):
    retrieval_metrics(x, y, map_min_r_ks=(0,))
  with pytest.raises(ValueError, match="together"):
    retrieval_metrics(x, y, gallery_embeddings=x)
  with pytest.raises(ValueError, match="integer"):
    retrieval_metrics(x, y.astype(np.float32))


def test_agrees_with_pml_when_installed():
  pytest.importorskip("faiss")
  torch = pytest.importorskip("torch")
  acc = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
  x, y = clustered()
  calc = acc.AccuracyCalculator(include=("precision_at_1", "r_precision",
                                         "mean_average_precision_at_r"),
                                k="max_bin_count", device=torch.device("cpu"))
  ref = calc.get_accuracy(x, y)
  got = retrieval_metrics(x, y, **KS, **BLOCKS)
  assert got["precision_at_1"] == pytest.approx(ref["precision_at_1"], abs=1e-6)
  assert got["r_precision"] == pytest.approx(ref["r_precision"], abs=1e-6)
  assert got["map_at_r"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-6)
