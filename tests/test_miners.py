"""Miners against brute-force loops; jit/vmap; references; degenerate batches; input checks."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmljax.losses import miners

B, D = 8, 5
LABELS = np.array([0, 0, 0, 1, 1, 2, 2, 3], np.int32)  # class 3 is a singleton


def _unit(x):
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _emb(seed=0, b=B, d=D):
  return _unit(np.random.default_rng(seed).normal(size=(b, d)))


def _dist(x, r, distance):
  """Brute-force [B, R] distance (or similarity for "dot") in float64."""
  x, r = np.asarray(x, np.float64), np.asarray(r, np.float64)
  out = np.zeros((len(x), len(r)))
  for i in range(len(x)):
    for j in range(len(r)):
      if distance == "dot":
        out[i, j] = x[i] @ r[j]
      else:
        sq = np.sum((x[i] - r[j]) ** 2)
        out[i, j] = sq if distance == "squared" else math.sqrt(sq)
  return out


def _pair_sets(labels, ref_labels=None, ref_mask=None):
  """Positive / negative reference sets of each anchor, written out."""
  self_ref = ref_labels is None
  rl = labels if self_ref else ref_labels
  ok = np.ones(len(rl), bool) if ref_mask is None else ref_mask
  pos = [[j for j in range(len(rl)) if ok[j] and rl[j] == labels[i] and not (self_ref and i == j)]
         for i in range(len(labels))]
  neg = [[j for j in range(len(rl)) if ok[j] and rl[j] != labels[i]] for i in range(len(labels))]
  return pos, neg


# B references, so that the [B, R] grids share their shapes (and compiles) with in-batch mining.
REFS = dict(ref_embeddings=_emb(50), ref_labels=np.array([0, 1, 2, 4, 0, 1, 3, 0], np.int32),
            ref_mask=np.array([True, True, True, True, False, True, True, False]))


def _closer(a, b, distance):
  return a > b if distance == "dot" else a < b


@pytest.mark.parametrize("distance,with_refs", [("euclidean", False), ("dot", False),
                                                ("squared", True)])
def test_batch_hard_brute_force(distance, with_refs):
  x = _emb(1)
  kw = REFS if with_refs else {}
  r = kw.get("ref_embeddings", x)
  d = _dist(x, r, distance)
  pos_sets, neg_sets = _pair_sets(LABELS, kw.get("ref_labels"), kw.get("ref_mask"))
  want_p = np.zeros(d.shape, bool)
  want_n = np.zeros(d.shape, bool)
  for i in range(B):
    if not pos_sets[i] or not neg_sets[i]:
      continue
    hp = pos_sets[i][0]
    for j in pos_sets[i]:  # hardest positive: the least close
      if _closer(d[i, hp], d[i, j], distance):
        hp = j
    hn = neg_sets[i][0]
    for k in neg_sets[i]:  # hardest negative: the closest
      if _closer(d[i, k], d[i, hn], distance):
        hn = k
    want_p[i, hp] = want_n[i, hn] = True
  got_p, got_n = miners.batch_hard(x, LABELS, distance=distance, **kw)
  np.testing.assert_array_equal(got_p, want_p)
  np.testing.assert_array_equal(got_n, want_n)
  if not with_refs:  # the singleton anchor has no positive, so it mines nothing
    assert not want_p[7].any()


@pytest.mark.parametrize("distance,margin", [("euclidean", 0.3), ("dot", 0.25)])
def test_semi_hard_brute_force(distance, margin):
  x = _emb(2)
  d = _dist(x, x, distance)
  pos_sets, neg_sets = _pair_sets(LABELS)
  want = np.zeros((B, B, B), bool)
  for i in range(B):
    for j in pos_sets[i]:
      for k in neg_sets[i]:
        gap = d[i, k] - d[i, j] if distance != "dot" else d[i, j] - d[i, k]
        want[i, j, k] = 0 < gap <= margin
  got = miners.semi_hard(x, LABELS, margin=margin, distance=distance)
  assert want.any() and not want.all()
  np.testing.assert_array_equal(got, want)


def _naive_dw_probs(x, labels, cutoff=0.5, nonzero=1.4, refs=None, ref_labels=None,
                    ref_mask=None):
  r = x if refs is None else refs
  n = x.shape[1]
  d = _dist(x, r, "euclidean")
  _, neg_sets = _pair_sets(labels, ref_labels, ref_mask)
  out = np.zeros(d.shape)
  for i in range(len(x)):
    w = {}
    for k in neg_sets[i]:
      if d[i, k] < nonzero:
        dk = max(d[i, k], cutoff)
        w[k] = 1.0 / (dk ** (n - 2) * (1 - dk * dk / 4) ** ((n - 3) / 2))
    if not w:  # fallback: uniform over the negatives
      w = {k: 1.0 for k in neg_sets[i]}
    tot = sum(w.values())
    for k, v in w.items():
      out[i, k] = v / tot
  return out


def test_distance_weighted_probs_brute_force():
  # Spread points so that some negatives lie beyond 1.4, some below the 0.5 cutoff.
  x = _emb(3)
  x[1] = _unit(x[0] + 0.1)  # a close pair
  x[3] = _unit(x[0] + 0.2)  # a negative closer than the cutoff
  got = miners.distance_weighted_probs(x, LABELS)
  want = _naive_dw_probs(x, LABELS)
  d = _dist(x, x, "euclidean")
  assert (d > 1.4).any() and (d[~np.eye(B, dtype=bool)] < 0.5).any()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
  got = miners.distance_weighted_probs(x, LABELS, **REFS)
  want = _naive_dw_probs(x, LABELS, refs=REFS["ref_embeddings"], ref_labels=REFS["ref_labels"],
                         ref_mask=REFS["ref_mask"])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def test_distance_weighted_fallback_and_no_negatives():
  # Two antipodal classes: every negative distance is 2 > 1.4 -> uniform over the negatives.
  e = np.zeros((B, D), np.float32)
  e[:4, 0] = 1.0
  e[4:, 0] = -1.0
  y = np.array([0, 0, 0, 0, 1, 1, 1, 1], np.int32)
  p = np.asarray(miners.distance_weighted_probs(e, y))
  want = np.where(y[:, None] != y[None, :], 0.25, 0.0)
  np.testing.assert_allclose(p, want, atol=1e-7)
  # A single class: no negatives, all-zero rows and no samples.
  y1 = np.zeros(B, np.int32)
  assert not np.asarray(miners.distance_weighted_probs(e, y1)).any()
  assert not np.asarray(miners.distance_weighted(e, y1, rng=jax.random.PRNGKey(0))).any()


def test_distance_weighted_sampling_frequencies():
  x = _emb(4)
  probs = np.asarray(miners.distance_weighted_probs(x, LABELS))
  keys = jax.random.split(jax.random.PRNGKey(0), 2000)
  masks = jax.jit(jax.vmap(lambda k: miners.distance_weighted(x, LABELS, rng=k)))(keys)
  masks = np.asarray(masks)
  assert (masks.sum(-1) == 1).all()  # exactly one negative per anchor
  freq = masks.mean(0)
  sd = np.sqrt(probs * (1 - probs) / len(keys))
  assert (np.abs(freq - probs) <= 5 * sd + 1e-9).all()
  # Several draws per anchor: at most num_samples, only negatives.
  m = np.asarray(miners.distance_weighted(x, LABELS, rng=jax.random.PRNGKey(1), num_samples=3))
  assert (m.sum(-1) <= 3).all() and (m.sum(-1) >= 1).all()
  assert not (m & (LABELS[:, None] == LABELS[None, :])).any()


@pytest.mark.parametrize("distance,eps,with_refs", [("dot", 0.1, False), ("euclidean", 0.05, True)])
def test_multi_similarity_miner_brute_force(distance, eps, with_refs):
  x = _emb(5)
  kw = REFS if with_refs else {}
  r = kw.get("ref_embeddings", x)
  d = _dist(x, r, distance)
  pos_sets, neg_sets = _pair_sets(LABELS, kw.get("ref_labels"), kw.get("ref_mask"))
  want_p = np.zeros(d.shape, bool)
  want_n = np.zeros(d.shape, bool)
  for i in range(B):
    if not pos_sets[i] or not neg_sets[i]:
      continue
    if distance == "dot":
      min_pos = min(d[i, j] for j in pos_sets[i])
      max_neg = max(d[i, k] for k in neg_sets[i])
      for j in pos_sets[i]:
        want_p[i, j] = d[i, j] - eps < max_neg
      for k in neg_sets[i]:
        want_n[i, k] = d[i, k] + eps > min_pos
    else:
      max_pos = max(d[i, j] for j in pos_sets[i])
      min_neg = min(d[i, k] for k in neg_sets[i])
      for j in pos_sets[i]:
        want_p[i, j] = d[i, j] + eps > min_neg
      for k in neg_sets[i]:
        want_n[i, k] = d[i, k] - eps < max_pos
  got_p, got_n = miners.multi_similarity_miner(x, LABELS, epsilon=eps, distance=distance, **kw)
  assert want_n.any() and not want_n[np.asarray(got_n) == 0].any()
  np.testing.assert_array_equal(got_p, want_p)
  np.testing.assert_array_equal(got_n, want_n)


@pytest.mark.parametrize("distinct", [False, True])
def test_hardest_negative_per_positive_brute_force(distinct):
  x = _emb(6)
  # Anchor 0 has 2 positives; give the batch a class with more positives than negatives.
  y = np.array([0, 0, 0, 0, 0, 0, 1, 2], np.int32)
  d = _dist(x, x, "euclidean")
  pos_sets, neg_sets = _pair_sets(y)
  got = miners.hardest_negative_per_positive(x, y, distinct=distinct)
  want_idx = np.zeros((B, B), np.int32)
  want_valid = np.zeros((B, B), bool)
  for i in range(B):
    ranked = sorted(neg_sets[i], key=lambda k: d[i, k])
    for r, j in enumerate(pos_sets[i]):
      if distinct and r >= len(ranked):
        continue
      if ranked:
        want_idx[i, j] = ranked[r] if distinct else ranked[0]
        want_valid[i, j] = True
  np.testing.assert_array_equal(got.valid, want_valid)
  np.testing.assert_array_equal(got.index, want_idx)
  assert (~want_valid[:6]).any() if distinct else want_valid[:6, :6].sum() == 30
  t = np.asarray(got.triplet_mask())
  assert t.shape == (B, B, B) and t.sum() == want_valid.sum()
  for i, j in zip(*np.nonzero(want_valid)):
    assert t[i, j, want_idx[i, j]]
  counts = np.asarray(got.negative_counts())
  assert counts.sum() == want_valid.sum() and not counts[y[:, None] == y[None, :]].any()


def test_hardest_negative_with_references_and_empty_mask():
  x = _emb(7)
  got = miners.hardest_negative_per_positive(x, LABELS, distance="dot", **REFS)
  d = _dist(x, REFS["ref_embeddings"], "dot")
  pos_sets, neg_sets = _pair_sets(LABELS, REFS["ref_labels"], REFS["ref_mask"])
  for i in range(B):
    for j in range(B):
      assert bool(got.valid[i, j]) == (j in pos_sets[i] and bool(neg_sets[i]))
      if got.valid[i, j]:
        assert int(got.index[i, j]) == max(neg_sets[i], key=lambda k: d[i, k])
  empty = dict(REFS, ref_mask=np.zeros(B, bool))
  assert not np.asarray(miners.hardest_negative_per_positive(x, LABELS, **empty).valid).any()
  for m in miners.batch_hard(x, LABELS, **empty) + miners.multi_similarity_miner(x, LABELS,
                                                                                 **empty):
    assert not np.asarray(m).any()
  assert not np.asarray(miners.semi_hard(x, LABELS, **empty)).any()
  assert not np.asarray(miners.distance_weighted(x, LABELS, rng=jax.random.PRNGKey(0),
                                                 **empty)).any()


def test_jit_and_vmap_agree():
  xs = np.stack([_emb(10 + s) for s in range(3)])
  fns = {
      "batch_hard": lambda e: miners.batch_hard(e, LABELS),
      "semi_hard": lambda e: miners.semi_hard(e, LABELS),
      "ms": lambda e: miners.multi_similarity_miner(e, LABELS),
      "hn": lambda e: tuple(miners.hardest_negative_per_positive(e, LABELS, distinct=True)),
      "dw": lambda e: miners.distance_weighted(e, LABELS, rng=jax.random.PRNGKey(2)),
  }
  for name, f in fns.items():
    batched = jax.jit(jax.vmap(f))(xs)
    for s in range(3):
      one = f(xs[s])
      for a, b in zip(jax.tree_util.tree_leaves(batched), jax.tree_util.tree_leaves(one)):
        np.testing.assert_array_equal(a[s], b, err_msg=name)


def test_bfloat16_and_gradient_free():
  x = _emb(11)
  a = miners.batch_hard(jnp.asarray(x, jnp.bfloat16), LABELS)
  assert a[0].dtype == jnp.bool_
  # Miners can sit inside a differentiated loss: they contribute no gradient.
  def loss(e):
    _, neg = miners.batch_hard(e, LABELS)
    return jnp.sum(jnp.where(neg, e @ e.T, 0.0))
  g = jax.grad(loss)(x)
  assert np.all(np.isfinite(g))


def test_bad_inputs_raise():
  x = _emb(12)
  with pytest.raises(ValueError, match="distance"):
    miners.batch_hard(x, LABELS, distance="cosine")
  with pytest.raises(ValueError, match="margin"):
    miners.semi_hard(x, LABELS, margin=-0.1)
  with pytest.raises(ValueError, match="epsilon"):
    miners.multi_similarity_miner(x, LABELS, epsilon=-1.0)
  with pytest.raises(ValueError, match="nonzero_loss_cutoff"):
    miners.distance_weighted_probs(x, LABELS, cutoff=0.5, nonzero_loss_cutoff=0.4)
  with pytest.raises(ValueError, match="num_samples"):
    miners.distance_weighted(x, LABELS, rng=jax.random.PRNGKey(0), num_samples=0)
  with pytest.raises(ValueError, match="labels"):
    miners.hardest_negative_per_positive(x, LABELS[:4])


def test_agrees_with_pml():
  torch = pytest.importorskip("torch")
  pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
  x = _emb(13)
  xt, yt = torch.tensor(x), torch.tensor(LABELS, dtype=torch.long)
  a, p, n = pml_miners.BatchHardMiner()(xt, yt)
  hp, hn = miners.batch_hard(x, LABELS)
  want_p = np.zeros((B, B), bool)
  want_n = np.zeros((B, B), bool)
  want_p[a.numpy(), p.numpy()] = True
  want_n[a.numpy(), n.numpy()] = True
  np.testing.assert_array_equal(hp, want_p)
  np.testing.assert_array_equal(hn, want_n)
  a1, p1, a2, n2 = pml_miners.MultiSimilarityMiner(epsilon=0.1)(xt, yt)
  mp, mn = miners.multi_similarity_miner(x, LABELS, epsilon=0.1)
  want_p = np.zeros((B, B), bool)
  want_n = np.zeros((B, B), bool)
  want_p[a1.numpy(), p1.numpy()] = True
  want_n[a2.numpy(), n2.numpy()] = True
  np.testing.assert_array_equal(mp, want_p)
  np.testing.assert_array_equal(mn, want_n)
  a, p, n = pml_miners.TripletMarginMiner(margin=0.3, type_of_triplets="semihard")(xt, yt)
  want = np.zeros((B, B, B), bool)
  want[a.numpy(), p.numpy(), n.numpy()] = True
  np.testing.assert_array_equal(miners.semi_hard(x, LABELS, margin=0.3), want)


# ----------------------------------------------------------------------------- mined pair masks
# (issue 11: PROFS's "one hardest negative per positive pair" reaches the losses as masks)


@pytest.mark.parametrize("distinct", [False, True])
def test_hardest_negative_pair_mask_and_anchor_restriction_brute_force(distinct):
  """``NegativeChoice.pair_mask()`` and ``pair_mask=`` (only some anchors mine) against loops:
  the mask holds exactly the positives that got a negative and the chosen negative pairs; with
  ``distinct=True`` every anchor has as many negative pairs as positive pairs."""
  x = _emb(21)
  y = np.array([0, 0, 0, 1, 1, 1, 2, 2], np.int32)
  anchors = np.array([True, False, False, True, False, False, True, False])  # "representatives"
  rows = np.broadcast_to(anchors[:, None], (B, B))
  d = _dist(x, x, "euclidean")
  pos_sets, neg_sets = _pair_sets(y)
  want = np.zeros((B, B), bool)
  for i in np.flatnonzero(anchors):
    ranked = sorted(neg_sets[i], key=lambda k: (d[i, k], k))
    for r, j in enumerate(pos_sets[i]):
      want[i, j] = True
      want[i, ranked[r] if distinct else ranked[0]] = True
  got = miners.hardest_negative_per_positive(x, y, pair_mask=rows, distinct=distinct)
  mask = np.asarray(got.pair_mask())
  np.testing.assert_array_equal(mask, want)
  assert not mask[~anchors].any()                                # other rows mine nothing
  same = y[:, None] == y[None, :]
  n_pos, n_neg = (mask & same).sum(1), (mask & ~same).sum(1)
  if distinct:
    np.testing.assert_array_equal(n_pos, n_neg)                  # balanced, anchor by anchor
  else:
    assert (n_neg[anchors] == 1).all()
  # pair_mask also restricts the candidates: a negative left out of it is never chosen.
  i = 0
  hardest = min(neg_sets[i], key=lambda k: d[i, k])
  cand = rows.copy()
  cand[i, hardest] = False
  again = miners.hardest_negative_per_positive(x, y, pair_mask=cand, distinct=False)
  assert int(again.index[i, 1]) == sorted(neg_sets[i], key=lambda k: d[i, k])[1]
  with pytest.raises(ValueError, match="pair_mask"):
    miners.hardest_negative_per_positive(x, y, pair_mask=rows[:4])
