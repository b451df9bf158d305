"""Command line: ``python -m dmljax.main --config=configs/digits_ccp.py --workdir=/tmp/run``.

``--config.key=value`` overrides any config entry; the config is locked, so a misspelt key is an
error instead of a silently ignored setting. An existing checkpoint in ``--workdir`` is resumed.
"""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training configuration file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and plots.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from dmljax import train  # pylint: disable=g-import-not-at-top  (after flag parsing: XLA flags)
  logging.set_verbosity(logging.WARNING)
  result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if result.get("preempted"):
    logging.warning("Preempted at step %d; run the same command again to resume.", result["step"])


if __name__ == "__main__":
  app.run(main)
