r"""The 4-fold class-disjoint protocol of Musgrave et al. (CCP's Tables II, V, VI), and the
conventional split (every other table of the papers: ``--mode=conventional``).

  python -m dmljax.protocol --config=configs/glyphs_ccp.py --workdir=/tmp/dmljax/glyphs_4fold
  python -m dmljax.protocol --config=configs/digits_ccp.py:small --workdir=/tmp/p \
      --config.total_steps=100 --folds=0,1      # some folds now, the others later
  python -m dmljax.protocol --mode=conventional --config=configs/cub_ccp.py --workdir=/tmp/c

**Conventional mode** (``--mode=conventional``, :func:`run_conventional`): one model trained on
the whole train split (for the benchmark data sets all training classes, ``val_fraction`` 0;
for glyphs / digits the train split) with the *test* split as the monitored split: the trainer's
validation (early stopping, best weights) reads the test split, and the test split is reported.
This is the papers' "conventional" evaluation: CCP Tables III / IV (section V-C: "the test split
to monitor the training as well as evaluation"), PROFS Table 1 (the best epoch on the test
split), MPA Tables 4-8 (a fixed 60 / 100 epochs: the rows evaluate once, at the end) and DRO
Tables 1-4 (the paper does not say how it picks its model: its rows choose a patience rule on the
test split). The cut-offs (R@k, nDCG@k) and NMI / F1 are the config's (``recall_ks``, ``ndcg_ks``,
``clustering``). ``--workdir`` is then a plain run directory (``final_metrics.json``, whose
``test/`` and ``val/`` metrics are both the test split's, ``config.json``, checkpoints) plus
``conventional.json`` (``{"protocol": "conventional", "dataset", "finished", "config"}``);
``python -m dmljax.report`` reads it as a run. Resuming works as for ``dmljax.main``.

**Classes.** The protocol's class pool is the union of the classes of the configured data set's
splits (all images of all splits, under their original class ids): for ``digits`` the ten
digits, for ``glyphs`` its 132 classes (whatever ``dataset.seed`` and the split fractions are).
Sorted by id, the first half (``floor(C / 2)`` classes: digits 0-4, glyphs 0-65) is train+val,
the rest test (digits 5-9, glyphs 66-131). Fold ``p`` of the train+val classes trains on
``n - n // 4`` of them starting at sorted index ``floor(p * n / 4)`` and wrapping around, and
validates on the ``n // 4`` that follow (:func:`dmljax.data.splits.protocol_folds`; for
``n = 100``: fold 0 trains on 0-74 and validates on 75-99, fold 1 trains on 25-99 and validates
on 0-24).

**How a fold reaches the trainer.** Fold ``k`` runs :func:`dmljax.train.train_and_evaluate` with
the given config plus ``dataset.options.protocol_fold = k``; :func:`dmljax.data.load_dataset`
honours that option by re-splitting the loaded data set (so ``create_input`` needs no change).
The trainer early-stops on the fold's validation MAP@R and evaluates its best parameters on the
test half, which is the same for every fold. Its ``on_final_embeddings`` hook hands the test
embeddings of those parameters to this module, which saves them.

**Results.** On the test half: the mean ± sample standard deviation (``ddof=1``) of the four fold
models ("separate", 128-D in the paper), and the four models' L2-normalised test embeddings
concatenated and normalised again, evaluated as one model ("concatenated", 512-D), with the
metrics of the config (``recall_ks``, ``ndcg_ks``, ..., ``clustering``).

**Layout of ``--workdir``**::

    DIR/protocol_results.json    written once all folds are finished (keys below)
    DIR/fold_k/                  a train_and_evaluate workdir (checkpoints/, metrics.jsonl,
                                 config.json, final_metrics.json, tensorboard/)
    DIR/fold_k/fold.json         {"fold", "num_folds", "dataset", "train_class_ids",
                                 "val_class_ids", "test_class_ids", "config", "finished"}
    DIR/fold_k/test_embeddings.npz   "embeddings" [N, D] float32 (the best parameters' raw
                                 embeddings) and "labels" [N] int32 (original class ids)

``protocol_results.json``: ``protocol`` ("musgrave_4fold"), ``dataset``, ``num_folds``,
``class_pool`` (``{"trainval": ids, "test": ids}``), ``embedding_dim``, ``concatenated_dim``,
``folds`` (one ``{"fold", "dir", "train_class_ids", "val_class_ids", "step", "best_step",
"val": {metric: v}, "test": {metric: v}}`` each), ``separate`` (``{"mean": {metric: v},
"std": {metric: v}, "num_models": 4}``) and ``concatenated`` (``{metric: v}``). Metric names are
the trainer's (``map_at_r``, ``r_precision``, ``precision_at_1``, ``recall_at_k``, ...), values
fractions in [0, 1]. ``python -m dmljax.report DIR`` prints them as the papers' tables.

**Resuming.** Running the same command again skips finished folds (``fold.json`` says
``"finished": true`` and ``test_embeddings.npz`` exists), resumes a fold interrupted mid-run
from its checkpoint, and starts the others. A fold trained with another config (other than the
keys :data:`dmljax.rundir.RESUME_SAFE_KEYS`) is refused with the changed keys, unless
``--allow_config_change``, which continues it (from its last checkpoint) with the new values.
After a SIGTERM the running fold saves a checkpoint and the command stops. Errors are one line
on stderr and exit status 2 (``--verbose`` or ``DMLJAX_VERBOSE=1`` for the traceback).
"""
from __future__ import annotations

