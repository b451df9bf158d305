"""The small CNN backbone, the backbone registry and the embedding model (backbone + head)."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from dmljax.numerics import bounded_normalize, l2_normalize
from dmljax.models import layers
from dmljax.models.bn_inception import BNInception
from dmljax.models.googlenet import GoogLeNet
from dmljax.models.resnet import ResNet50, ResNetV2_20

#: Embedding normalisations selectable by ``config.model.normalization``.
NORMALIZATIONS: dict[str, Callable] = {
    # CCP: x / max(1, ||x||), Lipschitz (the paper's Lemma 1 needs it).
    "bounded": bounded_normalize,
    "l2": l2_normalize,
    "none": lambda x: x,
}


class SmallCNN(nn.Module):
  """conv3x3-BN-ReLU blocks, a 2x2 max-pool after each block but the last, global pool.

  Attributes:
    widths: channels per block.
    convs_per_block: conv-BN-ReLU layers per block.
    pooling: global pooling head (see :func:`dmljax.models.layers.global_pool`).
    gem_p: GeM exponent.
    freeze_bn: BatchNorm freezing mode (see :class:`dmljax.models.layers.BatchNorm`); with
      ``"none"`` the layers are Flax's ``nn.BatchNorm`` as before.
    dtype: compute dtype name; parameters stay float32.
  """
  widths: Sequence[int] = (32, 64, 128)
  convs_per_block: int = 1
  pooling: str = "avg"
  gem_p: float = 3.0
  freeze_bn: str = "none"
  dtype: Optional[str] = "float32"

  #: No normalisation of its own: uint8 images are scaled to [0, 1].
  preprocessing = None

  @nn.compact
  def __call__(self, x, *, train: bool):
    dt = layers.resolve_dtype(self.dtype)
    x = x.astype(dt)
    for i, width in enumerate(self.widths):
      for _ in range(self.convs_per_block):
        x = nn.Conv(width, (3, 3), padding="SAME", use_bias=False, dtype=dt,
                    param_dtype=jnp.float32,
                    kernel_init=layers.variance_scaling(1.0, "fan_in", "truncated_normal"))(x)
        if self.freeze_bn == "none":
          x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=dt)(x)
        else:
          x = layers.BatchNorm(momentum=0.9, freeze=self.freeze_bn)(x, train)
        x = nn.relu(x)
      # Pool only while the feature map is larger than 2x2 (8x8 digits: two pools; 32x32: all).
      if i < len(self.widths) - 1 and x.shape[1] > 2:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return layers.global_pool(x, self.pooling, self.gem_p)


#: Backbone classes by ``config.model.name``; see :func:`get_backbone`.
BACKBONE_CLASSES: dict[str, type] = {
    "small_cnn": SmallCNN,
    "bn_inception": BNInception,
    "googlenet": GoogLeNet,
    "resnet50": ResNet50,
    "resnet_v2_20": ResNetV2_20,
}


def backbone_options(model_config) -> dict[str, Any]:
  """The shared backbone options of ``config.model``, with their defaults.

  ``pooling`` ("avg"), ``gem_p`` (3.0), ``freeze_bn`` ("none"), ``dtype`` ("float32"),
  ``remat`` (False).
  """
  get = model_config.get
  return dict(pooling=get("pooling", "avg"), gem_p=float(get("gem_p", 3.0)),
              freeze_bn=get("freeze_bn", "none"),
              dtype=layers.dtype_name(get("dtype", "float32")),
              remat=bool(get("remat", False)))


def get_backbone(name: str, **options) -> nn.Module:
  """The backbone ``name`` as a Flax module: ``apply(variables, images, train=...) -> [B, F]``.

  Args:
    name: a key of :data:`BACKBONE_CLASSES`.
    **options: attributes of the backbone class (``pooling``, ``gem_p``, ``freeze_bn``,
      ``dtype``, ``remat``; ``widths``, ``convs_per_block`` for ``small_cnn``). Defaults: average
      pooling, float32, BatchNorm not frozen — the PyTorch model's features.

  Returns:
    The unbound module. Its images are NHWC float32, normalised as the ``preprocessing``
    attribute of the class says (None: [0, 1]).
  """
  if name not in BACKBONE_CLASSES:
    raise ValueError(f"Unknown model {name!r}; valid models: {sorted(BACKBONE_CLASSES)} "
                     "(set --config.model.name).")
  return BACKBONE_CLASSES[name](**options)


def _small_cnn(mc):
  opts = backbone_options(mc)
  opts.pop("remat")  # no blocks worth rematerialising
  return SmallCNN(widths=tuple(mc.widths), convs_per_block=mc.convs_per_block, **opts)


#: Backbones by name: constructor taking the ``config.model`` ConfigDict.
BACKBONES: dict[str, Callable[[Any], nn.Module]] = {
    "small_cnn": _small_cnn,
    "bn_inception": lambda mc: BNInception(**backbone_options(mc)),
    "googlenet": lambda mc: GoogLeNet(**backbone_options(mc)),
    "resnet50": lambda mc: ResNet50(**backbone_options(mc)),
    "resnet_v2_20": lambda mc: ResNetV2_20(**backbone_options(mc)),
}


class EmbeddingModel(nn.Module):
  """Backbone, then ``Dense(embedding_dim)`` (module ``head``), optional BatchNorm, normalisation.

  ``__call__(images [B,H,W,C], train) -> embeddings [B, embedding_dim]`` (float32).

  uint8 images are normalised here, on device: 3-channel ones as the backbone's
  ``preprocessing`` says (channel order, range, mean, std), others (grayscale) and those of
  backbones without one to ``x / 255``. Float images are taken as already normalised.

  Parameters: ``backbone`` (the trunk), ``head`` (the embedding layer: ``kernel`` and, with
  ``head_bias``, ``bias``) and, with ``embedding_bn``, ``head_bn`` (``scale``, ``bias``;
  batch_stats ``head_bn``).

  The normalisation is the model's last operation, and ``normalize=False`` returns the embedding
  before it (the "raw" embedding). The model's output is what every loss and every retrieval
  metric sees; the raw embedding is offered for what needs the vector the normalisation maps
  from, e.g. CCP's k-center pool (the CCP authors' head does not normalise and their loss
  normalises samples and proxies alike; normalising at the end of the model instead gives the
  loss the same values, and the evaluation one definition of the embedding for every framework).

  Attributes:
    backbone: the trunk, ``[B, H, W, C] -> [B, F]``.
    embedding_dim: D.
    normalization: a key of :data:`NORMALIZATIONS`.
    embedding_bn: BatchNorm on the embedding layer's output (never frozen).
    head_bias: whether the embedding layer has a bias (the CCP authors' has none).
    dtype: compute dtype name of the head (``"float32"`` / ``"bfloat16"``); output float32.
  """
  backbone: nn.Module
  embedding_dim: int
  normalization: str = "bounded"
  embedding_bn: bool = False
  head_bias: bool = True
  dtype: Optional[str] = "float32"

  @nn.compact
  def __call__(self, x, *, train: bool = False, normalize: bool = True):
    if x.dtype == jnp.uint8:
      spec = getattr(self.backbone, "preprocessing", None)
      if spec is None or x.shape[-1] != 3:
        x = x.astype(jnp.float32) / 255.0
      else:
        x = spec.normalize(x)
    else:
      x = jnp.asarray(x, jnp.float32)
    feats = self.backbone(x, train=train)
    emb = nn.Dense(self.embedding_dim, use_bias=self.head_bias,
                   dtype=layers.resolve_dtype(self.dtype), param_dtype=jnp.float32,
                   name="head")(feats)
    emb = emb.astype(jnp.float32)
    if self.embedding_bn:
      emb = layers.BatchNorm(name="head_bn")(emb, train)
    if not normalize:
      return emb
    return NORMALIZATIONS[self.normalization](emb)


MODELS = BACKBONES


def _check_choice(value, valid, key):
  if value not in valid:
    raise ValueError(f"Unknown {key.split('.')[-1]} {value!r}; valid: {sorted(valid)} "
                     f"(set --config.{key}).")


def get_model(model_config) -> EmbeddingModel:
  """Builds the model named by ``model_config.name``; ValueError lists the valid names.

  Reads ``name``, ``embedding_dim``, ``normalization`` and, with defaults, ``pooling`` ("avg"),
  ``gem_p`` (3.0), ``freeze_bn`` ("none"), ``dtype`` ("float32"), ``remat`` (False),
  ``embedding_bn`` (False), ``head_bias`` (True); ``widths`` / ``convs_per_block`` for
  ``small_cnn``.
  """
  if model_config.name not in BACKBONES:
    raise ValueError(f"Unknown model {model_config.name!r}; valid models: {sorted(BACKBONES)} "
                     "(set --config.model.name).")
  if model_config.normalization not in NORMALIZATIONS:
    raise ValueError(f"Unknown normalization {model_config.normalization!r}; valid: "
                     f"{sorted(NORMALIZATIONS)} (set --config.model.normalization).")
  opts = backbone_options(model_config)
  _check_choice(opts["pooling"], layers.POOLINGS, "model.pooling")
  _check_choice(opts["freeze_bn"], layers.FREEZE_BN, "model.freeze_bn")
  _check_choice(opts["dtype"], layers.DTYPES, "model.dtype")
  if opts["pooling"] == "gem" and opts["gem_p"] <= 0:
    raise ValueError(f"model.gem_p must be > 0; got {opts['gem_p']}.")
  return EmbeddingModel(backbone=BACKBONES[model_config.name](model_config),
                        embedding_dim=model_config.embedding_dim,
                        normalization=model_config.normalization,
                        embedding_bn=bool(model_config.get("embedding_bn", False)),
                        head_bias=bool(model_config.get("head_bias", True)),
                        dtype=opts["dtype"])
