"""Glyphs: a many-class, class-disjoint data set rendered from the fonts matplotlib ships.

Classes are the letters of the Latin (26 + 26), Greek (24 + 24) and basic Russian Cyrillic (33 + 33)
alphabets, upper and lower case as separate classes: 166 candidates. Each is drawn in 16 text faces
(DejaVu Sans / Serif / Sans Mono and STIX General, each regular, bold, oblique or italic, bold
oblique or bold italic), so a class has several local modes (weight, slant, serifs): the structure
multi-proxy methods such as CCP are meant to exploit.

Cross-script look-alikes are merged, detected from pixels rather than a hand-made list: two letters
of different scripts are *near-identical in a font* when their clean (un-jittered) renders differ by
a mean absolute pixel difference below ``merge_threshold`` (0.05) times the larger of their mean
inks, and they are merged when that holds in at least ``merge_min_fraction`` (half) of the 16
default fonts; merging is transitive (connected components). A merged class is rendered from its
first member in script order Latin, Greek, Cyrillic and named by all members ("A/Α/А"). The rule
always uses all 16 faces, whatever subset of fonts is rendered, so the class list does not depend on
the font choice. With the defaults it merges 24 groups (e.g. A/Α/А, o/ο/о, y/у, Γ/Г, Π/П) and keeps
pairs that differ in most faces (K/К, κ/к, Y/У): 132 classes remain. Within-script ambiguities
(Latin I and l in sans faces) are real letters and kept.

Every sample is a render at twice the target resolution with a random stroke widening, a random
affine map (rotation, isotropic scale, shear, translation) about the centre, box down-sampling to
``image_size``, a random ink contrast and Gaussian pixel noise. All randomness comes from
``np.random.default_rng([render_seed, candidate index, font index])``, so the data are a pure
function of the generation parameters; they are cached as a compressed ``.npz`` keyed by a hash of
those parameters (and of the font files' sizes) under ``cache_dir`` (default
``$DMLJAX_CACHE/glyphs`` or ``~/.cache/dmljax/glyphs``). The train/val/test split is a random
partition of the classes by ``seed`` (60/20/20 % by default), so different seeds give different
class folds from one cache file.
"""
import dataclasses
import hashlib
import json
import os
import time

import numpy as np

from dmljax.data.splits import Dataset, _make_split, partition_classes

__all__ = [
    "DEFAULT_FONTS", "GlyphConfig", "candidate_letters", "font_paths", "clean_renders",
    "confusable_groups", "class_list", "generate_glyphs", "load_glyphs", "save_contact_sheet",
    "default_cache_dir",
]

_FORMAT_VERSION = 1

DEFAULT_FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
)

_ALPHABETS = {
    "latin": ([chr(c) for c in range(0x41, 0x5B)] + [chr(c) for c in range(0x61, 0x7B)]),
    # Greek without the final sigma (a positional variant of sigma, not a letter of its own).
    "greek": ([chr(c) for c in range(0x391, 0x3AA) if c != 0x3A2]
              + [chr(c) for c in range(0x3B1, 0x3CA) if c != 0x3C2]),
    # The 33 letters of the Russian alphabet (Ё/ё sit outside the contiguous А..я block).
    "cyrillic": ([chr(c) for c in range(0x410, 0x430)] + ["\u0401"]
                 + [chr(c) for c in range(0x430, 0x450)] + ["\u0451"]),
}
SCRIPTS = tuple(_ALPHABETS)

# Layout on the square canvas, as fractions of its side: one em, horizontally centred on the
# advance, with a common baseline so letter case and descenders (o vs O, p vs P) stay distinct.
_FONT_SIZE = 0.55
_BASELINE = 0.72
_SUPERSAMPLE = 2


