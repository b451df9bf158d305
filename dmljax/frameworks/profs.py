"""``profs``: alternating projections onto feasible sets (Can, Gürbüz, Alatan; Algorithm 1).

Training is a sequence of *holds* (approximate projections) of ``M`` steps each. Hold ``k``
(steps ``k M .. (k + 1) M - 1``) has one representative sample per class, and every step of it
minimises, inside the jitted step::

    loss(batch built around the representatives) + lam / 2 * ||theta_model - theta^(k)||^2

**Hold length.** ``M = config.profs.hold_steps`` or, when that is 0 (the default), the paper's
``M = ceil(rho / p(y)) = ceil(rho * I * L / B)`` (:func:`dmljax.data.samplers.profs_hold_steps`;
``rho = 6``, ``I = config.sampler.m`` samples per class in a batch, ``L`` training classes, ``B``
the batch size): each representative is used about ``rho`` times per hold.

**Batches** come from :class:`dmljax.data.samplers.ClassRepresentativeSampler` (returned by
:meth:`PROFSFramework.make_sampler`): the representatives of hold ``k`` are pass ``k`` of a
one-per-class scheme; a step's batch is ``K = B / I`` classes (rows), each row the class's
representative followed by ``I - 1`` other samples of the class. :meth:`PROFSFramework.sample`
returns, beside the indices, the per-sample extra ``{"is_rep": [B] bool}`` (True at the
representative of each row, positions ``r * I``) so that the loss knows which embeddings are
representatives.

**The anchor** ``theta^(k)`` is ``state.anchor`` (model parameters only: backbone and head, never
the margin loss's ``beta``). Algorithm 1 sets ``theta^(0)`` to the initial weights and, after the
``M`` updates of hold ``k``, ``theta^(k+1) <- theta``: the anchor of a hold is the parameters the
hold *starts* from, i.e. the parameters before the update of its first step (``step % M == 0``).
:meth:`PROFSFramework.after_update` moves it exactly there: at the first step of a hold it
becomes ``before.params["model"]``. The framework state ``anchor_hold`` records which hold the
anchor belongs to, and the move is triggered by ``step // M != anchor_hold`` rather than by
``step % M == 0``: the trainer discards a non-finite step whole (``after_update``'s changes
included), and then the next step -- whose starting parameters are still the hold's, since the
skipped step changed nothing -- moves the anchor instead. At the step that moves it, the loss
uses ``lam = 0`` (the correct anchor equals the current parameters there, so the term and its
gradient are exactly 0), which spares a copy of the anchor inside the loss.

**Loss adaptations** (section 5.3), chosen from ``config.loss.name`` when
``config.profs.adaptation = "auto"``:

* ``contrastive``, ``contrastive_xbm``, ``margin`` -> ``"hard_negatives"``: the representatives
  are the only anchors; each positive pair ``(representative, classmate)`` gets one hardest
  negative of its own (the ``r``-th positive the ``r``-th closest other-class sample,
  :func:`dmljax.losses.miners.hardest_negative_per_positive` with ``distinct=True``), so each
  representative has as many negative pairs as positive pairs. The pairs reach the loss as
  ``pair_mask=``.
* ``triplet_margin`` -> ``"hard_negatives"`` as triplets: ``triplet_mask=`` holds the triplets
  (representative, positive, its hardest negative).
* ``lifted_structure``, ``generalized_lifted_structure`` -> ``"representative_pairs"``: every
  pairwise term between two non-representatives is dropped (positive and negative pairs alike),
  ``pair_mask = is_rep[:, None] | is_rep[None, :]``.
* ``npairs``, ``angular`` and every other pair loss -> ``"none"``: the loss as it is on the PROFS
  batch (the paper: their formulation is already consistent; eq. 4.7 is the batch construction).
  With ``I = 2`` the N-pair anchor of a class is its representative (first in its row).
* ``"profs"`` (not a library loss) -> ``"objective"``: eq. (4.6) itself,
  :func:`dmljax.losses.objectives.profs_objective`, margin terms between every sample and every
  representative of the batch (``pos_margin = eps+``, ``neg_margin = eps-`` in
  ``config.loss.kwargs``).

With ``margin`` the boundary ``beta`` is learnable (Wu et al.; PROFS eq. 3.3's trainable
``epsilon``): ``params["beta"]``, one per class (``config.profs.beta_per_class``, Wu et al.'s
class-specific ``beta``) or a scalar, initialised to ``config.loss.kwargs.beta`` (1.2 by
default). Its learning rate is ``config.optim.lr_multipliers["beta"]`` times the base one; it gets
no weight decay (the optimiser decays model kernels only) and is not in the proximal term.

**Hard negative class mining** (``config.profs.hncm``). As the paper suggests, the embedding of
each class's representative is stored as it is embedded in the step: the framework state holds
``rep_emb [L, D]`` and ``rep_filled [L]``, updated inside the jitted step from the batch's
representative rows (the training-mode embeddings of the step, no extra data pass, ``O(K D)``
work). The class choice is then made as follows:

1. on device, at the last step of each hold (``(step + 1) % M == 0``, under ``lax.cond`` so the
   other steps do nothing), after that step's store update: for every class its
   ``n = config.profs.hncm_neighbors`` nearest other classes by the stored representative
   embeddings (squared Euclidean; classes never stored are nobody's neighbour). The table
   ``hncm_neighbors [L, n]`` (``-1`` = none) and the hold it was made for, ``hncm_hold``, are
   framework state (checkpointed: a resumed run reads the same table);
2. on the host, once per hold, the first :meth:`sample` of the hold reads that small int table
   (the only device-to-host read PROFS adds; the step itself never waits for the host) and
   publishes it on the loader's :class:`~dmljax.data.pipeline.HoldBoard`
   (:meth:`PROFSFramework.hold_batch_indices`): the loader's workers compute every batch of the
   hold from it, so all but the first batch of a hold are decoded ahead like any other;
3. on the host, per step (plain numpy, deterministic in ``(seed, step)`` and the table): ``K``
   distinct seed classes are drawn uniformly; walking through them, each seed not yet in the
   batch brings itself and then its nearest classes not yet in the batch, until ``K`` classes
   are chosen (so the batch is groups of a seed and its ``n`` hardest negative classes). The
   classes go to the sampler as ``classes=``; the representatives and the other samples of each
   row are the sampler's as without mining.

Hold 0 has no table yet and draws its classes uniformly, as without HNCM. The stored
embeddings of the representatives of hold ``k`` choose the classes of hold ``k + 1`` (whose
representatives are new samples of the same classes): the paper's approximate global mining.
If the last step of a hold is skipped for a non-finite loss, the previous table stays in use.

Everything PROFS remembers is in the train state or a deterministic function of the config,
the data and the step, so a run resumed from any checkpoint (also mid-hold) is exact.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dmljax import losses
from dmljax.frameworks.base import Framework
from dmljax.frameworks.standard import loss_kwargs
from dmljax.numerics import to_host

ADAPTATIONS = ("auto", "none", "representative_pairs", "hard_negatives", "objective")

#: Loss names -> adaptation when ``config.profs.adaptation == "auto"`` (others: "none").
AUTO_ADAPTATION = {
    "contrastive": "hard_negatives",
    "contrastive_xbm": "hard_negatives",
    "triplet_margin": "hard_negatives",
    "margin": "hard_negatives",
    "lifted_structure": "representative_pairs",
    "generalized_lifted_structure": "representative_pairs",
    "profs": "objective",
}

#: ``config.loss.name`` of eq. (4.6) (not a library loss: it needs the representatives).
OBJECTIVE_LOSS = "profs"

_TAG_HNCM = 101  # stream tag of the host-side HNCM seed classes (distinct from the samplers')
_NEIGHBOR_BLOCK = 1024  # rows of the class-distance matrix per block for many classes


def _miner_distance(name: str, kwargs: dict) -> str:
  """How the hardest negatives are ranked: the loss's own distance."""
  if name == "contrastive_xbm":
    return "dot"
  dist = kwargs.get("distance", "euclidean")
  if name == "triplet_margin" and kwargs.get("squared", False):
    dist = "squared_euclidean"
  return {"euclidean": "euclidean", "squared_euclidean": "squared", "dot": "dot"}.get(dist, dist)


