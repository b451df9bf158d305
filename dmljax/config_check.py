"""Configs checked before anything compiles: loading a config file, its keys, values and inputs.

``python -m dmljax.main`` and ``python -m dmljax.protocol`` call :func:`load_config` (the config
file and its ``--config.*`` overrides) and :func:`check` (values, loss keyword arguments, weight
file, data set) before a JAX backend starts, so every mistake below is one line and exit status 2
within a second or two, instead of an error after the data loaded and the step compiled:

* the file: missing, a syntax error, an import that fails, no ``get_config``, an unknown variant
  (``NAME.py:VARIANT``), a ``get_config`` that returns something other than a ``ConfigDict``;
* its keys (:func:`check_keys`): every key the file sets must be a key of the defaults
  (:func:`dmljax.configs.base_config`), so ``c.framwork = "ccp"`` is an error naming
  ``framework``. Free-form blocks (:data:`FREE_FORM`) take any key;
* ``--config.KEY=VALUE`` overrides: an unknown key names the closest valid one;
* values (:func:`check_values`): sizes (``embedding_dim``, ``batch_size``, ``eval_batch_size``,
  ``total_steps``, ...) at least 1, the loss keyword arguments against the chosen loss's
  signature (:func:`check_loss_kwargs`), the weight file of ``model.pretrained`` present, a
  prepared data set present in ``dataset.data_dir``.

``--print_config`` prints the checked config (every key) and ``--check`` runs every check; both
exit without a ``--workdir``, without training and without creating anything.
"""
from __future__ import annotations

import difflib
import importlib.util
import inspect
import os
from typing import Any, Iterable, Optional, Sequence

#: Blocks whose keys are free: they are keyword arguments of something chosen by name (a loss,
#: a data set loader, a DRO weighting) or names of parameter groups, checked where they are used
#: (loss kwargs by :func:`check_loss_kwargs`, data set options by the loader, DRO kwargs by the
#: DRO framework, learning-rate multipliers by the optimizer, miner settings by the standard
#: framework).
FREE_FORM = ("dataset.options", "loss.kwargs", "ccp.in_batch_kwargs", "dro.kwargs",
             "optim.lr_multipliers", "standard.miner_kwargs")

#: Keys the defaults do not have that a tool adds to record where a config came from (not set
#: by hand): ``paper_row``, the catalogue row of ``configs/paper.py`` (:mod:`dmljax.paper`).
RECORD_KEYS = ("paper_row",)

#: Integer keys that must be at least 1.
POSITIVE_INTS = ("batch_size", "eval_batch_size", "total_steps", "eval_every_steps",
                 "log_every_steps", "model.embedding_dim", "sampler.m", "max_consecutive_nonfinite",
                 "patience_evals", "input.size", "input.resize", "checkpoint.max_to_keep")

#: Arguments of a loss function that are not hyperparameters (the trainer passes them).
_LOSS_DATA_ARGS = ("embeddings", "labels", "rng", "ref_embeddings", "ref_labels", "ref_mask",
                   "pair_mask", "triplet_mask")


class ConfigError(ValueError):
  """A config that cannot run; the message names the problem and the fix."""


# ============================================================================= keys


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  """``{"a.b": value}`` for a nested dict (or ConfigDict)."""
  if hasattr(d, "to_dict"):
    d = d.to_dict()
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) or hasattr(v, "to_dict"):
      sub = flatten(v, f"{prefix}{k}.")
      out.update(sub if sub else {f"{prefix}{k}": {}})
    else:
      out[f"{prefix}{k}"] = v
  return out


def _defaults():
  from dmljax import configs  # pylint: disable=g-import-not-at-top
  return configs.base_config()


def _free(key: str) -> bool:
  return any(key == f or key.startswith(f + ".") for f in FREE_FORM)


