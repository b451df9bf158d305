"""Host-side image decoding and augmentation (numpy, OpenCV or PIL; deterministic).

A record's image is either raw file bytes (JPEG, PNG, ...) decoded here to ``uint8 [H, W, 3]`` RGB,
or an already decoded ``uint8`` array. Three transforms (:class:`TransformConfig`'s ``kind``):

* ``"none"``: the image as decoded (or as stored), no resizing;
* ``"eval"``: shorter side to ``resize`` (256), centre crop ``size`` x ``size`` (227);
* ``"train"``: the Musgrave et al. protocol: shorter side to ``resize``, a random resized crop to
  ``size`` x ``size`` (area fraction in ``scale`` = [0.16, 1], aspect ratio in ``ratio`` =
  [3/4, 4/3] drawn log-uniformly, 10 tries, then a centre crop of the clamped aspect ratio, as
  torchvision's ``RandomResizedCrop``), then a horizontal flip with probability 1/2 (``flip``).

With ``crop_to_bbox`` the image is first cropped to the record's bounding box (``bbox``: float32
``[x1, y1, x2, y2]`` in pixels of the full image), as the bbox-cropped CUB/Cars variants do; the
transform then treats the box as the whole image.

Geometry follows torchvision: ``Resize(256)`` maps the shorter side to 256 and the longer one to
``int(256 * long / short)``; the centre crop starts at ``round((H - size) / 2)``. The resampling is
bilinear and antialiased (:func:`resize`), done by :data:`RESIZER`: "pil" is exactly
torchvision's resampling of PIL images (PIL's ``BILINEAR``); "cv2", the default where OpenCV is
installed (``opencv-python-headless``), is OpenCV's bilinear interpolation behind a small Gaussian
prefilter on reduced axes, several times faster and within about 0.4 grey levels of PIL on average.

Speed-ups that do not change what is computed (up to resampling):
  * JPEGs are decoded at a reduced DCT scale (1/2, 1/4, 1/8) whenever the reduced image (or its
    bounding box) still has a shorter side of at least ``resize``: the decode never goes below the
    resolution that the resize to ``resize`` keeps. Bounding boxes are rescaled by the exact
    factor of the reduced decode.
  * The train crop box is sampled in the coordinates of the decoded image and only that crop is
    resized to ``size`` x ``size``, instead of resizing the whole image to shorter side ``resize``
    first and cropping there. The two have the same distribution of crops: the resize to shorter
    side ``resize`` is a uniform rescale (up to the rounding of the long side to whole pixels),
    and the area fraction, the aspect ratio and the relative position of a crop are all invariant
    under a uniform rescale, so sampling them in either coordinate system gives the same crop of
    the scene. The pixels differ only in the resampling: one bilinear (antialiased) resampling of
    the decoded image instead of two (decoded -> 256 -> crop -> 227), i.e. slightly sharper, and
    the cost of resizing the whole image is saved. The crop is a view of the decoded array (no
    copy) that the resizer reads directly; the flip mirrors the small output.
  * The DCT reduction is chosen from the whole image (or box), not from the sampled crop: that
    would gain nothing under the rule above. A crop spanning some fraction of the image's sides
    spans the same fractions of the decoded image and of the protocol's resized one, so the
    decoded crop has at least the protocol's resolution exactly when the decoded image has a
    shorter side >= ``resize``, whatever the crop. Only a looser rule (decoded crop >= ``size``
    pixels) would decode smaller, and it would lose detail that the protocol's image still has.

Randomness: every image draws from its own ``np.random.default_rng([seed, tag, step, slot])``
(:func:`augment_rng`), where ``slot`` is the image's position in the *global* batch of ``step``;
the result depends on nothing else (not on the worker, the process or what was drawn before).
Either resizer is deterministic (integer arithmetic); as with any image library, its exact pixels
may change between library versions.
Pixel normalisation is the backbone's (on device), not done here.
"""
import dataclasses
import io
import math
import os

import numpy as np
from PIL import Image

try:  # libjpeg-turbo with DCT-domain scaling; PIL's decoder (also DCT-scaled via draft) otherwise
  import simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
  simplejpeg = None

try:  # the fast resampling; PIL's (exactly torchvision's) otherwise
  import cv2
except ImportError:  # pragma: no cover - depends on the environment
  cv2 = None