@dataclasses.dataclass(frozen=True)
class GlyphConfig:
  """Generation parameters (everything that determines the cached arrays).

  Attributes:
    samples_per_font: images per (class, font).
    image_size: output side in pixels.
    fonts: font file names from matplotlib's ``mpl-data/fonts/ttf`` to render.
    scripts: alphabets to draw classes from.
    letters: explicit candidate letters (a subset of the scripts' letters) instead of all of them.
    render_seed: seed of the jitter.
    max_rotation: degrees, uniform in [-max, max].
    max_scale: relative, scale uniform in [1 - max, 1 + max].
    max_shear: horizontal shear factor, uniform in [-max, max].
    max_translation: fraction of the image side, uniform in [-max, max] per axis.
    max_stroke: extra stroke width in super-sampled pixels, integer uniform in [0, max] (bold
      faces: [0, max // 2]).
    min_contrast: ink intensity uniform in [min, 1].
    max_noise: Gaussian noise standard deviation uniform in [0, max].
    merge_threshold: relative pixel distance under which two renders count as identical.
    merge_min_fraction: fraction of the default fonts in which look-alikes must be identical.
  """
  samples_per_font: int = 5
  image_size: int = 32
  fonts: tuple = DEFAULT_FONTS
  scripts: tuple = SCRIPTS
  letters: tuple = None
  render_seed: int = 0
  max_rotation: float = 12.0
  max_scale: float = 0.12
  max_shear: float = 0.2
  max_translation: float = 0.08
  max_stroke: int = 1
  min_contrast: float = 0.7
  max_noise: float = 0.08
  merge_threshold: float = 0.05
  merge_min_fraction: float = 0.5


def font_dir():
  import matplotlib  # local import: only glyphs need matplotlib
  return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")


def font_paths(fonts=DEFAULT_FONTS):
  """Absolute paths of the given matplotlib font files; ValueError naming missing ones."""
  directory = font_dir()
  paths = [os.path.join(directory, f) for f in fonts]
  missing = [f for f, p in zip(fonts, paths) if not os.path.isfile(p)]
  if missing:
    available = sorted(f for f in os.listdir(directory) if f.endswith(".ttf"))
    raise ValueError(f"Font files {missing} are not in {directory}; available: {available}.")
  return paths


def candidate_letters(scripts=SCRIPTS, letters=None):
  """[(letter, script)] in script order; ``letters`` restricts to a subset (order kept)."""
  unknown = [s for s in scripts if s not in _ALPHABETS]
  if unknown:
    raise ValueError(f"Unknown scripts {unknown}; valid: {list(_ALPHABETS)}.")
  out = [(ch, s) for s in scripts for ch in _ALPHABETS[s]]
  if letters is not None:
    known = {ch for ch, _ in out}
    bad = [ch for ch in letters if ch not in known]
    if bad:
      raise ValueError(f"Letters {bad} are not in the scripts {list(scripts)}.")
    wanted = set(letters)
    out = [(ch, s) for ch, s in out if ch in wanted]
  return out


def _load_fonts(paths, canvas):
  from PIL import ImageFont
  return [ImageFont.truetype(p, int(round(_FONT_SIZE * canvas))) for p in paths]


def _draw(font, char, canvas, stroke):
  """The letter on a black ``canvas`` square (PIL 'L' image), white ink, optional widening."""
  from PIL import Image, ImageDraw
  image = Image.new("L", (canvas, canvas), 0)
  ImageDraw.Draw(image).text((canvas / 2, _BASELINE * canvas), char, fill=255, font=font,
                             anchor="ms", stroke_width=int(stroke), stroke_fill=255)
  return image


def _downsample(image, size):
  from PIL import Image
  return image.resize((size, size), Image.BOX)


def clean_renders(chars, fonts=DEFAULT_FONTS, image_size=32):
  """[F, L, S, S] float32 un-jittered renders (the merge rule's input)."""
  canvas = image_size * _SUPERSAMPLE
  out = np.zeros((len(fonts), len(chars), image_size, image_size), np.float32)
  for f, font in enumerate(_load_fonts(font_paths(fonts), canvas)):
    for c, ch in enumerate(chars):
      out[f, c] = np.asarray(_downsample(_draw(font, ch, canvas, 0), image_size), np.float32) / 255
  return out


