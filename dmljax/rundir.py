"""The run directory: its files, logs and config records, local or in a bucket (``gs://``).

A workdir holds ``checkpoints/`` (:mod:`dmljax.checkpoint`), ``metrics.jsonl`` and
``tensorboard/`` (:class:`Logger`), ``config.json`` (:func:`save_config`), ``plots/``
(:func:`make_plotter`) and ``final_metrics.json``. The config comparison that guards exact
resumption (:data:`RESUME_SAFE_KEYS`, :func:`config_changes`) is here too: it reads the config a
run directory recorded.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

from absl import logging
import jax
import numpy as np

from dmljax import errors
from dmljax import numerics


# ============================================================================= files


#: Remote workdirs: training lines are written out at most this often (see :class:`Logger`).
REMOTE_FLUSH_SECONDS = 60.0


def is_remote(path: str) -> bool:
  """A bucket path (``gs://...``): written through ``etils.epath``, which Orbax uses too."""
  return "://" in str(path)


def epath_of(path: str):
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(path)


def join(*parts: str) -> str:
  return "/".join([parts[0].rstrip("/")] + list(parts[1:])) if is_remote(parts[0]) else \
      os.path.join(*parts)


def makedirs(path: str) -> None:
  if is_remote(path):
    epath_of(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def parts_dir(path: str) -> str:
  """The folder of a remote ``metrics.jsonl``'s part objects (see :class:`Logger`)."""
  return f"{path}.parts"


def _part_paths(path: str) -> list:
  d = epath_of(parts_dir(path))
  return sorted(d.glob("part-*.jsonl")) if d.exists() else []


def read_jsonl(path: str) -> list[dict]:
  """The records of a ``metrics.jsonl`` (and, in a bucket, of the part objects a running or
  killed run left beside it, in order); a partial or garbled line (a run killed mid-write) is
  dropped, never an error."""
  out = []
  if is_remote(path):
    texts = [epath_of(path).read_text()] if exists(path) else []
    texts += [p.read_text() for p in _part_paths(path)]
    text = "".join(t if t.endswith("\n") or not t else t + "\n" for t in texts)
  else:
    text = open(path).read()
  for line in text.splitlines():
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(rec, dict):
      out.append(rec)
  return out


def write_atomic(path: str, text: str) -> None:
  if is_remote(path):  # an object store replaces an object whole: no temporary name needed
    epath_of(path).write_text(text)
    return
  tmp = f"{path}.tmp.{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:  # a full or read-only disk: no temporary file left behind
    if os.path.exists(tmp):
      os.remove(tmp)
    raise OSError(f"cannot write {path} ({e.strerror or e}); is the disk full or read-only?") from e


def exists(path: str) -> bool:
  return epath_of(path).exists() if is_remote(path) else os.path.exists(path)


class Logger:
  """metrics.jsonl + TensorBoard (process 0 only).

  Local workdirs append to ``metrics.jsonl``. In a bucket (``gs://``), where an object cannot be
  appended to, lines are buffered and written as rolling part objects
  ``metrics.jsonl.parts/part-NNNNNN.jsonl``: at most one every :data:`REMOTE_FLUSH_SECONDS`
  during training, and at once for evaluations and the final record; :func:`read_jsonl` reads
  the file and its parts in order. ``close()`` (and a resume) merges them back into one
  ``metrics.jsonl``. A run killed between flushes loses at most that many seconds of training
  lines, which the resumed run writes again. TensorBoard writes to the workdir where
  tensorboardX can (a bucket needs ``google-cloud-storage``), else to a local folder it names.
  """

  def __init__(self, workdir: str, resume_step: int | None):
    self.active = jax.process_index() == 0
    self.path = join(workdir, "metrics.jsonl")
    self.remote = is_remote(workdir)
    self.writer = None
    self.pending: list[str] = []  # remote: lines not yet in a part object
    self.parts = 0
    self.last_flush = time.monotonic()
    if not self.active:
      return
    has_parts = self.remote and bool(_part_paths(self.path))
    if resume_step is not None and (exists(self.path) or has_parts):
      # Drop lines written after the checkpoint we resume from (they will be written again) and
      # any partial line; the rewrite is atomic, so a kill here loses nothing.
      # A `final` record belongs to a finished run that is being extended: it is written again.
      keep = [r for r in read_jsonl(self.path)
              if r.get("step", 0) <= resume_step and r.get("kind") != "final"]
      write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))
      self._remove_parts()
    elif resume_step is None:
      if exists(self.path):
        epath_of(self.path).unlink() if self.remote else os.remove(self.path)
      self._remove_parts()
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    tb = join(workdir, "tensorboard")
    # A resumed run writes the steps after its checkpoint again: TensorBoard drops the points
    # at and after purge_step that an earlier process wrote, so no step appears twice.
    purge = None if resume_step is None else resume_step + 1
    try:
      self.writer = SummaryWriter(tb, purge_step=purge)
    except Exception as e:  # pylint: disable=broad-except
      import hashlib, tempfile  # pylint: disable=g-import-not-at-top,multiple-imports
      local = os.path.join(tempfile.gettempdir(), "dmljax-tensorboard",
                           hashlib.sha256(workdir.encode()).hexdigest()[:12])
      logging.warning("TensorBoard cannot write to %s (%s); writing to %s instead.", tb,
                      errors.message(e), local)
      self.writer = SummaryWriter(local, purge_step=purge)

  def log(self, step: int, values: dict[str, Any], kind: str = "train"):
    if not self.active:
      return
    clean = {}
    for k, v in values.items():
      v = np.asarray(v)
      clean[k] = v.item() if v.ndim == 0 else v.tolist()
    line = json.dumps({"step": int(step), "kind": kind, **clean}) + "\n"
    if self.remote:
      self.pending.append(line)
      if kind != "train" or time.monotonic() - self.last_flush >= REMOTE_FLUSH_SECONDS:
        self.flush()
    else:
      with open(self.path, "a") as f:
        f.write(line)
    for k, v in clean.items():
      if isinstance(v, (int, float)) and not isinstance(v, bool):
        self.writer.add_scalar(f"{kind}/{k}" if "/" not in k else k, v, step)
    self.writer.flush()

  def flush(self):
    """Remote: writes the buffered lines as the next part object."""
    if self.remote and self.active and self.pending:
      self.parts += 1
      epath_of(parts_dir(self.path)).mkdir(parents=True, exist_ok=True)
      write_atomic(join(parts_dir(self.path), f"part-{self.parts:06d}.jsonl"),
                   "".join(self.pending))
      self.pending = []
    self.last_flush = time.monotonic()

  def _remove_parts(self):
    for p in _part_paths(self.path) if self.remote else []:
      p.unlink()

  def close(self):
    if self.remote and self.active:
      self.flush()
      if self.parts:  # one object again: the file and its parts merged, then the parts removed
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in read_jsonl(self.path)))
        self._remove_parts()
        self.parts = 0
    if self.writer is not None:
      self.writer.close()


