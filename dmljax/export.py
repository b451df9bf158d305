"""Export a trained run as a self-contained model, and load it: ``dmljax.load_model(path)``.

``python -m dmljax.export RUN_DIR [--out DIR] [--step best|last|N] [--stablehlo]`` writes DIR
(default ``RUN_DIR/model``) with

* ``model.json``: the network's config (``config.model``), the input shape the network was trained
  on, the eval transform (:class:`~dmljax.data.transforms.TransformConfig`), the batch size of its
  embedding function (the run's ``eval_batch_size``), where it came from (run, step, best step)
  and the model's fingerprint;
* ``params.msgpack``: the parameters and BatchNorm statistics (Flax msgpack), nothing else: no
  optimizer state, no framework state (proxies, memories), no training data;
* with ``--stablehlo``, ``embed.jax_exported``: the embedding function with its parameters baked
  in, serialized by :mod:`jax.export` (StableHLO) for a fixed batch of uint8 images, which
  ``jax.export.deserialize(...).call(images)`` runs without dmljax's model code.

Which parameters: ``best`` (default) are those of the best validation evaluation (``RUN_DIR/best``
if the run saved it, else the ones the newest checkpoint tracks); ``last`` the newest checkpoint's
current parameters; ``N`` those of checkpoint step N. A live run exports too: Orbax only lists a
step once it is complete, and a step deleted by retention while being read falls back to the next
newest one.

Loading needs only the model code (:mod:`dmljax.models`)::

    model = dmljax.load_model("runs/glyphs_ccp/model")
    emb = model.embed(images_uint8)          # [N, H, W, C] at model.input_shape -> [N, D] float32
    x = model.prepare(open("a.png", "rb").read())   # any image file -> the model's input

``embed`` is jitted once for ``model.batch_size`` images and runs the images in fixed-size
batches, the last one padded (the padding's rows are dropped), exactly as the trainer's
evaluation does, so on the same images it returns the trainer's evaluation embeddings bit for bit.
:meth:`Model.prepare` brings any image (file bytes, or an array of any size and 1 or 3 channels)
to the input: with the benchmark data sets' eval transform (resize, centre crop); for the embedded
data sets (digits, glyphs), whose eval transform is the identity, by converting the channels
(PIL's luminance for grey) and resizing (bilinear, antialiased) to the recorded input shape.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Any, Optional, Sequence

import numpy as np

from dmljax import cli

PROG = "python -m dmljax.export"
MODEL_FILE = "model.json"
PARAMS_FILE = "params.msgpack"
SERIALIZED_FILE = "embed.jax_exported"
FORMAT_VERSION = 1


# ============================================================================= reading a run


def _manager(directory: str, item_names=None):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  opts = ocp.CheckpointManagerOptions(create=False)
  return ocp.CheckpointManager(directory, options=opts, item_names=item_names)


def _restore_run_step(manager, step: int):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), host=ocp.args.JsonRestore()))
  return restored["state"], dict(restored["host"])


def _to_numpy(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(np.asarray, tree)


def read_run(run_dir: str, step: str = "best") -> dict[str, Any]:
  """The parameters, config and input facts of a run directory (finished or still running).

  Args:
    run_dir: a ``dmljax.main`` workdir (``checkpoints/``, optionally ``best/``).
    step: "best", "last" or a checkpoint step number (as an int or a string).

  Returns:
    ``{"variables": {"params", "batch_stats"}, "config": dict, "host": dict, "step": int,
    "best_step": int or None, "which": str}``.

  Raises:
    ValueError: no checkpoint in ``run_dir``, an unknown ``step``, or no step restores.
  """
  step = str(step)
  if step not in ("best", "last") and not step.isdigit():
    raise ValueError(f"--step must be best, last or a checkpoint step number, got {step!r}.")
  ckpt_dir = os.path.abspath(os.path.join(run_dir, "checkpoints"))
  if not os.path.isdir(run_dir):
    raise ValueError(f"{run_dir}: no such run directory; give the --workdir of a dmljax.main run.")
  manager = _manager(ckpt_dir, ("state", "host")) if os.path.isdir(ckpt_dir) else None
  steps = sorted(manager.all_steps(), reverse=True) if manager is not None else []
  if not steps:
    raise ValueError(f"{run_dir} holds no model: no complete checkpoint in {ckpt_dir}. Export "
                     "a dmljax.main --workdir after its first checkpoint (config.checkpoint."
                     "every_steps, or the end of the run).")
  if step.isdigit():
    if int(step) not in steps:
      raise ValueError(f"{run_dir} has no checkpoint step {step}; steps: {sorted(steps)} (or use "
                       "--step best / last).")
    steps = [int(step)]
  errors = []
  for s in steps:  # newest first: a step removed by a live run's retention falls back
    try:
      state, host = _restore_run_step(manager, s)
      break
    except Exception as e:  # pylint: disable=broad-except
      errors.append(f"step {s}: {cli.message(e)[:200]}")
  else:
    raise ValueError(f"no checkpoint of {run_dir} restores ({'; '.join(errors)}).")
  state = _to_numpy(state)
  best_step = int(np.asarray(state["tracker"]["best_step"]))
  which = "last" if step == "last" else (f"step {s}" if step.isdigit() else "best")
  if step == "best":
    best_dir = os.path.abspath(os.path.join(run_dir, "best"))
    best = None
    if os.path.isdir(best_dir):  # written at each improvement: possibly newer than the checkpoint
      import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
      bm = _manager(best_dir)
      for bs in sorted(bm.all_steps(), reverse=True):
        try:
          best = _to_numpy(bm.restore(bs, args=ocp.args.StandardRestore()))
          best_step = bs
          break
        except Exception:  # pylint: disable=broad-except
          continue
    if best is None:
      best = state["best"]
    params, batch_stats = best["params"]["model"], best.get("batch_stats") or {}
  else:
    params, batch_stats = state["params"]["model"], state.get("batch_stats") or {}
  return {"variables": {"params": params, "batch_stats": batch_stats}, "config": host["config"],
          "host": host, "step": int(s), "best_step": best_step if best_step >= 0 else None,
          "which": which}


def _input_facts(config: dict, host: dict) -> tuple[dict, tuple]:
  """``(eval transform dict, input shape)`` of a run, from its checkpoint (or its data set)."""
  pipe = host.get("pipeline", {})
  eval_tf = pipe.get("eval_transform")
  shape = pipe.get("image_shape")
  if eval_tf is None or shape is None:
    # Older checkpoints: rebuild the input description from the config (loads the data set).
    import ml_collections  # pylint: disable=g-import-not-at-top
    from dmljax import inputs  # pylint: disable=g-import-not-at-top
    data = inputs.create_input(ml_collections.ConfigDict(config))
    eval_tf = data.eval_transform.to_dict() if eval_tf is None else eval_tf
    shape = data.image_shape if shape is None else shape
  return dict(eval_tf), tuple(int(v) for v in shape)


def fingerprint(model_config: dict, params_bytes: bytes) -> str:
  """16 hex digits identifying a model: its network config and its exact parameters."""
  h = hashlib.sha256(json.dumps(model_config, sort_keys=True).encode())
  h.update(params_bytes)
  return h.hexdigest()[:16]


def export(run_dir: str, out: Optional[str] = None, step: str = "best",
           stablehlo: bool = False) -> str:
  """Writes the model of ``run_dir`` to ``out`` (default ``run_dir/model``); returns ``out``.

  See the module docstring for the files and ``step``.
  """
  import flax  # pylint: disable=g-import-not-at-top
  run = read_run(run_dir, step)
  config = run["config"]
  eval_tf, shape = _input_facts(config, run["host"])
  params_bytes = flax.serialization.msgpack_serialize(run["variables"])
  meta = {
      "format_version": FORMAT_VERSION,
      "model": config["model"],
      "input_shape": list(shape),
      "eval_transform": eval_tf,
      "batch_size": int(config.get("eval_batch_size", 128)),
      "fingerprint": fingerprint(config["model"], params_bytes),
      "source": {"run_dir": os.path.abspath(run_dir), "checkpoint_step": run["step"],
                 "params": run["which"], "best_step": run["best_step"],
                 "dataset": config.get("dataset", {}).get("name"),
                 "framework": config.get("framework"),
                 "config_fingerprint": run["host"].get("config_fingerprint")},
  }
  out = out or os.path.join(run_dir, "model")
  os.makedirs(out, exist_ok=True)
  _write_atomic(os.path.join(out, PARAMS_FILE), params_bytes)
  if stablehlo:
    model = Model(meta, run["variables"])
    _write_atomic(os.path.join(out, SERIALIZED_FILE), model.serialize())
    meta["serialized"] = {"file": SERIALIZED_FILE, "batch_size": model.batch_size,
                          "input": [model.batch_size] + list(shape) + ["uint8"]}
  else:
    stale = os.path.join(out, SERIALIZED_FILE)
    if os.path.exists(stale):
      os.remove(stale)
  # model.json last: a directory with it is complete.
  _write_atomic(os.path.join(out, MODEL_FILE), json.dumps(meta, indent=1).encode())
  return out


def _write_atomic(path: str, data: bytes) -> None:
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


# ============================================================================= the loaded model


def _fit_channels(image: np.ndarray, channels: int) -> np.ndarray:
  """``[H, W, C]`` uint8 with ``channels`` channels (grey: PIL's ITU-R 601-2 luminance)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if image.ndim == 2:
    image = image[:, :, None]
  have = image.shape[2]
  if have == channels:
    return image
  if have == 4:  # RGBA array: drop alpha
    image, have = image[:, :, :3], 3
  if channels == 1 and have == 3:
    return np.asarray(Image.fromarray(np.ascontiguousarray(image), "RGB").convert("L"))[:, :, None]
  if channels == 3 and have == 1:
    return np.repeat(image, 3, axis=2)
  raise ValueError(f"cannot convert an image with {have} channels to {channels}.")


class Model:
  """An exported embedding model (see the module docstring); build it with :func:`load_model`.

  Attributes:
    input_shape: ``(H, W, C)`` of the images ``embed`` takes.
    embedding_dim: D.
    batch_size: images per compiled call of ``embed``.
    eval_transform: the :class:`~dmljax.data.transforms.TransformConfig` of file images.
    fingerprint: 16 hex digits naming the model (config and parameters).
    meta: the whole ``model.json``.
    path: the directory it was loaded from (None if built in memory).
  """

  def __init__(self, meta: dict, variables: dict, path: Optional[str] = None):
    import jax  # pylint: disable=g-import-not-at-top
    import ml_collections  # pylint: disable=g-import-not-at-top
    from dmljax import models  # pylint: disable=g-import-not-at-top
    from dmljax.data import transforms  # pylint: disable=g-import-not-at-top
    self.meta, self.path = meta, path
    self.input_shape = tuple(int(v) for v in meta["input_shape"])
    self.batch_size = int(meta["batch_size"])
    self.eval_transform = transforms.TransformConfig.from_dict(meta["eval_transform"])
    self.fingerprint = meta["fingerprint"]
    self.network = models.get_model(ml_collections.ConfigDict(meta["model"]))
    self.embedding_dim = int(meta["model"]["embedding_dim"])
    v = {"params": variables["params"]}
    if variables.get("batch_stats"):
      v["batch_stats"] = variables["batch_stats"]
    self.variables = jax.device_put(v)
    network = self.network

    def embed_fn(variables, images):  # the trainer's inference-mode embedding
      if images.dtype != jax.numpy.uint8:
        images = images.astype(jax.numpy.float32)
      return network.apply(variables, images, train=False)

    self._embed_fn = jax.jit(embed_fn)

  def __repr__(self):
    src = self.meta.get("source", {})
    return (f"Model({self.meta['model'].get('name')}, input {self.input_shape}, D="
            f"{self.embedding_dim}, fingerprint {self.fingerprint}, from {src.get('run_dir')} "
            f"{src.get('params')})")

  def embed(self, images) -> np.ndarray:
    """Embeddings ``[N, D]`` float32 of uint8 images ``[N, H, W, C]`` at :attr:`input_shape`
    (``[N, H, W]`` for one channel is accepted), in fixed batches of :attr:`batch_size`."""
    images = np.asarray(images)
    if images.ndim == len(self.input_shape) and images.shape[1:] == self.input_shape[:2] \
        and self.input_shape[2] == 1:
      images = images[..., None]
    if images.ndim != 4 or tuple(images.shape[1:]) != self.input_shape:
      raise ValueError(f"images must have shape [N, {', '.join(map(str, self.input_shape))}], "
                       f"got {images.shape}; bring images to the model's input with "
                       "model.prepare(image) (or use python -m dmljax.embed).")
    if images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 (0-255), got {images.dtype}.")
    n, b = len(images), self.batch_size
    out = np.zeros((n, self.embedding_dim), np.float32)
    for lo in range(0, n, b):
      chunk = images[lo:lo + b]
      m = len(chunk)
      if m < b:  # pad by repeating the batch's first image, as the trainer's evaluation does
        chunk = np.concatenate([chunk, np.repeat(chunk[:1], b - m, axis=0)])
      out[lo:lo + m] = np.asarray(self._embed_fn(self.variables, chunk))[:m]
    return out

  def prepare(self, image) -> np.ndarray:
    """One image (encoded file bytes, or a uint8 array ``[h, w]`` / ``[h, w, 1|3|4]`` of any
    size) as the model's input, uint8 ``[H, W, C]``."""
    from dmljax.data import transforms  # pylint: disable=g-import-not-at-top
    h, w, c = self.input_shape
    if isinstance(image, (bytes, bytearray, memoryview)):
      image = transforms.decode(bytes(image), self.eval_transform.decode_min_side)
    image = np.asarray(image)
    if image.dtype != np.uint8:
      raise ValueError(f"images must be uint8, got {image.dtype}.")
    if image.ndim == 3 and image.shape[2] == 4:
      image = image[:, :, :3]
    if self.eval_transform.kind == "eval":
      image = transforms.transform_image(_fit_channels(image, 3), self.eval_transform)
    image = _fit_channels(image, c)
    if image.shape[:2] != (h, w):
      image = transforms.resize(image, w, h)
      image = image[:, :, None] if image.ndim == 2 else image
    return np.ascontiguousarray(image)

  def embed_files(self, paths: Sequence[str]) -> np.ndarray:
    """Embeddings of image files (decoded and brought to the input by :meth:`prepare`)."""
    images = []
    for p in paths:
      with open(p, "rb") as f:
        images.append(self.prepare(f.read()))
    return self.embed(np.stack(images)) if images else np.zeros((0, self.embedding_dim),
                                                                 np.float32)

  def serialize(self) -> bytes:
    """The embedding function of one batch, parameters included, as :mod:`jax.export` bytes."""
    import jax  # pylint: disable=g-import-not-at-top
    variables = self.variables
    fn = jax.jit(lambda images: self._embed_fn(variables, images))
    spec = jax.ShapeDtypeStruct((self.batch_size,) + self.input_shape, np.uint8)
    return bytes(jax.export.export(fn)(spec).serialize())


def load_model(path: str) -> Model:
  """Loads an exported model directory (or its ``model.json``); see the module docstring.

  Raises:
    ValueError: ``path`` is not an exported model (no ``model.json``), or it is damaged.
  """
  import flax  # pylint: disable=g-import-not-at-top
  directory = os.path.dirname(path) if path.endswith(MODEL_FILE) else path
  meta_path = os.path.join(directory, MODEL_FILE)
  if not os.path.isfile(meta_path):
    hint = (f"; it looks like a run directory: export it first with {PROG} {path}"
            if os.path.isdir(os.path.join(directory, "checkpoints")) else "")
    raise ValueError(f"{path} is not an exported dmljax model (no {MODEL_FILE}){hint}.")
  with open(meta_path) as f:
    meta = json.load(f)
  if int(meta.get("format_version", 0)) > FORMAT_VERSION:
    raise ValueError(f"{path} was exported by a newer dmljax (format {meta['format_version']}); "
                     "upgrade dmljax.")
  with open(os.path.join(directory, PARAMS_FILE), "rb") as f:
    params_bytes = f.read()
  if fingerprint(meta["model"], params_bytes) != meta["fingerprint"]:
    raise ValueError(f"{path}: {PARAMS_FILE} does not match {MODEL_FILE} (fingerprint differs); "
                     "export the model again.")
  variables = flax.serialization.msgpack_restore(params_bytes)
  return Model(meta, variables, path=os.path.abspath(directory))


# ============================================================================= command line


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog=PROG, description="Export a trained run as a self-contained "
                              "model (network config, parameters, input transform).")
  p.add_argument("run_dir", help="the --workdir of a dmljax.main run (finished or running)")
  p.add_argument("--out", default=None, help="model directory to write (default RUN_DIR/model)")
  p.add_argument("--step", default="best",
                 help="best (default: the best validation parameters), last, or a step number")
  p.add_argument("--stablehlo", action="store_true",
                 help=f"also write {SERIALIZED_FILE}: the embedding function serialized by "
                 "jax.export, for serving without dmljax's model code")
  p.add_argument("--verbose", action="store_true", help="show tracebacks with error messages")
  return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> str:
  a = parse_args(argv)
  out = export(a.run_dir, a.out, a.step, a.stablehlo)
  with open(os.path.join(out, MODEL_FILE)) as f:
    meta = json.load(f)
  src = meta["source"]
  print(f"wrote {out}: {meta['model']['name']} D={meta['model']['embedding_dim']} input "
        f"{tuple(meta['input_shape'])}, {src['params']} parameters (checkpoint step "
        f"{src['checkpoint_step']}, best step {src['best_step']}), fingerprint "
        f"{meta['fingerprint']}")
  return out


def run(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run_main(PROG, main, argv)


if __name__ == "__main__":
  sys.exit(run())
