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

In-batch pair losses can be restricted to mined pairs or triplets (``config.standard.miner``,
:data:`MINERS`; the paper baselines "Contrastive-Hard", "Triplet-Semi", "Margin-Hard", MS with its
miner): the miner sees the embeddings without gradient and its masks reach the loss through
``pair_mask=`` (and ``triplet_mask=`` for the triplet loss). ``config.standard.miner_kwargs``
holds its settings (``distance``: default the loss's own ``distance``, else "euclidean";
``margin`` of ``semi_hard``; ``epsilon`` of ``multi_similarity``).
"""
from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import ml_collections

from dmljax import losses
from dmljax.frameworks.base import Framework, class_major_labels

#: ``config.standard.miner`` values: none; ``batch_hard`` (hardest positive and negative per
#: anchor); ``semi_hard`` (FaceNet's semi-hard triplets); ``hard_negative`` (one hard negative per
#: positive pair, the r-th positive getting the r-th closest negative: the balanced hard mining
#: of PROFS and Wu et al.); ``multi_similarity`` (Wang et al.'s pair mining).
MINERS = ("none", "batch_hard", "semi_hard", "hard_negative", "multi_similarity")


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
    c.miner = "none"              # in-batch pair losses: one of MINERS
    c.miner_kwargs = ml_collections.ConfigDict()
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
    miner = self.miner
    if miner not in MINERS:
      raise ValueError(f"Unknown standard.miner {miner!r}; valid: {list(MINERS)} (set "
                       "--config.standard.miner).")
    if miner != "none":
      if self.use_proxies or self.config.loss.name not in losses.PAIR_LOSSES:
        raise ValueError(f"standard.miner={miner!r} mines in-batch pairs: it needs an in-batch "
                         f"pair loss, got {self.config.loss.name!r}"
                         f"{' with proxies' if self.use_proxies else ''}; set "
                         "--config.standard.miner=none.")
      if "pair_mask" not in inspect.signature(self.loss_fn).parameters:
        raise ValueError(f"loss {self.config.loss.name!r} takes no pair_mask; it cannot be "
                         "mined (set --config.standard.miner=none).")
      allowed = {"distance"} | {"semi_hard": {"margin"},
                                "multi_similarity": {"epsilon"}}.get(miner, set())
      extra = sorted(set(self._miner_kwargs()) - allowed)
      if extra:
        raise ValueError(f"standard.miner_kwargs {extra} are not settings of miner {miner!r}; "
                         f"valid: {sorted(allowed)}.")

  @property
  def miner(self) -> str:
    return str(self.config.standard.get("miner", "none"))

  def _miner_kwargs(self) -> dict:
    kw = self.config.standard.get("miner_kwargs", None)
    return {} if kw is None else dict(kw.to_dict() if hasattr(kw, "to_dict") else kw)

  def _mined(self, embeddings, labels) -> dict:
    """The loss keywords of the configured miner (``{}`` without one)."""
    miner = self.miner
    if miner == "none":
      return {}
    kw = self._miner_kwargs()
    distance = (kw.pop("distance", None) or self.kwargs.get("distance")
                or ("dot" if miner == "multi_similarity" else "euclidean"))
    distance = {"squared_euclidean": "squared"}.get(distance, distance)
    x = jax.lax.stop_gradient(embeddings)
    triplet = "triplet_mask" in inspect.signature(self.loss_fn).parameters
    if miner == "semi_hard":
      t = losses.miners.semi_hard(x, labels, distance=distance, **kw)
      return ({"triplet_mask": t} if triplet else
              {"pair_mask": jnp.any(t, axis=2) | jnp.any(t, axis=1)})
    if miner == "hard_negative":
      choice = losses.miners.hardest_negative_per_positive(x, labels, distance=distance,
                                                          distinct=True)
      return ({"triplet_mask": choice.triplet_mask()} if triplet else
              {"pair_mask": choice.pair_mask()})
    if miner == "batch_hard":
      pos, neg = losses.miners.batch_hard(x, labels, distance=distance)
    else:
      pos, neg = losses.miners.multi_similarity_miner(x, labels, distance=distance, **kw)
    if triplet:
      return {"triplet_mask": pos[:, :, None] & neg[:, None, :]}
    return {"pair_mask": pos | neg}

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
      value = self.loss_fn(embeddings, labels, **kw, **self._mined(embeddings, labels))
    return value, ({"loss/main": value}, state.framework)
