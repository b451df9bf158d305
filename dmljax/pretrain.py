r"""The glyphs trunk's "ImageNet": classification pretraining on symbols no glyphs class resembles.

  python -m dmljax.pretrain --out dmljax/weights/small_cnn_glyphs.pth

Every paper dmljax implements fine-tunes an ImageNet-pretrained trunk on classes it never saw.
This is that regime in miniature for the glyphs data set (``dmljax/data/glyphs.py``, whose classes
are Latin, Greek and Cyrillic letters):

* **Corpus.** Classes are characters of Unicode blocks that matplotlib's 16 text faces cover and
  that are not letters of those alphabets: Armenian, Hebrew, Georgian, arrows, mathematical
  operators, miscellaneous technical, box drawing, block elements, geometric shapes and
  miscellaneous symbols (:data:`BLOCKS`). Mathematical alphanumerics and letterlike symbols are
  left out on purpose: they are styled Latin and Greek letters. A character is a candidate when
  at least ``min_fonts`` faces have a glyph for it (matplotlib's FreeType ``get_char_index``) and
  its clean renders have ink in every such face. It is dropped when it looks like any of the 166
  glyphs candidate letters by the glyphs merge rule (:func:`dmljax.data.glyphs.confusable_groups`:
  relative mean pixel difference below ``merge_threshold`` in at least half of the faces that
  have it), here applied at ``lookalike_factor`` (3) times the merge threshold to be
  conservative, and two candidates that are identical by the plain rule (e.g. a symbol and its
  duplicate in another block) are merged, the first kept. ``max_classes`` candidates, evenly
  spaced over the remaining list, become the classes.
* **Images.** Each class is rendered ``samples_per_class`` times, spread round-robin over the
  faces that have it, with the glyphs jitter (rotation, scale, shear, translation, stroke, contrast,
  noise; :class:`dmljax.data.glyphs.GlyphConfig`'s defaults), seeded by (render seed, code point,
  face), 32 x 32 uint8 like the glyphs images.
* **Training.** The glyphs trunk (``small_cnn``, widths (32, 64, 128), BatchNorm training) with a
  linear classifier, softmax cross-entropy, Adam, a fixed number of steps over batches drawn by a
  seeded generator: on a CPU the result is a deterministic function of the options. One sample
  per class in ``holdout`` is held out to report accuracy.
* **Output.** The trunk (and the classifier, which the trainer ignores) as a PyTorch-format state
  dict (:func:`dmljax.models.torch_import.save_state_dict`), read by ``--config.model.pretrained``
  through the same reader and converter as the ImageNet files, plus ``<out>.json`` with the
  options, the classes and the held-out accuracy.

``dmljax/weights/small_cnn_glyphs.pth`` (shipped in the package, used by the ``glyphs_*``
configs) is the output of the command above with the defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np

#: Unicode blocks the pretraining classes are drawn from: (name, first, last code point).
BLOCKS = (
    ("armenian", 0x0531, 0x0556), ("armenian", 0x0561, 0x0586),
    ("hebrew", 0x05D0, 0x05EA),
    ("georgian", 0x10D0, 0x10FA),
    ("arrows", 0x2190, 0x21FF),
    ("math_operators", 0x2200, 0x22FF),
    ("misc_technical", 0x2300, 0x23FF),
    ("box_drawing", 0x2500, 0x257F),
    ("block_elements", 0x2580, 0x259F),
    ("geometric_shapes", 0x25A0, 0x25FF),
    ("misc_symbols", 0x2600, 0x26FF),
)

#: The shipped weights, relative to the package.
SHIPPED = os.path.join("weights", "small_cnn_glyphs.pth")


def shipped_weights() -> str:
  """Absolute path of the pretrained glyphs trunk shipped with the package."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), SHIPPED)


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """Everything the weights depend on (written to ``<out>.json``).

  Attributes:
    max_classes: classes kept, evenly spaced over the candidates that pass the rules.
    samples_per_class: rendered images per class.
    min_fonts: faces that must have a glyph for the character.
    lookalike_factor: multiple of the glyphs merge threshold under which a candidate counts as a
      look-alike of a glyphs letter.
    widths: small_cnn widths (the glyphs configs': (32, 64, 128)).
    steps, batch_size, learning_rate: Adam classification training.
    holdout: every ``holdout``-th sample of a class is held out (accuracy only).
    seed: render and training seed.
    blocks: names of :data:`BLOCKS` to draw from (empty: all).
  """
  max_classes: int = 300
  samples_per_class: int = 32
  min_fonts: int = 4
  lookalike_factor: float = 3.0
  widths: tuple = (32, 64, 128)
  steps: int = 1000
  batch_size: int = 64
  learning_rate: float = 3e-3
  holdout: int = 8
  seed: int = 0
  blocks: tuple = ()


