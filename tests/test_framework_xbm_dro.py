"""The ``xbm`` and ``dro`` frameworks (issue 11).

XBM: ring-buffer writes against a per-sample numpy ring buffer (wrap-around, warm-up filling on and
off), the loss against a direct computation with the same memory (current batch's slots left out:
no self-pairs), the memory on 1 vs 8 devices, and a preempted + resumed run equal to an
uninterrupted one (final metrics and the checkpointed memory). DRO: every weighting equals its loss
function, p-sampling deterministic in the key, the trainer's step key reaching the loss, config
validation. Both: each glyphs config builds with each variant (tests/test_configs.py runs two steps
of each), and training on digits beats the untrained network's validation MAP@R.
"""
import importlib
import os
import signal
import threading
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits_ccp
from dmljax import frameworks, losses, models, optim, parallel, train
from dmljax.configs import set_keys
from dmljax import state as state_lib
from dmljax.configs import base_config, shrink

CONFIGS = ("glyphs_xbm", "glyphs_xbm_c1", "glyphs_dro_topk", "glyphs_dro_kl")
VARIANTS = {"glyphs_xbm": ("",), "glyphs_xbm_c1": ("",), "glyphs_dro_topk": ("", "pn"),
            "glyphs_dro_kl": ("", "exact", "grouped")}




# Every test of the module shares the compilation cache (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("cache_dir")


def _final(result):
  return {k: v for k, v in result.items() if k != "table"}


# ============================================================================= XBM units


def _xbm(memory_batches=3, batch=4, dim=3, warmup=0, fill=True, weight=1.0,
         loss="contrastive", kwargs=None):
  c = shrink(base_config())
  c.framework = "xbm"
  c.batch_size = batch
  c.xbm.memory_batches, c.xbm.warmup_steps = memory_batches, warmup
  c.xbm.fill_during_warmup, c.xbm.memory_weight = fill, weight
  c.loss.name = loss
  if kwargs is not None:
    c.loss.kwargs = kwargs
  return frameworks.get_framework(c, num_classes=3, embedding_dim=dim)


def _jit_loss(fw):
  """``(step, framework_state, emb, labels) -> (loss, (metrics, state)), d loss / d emb``."""

  def f(step, fs, emb, labels):
    st = types.SimpleNamespace(step=step, framework=fs)
    return fw.loss({}, emb, labels, st, jax.random.PRNGKey(0), {})

  return jax.jit(jax.value_and_grad(f, argnums=2, has_aux=True))


@pytest.mark.parametrize("fill", [True, False])
def test_xbm_ring_buffer_matches_numpy(fill):
  """Writes, wrap-around, fill count, pointer and the memory term's references, step by step."""
  b, mb, d, warmup, steps = 4, 3, 3, 2, 9   # S = 12: 9 batches wrap around twice
  fw = _xbm(memory_batches=mb, batch=b, dim=d, warmup=warmup, fill=fill)
  s = mb * b
  step_fn = _jit_loss(fw)
  _, fs = fw.init(jax.random.PRNGKey(0), {}, {})
  rng = np.random.default_rng(0)
  mem, lab, written = np.zeros((s, d), np.float32), np.full(s, -1), 0  # per-sample ring
  for t in range(steps):
    emb = rng.normal(size=(b, d)).astype(np.float32)
    labels = rng.integers(0, 3, size=b).astype(np.int32)
    (_, (metrics, fs)), _ = step_fn(jnp.int32(t), fs, emb, labels)
    before = min(written, s)
    if fill or t >= warmup:
      for i in range(b):
        mem[written % s], lab[written % s] = emb[i], labels[i]
        written += 1
    np.testing.assert_array_equal(np.asarray(fs["memory"]), mem)
    np.testing.assert_array_equal(np.asarray(fs["memory_labels"]), lab)
    assert int(fs["memory_count"]) == min(written, s)
    assert int(fs["memory_ptr"]) == written % s
    if t >= warmup:
      # References of the memory term: the filled slots but the batch just written, i.e. the
      # entries from before this step that it did not overwrite (at most S - B).
      assert int(metrics["xbm/memory_refs"]) == min(before, s - b)
    assert int(metrics["xbm/active"]) == int(t >= warmup)
  assert written == (steps if fill else steps - warmup) * b