# ============================================================================= compilation cache


def compilation_cache_dir(setting: str) -> str:
  """Where compiled executables persist between runs: ``setting`` as a path, ``"auto"`` for
  ``$DMLJAX_CACHE_DIR/jax`` (default ``$XDG_CACHE_HOME/dmljax/jax`` or ``~/.cache/dmljax/jax``:
  per user), ``""`` for none."""
  setting = str(setting or "")
  if setting != "auto":
    return os.path.expanduser(setting)
  base = os.environ.get("DMLJAX_CACHE_DIR") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
      "dmljax")
  return os.path.join(base, "jax")


def enable_compilation_cache(config) -> str:
  """Turns on JAX's persistent compilation cache (``config.compilation_cache``), unless one is
  set already (by the user, or ``JAX_COMPILATION_CACHE_DIR``); returns the directory in use.

  A restarted run (a requeued job, the next fold) then loads its train step and evaluation
  executables instead of compiling them again (on a GPU, compiling includes autotuning).
  """
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  path = compilation_cache_dir(config.get("compilation_cache", "auto"))
  if path:
    try:
      if not is_remote(path):
        os.makedirs(path, exist_ok=True)
      jax.config.update("jax_compilation_cache_dir", path)
    except OSError as e:
      logging.warning("No persistent compilation cache (%s); set config.compilation_cache to a "
                      "writable folder, or '' to silence this.", errors.message(e))
      return ""
  return path


# ============================================================================= config records


