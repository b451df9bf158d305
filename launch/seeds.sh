#!/usr/bin/env bash
# Runs one config over several seeds, one workdir per seed, then prints mean ± std of the final
# metrics. Extra arguments after the seeds are passed to dmljax.main (config overrides).
#
#   bash launch/seeds.sh configs/glyphs_ccp.py /tmp/dmljax/glyphs_ccp "0 1 2"
#   bash launch/seeds.sh configs/digits_ccp.py /tmp/dmljax/digits_std "0 1 2" --config.framework=standard
#
# Where a scheduler exists (sbatch on PATH) the seeds run as separate jobs: this hands over to
# launch/slurm.sbatch --array=seeds (one array element per seed, then a job that gathers them
# with python -m dmljax.report). DMLJAX_SCHEDULER=local runs them here one after another;
# DMLJAX_SCHEDULER=slurm insists on SLURM. SLURM options (--nodes, --gpus_per_node, ...) go in
# DMLJAX_SLURM_ARGS, e.g. DMLJAX_SLURM_ARGS="--gpus_per_node=1 --time=1-00:00:00".
#
# --dry-run (anywhere among the arguments): print the commands, run none.
set -euo pipefail
dry_run=0
args=()
for a in "$@"; do
  if [[ $a == --dry-run || $a == --dry_run ]]; then dry_run=1; else args+=("$a"); fi
done
set -- "${args[@]}"
if (($# < 3)); then
  echo "Usage: bash launch/seeds.sh [--dry-run] CONFIG ROOT \"SEED ...\" [--config.key=value ...]" >&2
  exit 2
fi
config=$1; root=$2; seeds=$3; shift 3
# Prints a command ("+ " first) and runs it unless --dry-run.
run() {
  echo "+ $*"
  ((dry_run)) || "$@"
}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
scheduler=${DMLJAX_SCHEDULER:-auto}
if [[ $scheduler == auto ]]; then
  if command -v sbatch > /dev/null; then scheduler=slurm; else scheduler=local; fi
fi
case $scheduler in
  slurm)
    read -r -a slurm_args <<< "${DMLJAX_SLURM_ARGS:-}"
    ((dry_run)) && slurm_args+=(--dry-run)
    exec bash "$here/slurm.sbatch" --array=seeds --seeds="$(echo "$seeds" | tr -s ' ' ',')" \
      --config="$config" --workdir="$root" "${slurm_args[@]}" -- "$@" ;;
  local) ;;
  *) echo "seeds.sh: DMLJAX_SCHEDULER must be auto, slurm or local, got '$scheduler'" >&2
     exit 2 ;;
esac
for seed in $seeds; do
  run python -m dmljax.main --config="$config" --workdir="$root/seed$seed" --config.seed="$seed" \
    --config.progress=False "$@"
done
run python "$here/summarize.py" "$root"/seed*