def closest(key: str, valid: Iterable[str]) -> Optional[str]:
  """The valid key most like ``key``: by the whole dotted name, else by its last part."""
  valid = sorted(valid)
  hit = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
  if hit:
    return hit[0]
  last = key.rsplit(".", 1)[-1]
  by_last = {}
  for v in valid:
    by_last.setdefault(v.rsplit(".", 1)[-1], v)
  hit = difflib.get_close_matches(last, sorted(by_last), n=1, cutoff=0.6)
  return by_last[hit[0]] if hit else None


def unknown_key_message(key: str, where: str, valid: Iterable[str]) -> str:
  near = closest(key, valid)
  hint = f"did you mean '{near}'?" if near else "see docs/config.md for the keys"
  return (f"unknown config key '{key}' {where}; {hint} (every key is listed in docs/config.md; "
          f"free-form blocks: {', '.join(FREE_FORM)})")


def check_keys(config, source: str = "in the config file") -> None:
  """Raises :class:`ConfigError` for a key of ``config`` that the defaults do not have."""
  valid = set(flatten(_defaults()))
  for key in sorted(flatten(config)):
    if key in valid or _free(key) or key in RECORD_KEYS:
      continue
    # A key whose parent is a value in the defaults (e.g. ``model.widths.x``) or a new block.
    raise ConfigError(unknown_key_message(key, source, valid))


# ============================================================================= loading


def split_spec(spec: str) -> tuple[str, Optional[str]]:
  """``"path/NAME.py:VARIANT"`` -> ``(path, VARIANT or None)``."""
  path, sep, variant = spec.partition(":")
  return path, (variant if sep else None)


def load_file(spec: str):
  """``get_config(VARIANT)`` of the config file ``spec``, each failure one :class:`ConfigError`."""
  path, variant = split_spec(spec)
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path} not found; give the path of a config file, e.g. "
                      "--config=configs/glyphs_ccp.py (configs/ lists them)")
  name = "dmljax_user_config_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"config file {path} has a syntax error at line {e.lineno}: {e.msg}; fix "
                      "the file") from e
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"config file {path} fails to import ({type(e).__name__}: "
                      f"{' '.join(str(e).split())}); fix the file") from e
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise ConfigError(f"config file {path} defines no get_config(); a config file defines "
                      "get_config(arg='') returning an ml_collections.ConfigDict (copy "
                      "configs/digits_ccp.py)")
  try:
    config = get_config(variant) if variant is not None else get_config()
  except TypeError as e:
    if variant is not None and "argument" in str(e):
      raise ConfigError(f"config file {path} takes no variant, got :{variant}; drop it or "
                        "give get_config an argument") from e
    raise ConfigError(f"get_config() of {path} failed (TypeError: {e}); fix the file") from e
  except Exception as e:  # pylint: disable=broad-except
    text = " ".join(str(e).split())
    raise ConfigError(f"get_config({'' if variant is None else repr(variant)}) of {path}: "
                      f"{text}") from e
  import ml_collections  # pylint: disable=g-import-not-at-top
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"get_config() of {path} returned a {type(config).__name__}, not an "
                      "ml_collections.ConfigDict; start from dmljax.configs.base_config() and "
                      "return it")
  return config


def config_overrides(argv: Sequence[str], flag: str = "config") -> list[tuple[str, str, str]]:
  """``(key, value, argument)`` of each ``--config.KEY=VALUE`` in ``argv``."""
  out = []
  prefix = f"--{flag}."
  for a in argv:
    if a.startswith(prefix):
      key, _, value = a[len(prefix):].partition("=")
      out.append((key, value, a))
  return out


def check_overrides(config, argv: Sequence[str]) -> None:
  """Each ``--config.KEY=`` names a key of ``config`` (ConfigError naming the closest one)."""
  have = flatten(config)
  blocks = {k.rsplit(".", 1)[0] for k in have if "." in k}
  for key, _, arg in config_overrides(argv):
    if key in have or key in blocks:
      continue
    valid = set(have) | set(flatten(_defaults()))
    raise ConfigError(unknown_key_message(key, f"in {arg}", valid).replace(
        "free-form blocks", "new keys can be added to free-form blocks only in the config "
        "file; free-form blocks"))