def confusable_groups(letters, renders, threshold=0.05, min_fraction=0.5):
  """Groups of cross-script look-alikes (see the module docstring for the rule).

  Args:
    letters: [(letter, script)] of length L.
    renders: [F, L, S, S] clean renders.
    threshold: relative pixel distance below which two renders are identical in a font.
    min_fraction: fraction of fonts in which they must be identical to merge.

  Returns:
    List of groups (lists of indices into ``letters``, ascending) with at least two members.
  """
  from scipy.spatial.distance import cdist  # scipy comes with scikit-learn
  x = renders.reshape(renders.shape[0], renders.shape[1], -1).astype(np.float64)
  ink = np.maximum(x.mean(-1), 1e-6)                                   # [F, L]
  dist = np.stack([cdist(xf, xf, "cityblock") for xf in x]) / x.shape[-1]  # [F, L, L] mean |a - b|
  rel = dist / np.maximum(ink[:, :, None], ink[:, None, :])
  same = (rel < threshold).mean(0) >= min_fraction                     # [L, L]
  scripts = np.array([s for _, s in letters])
  same &= scripts[:, None] != scripts[None, :]
  parent = list(range(len(letters)))

  def find(i):
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  for i, j in zip(*np.nonzero(np.triu(same, 1))):
    a, b = find(i), find(j)
    if a != b:
      parent[max(a, b)] = min(a, b)
  groups = {}
  for i in range(len(letters)):
    groups.setdefault(find(i), []).append(i)
  return [g for g in groups.values() if len(g) > 1]


def class_list(config: GlyphConfig = GlyphConfig()):
  """The classes after merging: [(candidate index, representative letter, name)], plus the groups.

  The candidate index (position among all letters of the configured scripts) seeds the class's
  jitter, so a class renders the same whatever other classes are selected.
  """
  letters = candidate_letters(config.scripts)
  if config.letters is not None:
    keep = set(config.letters)
    candidate_letters(config.scripts, config.letters)  # validates
  else:
    keep = {ch for ch, _ in letters}
  selected = [i for i, (ch, _) in enumerate(letters) if ch in keep]
  chars = [letters[i][0] for i in selected]
  renders = clean_renders(chars, DEFAULT_FONTS, config.image_size)
  groups = confusable_groups([letters[i] for i in selected], renders, config.merge_threshold,
                             config.merge_min_fraction)
  drop, names = set(), {}
  for g in groups:
    names[g[0]] = "/".join(chars[i] for i in g)
    drop.update(g[1:])
  classes = [(selected[i], chars[i], names.get(i, chars[i]))
             for i in range(len(selected)) if i not in drop]
  merged = [[chars[i] for i in g] for g in groups]
  return classes, merged


def _render_sample(font, char, canvas, size, rng, config, stroke_cache, max_stroke):
  from PIL import Image
  stroke = int(rng.integers(0, max_stroke + 1))
  key = (id(font), char, stroke)
  if key not in stroke_cache:
    stroke_cache[key] = _draw(font, char, canvas, stroke)
  base = stroke_cache[key]
  angle = np.deg2rad(rng.uniform(-config.max_rotation, config.max_rotation))
  scale = rng.uniform(1 - config.max_scale, 1 + config.max_scale)
  shear = rng.uniform(-config.max_shear, config.max_shear)
  shift = rng.uniform(-config.max_translation, config.max_translation, 2) * canvas
  cos, sin = np.cos(angle), np.sin(angle)
  forward = np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, shear], [0.0, 1.0]]) * scale
  inverse = np.linalg.inv(forward)
  centre = np.array([canvas / 2, canvas / 2])
  # PIL maps each output pixel p to the input pixel inverse @ (p - centre - shift) + centre.
  offset = centre - inverse @ (centre + shift)
  data = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])
  warped = base.transform((canvas, canvas), Image.AFFINE, data, resample=Image.BILINEAR)
  x = np.asarray(_downsample(warped, size), np.float32) / 255
  x = x * rng.uniform(config.min_contrast, 1.0)
  x = x + rng.normal(0.0, rng.uniform(0.0, config.max_noise), x.shape)
  return np.round(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)