import copy
import json
import os
import sys
from typing import Any, Optional, Sequence

import numpy as np

from dmljax import cli
from dmljax.data import splits as splits_lib

PROG = "python -m dmljax.protocol"
PROTOCOL = "musgrave_4fold"
NUM_FOLDS = splits_lib.PROTOCOL_NUM_FOLDS
RESULTS_FILE = "protocol_results.json"
FOLD_FILE = "fold.json"
EMBEDDINGS_FILE = "test_embeddings.npz"

MODES = ("4fold", "conventional")
CONVENTIONAL_FILE = "conventional.json"

__all__ = ["fold_dir", "fold_config", "class_folds", "concatenate_embeddings", "load_embeddings",
           "run_protocol", "report_only", "summarize", "main", "conventional_config",
           "run_conventional"]


# ============================================================================= folds


def fold_dir(workdir: str, fold: int) -> str:
  return os.path.join(workdir, f"fold_{fold}")


def fold_config(config, fold: int):
  """A copy of ``config`` whose data set is fold ``fold`` (``dataset.options.protocol_fold``) of
  the 4-fold protocol (a config's own ``dataset.options.num_folds``, e.g. the 3-fold cut of a
  paper config's ``:ablation`` variant, is set back to 4)."""
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    cfg.dataset.options.protocol_fold = int(fold)
    if "num_folds" in cfg.dataset.options:
      cfg.dataset.options.num_folds = NUM_FOLDS
  return cfg


def class_folds(config, num_folds: int = NUM_FOLDS) -> dict[str, Any]:
  """The protocol's classes for ``config.dataset``: ``{"pool", "trainval", "test", "folds"}``
  (original class ids; ``folds[k]`` is ``{"train": ids, "val": ids}``).

  Read from the data set as the trainer loads it (fold 0 through :func:`fold_config`, with
  ``dataset.data_dir`` and every option the trainer passes), so the classes recorded are the
  classes trained: for the prepared benchmark data sets the folds of the prepared train split's
  classes, for the embedded ones the folds of the first half of all classes.
  """
  from dmljax import config_check  # pylint: disable=g-import-not-at-top
  from dmljax.data import load_dataset  # pylint: disable=g-import-not-at-top
  dc = fold_config(config, 0).dataset
  options = dict(dc.options)  # as dmljax.inputs passes them
  if config_check.prepared_dataset(dc.name):  # a benchmark or a prepared data set of one's own
    options.setdefault("data_dir", dc.get("data_dir", "") or None)
  ds = load_dataset(dc.name, seed=dc.seed, cache_dir=dc.cache_dir or None, **options)
  info = dict(ds.info).get("protocol")
  if not info:
    raise ValueError(f"data set {config.dataset.name!r} does not support the protocol's folds "
                     "(dataset.options.protocol_fold)")
  trainval = sorted(int(c) for c in list(info["train_classes"]) + list(info["val_classes"]))
  test = sorted(int(c) for c in info["test_classes"])
  return {"pool": sorted(set(trainval) | set(test)), "trainval": trainval, "test": test,
          "folds": splits_lib.protocol_folds(
              trainval, num_folds, str(config.dataset.options.get("fold_cuts", "even")))}


# ============================================================================= results


