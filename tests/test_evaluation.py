"""Evaluation that decodes once: the image caches of :mod:`dmljax.evaluation`.

On prepared records (a tiny CUB in its real layout), an evaluator whose splits are
cached on the devices, cached in host memory, or streamed at every evaluation gives bitwise the
same embeddings and so exactly the same metrics, on a 2-device mesh (sharded batches); a cached
split is decoded once however often it is evaluated, a streamed one at every evaluation; the
training split's cache gives the frameworks' pools the embeddings of decoding them.
"""
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tinydata  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from dmljax import evaluation, frameworks, inputs, models, parallel  # noqa: E402
from dmljax import optim, train  # noqa: E402
from dmljax.configs import ccp_paper_config  # noqa: E402
from dmljax.data import transforms  # noqa: E402

MODES = {"stream": (0, 0), "host": (0, 64), "device": (64, 0)}


def _config(name, data_dir):
  c = ccp_paper_config(name, "small")
  c.dataset.data_dir = data_dir
  c.input.num_workers = 0  # decode in this process, so the test can count the decodes
  c.eval_batch_size = 8  # several batches, the last one padded
  c.num_devices = 2
  c.clustering = True
  return c


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  data_dir = tinydata.prepare_tiny("cub", str(tmp_path_factory.mktemp("cub")), train_classes=6,
                                   test_classes=4, per_class=5)
  c = _config("cub", data_dir)
  data = inputs.create_input(c)
  model = models.get_model(c.model)
  fw = frameworks.get_framework(c, num_classes=data.num_classes,
                                embedding_dim=c.model.embedding_dim)
  mesh = parallel.make_mesh(jax.devices()[:2])
  tx = optim.make_optimizer(c.optim, c.total_steps)
  state = parallel.replicate(train.create_state(c, model, fw, tx, data), mesh)
  return c, data, model, mesh, state


def _evaluator(setup, mode):
  c, data, model, mesh, _ = setup
  c = c.copy_and_resolve_references()
  c.eval_cache.device_mb, c.eval_cache.host_mb = MODES[mode]
  return evaluation.Evaluator(c, model, mesh, data)


def test_cached_and_streamed_evaluations_agree_and_decode_once(setup, monkeypatch):
  c, data, _, _, state = setup
  decodes = [0]
  real = transforms.transform_record

  def counting(*a, **k):
    decodes[0] += 1
    return real(*a, **k)

  monkeypatch.setattr(transforms, "transform_record", counting)
  p, bs = state.params["model"], state.batch_stats
  # Images decoded per pass over val and test: the last batch of each is padded with its first.
  n_eval = sum(-(-len(data.split(name)) // 8) * 8 for name in ("val", "test"))
  assert n_eval > sum(len(data.split(name)) for name in ("val", "test"))
  results = {}
  for mode in MODES:
    ev = _evaluator(setup, mode)
    want_where = {"stream": evaluation.STREAM, "host": evaluation.HOST,
                  "device": evaluation.DEVICE}[mode]
    assert {w for k, w in ev.plan.items() if ev.names[k] != "train"} == {want_where}
    decodes[0] = 0
    got = []
    for _ in range(2):  # two evaluations of each split
      for name in ("val", "test"):
        seen = {}
        m = ev.evaluate(p, bs, name, on_embeddings=lambda e, s: seen.setdefault("e", e))
        got.append((m, seen["e"]))
    # Cached: every evaluation image decoded once in all; streamed: at each evaluation.
    assert decodes[0] == (2 * n_eval if mode == "stream" else n_eval), mode
    results[mode] = got
    ev.close()
  for mode in ("host", "device"):
    for (m, e), (m0, e0) in zip(results[mode], results["stream"]):
      np.testing.assert_array_equal(e, e0)
      assert m == m0


def test_train_pool_from_the_cache_equals_decoding(setup):
  c, data, _, _, state = setup
  p, bs = state.params["model"], state.batch_stats
  idx = np.random.default_rng(0).permutation(len(data.train_labels))[:13]  # two batches, padded
  cached, streamed = _evaluator(setup, "host"), _evaluator(setup, "stream")
  assert cached.plan[id(data.train_images)] == evaluation.HOST
  assert id(data.train_images) not in streamed.plan
  np.testing.assert_array_equal(cached.embed_train(p, bs, idx), streamed.embed_train(p, bs, idx))
  assert cached.caches[id(data.train_images)].rows.shape[0] == len(data.train_labels)


def test_budgets_are_respected(setup):
  c, data, model, mesh, _ = setup
  c = c.copy_and_resolve_references()
  val = data.split("val")
  one = evaluation.image_bytes(-(-len(val) // 8) * 8, data.image_shape)
  c.eval_cache.device_mb, c.eval_cache.host_mb = 0, one / 2**20  # room for the first split only
  c.eval_cache.train = True
  ev = evaluation.Evaluator(c, model, mesh, data)
  assert ev.plan[id(val.images)] == evaluation.HOST
  assert list(ev.plan.values()).count(evaluation.HOST) == 1
  assert id(data.train_images) not in ev.plan


def test_knn_from_device_arrays_gives_the_host_metrics(setup):
  """config.eval_knn.placement="device": the evaluator keeps the embeddings on the devices and
  the kNN starts from them (what "auto" does on a GPU/TPU); the metrics are the host path's."""
  c, data, model, mesh, state = setup
  p, bs = state.params["model"], state.batch_stats
  got = {}
  for placement in ("host", "device"):
    cfg = c.copy_and_resolve_references()
    cfg.eval_knn.placement = placement
    ev = evaluation.Evaluator(cfg, model, mesh, data)
    assert ev.knn_on_device() == (placement == "device")
    seen = {}
    got[placement] = ev.evaluate(p, bs, "val", on_embeddings=lambda e, s: seen.setdefault("e", e))
    assert isinstance(seen["e"], np.ndarray)
    got[placement + "/emb"] = seen["e"]
    ev.close()
  assert got["device"] == got["host"]
  np.testing.assert_array_equal(got["device/emb"], got["host/emb"])