@pytest.mark.parametrize("loss,kwargs", [
    ("contrastive", {"pos_margin": 0.0, "neg_margin": 1.0}),     # C2
    ("contrastive_xbm", {"margin": 0.5}),                          # C1
    ("multi_similarity", {}),
])
def test_xbm_loss_matches_direct_computation(loss, kwargs):
  """in-batch loss + weight x loss(batch -> memory after the write, current slots masked)."""
  b, mb, d, w = 4, 3, 3, 0.5
  fw = _xbm(memory_batches=mb, batch=b, dim=d, warmup=1, weight=w, loss=loss, kwargs=kwargs)
  fn, kw = losses.get_loss(loss), fw.kwargs
  s = mb * b
  rng = np.random.default_rng(1)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  mem = unit(rng.normal(size=(s, d))).astype(np.float32)
  mem_labels = rng.integers(0, 3, size=s).astype(np.int32)
  emb = jnp.asarray(unit(rng.normal(size=(b, d))), jnp.float32)
  labels = jnp.asarray([0, 0, 1, 2], jnp.int32)
  step_fn = _jit_loss(fw)

  @jax.jit
  @jax.value_and_grad
  def direct(e, refs, ref_labels, mask):
    return fn(e, labels, **kw) + w * fn(e, labels, ref_embeddings=refs, ref_labels=ref_labels,
                                        ref_mask=mask, **kw)

  for count, ptr in ((s, 4), (8, 8)):   # full (overwrites slots 4-7), partly filled (8 of 12)
    fs = {"memory": jnp.asarray(mem), "memory_labels": jnp.asarray(mem_labels),
          "memory_count": jnp.int32(count), "memory_ptr": jnp.int32(ptr)}
    (value, (metrics, new)), grad = step_fn(jnp.int32(5), fs, emb, labels)
    after = mem.copy()
    after[ptr:ptr + b] = np.asarray(emb)
    after_labels = mem_labels.copy()
    after_labels[ptr:ptr + b] = np.asarray(labels)
    mask = np.arange(s) < count
    mask[ptr:ptr + b] = False             # the current batch's own slots: no self-pairs

    want, want_grad = direct(emb, after, after_labels, mask)
    np.testing.assert_allclose(value, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(new["memory"]), after)
    assert int(metrics["xbm/memory_refs"]) == int(mask.sum())
    assert float(metrics["loss/memory"]) != 0.0
  # Warm-up (step 0 < 1): the in-batch loss alone, though the memory is full and written.
  (value, (metrics, new)), grad = step_fn(jnp.int32(0), fs, emb, labels)
  want, want_grad = jax.jit(jax.value_and_grad(lambda e: fn(e, labels, **kw)))(emb)
  np.testing.assert_allclose(value, want, rtol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)
  assert float(metrics["loss/memory"]) == 0.0 and int(new["memory_ptr"]) == (ptr + b) % s


def test_xbm_first_step_has_no_self_pairs():
  """Step 0, empty memory: the batch is enqueued before the memory term, which must not pair
  the anchors with their own copies (Euclidean contrastive with pos_margin 0 would get a
  directionless gradient from them): the memory term is exactly 0 and the gradient the in-batch
  one."""
  fw = _xbm(memory_batches=2, warmup=0)
  _, fs = fw.init(jax.random.PRNGKey(0), {}, {})
  emb = jnp.asarray(np.random.default_rng(2).normal(size=(4, 3)), jnp.float32)
  labels = jnp.asarray([0, 0, 1, 1], jnp.int32)
  (value, (metrics, new)), grad = _jit_loss(fw)(jnp.int32(0), fs, emb, labels)
  want, want_grad = jax.jit(jax.value_and_grad(lambda e: losses.contrastive(e, labels)))(emb)
  assert float(metrics["loss/memory"]) == 0.0 and int(metrics["xbm/memory_refs"]) == 0
  np.testing.assert_allclose(value, want, rtol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(new["memory"])[:4], np.asarray(emb))
  assert int(new["memory_count"]) == 4


# ============================================================================= 1 vs 8 devices


def _tiny_step_setup(framework, batch=16, **overrides):
  """A tiny CNN on random 8x8 images with ``framework`` (test_parallel.py's set-up)."""
  c = shrink(base_config())
  c.framework = framework
  c.batch_size = batch
  c.model.widths, c.model.embedding_dim = (4, 8), 8
  set_keys(c, overrides)
  model = models.get_model(c.model)
  fw = frameworks.get_framework(c, num_classes=4, embedding_dim=8)
  tx = optim.make_optimizer(c.optim, 100)

  def init_state():
    v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), train=False)
    extra, fs = fw.init(jax.random.PRNGKey(1), v["params"], v["batch_stats"])
    return state_lib.create_train_state(rng=jax.random.PRNGKey(2), model_params=v["params"],
                                        batch_stats=v["batch_stats"], extra_params=extra,
                                        framework_state=fs, tx=tx)

  step_fn, traces = train.make_train_step(model, fw, tx)
  return c, model, fw, init_state, step_fn, traces


