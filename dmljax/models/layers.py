"""Building blocks shared by the imported backbones, written to reproduce PyTorch exactly.

* :func:`conv` — ``nn.Conv`` with explicit symmetric padding (PyTorch's ``padding=p``). Flax's
  ``"SAME"`` pads asymmetrically at stride 2 (more on the right), which shifts every window by
  one pixel against PyTorch, so it is never used here.
* :func:`max_pool`, :func:`avg_pool` — PyTorch's ``MaxPool2d`` / ``AvgPool2d`` semantics,
  including ``ceil_mode`` (output size rounded up, but the last window must start inside the
  input or its left padding) and ``count_include_pad``.
* :class:`BatchNorm` — BatchNorm with PyTorch's update rule (normalise with the biased batch
  variance, keep the unbiased one in the running average) and three freezing modes, its
  statistics always in float32.
* :func:`global_pool` — the pooling heads: ``avg``, ``max``, ``avg+max`` (their sum) and GeM.
* :class:`Preprocessing` — a backbone's pixel normalisation (channel order, range, mean, std),
  applied on device to uint8 images by :class:`dmljax.models.EmbeddingModel`.

Every layout is NHWC (Flax's); convolution kernels are HWIO.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

#: Compute dtypes selectable by ``config.model.dtype``.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
#: BatchNorm freezing modes selectable by ``config.model.freeze_bn``.
FREEZE_BN = ("none", "stats", "stats_and_affine")
#: Global pooling heads selectable by ``config.model.pooling``.
POOLINGS = ("avg", "max", "avg+max", "gem")

IntPair = Union[int, Sequence[int]]


#: ``config.model.dtype="auto"``: bfloat16 compute on an accelerator, float32 on CPU.
AUTO_DTYPE = "auto"


def auto_dtype(backend: Optional[str] = None) -> str:
  """The compute dtype ``"auto"`` stands for on ``backend`` (default: JAX's default backend).

  bfloat16 where an accelerator runs the model (GPU, TPU: their matrix units run it at twice the
  float32 rate or more); float32 on CPU, where XLA's bfloat16 convolutions are slower, not faster.
  Parameters, BatchNorm statistics, the embeddings and everything computed from them (losses,
  metrics, the proximal term) stay float32 either way.
  """
  backend = backend or jax.default_backend()
  return "float32" if backend == "cpu" else "bfloat16"


def dtype_name(dtype: Any, backend: Optional[str] = None) -> Any:
  """``dtype`` with ``"auto"`` resolved for ``backend`` (see :func:`auto_dtype`)."""
  return auto_dtype(backend) if dtype == AUTO_DTYPE else dtype


def resolve_dtype(dtype: Any):
  """``"float32"`` / ``"bfloat16"`` (or a jnp dtype, or None = float32) to a jnp dtype."""
  if dtype is None:
    return jnp.float32
  dtype = dtype_name(dtype)
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ValueError(f"Unknown dtype {dtype!r}; valid: {sorted(DTYPES)}.")
    return DTYPES[dtype]
  return dtype


def _pair(v: IntPair) -> tuple[int, int]:
  if isinstance(v, int):
    return (v, v)
  a, b = v
  return (int(a), int(b))


# ============================================================================= preprocessing


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """How a backbone expects its pixels, as the PyTorch model it was ported from.

  Attributes:
    channel_order: ``"RGB"`` or ``"BGR"``; images are stored RGB, so ``"BGR"`` reverses them.
    max_value: 1.0 for inputs in [0, 1], 255.0 for inputs in [0, 255].
    mean: per-channel mean, in ``channel_order``, on the ``max_value`` scale.
    std: per-channel std, same conventions.
  """
  channel_order: str = "RGB"
  max_value: float = 1.0
  mean: tuple[float, ...] = (0.0, 0.0, 0.0)
  std: tuple[float, ...] = (1.0, 1.0, 1.0)

  def normalize(self, images):
    """uint8 ``[B, H, W, 3]`` RGB images to the normalised float32 input of the backbone.

    (A method rather than ``__call__``: Flax would bind a callable class attribute of a module
    as a method.)
    """
    x = jnp.asarray(images).astype(jnp.float32)
    if self.channel_order == "BGR":
      x = x[..., ::-1]
    if self.max_value != 255.0:
      x = x * (self.max_value / 255.0)
    mean = jnp.asarray(self.mean, jnp.float32)
    inv_std = 1.0 / jnp.asarray(self.std, jnp.float32)
    return (x - mean) * inv_std


#: torchvision's ImageNet convention (RGB in [0, 1], ImageNet mean / std).
IMAGENET_RGB = Preprocessing("RGB", 1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
#: The Caffe convention of BN-Inception (BGR in [0, 255], mean subtracted, std 1).
CAFFE_BGR = Preprocessing("BGR", 255.0, (104.0, 117.0, 128.0), (1.0, 1.0, 1.0))


# ============================================================================= convolution


def conv(features: int, kernel_size: IntPair, *, strides: IntPair = 1, padding: IntPair = 0,
         use_bias: bool = True, dtype: Any = jnp.float32, name: Optional[str] = None) -> nn.Conv:
  """An ``nn.Conv`` laid out like ``torch.nn.Conv2d(kernel_size, stride, padding, bias)``.

  Args:
    features: output channels.
    kernel_size: int or (kh, kw).
    strides: int or (sh, sw).
    padding: int or (ph, pw), applied on both sides as PyTorch does.
    use_bias: whether the conv has a bias.
    dtype: compute dtype; parameters are always float32.
    name: module name (the PyTorch module name, see :mod:`dmljax.models.torch_import`).

  Returns:
    The (unbound) module, to be called on an NHWC array.
  """
  ph, pw = _pair(padding)
  return nn.Conv(features, _pair(kernel_size), strides=_pair(strides),
                 padding=((ph, ph), (pw, pw)), use_bias=use_bias, dtype=dtype,
                 param_dtype=jnp.float32,
                 kernel_init=variance_scaling(2.0, "fan_out", "normal"), name=name)


def variance_scaling(scale: float, mode: str, distribution: str):
  """``nn.initializers.variance_scaling(scale, mode, distribution)`` for a kernel whose last two
  axes are (inputs, outputs) (HWIO), with the random numbers drawn on the flattened shape.

  The values are the same bit for bit (jax's threefry numbers the elements in row-major order
  whatever the shape; ``tests/test_models.py`` checks it), but XLA:CPU compiles a flat draw
  several times faster than a 4-D one: a small CNN's ``init`` compiled in about 5x its time.
  """
  if mode not in ("fan_in", "fan_out", "fan_avg"):
    raise ValueError(f"invalid mode for variance scaling initializer: {mode}")

  def init(key, shape, dtype=jnp.float32):
    shape = tuple(int(d) for d in shape)
    receptive = math.prod(shape[:-2])
    fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
    denominator = {"fan_in": fan_in, "fan_out": fan_out,
                   "fan_avg": (fan_in + fan_out) / 2}[mode]
    variance = jnp.array(scale / denominator, dtype=dtype)
    flat = (math.prod(shape),)
    if distribution == "truncated_normal":
      stddev = jnp.sqrt(variance) / jnp.array(.87962566103423978, dtype)
      draws = jax.random.truncated_normal(key, -2, 2, flat, dtype) * stddev
    elif distribution == "normal":
      draws = jax.random.normal(key, flat, dtype) * jnp.sqrt(variance)
    elif distribution == "uniform":
      draws = jax.random.uniform(key, flat, dtype, -1) * jnp.sqrt(3 * variance)
    else:
      raise ValueError(f"invalid distribution for variance scaling initializer: {distribution}")
    return draws.reshape(shape)

  return init


# ============================================================================= pooling


def pool_output_size(size: int, window: int, stride: int, padding: int = 0,
                     ceil_mode: bool = False) -> int:
  """Output length of a PyTorch pooling layer along one axis (dilation 1).

  ``floor`` or ``ceil`` of ``(size + 2 * padding - window) / stride`` plus one; in ceil mode a
  last window that would start beyond the input and its left padding is dropped, as in
  PyTorch's ``pooling_output_shape``.
  """
  span = size + 2 * padding - window
  if span < 0:
    raise ValueError(f"pooling window {window} larger than the padded input "
                     f"{size} + 2 x {padding}.")
  out = (-(-span // stride) if ceil_mode else span // stride) + 1
  if ceil_mode and (out - 1) * stride >= size + padding:
    out -= 1
  return out


def _pool_geometry(size, window, stride, padding, ceil_mode):
  """(out, low pad, high pad) so that a VALID reduce_window gives exactly PyTorch's windows."""
  out = pool_output_size(size, window, stride, padding, ceil_mode)
  high = max(padding, (out - 1) * stride + window - size - padding)
  return out, padding, high


def _check_pool_args(window, padding):
  for k, p in zip(window, padding):
    if p > k // 2:
      raise ValueError(f"padding {p} must be at most half the window {k} (as in PyTorch).")


def max_pool(x, window: IntPair, stride: Optional[IntPair] = None, padding: IntPair = 0,
             ceil_mode: bool = False):
  """``torch.nn.MaxPool2d(window, stride, padding, ceil_mode=...)`` on NHWC ``x``.

  Padding (and the extra right / bottom margin of ceil mode) never wins the max.
  """
  window = _pair(window)
  stride = _pair(stride if stride is not None else window)
  padding = _pair(padding)
  _check_pool_args(window, padding)
  pads, outs = [(0, 0)], [x.shape[0]]
  for axis in range(2):
    o, lo, hi = _pool_geometry(x.shape[1 + axis], window[axis], stride[axis], padding[axis],
                               ceil_mode)
    pads.append((lo, hi))
    outs.append(o)
  pads.append((0, 0))
  # A Python-scalar identity lets JAX recognise reduce_window_max (differentiable).
  y = jax.lax.reduce_window(x, -float("inf"), jax.lax.max, (1,) + window + (1,),
                            (1,) + stride + (1,), pads)
  return y[:, :outs[1], :outs[2], :]


def _avg_divisor(size, window, stride, padding, out, count_include_pad):
  """Per-output-position number of elements PyTorch divides by, along one axis."""
  starts = np.arange(out) * stride - padding       # in input coordinates
  ends = np.minimum(starts + window, size + padding)  # PyTorch clips at the padded end first
  if count_include_pad:
    return (ends - starts).astype(np.float32)
  return (np.minimum(ends, size) - np.maximum(starts, 0)).astype(np.float32)


def avg_pool(x, window: IntPair, stride: Optional[IntPair] = None, padding: IntPair = 0,
             ceil_mode: bool = False, count_include_pad: bool = True):
  """``torch.nn.AvgPool2d(window, stride, padding, ceil_mode, count_include_pad)`` on NHWC ``x``.

  The sum is over the real input (zero padding); the divisor is what PyTorch uses: the window
  clipped to the symmetrically padded input with ``count_include_pad`` (the ceil-mode margin
  beyond it is not counted), the window clipped to the input without. Sums are in float32.
  """
  window = _pair(window)
  stride = _pair(stride if stride is not None else window)
  padding = _pair(padding)
  _check_pool_args(window, padding)
  pads, outs, divisors = [(0, 0)], [], []
  for axis in range(2):
    size = x.shape[1 + axis]
    o, lo, hi = _pool_geometry(size, window[axis], stride[axis], padding[axis], ceil_mode)
    pads.append((lo, hi))
    outs.append(o)
    divisors.append(_avg_divisor(size, window[axis], stride[axis], padding[axis], o,
                                 count_include_pad))
  pads.append((0, 0))
  x32 = x.astype(jnp.float32)
  s = jax.lax.reduce_window(x32, 0.0, jax.lax.add,
                            (1,) + window + (1,), (1,) + stride + (1,), pads)
  s = s[:, :outs[0], :outs[1], :]
  div = np.outer(divisors[0], divisors[1])[None, :, :, None]
  return (s / jnp.asarray(div)).astype(x.dtype)


def global_pool(x, kind: str = "avg", gem_p: float = 3.0, eps: float = 1e-6):
  """Pools NHWC ``x`` over H and W to ``[B, C]`` float32.

  Args:
    x: ``[B, H, W, C]`` feature map.
    kind: ``"avg"``; ``"max"``; ``"avg+max"`` (the sum of both, as in the DML literature's
      "avg + max pooling"); ``"gem"`` (generalised mean ``mean(max(x, eps)^p)^(1/p)``).
    gem_p: GeM's exponent ``p`` (fixed, not learned; 1 is average pooling, large p tends to max).
    eps: GeM's lower clamp, keeping the power defined.

  Returns:
    ``[B, C]`` float32.
  """
  x = x.astype(jnp.float32)
  if kind == "avg":
    return jnp.mean(x, axis=(1, 2))
  if kind == "max":
    return jnp.max(x, axis=(1, 2))
  if kind == "avg+max":
    return jnp.mean(x, axis=(1, 2)) + jnp.max(x, axis=(1, 2))
  if kind == "gem":
    p = float(gem_p)
    return jnp.mean(jnp.maximum(x, eps) ** p, axis=(1, 2)) ** (1.0 / p)
  raise ValueError(f"Unknown pooling {kind!r}; valid: {list(POOLINGS)}.")


# ============================================================================= BatchNorm


class BatchNorm(nn.Module):
  """BatchNorm over the last axis with PyTorch's update rule and optional freezing.

  Variables (Flax's names, so checkpoints look like ``nn.BatchNorm``'s): params ``scale``,
  ``bias``; batch_stats ``mean``, ``var`` — all float32 whatever the compute dtype.

  In training mode (``train=True`` and ``freeze == "none"``) it normalises with the batch mean
  and biased variance and updates ``mean <- momentum * mean + (1 - momentum) * batch_mean`` and
  ``var`` likewise with the *unbiased* batch variance (``torch.nn.BatchNorm2d`` with
  ``momentum = 1 - momentum``). The update is skipped while initialising.

  Attributes:
    momentum: running-average decay (Flax convention: 0.9 is PyTorch's 0.1).
    epsilon: added to the variance (PyTorch default 1e-5; torchvision's GoogLeNet 1e-3).
    freeze: ``"none"``; ``"stats"``: always the running statistics, never updated, even with
      ``train=True`` (the affine parameters still train); ``"stats_and_affine"``: the same, and
      ``scale`` / ``bias`` pass through ``stop_gradient`` so their gradients are zero.
    dtype: output dtype (None: the input's). The arithmetic is float32.
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  freeze: str = "none"
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.freeze not in FREEZE_BN:
      raise ValueError(f"Unknown freeze_bn {self.freeze!r}; valid: {list(FREEZE_BN)}.")
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    if self.freeze == "stats_and_affine":
      scale, bias = jax.lax.stop_gradient(scale), jax.lax.stop_gradient(bias)
    x32 = x.astype(jnp.float32)
    if train and self.freeze == "none":
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x32, axis=axes)
      var = jnp.mean(jnp.square(x32 - mean), axis=axes)  # two-pass: no cancellation
      if not self.is_initializing():
        n = math.prod(x.shape[:-1])
        unbiased = var * (n / max(n - 1, 1))
        ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * unbiased
    else:
      mean, var = ra_mean.value, ra_var.value
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    y = x32 * mul + (bias - mean * mul)
    return y.astype(self.dtype if self.dtype is not None else x.dtype)
