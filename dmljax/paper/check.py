"""``python -m dmljax.paper check``: every row's config builds and validates, without data or
weights.

For each row (and its ``small`` smoke variant): the framework is built and validated for the
number of training classes the row's protocol gives; the loss (and CCP's in-batch loss, the
miner) is traced once with ``jax.eval_shape`` on a tiny batch with the row's hyperparameters
(nothing is compiled); the sampler is built on labels shaped like the data set's; the
optimizer is built; the model definition is built (and, with ``deep=True``, its parameters are
shaped with ``jax.eval_shape`` at the row's input size, once per distinct model); the input
transforms and the data set's name and splits are checked; and the protocol's mode is applied.
"""
from __future__ import annotations

import inspect
from typing import Optional, Sequence

import numpy as np

from dmljax import paper as paper_lib

#: Training classes of each benchmark's train split (CUB 1-100, Cars 1-98, SOP, In-shop items).
TRAIN_CLASSES = {"cub": 100, "cars": 98, "sop": 11318, "inshop": 3997}
#: Images per class of the fake labels (SOP / In-shop: small classes, as the real ones).
_PER_CLASS = {"cub": 59, "cars": 82, "sop": 2, "inshop": 3}


def num_train_classes(row: paper_lib.Row) -> int:
  n = TRAIN_CLASSES[row.dataset]
  return n - n // 4 if row.protocol == "4fold" else n


def _kwargs(block) -> dict:
  return {} if block is None else dict(block.to_dict() if hasattr(block, "to_dict") else block)


_TRACED: set = set()
#: Embedding size of the traced batches (the checks do not depend on it).
_DIM = 8


def _trace_loss(name: str, kwargs: dict, dim: int = _DIM, proxies_per_class: int = 0,
                extra: Optional[dict] = None) -> None:
  """Traces loss ``name`` with ``kwargs`` on a tiny batch (``jax.eval_shape``; no compile), once
  per distinct set of arguments."""
  key = (name, repr(sorted(kwargs.items())), dim, proxies_per_class, tuple(sorted(extra or {})))
  if key in _TRACED:
    return
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dmljax import losses  # pylint: disable=g-import-not-at-top
  fn = losses.get_loss(name)
  params = inspect.signature(fn).parameters
  unknown = sorted(set(kwargs) - set(params))
  if unknown:
    raise ValueError(f"loss {name!r} takes no {unknown}; its settings: "
                     f"{[p for p in params if p not in ('embeddings', 'labels')]}")
  x = jax.ShapeDtypeStruct((8, dim), jnp.float32)
  y = jnp.asarray([0, 0, 1, 1, 2, 2, 3, 3], jnp.int32)
  call = dict(kwargs, **(extra or {}))
  if "rng" in params:
    call["rng"] = jax.random.PRNGKey(0)
  if proxies_per_class:
    refs = jnp.ones((4 * proxies_per_class, dim), jnp.float32)
    ref_labels = jnp.repeat(jnp.arange(4, dtype=jnp.int32), proxies_per_class)
    jax.eval_shape(lambda e: fn(e, y, ref_embeddings=refs, ref_labels=ref_labels, **call), x)
  else:
    jax.eval_shape(lambda e: fn(e, y, **call), x)
  _TRACED.add(key)


_MINED: dict = {}


def _mined_masks(fw, config) -> dict:
  """The configured miner's masks for a tiny batch (traced once per miner and loss)."""
  sc = config.standard
  key = (sc.miner, repr(sorted(_kwargs(sc.miner_kwargs).items())), config.loss.name,
         repr(sorted(_kwargs(config.loss.kwargs).items())))
  if key not in _MINED:
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    labels = jnp.asarray([0, 0, 1, 1, 2, 2, 3, 3], jnp.int32)
    mined = jax.eval_shape(lambda e: fw._mined(e, labels),  # pylint: disable=protected-access
                           jax.ShapeDtypeStruct((8, _DIM), jnp.float32))
    _MINED[key] = {k: np.ones(v.shape, bool) for k, v in mined.items()}
  return _MINED[key]


_MODEL_CACHE: dict = {}


def _check_model(config, deep: bool) -> None:
  from dmljax import configs  # pylint: disable=g-import-not-at-top
  from dmljax import models  # pylint: disable=g-import-not-at-top
  mc = config.model
  model = models.get_model(mc)
  if mc.pretrained:
    import os  # pylint: disable=g-import-not-at-top
    want = configs.BACKBONE_WEIGHTS.get(mc.name)
    if os.path.basename(mc.pretrained) != want:
      raise ValueError(f"model.pretrained {mc.pretrained!r} is not the {mc.name} weight file "
                       f"{want!r}")
  if not deep:
    return
  key = (repr(sorted(mc.to_dict().items())), int(config.input.size))
  if key in _MODEL_CACHE:
    return
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  size = int(config.input.size)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.uint8)
  shapes = jax.eval_shape(lambda im: model.init(jax.random.PRNGKey(0), im, train=False), x)
  out = jax.eval_shape(lambda v, im: model.apply(v, im, train=False), shapes, x)
  if tuple(out.shape) != (2, int(mc.embedding_dim)):
    raise ValueError(f"the model embeds to {tuple(out.shape)}, expected (2, {mc.embedding_dim})")
  _MODEL_CACHE[key] = True


