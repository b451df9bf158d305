"""Kernels sized by backend (issue 17 item 6) and the kNN from device arrays (issue 17 item 1).

Every sizing of the kNN (the CPU's blocks; the accelerator's single pass; blocks sized from a
small memory budget) and every placement (host, device arrays) gives the same neighbours and the
same metrics; the accelerator sizing is forced on CPU by argument. The contrastive loss is the
same for every reference block size (the CPU's 1,024-blocks, a single pass, any other cut).
``approx_recall`` (lax.approx_max_k) is refused off TPU and validated. A resume on another
backend whose ``model.dtype="auto"`` resolves differently is refused with the reason and the fix.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmljax import cli, config_check, evaluation, train
from dmljax.configs import base_config, shrink
from dmljax.kernels import knn as knn_lib
from dmljax.kernels import sizing
from dmljax.losses import pair
from dmljax.metrics import retrieval_metrics


def _brute(q, r, k, same):
  """Indices by (squared distance, index), float64, self excluded in same-set mode."""
  d = ((q[:, None, :].astype(np.float64) - r[None, :, :]) ** 2).sum(-1)
  if same:
    d[np.arange(len(q)), np.arange(len(q))] = np.inf
  order = np.lexsort((np.broadcast_to(np.arange(r.shape[0]), d.shape), d), axis=1)
  return order[:, :k]


def test_knn_every_sizing_and_placement_agrees(monkeypatch):
  rng = np.random.default_rng(0)
  # Small integers: every dot product and norm is exact in float32, so all paths must agree
  # bit for bit (and duplicated rows make real ties, broken by index).
  x = rng.integers(-3, 4, size=(150, 6)).astype(np.float32)
  x[100:120] = x[:20]
  g = rng.integers(-3, 4, size=(90, 6)).astype(np.float32)
  one = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("q",))
  k = 7
  monkeypatch.setattr(knn_lib, "REF_BLOCK", 16)  # the accelerator sizing's floor, for small N
  ways = {
      True: {  # same-set: the CPU's symmetric path from numpy and from device arrays; the
               # accelerator sizing cut into query and reference blocks by a 20 KB budget
               # (compiled selection), and its symmetric path on the XLA selection
          "cpu": {},
          "cpu/device": {"on_device": True},
          "accelerator/blocked": {"sizing": "accelerator", "memory_budget": 20_000},
          "accelerator/xla/symmetric/device": {"sizing": "accelerator", "on_device": True,
                                               "use_native": False, "symmetric": True}},
      False: {  # queries against a gallery: the CPU's blocks; the accelerator's from device
                # arrays, XLA selection, blocked
          "cpu": {},
          "accelerator/xla/blocked/device": {"sizing": "accelerator", "on_device": True,
                                             "use_native": False, "memory_budget": 20_000}}}
  for same, refs in ((True, None), (False, g)):
    want = _brute(x, x if same else g, k, same)
    first = None
    for name, kw in ways[same].items():
      res = knn_lib.knn(jnp.asarray(x) if "device" in name else x, refs, k=k, mesh=one, **kw)
      np.testing.assert_array_equal(res.indices, want, err_msg=f"{name} same={same}")
      if first is None:
        first = res
      np.testing.assert_array_equal(res.distances, first.distances, err_msg=name)


def test_accelerator_blocks_fit_the_budget():
  # A single pass where memory allows: SOP's 60,502 queries against themselves in 32 GB; in the
  # default budget of an 80 GB H100 (20 GB), two query blocks against all references at once.
  assert knn_lib.accelerator_blocks(60502, 60502, 128, 12, 8, 32 << 30) == (60504, 60504)
  assert knn_lib.accelerator_blocks(60502, 60502, 128, 12, 8, 20 << 30) == (30256, 60504)
  # A small budget: query blocks first, then reference blocks, each within the budget.
  for budget in (64 << 20, 8 << 20):
    qb, rb = knn_lib.accelerator_blocks(60502, 60502, 128, 12, 8, budget)
    n = 60504
    assert knn_lib._accel_cost(qb, rb, n, 128, 13, 8) <= budget, budget
    assert qb % 8 == 0 and rb % 8 == 0 and qb < 60504
  assert sizing.resolve("auto", jax.devices()) == "cpu"
  assert sizing.resolve("accelerator", jax.devices()) == "accelerator"
  assert sizing.memory_budget(jax.devices()) == sizing.FALLBACK_BUDGET  # CPU reports no limit
  with pytest.raises(ValueError, match="sizing must be one of auto, cpu, accelerator"):
    knn_lib.knn(np.eye(4, dtype=np.float32), k=1, sizing="gpu")


def test_metrics_from_device_arrays_equal_the_host_path():
  rng = np.random.default_rng(1)
  emb = rng.normal(size=(120, 8)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  labels = rng.integers(0, 12, size=120)
  kw = dict(recall_ks=(1, 4, 60), precision_ks=(3,), map_ks=(5,), ndcg_ks=(5,))  # 60 > depth
  host = retrieval_metrics(emb, labels, **kw)
  assert retrieval_metrics(jnp.asarray(emb), labels, sizing="accelerator", on_device=True,
                           **kw) == host
  # The evaluation's call: config.eval_knn.placement / sizing, same metrics.
  c = base_config()
  c.recall_ks, c.precision_ks, c.map_ks, c.ndcg_ks = (1, 4, 60), (3,), (5,), (5,)
  c.eval_knn.placement = "device"
  got = evaluation.embedding_metrics(c, jnp.asarray(emb), labels)
  assert got == {k: float(v) for k, v in host.items()}
  # A bad row on the device is reported as on the host.
  bad = emb.copy()
  bad[7, 2] = np.nan
  with pytest.raises(ValueError, match=r"1 row\(s\) with NaN or infinite values \(first: row 7\)"):
    retrieval_metrics(jnp.asarray(bad), labels, on_device=True)


def test_approx_recall_is_validated_and_tpu_only(monkeypatch):
  x = np.random.default_rng(2).normal(size=(40, 4)).astype(np.float32)
  with pytest.raises(ValueError, match=r"approx_max_k.*TPU only.*runs on cpu.*set approx_recall "
                                       r"to 0"):
    knn_lib.knn(x, k=3, approx_recall=0.9)
  for bad in (1.5, -0.1, True, "0.9"):
    with pytest.raises(ValueError, match=r"approx_recall must be a recall target in \(0, 1\)"):
      knn_lib.knn(x, k=3, approx_recall=bad)
  # The code path itself (on CPU approx_max_k is an exact sort: same neighbours as top_k).
  monkeypatch.setattr(knn_lib, "APPROX_PLATFORMS", ("tpu", "cpu"))
  exact = knn_lib.knn(x, k=3, use_native=False)
  approx = knn_lib.knn(x, k=3, use_native=False, approx_recall=0.95)
  np.testing.assert_array_equal(approx.indices, exact.indices)
  with pytest.raises(ValueError, match="symmetric=False"):
    knn_lib.knn(x, k=3, approx_recall=0.95, symmetric=True)
  monkeypatch.undo()
  # The config: checked with the others, and refused off TPU before training starts.
  c = base_config()
  c.eval_knn.approx_recall = 1.0
  with pytest.raises(config_check.ConfigError, match=r"eval_knn.approx_recall=1.0 must be in "
                                                     r"\[0, 1\).*--config.eval_knn"):
    config_check.check_eval_knn(c)
  c.eval_knn.approx_recall, c.eval_knn.sizing = 0.9, "tpu"
  with pytest.raises(config_check.ConfigError, match="eval_knn.sizing='tpu' is not one of"):
    config_check.check_eval_knn(c)
  c.eval_knn.sizing = "auto"
  ev = evaluation.Evaluator.__new__(evaluation.Evaluator)
  ev.config, ev.mesh = c, None
  with pytest.raises(config_check.ConfigError, match=r"approx_recall.*TPU only"):
    ev._check_knn()


def test_contrastive_is_the_same_for_every_reference_block():
  rng = np.random.default_rng(3)
  emb = rng.normal(size=(6, 5)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  ref = rng.normal(size=(23, 5)).astype(np.float32)
  ref /= np.linalg.norm(ref, axis=1, keepdims=True)
  labels, ref_labels = np.arange(6) % 3, np.arange(23) % 4
  # What each sizing picks: the CPU's blocks above 2,048 references; the accelerator's single
  # pass (SOP's ~35,000 proxies at batch 32 in the 2 GB fallback budget) or, with little
  # memory, equal blocks within it.
  assert pair.pair_ref_block(32, 35000, sizing="cpu") == 1024
  assert pair.pair_ref_block(32, 2048, sizing="cpu") == 0
  assert pair.pair_ref_block(32, 35000, sizing="accelerator") == 0
  small = pair.pair_ref_block(32, 35000, sizing="accelerator", memory_budget=10 << 20)
  assert 0 < small < 35000 and 4 * pair._LIVE_INTERMEDIATES * 32 * small <= 10 << 20
  assert pair.pair_ref_block(6, 23, sizing="accelerator", memory_budget=2000) == 6
  with pytest.raises(ValueError, match="ref_block must be an integer >= 0"):
    pair.contrastive(emb, labels, ref_embeddings=ref, ref_labels=ref_labels, ref_block=-1)
  # (tests/test_losses_pair.py checks the blocked reduction's value and gradient for every
  # reduction; here, that every block size the argument asks for gives the single pass's value)
  def loss(e, block):
    return pair.contrastive(e, labels, ref_embeddings=ref, ref_labels=ref_labels,
                            pos_margin=0.1, neg_margin=0.9, ref_block=block)

  value = jax.jit(loss, static_argnums=1)
  want = value(emb, 0)
  for block in (6, 10):  # 4 blocks (one padded slot), 3 blocks
    np.testing.assert_allclose(value(emb, block), want, rtol=1e-6, err_msg=str(block))


def _host_json(workdir):
  """Path of the newest checkpoint's host metadata (the JSON item the checkpointer writes)."""
  root = os.path.join(workdir, "checkpoints")
  step = max((d for d in os.listdir(root) if d.isdigit()), key=int)
  for dirpath, _, files in os.walk(os.path.join(root, step, "host")):
    for f in files:
      p = os.path.join(dirpath, f)
      try:
        with open(p) as fh:
          data = json.load(fh)
      except (ValueError, UnicodeDecodeError):
        continue
      if isinstance(data, dict) and "precision" in data:
        return p, data
  raise AssertionError(f"no host metadata under {root}/{step}")