def _run_xbm_steps(mesh, images, labels):
  _, _, _, init_state, step_fn, traces = _tiny_step_setup(
      "xbm", **{"xbm.memory_batches": 2, "xbm.warmup_steps": 1})
  step = train.jit_train_step(step_fn, mesh)
  state = parallel.replicate(init_state(), mesh)
  out = []
  for s in range(len(images)):
    x, y = parallel.global_batch((images[s], labels[s]), mesh)
    state, metrics = step(state, x, y, {})
    out.append({k: float(parallel.to_host(metrics[k])) for k in ("loss", "loss/memory")})
  return parallel.to_host(state.framework), out, traces[0]


def test_xbm_memory_same_on_one_and_eight_devices():
  """The memory is written from the global batch in global batch order: the same slots hold the
  same samples on 1 and 8 devices (8 fake CPU devices from conftest, as test_parallel.py)."""
  assert jax.device_count() == 8
  rng = np.random.default_rng(0)
  steps, batch = 3, 16                       # S = 32: the third batch wraps to slot 0
  images = rng.uniform(size=(steps, batch, 8, 8, 1)).astype(np.float32)
  labels = np.stack([rng.permutation(np.repeat(np.arange(4), 4)) for _ in range(steps)])
  labels = labels.astype(np.int32)
  one, l1, _ = _run_xbm_steps(parallel.make_mesh(jax.devices()[:1]), images, labels)
  eight, l8, traces = _run_xbm_steps(parallel.make_mesh(jax.devices()), images, labels)
  np.testing.assert_array_equal(one["memory_labels"], eight["memory_labels"])
  np.testing.assert_array_equal(one["memory_labels"], np.concatenate([labels[2], labels[1]]))
  assert int(one["memory_ptr"]) == int(eight["memory_ptr"]) == 16
  assert int(one["memory_count"]) == int(eight["memory_count"]) == 32
  np.testing.assert_allclose(one["memory"], eight["memory"], rtol=1e-5, atol=1e-6)
  for a, b in zip(l1, l8):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a["loss/memory"], b["loss/memory"], rtol=1e-5, atol=1e-6)
  assert l1[0]["loss/memory"] == 0.0 and l1[2]["loss/memory"] > 0.0   # warm-up, then memory
  assert traces == 1


# ============================================================================= XBM end to end


def _digits(framework, **overrides):
  """The digits small config (5 classes x 8, tiny CNN) with ``framework``, 100 steps."""
  c = digits_ccp.get_config("small")
  c.framework = framework
  settings = {"total_steps": 100, "eval_every_steps": 50, "checkpoint.every_steps": 50,
              "progress": False, "num_devices": 1, "baselines": ("untrained",), **overrides}
  set_keys(c, settings)
  return c


def _xbm_digits():
  return _digits("xbm", **{"xbm.memory_batches": 3, "xbm.warmup_steps": 20})


def _checkpointed_framework(workdir, step):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mgr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                              item_names=("state", "host"))
  try:
    restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  finally:
    mgr.close()
  return jax.tree.map(np.asarray, dict(restored["state"]["framework"]))


@pytest.fixture(scope="module")
def xbm_reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("xbm_ref"))
  return workdir, train.train_and_evaluate(_xbm_digits(), workdir)


def test_xbm_digits_learns_and_memory_holds_the_last_batches(xbm_reference):
  workdir, result = xbm_reference
  assert result["step"] == 100 and result["train_step_traces"] == 1
  assert result["val/map_at_r"] > result["untrained/val/map_at_r"] + 0.02, result
  # The checkpointed memory holds the training labels of the last 3 batches the sampler drew,
  # in ring order (4000 samples written into 120 slots: the pointer is at 4000 mod 120 = 40).
  c = _xbm_digits()
  data = train.create_input(c)
  fw = frameworks.get_framework(c, num_classes=data.num_classes,
                                embedding_dim=c.model.embedding_dim)
  sampler = train.make_sampler(c, fw, data.train_labels)
  fs = _checkpointed_framework(workdir, 100)
  s, b = 3 * c.batch_size, c.batch_size
  want = np.full(s, -1)
  for step in range(100):
    idx = np.asarray(fw.sample(sampler, None, step)[0])
    slot = (step * b) % s
    want[slot:slot + b] = data.train_labels[idx]
  np.testing.assert_array_equal(fs["memory_labels"], want)
  assert int(fs["memory_ptr"]) == 4000 % s and int(fs["memory_count"]) == s