def nearest_classes(rep_emb, rep_filled, n: int):
  """``[L, n]`` int32: for every class the ``n`` nearest other classes (squared Euclidean between
  stored representative embeddings), nearest first; ``-1`` where there is no such class (classes
  never stored are nobody's neighbour and have none). Block-wise over rows for many classes, so
  memory is ``O(block x L)``, never ``L x L`` beyond 2,048 classes."""
  emb = jnp.asarray(rep_emb, jnp.float32)
  filled = jnp.asarray(rep_filled, bool)
  num = emb.shape[0]
  n = int(min(n, max(num - 1, 1)))
  cols = jnp.arange(num)

  def block(rows_emb, rows_idx):
    d = losses.core.squared_distance(rows_emb, emb)
    bad = (~filled)[None, :] | (rows_idx[:, None] == cols[None, :])
    neg_d, idx = jax.lax.top_k(jnp.where(bad, -jnp.inf, -d), n)
    ok = jnp.isfinite(neg_d) & filled[jnp.clip(rows_idx, 0, num - 1)][:, None]
    return jnp.where(ok, idx, -1).astype(jnp.int32)

  if num <= 2 * _NEIGHBOR_BLOCK:
    return block(emb, cols)
  nb = -(-num // _NEIGHBOR_BLOCK)
  pad = nb * _NEIGHBOR_BLOCK - num
  rows = jnp.pad(emb, ((0, pad), (0, 0))).reshape(nb, _NEIGHBOR_BLOCK, -1)
  idx = jnp.pad(cols, (0, pad), constant_values=num).reshape(nb, _NEIGHBOR_BLOCK)
  out = jax.lax.map(lambda a: block(*a), (rows, idx))
  return out.reshape(nb * _NEIGHBOR_BLOCK, n)[:num]


def hncm_classes(seed: int, step: int, neighbors: np.ndarray, k: int) -> np.ndarray:
  """The ``[k]`` distinct classes of the batch of ``step`` under hard negative class mining.

  ``k`` distinct seed classes are drawn uniformly (``np.random.default_rng([seed, tag, step])``);
  walking through them, a seed not yet chosen is added, then its nearest classes
  (``neighbors[seed]``, nearest first, ``-1`` = none) that are not chosen yet, until ``k``
  classes are chosen. ``k`` distinct seeds always suffice (each is chosen or was already).
  """
  neighbors = np.asarray(neighbors)
  num = len(neighbors)
  rng = np.random.default_rng([int(seed), _TAG_HNCM, int(step)])
  seeds = rng.choice(num, size=k, replace=False)
  taken = np.zeros(num, bool)
  chosen = []
  for s in seeds:
    if taken[s]:
      continue
    for c in (s, *neighbors[s]):
      if c < 0 or taken[c]:
        continue
      taken[c] = True
      chosen.append(int(c))
      if len(chosen) == k:
        return np.asarray(chosen, np.int64)
  return np.asarray(chosen, np.int64)


class HNCMBatch:
  """Picklable ``(step, table) -> indices``: the batch of ``step`` under HNCM with neighbour table
  ``table`` (None: hold 0, or no table yet: the sampler's uniform classes), exactly what
  :meth:`PROFSFramework.sample` draws."""

  def __init__(self, sampler, seed, classes_per_batch, process_index, process_count):
    self.sampler, self.seed, self.k = sampler, seed, classes_per_batch
    self.process_index, self.process_count = process_index, process_count

  def __call__(self, step, table):
    classes = None if table is None else hncm_classes(self.seed, step, table, self.k)
    return self.sampler.batch(step, process_index=self.process_index,
                              process_count=self.process_count, classes=classes)


class PROFSFramework(Framework):
  """PROFS with any pair loss of the library (adapted as in section 5.3) or eq. (4.6)."""

  name = "profs"
  config_key = "profs"

  @staticmethod
  def default_config():
    c = ml_collections.ConfigDict()
    c.rho = 6.0                # M = ceil(rho * I * L / B): uses of a representative per hold
    c.hold_steps = 0           # M itself; 0 = from rho
    c.lam = 1e-3               # proximal weight lambda (the paper's 1e-3)
    c.hncm = False             # hard negative class mining over stored representative embeddings
    c.hncm_neighbors = 3       # HNCM: nearest classes each seed class brings into the batch
    # "auto" picks the paper's adaptation from config.loss.name; or one of "none",
    # "representative_pairs", "hard_negatives", "objective" (loss name "profs" only).
    c.adaptation = "auto"
    c.distinct_negatives = True  # hard_negatives: r-th positive -> r-th hardest negative
    c.beta_per_class = True      # margin loss: one learnable beta per class (Wu et al.)
    return c

  def __init__(self, config, *, num_classes, embedding_dim):
    super().__init__(config, num_classes=num_classes, embedding_dim=embedding_dim)
    pc = config.profs
    self.loss_name = config.loss.name
    self.kwargs = loss_kwargs(config)
    self.m = int(config.sampler.m)
    self.batch_size = int(config.batch_size)
    self.classes_per_batch = self.batch_size // self.m if self.m > 0 else 0
    adaptation = pc.adaptation
    if adaptation == "auto":
      adaptation = AUTO_ADAPTATION.get(self.loss_name, "none")
    self.adaptation = adaptation
    self.lam = float(pc.lam)
    self.hncm = bool(pc.hncm)
    self.hncm_neighbors = int(pc.hncm_neighbors)
    self.learn_beta = self.loss_name == "margin"
    self.beta_init = float(self.kwargs.pop("beta", 1.2)) if self.learn_beta else None
    self.loss_fn = None if self.loss_name == OBJECTIVE_LOSS else losses.PAIR_LOSSES.get(
        self.loss_name)
    self.miner_distance = _miner_distance(self.loss_name, self.kwargs)
    hold = int(pc.hold_steps)
    if hold <= 0 and self.m > 0 and self.batch_size > 0:
      from dmljax.data.samplers import profs_hold_steps  # pylint: disable=g-import-not-at-top
      hold = profs_hold_steps(self.num_classes, self.batch_size, self.m, float(pc.rho))
    self.hold_steps = max(int(hold), 1)
    self._table = (None, None)  # host cache: (hold index, [L, n] neighbour table or None)
    self.hold_board = None  # the loader's HoldBoard (hold_batch_indices), fed the tables

  def validate(self):
    pc = self.config.profs
    name = self.loss_name
    if name != OBJECTIVE_LOSS and name not in losses.PAIR_LOSSES:
      raise ValueError(f"profs needs a pair loss (or {OBJECTIVE_LOSS!r}, eq. 4.6), got "
                       f"config.loss.name={name!r}; valid: "
                       f"{sorted(losses.PAIR_LOSSES) + [OBJECTIVE_LOSS]}.")
    if pc.adaptation not in ADAPTATIONS:
      raise ValueError(f"Unknown profs.adaptation {pc.adaptation!r}; valid: {list(ADAPTATIONS)} "
                       "(set --config.profs.adaptation).")
    if (self.adaptation == "objective") != (name == OBJECTIVE_LOSS):
      raise ValueError(f"profs.adaptation='objective' goes with config.loss.name="
                       f"{OBJECTIVE_LOSS!r} and only with it (got adaptation="
                       f"{pc.adaptation!r}, loss {name!r}).")
    if not float(pc.rho) > 0:
      raise ValueError(f"profs.rho must be > 0, got {pc.rho}.")
    if int(pc.hold_steps) != pc.hold_steps or pc.hold_steps < 0:
      raise ValueError(f"profs.hold_steps must be an integer >= 0 (0 = from rho), got "
                       f"{pc.hold_steps}.")
    if not self.lam >= 0:
      raise ValueError(f"profs.lam must be >= 0, got {pc.lam}.")
    if self.m < 2:
      raise ValueError(f"profs needs config.sampler.m >= 2 samples per class (the representative "
                       f"and at least one positive for it), got {self.m}.")
    if self.batch_size % self.m:
      raise ValueError(f"config.batch_size={self.batch_size} is not divisible by "
                       f"config.sampler.m={self.m}.")
    k = self.classes_per_batch
    if not 2 <= k <= self.num_classes:
      raise ValueError(f"profs batches hold batch_size / sampler.m = {k} classes, which must be "
                       f"in [2, {self.num_classes}] (the training classes).")
    if self.hncm and not 1 <= self.hncm_neighbors <= k - 1:
      raise ValueError(f"profs.hncm_neighbors must be in [1, {k - 1}] (classes per batch - 1), "
                       f"got {self.hncm_neighbors}.")
    if self.learn_beta and np.ndim(self.beta_init) != 0:
      raise ValueError("config.loss.kwargs.beta is the initial value of PROFS's learnable beta "
                       "and must be a number.")

  # --------------------------------------------------------------------------- sampler

  def make_sampler(self, labels):
    from dmljax.data import samplers  # pylint: disable=g-import-not-at-top
    labels = np.asarray(labels)
    if not np.array_equal(np.unique(labels), np.arange(self.num_classes)):
      raise ValueError(f"profs needs the training labels to be 0..{self.num_classes - 1} with "
                       "every class present (one representative per class).")
    return samplers.ClassRepresentativeSampler(labels, self.batch_size, self.m,
                                               hold_steps=self.hold_steps, seed=self.config.seed)

  def hold_of(self, step: int) -> int:
    return int(step) // self.hold_steps

  def _neighbor_table(self, state, hold: int):
    """The HNCM table in use for ``hold`` (read from the state once per hold), or None."""
    if self._table[0] != hold:
      fs = to_host({"n": state.framework["hncm_neighbors"], "h": state.framework["hncm_hold"]})
      self._table = (hold, fs["n"] if int(fs["h"]) > 0 else None)
    if self.hold_board is not None:  # idempotent: the first value of a hold stays
      self.hold_board.publish(hold, self._table[1])
    return self._table[1]

  # The anchor moves inside the step (after_update, at the first step of each hold).
  step_moves_anchor = True

  @property
  def sample_uses_state(self) -> bool:
    """With HNCM a batch's classes come from the neighbour table in the train state: the input
    pipeline decodes a hold's batches ahead once the loop has published that hold's table
    (:meth:`hold_batch_indices`), not from the step alone."""
    return bool(self.hncm)

  def hold_batch_indices(self, sampler, process_index: int, process_count: int, board):
    """With HNCM: a picklable ``step -> indices`` for the loader's workers
    (:class:`~dmljax.data.pipeline.HoldIndices`): the batch :meth:`sample` draws at ``step``,
    computed from the neighbour table that :meth:`sample` publishes on ``board`` at the hold's
    first step. None without HNCM (batches depend on the step alone)."""
    if not self.hncm:
      return None
    from dmljax.data import pipeline  # pylint: disable=g-import-not-at-top
    self.hold_board = board
    fn = HNCMBatch(sampler, int(self.config.seed), self.classes_per_batch, int(process_index),
                   int(process_count))
    return pipeline.HoldIndices(fn, board, self.hold_steps)

  def batch_classes(self, state, step: int):
    """The ``[K]`` classes of the batch of ``step`` under HNCM, or None (uniform, the sampler's)."""
    if not self.hncm:
      return None
    table = self._neighbor_table(state, self.hold_of(step))
    if table is None:
      return None
    return hncm_classes(self.config.seed, step, table, self.classes_per_batch)

  def sample(self, sampler, state, step, process_index=0, process_count=1):
    classes = self.batch_classes(state, step)
    idx = sampler.batch(step, process_index=process_index, process_count=process_count,
                        classes=classes)
    per = self.batch_size // process_count
    is_rep = sampler.representative_mask()[process_index * per:(process_index + 1) * per]
    return idx, {"is_rep": np.asarray(is_rep, bool)}

  # --------------------------------------------------------------------------- state

  def init(self, rng, model_params, batch_stats):
    del rng, model_params, batch_stats
    extra = {}
    if self.learn_beta:
      shape = (self.num_classes,) if self.config.profs.beta_per_class else ()
      extra["beta"] = jnp.full(shape, self.beta_init, jnp.float32)
    fstate = {"anchor_hold": jnp.asarray(-1, jnp.int32)}  # step 0 sets the anchor
    if self.hncm:
      n = min(self.hncm_neighbors, max(self.num_classes - 1, 1))
      fstate.update(
          rep_emb=jnp.zeros((self.num_classes, self.embedding_dim), jnp.float32),
          rep_filled=jnp.zeros((self.num_classes,), bool),
          hncm_neighbors=jnp.full((self.num_classes, n), -1, jnp.int32),
          hncm_hold=jnp.asarray(0, jnp.int32))  # 0: no table yet (tables are for holds >= 1)
    return extra, fstate

  # --------------------------------------------------------------------------- in-step loss

  def _data_loss(self, params, emb, labels, is_rep):
    kw = dict(self.kwargs)
    if self.adaptation == "objective":
      value, _ = losses.objectives.profs_objective(emb, labels, emb, labels, rep_mask=is_rep,
                                                   **kw)
      return value
    if self.learn_beta:
      kw["beta"] = params["beta"]
    if self.adaptation == "representative_pairs":
      kw["pair_mask"] = is_rep[:, None] | is_rep[None, :]
    elif self.adaptation == "hard_negatives":
      rows = jnp.broadcast_to(is_rep[:, None], (emb.shape[0], emb.shape[0]))
      choice = losses.miners.hardest_negative_per_positive(
          emb, labels, pair_mask=rows, distance=self.miner_distance,
          distinct=bool(self.config.profs.distinct_negatives))
      if self.loss_name == "triplet_margin":
        kw["triplet_mask"] = choice.triplet_mask()
      else:
        kw["pair_mask"] = choice.pair_mask()
    return self.loss_fn(emb, labels, **kw)

  def loss(self, params, embeddings, labels, state, rng, extras=None):
    del rng
    if not extras or "is_rep" not in extras:
      raise ValueError("profs's loss needs extras['is_rep'] from PROFSFramework.sample.")
    fs = dict(state.framework)
    is_rep = jnp.asarray(extras["is_rep"], bool)
    emb = embeddings
    value = self._data_loss(params, emb, labels, is_rep)
    # The anchor of this hold is set in after_update of its first step; at that step the term
    # (with the right anchor: the current parameters) is exactly 0.
    new_hold = state.step // self.hold_steps != fs["anchor_hold"]
    lam = jnp.where(new_hold, 0.0, self.lam)
    prox = losses.objectives.proximal(params["model"], state.anchor, lam)
    metrics = {"loss/main": value, "loss/proximal": prox,
               "profs/hold": state.step // self.hold_steps}
    if self.hncm:
      store = jax.lax.stop_gradient(jnp.asarray(emb, jnp.float32))
      slot = jnp.where(is_rep, labels, self.num_classes)  # out of range: dropped
      fs["rep_emb"] = fs["rep_emb"].at[slot].set(store, mode="drop")
      fs["rep_filled"] = fs["rep_filled"].at[slot].set(True, mode="drop")
      metrics["profs/stored_fraction"] = jnp.mean(fs["rep_filled"].astype(jnp.float32))
    if self.learn_beta:
      metrics["profs/beta_mean"] = jnp.mean(params["beta"])
    return value + prox, (metrics, fs)

  def after_update(self, before, after):
    m = self.hold_steps
    step = before.step
    hold = (step // m).astype(jnp.int32)
    new_hold = hold != before.framework["anchor_hold"]
    # Algorithm 1: theta^(k) is the parameters hold k starts from (before its first update).
    anchor = jax.tree.map(lambda a, p: jnp.where(new_hold, p, a), after.anchor,
                          before.params["model"])
    fs = dict(after.framework)
    fs["anchor_hold"] = jnp.where(new_hold, hold, before.framework["anchor_hold"])
    if self.hncm:
      last = (step + 1) % m == 0
      n = fs["hncm_neighbors"].shape[1]
      table = jax.lax.cond(last, lambda e, f: nearest_classes(e, f, n),
                           lambda e, f: fs["hncm_neighbors"], fs["rep_emb"], fs["rep_filled"])
      fs["hncm_neighbors"] = table
      fs["hncm_hold"] = jnp.where(last, hold + 1, fs["hncm_hold"])
    return after.replace(anchor=anchor, framework=fs)

  # --------------------------------------------------------------------------- host hooks

  def progress(self, state) -> str:
    step = int(to_host(state.step))
    return f"hold {self.hold_of(step)} (M={self.hold_steps})"

  def plot_points(self, state) -> dict:
    if not self.hncm:
      return {}
    fs = to_host({"e": state.framework["rep_emb"], "f": state.framework["rep_filled"]})
    cls = np.flatnonzero(fs["f"])
    return {"stored representatives": (fs["e"][cls], cls)}

