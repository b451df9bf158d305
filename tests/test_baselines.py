"""The proxy baselines' and MPA's training settings (issue 11): random batches, the embedding-layer
warm-up, the step-decay schedule, proxies normalised inside the loss, centres = proxies, and the
step's random key reaching losses that sample."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dmljax import frameworks, losses, optim
from dmljax import state as state_lib
from dmljax.configs import base_config, shrink
from dmljax.data.samplers import RandomSampler


def test_random_sampler_covers_each_epoch_and_round_trips():
  labels = np.repeat(np.arange(5), 4)                     # 20 samples
  s = RandomSampler(labels, batch_size=5, seed=3)
  epoch0 = np.concatenate([s.global_batch(i) for i in range(4)])
  assert sorted(epoch0.tolist()) == list(range(20))       # every sample once per epoch
  epoch1 = np.concatenate([s.global_batch(i) for i in range(4, 8)])
  assert sorted(epoch1.tolist()) == list(range(20)) and not np.array_equal(epoch0, epoch1)
  again = RandomSampler.from_state_dict(labels, s.state_dict())
  np.testing.assert_array_equal(again.global_batch(6), s.global_batch(6))
  np.testing.assert_array_equal(s.batch(6, 1, 5), s.global_batch(6)[1:2])
  with pytest.raises(ValueError, match="batch_size"):
    RandomSampler(labels, batch_size=21)
  with pytest.raises(ValueError, match="labels differ"):
    RandomSampler.from_state_dict(labels[::-1].copy() + 1, s.state_dict())


def _params():
  return {"model": {"trunk": {"kernel": jnp.ones((2, 2))}, "head": {"kernel": jnp.ones((2, 2))}},
          "proxies": jnp.ones((3, 2))}


def test_trunk_frozen_for_the_warm_up_then_trained():
  oc = base_config().optim
  oc.weight_decay, oc.grad_clip_norm, oc.freeze_trunk_epochs = 0.0, 0.0, 2.0
  tx = optim.make_optimizer(oc, 100, steps_per_epoch=3)   # 2 epochs = 6 steps
  p = _params()
  st = tx.init(p)
  g = jax.tree.map(jnp.ones_like, p)
  for step in range(8):
    u, st = tx.update(g, st, p)
    trunk = float(jnp.abs(u["model"]["trunk"]["kernel"]).max())
    assert float(jnp.abs(u["model"]["head"]["kernel"]).max()) > 0
    assert float(jnp.abs(u["proxies"]).max()) > 0
    assert (trunk == 0.0) == (step < 6), step
  # Moments kept accumulating while frozen: the first trunk step is a normal Adam step (lr).
  np.testing.assert_allclose(np.abs(np.asarray(u["model"]["trunk"]["kernel"])), 1e-3, rtol=1e-4)
  with pytest.raises(ValueError, match="steps per epoch"):
    optim.make_optimizer(oc, 100)


def test_step_schedule_halves_every_decay_period():
  oc = base_config().optim
  oc.schedule, oc.decay_every_epochs, oc.decay_factor, oc.learning_rate = "step", 2.0, 0.5, 0.4
  sched = optim.make_schedule(oc, 100, steps_per_epoch=5)  # every 10 steps
  assert [float(sched(s)) for s in (0, 9, 10, 19, 20)] == pytest.approx([0.4, 0.4, 0.2, 0.2, 0.1])
  oc.decay_every_epochs = 0.0
  with pytest.raises(ValueError, match="decay_every_epochs"):
    optim.make_schedule(oc, 100, steps_per_epoch=5)


def _standard(loss_name, kwargs=None, **std):
  c = shrink(base_config())
  c.framework, c.loss.name, c.loss.kwargs = "standard", loss_name, kwargs or {}
  for k, v in std.items():
    c.standard[k] = v
  fw = frameworks.get_framework(c, num_classes=3, embedding_dim=4)
  extra, fs = fw.init(jax.random.PRNGKey(0), {"w": jnp.ones(2)}, {})
  st = state_lib.create_train_state(rng=jax.random.PRNGKey(1), model_params={"w": jnp.ones(2)},
                                    batch_stats={}, extra_params=extra, framework_state=fs,
                                    tx=optax.sgd(0.1))
  return c, fw, st


def test_proxies_normalised_inside_the_loss():
  # Guards issue 11: proxies were normalised only at initialisation and drifted off the sphere.
  c, fw, st = _standard("proxy_anchor")
  emb = losses.l2_normalize(jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.float32))
  labels = jnp.asarray([0, 0, 1, 1, 2, 2])
  unit, _ = fw.loss(st.params, emb, labels, st, None)
  drifted = dict(st.params, proxies=st.params["proxies"] * 3.0)
  off, _ = fw.loss(drifted, emb, labels, st, None)
  np.testing.assert_allclose(float(off), float(unit), rtol=1e-6)
  raw = losses.proxy_anchor(emb, labels, ref_embeddings=drifted["proxies"],
                            ref_labels=st.framework["proxy_labels"])
  assert abs(float(raw) - float(unit)) > 1e-3             # the normalisation matters


def test_centres_per_class_follow_the_proxies():
  c, fw, _ = _standard("soft_triple", proxies_per_class=3)
  assert fw.kwargs["centers_per_class"] == 3
  c.unlock()
  c.loss.kwargs = {"centers_per_class": 2}
  with pytest.raises(ValueError, match="centers_per_class=2 differs"):
    frameworks.get_framework(c, num_classes=3, embedding_dim=4)


def test_standard_passes_the_step_key_to_sampling_losses():
  # Guards issue 11: `standard` dropped the step's rng, so dro_kl_sampled could not train.
  c, fw, st = _standard("dro_kl_sampled", {"gamma": 10.0})   # a spread-out p*
  emb = losses.l2_normalize(jnp.asarray(np.random.default_rng(1).normal(size=(8, 4)),
                                        jnp.float32))
  labels = jnp.asarray([0, 0, 1, 1, 2, 2, 0, 1])
  f = lambda key: fw.loss(st.params, emb, labels, st, key)[0]
  a, b = f(jax.random.PRNGKey(0)), f(jax.random.PRNGKey(0))
  assert float(a) == float(b)
  values = {float(f(jax.random.PRNGKey(i))) for i in range(6)}
  assert len(values) > 1
