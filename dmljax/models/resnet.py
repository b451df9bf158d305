"""ResNet-50 as in torchvision, and the small pre-activation ResNet-v2-20 of CCP's MNIST study.

**ResNet-50** (``torchvision.models.resnet50``): He et al. 2016 with torchvision's "v1.5"
bottleneck (the stride sits on the 3x3 conv); convs without bias, BatchNorm eps 1e-5, a 3x3 / 2
pad-1 max-pool (floor mode) after the stem. Input: RGB in [0, 1] with the ImageNet mean / std.
Output: the pooled 2048-D features (``fc`` dropped). Module names follow torchvision's:
``layer2.0.downsample.1`` is ``("layer2_0", "downsample_1")``.

**ResNet-v2-20** (no weights to import; trained from scratch): pre-activation residual network
(He et al. 2016b) for small images: 3x3 conv to 16 channels, three stages of three basic blocks
(widths 16 / 32 / 64, stride 2 at the start of stages 2 and 3), each block
``BN-ReLU-conv3x3-BN-ReLU-conv3x3`` plus the shortcut (a 1x1 conv of the pre-activated input
where the shape changes), a final BN-ReLU and the global pool: 64-D features. Its PyTorch layout
(for :func:`dmljax.models.import_torch_weights`) is ``conv1``, ``layer{1,2,3}.{0,1,2}.{bn1,
conv1, bn2, conv2, shortcut}``, ``bn``.
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional

import flax.linen as nn
import jax.numpy as jnp

from dmljax.models import layers


class Bottleneck(nn.Module):
  """torchvision's ResNet bottleneck: 1x1 -> 3x3 (stride) -> 1x1 (x4), projection where needed."""
  planes: int
  stride: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32
  freeze_bn: str = "none"

  @nn.compact
  def __call__(self, x, train: bool = False):
    def bn(name):
      return layers.BatchNorm(epsilon=1e-5, freeze=self.freeze_bn, name=name)

    out = layers.conv(self.planes, 1, use_bias=False, dtype=self.dtype, name="conv1")(x)
    out = nn.relu(bn("bn1")(out, train))
    out = layers.conv(self.planes, 3, strides=self.stride, padding=1, use_bias=False,
                      dtype=self.dtype, name="conv2")(out)
    out = nn.relu(bn("bn2")(out, train))
    out = layers.conv(self.planes * 4, 1, use_bias=False, dtype=self.dtype, name="conv3")(out)
    out = bn("bn3")(out, train)
    if self.downsample:
      x = layers.conv(self.planes * 4, 1, strides=self.stride, use_bias=False, dtype=self.dtype,
                      name="downsample_0")(x)
      x = bn("downsample_1")(x, train)
    return nn.relu(out + x)


class ResNet50(nn.Module):
  """ResNet-50 trunk: ``[B, H, W, 3]`` (ImageNet-normalised RGB) -> pooled ``[B, 2048]`` float32.

  Attributes:
    pooling: global pooling head (see :func:`dmljax.models.layers.global_pool`).
    gem_p: GeM exponent.
    freeze_bn: BatchNorm freezing mode (see :class:`dmljax.models.layers.BatchNorm`).
    dtype: compute dtype name (``"float32"`` / ``"bfloat16"``); parameters stay float32.
    remat: rematerialise each bottleneck block in the backward pass.
  """
  pooling: str = "avg"
  gem_p: float = 3.0
  freeze_bn: str = "none"
  dtype: Optional[str] = "float32"
  remat: bool = False

  preprocessing: ClassVar[layers.Preprocessing] = layers.IMAGENET_RGB
  feature_dim: ClassVar[int] = 2048
  #: (planes, blocks, stride) of layer1..layer4.
  stages: ClassVar[tuple] = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))

  @nn.compact
  def __call__(self, x, train: bool = False):
    dt = layers.resolve_dtype(self.dtype)
    x = x.astype(dt)
    x = layers.conv(64, 7, strides=2, padding=3, use_bias=False, dtype=dt, name="conv1")(x)
    x = nn.relu(layers.BatchNorm(epsilon=1e-5, freeze=self.freeze_bn, name="bn1")(x, train))
    x = layers.max_pool(x, 3, 2, 1)
    block_cls = nn.remat(Bottleneck, static_argnums=(2,)) if self.remat else Bottleneck
    for li, (planes, blocks, stride) in enumerate(self.stages, start=1):
      for bi in range(blocks):
        x = block_cls(planes, stride=stride if bi == 0 else 1, downsample=bi == 0, dtype=dt,
                      freeze_bn=self.freeze_bn, name=f"layer{li}_{bi}")(x, train)
    return layers.global_pool(x, self.pooling, self.gem_p)


