"""Embedding models: a backbone (image -> feature vector) plus a head (feature -> embedding).

Flax Linen is used (not NNX) because Linen's ``init``/``apply`` hand back plain ``params`` and
``batch_stats`` dictionaries: the train step, the proximal term ``||theta - theta_anchor||^2``
(a ``tree_map`` over two such dicts), Orbax checkpoints and weight import all work on plain
pytrees without any object state to split and merge.

Models are chosen by name in the config (``config.model.name``) from :data:`MODELS`:
``small_cnn``, ``bn_inception``, ``googlenet``, ``resnet50``, ``resnet_v2_20``. The last four
reproduce their PyTorch counterparts exactly, and :func:`import_torch_weights` /
:func:`load_pretrained` bring in PyTorch weights (see ``docs/backbones.md``). Parameter layout
of the embedding model: ``params["backbone"]`` is the trunk, ``params["head"]`` the embedding
layer (plus ``params["head_bn"]`` with ``model.embedding_bn``).
"""
from dmljax.models import layers
from dmljax.models.cnn import (BACKBONE_CLASSES, BACKBONES, MODELS, NORMALIZATIONS, EmbeddingModel,
                               SmallCNN, backbone_options, get_backbone, get_model)
from dmljax.models.torch_import import (ARCHS, UnsafeWeightFile, convert_state_dict,
                                        import_torch_weights, load_pretrained, load_state_dict,
                                        to_torch_state_dict)

__all__ = ["EmbeddingModel", "SmallCNN", "get_model", "get_backbone", "backbone_options",
           "MODELS", "BACKBONES", "BACKBONE_CLASSES", "NORMALIZATIONS", "ARCHS", "layers",
           "import_torch_weights", "load_pretrained", "load_state_dict", "convert_state_dict",
           "to_torch_state_dict", "UnsafeWeightFile"]