def check_row(row: paper_lib.Row, variant: str = "", deep: bool = False) -> None:
  """Raises ValueError (naming the row) when the row's config does not build or validate."""
  try:
    _check(row, variant, deep)
  except Exception as e:  # pylint: disable=broad-except
    from dmljax import cli  # pylint: disable=g-import-not-at-top
    suffix = f":{variant}" if variant else ""
    raise ValueError(f"{row.id}{suffix}: {type(e).__name__}: {cli.message(e)}") from e


def _check(row, variant, deep):
  from dmljax import frameworks, losses, optim, protocol, train  # pylint: disable=g-import-not-at-top
  from dmljax.data import real  # pylint: disable=g-import-not-at-top
  if row.protocol not in paper_lib.PROTOCOLS:
    raise ValueError(f"protocol {row.protocol!r} not in {paper_lib.PROTOCOLS}")
  if row.data_copy not in paper_lib.DATA_COPIES or row.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"bad data_copy {row.data_copy!r} or dtype {row.dtype!r}")
  config, sources = paper_lib.build(row, variant)
  missing = [k for k in sources if _missing(config, k)]
  if missing:
    raise ValueError(f"sources name settings the config lacks: {missing}")
  if config.model.dtype != row.dtype:
    raise ValueError(f"model.dtype {config.model.dtype!r} differs from the row's {row.dtype!r}")
  if config.dataset.name != row.dataset or row.dataset not in real.REAL_DATASETS:
    raise ValueError(f"dataset {config.dataset.name!r} is not the row's {row.dataset!r}")
  if row.protocol == "conventional":
    config = protocol.conventional_config(config)
  else:
    config = protocol.fold_config(config, 0)
  classes = num_train_classes(row) if not variant else 6
  dim = int(config.model.embedding_dim)
  fw = frameworks.get_framework(config, num_classes=classes, embedding_dim=dim)
  # Losses, traced with the row's settings.
  if config.framework == "dro":
    pass  # DROFramework.validate traces its weighting already
  elif config.framework == "standard":
    per = (int(config.standard.proxies_per_class)
           if config.loss.name in losses.PROXY_LOSSES or config.standard.use_proxies else 0)
    kw = _kwargs(config.loss.kwargs)
    if per and "centers_per_class" in inspect.signature(
        losses.get_loss(config.loss.name)).parameters:
      kw["centers_per_class"] = per
    extra = _mined_masks(fw, config)
    _trace_loss(config.loss.name, kw, _DIM, per, extra)
  elif config.framework == "ccp":
    _trace_loss(config.loss.name, _kwargs(config.loss.kwargs),
                proxies_per_class=int(config.ccp.proxies_per_class))
    if config.ccp.in_batch_loss:  # "": the configured loss itself (traced above)
      _trace_loss(config.ccp.in_batch_loss, _kwargs(config.ccp.in_batch_kwargs))
  else:  # xbm, profs: the loss against references
    if config.loss.name in losses.LOSSES and config.loss.name not in losses.PROXY_LOSSES:
      _trace_loss(config.loss.name, _kwargs(config.loss.kwargs))
  # Sampler on labels shaped like the data set's training classes.
  per = _PER_CLASS[row.dataset] if not variant else 4
  labels = np.repeat(np.arange(classes, dtype=np.int32), per)
  train.make_sampler(config, fw, labels)
  if (config.sampler.name == "m_per_class"
      and config.batch_size // max(int(config.sampler.m), 1) > classes):
    raise ValueError(f"a batch of {config.batch_size} at m = {config.sampler.m} needs more "
                     f"than the {classes} training classes")
  optim.make_optimizer(config.optim, config.total_steps,
                       steps_per_epoch=max(1, len(labels) // config.batch_size))
  _check_model(config, deep)
  train.input_transforms(config, records=True)
  if config.eval_every_steps < 1 or config.total_steps < config.eval_every_steps:
    raise ValueError(f"eval_every_steps {config.eval_every_steps} vs total_steps "
                     f"{config.total_steps}")


def _missing(config, key: str) -> bool:
  node = config
  for part in key.split("."):
    try:
      node = node[part]
    except (KeyError, AttributeError, TypeError):
      return True
  return False


def check(rows: Sequence[paper_lib.Row], variants=("", "small"), deep: bool = False,
          on_row=None) -> list[str]:
  """Checks ``rows``; returns the error messages (empty when all pass)."""
  errors = []
  for row in rows:
    for variant in variants:
      try:
        check_row(row, variant, deep)
      except ValueError as e:
        errors.append(str(e))
    if on_row is not None:
      on_row(row)
  return errors
