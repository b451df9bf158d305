"""Models: shapes, normalisations, registry errors, BatchNorm train/eval behaviour.

Random test images are drawn flat and reshaped (the same values as a 4-D draw; XLA:CPU compiles
a 4-D threefry draw several times slower, see ``layers.variance_scaling``)."""
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
  x = jax.random.uniform(jax.random.PRNGKey(0), (256,)).reshape(4, 8, 8, 1)
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
  x = jax.random.uniform(jax.random.PRNGKey(0), (4096,)).reshape(4, 32, 32, 1)
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


def test_conv_initialisers_are_flax_s_with_flat_draws():
  """layers.variance_scaling (flat random draws, reshaped: XLA:CPU compiles them several times
  faster) gives flax's initialisers bit for bit: lecun_normal (small_cnn's convolutions, flax's
  default) and He normal on fan_out (the imported backbones' ``layers.conv``)."""
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from dmljax.models import layers  # pylint: disable=g-import-not-at-top
  key, shape = jax.random.PRNGKey(7), (3, 3, 2, 5)
  pairs = [(layers.variance_scaling(1.0, "fan_in", "truncated_normal"),
            nn.initializers.lecun_normal()),
           (layers.variance_scaling(2.0, "fan_out", "normal"),
            nn.initializers.variance_scaling(2.0, "fan_out", "normal"))]
  got, want = jax.jit(lambda k: ([ours(k, shape) for ours, _ in pairs],
                                 [theirs(k, shape) for _, theirs in pairs]))(key)
  for g, w in zip(got, want):
    assert g.shape == shape and np.array_equal(np.asarray(g), np.asarray(w))
    assert np.asarray(g).std() > 0.1
