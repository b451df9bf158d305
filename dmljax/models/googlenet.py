"""GoogLeNet (Inception v1) with BatchNorm, as in torchvision (``torchvision.models.googlenet``).

torchvision's re-implementation, not the original LRN network: every convolution is
``BasicConv2d`` (conv without bias, BatchNorm with eps 1e-3, ReLU); its "5x5" branch uses a 3x3
kernel (kept from torchvision, whose weights are trained that way); max-pools use
``ceil_mode=True``. No auxiliary classifiers, ``transform_input=False``: input is RGB in [0, 1]
normalised with the ImageNet mean / std. Output: the pooled 1024-D features (``fc`` dropped).

Module names follow torchvision's: ``inception3a.branch2.1.bn`` is module
``("inception3a", "branch2_1", "bn")``; a trailing ``_<index>`` stands for a ``Sequential`` index.
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional

import flax.linen as nn
import jax.numpy as jnp

from dmljax.models import layers


class BasicConv(nn.Module):
  """conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU, modules ``conv`` and ``bn``."""
  features: int
  kernel: int
  stride: int = 1
  padding: int = 0
  dtype: Any = jnp.float32
  freeze_bn: str = "none"

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = layers.conv(self.features, self.kernel, strides=self.stride, padding=self.padding,
                    use_bias=False, dtype=self.dtype, name="conv")(x)
    x = layers.BatchNorm(epsilon=1e-3, freeze=self.freeze_bn, name="bn")(x, train)
    return nn.relu(x)


class Inception(nn.Module):
  """torchvision's ``Inception`` block: four branches, concatenated on channels.

  Attributes:
    widths: ``(ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj)`` as torchvision orders them.
  """
  widths: tuple[int, int, int, int, int, int]
  dtype: Any = jnp.float32
  freeze_bn: str = "none"

  @nn.compact
  def __call__(self, x, train: bool = False):
    c1, c3r, c3, c5r, c5, cp = self.widths
    kw = dict(dtype=self.dtype, freeze_bn=self.freeze_bn)
    b1 = BasicConv(c1, 1, name="branch1", **kw)(x, train)
    b2 = BasicConv(c3r, 1, name="branch2_0", **kw)(x, train)
    b2 = BasicConv(c3, 3, padding=1, name="branch2_1", **kw)(b2, train)
    b3 = BasicConv(c5r, 1, name="branch3_0", **kw)(x, train)
    b3 = BasicConv(c5, 3, padding=1, name="branch3_1", **kw)(b3, train)
    b4 = layers.max_pool(x, 3, 1, 1, ceil_mode=True)
    b4 = BasicConv(cp, 1, name="branch4_1", **kw)(b4, train)
    return jnp.concatenate([b1, b2, b3, b4], axis=-1)


#: Block widths (torchvision's argument order), with ``None`` marking the max-pools between.
STAGES = (
    ("inception3a", (64, 96, 128, 16, 32, 32)),
    ("inception3b", (128, 128, 192, 32, 96, 64)),
    ("maxpool3", None),
    ("inception4a", (192, 96, 208, 16, 48, 64)),
    ("inception4b", (160, 112, 224, 24, 64, 64)),
    ("inception4c", (128, 128, 256, 24, 64, 64)),
    ("inception4d", (112, 144, 288, 32, 64, 64)),
    ("inception4e", (256, 160, 320, 32, 128, 128)),
    ("maxpool4", None),
    ("inception5a", (256, 160, 320, 32, 128, 128)),
    ("inception5b", (384, 192, 384, 48, 128, 128)),
)


class GoogLeNet(nn.Module):
  """GoogLeNet trunk: ``[B, H, W, 3]`` (ImageNet-normalised RGB) -> pooled ``[B, 1024]`` float32.

  Attributes:
    pooling: global pooling head (see :func:`dmljax.models.layers.global_pool`).
    gem_p: GeM exponent.
    freeze_bn: BatchNorm freezing mode (see :class:`dmljax.models.layers.BatchNorm`).
    dtype: compute dtype name (``"float32"`` / ``"bfloat16"``); parameters stay float32.
    remat: rematerialise each inception block in the backward pass.
  """
  pooling: str = "avg"
  gem_p: float = 3.0
  freeze_bn: str = "none"
  dtype: Optional[str] = "float32"
  remat: bool = False

  preprocessing: ClassVar[layers.Preprocessing] = layers.IMAGENET_RGB
  feature_dim: ClassVar[int] = 1024

  @nn.compact
  def __call__(self, x, train: bool = False):
    dt = layers.resolve_dtype(self.dtype)
    kw = dict(dtype=dt, freeze_bn=self.freeze_bn)
    x = x.astype(dt)
    x = BasicConv(64, 7, stride=2, padding=3, name="conv1", **kw)(x, train)
    x = layers.max_pool(x, 3, 2, 0, ceil_mode=True)
    x = BasicConv(64, 1, name="conv2", **kw)(x, train)
    x = BasicConv(192, 3, padding=1, name="conv3", **kw)(x, train)
    x = layers.max_pool(x, 3, 2, 0, ceil_mode=True)
    block_cls = nn.remat(Inception, static_argnums=(2,)) if self.remat else Inception
    for name, widths in STAGES:
      if widths is None:
        k = 3 if name == "maxpool3" else 2  # torchvision: maxpool3 is 3x3 / 2, maxpool4 2x2 / 2
        x = layers.max_pool(x, k, 2, 0, ceil_mode=True)
      else:
        x = block_cls(widths, name=name, **kw)(x, train)
    return layers.global_pool(x, self.pooling, self.gem_p)
