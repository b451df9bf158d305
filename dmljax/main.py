"""Command line: ``python -m dmljax.main --config=configs/glyphs_ccp.py --workdir=/tmp/run``.

``--config.key=value`` overrides any config entry. Before anything compiles the config file and
its keys are checked (a key the defaults do not have, outside the free-form blocks, is an error
naming the closest valid one; see :mod:`dmljax.config_check`), and so are sizes, the loss's
keyword arguments, the weight file and the data set. ``--print_config`` prints every key and
``--check`` runs the checks; both need no ``--workdir`` and create nothing. Without ``--workdir``
the run goes to ``runs/NAME``.

The workdir is locked for the run (:mod:`dmljax.lock`: a second run on it is refused). An
existing checkpoint in it is resumed; a finished run says so and exits 0; if the config changed
in a way that breaks exact resumption the run refuses, naming the keys, unless
``--allow_config_change`` is given, which also extends a finished run to a larger
``total_steps`` / ``patience_evals`` (:mod:`dmljax.extend`). Errors are one line on stderr and
exit status 2 (``--verbose`` or ``DMLJAX_VERBOSE=1`` shows the traceback); a run stopped by
SIGTERM saves and exits with status 75 (:data:`dmljax.cli.EXIT_PREEMPTED`). See
docs/running.md.

Several processes (docs/multihost.md): under SLURM (``srun``) and on multi-host Cloud TPU slices
``jax.distributed`` is initialised by itself; elsewhere give every process
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (or the variables
``DMLJAX_COORDINATOR_ADDRESS``, ``DMLJAX_NUM_PROCESSES``, ``DMLJAX_PROCESS_ID``). All processes
share one ``--workdir``; only process 0 writes the logs and metrics. See :mod:`dmljax.distributed`.
"""
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from dmljax import cli
from dmljax import config_check
from dmljax import console  # its clock starts here: the phases count from process start
from dmljax import distributed

PROG = "python -m dmljax.main"

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training configuration file (configs/*.py, or a copy anywhere).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory (or gs:// path) for checkpoints, logs and plots; default "
    "runs/NAME for --config=.../NAME.py (runs/NAME_VARIANT for NAME.py:VARIANT).")
_ALLOW_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Resume a run whose config differs from its checkpoint's, continuing with the new values.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks with error messages.")
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print every key of the config (after the overrides) and exit; needs "
    "no --workdir and creates nothing.")
_CHECK = flags.DEFINE_bool(
    "check", False, "Check the config (keys, values, loss arguments, weight file, data set) and "
    "exit; needs no --workdir, trains nothing and creates nothing.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "Multi-process runs: HOST:PORT of process 0's coordinator, the same for every process "
    f"(default ${distributed.ENV_COORDINATOR}; detected under SLURM and on TPU slices).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None,
    f"Multi-process runs: total number of processes (default ${distributed.ENV_NUM_PROCESSES}).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None,
    f"Multi-process runs: this process's index, 0..num_processes-1 (default "
    f"${distributed.ENV_PROCESS_ID}).")
_LOCAL_DEVICE_IDS = flags.DEFINE_string(
    "local_device_ids", None,
    "Multi-process runs: comma-separated local devices of this process (default "
    f"${distributed.ENV_LOCAL_DEVICE_IDS}, else all it sees).")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", None, list(distributed.MODES),
    "When to initialise jax.distributed: auto (several processes given or detected), on "
    f"(always, jax detects the cluster), off (never). Default ${distributed.ENV_MODE}, else auto.")


def _parse_flags(argv):
  """absl's flag parsing, with every failure (a config override too) as one clear message."""
  try:
    # The config file and the keys of its overrides, checked before absl loads it (absl's
    # messages for these cases are tracebacks or a bare key name).
    config_check.precheck(argv)
  except Exception as e:  # pylint: disable=broad-except
    sys.exit(cli.report(PROG, e, argv))
  try:
    rest = flags.FLAGS(argv)
    for name in ("config",):
      if flags.FLAGS[name].value is None:
        raise flags.IllegalFlagValueError(f"--{name} is required (e.g. --config=configs/"
                                          "glyphs_ccp.py --workdir=/tmp/dmljax/run).")
    return rest
  except flags.Error as e:
    text = str(e)
    if text.startswith("flag --config."):
      text += "; give a value of the type of the key's default (see --print_config)"
    sys.exit(cli.report(PROG, ValueError(f"{text} (see --helpshort)"), argv))
  except AttributeError as e:
    # ml_collections raises AttributeError for an override of a key the config does not have.
    sys.exit(cli.report(PROG, ValueError(
        f"unknown config key in a --config.* override: {cli.message(e)}; configs are locked, "
        "so check the spelling against the config file."), argv))
  except Exception as e:  # pylint: disable=broad-except
    sys.exit(cli.report(PROG, e, argv))


def default_workdir() -> str:
  """``runs/NAME`` (``runs/NAME_VARIANT``) for ``--config=path/NAME.py[:VARIANT]``."""
  import os  # pylint: disable=g-import-not-at-top
  raw = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--config=")), "config")
  path, _, variant = raw.partition(":")
  stem = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("runs", f"{stem}_{variant}" if variant else stem)


def main(argv):
  if len(argv) > 1:
    sys.exit(cli.report(PROG, ValueError(f"unexpected arguments: {argv[1:]}")))
  try:
    config = _CONFIG.value  # a config file that fails to load raises here
    if _PRINT_CONFIG.value:
      print(config_check.format_config(config))
      return
    config_check.check(config)  # values, loss arguments, weight file, data set
    if _CHECK.value:
      print(f"{PROG}: config OK ({len(config_check.flatten(config))} keys checked; "
            "run without --check to train)")
      return
    # A sign of life before JAX starts (it cannot ask JAX which process it is yet: the backend
    # must start after jax.distributed; the given or SLURM process id says it).
    import os  # pylint: disable=g-import-not-at-top
    if (_PROCESS_ID.value or int(os.environ.get(distributed.ENV_PROCESS_ID, "0") or 0)
        or int(os.environ.get("SLURM_PROCID", "0") or 0)) == 0:
      console.say(f"[{console.elapsed():6.1f}s] Config checked; starting JAX for "
                  f"{_WORKDIR.value or default_workdir()}", primary_only=False)
    # Before anything touches a JAX backend (train's import and everything after it).
    distributed.maybe_initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                 _LOCAL_DEVICE_IDS.value, mode=_DISTRIBUTED.value)
    from dmljax import train  # pylint: disable=g-import-not-at-top  (after flag parsing: XLA flags)
    logging.set_verbosity(logging.WARNING)
    result = train.train_and_evaluate(config, _WORKDIR.value or default_workdir(),
                                      allow_config_change=_ALLOW_CHANGE.value)
  except Exception as e:  # pylint: disable=broad-except
    sys.exit(cli.report(PROG, e))
  if result.get("preempted"):
    print(f"Preempted at step {result['step']}: saved; run the same command again to resume "
          f"(exit status {cli.EXIT_PREEMPTED}).", file=sys.stderr)
    sys.exit(cli.EXIT_PREEMPTED)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