def precheck(argv: Sequence[str], flag: str = "config"):
  """Loads the config file named in ``argv`` and checks its keys and overrides, before absl
  parses the flags; returns the file's config (without the overrides), or None if no
  ``--config=`` is given (absl then reports it)."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{flag}=")), None)
  if spec is None:
    return None
  config = load_file(spec)
  check_keys(config, f"in {split_spec(spec)[0]}")
  check_overrides(config, argv)
  return config


# ============================================================================= values


def loss_hyperparameters(fn) -> Optional[list[str]]:
  """The keyword hyperparameters of a loss function (None if it takes ``**kwargs``)."""
  params = inspect.signature(fn).parameters
  if any(p.kind == p.VAR_KEYWORD for p in params.values()):
    return None
  return [n for n in params if n not in _LOSS_DATA_ARGS]


def check_loss_kwargs(config) -> None:
  """``loss.kwargs`` (and ``ccp.in_batch_kwargs``) against the chosen losses' signatures."""
  from dmljax import losses  # pylint: disable=g-import-not-at-top
  pairs = [("loss.kwargs", config.loss.name, "loss.name")]
  if config.get("framework") == "ccp" and "ccp" in config and config.ccp.get("in_batch_loss"):
    # "" = the in-batch term is config.loss itself (in_batch_kwargs unused).
    pairs.append(("ccp.in_batch_kwargs", config.ccp.in_batch_loss, "ccp.in_batch_loss"))
  for block, name, name_key in pairs:
    kwargs = flatten(config.get(block.split(".")[0]).get(block.split(".")[1]) or {})
    if name not in losses.LOSSES:
      if name_key == "loss.name" and config.get("framework") == "profs":
        continue  # PROFS's own objective ("profs"), checked by the framework
      raise ConfigError(f"Unknown loss {name!r}; valid losses: {sorted(losses.LOSSES)} (set "
                        f"--config.{name_key})")
    valid = loss_hyperparameters(losses.LOSSES[name])
    if valid is None:
      continue
    extra = [k for k in kwargs if k not in valid and not (k == "beta" and name == "margin")]
    if extra:
      raise ConfigError(f"{block} has {extra} but loss {name!r} takes {valid}; remove them or "
                        f"set them for this loss (--config.{block}.<key>, or in the config "
                        "file when changing loss.name)")


