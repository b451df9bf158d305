#!/usr/bin/env bash
# Trains with dmljax on a Cloud TPU VM slice: creates the slice (or reuses it), installs dmljax on
# every worker, and starts `python -m dmljax.main` on all workers at once. Running the same
# command again after a preemption re-creates the slice and the run resumes from the newest
# checkpoint in the gs:// workdir. See docs/multihost.md.
#
#   bash launch/tpu_pod.sh --name=dml-v4 --zone=us-central2-b --type=v4-64 --spot \
#     --repo=https://github.com/ORG/dmljax.git --config=configs/glyphs_ccp.py \
#     --workdir=gs://BUCKET/runs/glyphs_ccp --data_dir=gs://BUCKET/tfds -- --config.seed=1
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bash launch/tpu_pod.sh --name=NAME --zone=ZONE --config=FILE[:VARIANT] --workdir=gs://...
                              (--repo=GIT_URL | --wheel=FILE | --no_install) [options]
                              [-- ARGS for python -m dmljax.main]

Creates (or reuses) a Cloud TPU VM slice, installs jax[tpu] and dmljax on every worker, copies
the config file to them and runs dmljax.main on all workers at once (--worker=all). A multi-host
slice runs one process per worker; dmljax.main initialises jax.distributed by itself there.
Checkpoints, metrics and TensorBoard logs go to the gs:// workdir (Orbax writes it directly), so
running the same command again resumes: a PREEMPTED slice is deleted and created again, and the
run continues from the newest checkpoint.

Required:
  --name=NAME            TPU VM name
  --zone=ZONE            zone, e.g. us-central2-b
  --config=FILE          config file on this machine (configs/NAME.py, optionally :VARIANT);
                         it is copied to every worker
  --workdir=gs://B/DIR   run directory in a Cloud Storage bucket (workers share no disk), or
                         an absolute path where every worker mounts one
  --repo=URL[@REF]       install dmljax from this git repository (pip install git+URL), or
  --wheel=FILE           copy this wheel / sdist tarball to the workers and pip install it, or
  --no_install           skip the installation (a reused slice that has it)

Options:
  --type=TYPE            accelerator type (default v4-8: one host; v4-64: eight hosts)
  --version=VERSION      TPU software version (default: the runtime image of the TPU type:
                         tpu-ubuntu2204-base for v2, v3, v4; v2-alpha-tpuv5-lite for v5e
                         (v5litepod); v2-alpha-tpuv5 for v5p; v2-alpha-tpuv6e for v6e)
  --project=PROJECT      Google Cloud project (default: gcloud's configured project)
  --spot                 create a Spot slice (can be preempted at any time)
  --preemptible          create a preemptible slice (older form of --spot)
  --data_dir=gs://B/DIR  TFDS data folder with the prepared data sets; TFDS_DATA_DIR on the
                         workers (what an empty config.dataset.data_dir means)
  --weights=FILE         ImageNet weight file (.pth) of the backbone, on this machine or in a
                         bucket (gs://...): copied to every worker (dmljax_weights/) and given
                         to dmljax.main as --config.model.pretrained (the loader reads local
                         files only)
  --jax=SPEC             pip requirement for JAX (default "jax[tpu]")
  --python=CMD           Python on the workers (default python3)
  --dry-run              print every command, run none
  -h, --help             this text

Arguments after -- go to python -m dmljax.main unchanged (--config.key=value overrides, ...).
EOF
}

die() {
  echo "tpu_pod.sh: error: $*" >&2
  echo "Run 'bash launch/tpu_pod.sh --help' for the usage." >&2
  exit 2
}

# ------------------------------------------------------------------------------ arguments
name="" zone="" type="v4-8" version="" project="" config="" workdir="" weights=""
data_dir="" repo="" wheel="" install=1 capacity="" jax_spec="jax[tpu]" python="python3"
dry_run=0
extra=()
while (($#)); do
  arg=$1
  shift
  if [[ $arg == -- ]]; then
    extra=("$@")
    break
  fi
  [[ $arg == -h || $arg == --help ]] && { usage; exit 0; }
  [[ $arg == --* ]] || die "unexpected argument '$arg' (dmljax.main arguments go after --)"
  key=${arg%%=*}
  key=${key#--}
  key=${key//-/_}
  case $key in
    dry_run) dry_run=1; continue ;;
    spot) capacity="--spot"; continue ;;
    preemptible) capacity="--preemptible"; continue ;;
    no_install) install=0; continue ;;
  esac
  if [[ $arg == *=* ]]; then
    value=${arg#*=}
  else
    (($#)) || die "--$key needs a value"
    value=$1
    shift
  fi
  case $key in
    name) name=$value ;;
    zone) zone=$value ;;
    type) type=$value ;;
    version) version=$value ;;
    project) project=$value ;;
    config) config=$value ;;
    workdir) workdir=$value ;;
    data_dir) data_dir=$value ;;
    weights) weights=$value ;;
    repo) repo=$value ;;
    wheel) wheel=$value ;;
    jax) jax_spec=$value ;;
    python) python=$value ;;
    *) die "unknown option --$key" ;;
  esac
