r"""Train on your own images: CCP on a small from-scratch CNN (docs/own_data.md).

  python -m dmljax.main --config=configs/own_data.py --workdir=runs/shop \
      --config.dataset.name=shop --config.dataset.data_dir=~/dmljax_data

1. Prepare the images once under a name: a folder with one sub-folder per class (or train/ and
   test/, or train/, query/ and gallery/ folders above them), or a CSV file path,label[,split]:
     python -m dmljax.data.prepare folder --manual_dir=~/photos --data_dir=~/dmljax_data --name=shop
     python -m dmljax.data.prepare csv --manual_dir=~/photos/labels.csv --data_dir=~/dmljax_data --name=shop
   Without splits, the classes sorted by name are cut in half: the first half trains, the second
   tests (--test_fraction, --shuffle_seed); the table printed at the end counts each split's
   images and classes and the images skipped (they do not decode, or a CSV row's file is missing).
2. Train with the command above. 20 % of the training classes validate (at least 2, leaving at
   least 2 to train), and a batch holds 8 classes x 4 images, or as many classes as there are to
   train (sampler.fit_batch); the run prints both choices. A class with fewer than 4 images stops
   the run with its name: --config.sampler.small_classes=repeat samples it with replacement.
3. Results: the final table (validation and test MAP@R, R-precision, P@1, against the untrained
   network), final_metrics.json and metrics.jsonl in --workdir. The 4-fold protocol over the
   training classes: python -m dmljax.protocol --config=configs/own_data.py --workdir=DIR
   --config.dataset.name=shop --config.dataset.data_dir=~/dmljax_data.

Default: a small CNN from scratch (widths 32-64-128, embedding 64) on 64 x 64 crops (train:
random resized crop + flip; eval: shorter side 73, centre crop 64), contrastive loss (Euclidean,
margins 0 / 1) under CCP with 4 proxies per class, Adam lr 1e-3, 2000 steps with an evaluation
every 50 and a stop after 10 without improvement. It checks the data and the pipeline in minutes
on a CPU; photos want a pretrained network:
  --config=configs/own_data.py:bn_inception   BN-Inception with ImageNet weights (the CCP paper's
      settings for CUB: 227 x 227 crops, frozen BatchNorm, Adam lr 1e-5, embedding 128), read from
      $DMLJAX_WEIGHTS/bn_inception-52deb4733.pth (default ./weights/) or
      --config.model.pretrained=FILE (docs/backbones.md says where to get the file).
  --config=configs/own_data.py:small          a tiny network and 32 x 32 crops (tests, smoke runs).
"""
import ml_collections

from dmljax.configs import BN_INCEPTION_WEIGHTS, base_config, ccp_paper_config


def get_config(arg: str = ""):
  if arg == "bn_inception":
    c = ccp_paper_config("cub")  # BN-Inception, ImageNet weights, the paper's CUB settings
    c.dataset.name = ""
    # Validation classes fitted to the data set (not the paper configs' protocol fold 0).
    c.dataset.options = ml_collections.ConfigDict({"val_fraction": 0.2})
    c.sampler.fit_batch = True
    c.total_steps, c.eval_every_steps, c.patience_evals = 20_000, 50, 10
    assert c.model.pretrained.endswith(BN_INCEPTION_WEIGHTS)
    return c
  c = base_config()
  c.dataset.name = ""                  # --config.dataset.name=NAME (the prepare command's --name)
  c.dataset.options.val_fraction = 0.2  # of the training classes (at least 2; 2 left to train)
  c.model.name = "small_cnn"
  c.model.widths = (32, 64, 128)
  c.model.embedding_dim = 64
  c.input.size, c.input.resize = 64, 73
  c.framework = "ccp"
  c.ccp.proxies_per_class = 4
  c.ccp.pool_size = 8
  c.batch_size, c.sampler.m = 32, 4
  c.sampler.fit_batch = True           # fewer than 8 training classes: all of them in each batch
  c.total_steps, c.eval_every_steps, c.patience_evals = 2000, 50, 10
  c.checkpoint.every_steps = 500
  c.baselines = ("untrained",)
  if arg == "small":
    c.model.widths, c.model.embedding_dim = (4, 8), 8
    c.input.size, c.input.resize = 32, 36
    c.input.num_workers = 0
    c.ccp.proxies_per_class, c.ccp.pool_size = 2, 2
    c.total_steps, c.eval_every_steps, c.log_every_steps = 30, 15, 15
    c.checkpoint.every_steps = 15
    c.eval_batch_size = 64
  elif arg:
    raise ValueError(f"Unknown variant {arg!r} of own_data.py; valid: 'bn_inception', 'small'.")
  return c