else:
  # The pipeline spreads images over threads / worker processes already; OpenCV's own thread
  # pool would only oversubscribe the cores.
  cv2.setNumThreads(1)

__all__ = [
    "TRANSFORM_KINDS", "TransformConfig", "DECODER", "RESIZERS", "RESIZER", "augment_rng",
    "image_size", "decode", "decode_scaled", "bbox_region", "resized_shape", "center_crop_box",
    "sample_crop_box", "sample_augmentation", "resize", "eval_transform", "train_transform",
    "transform_image", "transform_record",
]

TRANSFORM_KINDS = ("none", "train", "eval")

#: The JPEG decoder in use: "simplejpeg" (libjpeg-turbo) when importable, else "pil".
DECODER = "simplejpeg" if simplejpeg is not None else "pil"

RESIZERS = ("cv2", "pil")

#: The default resampling of the train and eval transforms (:func:`resize`), used where
#: ``TransformConfig.resizer`` is None: the environment variable ``DMLJAX_RESIZER`` if set, else
#: "cv2" (OpenCV) when importable, else "pil". Read at every call; assigning it changes this
#: process only, whereas loader worker processes import the module afresh: to switch a loader
#: with workers, set ``TransformConfig.resizer`` (it travels with the config) or the environment
#: variable (inherited by the workers) before the loader starts.
RESIZER = os.environ.get("DMLJAX_RESIZER") or ("cv2" if cv2 is not None else "pil")

#: Smallest Gaussian prefilter the "cv2" resizer applies (see :func:`_prefilter`); reductions up to
#: ``sqrt(1 + 4 * 0.3**2)`` = 1.17 are left to plain bilinear interpolation.
_MIN_PREFILTER_SIGMA = 0.3

_TAG_AUGMENT = 11  # stream tag of the augmentation randomness
_JPEG_MAGIC = b"\xff\xd8\xff"
_REDUCTIONS = (8, 4, 2)  # DCT-domain scale reductions, largest first


def _is_pair(value):
  return (isinstance(value, (tuple, list, np.ndarray)) and len(value) == 2
          and all(isinstance(v, (int, float, np.integer, np.floating))
                  and not isinstance(v, bool) for v in value))


@dataclasses.dataclass(frozen=True)
class TransformConfig:
  """Options of the host transform; see the module docstring.

  Attributes:
    kind: "none" (decode only), "train" (random resized crop + flip) or "eval" (resize + centre
      crop).
    size: output side (227 for the BN-Inception tables, 224 for the ResNet ones).
    resize: shorter side before the (centre or random) crop; also the resolution a reduced-scale
      JPEG decode keeps at least. Must be >= ``size`` for "eval".
    scale: ``(lo, hi)`` area fraction of the random crop, ``0 < lo <= hi <= 1``.
    ratio: ``(lo, hi)`` aspect ratio (width / height) of the random crop, ``0 < lo <= hi``.
    flip: random horizontal flip (p = 1/2) in "train".
    crop_to_bbox: crop to the record's bounding box first ("train" and "eval").
    resizer: the resampling of "train" and "eval", "cv2" or "pil" (see :func:`resize`); None for
      the process's default, :data:`RESIZER`.
  """

  kind: str = "none"
  size: int = 227
  resize: int = 256
  scale: tuple = (0.16, 1.0)
  ratio: tuple = (3.0 / 4.0, 4.0 / 3.0)
  flip: bool = True
  crop_to_bbox: bool = False
  resizer: str = None

  def __post_init__(self):
    def bad(key, why):
      return ValueError(f"TransformConfig: bad value for key `{key}`: {getattr(self, key)!r} "
                        f"({why}).")

    if self.kind not in TRANSFORM_KINDS:
      raise bad("kind", f"must be one of {TRANSFORM_KINDS}")
    for key in ("size", "resize"):
      value = getattr(self, key)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise bad(key, "must be a positive integer")
      object.__setattr__(self, key, int(value))
    if self.kind == "eval" and self.resize < self.size:
      raise bad("resize", f"the eval centre crop needs resize >= size = {self.size}")
    for key in ("scale", "ratio"):
      value = getattr(self, key)
      if not _is_pair(value):
        raise bad(key, "must be a pair of numbers (lo, hi)")
      lo, hi = float(value[0]), float(value[1])
      if not 0 < lo <= hi or (key == "scale" and hi > 1):
        raise bad(key, "need 0 < lo <= hi" + (" <= 1" if key == "scale" else ""))
      object.__setattr__(self, key, (lo, hi))
    for key in ("flip", "crop_to_bbox"):
      if not isinstance(getattr(self, key), (bool, np.bool_)):
        raise bad(key, "must be a boolean")
      object.__setattr__(self, key, bool(getattr(self, key)))
    if self.resizer is not None and self.resizer not in RESIZERS:
      raise bad("resizer", f"must be None or one of {RESIZERS}")

  @classmethod
  def from_dict(cls, options):
    """Builds a config from a mapping (e.g. ``config.data.transform.to_dict()``).

    Raises:
      ValueError: for an unknown key (named in the message) or a bad value.
    """
    options = dict(options)
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in options:
      if key not in valid:
        raise ValueError(f"TransformConfig: unknown key `{key}`; valid keys: {valid}.")
    return cls(**options)

  def to_dict(self):
    """Plain JSON-able dict (pairs as lists) that :meth:`from_dict` accepts."""
    out = dataclasses.asdict(self)
    out["scale"], out["ratio"] = list(self.scale), list(self.ratio)
    return out

  def replace(self, **changes):
    """A copy with some options changed (validated again)."""
    return dataclasses.replace(self, **changes)

  @property
  def decode_min_side(self):
    """Shorter side a reduced-scale decode must keep (None: decode at full resolution)."""
    return None if self.kind == "none" else self.resize


