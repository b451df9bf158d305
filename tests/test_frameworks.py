"""Frameworks: registry errors, standard loss wiring, and CCP's pieces (projections, anchor, k-center
re-initialisation seeded by the previous proxies, proximal term off in the first projection)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmljax.configs import base_config, shrink
from dmljax import frameworks, losses, optim, parallel
from dmljax import state as state_lib

C, P, B, D = 3, 2, 5, 2  # classes, proxies per class, pool size, embedding dim


def _config(**ccp):
  c = shrink(base_config())
  c.ccp.proxies_per_class, c.ccp.pool_size = P, B
  c.ccp.patience, c.ccp.max_projection_steps = 2, 100
  for k, v in ccp.items():
    c.ccp[k] = v
  return c


def _pool(index):
  """A deterministic [C, B, D] pool per pool index (distinct points: no k-center ties)."""
  rng = np.random.default_rng(100 + index)
  return rng.normal(size=(C, B, D)).astype(np.float32), np.ones((C, B), bool)


class _Ctx(frameworks.HostContext):
  pass


def _setup(**ccp):
  c = _config(**ccp)
  fw = frameworks.get_framework(c, num_classes=C, embedding_dim=D)
  tx = optim.make_optimizer(c.optim, 100)
  calls = []

  def embed_pool(ctx, model_params, batch_stats, index):
    del ctx, batch_stats
    calls.append((jax.tree.map(np.asarray, model_params), index))
    return _pool(index)

  if hasattr(fw, "embed_pool"):
    fw.embed_pool = embed_pool   # deterministic pools instead of embedded training images
  mesh = parallel.make_mesh(jax.devices()[:1])
  ctx = frameworks.HostContext(config=c, tx=tx, num_classes=C, train_labels=np.arange(C),
                               embed=None, evaluate=None,
                               replicate=lambda t: parallel.replicate(t, mesh),
                               log=lambda *a, **k: None)
  model_params = {"w": jnp.ones((2, 2)), "b": jnp.zeros((2,))}
  extra, fs = fw.init(jax.random.PRNGKey(0), model_params, {})
  st = state_lib.create_train_state(rng=jax.random.PRNGKey(1), model_params=model_params,
                                    batch_stats={}, extra_params=extra, framework_state=fs, tx=tx)
  return c, fw, ctx, st, calls


def _naive_kcenter(points, seeds, k):
  """CCP Algorithm 2 for one class, written as loops: argmax_u min_{v in seeds+picked} |u-v|^2."""
  centers, picked = [np.asarray(s) for s in seeds], []
  for _ in range(k):
    best, best_d = None, -1.0
    for i, u in enumerate(points):
      if i in picked:
        continue
      d = min(float(np.sum((u - v) ** 2)) for v in centers) if centers else 0.0
      if d > best_d:
        best, best_d = i, d
    picked.append(best)
    centers.append(points[best])
  return np.stack([points[i] for i in picked])


def _advance(st, steps, delta=0.5):
  """Simulates training: move the model and proxies, advance the step counter."""
  params = jax.tree.map(lambda x: x + delta, st.params)
  return st.replace(params=params, step=st.step + steps)


def _mark_best(st):
  return st.replace(best={"params": state_lib.copy_tree(st.params),
                          "batch_stats": state_lib.copy_tree(st.batch_stats)})


def test_unknown_framework_and_loss_list_valid_names():
  c = _config()
  c.framework = "ccpp"
  with pytest.raises(ValueError, match=r"Unknown framework 'ccpp'.*'ccp'.*'standard'"):
    frameworks.get_framework(c, num_classes=C, embedding_dim=D)
  c = _config()
  c.loss.name = "contrastiv"
  with pytest.raises(ValueError, match=r"Unknown loss 'contrastiv'.*contrastive"):
    frameworks.get_framework(c, num_classes=C, embedding_dim=D)
  c = _config()
  c.loss.name = "proxy_anchor"
  c.loss.kwargs = {}
  with pytest.raises(ValueError, match="pair loss"):
    frameworks.get_framework(c, num_classes=C, embedding_dim=D)


def test_ccp_rollback_projection_end_by_patience_reinit_anchor():
  # The rollback ablation (dmljax's default before issue 18, when the default became the
  # authors' "current"; see test_ccp_authored_projection_ends_match_a_hand_written_loop).
  c, fw, ctx, st, calls = _setup(start_from="projection_best")
  st = fw.on_start(st, ctx)
  # First proxies: pool 0, no seeds.
  assert calls[-1][1] == 0
  first = np.asarray(st.params["proxies"]).reshape(C, P, D)
  pool0, _ = _pool(0)
  for k in range(C):
    # Every first proxy is a pool point of its class and they are distinct.
    d = np.abs(first[k][:, None] - pool0[k][None]).sum(-1).min(-1)
    np.testing.assert_allclose(d, 0.0, atol=1e-6)
    assert len({tuple(r) for r in first[k]}) == P
  assert int(st.framework["projection"]) == 0

  st = _advance(st, 10)
  st = _mark_best(st)
  best_params = jax.tree.map(np.asarray, st.params)
  st, ev = fw.after_eval(st, ctx, {"map_at_r": 0.5})  # improves: projection continues
  assert int(st.framework["projection"]) == 0 and "ccp/projection" not in ev
  # The spread logged at every evaluation: mean distance between two proxies of one class.
  px = np.asarray(st.params["proxies"], np.float64).reshape(C, P, D)
  naive = np.mean([np.linalg.norm(px[k, i] - px[k, j])
                   for k in range(C) for i in range(P) for j in range(P) if i != j])
  np.testing.assert_allclose(ev["ccp/proxy_spread"], naive, rtol=1e-6)
  st = _advance(st, 10)                                      # worse weights, not the best
  st, _ = fw.after_eval(st, ctx, {"map_at_r": 0.4})
  assert int(st.framework["projection"]) == 0
  st = _advance(st, 10)
  st, ev = fw.after_eval(st, ctx, {"map_at_r": 0.45})  # 2nd eval without improvement
  assert int(st.framework["projection"]) == 1
  assert ev["ccp/projection"] == 1 and ev["ccp/projection_steps"] == 30
  assert int(st.framework["proj_start_step"]) == 30
  # Model restored to the best snapshot, anchor := best model params.
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, st.params["model"]),
               best_params["model"])
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, st.anchor),
               best_params["model"])
  # The pool of projection 1 was embedded with the best (anchor) params.
  assert calls[-1][1] == 1
  jax.tree.map(np.testing.assert_array_equal, calls[-1][0], best_params["model"])
  # New proxies: greedy k-center on pool 1 seeded with the converged (best) proxies.
  pool1, _ = _pool(1)
  seeds = best_params["proxies"].reshape(C, P, D)
  got = np.asarray(st.params["proxies"]).reshape(C, P, D)
  for k in range(C):
    np.testing.assert_allclose(got[k], _naive_kcenter(pool1[k], seeds[k], P), atol=1e-6)
  assert "ccp/pool_radius_new_proxies" in ev


def test_ccp_projection_end_by_max_steps_and_opt_state_reset():
  c, fw, ctx, st, _ = _setup(max_projection_steps=25, patience=100, reset_proxy_opt_state=True)
  st = fw.on_start(st, ctx)
  # Fake non-zero Adam moments everywhere.
  st = st.replace(opt_state=jax.tree.map(lambda x: x + 1.0 if x.dtype == jnp.float32 else x,
                                         st.opt_state))
  st = _mark_best(_advance(st, 20))
  st, _ = fw.after_eval(st, ctx, {"map_at_r": 0.1})
  assert int(st.framework["projection"]) == 0
  st = _mark_best(_advance(st, 5))
  st, _ = fw.after_eval(st, ctx, {"map_at_r": 0.2})   # improving, but 25 steps reached
  assert int(st.framework["projection"]) == 1
  adam = [s for s in st.opt_state if isinstance(s, dict) and "proxies" in s][0]
  assert float(jnp.abs(adam["proxies"].mu).max()) == 0.0          # proxies' moments reset
  assert int(adam["proxies"].count) == 0                           # ... with their own count
  assert float(jnp.min(adam["model"].mu["w"])) == 1.0               # model's moments kept


def test_ccp_default_keeps_optimizer_state_and_has_no_step_cap():
  # Guards issue 12: the paper ends projections by patience alone and never resets the proxies'
  # optimizer state; the old defaults capped projections and zeroed the proxy moments.
  c, fw, ctx, st, _ = _setup(max_projection_steps=base_config().ccp.max_projection_steps,
                             patience=2)
  assert c.ccp.max_projection_steps == 0 and not c.ccp.reset_proxy_opt_state
  st = fw.on_start(st, ctx)
  st = st.replace(opt_state=jax.tree.map(lambda x: x + 1.0 if x.dtype == jnp.float32 else x,
                                         st.opt_state))
  for i in range(5):                     # improving every time, 10,000 steps each: never ends
    st = _mark_best(_advance(st, 10_000))
    st, _ = fw.after_eval(st, ctx, {"map_at_r": 0.1 * (i + 1)})
  assert int(st.framework["projection"]) == 0
  st, _ = fw.after_eval(_advance(st, 1), ctx, {"map_at_r": 0.0})
  st, _ = fw.after_eval(_advance(st, 1), ctx, {"map_at_r": 0.0})   # patience 2: ends now
  assert int(st.framework["projection"]) == 1
  adam = [s for s in st.opt_state if isinstance(s, dict) and "proxies" in s][0]
  assert float(jnp.min(adam["proxies"].mu)) == 1.0   # moments kept through re-initialisation


def _snapshot(st):
  return jax.tree.map(np.asarray, {"params": st.params, "batch_stats": st.batch_stats})


@pytest.mark.parametrize("mode", ["projection_best", "converged", "run_best"])
def test_ccp_start_from_modes(mode):
  # Guards issue 12: the run rewound to the all-time best, so a projection that never beat it
  # was discarded. Each mode starts the next projection (params, anchor, k-center seeds) from
  # its own solution; projection 1 below never beats projection 0's best.
  c, fw, ctx, st, calls = _setup(start_from=mode, patience=2)
  st = fw.on_start(st, ctx)
  st = _mark_best(_advance(st, 10))
  st, _ = fw.after_eval(st, ctx, {"map_at_r": 0.5})              # projection 0's best, also the run's best
  best0 = _snapshot(st)
  st, _ = fw.after_eval(_advance(st, 10), ctx, {"map_at_r": 0.4})
  st = _advance(st, 10)
  end0 = _snapshot(st)
  st, _ = fw.after_eval(st, ctx, {"map_at_r": 0.45})             # projection 0 ends
  assert int(st.framework["projection"]) == 1
  start1 = {"projection_best": best0, "converged": end0, "run_best": best0}[mode]

  st = _advance(st, 10)
  st, _ = fw.after_eval(st, ctx, {"map_at_r": 0.3})              # projection 1's best, below the run's best
  best1 = _snapshot(st)
  st, _ = fw.after_eval(_advance(st, 10), ctx, {"map_at_r": 0.2})
  st = _advance(st, 10)
  end1 = _snapshot(st)
  st, _ = fw.after_eval(st, ctx, {"map_at_r": 0.1})              # projection 1 ends
  assert int(st.framework["projection"]) == 2
  start2 = {"projection_best": best1, "converged": end1, "run_best": best0}[mode]

  # After projection 1: model, anchor, pool embedding params and k-center seeds from start2.
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, st.params["model"]),
               start2["params"]["model"])
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, st.anchor),
               start2["params"]["model"])
  assert calls[2][1] == 2
  jax.tree.map(np.testing.assert_array_equal, calls[2][0], start2["params"]["model"])
  pool2, _ = _pool(2)
  seeds = start2["params"]["proxies"].reshape(C, P, D)
  got = np.asarray(st.params["proxies"]).reshape(C, P, D)
  for k in range(C):
    np.testing.assert_allclose(got[k], _naive_kcenter(pool2[k], seeds[k], P), atol=1e-6)
  # And projection 1 itself had started from start1.
  jax.tree.map(np.testing.assert_array_equal, calls[1][0], start1["params"]["model"])
  if mode != "run_best":
    # The two starting points differ: projection 1's work is kept, not discarded.
    assert not np.array_equal(start2["params"]["model"]["w"], best0["params"]["model"]["w"])


@pytest.mark.parametrize("name,kwargs", [
    ("multi_similarity", {"alpha": 3.0, "beta": 40.0, "base": 0.4}),
    ("triplet_margin", {"margin": 0.3})])
def test_ccp_in_batch_term_is_the_configured_loss(name, kwargs):
  # Issue 18: the authors' CCP loss subclasses the configured pair loss, so MS-CCP's in-batch
  # term is multi-similarity and Triplet-CCP's triplet, with the loss's own settings, at 0.1.
  c, _, ctx, st, _ = _setup()
  c.unlock()
  c.loss.name = name
  c.loss.kwargs = kwargs
  c.lock()
  fw = frameworks.get_framework(c, num_classes=C, embedding_dim=D)
  fw.embed_pool = lambda ctx, model_params, batch_stats, index: _pool(index)
  st = fw.on_start(st, ctx)
  rng = np.random.default_rng(3)
  emb = losses.bounded_normalize(jnp.asarray(rng.normal(size=(6, D)), jnp.float32))
  labels = jnp.asarray([0, 0, 1, 1, 2, 2], jnp.int32)
  total, (parts, _) = fw.loss(st.params, emb, labels, st, None)
  fn = losses.get_loss(name)
  proxies = losses.bounded_normalize(st.params["proxies"])   # the model's normalisation
  s2p = fn(emb, labels, ref_embeddings=proxies, ref_labels=st.framework["proxy_labels"], **kwargs)
  inb = fn(emb, labels, **kwargs)
  assert abs(float(inb)) > 1e-4 and abs(float(inb) - float(s2p)) > 1e-4   # distinct terms
  np.testing.assert_allclose(float(parts["loss/in_batch"]), float(inb), rtol=1e-5)
  np.testing.assert_allclose(float(total), float(s2p) + 0.1 * float(inb), rtol=1e-5)
  # The ablation: a named in-batch loss with its own settings (contrastive for every variant).
  c.unlock()
  c.ccp.in_batch_loss = "contrastive"
  fw = frameworks.get_framework(c, num_classes=C, embedding_dim=D)
  total, _ = fw.loss(st.params, emb, labels, st, None)
  inb = losses.contrastive(emb, labels, **dict(c.ccp.in_batch_kwargs))
  np.testing.assert_allclose(float(total), float(s2p) + 0.1 * float(inb), rtol=1e-5)
  c.ccp.in_batch_loss = "proxy_anchor"
  with pytest.raises(ValueError, match="in_batch_loss"):
    frameworks.get_framework(c, num_classes=C, embedding_dim=D)


def test_ccp_proxy_spread_never_builds_a_four_dim_array():
  # Guards issue 12: the spread built a [C, P, P, D] host array per evaluation (185 MB at SOP).
  from dmljax.frameworks import ccp
  x = jnp.asarray(np.random.default_rng(0).normal(size=(7, 4, 16)), jnp.float32)

  def shapes(jaxpr):   # every intermediate's shape, nested jaxprs (the jit) included
    for e in jaxpr.eqns:
      yield from (v.aval.shape for v in e.outvars)
      for p in e.params.values():
        if hasattr(p, "jaxpr"):
          yield from shapes(p.jaxpr)
  found = list(shapes(jax.make_jaxpr(ccp._spread_sum)(x).jaxpr))
  assert len(found) > 3 and max(len(s) for s in found) <= 3
  fw = _setup()[1]
  xs = np.asarray(x, np.float64)
  naive = np.mean([np.linalg.norm(xs[c, i] - xs[c, j]) for c in range(7) for i in range(4)
                   for j in range(4) if i != j])
  fw.num_classes, fw.per_class = 7, 4
  np.testing.assert_allclose(fw.proxy_spread(x.reshape(28, 16)), naive, rtol=1e-5)


def test_ccp_without_alternation_never_reinitialises():
  c, fw, ctx, st, calls = _setup(alternate=False)
  st = fw.on_start(st, ctx)
  proxies = np.asarray(st.params["proxies"])
  for i in range(6):
    st = _advance(st, 200)
    st, _ = fw.after_eval(st, ctx, {"map_at_r": 0.1})
  assert int(st.framework["projection"]) == 0 and len(calls) == 1
  np.testing.assert_allclose(np.asarray(st.params["proxies"]), proxies + 6 * 0.5)


def test_ccp_loss_proximal_off_in_first_projection():
  c, fw, ctx, st, _ = _setup()
  st = fw.on_start(st, ctx)
  rng = np.random.default_rng(0)
  emb = jnp.asarray(rng.normal(size=(6, D)), jnp.float32)
  labels = jnp.asarray([0, 0, 1, 1, 2, 2], jnp.int32)
  params = jax.tree.map(lambda x: x + 0.25, st.params)   # theta != anchor
  lam = c.ccp.lam
  l0, (m0, _) = fw.loss(params, emb, labels, st, None)
  assert float(m0["loss/proximal"]) == 0.0
  st1 = st.replace(framework=dict(st.framework, projection=jnp.asarray(1, jnp.int32)))
  l1, (m1, _) = fw.loss(params, emb, labels, st1, None)
  sq = sum(float(jnp.sum((a - b) ** 2)) for a, b in
           zip(jax.tree.leaves(params["model"]), jax.tree.leaves(st.anchor)))
  np.testing.assert_allclose(float(m1["loss/proximal"]), lam / 2 * sq, rtol=1e-5)
  np.testing.assert_allclose(float(l1) - float(l0), lam / 2 * sq, atol=1e-6)
  # The data term: 1.0 x sample-to-proxy C1 + 0.1 x in-batch C1 (the authors' weights).
  kw = dict(c.loss.kwargs)
  s2p = losses.contrastive(emb, labels,
                           ref_embeddings=losses.bounded_normalize(params["proxies"]),
                           ref_labels=st.framework["proxy_labels"], **kw)
  inb = losses.contrastive(emb, labels, **kw)
  np.testing.assert_allclose(float(l0), float(s2p) + 0.1 * float(inb), rtol=1e-5)
  # The proxies get no proximal gradient.
  g = jax.grad(lambda p: fw.loss(p, emb, labels, st1, None)[0])(params)
  g0 = jax.grad(lambda p: fw.loss(p, emb, labels, st, None)[0])(params)
  np.testing.assert_allclose(np.asarray(g["proxies"]), np.asarray(g0["proxies"]), atol=1e-6)


def test_standard_proxy_and_pair_losses():
  c = _config()
  c.framework = "standard"
  fw = frameworks.get_framework(c, num_classes=C, embedding_dim=D)
  extra, fs = fw.init(jax.random.PRNGKey(0), {"w": jnp.ones(2)}, {})
  assert extra == {} and fs == {}
  emb = jnp.asarray(np.random.default_rng(1).normal(size=(6, D)), jnp.float32)
  labels = jnp.asarray([0, 0, 1, 1, 2, 2], jnp.int32)
  st = state_lib.create_train_state(rng=jax.random.PRNGKey(1), model_params={"w": jnp.ones(2)},
                                    batch_stats={}, extra_params={}, framework_state={},
                                    tx=optim.make_optimizer(c.optim, 10))
  val, _ = fw.loss(st.params, emb, labels, st, None)
  np.testing.assert_allclose(float(val), float(losses.contrastive(emb, labels, **c.loss.kwargs)))
  c.loss.name, c.loss.kwargs = "proxy_nca", {}
  c.standard.proxies_per_class = 2
  fw = frameworks.get_framework(c, num_classes=C, embedding_dim=D)
  extra, fs = fw.init(jax.random.PRNGKey(0), {"w": jnp.ones(2)}, {})
  assert extra["proxies"].shape == (C * 2, D)
  np.testing.assert_array_equal(np.asarray(fs["proxy_labels"]), [0, 0, 1, 1, 2, 2])


@pytest.mark.parametrize("mode,model_norm,fn", [
    ("model", "bounded", losses.bounded_normalize),   # the default: as the embeddings
    ("model", "l2", losses.l2_normalize),
    ("l2", "bounded", losses.l2_normalize),
    ("none", "none", lambda x: x)])
def test_ccp_proxy_normalization_inside_the_loss(mode, model_norm, fn):
  # Issue 18: proxies are stored raw and the loss normalises them as the embeddings.
  c, fw, ctx, st, _ = _setup(proxy_normalization=mode,
                             pool_embeddings="normalized" if mode == "none" else "raw")
  assert base_config().ccp.proxy_normalization == "model"
  c.unlock()
  c.model.normalization = model_norm
  fw = frameworks.get_framework(c, num_classes=C, embedding_dim=D)
  fw.embed_pool = lambda ctx, model_params, batch_stats, index: _pool(index)
  st = fw.on_start(st, ctx)
  emb = losses.l2_normalize(jnp.asarray(np.random.default_rng(5).normal(size=(6, D)), jnp.float32))
  labels = jnp.asarray([0, 0, 1, 1, 2, 2], jnp.int32)
  scaled = dict(st.params, proxies=st.params["proxies"] * 5.0)
  got, _ = fw.loss(scaled, emb, labels, st, None)
  kw = dict(c.loss.kwargs)
  want = (losses.contrastive(emb, labels, ref_embeddings=fn(scaled["proxies"]),
                             ref_labels=st.framework["proxy_labels"], **kw)
          + 0.1 * losses.contrastive(emb, labels, **kw))
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  c.ccp.proxy_normalization = "unit"
  with pytest.raises(ValueError, match="proxy_normalization"):
    frameworks.get_framework(c, num_classes=C, embedding_dim=D)
  # A raw pool compared unnormalised with normalised embeddings is refused.
  c.ccp.proxy_normalization, c.model.normalization = "none", "bounded"
  c.ccp.pool_embeddings = "raw"
  with pytest.raises(ValueError, match="pool_embeddings"):
    frameworks.get_framework(c, num_classes=C, embedding_dim=D)


def _authors_loop(metrics, deltas, lagged, patience, margin=1e-5):
  """The authors' CCP callback, as a plain loop over evaluations (issue 18's reading of
  ``callback.py``): improvement = beating the projection's best by more than ``margin``; each
  improvement stores the current model and proxies as the projection's best; after ``patience``
  evaluations without one, the anchor becomes the best model, the proxies are all replaced by
  greedy k-center on a pool embedded with the *current* model, seeded with the best proxies
  (zeros before the first projection), and the model carries on. Returns the sequence of
  ``(model, proxies, anchor, pool model, projection)`` after every evaluation."""
  model = {"b": np.zeros(2, np.float32), "w": np.ones((2, 2), np.float32)}
  best_model, best_proxies = None, np.zeros((C * P, D), np.float32)
  pool0, _ = _pool(0)
  proxies = np.concatenate([_naive_kcenter(pool0[k], np.zeros((P, D)), P) for k in range(C)])
  anchor, projection, pool_model = dict(model), 0, dict(model)
  best, since, logged = -np.inf, 0, 0.0
  out = []
  for metric, delta in zip(metrics, deltas):
    model = {k: v + delta for k, v in model.items()}      # training moves model and proxies
    proxies = proxies + delta
    seen, logged = (logged, metric) if lagged else (metric, metric)
    if seen > best + margin:
      best, since = seen, 0
      best_model, best_proxies = dict(model), proxies.copy()
    else:
      since += 1
    if since == patience:
      anchor, pool_model, projection = dict(best_model), dict(model), projection + 1
      pool, _ = _pool(projection)
      seeds = best_proxies.reshape(C, P, D)
      proxies = np.concatenate([_naive_kcenter(pool[k], seeds[k], P) for k in range(C)])
      best, since = -np.inf, 0
    out.append((dict(model), proxies.copy(), dict(anchor), dict(pool_model), projection))
  return out


@pytest.mark.parametrize("lagged", [False, True])
def test_ccp_authored_projection_ends_match_a_hand_written_loop(lagged):
  # Issue 18: at a projection end the authors set only the anchor to the projection's best; the
  # model keeps its current weights, the pool is embedded with it, and k-center is seeded with
  # the projection's best proxies. Projection 0 ends on evaluations worse than its best;
  # projection 1 never beats projection 0 (its own best is still the anchor); projection 2 beats
  # both; ties within the 1e-5 margin do not count as improvements.
  metrics = [0.5, 0.4, 0.45, 0.3, 0.35, 0.2, 0.25, 0.6, 0.6 + 5e-6, 0.55, 0.7]
  deltas = [0.1 * (i + 1) for i in range(len(metrics))]
  c, fw, ctx, st, calls = _setup(patience=2, lagged_metric=lagged, max_projection_steps=0)
  assert base_config().ccp.start_from == "current" and c.ccp.start_from == "current"
  st = fw.on_start(st, ctx)
  want = _authors_loop(metrics, deltas, lagged, patience=2)
  pool0, _ = _pool(0)
  np.testing.assert_allclose(np.asarray(st.params["proxies"]), np.concatenate(
      [_naive_kcenter(pool0[k], np.zeros((P, D)), P) for k in range(C)]), atol=1e-6)
  ends = []
  for i, (metric, delta, (model, proxies, anchor, pool_model, projection)) in enumerate(
      zip(metrics, deltas, want)):
    st = _advance(st, 10, delta)
    st, ev = fw.after_eval(st, ctx, {"map_at_r": metric})
    assert int(st.framework["projection"]) == projection
    for k in model:
      np.testing.assert_allclose(np.asarray(st.params["model"][k]), model[k], atol=1e-6)
      if projection:
        np.testing.assert_allclose(np.asarray(st.anchor[k]), anchor[k], atol=1e-6)
    np.testing.assert_allclose(np.asarray(st.params["proxies"]), proxies, atol=1e-6)
    if "ccp/projection" in ev:
      ends.append(i)
      assert calls[-1][1] == projection           # pool ``projection``, embedded with ...
      for k in model:                             # ... the current (not rolled back) model
        np.testing.assert_allclose(calls[-1][0][k], pool_model[k], atol=1e-6)
  assert len(ends) == want[-1][-1] == 3
  # One evaluation late: each end comes one evaluation after the unlagged run's.
  assert ends == ([3, 7, 10] if lagged else [2, 6, 9])


def test_ccp_first_proxies_are_the_largest_norm_raw_embeddings():
  # Issue 18: the pool holds embeddings before the model's normalisation, and zero seeds make
  # each class's first pick its largest-norm embedding.
  c = _config()
  fw = frameworks.get_framework(c, num_classes=C, embedding_dim=D)
  labels = np.repeat(np.arange(C), 7)
  raw = np.random.default_rng(4).normal(size=(len(labels), D)).astype(np.float32) * 3.0
  asked = []

  def embed(model_params, batch_stats, indices, raw_emb=False):
    asked.append(raw_emb)
    x = raw[np.asarray(indices)]
    return x if raw_emb else np.asarray(losses.bounded_normalize(jnp.asarray(x)))

  mesh = parallel.make_mesh(jax.devices()[:1])
  ctx = frameworks.HostContext(
      config=c, tx=optim.make_optimizer(c.optim, 10), num_classes=C, train_labels=labels,
      embed=lambda p, b, i, raw=False: embed(p, b, i, raw), evaluate=None,
      replicate=lambda t: parallel.replicate(t, mesh), log=lambda *a, **k: None)
  model_params = {"w": jnp.ones((2, 2))}
  extra, fs = fw.init(jax.random.PRNGKey(0), model_params, {})
  st = state_lib.create_train_state(rng=jax.random.PRNGKey(1), model_params=model_params,
                                    batch_stats={}, extra_params=extra, framework_state=fs,
                                    tx=ctx.tx)
  st = fw.on_start(st, ctx)
  assert asked == [True]
  idx, mask = fw._pool_sampler.pool(0, B)     # the pool the framework drew
  assert mask.all()
  got = np.asarray(st.params["proxies"]).reshape(C, P, D)
  for k in range(C):
    pts = raw[idx[k]]
    np.testing.assert_allclose(got[k], _naive_kcenter(pts, np.zeros((P, D)), P), atol=1e-6)
    np.testing.assert_allclose(got[k, 0], pts[np.argmax(np.linalg.norm(pts, axis=1))])
  assert np.linalg.norm(got, axis=-1).max() > 1.0        # raw: not inside the unit ball
  c.unlock()
  c.ccp.pool_embeddings = "normalized"
  fw = frameworks.get_framework(c, num_classes=C, embedding_dim=D)
  fw.on_start(st, ctx)
  assert asked == [True, False]