def test_xbm_preempted_and_resumed_equals_uninterrupted(xbm_reference, tmp_path):
  ref_dir, ref = xbm_reference
  workdir = str(tmp_path / "run")
  ckpt = os.path.join(workdir, "checkpoints", "50")

  def send_when_checkpointed():
    deadline = time.time() + 300
    while not os.path.isdir(ckpt) and time.time() < deadline:
      time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=send_when_checkpointed, daemon=True).start()
  out = train.train_and_evaluate(_xbm_digits(), workdir)
  assert out["preempted"] and 50 <= out["step"] < 100
  resumed = train.train_and_evaluate(_xbm_digits(), workdir)
  assert _final(resumed) == _final(ref)
  got, want = _checkpointed_framework(workdir, 100), _checkpointed_framework(ref_dir, 100)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# ============================================================================= DRO units


def _dro(weighting, kwargs=None):
  c = shrink(base_config())
  c.framework = "dro"
  c.dro.weighting = weighting
  if kwargs is not None:
    c.dro.kwargs = kwargs
  return frameworks.get_framework(c, num_classes=3, embedding_dim=3)


def _dro_batch():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(12, 3))
  emb = jnp.asarray(x / np.linalg.norm(x, axis=1, keepdims=True), jnp.float32)
  return emb, jnp.asarray(np.repeat(np.arange(3), 4), jnp.int32)


def _dro_value_and_grad(fw):
  def f(emb, labels, rng):
    return fw.loss({}, emb, labels, types.SimpleNamespace(framework={}), rng, {})[0]
  return jax.jit(jax.value_and_grad(f))


@pytest.mark.parametrize("weighting,kwargs", [
    ("dro_topk", {"k": 20, "base": "binomial", "binomial_form": "scaled"}),
    ("dro_topk_pn", {"k": 20, "base": "margin", "margin": 0.3, "normalize": "nonzero"}),
    ("dro_kl", {"gamma": 0.3}),
    ("dro_kl_sampled", {"gamma": 0.1, "num_samples": 24}),
    ("dro_grouped_kl", {"gamma": 0.1, "add_one": True, "base": "binomial"}),
])
def test_dro_framework_is_the_weighting(weighting, kwargs):
  """Value and gradient of the framework's loss equal those of the loss function itself."""
  fw = _dro(weighting, kwargs)
  emb, labels = _dro_batch()
  rng = jax.random.PRNGKey(7)
  value, grad = _dro_value_and_grad(fw)(emb, labels, rng)
  fn = losses.DRO_LOSSES[weighting]
  kw = dict(kwargs, rng=rng) if weighting == "dro_kl_sampled" else kwargs
  want, want_grad = jax.jit(jax.value_and_grad(lambda e: fn(e, labels, **kw)))(emb)
  np.testing.assert_allclose(value, want, rtol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)
  assert float(value) > 0 and np.all(np.isfinite(grad))


def test_dro_p_sampling_is_deterministic_in_the_key():
  fw = _dro("dro_kl_sampled", {"gamma": 0.5, "num_samples": 8})
  emb, labels = _dro_batch()
  f = _dro_value_and_grad(fw)
  base = jax.random.PRNGKey(0)
  k3, k4 = jax.random.fold_in(base, 3), jax.random.fold_in(base, 4)   # steps 3 and 4
  v1, g1 = f(emb, labels, k3)
  v2, g2 = f(emb, labels, k3)
  assert float(v1) == float(v2)
  np.testing.assert_array_equal(np.asarray(g1), np.asarray(g2))
  v3, g3 = f(emb, labels, k4)
  assert float(v3) != float(v1) and not np.array_equal(np.asarray(g3), np.asarray(g1))