def check_values(config) -> None:
  """Sizes, durations and the run's inputs, before any data loads or anything compiles."""
  flat = flatten(config)
  for key in POSITIVE_INTS:
    if key not in flat:
      continue
    v = flat[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ConfigError(f"config.{key} must be an integer >= 1, got {v!r} (set "
                        f"--config.{key})")
  k = flat.get("steps_per_dispatch", 0)
  if isinstance(k, bool) or not isinstance(k, int) or k < 0:
    raise ConfigError(f"config.steps_per_dispatch must be an integer >= 0 (0 = auto), got {k!r} "
                      "(set --config.steps_per_dispatch)")
  if config.get("framework") == "ccp" and "ccp" in config:
    for key in ("proxies_per_class", "pool_size"):
      v = config.ccp.get(key, 1)
      if v < 1:
        raise ConfigError(f"config.ccp.{key} must be >= 1, got {v} (set --config.ccp.{key})")
  bs, m = int(config.batch_size), int(config.sampler.m)
  if config.sampler.name == "m_per_class" and bs % m:
    raise ConfigError(f"config.batch_size={bs} is not a multiple of config.sampler.m={m}; a "
                      "batch holds batch_size / m classes of m images (set --config.batch_size "
                      "or --config.sampler.m)")
  check_eval_knn(config)
  check_loss_kwargs(config)
  check_inputs(config)


def check_eval_knn(config) -> None:
  """``eval_knn``: known sizing and placement, an approx_recall in [0, 1) (whether the backend
  allows it is checked where the devices are known: the evaluator, before step 1)."""
  ek = config.get("eval_knn", None)
  if ek is None:
    return
  from dmljax.kernels import sizing  # pylint: disable=g-import-not-at-top
  for key, valid in (("sizing", sizing.SIZINGS), ("placement", ("auto", "device", "host"))):
    v = ek.get(key, "auto")
    if v not in valid:
      raise ConfigError(f"config.eval_knn.{key}={v!r} is not one of {', '.join(valid)} (set "
                        f"--config.eval_knn.{key})")
  r = ek.get("approx_recall", 0.0)
  if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r < 1.0:
    raise ConfigError(f"config.eval_knn.approx_recall={r!r} must be in [0, 1): 0 = the exact "
                      "kNN, else lax.approx_max_k's recall target on TPU (set "
                      "--config.eval_knn.approx_recall)")


def check_inputs(config) -> None:
  """The weight file of ``model.pretrained`` and a prepared data set exist (local paths)."""
  weights = str(config.model.get("pretrained", "") or "")
  if "://" in weights:
    raise ConfigError(f"config.model.pretrained={weights}: weight files are read from a local "
                      "path only; copy it to every host first (launch/tpu_pod.sh --weights="
                      f"{weights} does) and give that path")
  if weights and not os.path.isfile(weights):
    from dmljax.configs import BN_INCEPTION_WEIGHTS  # pylint: disable=g-import-not-at-top
    raise ConfigError(f"weight file {weights} (config.model.pretrained) not found; download it "
                      f"(docs/backbones.md: {BN_INCEPTION_WEIGHTS} for bn_inception) into "
                      "$DMLJAX_WEIGHTS or give --config.model.pretrained=PATH (\"\" = random "
                      "initialisation)")
  from dmljax.data import real  # pylint: disable=g-import-not-at-top
  name = config.dataset.name
  if prepared_dataset(name):
    data_dir = str(config.dataset.get("data_dir", "") or
                   config.dataset.options.get("data_dir", "") or real.default_data_dir())
    if "://" not in data_dir:
      from absl import logging  # pylint: disable=g-import-not-at-top
      from dmljax.data import records  # pylint: disable=g-import-not-at-top
      level = logging.get_verbosity()
      logging.set_verbosity(logging.ERROR)  # TFDS warns about the folder it then reports
      try:
        records.open_prepared(name, data_dir)  # DatasetNotPrepared, with the prepare command
      finally:
        logging.set_verbosity(level)
  elif not _known_dataset(name):
    from dmljax.data import DATASETS  # pylint: disable=g-import-not-at-top
    raise ConfigError(f"Unknown data set {name!r}; valid data sets: {sorted(DATASETS)} (set "
                      "--config.dataset.name)")


def prepared_dataset(name: str) -> bool:
  """Whether ``name`` is read from prepared records (``dmljax.data.records.open_prepared``): a
  benchmark of ``dmljax.data.real.REAL_DATASETS``, or a data set of one's own where
  ``dmljax.data.real.is_prepared_name`` exists to recognise it."""
  from dmljax.data import real  # pylint: disable=g-import-not-at-top
  if name in real.REAL_DATASETS:
    return True
  is_prepared_name = getattr(real, "is_prepared_name", None)
  return bool(is_prepared_name is not None and is_prepared_name(name))


def _known_dataset(name: str) -> bool:
  """Whether the trainer can load data set ``name``: an embedded one (``dmljax.data.DATASETS``)
  or a prepared one (:func:`prepared_dataset`)."""
  from dmljax.data import DATASETS  # pylint: disable=g-import-not-at-top
  return name in DATASETS or prepared_dataset(name)


def check(config) -> None:
  """Every check that needs no accelerator: keys, values, loss kwargs, weight file, data set."""
  check_keys(config, "in the config")
  check_values(config)


# ============================================================================= printing


def format_config(config) -> str:
  """Every key of ``config`` and its value, one per line, sorted."""
  flat = flatten(config)
  width = max(len(k) for k in flat)
  return "\n".join(f"{k:<{width}}  {flat[k]!r}" for k in sorted(flat))
