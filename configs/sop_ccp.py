r"""C2-CCP on Stanford Online Products with the CCP paper's settings (BN-Inception, ImageNet weights).

  python -m dmljax.main --config=configs/sop_ccp.py --workdir=/tmp/dmljax/sop_ccp

Needs, once: the data set prepared from the files you downloaded (Stanford_Online_Products.zip (or its folder)),
  python -m dmljax.data.prepare sop --manual_dir=DOWNLOADS --data_dir=$TFDS_DATA_DIR
(or pass --config.dataset.data_dir=DIR), and the ImageNet BN-Inception weight file
bn_inception-52deb4733.pth (pretrainedmodels' port) in $DMLJAX_WEIGHTS (default ./weights/), or
--config.model.pretrained=/path/to/bn_inception-52deb4733.pth.

Settings (supplement, "Training procedure", "Hyperparameters" and "CCP"; the authors' code where
the paper is silent): BatchNorm frozen entirely (statistics and affine), an embedding layer
without bias, Adam lr 1e-5, betas (0.9, 0.99) (the paper; the code runs 0.999), epsilon 1e-7
(the code), the gradient built as proximal term -> L2 1e-4 on every non-BatchNorm variable
(biases, proxies) -> clip to global norm 10 -> clip values to 10; CCP as authored (the model
continues at a projection end; the in-batch term is C2 itself at weight 0.1; proxies normalised as
the embeddings; the k-center pool from raw embeddings; see docs/ccp.md); batch 32 = 8 classes x 4, embedding 128, bounded
normalisation, evaluation every 250 steps, overall patience 60 evaluations, 4 proxies per class, pool 7,
lambda 2e-4, the paper's C2 margins for this data set; train crop 227 (random resized, flip),
eval resize 256 + centre crop 227. Validation: 1/4 of the training classes, the protocol's fold 0 (the last quarter
by class id: the quarter the authors' first model holds out); the 4-fold tables:
python -m dmljax.protocol --config=configs/sop_ccp.py --workdir=DIR (folds of the training classes).
Batches: 8 classes x 4 with sampler.small_classes=repeat (SOP classes hold 2-12 images, In-shop
items 1-2 in train: a class smaller than 4 fills its rows by cycling through its images).
Not run here (no GPU, no data sets, no weights on this project's machines): no figures yet.
Variants: ``:ablation`` validates on 1/3 of the training classes (the paper's single-model
ablations; fold 0 of a 3-fold cut), ``:small`` is for tests (tiny backbone, tiny prepared data):
``--config=configs/sop_ccp.py:small``.
"""
from dmljax.configs import ccp_paper_config


def get_config(arg: str = ""):
  return ccp_paper_config("sop", arg)