def concatenate_embeddings(embeddings: Sequence[np.ndarray], eps: float = 1e-12) -> np.ndarray:
  """Each model's ``[N, D_k]`` embeddings L2-normalised, concatenated, normalised again."""
  parts = []
  for e in embeddings:
    e = np.asarray(e, np.float32)
    parts.append(e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), eps))
  cat = np.concatenate(parts, axis=1)
  return cat / np.maximum(np.linalg.norm(cat, axis=1, keepdims=True), eps)


def _metrics(config, embeddings, labels, num_queries: int = 0) -> dict[str, float]:
  """The trainer's metrics of one set of embeddings (the ones its final table reports); with
  ``num_queries`` > 0 the first rows are queries searched against the others (In-shop)."""
  from dmljax import evaluation  # pylint: disable=g-import-not-at-top
  if num_queries:
    q = int(num_queries)
    return evaluation.embedding_metrics(config, embeddings[:q], labels[:q], embeddings[q:],
                                        labels[q:])
  return evaluation.embedding_metrics(config, embeddings, labels)


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, data: dict) -> None:
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def load_embeddings(directory: str) -> dict[str, np.ndarray]:
  path = os.path.join(directory, EMBEDDINGS_FILE)
  with np.load(path) as z:
    out = {"embeddings": z["embeddings"], "labels": z["labels"]}
    out["num_queries"] = int(z["num_queries"]) if "num_queries" in z else 0
    return out


def _metric_values(final: dict, prefix: str) -> dict[str, float]:
  return {k[len(prefix):]: v for k, v in final.items()
          if k.startswith(prefix) and "/" not in k[len(prefix):]
          and isinstance(v, (int, float)) and not isinstance(v, bool)}


def summarize(config, workdir: str, num_folds: int = NUM_FOLDS) -> dict[str, Any]:
  """``protocol_results.json``'s content from the finished fold dirs of ``workdir``."""
  folds, embeddings, labels = [], [], None
  for k in range(num_folds):
    d = fold_dir(workdir, k)
    record, final = _read_json(os.path.join(d, FOLD_FILE)), _read_json(
        os.path.join(d, "final_metrics.json"))
    emb = load_embeddings(d)
    if labels is None:
      labels = emb["labels"]
    elif not np.array_equal(labels, emb["labels"]):
      raise ValueError(f"The test labels saved in {d} differ from fold 0's: the folds were not "
                       "evaluated on the same test set (was the data set changed between "
                       "folds?); rerun the changed folds in a new --workdir.")
    embeddings.append(emb["embeddings"])
    folds.append({"fold": k, "dir": os.path.basename(d),
                  "train_class_ids": record["train_class_ids"],
                  "val_class_ids": record["val_class_ids"],
                  "step": final.get("step"), "best_step": final.get("best_step"),
                  "val": _metric_values(final, "val/"), "test": _metric_values(final, "test/")})
  names = sorted(set.intersection(*(set(f["test"]) for f in folds)))
  values = {m: np.array([f["test"][m] for f in folds], np.float64) for m in names}
  separate = {"mean": {m: float(v.mean()) for m, v in values.items()},
              "std": {m: float(v.std(ddof=1)) if len(v) > 1 else 0.0
                      for m, v in values.items()},
              "num_models": len(folds)}
  cat = concatenate_embeddings(embeddings)
  first = _read_json(os.path.join(fold_dir(workdir, 0), FOLD_FILE))
  trainval = sorted(first["train_class_ids"] + first["val_class_ids"])  # fold 0 covers them all
  return {"protocol": PROTOCOL, "dataset": config.dataset.name, "num_folds": num_folds,
          "class_pool": {"trainval": trainval, "test": first["test_class_ids"]},
          "embedding_dim": int(embeddings[0].shape[1]), "concatenated_dim": int(cat.shape[1]),
          "folds": folds, "separate": separate,
          "concatenated": _metrics(fold_config(config, 0), cat, labels,
                                   load_embeddings(fold_dir(workdir, 0))["num_queries"])}


# ============================================================================= running


def _fold_finished(directory: str) -> Optional[dict]:
  """The fold's ``fold.json`` if it says the fold finished and its embeddings exist."""
  path = os.path.join(directory, FOLD_FILE)
  if not os.path.exists(path):
    return None
  record = _read_json(path)
  if record.get("finished") and os.path.exists(os.path.join(directory, EMBEDDINGS_FILE)):
    return record
  return None


