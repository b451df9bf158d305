"""``ccp``: chance-constrained proxies (Gürbüz, Can, Alatan; Algorithms 1 and 2), by default as
the authors' code runs it (``yetigurbuz/ccp-dml``; the facts are in ``docs/ccp.md``).

Training is a sequence of *projections*. Projection ``k`` minimises (inside the jitted step)::

    proxy_weight * L(batch -> norm(proxies)) + in_batch_weight * L(batch, batch)
      + lam_k / 2 * ||theta_model - theta_anchor||^2

with ``P`` learnable proxies per class, ``lam_0 = 0`` (no proximal term in the first projection)
and ``lam_k = config.ccp.lam`` afterwards. The proximal term covers the model (backbone + head)
only, never the proxies.

* ``L`` is ``config.loss`` (any pair loss of the library: C1, C2, MS, triplet...) with
  ``config.loss.kwargs``, and by default (``ccp.in_batch_loss = ""``) the in-batch term is that
  same loss with the same settings: the authors' CCP loss subclasses the configured pair loss,
  so MS-CCP's in-batch term is multi-similarity and Triplet-CCP's is triplet. (A miner, where the
  authors' loss has one, acts on the proxy term only; dmljax's CCP has no miner setting.) Naming
  a pair loss in ``ccp.in_batch_loss`` (with ``ccp.in_batch_kwargs``) gives the in-batch term its
  own loss, e.g. ``"contrastive"`` for every variant: dmljax's default before issue 18, wrongly
  credited to the authors then; an ablation now.
* ``norm`` (``ccp.proxy_normalization``): by default ``"model"``, the normalisation the model
  applies to the embeddings (``config.model.normalization``): the authors store proxies raw and
  normalise them inside the loss exactly as the embeddings. ``"none"``, ``"l2"``, ``"bounded"``
  force one.

The loss is :func:`dmljax.losses.objectives.ccp_objective`.

Host side, after every validation evaluation (MAP@R): a projection ends when it has gone
``config.ccp.patience`` evaluations without beating its own best MAP@R by more than
``ccp.min_improvement`` (the authors' callback: 3 evaluations, margin 1e-5; a counter restarted
each projection). ``config.ccp.max_projection_steps`` (0 = off, the default: the paper ends
projections by patience alone) can cap a projection's length. Every evaluation that improves
stores the projection's best solution (model params, proxies, BatchNorm statistics). At a
projection end, by default (``ccp.start_from = "current"``, the authors'):

1. only the proximal *anchor* becomes the best model params of the projection that ended; the
   model, its BatchNorm statistics and the optimizer state carry on from the current weights
   (nothing is rolled back);
2. a pool of ``b = pool_size`` embeddings per class is drawn (``b`` passes of the one-per-class
   sampler) and embedded with the *current* model in inference mode, *before* the model's
   normalisation (``ccp.pool_embeddings = "raw"``: the authors' head does not normalise, so their
   pool holds raw embeddings; ``"normalized"`` takes the model's output instead);
3. greedy k-center (squared L2; :func:`dmljax.kernels.kcenter.greedy_kcenter`, one jitted kernel
   over all classes) picks ``P`` new proxies per class, seeded with the best proxies of the
   projection that ended; every proxy is replaced.

The very first proxies (before step 0) come from pool 0 of the initial model, seeded with zero
vectors, so each class's first pick is its largest-norm embedding (the authors' first seeds are
their zero-initialised "best proxies").

Other values of ``ccp.start_from`` (ablations; each names the solution ``theta^(k)`` that gives
the anchor and the k-center seeds, and where the next projection trains from):

* ``"projection_best"``: roll back model params, BatchNorm statistics and proxies to the ended
  projection's best and start from there (pool embedded with it). dmljax's default before issue
  18, which said the authors' callback does this; it does not (on glyphs each end discarded up to
  150 steps of progress).
* ``"converged"``: Algorithm 1 as written (``theta* <- theta``): the weights the projection ended
  with are both the anchor and the starting point; seeds are the current proxies.
* ``"run_best"``: roll back to the best weights of the whole run (a projection that never beats
  it is discarded).

The optimizer state is kept through projection ends (one Adam through the run, as the authors).
With ``config.ccp.reset_proxy_opt_state`` the proxies' Adam state (moments *and* their own step
count, see :mod:`dmljax.optim`) is reset, so their next steps are those of a freshly started Adam.

**One evaluation late** (``ccp.lagged_metric``, off by default). In the authors' code the CCP
callback is registered before the metric callback, so (by a reading of their code, not run) the
projection-end decision after evaluation ``n`` sees evaluation ``n - 1``'s MAP@R, and the
"best" weights it stores are those current at evaluation ``n``. ``lagged_metric = True``
reproduces that (the first evaluation sees 0, as before any evaluation); the default decides on
the evaluation just made.

With ``config.ccp.alternate = False`` the proxies are never re-initialised and there is a single
projection: the paper's "Loss-Proxy" ablation.

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

START_MODES = ("current", "projection_best", "converged", "run_best")
PROXY_NORMALIZATIONS = ("model", "none", "l2", "bounded")
POOL_EMBEDDINGS = ("raw", "normalized")


def _greedy_kcenter(*args, **kwargs):
  from dmljax.kernels.kcenter import greedy_kcenter  # pylint: disable=g-import-not-at-top
  return greedy_kcenter(*args, **kwargs)


class CCPFramework(Framework):
  """CCP with any pair loss as the sample-to-proxy (and, by default, the in-batch) loss."""

  name = "ccp"
  config_key = "ccp"
  # The projection's best solution changes only at evaluations: it stays out of the jitted step.
  held_state_keys = ("proj_best",)

  @staticmethod
  def default_config():
    c = ml_collections.ConfigDict()
    c.proxies_per_class = 4
    c.pool_size = 8                 # k-center pool: b samples per class (one-per-class passes)
    c.lam = 2e-4
    c.patience = 3                  # a projection ends after 3 evaluations without improving
    c.min_improvement = 1e-5        # ... by more than this (the authors' callback margin)
    c.max_projection_steps = 0      # 0 = off: projections end by patience alone (the paper)
    c.proxy_weight = 1.0
    c.in_batch_weight = 0.1
    # The in-batch term: "" = config.loss itself with config.loss.kwargs (the authors'); a
    # pair-loss name = that loss with in_batch_kwargs (an ablation, e.g. "contrastive").
    c.in_batch_loss = ""
    c.in_batch_kwargs = ml_collections.ConfigDict({"pos_margin": 0.0, "neg_margin": 1.0})
    c.alternate = True              # False: a single proxy problem ("Loss-Proxy" ablation)
    # Where projection k+1 trains from and what gives its anchor and k-center seeds: "current"
    # (the authors': model continues, anchor and seeds = projection k's best), or the ablations
    # "projection_best" (roll back to it), "converged" (Algorithm 1: theta* <- theta), "run_best".
    c.start_from = "current"
    # Zero the proxies' Adam moments (and their own step count) at re-initialisation. Off: the
    # paper and the authors' code keep one optimizer state through the whole run.
    c.reset_proxy_opt_state = False
    # What the loss sees of the stored (raw) proxies: "model" = the embeddings' normalisation
    # (config.model.normalization, the authors'), or "none", "l2", "bounded".
    c.proxy_normalization = "model"
    # The k-center pool: "raw" = embeddings before the model's normalisation (the authors'),
    # "normalized" = the model's output.
    c.pool_embeddings = "raw"
    # True: a projection end decides on the previous evaluation's MAP@R (the authors' callback
    # order, one evaluation late); False: on the evaluation just made.
    c.lagged_metric = False
    return c

  def __init__(self, config, *, num_classes, embedding_dim):
    super().__init__(config, num_classes=num_classes, embedding_dim=embedding_dim)
    cc = config.ccp
    self.pair_loss = losses.get_loss(config.loss.name)
    self.kwargs = loss_kwargs(config)
    if cc.in_batch_loss:
      self.batch_loss = losses.get_loss(cc.in_batch_loss)
      kw = cc.get("in_batch_kwargs", None)
      self.batch_kwargs = {} if kw is None else dict(kw.to_dict() if hasattr(kw, "to_dict")
                                                     else kw)
    else:  # the authors': the configured loss itself, with its own settings
      self.batch_loss, self.batch_kwargs = self.pair_loss, self.kwargs
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
    if cc.in_batch_loss and cc.in_batch_loss not in losses.PAIR_LOSSES:
      raise ValueError(f"ccp.in_batch_loss must be '' (the configured loss) or a pair loss, got "
                       f"{cc.in_batch_loss!r}; valid: {sorted(losses.PAIR_LOSSES)} (set "
                       "--config.ccp.in_batch_loss).")
    if cc.proxy_normalization not in PROXY_NORMALIZATIONS:
      raise ValueError(f"Unknown ccp.proxy_normalization {cc.proxy_normalization!r}; valid: "
                       f"{list(PROXY_NORMALIZATIONS)} (set --config.ccp.proxy_normalization).")
    if cc.pool_embeddings not in POOL_EMBEDDINGS:
      raise ValueError(f"Unknown ccp.pool_embeddings {cc.pool_embeddings!r}; valid: "
                       f"{list(POOL_EMBEDDINGS)} (set --config.ccp.pool_embeddings).")
    if (cc.pool_embeddings == "raw" and cc.proxy_normalization == "none"
        and self.config.model.get("normalization", "none") != "none"):
      raise ValueError("ccp.pool_embeddings='raw' makes raw embeddings the proxies, which "
                       "ccp.proxy_normalization='none' would compare unnormalised with normalised "
                       "embeddings; set --config.ccp.proxy_normalization=model (the authors') or "
                       "--config.ccp.pool_embeddings=normalized.")
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
    if self.lam < 0 or cc.min_improvement < 0:
      raise ValueError(f"ccp.lam and ccp.min_improvement must be >= 0, got {self.lam} and "
                       f"{cc.min_improvement}.")

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
        # The previous evaluation's MAP@R (ccp.lagged_metric); 0 before any evaluation.
        "last_metric": jnp.asarray(0.0, jnp.float32),
    }
    if self._keeps_projection_best():
      # Snapshot of the running projection's best solution (set in on_start / after_eval).
      fstate["proj_best"] = {"params": copy_tree({"model": model_params, **extra}),
                             "batch_stats": copy_tree(batch_stats)}
    return extra, fstate

  def _keeps_projection_best(self) -> bool:
    return self.config.ccp.start_from in ("current", "projection_best")

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
    """The proxies as the loss sees them (``ccp.proxy_normalization``; ``"model"``: the
    embeddings' normalisation, ``config.model.normalization``)."""
    mode = self.config.ccp.proxy_normalization
    if mode == "model":
      mode = self.config.model.get("normalization", "none")
    if mode == "l2":
      return losses.l2_normalize(proxies)
    if mode == "bounded":
      return losses.bounded_normalize(proxies)
    return proxies

  def embed_pool(self, ctx: HostContext, model_params, batch_stats, pool_index):
    """Pool ``pool_index``: ``b = pool_size`` distinct samples per class (``b`` passes of the
    one-per-class sampler, deterministic in ``(seed, pool_index)``; ``mask`` False for repeats in
    classes smaller than ``b``), embedded in inference mode, before the model's normalisation
    with ``ccp.pool_embeddings = "raw"``; ``([C, b, D], [C, b])`` numpy, rows in class order."""
    if self._pool_sampler is None:
      from dmljax.data.samplers import OnePerClassSampler  # pylint: disable=g-import-not-at-top
      self._pool_sampler = OnePerClassSampler(ctx.train_labels, self.config.seed + 1)
    idx, mask = self._pool_sampler.pool(pool_index, self.pool_size)
    flat = np.asarray(idx).reshape(-1)
    if self.config.ccp.pool_embeddings == "raw":
      emb = ctx.embed(model_params, batch_stats, flat, raw=True)
    else:
      emb = ctx.embed(model_params, batch_stats, flat)
    return emb.reshape(idx.shape + (emb.shape[-1],)), np.asarray(mask, bool)

  def _new_proxies(self, ctx: HostContext, model_params, batch_stats, pool_index, seeds):
    """Embeds pool ``pool_index`` and picks P proxies per class by greedy k-center seeded with
    ``seeds`` (``[C * P, D]``, class-major)."""
    points, mask = self.embed_pool(ctx, model_params, batch_stats, pool_index)
    c, p, d = self.num_classes, self.per_class, self.embedding_dim
    seeds = jnp.reshape(jnp.asarray(seeds, jnp.float32), (c, p, d))
    res = _greedy_kcenter(points, mask, seeds, jnp.ones((c, p), bool), p)
    return jnp.reshape(res.centers, (c * p, d)), points, mask

  def on_start(self, state, ctx: HostContext):
    # Zero seeds: each class's first pick is its largest-norm pool embedding (the authors').
    zeros = jnp.zeros((self.num_classes * self.per_class, self.embedding_dim), jnp.float32)
    proxies, _, _ = self._new_proxies(ctx, state.params["model"], state.batch_stats, 0, zeros)
    params = dict(state.params, proxies=ctx.replicate(proxies))
    best = dict(state.best, params=copy_tree(params))
    if self._keeps_projection_best():
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
    fs = dict(state.framework)
    host = to_host({"step": state.step, **{k: v for k, v in fs.items() if k != "proj_best"}})
    step = int(host["step"])
    metric = float(metrics["map_at_r"])
    if cc.lagged_metric:  # the authors' callback order: the previous evaluation's value
      metric, fs["last_metric"] = float(host["last_metric"]), jnp.asarray(metric, jnp.float32)
    else:
      fs["last_metric"] = jnp.asarray(metric, jnp.float32)
    proj_best = float(host["proj_best_metric"])
    since = int(host["proj_evals_since_best"])
    improved = metric > proj_best + float(cc.min_improvement)
    if improved:
      proj_best, since = metric, 0
    else:
      since += 1
    if improved and "proj_best" in fs:
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
    solution, start = self._solution_and_start(state, fs)
    if cc.start_from in ("projection_best", "run_best"):  # a rollback: copy, never alias
      params, batch_stats = copy_tree(start["params"]), copy_tree(start["batch_stats"])
    else:  # the model carries on from its current weights
      params, batch_stats = dict(start["params"]), start["batch_stats"]
    seeds = solution["params"]["proxies"]  # the solution's proxies seed k-center
    new_proxies, points, mask = self._new_proxies(
        ctx, params["model"], batch_stats, projection + 1, seeds)
    events.update(self._radius_events(points, mask, seeds, new_proxies))
    params = dict(params, proxies=ctx.replicate(new_proxies))
    opt_state = state.opt_state
    if cc.reset_proxy_opt_state:
      from dmljax.numerics import reset_group_state  # pylint: disable=g-import-not-at-top
      opt_state = reset_group_state(opt_state, ctx.tx.init(params), "proxies")
    anchor = copy_tree(solution["params"]["model"])
    fs.update(projection=jnp.asarray(projection + 1, jnp.int32),
              proj_best_metric=jnp.asarray(-jnp.inf, jnp.float32),
              proj_evals_since_best=jnp.asarray(0, jnp.int32),
              proj_start_step=jnp.asarray(step, jnp.int32))
    if "proj_best" in fs:
      fs["proj_best"] = {"params": copy_tree(params), "batch_stats": copy_tree(batch_stats)}
    old_state = state
    state = state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state,
                          anchor=anchor, framework=ctx.replicate(fs))
    events.update({"ccp/projection": projection + 1, "ccp/projection_steps": steps_in_proj})
    if ctx.plot is not None:
      plab = to_host(fs["proxy_labels"])
      # The model the pool was embedded with, the seeds (squares) and the new proxies.
      ctx.plot(old_state.replace(params=dict(params, proxies=seeds), batch_stats=batch_stats),
               f"projection_{projection:03d}",
               {"next proxies (k-center)": (np.asarray(self.loss_proxies(new_proxies)), plab)})
    return state, events

  def progress(self, state) -> str:
    return f"projection {int(to_host(state.framework['projection']))}"

  def plot_points(self, state) -> dict:
    # As the loss sees them (normalised as the embeddings drawn under them).
    return {"converged proxies": (to_host(self.loss_proxies(state.params["proxies"])),
                                  to_host(state.framework["proxy_labels"]))}

  def _solution_and_start(self, state, fs):
    """``(solution, start)``, each ``{"params", "batch_stats"}``: the solution ``theta^(k)`` of
    the projection that ended (the next anchor and k-center seeds) and the weights the next
    projection trains from (``ccp.start_from``)."""
    mode = self.config.ccp.start_from
    current = {"params": state.params, "batch_stats": state.batch_stats}
    if mode == "current":
      return fs["proj_best"], current
    if mode == "projection_best":
      return fs["proj_best"], fs["proj_best"]
    if mode == "converged":
      return current, current
    return state.best, state.best

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
