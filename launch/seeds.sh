#!/usr/bin/env bash
# Runs one config over several seeds, one workdir per seed, then prints mean ± std of the final
# metrics. Extra arguments after the seeds are passed to dmljax.main (config overrides).
#
#   bash launch/seeds.sh configs/glyphs_ccp.py /tmp/dmljax/glyphs_ccp "0 1 2"
#   bash launch/seeds.sh configs/digits_ccp.py /tmp/dmljax/digits_std "0 1 2" --config.framework=standard
set -euo pipefail
config=$1; root=$2; seeds=$3; shift 3
for seed in $seeds; do
  python -m dmljax.main --config="$config" --workdir="$root/seed$seed" --config.seed="$seed" \
    --config.progress=False "$@"
done
python launch/summarize.py "$root"/seed*
