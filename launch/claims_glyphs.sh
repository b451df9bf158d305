#!/usr/bin/env bash
# The papers' claims measured on glyphs in the papers' regime (pretrained trunk, fine-tuned):
# the K / gamma sweeps on validation (one seed), then every method and its plain loss over
# SEEDS, one run after another, each under `timeout`. Results: docs/results_glyphs.md, made by
#   python launch/claims_table.py ROOT
#
#   bash launch/claims_glyphs.sh /tmp/dmljax/claims "0 1 2" [--config.key=value ...]
#
# Extra arguments are passed to every run (e.g. --config.total_steps=200). A finished workdir
# is reused (the run resumes and returns at once), so an interrupted measurement continues.
# DMLJAX_RUN_TIMEOUT (seconds, default 900) bounds each run. DMLJAX_CLAIMS=others runs the sweeps
# and every method but the CCP family; DMLJAX_CLAIMS=ccp runs CCP, its single proxy problem,
# C1-CCP and the contrastive baseline (default: all).
set -uo pipefail
if (($# < 2)); then
  echo "Usage: bash launch/claims_glyphs.sh ROOT \"SEED ...\" [--config.key=value ...]" >&2
  exit 2
fi
root=$1; seeds=$2; shift 2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
limit=${DMLJAX_RUN_TIMEOUT:-900}
mkdir -p "$root"
# One persistent compilation cache for all runs: seeds of a config reuse its executables.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$root/jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}

run() {  # NAME CONFIG [overrides...]: one workdir per seed
  local name=$1 config=$2; shift 2
  for seed in $seeds; do
    echo "=== $name seed $seed ($(date -u +%H:%M:%S))"
    timeout "$limit" python -m dmljax.main --config="$config" --workdir="$root/$name/seed$seed" \
      --config.seed="$seed" --config.progress=False "$@" > "$root/$name.seed$seed.log" 2>&1 \
      || echo "  $name seed $seed: exit $?"
  done
}

sweep() {  # NAME CONFIG KEY VALUES [overrides...]: prints the winning override
  # The winner's run is seed 0 of NAME's seeds (same config, same seed): it is copied there.
  local name=$1 config=$2 key=$3 values=$4 best; shift 4
  python "$here/sweep.py" "$config" "$root/sweep_$name" "$key" "$values" --timeout="$limit" \
    -- "$@" > "$root/sweep_$name.log" 2>&1
  best=$(tail -n 1 "$root/sweep_$name.log")
  if [[ $best == --config.* && ! -e $root/$name/seed0 ]]; then
    mkdir -p "$root/$name"
    cp -r "$root/sweep_$name/$key=${best#*=}" "$root/$name/seed0"
  fi
  echo "$best"
}

others() {
  run c1 configs/glyphs_xbm_c1.py --config.framework=standard "$@"
  run xbm_c1 configs/glyphs_xbm_c1.py "$@"
  run xbm_c2 configs/glyphs_xbm.py "$@"
  # Batches of 8 classes x 5 (B = 40): the DRO paper's K grid 2B-3.5B; gamma over {0.1,...,0.9}.
  k_topk=$(sweep dro_topk configs/glyphs_dro_topk.py dro.kwargs.k 80,100,120,140 "$@")
  k_pn=$(sweep dro_topk_pn configs/glyphs_dro_topk.py:pn dro.kwargs.k 80,100,120,140 "$@")
  g_kl=$(sweep dro_kl configs/glyphs_dro_kl.py dro.kwargs.gamma 0.1,0.3,0.5,0.7,0.9 "$@")
  echo "chosen on validation: topk $k_topk, topk-pn $k_pn, kl $g_kl"
  for v in "$k_topk" "$k_pn" "$g_kl"; do
    [[ $v == --config.* ]] || { echo "a sweep failed (see $root/sweep_*.log)" >&2; exit 1; }
  done

  # The DRO methods' plain loss: the binomial base loss (TopK) and the margin base loss (KL) over
  # all pairs, every pair with a loss weighted alike, same batches.
  run binomial configs/glyphs_dro_topk.py:plain "$@"
  run margin configs/glyphs_dro_kl.py:plain "$@"
  run dro_topk configs/glyphs_dro_topk.py "$k_topk" "$@"
  run dro_topk_pn configs/glyphs_dro_topk.py:pn "$k_pn" "$@"
  run dro_kl configs/glyphs_dro_kl.py "$g_kl" "$@"
  run profs configs/glyphs_profs.py "$@"
  run profs_hncm configs/glyphs_profs_hncm.py "$@"
  run proxy_anchor configs/glyphs_proxy_anchor.py "$@"
  run soft_triple configs/glyphs_soft_triple.py "$@"
  run mpa configs/glyphs_mpa.py "$@"
}

ccp_family() {  # CCP and the losses it is compared with in-batch
  run contrastive configs/glyphs_contrastive.py "$@"
  run proxy configs/glyphs_proxy.py "$@"
  run ccp configs/glyphs_ccp.py "$@"
  run ccp_c1 configs/glyphs_ccp_c1.py "$@"
}

case ${DMLJAX_CLAIMS:-all} in
  all) others "$@" && ccp_family "$@" ;;
  others) others "$@" ;;
  ccp) ccp_family "$@" ;;
  *) echo "DMLJAX_CLAIMS must be all, others or ccp" >&2; exit 2 ;;
esac
python "$here/claims_table.py" "$root"
