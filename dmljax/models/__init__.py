"""Embedding models: a backbone (image -> feature vector) plus a head (feature -> embedding).

Flax Linen is used (not NNX) because Linen's ``init``/``apply`` hand back plain ``params`` and
``batch_stats`` dictionaries: the train step, the proximal term ``||theta - theta_anchor||^2``
(a ``tree_map`` over two such dicts), Orbax checkpoints and, later, weight import all work on
plain pytrees without any object state to split and merge.

Models are chosen by name in the config (``config.model.name``) from :data:`MODELS`, so larger
backbones (BN-Inception, ResNet-50) plug in by adding one entry.
"""
from dmljax.models.cnn import EmbeddingModel, SmallCNN, get_model, MODELS, BACKBONES, NORMALIZATIONS

__all__ = ["EmbeddingModel", "SmallCNN", "get_model", "MODELS", "BACKBONES", "NORMALIZATIONS"]