def generate_glyphs(config: GlyphConfig = GlyphConfig()):
  """Renders the data set (no caching).

  Returns:
    dict with ``images`` [N, S, S] uint8, ``labels`` [N] int32 (class index), ``fonts`` [N] int16
    (index into ``config.fonts``), ``class_names`` [K] str, ``candidate_index`` [K] int32 and
    ``merged`` (one "/"-joined string per merged group).
  """
  if config.samples_per_font < 1 or config.image_size < 8:
    raise ValueError(f"samples_per_font must be >= 1 and image_size >= 8, got "
                     f"{config.samples_per_font} and {config.image_size}.")
  classes, merged = class_list(config)
  size, canvas = config.image_size, config.image_size * _SUPERSAMPLE
  fonts = _load_fonts(font_paths(config.fonts), canvas)
  total = len(classes) * len(fonts) * config.samples_per_font
  images = np.empty((total, size, size), np.uint8)
  labels = np.empty(total, np.int32)
  font_ids = np.empty(total, np.int16)
  n = 0
  for k, (cand, char, _) in enumerate(classes):
    stroke_cache = {}
    for f, font in enumerate(fonts):
      font_index = DEFAULT_FONTS.index(config.fonts[f]) if config.fonts[f] in DEFAULT_FONTS else f
      rng = np.random.default_rng([config.render_seed, cand, font_index])
      # Widening a bold face's strokes fills the counters of small letters (e, a, phi): halve it.
      max_stroke = config.max_stroke // 2 if "Bol" in config.fonts[f] else config.max_stroke
      for _ in range(config.samples_per_font):
        images[n] = _render_sample(font, char, canvas, size, rng, config, stroke_cache,
                                   max_stroke)
        labels[n], font_ids[n] = k, f
        n += 1
  return {"images": images, "labels": labels, "fonts": font_ids,
          "class_names": np.array([name for _, _, name in classes]),
          "candidate_index": np.array([c for c, _, _ in classes], np.int32),
          "merged": np.array(["/".join(g) for g in merged])}


def default_cache_dir():
  root = os.environ.get("DMLJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dmljax")
  return os.path.join(root, "glyphs")


def _cache_key(config: GlyphConfig):
  params = dataclasses.asdict(config)
  params["version"] = _FORMAT_VERSION
  params["font_bytes"] = [os.path.getsize(p) for p in font_paths(config.fonts)]
  blob = json.dumps(params, sort_keys=True, ensure_ascii=True, default=list)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load_cache(path, key):
  try:
    with np.load(path, allow_pickle=False) as z:
      data = {k: z[k] for k in z.files}
  except Exception as e:  # zip/npz errors come in several types
    raise ValueError(f"Glyph cache file {path} is corrupt ({type(e).__name__}: {e}); delete it and "
                     "run again to regenerate.") from e
  needed = {"images", "labels", "fonts", "class_names", "candidate_index", "merged", "key"}
  if needed - set(data) or str(data["key"]) != key:
    raise ValueError(f"Glyph cache file {path} is incomplete or was made with other parameters; "
                     "delete it and run again to regenerate.")
  return data