def augment_rng(seed, step, slot):
  """The random generator of image ``slot`` of the global batch of ``step``."""
  return np.random.default_rng([int(seed), _TAG_AUGMENT, int(step), int(slot)])


# ============================================================================= decoding


def image_size(data):
  """``(height, width)`` of an encoded image, read from its header only."""
  if simplejpeg is not None and data[:3] == _JPEG_MAGIC:
    try:
      height, width = simplejpeg.decode_jpeg_header(data)[:2]
      return int(height), int(width)
    except ValueError:
      pass
  with Image.open(io.BytesIO(data)) as im:
    return im.height, im.width


def _reduction(height, width, min_side, bbox):
  """Largest DCT reduction ``s`` keeping the image (or ``bbox``) at shorter side >= min_side."""
  if not min_side:
    return 1
  if bbox is not None:
    x1, y1, x2, y2 = _clamp_bbox(bbox, height, width)
    need_h, need_w = (y2 - y1), (x2 - x1)   # the crop is at least (extent / s) after rounding
    for s in _REDUCTIONS:
      if need_h / s >= min_side and need_w / s >= min_side:
        return s
    return 1
  for s in _REDUCTIONS:
    if -(-height // s) >= min_side and -(-width // s) >= min_side:
      return s
  return 1


def _scale_of(orig_hw, out_hw, reduction):
  """Per-axis factor (decoded / original): exactly ``1 / reduction`` when the decoder used it."""
  if tuple(out_hw) == (-(-orig_hw[0] // reduction), -(-orig_hw[1] // reduction)):
    return (1.0 / reduction, 1.0 / reduction)
  return (out_hw[0] / orig_hw[0], out_hw[1] / orig_hw[1])


def _decode_pil(data, min_side, bbox):
  with Image.open(io.BytesIO(data)) as im:
    orig = (im.height, im.width)
    reduction = _reduction(*orig, min_side, bbox) if im.format == "JPEG" else 1
    if reduction > 1:
      # draft() decodes at the largest power-of-two reduction s <= min(W // w, H // h) of the
      # requested (w, h); asking for (W // r, H // r) gives s = r for any image of >= r^2 pixels.
      im.draft("RGB", (max(1, orig[1] // reduction), max(1, orig[0] // reduction)))
      got = (im.height, im.width)
      reduction = next((s for s in (8, 4, 2, 1)
                        if got == (-(-orig[0] // s), -(-orig[1] // s))), 0)
      if reduction == 0 or _reduction(*orig, min_side, bbox) < reduction:  # tiny image: no draft
        return _decode_pil_full(data)
    rgb = im.convert("RGB") if im.mode != "RGB" else im
    array = np.asarray(rgb)
  return array, _scale_of(orig, array.shape[:2], reduction)


def _decode_pil_full(data):
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im.convert("RGB")), (1.0, 1.0)


def decode_scaled(data, min_side=None, bbox=None):
  """Decodes image bytes to ``uint8 [H, W, 3]`` RGB, at a reduced scale where allowed.

  Args:
    data: encoded file bytes (JPEG, PNG, or anything PIL reads); grayscale, CMYK, palette and
      alpha images are converted to RGB.
    min_side: None or 0 to decode at full resolution; else a JPEG may be decoded at 1/2, 1/4 or
      1/8 scale (DCT domain, the fastest decode) as long as the result's shorter side (or, with
      ``bbox``, the shorter side of the box) stays >= ``min_side``. Never below the target.
    bbox: optional ``[x1, y1, x2, y2]`` in pixels of the full image whose extent ``min_side``
      refers to (for a crop to the box after decoding).

  Returns:
    ``(image, (scale_y, scale_x))``: the decoded array and the factor from full-image pixel
    coordinates to decoded ones (``(1.0, 1.0)`` at full resolution); multiply bounding boxes by it.
  """
  data = bytes(data) if not isinstance(data, bytes) else data
  if simplejpeg is not None and data[:3] == _JPEG_MAGIC:
    try:
      height, width = simplejpeg.decode_jpeg_header(data)[:2]
      reduction = _reduction(height, width, min_side, bbox)
      sizes = {}
      if reduction > 1:
        sizes = {"min_height": -(-height // reduction), "min_width": -(-width // reduction)}
      array = simplejpeg.decode_jpeg(data, colorspace="RGB", **sizes)
      return array, _scale_of((height, width), array.shape[:2], reduction)
    except ValueError:  # unusual JPEG flavour: PIL's decoder may still read it
      pass
  return _decode_pil(data, min_side, bbox)


def decode(data, min_side=None):
  """Decodes image bytes to ``uint8 [H, W, 3]`` RGB; see :func:`decode_scaled`."""
  return decode_scaled(data, min_side)[0]


# ============================================================================= geometry


def _clamp_bbox(bbox, height, width):
  """Integer box ``(x1, y1, x2, y2)`` covering ``bbox``, inside the image, at least 1 x 1."""
  x1, y1, x2, y2 = (float(v) for v in np.asarray(bbox, np.float64).reshape(4))
  x1 = min(max(int(math.floor(x1)), 0), width - 1)
  y1 = min(max(int(math.floor(y1)), 0), height - 1)
  x2 = min(max(int(math.ceil(x2)), x1 + 1), width)
  y2 = min(max(int(math.ceil(y2)), y1 + 1), height)
  return x1, y1, x2, y2


def bbox_region(bbox, scale, height, width):
  """The pixel box ``(x1, y1, x2, y2)`` of a full-image ``bbox`` in an image decoded at ``scale``
  (``(scale_y, scale_x)`` from :func:`decode_scaled`) of size ``height`` x ``width``."""
  sy, sx = scale
  x1, y1, x2, y2 = np.asarray(bbox, np.float64).reshape(4)
  return _clamp_bbox([x1 * sx, y1 * sy, x2 * sx, y2 * sy], height, width)


def resized_shape(height, width, short):
  """``(h, w)`` after resizing the shorter side to ``short`` (torchvision ``Resize(int)``)."""
  if height <= width:
    return short, int(short * width / height)
  return int(short * height / width), short


def center_crop_box(height, width, size):
  """``(top, left)`` of the centred ``size`` x ``size`` crop (torchvision ``CenterCrop``)."""
  return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def sample_crop_box(rng, height, width, scale=(0.16, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0),
                    attempts=10):
  """A random resized crop box ``(top, left, h, w)`` of a ``height`` x ``width`` image.

  Up to ``attempts`` proposals: area ``U(scale) * H * W`` and aspect ratio (w / h) drawn
  log-uniformly in ``ratio``; the first one that fits is placed uniformly at random. If none fits,
  the largest centred box whose aspect ratio is ``W / H`` clamped to ``ratio``.
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(attempts):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  aspect = width / height
  if aspect < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif aspect > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def sample_augmentation(rng, height, width, cfg):
  """``((top, left, h, w), flip)`` of the train transform for a ``height`` x ``width`` image."""
  box = sample_crop_box(rng, height, width, cfg.scale, cfg.ratio)
  flip = bool(rng.random() < 0.5) if cfg.flip else False
  return box, flip


# ============================================================================= transforms


def _check_image(image):
  """``image`` as a uint8 ``[H, W]`` / ``[H, W, C]`` (C = 1 or 3) array, and its channel count."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"images must be uint8, got {image.dtype}.")
  if image.ndim == 2:
    return image, 0
  if image.ndim == 3 and image.shape[2] in (1, 3):
    return image, image.shape[2]
  raise ValueError(f"images must be [H, W], [H, W, 1] or [H, W, 3], got shape {image.shape}.")


def _as_hwc(image):
  """``image`` checked and as ``[H, W, C]`` (a 2-D image becomes a ``[H, W, 1]`` view)."""
  image, channels = _check_image(image)
  return image[:, :, None] if channels == 0 else image


def _to_pil(image):
  """A PIL image of (a copy of) ``image`` (2-D or ``[h, w, 1|3]``, already checked)."""
  image = np.ascontiguousarray(image)
  if image.ndim == 3 and image.shape[2] == 1:
    image = image[:, :, 0]
  return Image.fromarray(image, "L" if image.ndim == 2 else "RGB")


def _with_channels(array, channels):
  """``array`` with the channel layout of the input: 2-D for 0, ``[h, w, C]`` otherwise."""
  if channels == 0:
    return array.reshape(array.shape[:2])
  return array.reshape(array.shape[0], array.shape[1], channels)


def _prefilter(reduction):
  """``(ksize, sigma)`` of the Gaussian blur before the bilinear interpolation along one axis.

  Reducing by ``f``, PIL's antialiased bilinear filter is a triangle of half-width ``f`` source
  pixels (variance ``f**2 / 6``), while bilinear interpolation alone is one of half-width 1
  (variance 1/6). A Gaussian of ``sigma**2 = (f**2 - 1) / 4`` in front widens the latter to about
  the former; that is a little more than the bare gap in variance, ``(f**2 - 1) / 6``, which
  matched PIL's output less closely on photos. The kernel has 3 taps while ``sigma < 1``, else
  ``2 * ceil(2 * sigma) + 1``. An enlarged axis, or a reduction whose ``sigma`` is under
  :data:`_MIN_PREFILTER_SIGMA` (outer taps below 0.4 %), gets ``(1, 0.0)``: no blur.
  """
  if reduction <= 1.0:
    return 1, 0.0
  sigma = 0.5 * math.sqrt(reduction * reduction - 1.0)
  if sigma < _MIN_PREFILTER_SIGMA:
    return 1, 0.0
  return (3 if sigma < 1.0 else 2 * math.ceil(2.0 * sigma) + 1), sigma


def _resize_cv2(image, width, height):
  """OpenCV resize of a checked uint8 image (2-D or ``[h, w, C]``); 2-D output for one channel."""
  kx, sx = _prefilter(image.shape[1] / width)
  ky, sy = _prefilter(image.shape[0] / height)
  if kx > 1 or ky > 1:
    image = cv2.GaussianBlur(image, (kx, ky), sigmaX=max(sx, 1e-3), sigmaY=max(sy, 1e-3))
  return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


def resize(image, width, height, resizer=None):
  """Bilinear, antialiased resize of a uint8 image (any view of one) to ``height`` x ``width``.

  "pil" is PIL's ``BILINEAR``: a triangle filter stretched by the reduction factor (antialiased),
  which is how torchvision resamples PIL images. "cv2" approximates it with OpenCV at a fraction of
  the cost: bilinear interpolation (``INTER_LINEAR``, the same as PIL's when enlarging, up to
  rounding), preceded on each reduced axis by a small Gaussian blur that widens the interpolation
  kernel to about PIL's (:func:`_prefilter`), so that reductions do not alias. On photo-like
  crops resized to 227 the two differ by about 0.4 grey levels on average; pixels on sharp,
  high-contrast edges by up to ~20.

  Args:
    image: uint8 ``[H, W]``, ``[H, W, 1]`` or ``[H, W, 3]`` (a strided view, e.g. a crop, is fine).
    width: output width.
    height: output height.
    resizer: "cv2" or "pil"; None for :data:`RESIZER`.

  Returns:
    uint8 array with ``image``'s channel layout.

  Raises:
    ValueError: for a bad image, an unknown resizer, or "cv2" without OpenCV.
  """
  image, channels = _check_image(image)
  resizer = RESIZER if resizer is None else resizer
  if resizer == "cv2":
    if cv2 is None:
      raise ValueError("resizer 'cv2' needs OpenCV (pip install opencv-python-headless).")
    return _with_channels(_resize_cv2(image, int(width), int(height)), channels)
  if resizer != "pil":
    raise ValueError(f"unknown resizer {resizer!r}; expected one of {RESIZERS}.")
  out = np.asarray(_to_pil(image).resize((int(width), int(height)), Image.BILINEAR))
  return _with_channels(out, channels)


def _flip(image):
  """Horizontal mirror as a new contiguous array (OpenCV copies it several times faster)."""
  if cv2 is not None:
    return _with_channels(cv2.flip(image, 1), 0 if image.ndim == 2 else image.shape[2])
  return np.ascontiguousarray(image[:, ::-1])


def eval_transform(image, cfg, region=None):
  """Shorter side to ``cfg.resize``, centre crop ``cfg.size``: ``uint8 [size, size, C]``.

  ``region``: optional ``(x1, y1, x2, y2)`` pixel box the image is first cropped to. With the
  "pil" resizer this is exactly torchvision's ``Resize(resize)`` + ``CenterCrop(size)``; with
  "cv2" it differs only by the resampling (see :func:`resize`).
  """
  image = _as_hwc(image)
  if region is not None:
    x1, y1, x2, y2 = region
    image = image[y1:y2, x1:x2]
  h, w = resized_shape(image.shape[0], image.shape[1], cfg.resize)
  top, left = center_crop_box(h, w, cfg.size)
  out = resize(image, w, h, cfg.resizer)
  return np.ascontiguousarray(out[top:top + cfg.size, left:left + cfg.size])


def train_transform(image, rng, cfg, region=None):
  """Random resized crop to ``cfg.size`` and random flip: ``uint8 [size, size, C]``.

  The crop box is drawn in the coordinates of ``image`` (or of ``region`` of it) and only the crop
  is resized (see the module docstring for why this equals resize-then-crop in distribution).
  """
  image = _as_hwc(image)
  x0, y0 = 0, 0
  height, width = image.shape[:2]
  if region is not None:
    x0, y0, x1, y1 = region
    height, width = y1 - y0, x1 - x0
  (top, left, h, w), flip = sample_augmentation(rng, height, width, cfg)
  crop = image[y0 + top:y0 + top + h, x0 + left:x0 + left + w]   # a view: nothing is copied
  out = resize(crop, cfg.size, cfg.size, cfg.resizer)
  return _flip(out) if flip else out


def transform_image(image, cfg, rng=None, region=None):
  """Applies ``cfg`` to a decoded image (``rng`` is needed by "train")."""
  if cfg.kind == "train":
    if rng is None:
      raise ValueError("the train transform needs a random generator (augment_rng).")
    return train_transform(image, rng, cfg, region)
  if cfg.kind == "eval":
    return eval_transform(image, cfg, region)
  if region is not None:
    x1, y1, x2, y2 = region
    image = image[y1:y2, x1:x2]
  return np.asarray(image)


def transform_record(record, cfg, rng=None):
  """Decodes (if needed) and transforms one record.

  Args:
    record: a dict with ``image`` (encoded bytes or a uint8 array) and, for ``crop_to_bbox``,
      ``bbox`` (``[x1, y1, x2, y2]`` in pixels of the full image); or a bare uint8 array.
    cfg: a :class:`TransformConfig`.
    rng: the image's generator (:func:`augment_rng`), needed by "train".

  Returns:
    ``uint8 [size, size, C]`` ("train", "eval"), or the decoded image ("none").
  """
  if isinstance(record, dict):
    image, bbox = record["image"], record.get("bbox") if cfg.crop_to_bbox else None
  else:
    image, bbox = record, None
  if cfg.crop_to_bbox and bbox is None:
    raise ValueError("crop_to_bbox needs records with a `bbox` entry.")
  if isinstance(image, np.ndarray):
    scale = (1.0, 1.0)
  else:
    image, scale = decode_scaled(image, cfg.decode_min_side, bbox)
  region = None if bbox is None else bbox_region(bbox, scale, *np.shape(image)[:2])
  return transform_image(image, cfg, rng, region)
