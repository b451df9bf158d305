r"""C2-CCP on In-shop Clothes Retrieval with the CCP paper's settings (BN-Inception, ImageNet weights).

  python -m dmljax.main --config=configs/inshop_ccp.py --workdir=/tmp/dmljax/inshop_ccp

Needs, once: the data set prepared from the files you downloaded (img.zip and Eval/list_eval_partition.txt),
  python -m dmljax.data.prepare inshop --manual_dir=DOWNLOADS --data_dir=$TFDS_DATA_DIR
(or pass --config.dataset.data_dir=DIR), and the ImageNet BN-Inception weight file
bn_inception-52deb4733.pth (pretrainedmodels' port) in $DMLJAX_WEIGHTS (default ./weights/), or
--config.model.pretrained=/path/to/bn_inception-52deb4733.pth.

Settings (supplement, "Training procedure", "Hyperparameters" and "CCP"): frozen BatchNorm, Adam
lr 1e-5, betas (0.9, 0.99), weight decay 1e-4, batch 32 = 8 classes x 4, embedding 128, bounded
normalisation, evaluation every 250 steps, overall patience 60 evaluations, 4 proxies per class, pool 7,
lambda 2e-4, the paper's C2 margins for this data set; train crop 227 (random resized, flip),
eval resize 256 + centre crop 227. Validation: 20 % of the training classes; the 4-fold tables:
python -m dmljax.protocol --config=configs/inshop_ccp.py --workdir=DIR (folds of the training classes).
Batches: 8 classes x 4 with sampler.small_classes=repeat (SOP classes hold 2-12 images, In-shop
items 1-2 in train: a class smaller than 4 fills its rows by cycling through its images).
Not run here (no GPU, no data sets, no weights on this project's machines): no figures yet.
Small variant for tests (tiny backbone, tiny prepared data): ``--config=configs/inshop_ccp.py:small``.
"""
from dmljax.configs import ccp_paper_config


def get_config(arg: str = ""):
  return ccp_paper_config("inshop", arg)
