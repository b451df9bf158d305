"""BN-Inception (Inception v2 of Ioffe & Szegedy 2015), as ported to PyTorch by Cadene.

The backbone of most deep metric learning papers (``pretrainedmodels.bninception``, weight file
``bn_inception-52deb4733.pth``, converted from Caffe). Every convolution has a bias and is
followed by BatchNorm (eps 1e-5) and ReLU. Pooling is Caffe's: max-pools with ``ceil_mode=True``
and, in the inception blocks, a 3x3 stride-1 pad-1 average pool with ``count_include_pad``
(PyTorch's default). Input: BGR in [0, 255] minus the mean (104, 117, 128), std 1. Output: the
pooled 1024-D features (the port's ``features`` + global pool, its ``last_linear`` dropped).

Module names are the PyTorch ones: the stem modules (``conv1_7x7_s2``, ``conv1_7x7_s2_bn``, ...)
sit at the top, and ``inception_3a_1x1_bn`` is module ``1x1_bn`` of block ``inception_3a``, so
the PyTorch name of a Flax module is its path joined with ``_``.
"""
from __future__ import annotations

from typing import Any, ClassVar, NamedTuple, Optional

import flax.linen as nn
import jax.numpy as jnp

from dmljax.models import layers


class BlockSpec(NamedTuple):
  """Widths of one BN-Inception block (0 = branch absent).

  ``c1x1``: the 1x1 branch; ``c3x3_reduce`` -> ``c3x3``: the 3x3 branch; ``double_reduce`` ->
  ``double`` -> ``double``: two stacked 3x3; ``pool``: ``"avg"`` / ``"max"`` (stride 1, pad 1)
  or ``"max_s2"`` (the reduction blocks' stride-2 max-pool, no projection); ``pool_proj``: the
  1x1 after the pool; ``stride``: 2 in the reduction blocks (on the last conv of the 3x3 and
  double-3x3 branches).
  """
  c1x1: int
  c3x3_reduce: int
  c3x3: int
  double_reduce: int
  double: int
  pool: str
  pool_proj: int
  stride: int = 1


#: The ten blocks, in order; output channels are the concatenation of the branches.
BLOCKS: tuple[tuple[str, BlockSpec], ...] = (
    ("3a", BlockSpec(64, 64, 64, 64, 96, "avg", 32)),
    ("3b", BlockSpec(64, 64, 96, 64, 96, "avg", 64)),
    ("3c", BlockSpec(0, 128, 160, 64, 96, "max_s2", 0, stride=2)),
    ("4a", BlockSpec(224, 64, 96, 96, 128, "avg", 128)),
    ("4b", BlockSpec(192, 96, 128, 96, 128, "avg", 128)),
    ("4c", BlockSpec(160, 128, 160, 128, 160, "avg", 128)),
    ("4d", BlockSpec(96, 128, 192, 160, 192, "avg", 128)),
    ("4e", BlockSpec(0, 128, 192, 192, 256, "max_s2", 0, stride=2)),
    ("5a", BlockSpec(352, 192, 320, 160, 224, "avg", 128)),
    ("5b", BlockSpec(352, 192, 320, 192, 224, "max", 128)),
)


class InceptionBlock(nn.Module):
  """One BN-Inception block; sub-module names are the suffixes of the PyTorch names."""
  spec: BlockSpec
  dtype: Any = jnp.float32
  freeze_bn: str = "none"

  def _unit(self, x, name, features, kernel, stride, train):
    pad = kernel // 2
    x = layers.conv(features, kernel, strides=stride, padding=pad, dtype=self.dtype, name=name)(x)
    x = layers.BatchNorm(epsilon=1e-5, freeze=self.freeze_bn, name=f"{name}_bn")(x, train)
    return nn.relu(x)

  @nn.compact
  def __call__(self, x, train: bool = False):
    s = self.spec
    outs = []
    if s.c1x1:
      outs.append(self._unit(x, "1x1", s.c1x1, 1, 1, train))
    y = self._unit(x, "3x3_reduce", s.c3x3_reduce, 1, 1, train)
    outs.append(self._unit(y, "3x3", s.c3x3, 3, s.stride, train))
    y = self._unit(x, "double_3x3_reduce", s.double_reduce, 1, 1, train)
    y = self._unit(y, "double_3x3_1", s.double, 3, 1, train)
    outs.append(self._unit(y, "double_3x3_2", s.double, 3, s.stride, train))
    if s.pool == "max_s2":
      outs.append(layers.max_pool(x, 3, 2, 0, ceil_mode=True))
    else:
      if s.pool == "avg":
        y = layers.avg_pool(x, 3, 1, 1, ceil_mode=True, count_include_pad=True)
      else:
        y = layers.max_pool(x, 3, 1, 1, ceil_mode=True)
      outs.append(self._unit(y, "pool_proj", s.pool_proj, 1, 1, train))
    return jnp.concatenate(outs, axis=-1)


class BNInception(nn.Module):
  """BN-Inception trunk: ``[B, H, W, 3]`` (Caffe-normalised BGR) -> pooled ``[B, 1024]`` float32.

  Attributes:
    pooling: global pooling head (see :func:`dmljax.models.layers.global_pool`).
    gem_p: GeM exponent.
    freeze_bn: BatchNorm freezing mode (see :class:`dmljax.models.layers.BatchNorm`).
    dtype: compute dtype name (``"float32"`` / ``"bfloat16"``); parameters stay float32.
    remat: rematerialise each inception block in the backward pass (less memory, more compute).
  """
  pooling: str = "avg"
  gem_p: float = 3.0
  freeze_bn: str = "none"
  dtype: Optional[str] = "float32"
  remat: bool = False

  preprocessing: ClassVar[layers.Preprocessing] = layers.CAFFE_BGR
  feature_dim: ClassVar[int] = 1024

  def _unit(self, x, name, features, kernel, stride, pad, train):
    dt = layers.resolve_dtype(self.dtype)
    x = layers.conv(features, kernel, strides=stride, padding=pad, dtype=dt, name=name)(x)
    x = layers.BatchNorm(epsilon=1e-5, freeze=self.freeze_bn, name=f"{name}_bn")(x, train)
    return nn.relu(x)

  @nn.compact
  def __call__(self, x, train: bool = False):
    dt = layers.resolve_dtype(self.dtype)
    x = x.astype(dt)
    x = self._unit(x, "conv1_7x7_s2", 64, 7, 2, 3, train)
    x = layers.max_pool(x, 3, 2, 0, ceil_mode=True)
    x = self._unit(x, "conv2_3x3_reduce", 64, 1, 1, 0, train)
    x = self._unit(x, "conv2_3x3", 192, 3, 1, 1, train)
    x = layers.max_pool(x, 3, 2, 0, ceil_mode=True)
    block_cls = nn.remat(InceptionBlock, static_argnums=(2,)) if self.remat else InceptionBlock
    for tag, spec in BLOCKS:
      x = block_cls(spec, dtype=dt, freeze_bn=self.freeze_bn, name=f"inception_{tag}")(x, train)
    return layers.global_pool(x, self.pooling, self.gem_p)


def torch_name(module_path: tuple[str, ...]) -> str:
  """PyTorch name of a Flax module path: ``("inception_3a", "1x1_bn")`` -> ``inception_3a_1x1_bn``.
  """
  return "_".join(module_path)
