"""``xbm``: cross-batch memory (Wang, Zhang, Huang, Scott 2020), as CCP's XBM baselines use it.

A ring buffer of the most recent training embeddings gives every anchor of the batch many more
references than the batch holds. The loss of a step is::

    loss(batch, batch) + memory_weight * loss(batch, memory)      (memory term after the warm-up)

with ``loss = config.loss.name`` (any pair loss of :data:`dmljax.losses.PAIR_LOSSES`, with
``config.loss.kwargs``): CCP's C2-XBM is ``contrastive`` with margins, C1-XBM is
``contrastive_xbm`` on L2-normalised embeddings. The memory entries are constants
(``stop_gradient``): gradients reach the model only through the batch.

State (``state.framework``, static shapes, checkpointed with the rest of the run):

* ``memory`` ``[S, D]`` float32 and ``memory_labels`` ``[S]`` int32, with
  ``S = xbm.memory_batches * config.batch_size`` (the CCP supplement counts XBM memory sizes in
  batches: S = 3 / 25 batches on CUB and Cars, 100 / 400 on In-shop, 400 / 1400 on SOP);
* ``memory_count`` int32: how many slots hold data. The buffer fills from slot 0 upwards, so the
  filled slots are exactly ``0 .. memory_count - 1`` (saturates at ``S``);
* ``memory_ptr`` int32: the slot the next batch is written to. ``S`` is a whole number of
  batches and every write is one whole batch, so the pointer is always a multiple of the batch
  size and a write never straddles the end of the buffer: a batch goes to slots
  ``ptr .. ptr + B - 1`` and the pointer moves to ``(ptr + B) mod S`` (the oldest batch is
  overwritten once the buffer is full).

Order of a step (inside the single jitted train step):

1. **Enqueue first**, as XBM does (its description: the current mini-batch is enqueued and the
   oldest dequeued, then the anchors are compared with the memory): the global batch's
   embeddings and labels, in global batch order, are written at ``ptr``. The memory after the
   step therefore holds the current batch, and the next steps see it.
2. **Memory term** against the memory after the write, with ``ref_mask`` = the filled slots
   *minus the B slots just written*. A pair loss can only mask whole reference slots, not single
   (anchor, slot) pairs, and the current batch's slots hold each anchor's own copy: a self-pair
   (distance 0 to a constant copy of itself) is never a useful term -- with a Euclidean distance
   its gradient has no direction at all -- so those slots are left out for every loss. The other
   pairs of those slots (anchor ``i`` with the copy of ``j != i``) are the in-batch pairs, already
   in the in-batch term with gradients through both ends. So each anchor meets every one of the
   ``S - 1`` other samples of the memory exactly once: ``B - 1`` live in-batch samples and the
   ``S - B`` most recent earlier embeddings as constants. (XBM's own code also keeps the
   current batch's copies in its memory term and, for its contrastive loss, drops the
   near-duplicate positive; with C1's sum-over-pairs reduction its loss is this one plus a second,
   one-sided copy of the in-batch pairs.) ``memory_batches = 1`` leaves the memory term no
   references: the loss is then the in-batch loss alone.

Warm-up: for the first ``xbm.warmup_steps`` steps (CCP supplement: 1,000 steps of the baseline
loss "to ensure the slow drift assumption") the loss is the in-batch term only (``lax.cond``: the
memory term is not even computed). With ``xbm.fill_during_warmup`` (default) the memory is
written from step 0, so it is full when the memory term starts; ``False`` is XBM's code, where
enqueueing starts together with the memory term.

Devices: the trainer hands the loss the *global* batch and keeps the state replicated, so every
device writes the same embeddings (all-gathered by XLA where the batch is sharded) in the same
order to the same slots: the memory is the same on 1 and on 8 devices, and is restored exactly on
resume. A step the trainer skips (non-finite loss or gradient) leaves the memory unchanged, like
the rest of the state.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from dmljax import losses
from dmljax.frameworks.base import Framework
from dmljax.frameworks.standard import loss_kwargs


class XBMFramework(Framework):
  """A pair loss in-batch plus the same loss against a cross-batch memory of past embeddings."""

  name = "xbm"
  config_key = "xbm"

  @staticmethod
  def default_config():
    c = ml_collections.ConfigDict()
    # Memory size in batches: S = memory_batches x batch_size (CCP's "L" size on CUB / Cars: 25).
    c.memory_batches = 25
    c.warmup_steps = 1000           # in-batch loss only before this step (CCP supplement: 1K)
    c.memory_weight = 1.0           # weight of the memory term (XBM's lambda)
    c.fill_during_warmup = True     # False: enqueue only from warmup_steps on (XBM's code)
    return c

  def __init__(self, config, *, num_classes, embedding_dim):
    super().__init__(config, num_classes=num_classes, embedding_dim=embedding_dim)
    xc = config.xbm
    self.loss_fn = losses.get_loss(config.loss.name)  # ValueError listing the valid names
    self.kwargs = loss_kwargs(config)
    self.batch_size = int(config.batch_size)
    self.memory_batches = int(xc.memory_batches)
    self.memory_size = self.memory_batches * self.batch_size
    self.warmup_steps = int(xc.warmup_steps)
    self.memory_weight = float(xc.memory_weight)
    self.fill_during_warmup = bool(xc.fill_during_warmup)

  def validate(self):
    name = self.config.loss.name
    if name not in losses.PAIR_LOSSES:
      raise ValueError(f"xbm needs a pair loss (config.loss.name), got {name!r}; valid: "
                       f"{sorted(losses.PAIR_LOSSES)} (set --config.loss.name).")
    if self.memory_batches < 1:
      raise ValueError(f"xbm.memory_batches must be >= 1 (memory size = memory_batches x "
                       f"batch_size), got {self.memory_batches}.")
    if self.warmup_steps < 0:
      raise ValueError(f"xbm.warmup_steps must be >= 0, got {self.warmup_steps}.")
    if self.memory_weight < 0:
      raise ValueError(f"xbm.memory_weight must be >= 0, got {self.memory_weight}.")

  def init(self, rng, model_params, batch_stats):
    del rng, model_params, batch_stats
    s, d = self.memory_size, self.embedding_dim
    return {}, {
        "memory": jnp.zeros((s, d), jnp.float32),
        "memory_labels": jnp.full((s,), -1, jnp.int32),
        "memory_count": jnp.asarray(0, jnp.int32),
        "memory_ptr": jnp.asarray(0, jnp.int32),
    }

  # --------------------------------------------------------------------------- in-step

  def enqueue(self, fs, embeddings, labels, write=True):
    """The framework state with the batch written at the pointer (unchanged if not ``write``).

    Returns ``(new_state, ref_mask)``: ``ref_mask`` ``[S]`` marks the filled slots other than
    the ones this batch was written to (the memory term's references).
    """
    b = embeddings.shape[0]
    if b != self.batch_size:
      raise ValueError(f"xbm: the step's global batch has {b} embeddings but config.batch_size "
                       f"is {self.batch_size} (the memory holds whole batches).")
    ptr, count = fs["memory_ptr"], fs["memory_count"]
    emb = jax.lax.stop_gradient(embeddings).astype(jnp.float32)
    memory = jax.lax.dynamic_update_slice(fs["memory"], emb, (ptr, 0))
    mem_labels = jax.lax.dynamic_update_slice(fs["memory_labels"],
                                              labels.astype(jnp.int32), (ptr,))
    new = {
        "memory": jnp.where(write, memory, fs["memory"]),
        "memory_labels": jnp.where(write, mem_labels, fs["memory_labels"]),
        "memory_count": jnp.where(write, jnp.minimum(count + b, self.memory_size), count),
        "memory_ptr": jnp.where(write, (ptr + b) % self.memory_size, ptr),
    }
    slots = jnp.arange(self.memory_size, dtype=jnp.int32)
    written = write & (slots >= ptr) & (slots < ptr + b)
    ref_mask = (slots < new["memory_count"]) & ~written
    return dict(fs, **new), ref_mask

  def loss(self, params, embeddings, labels, state, rng, extras=None):
    del params, rng, extras
    active = state.step >= self.warmup_steps
    write = True if self.fill_during_warmup else active
    fs, ref_mask = self.enqueue(state.framework, embeddings, labels, write)
    batch_loss = self.loss_fn(embeddings, labels, **self.kwargs)

    def memory_term(emb):
      return self.loss_fn(emb, labels, ref_embeddings=fs["memory"],
                          ref_labels=fs["memory_labels"], ref_mask=ref_mask, **self.kwargs)

    memory_loss = jax.lax.cond(active, memory_term,
                               lambda emb: jnp.zeros((), jnp.float32), embeddings)
    total = batch_loss + self.memory_weight * memory_loss
    metrics = {"loss/in_batch": batch_loss, "loss/memory": memory_loss,
               "xbm/memory_refs": jnp.sum(ref_mask.astype(jnp.int32)),
               "xbm/active": active.astype(jnp.int32)}
    return total, (metrics, fs)

  def progress(self, state) -> str:
    from dmljax.numerics import to_host  # pylint: disable=g-import-not-at-top
    count = int(to_host(state.framework["memory_count"]))
    return f"memory {count}/{self.memory_size}"