# Keys whose change cannot alter what a resumed run computes (logging, retention, paths, device
# count: results do not depend on it). Any other change breaks exact resumption.
RESUME_SAFE_KEYS = ("progress", "log_every_steps", "plot_projections", "checkpoint.max_to_keep",
                    "checkpoint.save_best", "checkpoint.every_steps", "dataset.cache_dir",
                    "max_consecutive_nonfinite", "baselines", "num_devices", "eval_batch_size",
                    "input.num_workers", "input.prefetch", "dataset.data_dir",
                    "eval_cache.device_mb", "eval_cache.host_mb", "eval_cache.train",
                    "checkpoint.async_save", "compilation_cache", "eval_knn.sizing",
                    "eval_knn.memory_mb", "eval_knn.placement", "steps_per_dispatch",
                    # checked on its own (inputs.check_image_copy): it may be "auto" in a config
                    # and is absent from runs that predate it, but the copy must not change
                    "dataset.image_copy")
SAMPLER_KEYS = ("seed", "batch_size", "sampler.name", "sampler.m", "sampler.small_classes")


def config_dict(config) -> dict:
  """The config as plain JSON data (tuples as lists): what a checkpoint records."""
  return json.loads(json.dumps(config.to_dict(), default=str))


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


# Keys added after runs were recorded, with the value that is the behaviour from before they
# existed: a run recorded without the key resumes when the key has that value (any other value
# is a change). A key whose default changed behaviour when it was added must not be listed.
ADDED_KEYS_NEUTRAL = {"eval_knn.approx_recall": 0.0}
_ABSENT = "<absent>"


def _comparable(key: str, value: Any) -> Any:
  """The value as compared for resumption: the weights shipped in the dmljax package
  (``.../dmljax/weights/NAME``) by name, wherever the package was installed when the run was
  recorded (another virtual environment, a moved checkout)."""
  if key == "model.pretrained" and isinstance(value, str) and value:
    parts = os.path.normpath(value).replace("\\", "/").split("/")
    if len(parts) >= 3 and parts[-3:-1] == ["dmljax", "weights"]:
      return "dmljax/weights/" + parts[-1]
  return value


def config_changes(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
  """``{key: (saved, current)}`` for every key whose change breaks exact resumption."""
  a, b = _flatten(saved), _flatten(current)
  changes = {}
  for k in sorted(set(a) | set(b)):
    old, new = a.get(k, _ABSENT), b.get(k, _ABSENT)
    if k in RESUME_SAFE_KEYS or _comparable(k, old) == _comparable(k, new):
      continue
    if old == _ABSENT and k in ADDED_KEYS_NEUTRAL and new == ADDED_KEYS_NEUTRAL[k]:
      continue
    changes[k] = (old, new)
  return changes


def config_fingerprint(cfg: dict) -> str:
  import hashlib  # pylint: disable=g-import-not-at-top
  return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def save_config(config, workdir):
  if jax.process_index() == 0:
    write_atomic(join(workdir, "config.json"),
                  config.to_json_best_effort(indent=2, sort_keys=True))


def jsonable(x):
  if isinstance(x, dict):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, np.generic):
    return x.item()
  return x


# ============================================================================= progress and plots


def progress_enabled(config) -> bool:
  return bool(config.progress) and jax.process_index() == 0


def make_plotter(config, workdir, framework, embed_train: Callable, train_labels):
  """PNG of the training embeddings (subset) and the framework's points, for 2-D embeddings."""
  if not config.plot_projections or config.model.embedding_dim != 2 or jax.process_index():
    return None
  makedirs(join(workdir, "plots"))
  sub = np.random.default_rng(config.seed).permutation(len(train_labels))[:1500]

  def plot(state, name, extra_points=None):
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    emb = embed_train(state.params["model"], state.batch_stats, sub)
    lab = train_labels[sub]
    fig, ax = plt.subplots(figsize=(6, 6))
    cmap = plt.get_cmap("tab10" if lab.max() < 10 else "tab20")
    ax.scatter(emb[:, 0], emb[:, 1], c=cmap(lab % cmap.N), s=4, alpha=0.5)
    points = {**framework.plot_points(state), **(extra_points or {})}
    for marker, (legend, (pts, cls)) in zip(("s", "o", "^", "D", "v"), points.items()):
      pts, cls = np.asarray(pts), np.asarray(cls)
      ax.scatter(pts[:, 0], pts[:, 1], c=cmap(cls % cmap.N), marker=marker, s=60,
                 edgecolors="k", label=legend)
    if points:
      ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"{name} (step {int(numerics.to_host(state.step))})")
    ax.set_aspect("equal")
    with (epath_of(join(workdir, "plots", f"{name}.png")).open("wb") if is_remote(workdir)
          else open(os.path.join(workdir, "plots", f"{name}.png"), "wb")) as f:
      fig.savefig(f, dpi=90, format="png")
    plt.close(fig)

  return plot
