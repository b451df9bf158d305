"""Models: shapes, normalisations, registry errors, BatchNorm train/eval behaviour."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmljax.configs import base_config, shrink
from dmljax import models


def _model(**kw):
  mc = shrink(base_config()).model
  for k, v in kw.items():
    mc[k] = v
  return models.get_model(mc)


@pytest.mark.parametrize("norm", ["bounded", "l2", "none"])
def test_shapes_and_normalisation(norm):
  m = _model(normalization=norm, embedding_dim=6)
  x = jax.random.uniform(jax.random.PRNGKey(0), (4, 8, 8, 1))
  v = m.init(jax.random.PRNGKey(1), x, train=False)
  # Scale the head so that some raw embeddings are long (> 1) and make the norms testable.
  v = jax.tree_util.tree_map_with_path(
      lambda p, a: a * 50.0 if "head" in str(p) and "kernel" in str(p) else a, v)
  out = m.apply(v, x, train=False)
  raw = m.clone(normalization="none").apply(v, x, train=False)
  # normalize=False: the embedding before the normalisation (CCP's k-center pool).
  np.testing.assert_allclose(m.apply(v, x, train=False, normalize=False), raw)
  assert out.shape == (4, 6) and out.dtype == jnp.float32
  n_raw = np.linalg.norm(np.asarray(raw), axis=1)
  n = np.linalg.norm(np.asarray(out), axis=1)
  if norm == "bounded":
    np.testing.assert_allclose(n, np.minimum(n_raw, 1.0), rtol=1e-5)
  elif norm == "l2":
    np.testing.assert_allclose(n, 1.0, rtol=1e-5)
  else:
    np.testing.assert_allclose(out, raw)


def test_embedding_layer_without_bias():
  def head(**kw):  # parameter shapes only (no compile)
    x = jnp.zeros((1, 8, 8, 1))
    return set(jax.eval_shape(lambda: _model(**kw).init(jax.random.PRNGKey(1), x,
                                                         train=False))["params"]["head"])
  assert head(head_bias=False) == {"kernel"} and head() == {"kernel", "bias"}


def test_32x32_input_and_batch_stats_update():
  m = _model()
  x = jax.random.uniform(jax.random.PRNGKey(0), (4, 32, 32, 1))
  v = m.init(jax.random.PRNGKey(1), x, train=False)
  out, mut = m.apply(v, x, train=True, mutable=["batch_stats"])
  assert out.shape == (4, 16)
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         v["batch_stats"], mut["batch_stats"])
  assert all(jax.tree.leaves(changed))


def test_unknown_model_and_normalisation():
  with pytest.raises(ValueError, match=r"Unknown model 'resnet9'.*small_cnn"):
    _model(name="resnet9")
  with pytest.raises(ValueError, match=r"Unknown normalization 'unit'.*bounded"):
    _model(normalization="unit")


def test_auto_dtype_is_bf16_on_accelerators_f32_on_cpu():
  # Issue 17: model.dtype="auto" resolves by backend; the run records the dtype it used.
  import ml_collections  # pylint: disable=g-import-not-at-top
  from dmljax import train  # pylint: disable=g-import-not-at-top
  from dmljax.models import layers  # pylint: disable=g-import-not-at-top
  assert layers.auto_dtype("gpu") == layers.auto_dtype("tpu") == "bfloat16"
  assert layers.auto_dtype("cpu") == "float32"
  assert layers.dtype_name("bfloat16", "cpu") == "bfloat16"  # an explicit dtype is kept
  cfg = ml_collections.ConfigDict({"model": {"dtype": "auto"}})
  resolved = train.resolve_precision(cfg)
  assert resolved.model.dtype == layers.auto_dtype() and cfg.model.dtype == "auto"
  record = train.precision_record(resolved)
  assert record["backend"] == jax.default_backend()
  assert record["model_dtype"] == layers.auto_dtype()