def _save_test_embeddings(directory: str):
  """The trainer's ``on_final_embeddings`` hook: writes the test embeddings (process 0)."""
  import jax  # pylint: disable=g-import-not-at-top

  def hook(name, embeddings, split):
    if name != "test" or jax.process_index():
      return
    from dmljax.data import splits as splits_lib  # pylint: disable=g-import-not-at-top
    parts = ((split.query, split.gallery) if isinstance(split, splits_lib.QueryGallery)
             else (split,))
    labels = np.concatenate([np.asarray(p.class_ids)[np.asarray(p.labels)]
                             for p in parts]).astype(np.int32)
    num_queries = len(split.query) if len(parts) == 2 else 0  # In-shop: queries, then gallery
    path = os.path.join(directory, EMBEDDINGS_FILE)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:  # a file object: np.savez adds no suffix
      np.savez(f, embeddings=np.asarray(embeddings, np.float32), labels=labels,
               num_queries=np.int64(num_queries))
    os.replace(tmp, path)

  return hook


def _say(text: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    print(text, flush=True)


def run_protocol(config, workdir: str, *, folds: Optional[Sequence[int]] = None,
                 allow_config_change: bool = False) -> dict[str, Any]:
  """Runs (or resumes) the folds ``folds`` (default all) in sequence; see the module docstring.

  Returns:
    The content of ``protocol_results.json`` once every fold is finished (it is written then);
    ``{"preempted": True, "fold": k, "step": s}`` after a SIGTERM during fold ``k``; otherwise
    ``{"finished_folds": [...], "num_folds": 4}``.

  Raises:
    dmljax.cli.ConfigChanged: a fold was trained with another config (see
      ``allow_config_change``).
    ValueError: a bad fold number, or a data set with fewer than 8 classes.
    dmljax.lock.WorkdirLocked: another protocol command runs on ``workdir``.
  """
  folds = list(range(NUM_FOLDS)) if folds is None else [int(k) for k in folds]
  bad = [k for k in folds if not 0 <= k < NUM_FOLDS]
  if bad or not folds:
    raise ValueError(f"Bad --folds {folds}; give fold numbers in 0..{NUM_FOLDS - 1}, "
                     "e.g. --folds=0,1.")
  from dmljax import config_check, lock as lock_lib  # pylint: disable=g-import-not-at-top
  config_check.check_values(config)
  os.makedirs(workdir, exist_ok=True)
  # The protocol's directory is one run: a second protocol command on it is refused (each fold's
  # trainer also locks its own fold_k/).
  lock = lock_lib.acquire_for_run(workdir)
  try:
    return _run_folds(config, workdir, folds, allow_config_change)
  finally:
    if lock is not None:
      lock.release()


def _run_folds(config, workdir, folds, allow_config_change):
  from dmljax import rundir, train  # pylint: disable=g-import-not-at-top
  classes = class_folds(config)  # ValueError for a data set with too few classes
  for k in sorted(set(folds)):
    d = fold_dir(workdir, k)
    cfg = fold_config(config, k)
    cfg_now = rundir.config_dict(cfg)
    done = _fold_finished(d)
    if done is not None:
      changed = rundir.config_changes(done.get("config", {}), cfg_now)
      if not changed:
        _say(f"fold {k}: finished, skipped ({d})")
        continue
      if not allow_config_change:
        listing = "; ".join(f"{key}: {a!r} -> {b!r}" for key, (a, b) in changed.items())
        raise cli.ConfigChanged(
            f"fold {k} in {d} was trained with another config: {listing}. Run with the old "
            "values, use a new --workdir, or pass --allow_config_change to continue the "
            "finished folds with the new values.")
    os.makedirs(d, exist_ok=True)
    record = {"fold": k, "num_folds": NUM_FOLDS, "dataset": config.dataset.name,
              "train_class_ids": classes["folds"][k]["train"],
              "val_class_ids": classes["folds"][k]["val"], "test_class_ids": classes["test"],
              "config": cfg_now, "finished": False}
    if not os.path.exists(os.path.join(d, FOLD_FILE)):
      # A fold already there keeps its record until the trainer accepts the new config (a
      # refused change is never written as if it were).
      _write_json(os.path.join(d, FOLD_FILE), record)
    _say(f"fold {k}/{NUM_FOLDS}: {len(record['train_class_ids'])} training and "
         f"{len(record['val_class_ids'])} validation classes, {len(classes['test'])} test "
         f"classes ({d})")
    result = train.train_and_evaluate(cfg, d, allow_config_change=allow_config_change,
                                      on_final_embeddings=_save_test_embeddings(d))
    if result.get("preempted"):
      return {"preempted": True, "fold": k, "step": result.get("step")}
    record["finished"] = True
    _write_json(os.path.join(d, FOLD_FILE), record)

  finished = [k for k in range(NUM_FOLDS) if _fold_finished(fold_dir(workdir, k)) is not None]
  if len(finished) < NUM_FOLDS:
    _say(f"folds finished: {finished}; run the others (--folds) for the protocol's results.")
    return {"finished_folds": finished, "num_folds": NUM_FOLDS}
  results = summarize(config, workdir)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    _write_json(os.path.join(workdir, RESULTS_FILE), results)
    from dmljax import report  # pylint: disable=g-import-not-at-top
    print(report.render([report.load_source(workdir)]), flush=True)
  return results


def report_only(config, workdir: str) -> dict[str, Any]:
  """Gathers the finished folds without training any (the gathering job of an array of folds):
  names each fold that did not finish; writes ``protocol_results.json`` once all four have.

  Raises:
    ValueError: some folds are not finished (the message names them and their folders).
  """
  missing = [k for k in range(NUM_FOLDS) if _fold_finished(fold_dir(workdir, k)) is None]
  if missing:
    names = ", ".join(f"fold {k} ({fold_dir(workdir, k)})" for k in missing)
    raise ValueError(f"{len(missing)} of {NUM_FOLDS} folds did not finish (failed, preempted or "
                     f"still running): {names}; rerun them with --folds="
                     f"{','.join(map(str, missing))}, then gather again.")
  results = summarize(config, workdir)
  _write_json(os.path.join(workdir, RESULTS_FILE), results)
  from dmljax import report  # pylint: disable=g-import-not-at-top
  print(report.render([report.load_source(workdir)]), flush=True)
  return results


# ============================================================================= conventional


def conventional_config(config):
  """A copy of ``config`` for the conventional split: the whole train split trains and the test
  split is the monitored ("val") split. A validation fold the config names
  (``dataset.options.protocol_fold`` / ``num_folds`` / ``fold_cuts``, e.g. the CCP paper
  configs' single-run validation) is dropped: nothing is held out."""
  from dmljax.data import real  # pylint: disable=g-import-not-at-top
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    for key in ("protocol_fold", "num_folds", "fold_cuts"):
      if key in cfg.dataset.options:
        del cfg.dataset.options[key]
    if real.is_prepared_name(cfg.dataset.name):  # the benchmarks and your own images
      cfg.dataset.options.val_fraction = 0.0
    cfg.dataset.val_split = cfg.dataset.test_split
  return cfg


def run_conventional(config, workdir: str, *, allow_config_change: bool = False) -> dict[str, Any]:
  """Trains one model on the whole train split, monitoring and reporting the test split (see
  the module docstring); returns the trainer's final metrics (``{"preempted": True, ...}`` after
  a SIGTERM)."""
  from dmljax import train  # pylint: disable=g-import-not-at-top
  cfg = conventional_config(config)
  os.makedirs(workdir, exist_ok=True)
  record = {"protocol": "conventional", "dataset": cfg.dataset.name,
            "config": train.config_dict(cfg), "finished": False}
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    _write_json(os.path.join(workdir, CONVENTIONAL_FILE), record)
  result = train.train_and_evaluate(cfg, workdir, allow_config_change=allow_config_change)
  if not result.get("preempted") and jax.process_index() == 0:
    record["finished"] = True
    _write_json(os.path.join(workdir, CONVENTIONAL_FILE), record)
  return result


# ============================================================================= command line


def _flag_values(argv: Sequence[str]):
  """Flags of one command line (its own FlagValues: main() can run more than once)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
      "config", None, "Training configuration file (configs/*.py, or a copy anywhere).",
      flag_values=fv, lock_config=True, sys_argv=list(argv))
  flags.DEFINE_string("workdir", None, "Protocol directory (one fold_k/ per fold).",
                      flag_values=fv)
  flags.DEFINE_string("folds", "", "Comma-separated folds to run now (default: all four).",
                      flag_values=fv)
  flags.DEFINE_enum("mode", "4fold", list(MODES),
                    "4fold: the protocol's four fold models; conventional: one model on the whole "
                    "train split, the test split monitored and reported.", flag_values=fv)
  flags.DEFINE_bool("allow_config_change", False,
                    "Continue folds trained with another config, with the new values.",
                    flag_values=fv)
  flags.DEFINE_bool("verbose", False, "Show tracebacks with error messages.", flag_values=fv)
  flags.DEFINE_bool("report_only", False,
                    "Train nothing: gather the finished folds into protocol_results.json, or "
                    "name the folds that did not finish (exit status 2).", flag_values=fv)
  return fv


def _parse_folds(text: str) -> Optional[list[int]]:
  if not text.strip():
    return None
  try:
    return [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise ValueError(f"--folds={text!r}: expected comma-separated fold numbers in "
                     f"0..{NUM_FOLDS - 1}, e.g. --folds=0,1.") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Command-line entry point (``argv[0]`` is the program name); returns the exit status."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  argv = list(sys.argv if argv is None else argv)
  fv = _flag_values(argv)
  if any(a in ("-h", "--help", "--helpshort") for a in argv[1:]):
    print(__doc__.strip() + "\n\nFlags:\n" + fv.get_help(include_special_flags=False))
    return 0
  try:
    from dmljax import config_check  # pylint: disable=g-import-not-at-top
    config_check.precheck(argv)  # the config file and its override keys, one message each
    rest = fv(argv)
    if len(rest) > 1:
      raise ValueError(f"unexpected arguments: {rest[1:]}")
    for name in ("config", "workdir"):
      if fv[name].value is None:
        raise ValueError(f"--{name} is required (e.g. --config=configs/glyphs_ccp.py "
                         "--workdir=/tmp/dmljax/glyphs_4fold).")
    config = fv["config"].value
    folds = _parse_folds(fv["folds"].value)
    mode = fv["mode"].value
    if mode == "conventional" and folds is not None:
      raise ValueError("--folds belongs to the 4-fold protocol; the conventional mode trains "
                       "one model (drop --folds or --mode=conventional).")
  except flags.Error as e:
    return cli.report(PROG, ValueError(f"{e} (see --help)"), argv)
  except AttributeError as e:
    # ml_collections raises AttributeError(KeyError(text)) for an override of a key the config
    # does not have; the text names the key and a likely spelling.
    inner = e.args[0] if e.args and isinstance(e.args[0], BaseException) else e
    text = " ".join(cli.message(inner).split())
    return cli.report(PROG, ValueError(
        f"unknown config key in a --config.* override: {text}; configs are locked, so check "
        "the spelling against the config file."), argv)
  except Exception as e:  # pylint: disable=broad-except
    return cli.report(PROG, e, argv)
  try:
    from absl import logging  # pylint: disable=g-import-not-at-top
    logging.set_verbosity(logging.WARNING)
    # Several processes (an srun step of several tasks, a TPU slice, DMLJAX_* variables): start
    # jax.distributed as dmljax.main does, before anything touches a backend.
    from dmljax import distributed  # pylint: disable=g-import-not-at-top
    if fv["report_only"].value:
      if mode == "conventional":
        raise ValueError("--report_only gathers the 4-fold protocol's folds; the conventional "
                         "mode writes its results itself (drop --report_only).")
      report_only(config, fv["workdir"].value)
      return 0
    distributed.maybe_initialize()
    if mode == "conventional":
      result = run_conventional(config, fv["workdir"].value,
                                allow_config_change=fv["allow_config_change"].value)
    else:
      result = run_protocol(config, fv["workdir"].value, folds=folds,
                            allow_config_change=fv["allow_config_change"].value)
  except Exception as e:  # pylint: disable=broad-except
    return cli.report(PROG, e, argv)
  if result.get("preempted"):
    where = f" in fold {result['fold']}" if "fold" in result else ""
    print(f"Preempted{where} at step {result['step']}: saved; run the same command again to "
          f"resume (exit status {cli.EXIT_PREEMPTED}).", file=sys.stderr)
    return cli.EXIT_PREEMPTED
  return 0


if __name__ == "__main__":
  from absl import flags as _absl_flags  # pylint: disable=g-import-not-at-top
  _absl_flags.FLAGS(sys.argv[:1])  # absl logging: flags count as parsed
  sys.exit(main())
