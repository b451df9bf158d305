"""``ccp``: chance-constrained proxies (Gürbüz, Can, Alatan; Algorithms 1 and 2).

Training is a sequence of *projections*. Projection ``k`` minimises (inside the jitted step)::

    proxy_weight * proxy_loss(batch -> proxies) + in_batch_weight * in_batch_loss(batch, batch)
      + lam_k / 2 * ||theta_model - theta_anchor||^2

with ``P`` learnable proxies per class, ``lam_0 = 0`` (no proximal term in the first projection,
the authors' code) and ``lam_k = config.ccp.lam`` afterwards. The proximal term covers the model
(backbone + head) only, never the proxies. The sample-to-proxy loss is ``config.loss`` (any pair
loss of the library: C1, C2, MS, triplet...); the in-batch term is its own loss,
``config.ccp.in_batch_loss`` with ``config.ccp.in_batch_kwargs`` (contrastive for every CCP
variant in the authors' code), so MS-CCP does not silently reuse multi-similarity in-batch. The
loss is :func:`dmljax.losses.objectives.ccp_objective`.

Host side, after every validation evaluation (MAP@R): a projection ends when it has gone
``config.ccp.patience`` evaluations without beating its own best MAP@R (an early-stopping
counter restarted each projection, as the authors' per-fit Keras ``EarlyStopping`` callback).
``config.ccp.max_projection_steps`` (0 = off, the default: the paper ends projections by
patience alone) can cap a projection's length. Then:

1. the next projection's starting point is chosen by ``config.ccp.start_from``:
   ``"projection_best"`` (default; the best weights of the projection that just ended, what the
   authors' callback restores), ``"converged"`` (Algorithm 1: ``theta* <- theta``, the weights
   the projection ended with) or ``"run_best"`` (the best weights of the whole run; a projection
   that never beats it is discarded). Model params, BatchNorm statistics and proxies all come
   from that solution, and the anchor becomes its model params;
2. a pool of ``b = pool_size`` embeddings per class is drawn (``b`` passes of the one-per-class
   sampler, embedded in inference mode with the starting weights);
3. greedy k-center (:func:`dmljax.kernels.kcenter.greedy_kcenter`, one jitted kernel over all
   classes) picks ``P`` new proxies per class, seeded with the proxies of that same solution;
4. the optimizer state is kept (the paper and the authors' code: one Adam through the run).
   With ``config.ccp.reset_proxy_opt_state`` the proxies' Adam state (moments *and* their own
   step count, see :mod:`dmljax.optim`) is reset, so their next steps are those of a freshly
   started Adam, never larger.

The very first proxies (before step 0) come from the same pool with no seeds (the authors' code:
the first seed set is empty). With ``config.ccp.alternate = False`` the proxies are never
re-initialised and there is a single projection: the paper's "Loss-Proxy" ablation.

Training as a whole stops by the trainer's overall patience (``config.patience_evals``) and
restores the best parameters.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dmljax import losses
from dmljax.frameworks.base import Framework, HostContext, class_major_labels
from dmljax.frameworks.standard import loss_kwargs
from dmljax.numerics import copy_tree, to_host

START_MODES = ("projection_best", "converged", "run_best")
PROXY_NORMALIZATIONS = ("none", "l2", "bounded")


def _greedy_kcenter(*args, **kwargs):
  from dmljax.kernels.kcenter import greedy_kcenter  # pylint: disable=g-import-not-at-top
  return greedy_kcenter(*args, **kwargs)


class CCPFramework(Framework):
  """CCP with any pair loss as the sample-to-proxy loss."""

  name = "ccp"
  config_key = "ccp"

  @staticmethod
  def default_config():
    c = ml_collections.ConfigDict()
    c.proxies_per_class = 4
    c.pool_size = 8                 # k-center pool: b samples per class (one-per-class passes)
    c.lam = 2e-4
    c.patience = 3                  # a projection ends after 3 evaluations without improving
    c.max_projection_steps = 0      # 0 = off: projections end by patience alone (the paper)
    c.proxy_weight = 1.0
    c.in_batch_weight = 0.1
    # The in-batch term is its own loss: contrastive for every CCP variant (the authors' code),
    # whatever config.loss (the sample-to-proxy loss) is.
    c.in_batch_loss = "contrastive"
    c.in_batch_kwargs = ml_collections.ConfigDict({"pos_margin": 0.0, "neg_margin": 1.0})
    c.alternate = True              # False: a single proxy problem ("Loss-Proxy" ablation)
    # What projection k+1 starts from: "projection_best" (the best weights of projection k, as
    # the authors' per-fit early-stopping callback restores), "converged" (Algorithm 1: the
    # weights projection k ended with) or "run_best" (the best of the whole run so far).
    c.start_from = "projection_best"
    # Zero the proxies' Adam moments (and their own step count) at re-initialisation. Off: the
    # paper and the authors' code keep one optimizer state through the whole run.
    c.reset_proxy_opt_state = False
    # What the sample-to-proxy loss sees: the proxies as they are ("none", for distance losses
    # such as C2), or normalised on every step ("l2", "bounded": v / max(1, |v|)). Similarity
    # losses (C1, MS) need it: with free proxies a dot product grows without bound.
    c.proxy_normalization = "none"
    return c

  def __init__(self, config, *, num_classes, embedding_dim):
    super().__init__(config, num_classes=num_classes, embedding_dim=embedding_dim)
    cc = config.ccp
    self.pair_loss = losses.get_loss(config.loss.name)
    self.kwargs = loss_kwargs(config)
    self.batch_loss = losses.get_loss(cc.in_batch_loss)
    kw = cc.get("in_batch_kwargs", None)
    self.batch_kwargs = {} if kw is None else dict(kw.to_dict() if hasattr(kw, "to_dict") else kw)
    self.per_class = int(cc.proxies_per_class)
    self.pool_size = int(cc.pool_size)
    self.lam = float(cc.lam)
    self._pool_sampler = None  # built from the training labels on first use (host side)

  def validate(self):
    cc = self.config.ccp
    name = self.config.loss.name
    if name not in losses.PAIR_LOSSES:
      raise ValueError(f"ccp needs a pair loss as its sample-to-proxy loss, got {name!r}; "
                       f"valid: {sorted(losses.PAIR_LOSSES)} (set --config.loss.name).")
    if cc.in_batch_loss not in losses.PAIR_LOSSES:
      raise ValueError(f"ccp.in_batch_loss must be a pair loss, got {cc.in_batch_loss!r}; "
                       f"valid: {sorted(losses.PAIR_LOSSES)} (set --config.ccp.in_batch_loss).")
    if cc.proxy_normalization not in PROXY_NORMALIZATIONS:
      raise ValueError(f"Unknown ccp.proxy_normalization {cc.proxy_normalization!r}; valid: "
                       f"{list(PROXY_NORMALIZATIONS)} (set --config.ccp.proxy_normalization).")
    if cc.start_from not in START_MODES:
      raise ValueError(f"Unknown ccp.start_from {cc.start_from!r}; valid: {list(START_MODES)} "
                       "(set --config.ccp.start_from).")
    if self.per_class < 1:
      raise ValueError(f"ccp.proxies_per_class must be >= 1, got {self.per_class}.")
    if self.pool_size < self.per_class:
      raise ValueError(f"ccp.pool_size ({self.pool_size}) must be >= ccp.proxies_per_class "
                       f"({self.per_class}): k-center picks the proxies from the pool.")
    if cc.patience < 1 or cc.max_projection_steps < 0:
      raise ValueError(f"ccp.patience must be >= 1 (got {cc.patience}) and "
                       f"ccp.max_projection_steps >= 0 (0 = no cap; got {cc.max_projection_steps}).")
    if self.lam < 0:
      raise ValueError(f"ccp.lam must be >= 0, got {self.lam}.")

  # --------------------------------------------------------------------------- state

  def init(self, rng, model_params, batch_stats):
    del rng  # the proxies are set from the k-center pool in on_start
    r = self.num_classes * self.per_class
    extra = {"proxies": jnp.zeros((r, self.embedding_dim), jnp.float32)}
    fstate = {
        "proxy_labels": class_major_labels(self.num_classes, self.per_class),
        "projection": jnp.asarray(0, jnp.int32),
        "proj_best_metric": jnp.asarray(-jnp.inf, jnp.float32),
        "proj_evals_since_best": jnp.asarray(0, jnp.int32),
        "proj_start_step": jnp.asarray(0, jnp.int32),
    }
    if self.config.ccp.start_from == "projection_best":
      # Snapshot of the running projection's best solution (set in on_start / after_eval).
      fstate["proj_best"] = {"params": copy_tree({"model": model_params, **extra}),
                             "batch_stats": copy_tree(batch_stats)}
    return extra, fstate

  # --------------------------------------------------------------------------- in-step loss

  def loss(self, params, embeddings, labels, state, rng, extras=None):
    del rng, extras
    cc = self.config.ccp
    fs = state.framework
    batch_weight = float(cc.in_batch_weight)
    data_loss, parts = losses.objectives.ccp_objective(
        embeddings, labels, self.loss_proxies(params["proxies"]), fs["proxy_labels"],
        proxy_loss=self.pair_loss, batch_loss=self.batch_loss if batch_weight > 0 else None,
        proxy_weight=float(cc.proxy_weight), batch_weight=batch_weight,
        proxy_loss_kwargs=self.kwargs, batch_loss_kwargs=self.batch_kwargs)
    # No proximal term in the first projection (there is no previous solution yet).
    lam = jnp.where(fs["projection"] > 0, self.lam, 0.0)
    prox = losses.objectives.proximal(params["model"], state.anchor, lam)
    total = data_loss + prox
    metrics = {"loss/proxy": parts["proxy"], "loss/in_batch": parts["batch"],
               "loss/proximal": prox}
    return total, (metrics, fs)

  # --------------------------------------------------------------------------- host hooks

  def loss_proxies(self, proxies):
    """The proxies as the sample-to-proxy loss sees them (``ccp.proxy_normalization``)."""
    mode = self.config.ccp.proxy_normalization
    if mode == "l2":
      return losses.l2_normalize(proxies)
    if mode == "bounded":
      return losses.bounded_normalize(proxies)
    return proxies

  def embed_pool(self, ctx: HostContext, model_params, batch_stats, pool_index):
    """Pool ``pool_index``: ``b = pool_size`` distinct samples per class (``b`` passes of the
    one-per-class sampler, deterministic in ``(seed, pool_index)``; ``mask`` False for repeats in
    classes smaller than ``b``), embedded in inference mode; ``([C, b, D], [C, b])`` numpy, rows
    in class order."""
    if self._pool_sampler is None:
      from dmljax.data.samplers import OnePerClassSampler  # pylint: disable=g-import-not-at-top
      self._pool_sampler = OnePerClassSampler(ctx.train_labels, self.config.seed + 1)
    idx, mask = self._pool_sampler.pool(pool_index, self.pool_size)
    emb = ctx.embed(model_params, batch_stats, np.asarray(idx).reshape(-1))
    return emb.reshape(idx.shape + (emb.shape[-1],)), np.asarray(mask, bool)

  def _new_proxies(self, ctx: HostContext, model_params, batch_stats, pool_index, seeds):
    """Embeds pool ``pool_index`` and picks P proxies per class by seeded greedy k-center."""
    points, mask = self.embed_pool(ctx, model_params, batch_stats, pool_index)
    c, p, d = self.num_classes, self.per_class, self.embedding_dim
    if seeds is None:
      seeds = jnp.zeros((c, p, d), jnp.float32)
      seed_mask = jnp.zeros((c, p), bool)
    else:
      seeds = jnp.reshape(seeds, (c, p, d))
      seed_mask = jnp.ones((c, p), bool)
    res = _greedy_kcenter(points, mask, seeds, seed_mask, p)
    return jnp.reshape(res.centers, (c * p, d)), points, mask

  def on_start(self, state, ctx: HostContext):
    proxies, _, _ = self._new_proxies(ctx, state.params["model"], state.batch_stats, 0, None)
    params = dict(state.params, proxies=ctx.replicate(proxies))
    best = dict(state.best, params=copy_tree(params))
    if self.config.ccp.start_from == "projection_best":
      # The best solution of the running projection (its starting point until an evaluation).
      fs = dict(state.framework, proj_best={"params": copy_tree(params),
                                            "batch_stats": copy_tree(state.batch_stats)})
      state = state.replace(framework=fs)
    # Re-init the optimizer state of the proxies (they were zeros when it was created).
    opt_state = ctx.tx.init(params)
    state = state.replace(params=params, best=best, opt_state=opt_state)
    if ctx.plot is not None:
      ctx.plot(state, "projection_000_start", {})
    return state

  def after_eval(self, state, ctx: HostContext, metrics):
    cc = self.config.ccp
    metric = float(metrics["map_at_r"])
    fs = dict(state.framework)
    host = to_host({"step": state.step, **fs})
    step = int(host["step"])
    proj_best = float(host["proj_best_metric"])
    since = int(host["proj_evals_since_best"])
    improved = metric > proj_best
    if improved:
      proj_best, since = metric, 0
    else:
      since += 1
    if improved and cc.start_from == "projection_best":
      fs["proj_best"] = {"params": copy_tree(state.params),
                         "batch_stats": copy_tree(state.batch_stats)}
    steps_in_proj = step - int(host["proj_start_step"])
    capped = cc.max_projection_steps > 0 and steps_in_proj >= cc.max_projection_steps
    end = bool(cc.alternate) and (since >= cc.patience or capped)
    fs["proj_best_metric"] = jnp.asarray(proj_best, jnp.float32)
    fs["proj_evals_since_best"] = jnp.asarray(since, jnp.int32)
    # Logged at every evaluation so that CCP and the never-re-initialised ablation can be
    # compared: collapsing proxies (the paper's Fig. 2a) drive the spread towards 0.
    events = {"ccp/proxy_spread": self.proxy_spread(state.params["proxies"])}
    if not end:
      return state.replace(framework=ctx.replicate(fs)), events

    projection = int(host["projection"])
    start = self._start_point(state, fs)
    params = copy_tree(start["params"])
    batch_stats = copy_tree(start["batch_stats"])
    converged = params["proxies"]  # the proxies of the solution the next projection starts from
    new_proxies, points, mask = self._new_proxies(
        ctx, params["model"], batch_stats, projection + 1, converged)
    events.update(self._radius_events(points, mask, converged, new_proxies))
    params = dict(params, proxies=ctx.replicate(new_proxies))
    opt_state = state.opt_state
    if cc.reset_proxy_opt_state:
      from dmljax.numerics import reset_group_state  # pylint: disable=g-import-not-at-top
      opt_state = reset_group_state(opt_state, ctx.tx.init(params), "proxies")
    fs.update(projection=jnp.asarray(projection + 1, jnp.int32),
              proj_best_metric=jnp.asarray(-jnp.inf, jnp.float32),
              proj_evals_since_best=jnp.asarray(0, jnp.int32),
              proj_start_step=jnp.asarray(step, jnp.int32))
    if cc.start_from == "projection_best":
      fs["proj_best"] = {"params": copy_tree(params), "batch_stats": copy_tree(batch_stats)}
    old_state = state
    state = state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state,
                          anchor=copy_tree(params["model"]), framework=ctx.replicate(fs))
    events.update({"ccp/projection": projection + 1, "ccp/projection_steps": steps_in_proj})
    if ctx.plot is not None:
      plab = to_host(fs["proxy_labels"])
      ctx.plot(old_state.replace(params=dict(start["params"]),
                                 batch_stats=start["batch_stats"]),
               f"projection_{projection:03d}",
               {"next proxies (k-center)": (np.asarray(new_proxies), plab)})
    return state, events

  def progress(self, state) -> str:
    return f"projection {int(to_host(state.framework['projection']))}"

  def plot_points(self, state) -> dict:
    return {"converged proxies": (to_host(state.params["proxies"]),
                                  to_host(state.framework["proxy_labels"]))}

  def _start_point(self, state, fs):
    """``{"params", "batch_stats"}`` of the solution the next projection starts from."""
    mode = self.config.ccp.start_from
    if mode == "converged":
      return {"params": state.params, "batch_stats": state.batch_stats}
    if mode == "run_best":
      return state.best
    return fs["proj_best"]

  def proxy_spread(self, proxies) -> float:
    """Mean Euclidean distance between two proxies of the same class (0 when P = 1).

    Computed on device from the per-class Gram matrices (``[C, P, P]``, never ``[C, P, P, D]``).
    """
    if self.per_class < 2:
      return 0.0
    return float(_proxy_spread(proxies, self.num_classes, self.per_class))

  def _radius_events(self, points, mask, old, new):
    """Covering radius of the pool by the converged and by the new proxies (CCP's quantity)."""
    from dmljax.kernels.kcenter import covering_radius  # pylint: disable=g-import-not-at-top
    c, p, d = self.num_classes, self.per_class, self.embedding_dim
    cmask = jnp.ones((c, p), bool)
    r_old = covering_radius(points, mask, jnp.reshape(old, (c, p, d)), cmask)
    r_new = covering_radius(points, mask, jnp.reshape(new, (c, p, d)), cmask)
    return {"ccp/pool_radius_converged_proxies": float(np.mean(np.asarray(r_old))),
            "ccp/pool_radius_new_proxies": float(np.mean(np.asarray(r_new)))}


@jax.jit
def _spread_sum(x):
  gram = jnp.einsum("cpd,cqd->cpq", x, x, precision=jax.lax.Precision.HIGHEST)
  sq = jnp.diagonal(gram, axis1=1, axis2=2)
  d2 = jnp.maximum(sq[:, :, None] + sq[:, None, :] - 2.0 * gram, 0.0)
  off = ~jnp.eye(x.shape[1], dtype=bool)
  return jnp.sum(jnp.where(off, jnp.sqrt(jnp.where(off, d2, 1.0)), 0.0))


def _proxy_spread(proxies, num_classes: int, per_class: int):
  x = jnp.reshape(jnp.asarray(proxies, jnp.float32), (num_classes, per_class, -1))
  return _spread_sum(x) / (num_classes * per_class * (per_class - 1))