done

missing=()
for required in name zone config workdir; do
  [[ -n ${!required} ]] || missing+=("--$required")
done
((${#missing[@]} == 0)) || die "missing ${missing[*]}"
if [[ $workdir != gs://* && $workdir != /* ]]; then
  die "--workdir=$workdir must be a gs:// bucket path, or an absolute path that every worker" \
    "mounts (the workers of a slice share no disk)"
fi
if ((install)); then
  [[ -n $repo || -n $wheel ]] || die "give --repo=GIT_URL or --wheel=FILE (or --no_install)"
  [[ -z $repo || -z $wheel ]] || die "give only one of --repo and --wheel"
fi
config_file=${config%%:*}
variant=""
[[ $config == *:* ]] && variant=":${config#*:}"
[[ -f $config_file ]] || die "--config: no file $config_file"
[[ -z $wheel || -f $wheel ]] || die "--wheel: no file $wheel"
[[ -z $weights || $weights == gs://* || -f $weights ]] || die "--weights: no file $weights"

# Hosts of the slice (one dmljax process per host): 8 cores or 4 chips per host on v2-v5p,
# up to 8 chips on one v5e / v6e host.
size=${type##*-}
[[ $size =~ ^[0-9]+$ ]] || die "--type=$type: expected a type like v4-8, v4-64, v5litepod-16"
case $type in
  v5litepod-* | v5e-* | v6e-*) workers=$((size <= 8 ? 1 : size / 4)) ;;
  *) workers=$((size <= 8 ? 1 : size / 8)) ;;
esac
# The runtime image of each TPU generation (v5e, v5p and v6e do not boot the v4 image).
if [[ -z $version ]]; then
  case $type in
    v2-* | v3-* | v4-*) version=tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) version=v2-alpha-tpuv5-lite ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
    *) die "--type=$type: unknown TPU generation; give its runtime image with --version" ;;
  esac
fi

# ------------------------------------------------------------------------------ commands
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone")
[[ -n $project ]] && where+=(--project="$project")

# The arguments as one shell-quoted line (plain words as they are, others in '...').
quote() {
  local word line=""
  for word in "$@"; do
    if [[ ! $word =~ ^[A-Za-z0-9_./:=,%@+-]+$ ]]; then
      word="'${word//\'/\'\\\'\'}'"
    fi
    line+="$word "
  done
  echo "${line% }"
}

# Prints a command ("+ " first) and runs it unless --dry-run.
run() {
  echo "+ $(quote "$@")"
  ((dry_run)) || "$@"
}

echo "# slice $name: $type in $zone, $workers worker(s) (one dmljax process each)"
echo "# 1. create the slice, or reuse it (READY); a PREEMPTED or TERMINATED one is re-created"
create=("${gcloud_tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$type"
        --version="$version")
[[ -n $capacity ]] && create+=("$capacity")
if ((dry_run)); then
  run "${gcloud_tpu[@]}" describe "$name" "${where[@]}" --format='value(state)'
  echo "# if it does not exist:"
  run "${create[@]}"
  echo "# if its state is PREEMPTED or TERMINATED:"
  run "${gcloud_tpu[@]}" delete "$name" "${where[@]}" --quiet
  run "${create[@]}"
else
  echo "+ $(quote "${gcloud_tpu[@]}" describe "$name" "${where[@]}" --format='value(state)')"
  state=$("${gcloud_tpu[@]}" describe "$name" "${where[@]}" --format='value(state)' \
    2>/dev/null || true)
  echo "# state: ${state:-absent}"
  case $state in
    "") run "${create[@]}" ;;
    READY) ;;
    PREEMPTED | TERMINATED)
      run "${gcloud_tpu[@]}" delete "$name" "${where[@]}" --quiet
      run "${create[@]}" ;;
    *) die "slice $name is $state; run the same command again once it is READY (or delete it)" ;;
  esac