def test_resume_on_another_backend_whose_auto_dtype_differs_is_refused(tmp_path):
  c = shrink(base_config())
  c.model.widths, c.model.dtype = (8,), "auto"
  c.batch_size, c.sampler.m = 20, 4
  c.total_steps = c.eval_every_steps = c.log_every_steps = c.checkpoint.every_steps = 2
  c.progress, c.num_devices, c.baselines = False, 1, ()
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(c, workdir)
  os.remove(os.path.join(workdir, "final_metrics.json"))  # as if stopped before the end
  path, host = _host_json(workdir)
  assert host["precision"]["backend"] == "cpu" and host["config"]["model"]["dtype"] == "float32"
  # As a run on a GPU would have recorded it: auto resolved to bfloat16 there.
  host["precision"].update(backend="gpu", model_dtype="bfloat16")
  host["config"]["model"]["dtype"] = "bfloat16"
  with open(path, "w") as fh:
    json.dump(host, fh)
  with pytest.raises(cli.ConfigChanged) as err:
    train.train_and_evaluate(c, workdir)
  msg = str(err.value)
  assert "model.dtype: 'bfloat16' -> 'float32'" in msg
  assert "the run was trained on gpu" in msg and "model.dtype='auto' means bfloat16" in msg
  assert "pass the old dtype explicitly" in msg