def test_dro_train_step_passes_the_step_key():
  """In the trainer's step the sampled loss is the one drawn with fold_in(state.rng, step)."""
  kwargs = {"gamma": 0.2, "num_samples": 16}
  _, model, fw, init_state, step_fn, _ = _tiny_step_setup(
      "dro", **{"dro.weighting": "dro_kl_sampled", "dro.kwargs": kwargs,
                "model.normalization": "l2"})
  step = jax.jit(step_fn)
  rng = np.random.default_rng(4)
  images = jnp.asarray(rng.uniform(size=(16, 8, 8, 1)), jnp.float32)
  labels = jnp.asarray(np.repeat(np.arange(4), 4), jnp.int32)

  @jax.jit
  def direct(state, key):
    emb, _ = model.apply({"params": state.params["model"], "batch_stats": state.batch_stats},
                         images, train=True, mutable=["batch_stats"])
    return losses.dro_kl_sampled(emb, labels, rng=key, **kwargs)

  for at in (0, 5):
    state = init_state().replace(step=jnp.asarray(at, jnp.int32))
    want = float(direct(state, jax.random.fold_in(state.rng, at)))
    other = float(direct(state, jax.random.fold_in(state.rng, at + 1)))
    got = float(step(state, images, labels, {})[1]["loss"])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert abs(got - other) > 1e-6


@pytest.mark.parametrize("framework,settings,match", [
    ("dro", {"dro.weighting": "dro_top"},
     r"Unknown dro.weighting 'dro_top'; valid: \['dro_topk', 'dro_topk_pn', 'dro_kl', "
     r"'dro_kl_sampled', 'dro_grouped_kl'\]"),
    ("dro", {"dro.kwargs": {"kk": 3}}, r"Unknown key dro.kwargs.kk: no DRO weighting takes it"),
    ("dro", {"dro.kwargs": {"base": "hinge"}},
     r"Unknown dro.kwargs.base 'hinge'; valid: \['margin', 'binomial'\]"),
    ("dro", {"dro.kwargs": {"binomial_form": "x"}}, r"dro.kwargs.binomial_form 'x'"),
    ("dro", {"dro.weighting": "dro_grouped_kl", "dro.kwargs": {"reduction": "none"}},
     r"dro.kwargs.reduction 'none'; valid: \['mean', 'sum'\]"),
    ("dro", {"dro.kwargs": {"k": 0}}, r"Bad dro.kwargs for dro_topk: k must be >= 1"),
    ("dro", {"dro.weighting": "dro_kl", "dro.kwargs": {"gamma": 0.0}},
     r"Bad dro.kwargs for dro_kl: gamma must be > 0"),
    ("xbm", {"loss.name": "proxy_anchor"}, r"xbm needs a pair loss \(config.loss.name\)"),
    ("xbm", {"xbm.memory_batches": 0}, r"xbm.memory_batches must be >= 1"),
    ("xbm", {"xbm.warmup_steps": -1}, r"xbm.warmup_steps must be >= 0"),
])
def test_bad_settings_raise(framework, settings, match):
  c = shrink(base_config())
  c.framework = framework
  for k, v in settings.items():
    block, key = k.split(".")
    c[block][key] = v
  with pytest.raises(ValueError, match=match):
    frameworks.get_framework(c, num_classes=3, embedding_dim=3)


def test_dro_ignores_another_weightings_key():
  """``gamma`` under dro_topk (e.g. after --config.dro.weighting=dro_topk on a KL config) is not
  passed on; the framework still builds."""
  fw = _dro("dro_topk", {"gamma": 0.5, "k": 10})
  assert fw.kwargs == {"k": 10}


def test_dro_digits_learns(tmp_path):
  c = _digits("dro", **{"model.normalization": "l2", "dro.weighting": "dro_kl_sampled",
                        "dro.kwargs": {"gamma": 0.1, "base": "margin"},
                        "checkpoint.enabled": False})
  result = train.train_and_evaluate(c, str(tmp_path))
  assert result["step"] == 100 and result["train_step_traces"] == 1
  assert result["val/map_at_r"] > result["untrained/val/map_at_r"] + 0.02, result


# ============================================================================= configs


def _config_module(name):
  return importlib.import_module(f"configs.{name}")


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_and_rejects_unknown_variant(name):
  mod = _config_module(name)
  doc = mod.__doc__.strip().splitlines()
  assert doc[2].strip() == (f"python -m dmljax.main --config=configs/{name}.py "
                            f"--workdir=/tmp/dmljax/{name}")
  for variant in VARIANTS[name]:
    for arg in (variant, f"{variant}:small" if variant else "small"):
      c = mod.get_config(arg)
      fw = frameworks.get_framework(c, num_classes=80, embedding_dim=c.model.embedding_dim)
      assert fw.name == c.framework
      if c.framework == "dro":
        assert c.sampler.m == 5 and c.model.normalization == "l2"
  with pytest.raises(ValueError, match="Unknown variant 'bogus'"):
    mod.get_config("bogus")