class PreActBlock(nn.Module):
  """Pre-activation basic block: BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3 + shortcut."""
  features: int
  stride: int = 1
  dtype: Any = jnp.float32
  freeze_bn: str = "none"

  @nn.compact
  def __call__(self, x, train: bool = False):
    pre = nn.relu(layers.BatchNorm(freeze=self.freeze_bn, name="bn1")(x, train))
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = layers.conv(self.features, 1, strides=self.stride, use_bias=False,
                             dtype=self.dtype, name="shortcut")(pre)
    else:
      shortcut = x
    out = layers.conv(self.features, 3, strides=self.stride, padding=1, use_bias=False,
                      dtype=self.dtype, name="conv1")(pre)
    out = nn.relu(layers.BatchNorm(freeze=self.freeze_bn, name="bn2")(out, train))
    out = layers.conv(self.features, 3, padding=1, use_bias=False, dtype=self.dtype,
                      name="conv2")(out)
    return out + shortcut


class ResNetV2_20(nn.Module):  # pylint: disable=invalid-name
  """Pre-activation ResNet-20: ``[B, H, W, C]`` -> pooled ``[B, 64]`` float32.

  Attributes:
    widths: channels of the three stages.
    blocks_per_stage: basic blocks per stage (3 gives depth 6 x 3 + 2 = 20).
    pooling: global pooling head (see :func:`dmljax.models.layers.global_pool`).
    gem_p: GeM exponent.
    freeze_bn: BatchNorm freezing mode (see :class:`dmljax.models.layers.BatchNorm`).
    dtype: compute dtype name (``"float32"`` / ``"bfloat16"``); parameters stay float32.
    remat: rematerialise each block in the backward pass.
  """
  widths: tuple[int, ...] = (16, 32, 64)
  blocks_per_stage: int = 3
  pooling: str = "avg"
  gem_p: float = 3.0
  freeze_bn: str = "none"
  dtype: Optional[str] = "float32"
  remat: bool = False

  #: No pixel normalisation of its own: uint8 images are scaled to [0, 1].
  preprocessing: ClassVar[Optional[layers.Preprocessing]] = None
  feature_dim: ClassVar[int] = 64

  @nn.compact
  def __call__(self, x, train: bool = False):
    dt = layers.resolve_dtype(self.dtype)
    x = x.astype(dt)
    x = layers.conv(self.widths[0], 3, padding=1, use_bias=False, dtype=dt, name="conv1")(x)
    block_cls = nn.remat(PreActBlock, static_argnums=(2,)) if self.remat else PreActBlock
    for si, width in enumerate(self.widths, start=1):
      for bi in range(self.blocks_per_stage):
        stride = 2 if (si > 1 and bi == 0) else 1
        x = block_cls(width, stride=stride, dtype=dt, freeze_bn=self.freeze_bn,
                      name=f"layer{si}_{bi}")(x, train)
    x = nn.relu(layers.BatchNorm(freeze=self.freeze_bn, name="bn")(x, train))
    return layers.global_pool(x, self.pooling, self.gem_p)
