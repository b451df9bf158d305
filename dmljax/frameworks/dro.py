"""``dro``: distributionally robust pair weighting (Qi, Yan, Wang, Yang), the explicit framework.

Every pair of the *global* batch (the trainer hands the loss the whole batch, so pairs span
devices) gets a simple base loss, and one of the paper's uncertainty sets decides the pairs'
weights (:mod:`dmljax.losses.dro` has the formulas):

==================  ======================================================================
``dro.weighting``   the loss of the batch
==================  ======================================================================
``dro_topk``        DRO-TopK: mean of the K largest pair losses (``k``, ``normalize``)
``dro_topk_pn``     DRO-TopK-PN: the K/2 largest positive and K/2 largest negative losses
``dro_kl``          DRO-KL, closed form: ``gamma log mean exp(l / gamma)`` (``gamma``)
``dro_kl_sampled``  DRO-KL with p-sampling: ``num_samples`` pairs drawn from ``p*`` with the
                    step's random key (``gamma``, ``num_samples``)
``dro_grouped_kl``  DRO-KL-G: KL weights per anchor and side (recovers LS / MS; ``gamma``,
                    ``gamma_pos``, ``gamma_neg``, ``add_one``, ``reduction``)
==================  ======================================================================

``dro.kwargs`` holds the weighting's hyperparameters; every weighting also takes the base loss:
``base`` (``"margin"``: ``[m + y (lambda - S)]_+``, or ``"binomial"``), ``margin`` (m),
``threshold`` (lambda), ``alpha`` / ``beta`` (binomial scales) and ``binomial_form``
(``"plain"`` or ``"scaled"``). A key left out takes the loss function's default, which is the
paper's setting (m = 0.2, lambda = 0.5, alpha = 2, beta = 50, K = num_samples = 2 B,
gamma = 0.1, plain binomial). The similarity is the inner product, the cosine on L2-normalised
embeddings (``config.model.normalization = "l2"``, as the glyphs DRO configs set). Batches are
classes x ``config.sampler.m`` samples (the paper: M = 5).

``config.loss`` is not used by this framework (the ``standard`` framework can also run a DRO loss
named in ``config.loss.name``; this one has its own block, validated before anything compiles).
p-sampling draws with the step's key ``fold_in(rng, step)``, so a run, and a resumed run, draws
the same pairs at the same step, and different steps draw different pairs.

Validation (``ValueError`` naming the config key and the valid values): the weighting's name,
the names in ``kwargs`` (a key that no weighting takes is an error; a key another weighting takes,
e.g. ``gamma`` under ``dro_topk``, is ignored with a warning, so that ``--config.dro.weighting``
can switch weightings of a config), ``base`` / ``binomial_form`` / ``normalize`` /
``reduction`` values, and the numeric ranges (the weighting's own checks, run by tracing it once on a
two-sample batch with ``jax.eval_shape``: nothing is compiled).
"""
from __future__ import annotations

import inspect

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from dmljax import losses
from dmljax.frameworks.base import Framework
from dmljax.losses import dro as dro_lib

WEIGHTINGS = tuple(dro_lib.__all__)  # dro_topk, dro_topk_pn, dro_kl, dro_kl_sampled, dro_grouped_kl
_NOT_HYPERPARAMETERS = ("embeddings", "labels", "rng", "ref_embeddings", "ref_labels",
                        "ref_mask")
#: Allowed values of the name-valued hyperparameters.
_CHOICES = {"base": dro_lib.BASE_LOSSES, "binomial_form": dro_lib.BINOMIAL_FORMS,
            "normalize": dro_lib.NORMALIZATIONS, "reduction": ("mean", "sum")}


def hyperparameters(weighting: str) -> tuple[str, ...]:
  """The keyword hyperparameters of a DRO weighting (what ``dro.kwargs`` may set)."""
  params = inspect.signature(losses.DRO_LOSSES[weighting]).parameters
  return tuple(p for p in params if p not in _NOT_HYPERPARAMETERS)


def _kwargs(config) -> dict:
  kw = config.dro.get("kwargs", None)
  return {} if kw is None else dict(kw.to_dict() if hasattr(kw, "to_dict") else kw)


class DROFramework(Framework):
  """One DRO weighting over all pairs of the global batch."""

  name = "dro"
  config_key = "dro"

  @staticmethod
  def default_config():
    c = ml_collections.ConfigDict()
    c.weighting = "dro_topk"        # one of WEIGHTINGS
    # The weighting's hyperparameters (k, gamma, num_samples, base, margin, threshold, alpha,
    # beta, binomial_form, normalize, ...). Empty: the loss functions' defaults, the paper's
    # settings (K = 2 B, gamma = 0.1, margin base m = 0.2, lambda = 0.5).
    c.kwargs = ml_collections.ConfigDict()
    return c

  def __init__(self, config, *, num_classes, embedding_dim):
    super().__init__(config, num_classes=num_classes, embedding_dim=embedding_dim)
    self.weighting = str(config.dro.weighting)
    self.kwargs = _kwargs(config)
    self.loss_fn = losses.DRO_LOSSES.get(self.weighting)
    self.takes_rng = self.weighting == "dro_kl_sampled"

  def validate(self):
    if self.weighting not in WEIGHTINGS:
      raise ValueError(f"Unknown dro.weighting {self.weighting!r}; valid: {list(WEIGHTINGS)} "
                       "(set --config.dro.weighting).")
    own = hyperparameters(self.weighting)
    anyone = sorted({h for w in WEIGHTINGS for h in hyperparameters(w)})
    used = {}
    for key, value in self.kwargs.items():
      if key in own:
        used[key] = value
      elif key in anyone:
        logging.warning("dro.kwargs.%s is not a hyperparameter of %s; ignored (%s takes %s).",
                        key, self.weighting, self.weighting, list(own))
      else:
        raise ValueError(f"Unknown key dro.kwargs.{key}: no DRO weighting takes it; "
                         f"{self.weighting} takes {list(own)} (set --config.dro.kwargs.<key>).")
    for key, valid in _CHOICES.items():
      if key in used and used[key] not in valid:
        raise ValueError(f"Unknown dro.kwargs.{key} {used[key]!r}; valid: {list(valid)} "
                         f"(set --config.dro.kwargs.{key}).")
    self.kwargs = used
    # Numeric ranges (k >= 1 and an int, gamma > 0, margin >= 0, ...) are the loss function's
    # own trace-time checks: trace it once on a two-sample batch (jax.eval_shape: no compile,
    # no computation) so that they fail here, before anything compiles.
    emb = jax.ShapeDtypeStruct((2, 2), jnp.float32)
    lab = jax.ShapeDtypeStruct((2,), jnp.int32)
    try:
      jax.eval_shape(self._call, emb, lab, jax.random.PRNGKey(0))
    except ValueError as e:
      raise ValueError(f"Bad dro.kwargs for {self.weighting}: {e} "
                       f"(set --config.dro.kwargs.<key>; {self.weighting} takes {list(own)}).") from e

  def _call(self, embeddings, labels, rng):
    kw = dict(self.kwargs, rng=rng) if self.takes_rng else self.kwargs
    return self.loss_fn(embeddings, labels, **kw)

  def loss(self, params, embeddings, labels, state, rng, extras=None):
    del params, extras
    value = self._call(embeddings, labels, rng)
    return value, ({"loss/dro": value}, state.framework)
