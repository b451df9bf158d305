"""Finished runs: rerun (nothing to do), extended (more steps, more patience) or refused.

* A finished run (``final_metrics.json`` written, the config unchanged but for
  :data:`dmljax.rundir.RESUME_SAFE_KEYS`) run again prints that it is already finished and where its
  results are, and returns them: nothing loads, compiles or evaluates (:func:`finished_result`).
* With ``--allow_config_change`` a finished run is extended when the new config lets it train
  further: ``total_steps`` above the step it ended at, and (if it stopped by patience)
  ``patience_evals`` above its evaluations without improvement. It continues from its last
  checkpoint, and its ``final_metrics.json`` is replaced by the extended run's
  (:func:`reopen`).
* A change that would not be honoured is refused (:class:`dmljax.errors.ConfigChanged`), never
  written into ``config.json`` as if it were: keys read only when a run starts
  (:data:`START_ONLY_KEYS`: the seed, the architecture, the data set, the framework's shapes),
  and any change to a finished run that would not train another step (:func:`check_changes`).
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

from dmljax import errors
from dmljax import rundir

FINAL_FILE = "final_metrics.json"
CONFIG_FILE = "config.json"

#: Keys read only when a run starts (its initial parameters, its random key, its data split and
#: the shapes of its state): a resumed run cannot honour a change of them.
START_ONLY_KEYS = ("seed", "framework", "model.name", "model.widths", "model.convs_per_block",
                   "model.embedding_dim", "model.pretrained", "model.pooling",
                   "model.embedding_bn", "model.normalization", "dataset.name", "dataset.seed",
                   "dataset.options", "dataset.train_split", "dataset.val_split",
                   "dataset.test_split", "ccp.proxies_per_class", "standard.proxies_per_class",
                   "standard.use_proxies", "xbm.memory_batches")


def _remote(path: str) -> bool:
  return "://" in str(path)


def _join(workdir: str, name: str) -> str:
  return f"{str(workdir).rstrip('/')}/{name}" if _remote(workdir) else os.path.join(workdir, name)


def _read_json(path: str) -> Optional[dict]:
  try:
    if _remote(path):
      from etils import epath  # pylint: disable=g-import-not-at-top
      p = epath.Path(path)
      if not p.exists():
        return None
      text = p.read_text()
    else:
      if not os.path.exists(path):
        return None
      with open(path) as f:
        text = f.read()
    data = json.loads(text)
  except (OSError, json.JSONDecodeError):
    return None
  return data if isinstance(data, dict) else None


def finished_result(config, workdir: str) -> Optional[dict[str, Any]]:
  """The final metrics of ``workdir`` if its run finished with this config (else None)."""
  final = _read_json(_join(workdir, FINAL_FILE))
  saved = _read_json(_join(workdir, CONFIG_FILE))
  if final is None or saved is None:
    return None
  if rundir.config_changes(saved, rundir.config_dict(config)):
    return None
  return final


def announce_finished(workdir: str, final: dict) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index():
    return
  step = final.get("step")
  test = final.get("test/map_at_r")
  score = f", test MAP@R {test:.4f}" if isinstance(test, (int, float)) else ""
  print(f"Already finished: {workdir} (step {step}, best step {final.get('best_step')}{score}); "
        f"results in {_join(workdir, FINAL_FILE)}. Nothing to do; to train longer run again "
        f"with --config.total_steps=N (N > {step}) --allow_config_change.", flush=True)


def _extends(config, host: dict, tracker: dict) -> bool:
  step = int(host.get("step", 0))
  return (step < int(config.total_steps)
          and int(tracker["evals_since_best"]) < int(config.patience_evals))


def check_changes(config, host: dict, tracker: dict, changed: dict, workdir: str) -> None:
  """Raises ConfigChanged for allowed changes that the resumed run would not honour."""
  fixed = sorted(k for k in changed
                 if any(k == p or k.startswith(p + ".") for p in START_ONLY_KEYS))
  if fixed:
    listing = "; ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in fixed)
    raise errors.ConfigChanged(
        f"{workdir} cannot continue with {listing}: these keys are read only when a run starts "
        "(its initial parameters, random key, data split or state shapes), so a resumed run "
        "would not honour them; use a new --workdir for them.")
  if host.get("done") and not _extends(config, host, tracker):
    step = int(host.get("step", 0))
    since, patience = int(tracker["evals_since_best"]), int(config.patience_evals)
    why = (f"total_steps={config.total_steps} is not above it" if step >= config.total_steps
           else f"it stopped early after {since} evaluations without improvement and "
           f"patience_evals={patience} is not above that")
    raise errors.ConfigChanged(
        f"the run in {workdir} finished at step {step} and {why}, so the changed keys "
        f"{sorted(changed)} would change nothing. To train it longer raise "
        f"--config.total_steps above {step}"
        + (f" and --config.patience_evals above {since}" if since >= patience else "")
        + "; otherwise use a new --workdir.")


def reopen(config, host: dict, tracker: dict, workdir: str) -> dict:
  """``host`` with ``done`` cleared if ``config`` extends the finished run (and its old final
  metrics removed, so an interrupted extension is resumed rather than called finished)."""
  if not host.get("done") or not _extends(config, host, tracker):
    return host
  import jax  # pylint: disable=g-import-not-at-top
  path = _join(workdir, FINAL_FILE)
  if jax.process_index() == 0:
    if _remote(path):
      from etils import epath  # pylint: disable=g-import-not-at-top
      if epath.Path(path).exists():
        epath.Path(path).unlink()
    elif os.path.exists(path):
      os.remove(path)
    print(f"Extending the finished run in {workdir}: from step {host['step']} to "
          f"total_steps={config.total_steps} (patience_evals={config.patience_evals}).",
          flush=True)
  return dict(host, done=False)
