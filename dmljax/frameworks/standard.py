"""``standard``: any loss of the library, alone.

* Pair losses (``dmljax.losses.PAIR_LOSSES`` / ``DRO_LOSSES``) use in-batch pairs; with
  ``config.standard.use_proxies`` they are computed against learnable proxies instead (the
  "proxy-contrastive" baseline).
* Proxy losses (``PROXY_LOSSES``) always get learnable proxies ``[C * P, D]``, class-major, with
  ``P = config.standard.proxies_per_class`` (SoftTriple / MPA read ``P`` as centres per class).

Proxies are initialised as random unit vectors (fixed by the seed); their learning-rate multiplier
is ``config.optim.lr_multipliers["proxies"]`` (x100 in the proxy baselines). With
``config.standard.normalize_proxies`` (default) the loss sees L2-normalised proxies on every step,
so they cannot drift off the sphere whatever the optimizer does. Losses that take a random key
(``dro_kl_sampled``'s p-sampling) get the step's key.
"""
from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import ml_collections

from dmljax import losses
from dmljax.frameworks.base import Framework, class_major_labels


def loss_kwargs(config) -> dict:
  """The loss hyperparameters from ``config.loss.kwargs`` as a plain dict."""
  kw = config.loss.get("kwargs", None)
  return {} if kw is None else dict(kw.to_dict() if hasattr(kw, "to_dict") else kw)


class StandardFramework(Framework):
  """Trains ``config.loss.name`` alone (with learnable proxies when it needs them)."""

  name = "standard"
  config_key = "standard"

  @staticmethod
  def default_config():
    c = ml_collections.ConfigDict()
    c.use_proxies = False         # pair losses: against learnable proxies instead of in-batch
    c.proxies_per_class = 1
    c.normalize_proxies = True    # the loss sees L2-normalised proxies on every step
    return c

  def __init__(self, config, *, num_classes, embedding_dim):
    super().__init__(config, num_classes=num_classes, embedding_dim=embedding_dim)
    self.loss_fn = losses.get_loss(config.loss.name)  # ValueError listing the valid names
    self.kwargs = loss_kwargs(config)
    self.use_proxies = (config.loss.name in losses.PROXY_LOSSES
                        or bool(config.standard.use_proxies))
    self.per_class = int(config.standard.proxies_per_class)
    params = inspect.signature(self.loss_fn).parameters
    self.takes_rng = "rng" in params
    if self.use_proxies and "centers_per_class" in params:
      # SoftTriple / MPA read the proxies as centres per class: one setting, not two.
      given = self.kwargs.get("centers_per_class")
      if given is not None and int(given) != int(config.standard.proxies_per_class):
        raise ValueError(f"loss.kwargs.centers_per_class={given} differs from "
                         f"standard.proxies_per_class={config.standard.proxies_per_class}; set "
                         "only --config.standard.proxies_per_class.")
      self.kwargs["centers_per_class"] = int(config.standard.proxies_per_class)

  def validate(self):
    if self.use_proxies and self.per_class < 1:
      raise ValueError(f"standard.proxies_per_class must be >= 1, got {self.per_class}.")

  def init(self, rng, model_params, batch_stats):
    del model_params, batch_stats
    if not self.use_proxies:
      return {}, {}
    r = self.num_classes * self.per_class
    proxies = jax.random.normal(rng, (r, self.embedding_dim), jnp.float32)
    proxies = losses.l2_normalize(proxies)
    return {"proxies": proxies}, {"proxy_labels": class_major_labels(self.num_classes,
                                                                     self.per_class)}

  def loss(self, params, embeddings, labels, state, rng, extras=None):
    del extras
    kw = dict(self.kwargs, rng=rng) if self.takes_rng else self.kwargs
    if self.use_proxies:
      proxies = params["proxies"]
      if self.config.standard.normalize_proxies:
        proxies = losses.l2_normalize(proxies)
      value = self.loss_fn(embeddings, labels, ref_embeddings=proxies,
                           ref_labels=state.framework["proxy_labels"], **kw)
    else:
      value = self.loss_fn(embeddings, labels, **kw)
    return value, ({"loss/main": value}, state.framework)