def load_glyphs(*, seed=0, cache_dir=None, train_fraction=0.6, val_fraction=0.2,
                test_fraction=0.2, **generation):
  """Loads (rendering and caching on first use) the glyphs data set, split by class.

  Args:
    seed: seed of the random class partition into train/val/test.
    cache_dir: directory of the ``.npz`` cache; default :func:`default_cache_dir`.
    train_fraction, val_fraction, test_fraction: class fractions of the splits (sum to 1).
    **generation: fields of :class:`GlyphConfig` (e.g. ``samples_per_font=2``, ``letters="ABab"``,
      ``fonts=("DejaVuSans.ttf",)``).

  Returns:
    A :class:`Dataset` with [N, S, S, 1] float32 images in [0, 1]; ``info`` has the cache file, the
    generation config, the merged groups, the generation time (0 on a cache hit) and per-split font
    indices (``info["fonts"][split]``).
  """
  valid = {f.name for f in dataclasses.fields(GlyphConfig)}
  unknown = sorted(set(generation) - valid)
  if unknown:
    raise ValueError(f"Unknown glyphs options {unknown}; valid: seed, cache_dir, train_fraction, "
                     f"val_fraction, test_fraction, {sorted(valid)}.")
  for name in ("fonts", "scripts", "letters"):
    if generation.get(name) is not None:
      generation[name] = tuple(generation[name])
  config = GlyphConfig(**generation)
  key = _cache_key(config)
  cache_dir = cache_dir or default_cache_dir()
  path = os.path.join(cache_dir, f"glyphs-{key}.npz")
  seconds = 0.0
  if os.path.exists(path):
    data = _load_cache(path, key)
  else:
    start = time.perf_counter()
    data = generate_glyphs(config)
    seconds = time.perf_counter() - start
    data["key"] = np.array(key)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as fh:  # write then rename: a killed run never leaves a half file
      np.savez_compressed(fh, **data)
    os.replace(tmp, path)
  names = {k: str(n) for k, n in enumerate(data["class_names"])}
  groups = partition_classes(np.arange(len(names)), {"train": train_fraction, "val": val_fraction,
                                                     "test": test_fraction}, seed)
  images = data["images"][..., None]
  labels = data["labels"]
  splits, fonts = {}, {}
  for split, classes in groups.items():
    selected = np.isin(labels, classes)
    split_images = images[selected].astype(np.float32) / 255.0
    splits[split] = _make_split(split_images, labels[selected], names)
    fonts[split] = data["fonts"][selected]
  info = {"cache_file": path, "config": dataclasses.asdict(config), "generation_seconds": seconds,
          "merged": [str(m) for m in data["merged"]], "num_classes_total": len(names),
          "fonts": fonts, "class_groups": groups}
  size = config.image_size
  return Dataset(name="glyphs", splits=splits, image_shape=(size, size, 1), info=info)


def save_contact_sheet(images, path, labels=None, per_class=8, max_classes=None, scale=2):
  """Writes a PNG grid (one row per class, ``per_class`` samples) for eyeballing the data.

  Args:
    images: [N, H, W] or [N, H, W, 1] in [0, 1] (float) or 0..255 (uint8).
    path: output PNG file.
    labels: [N] labels; rows are classes in label order. None: plain grid of the first images.
    per_class: columns.
    max_classes: rows (None: all classes).
    scale: pixel magnification.
  """
  from PIL import Image
  images = np.asarray(images)
  if images.ndim == 4:
    images = images[..., 0]
  if images.dtype != np.uint8:
    images = np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)
  if labels is None:
    rows = [np.arange(i, min(i + per_class, len(images))) for i in range(0, len(images), per_class)]
  else:
    rows = [np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)]
  rows = rows[:max_classes]
  h, w = images.shape[1:]
  sheet = np.full((len(rows) * (h + 1), per_class * (w + 1)), 128, np.uint8)
  for r, idx in enumerate(rows):
    for c, i in enumerate(idx):
      sheet[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = images[i]
  Image.fromarray(sheet).resize((sheet.shape[1] * scale, sheet.shape[0] * scale),
                                Image.NEAREST).save(path)