def _coverage(chars, paths) -> np.ndarray:
  """[F, L] bool: face f has a glyph for character l."""
  from matplotlib import ft2font  # pylint: disable=g-import-not-at-top
  out = np.zeros((len(paths), len(chars)), bool)
  for f, p in enumerate(paths):
    font = ft2font.FT2Font(p)
    out[f] = [font.get_char_index(ord(c)) != 0 for c in chars]
  return out


def _relative_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[F, A, B] the glyphs merge rule's relative pixel distance per face ([F, A, S, S] renders)."""
  from scipy.spatial.distance import cdist  # pylint: disable=g-import-not-at-top
  xa = a.reshape(a.shape[0], a.shape[1], -1).astype(np.float64)
  xb = b.reshape(b.shape[0], b.shape[1], -1).astype(np.float64)
  ink_a, ink_b = np.maximum(xa.mean(-1), 1e-6), np.maximum(xb.mean(-1), 1e-6)
  dist = np.stack([cdist(p, q, "cityblock") for p, q in zip(xa, xb)]) / xa.shape[-1]
  return dist / np.maximum(ink_a[:, :, None], ink_b[:, None, :])


def select_classes(config: PretrainConfig = PretrainConfig(), image_size: int = 32):
  """The pretraining classes and what the rules removed.

  Returns:
    ``(classes, report)``: classes as ``[(char, block, face indices)]``; report a dict with the
    counts per rule, the dropped look-alikes (``"char~letter"``) and the merged duplicates.
  """
  from dmljax.data import glyphs  # pylint: disable=g-import-not-at-top
  g = glyphs.GlyphConfig()
  known = sorted({name for name, _, _ in BLOCKS})
  unknown = sorted(set(config.blocks) - set(known))
  if unknown:
    raise ValueError(f"unknown blocks {unknown}; valid: {known}.")
  cands = [(chr(c), name) for name, lo, hi in BLOCKS for c in range(lo, hi + 1)
           if not config.blocks or name in config.blocks]
  chars = [c for c, _ in cands]
  paths = glyphs.font_paths(glyphs.DEFAULT_FONTS)
  cover = _coverage(chars, paths)                                      # [F, L]
  keep = cover.sum(0) >= config.min_fonts
  cands = [x for x, k in zip(cands, keep) if k]
  cover = cover[:, keep]
  renders = glyphs.clean_renders([c for c, _ in cands], glyphs.DEFAULT_FONTS, image_size)
  ink = renders.reshape(renders.shape[0], renders.shape[1], -1).mean(-1)  # [F, L]
  inked = np.all((ink > 0.01) | ~cover, axis=0)
  letters = [c for c, _ in glyphs.candidate_letters()]
  letter_renders = glyphs.clean_renders(letters, glyphs.DEFAULT_FONTS, image_size)
  rel = _relative_distance(renders, letter_renders)                    # [F, L, 166]
  near = rel < config.lookalike_factor * g.merge_threshold
  frac = (near & cover[:, :, None]).sum(0) / np.maximum(cover.sum(0), 1)[:, None]
  lookalike = (frac >= g.merge_min_fraction).any(1)
  report = {"candidates_in_blocks": int(len(keep)), "with_min_fonts": int(len(cands)),
            "blank": int((~inked).sum()), "lookalikes": [], "duplicates": []}
  for i in np.flatnonzero(lookalike & inked):
    j = int(np.argmax(frac[i]))
    report["lookalikes"].append(f"{cands[i][0]}~{letters[j]}")
  alive = [i for i in range(len(cands)) if inked[i] and not lookalike[i]]
  # Duplicates among the candidates: identical by the plain merge rule in the faces both have.
  sub = renders[:, alive]
  rel_cc = _relative_distance(sub, sub)                                # [F, A, A]
  both = cover[:, alive][:, :, None] & cover[:, alive][:, None, :]
  same = ((rel_cc < g.merge_threshold) & both).sum(0) >= np.maximum(
      g.merge_min_fraction * both.sum(0), 1)
  kept = []
  for a, i in enumerate(alive):
    dup = [b for b in kept if same[a, alive.index(b)]]
    if dup:
      report["duplicates"].append(f"{cands[i][0]}={cands[dup[0]][0]}")
    else:
      kept.append(i)
  if len(kept) > config.max_classes:
    pick = np.linspace(0, len(kept) - 1, config.max_classes).round().astype(int)
    kept = [kept[p] for p in pick]
  classes = [(cands[i][0], cands[i][1], tuple(int(f) for f in np.flatnonzero(cover[:, i])))
             for i in kept]
  report["classes"] = len(classes)
  return classes, report


