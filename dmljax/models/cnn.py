"""A small CNN backbone and the embedding head, for the embedded 8x8 / 32x32 grayscale data sets."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from dmljax.losses.core import bounded_normalize, l2_normalize

#: Embedding normalisations selectable by ``config.model.normalization``.
NORMALIZATIONS: dict[str, Callable] = {
    # CCP: x / max(1, ||x||), Lipschitz (the paper's Lemma 1 needs it).
    "bounded": bounded_normalize,
    "l2": l2_normalize,
    "none": lambda x: x,
}


class SmallCNN(nn.Module):
  """conv3x3-BN-ReLU blocks, a 2x2 max-pool after each block but the last, global average pool.

  Attributes:
    widths: channels per block.
    convs_per_block: conv-BN-ReLU layers per block.
  """
  widths: Sequence[int] = (32, 64, 128)
  convs_per_block: int = 1

  @nn.compact
  def __call__(self, x, *, train: bool):
    for i, width in enumerate(self.widths):
      for _ in range(self.convs_per_block):
        x = nn.Conv(width, (3, 3), padding="SAME", use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
      # Pool only while the feature map is larger than 2x2 (8x8 digits: two pools; 32x32: all).
      if i < len(self.widths) - 1 and x.shape[1] > 2:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return jnp.mean(x, axis=(1, 2))


#: Backbones by name: constructor taking the ``config.model`` ConfigDict.
BACKBONES: dict[str, Callable[[Any], nn.Module]] = {
    "small_cnn": lambda mc: SmallCNN(widths=tuple(mc.widths), convs_per_block=mc.convs_per_block),
}


class EmbeddingModel(nn.Module):
  """Backbone, then ``Dense(embedding_dim)``, then the normalisation.

  ``__call__(images [B,H,W,C], train) -> embeddings [B, embedding_dim]`` (float32).
  """
  backbone: nn.Module
  embedding_dim: int
  normalization: str = "bounded"

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    x = jnp.asarray(x, jnp.float32)
    feats = self.backbone(x, train=train)
    emb = nn.Dense(self.embedding_dim, name="head")(feats)
    return NORMALIZATIONS[self.normalization](emb)


MODELS = BACKBONES


def get_model(model_config) -> EmbeddingModel:
  """Builds the model named by ``model_config.name``; ValueError lists the valid names."""
  if model_config.name not in BACKBONES:
    raise ValueError(f"Unknown model {model_config.name!r}; valid models: {sorted(BACKBONES)} "
                     "(set --config.model.name).")
  if model_config.normalization not in NORMALIZATIONS:
    raise ValueError(f"Unknown normalization {model_config.normalization!r}; valid: "
                     f"{sorted(NORMALIZATIONS)} (set --config.model.normalization).")
  return EmbeddingModel(backbone=BACKBONES[model_config.name](model_config),
                        embedding_dim=model_config.embedding_dim,
                        normalization=model_config.normalization)