fi

ssh_all=("${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all)
scp_all=("${gcloud_tpu[@]}" scp "${where[@]}" --worker=all)

echo "# 2. install JAX for TPUs and dmljax on every worker"
if ((install)); then
  if [[ -n $repo ]]; then
    package=$repo
    [[ $package == git+* ]] || package="git+$package"
  else
    run "${scp_all[@]}" "$wheel" "$name:$(basename "$wheel")"
    package="./$(basename "$wheel")"
  fi
  install_jax=$(quote "$python" -m pip install -U "$jax_spec")
  # gcsfs: the gs:// file system behind etils.epath (workdir logs, TFDS); google-cloud-storage:
  # tensorboardX's writer for gs://.
  install_dmljax=$(quote "$python" -m pip install -U "$package" gcsfs google-cloud-storage)
  run "${ssh_all[@]}" --command="$install_jax && $install_dmljax"
else
  echo "# (--no_install: using what the workers have)"
fi

echo "# 3. copy the config file (and the weight file) to every worker"
run "${scp_all[@]}" "$config_file" "$name:dmljax_config.py"
if [[ -n $weights ]]; then
  weights_arg=(--config.model.pretrained="dmljax_weights/$(basename "$weights")")
  if [[ $weights == gs://* ]]; then
    run "${ssh_all[@]}" --command="mkdir -p dmljax_weights && gcloud storage cp $(quote "$weights") dmljax_weights/"
  else
    run "${ssh_all[@]}" --command="mkdir -p dmljax_weights"
    run "${scp_all[@]}" "$weights" "$name:dmljax_weights/$(basename "$weights")"
  fi
else
  weights_arg=()
fi

echo "# 4. refuse to start a second trainer: is the workdir's lock held by a live run?"
# The trainers take the lock themselves (dmljax/lock.py); checking here first leaves a run that
# is alive on the slice untouched. A heartbeat older than DMLJAX_LOCK_STALE_S (300 s) is stale.
check_lock=$(quote "$python" -m dmljax.lock "$workdir")
if ((dry_run)); then
  run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=0 --command="$check_lock"
else
  echo "+ $(quote "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=0 --command="$check_lock")"
  if ! held=$("${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=0 --command="$check_lock" 2>&1); then
    die "$workdir is locked by a live run ($held); it is still training: wait for it, or stop it first"
  fi
fi

echo "# 5. train on all workers at once (resumes from the newest checkpoint in $workdir)"
env_vars=()
if [[ -n $data_dir ]]; then
  env_vars=(env TFDS_DATA_DIR="$data_dir")
fi
train=("${env_vars[@]}" "$python" -m dmljax.main --config="dmljax_config.py$variant"
       --workdir="$workdir" --config.progress=False "${weights_arg[@]}" "${extra[@]}")
run "${ssh_all[@]}" --command="$(quote "${train[@]}")"
((dry_run)) || echo "# done; if the slice was preempted, run the same command again to resume."