def render_corpus(classes, samples_per_class: int, seed: int = 0, image_size: int = 32):
  """[N, S, S] uint8 images and [N] int32 labels, deterministic in the arguments."""
  from dmljax.data import glyphs  # pylint: disable=g-import-not-at-top
  g = dataclasses.replace(glyphs.GlyphConfig(), image_size=image_size, render_seed=seed)
  canvas = image_size * glyphs._SUPERSAMPLE  # pylint: disable=protected-access
  fonts = glyphs._load_fonts(glyphs.font_paths(glyphs.DEFAULT_FONTS), canvas)  # pylint: disable=protected-access
  images = np.empty((len(classes) * samples_per_class, image_size, image_size), np.uint8)
  labels = np.repeat(np.arange(len(classes), dtype=np.int32), samples_per_class)
  n = 0
  for k, (char, _, faces) in enumerate(classes):
    rngs = {f: np.random.default_rng([seed, ord(char), f]) for f in faces}
    cache = {}
    for s in range(samples_per_class):
      f = faces[s % len(faces)]
      max_stroke = g.max_stroke // 2 if "Bol" in glyphs.DEFAULT_FONTS[f] else g.max_stroke
      images[n] = glyphs._render_sample(  # pylint: disable=protected-access
          fonts[f], char, canvas, image_size, rngs[f], g, cache, max_stroke)
      n += 1
  return images, labels


def train_classifier(images, labels, num_classes: int, config: PretrainConfig,
                     log_every: int = 0):
  """Trains small_cnn + a linear classifier; returns (variables, held-out accuracy, losses).

  ``variables`` is ``{"params": {"backbone", "classifier"}, "batch_stats": {"backbone"}}``.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from dmljax.models.cnn import SmallCNN  # pylint: disable=g-import-not-at-top

  class Classifier(nn.Module):
    num_classes: int
    widths: tuple

    @nn.compact
    def __call__(self, x, train: bool):
      feats = SmallCNN(widths=self.widths, name="backbone")(x, train=train)
      return nn.Dense(self.num_classes, name="classifier")(feats)

  idx = np.arange(len(labels))
  held = (idx % config.holdout) == config.holdout - 1 if config.holdout else np.zeros_like(idx, bool)
  tr_x, tr_y = images[~held], labels[~held]
  model = Classifier(num_classes, tuple(config.widths))
  x0 = jnp.zeros((1,) + images.shape[1:] + (1,), jnp.float32)
  variables = model.init(jax.random.PRNGKey(config.seed), x0, train=False)
  params, stats = variables["params"], variables["batch_stats"]
  tx = optax.adam(config.learning_rate)
  opt = tx.init(params)

  def prep(x):
    return jnp.asarray(x, jnp.float32)[..., None] / 255.0

  @jax.jit
  def step(params, stats, opt, x, y):
    def loss_fn(p):
      logits, upd = model.apply({"params": p, "batch_stats": stats}, prep(x), train=True,
                                mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd
    (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), upd["batch_stats"], opt, loss

  rng = np.random.default_rng(config.seed)
  losses = []
  for t in range(config.steps):
    b = rng.integers(0, len(tr_y), config.batch_size)
    params, stats, opt, loss = step(params, stats, opt, tr_x[b], tr_y[b])
    losses.append(float(loss))
    if log_every and (t + 1) % log_every == 0:
      print(f"step {t + 1}/{config.steps}: loss {np.mean(losses[-log_every:]):.4f}", flush=True)
  acc = float("nan")
  if held.any():
    predict = jax.jit(lambda p, s, x: model.apply({"params": p, "batch_stats": s}, prep(x),
                                                   train=False).argmax(-1))
    pred = np.concatenate([np.asarray(predict(params, stats, images[held][i:i + 512]))
                           for i in range(0, int(held.sum()), 512)])
    acc = float((pred == labels[held]).mean())
  return {"params": params, "batch_stats": stats}, acc, losses


def to_state_dict(variables) -> dict:
  """The trunk in small_cnn's PyTorch layout plus ``classifier.weight`` / ``classifier.bias``."""
  from dmljax.models import torch_import  # pylint: disable=g-import-not-at-top
  trunk = {"params": variables["params"]["backbone"],
           "batch_stats": variables["batch_stats"]["backbone"]}
  sd = torch_import.to_torch_state_dict("small_cnn", trunk)
  head = variables["params"]["classifier"]
  sd["classifier.weight"] = np.ascontiguousarray(np.asarray(head["kernel"], np.float32).T)
  sd["classifier.bias"] = np.asarray(head["bias"], np.float32)
  return sd


def pretrain(out: str, config: PretrainConfig = PretrainConfig(), log_every: int = 0) -> dict:
  """Selects, renders, trains and writes ``out`` (.pth) and ``out + '.json'``; returns the record."""
  from dmljax.models import torch_import  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  classes, report = select_classes(config)
  if len(classes) < 2:
    raise ValueError(f"only {len(classes)} pretraining classes pass the rules; lower min_fonts.")
  images, labels = render_corpus(classes, config.samples_per_class, config.seed)
  rendered = time.perf_counter() - start
  variables, acc, losses = train_classifier(images, labels, len(classes), config, log_every)
  torch_import.save_state_dict(to_state_dict(variables), out)
  record = {
      "command": "python -m dmljax.pretrain --out " + out + "".join(
          f" --{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
          for k, v in dataclasses.asdict(config).items()
          if v != getattr(PretrainConfig(), k)),
      "config": dataclasses.asdict(config), "selection": report,
      "classes": "".join(c for c, _, _ in classes),
      "blocks": sorted({b for _, b, _ in classes}),
      "images": int(len(labels)), "heldout_accuracy": acc,
      "first_loss": float(np.mean(losses[:20])), "last_loss": float(np.mean(losses[-20:])),
      "render_seconds": round(rendered, 1),
      "seconds": round(time.perf_counter() - start, 1),
      "sha256": torch_import.file_sha256(out)}
  with open(out + ".json", "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1, ensure_ascii=False)
  return record


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The command line; returns the exit status."""
  d = PretrainConfig()
  parser = argparse.ArgumentParser(prog="python -m dmljax.pretrain", description=__doc__.split(
      "\n\n")[0].strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="the .pth file to write (and OUT.json)")
  for f in dataclasses.fields(PretrainConfig):
    default = getattr(d, f.name)
    kind = type(default)
    if kind is tuple:
      parser.add_argument(f"--{f.name}", default=",".join(map(str, default)),
                          help=f"comma-separated (default {default})")
    else:
      parser.add_argument(f"--{f.name}", type=kind, default=default, help=f"default {default}")
  args = parser.parse_args(argv)
  values = {f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)}
  try:
    values["widths"] = tuple(int(w) for w in str(values["widths"]).split(","))
    values["blocks"] = tuple(b for b in str(values["blocks"]).split(",") if b)
    config = PretrainConfig(**values)
    if config.max_classes < 2 or config.samples_per_class < 2 or config.steps < 1:
      raise ValueError("max_classes and samples_per_class must be >= 2 and steps >= 1.")
    record = pretrain(args.out, config, log_every=max(1, config.steps // 10))
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{record['selection']['classes']} classes ({', '.join(record['blocks'])}), "
        f"{record['images']} images; dropped {len(record['selection']['lookalikes'])} "
        f"look-alikes of glyphs letters, {len(record['selection']['duplicates'])} duplicates")
  print(f"held-out accuracy {record['heldout_accuracy']:.4f}; loss {record['first_loss']:.3f} -> "
        f"{record['last_loss']:.3f}; {record['seconds']} s; wrote {args.out} "
        f"(sha256 {record['sha256'][:16]}) and {args.out}.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
