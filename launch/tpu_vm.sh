#!/usr/bin/env bash
# Train with jaxsi on a Cloud TPU VM slice (v3-8, v3-32, v4-64, v5litepod-16, ...).
#
#   launch/tpu_vm.sh --name=jaxsi-v3-32 --zone=europe-west4-a --accelerator=v3-32 \
#       --config=configs/xsum_sft.py:t5_large --workdir=gs://my-bucket/runs/xsum_large \
#       -- --config.train.steps=20000
#
# Steps (each skippable):
#   1. create the TPU VM, or reuse it when one with that name already exists in the zone;
#   2. copy this checkout to every worker and install it (Python 3.11 venv + jax[tpu]);
#   3. run `python -m jaxsi.train` on ALL workers at once (one process per host; JAX finds
#      the other hosts by itself). The workdir must be a gs:// path every worker can write.
# Rerunning the same command resumes from the last checkpoint in the workdir, so after a
# preemption just run it again. --dry_run prints the gcloud commands instead of running them.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh --name=NAME --zone=ZONE --accelerator=TYPE --config=FILE[:variant]
                        --workdir=gs://BUCKET/PATH [options] [-- --config.KEY=VALUE ...]
options:
  --project=ID        gcloud project (default: gcloud's configured one)
  --version=IMAGE     TPU software version (default: from the accelerator generation)
  --spot              create a Spot (preemptible) VM
  --source=DIR        checkout to copy to the workers (default: this repository)
  --python=BIN        Python 3.11 interpreter on the workers (default: python3.11)
  --detach            start training under nohup (log: ~/jaxsi_train.log on each worker)
  --skip_create       do not create the VM (it must exist)
  --skip_install      do not copy or install jaxsi (already installed)
  --dry_run           print the commands without running anything
EOF
}

die() {
  echo "error: $*" >&2
  exit 2
}

NAME="" ZONE="" ACCELERATOR="" CONFIG="" WORKDIR="" PROJECT="" VERSION="" SPOT=0
SOURCE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="python3.11" DETACH=0 SKIP_CREATE=0 SKIP_INSTALL=0 DRY_RUN=0
OVERRIDES=()
while (($#)); do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --accelerator=*) ACCELERATOR="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --source=*) SOURCE="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --detach) DETACH=1 ;;
    --skip_create) SKIP_CREATE=1 ;;
    --skip_install) SKIP_INSTALL=1 ;;
    --dry_run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; OVERRIDES=("$@"); break ;;
    --config.*) OVERRIDES+=("$1") ;;
    *) usage >&2; die "unknown argument '$1'; see the options above." ;;
  esac
  shift
done

[[ -n "$NAME" ]] || die "--name is required (the TPU VM to create or reuse)."
[[ -n "$ZONE" ]] || die "--zone is required (e.g. --zone=europe-west4-a)."
[[ -n "$ACCELERATOR" ]] || die "--accelerator is required (e.g. --accelerator=v3-8)."
[[ -n "$CONFIG" ]] || die "--config is required (e.g. --config=configs/xsum_sft.py:t5_small)."
[[ "$WORKDIR" == gs://* ]] ||
  die "--workdir='$WORKDIR' must be a gs:// path: every worker writes checkpoints there."
for override in "${OVERRIDES[@]}"; do
  [[ "$override" == --config.*=* ]] ||
    die "'$override' is not a --config.KEY=VALUE override; put only overrides after --."
done

if [[ -z "$VERSION" ]]; then
  case "$ACCELERATOR" in
    v2-*|v3-*|v4-*) VERSION="tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) VERSION="v2-alpha-tpuv5-lite" ;;
    v5p-*) VERSION="v2-alpha-tpuv5" ;;
    v6e-*) VERSION="v2-alpha-tpuv6e" ;;
    *) die "no default --version for --accelerator=$ACCELERATOR; pass --version=IMAGE." ;;
  esac
fi

# Quote an argument only when the shell needs it, so dry-run output reads like a command.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

run() {
  if ((DRY_RUN)); then
    local line="+" arg
    for arg in "$@"; do line+=" $(quote "$arg")"; done
    echo "$line"
  else
    "$@"
  fi
}

GCLOUD_TPU=(gcloud compute tpus tpu-vm)
LOCATION=("--zone=$ZONE")
[[ -z "$PROJECT" ]] || LOCATION+=("--project=$PROJECT")

# 1. Create or reuse.
if ((!SKIP_CREATE)); then
  if ((DRY_RUN)); then
    echo "# create the VM unless '${GCLOUD_TPU[*]} describe $NAME' finds it"
    exists=0
  elif "${GCLOUD_TPU[@]}" describe "$NAME" "${LOCATION[@]}" --format='value(state)' \
      >/dev/null 2>&1; then
    echo "TPU VM $NAME already exists in $ZONE; reusing it."
    exists=1
  else
    exists=0
  fi
  if ((!exists)); then
    create=("${GCLOUD_TPU[@]}" create "$NAME" "${LOCATION[@]}"
            "--accelerator-type=$ACCELERATOR" "--version=$VERSION")
    if ((SPOT)); then create+=(--spot); fi
    run "${create[@]}"
  fi
fi

# 2. Copy the checkout (without git history, runs or caches) and install it on every worker.
REMOTE_DIR="jaxsi"
REMOTE_VENV="jaxsi-venv"
if ((!SKIP_INSTALL)); then
  archive="/tmp/jaxsi-src-$NAME.tar.gz"
  run tar -czf "$archive" -C "$SOURCE" --exclude=.git --exclude=runs --exclude=__pycache__ \
    --exclude=.venv --exclude=venv .
  run "${GCLOUD_TPU[@]}" scp "$archive" "$NAME:jaxsi-src.tar.gz" "${LOCATION[@]}" --worker=all
  install="set -e; rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR"
  install+=" && tar -xzf ~/jaxsi-src.tar.gz -C ~/$REMOTE_DIR"
  # TPU VM images ship an older Python; jaxsi needs 3.11 (Ubuntu 22.04 packages it).
  install+=" && (command -v $PYTHON >/dev/null || (sudo apt-get update -qq"
  install+=" && sudo apt-get install -y -qq $PYTHON ${PYTHON}-venv))"
  install+=" && ([ -x ~/$REMOTE_VENV/bin/python ] || $PYTHON -m venv ~/$REMOTE_VENV)"
  install+=" && ~/$REMOTE_VENV/bin/pip install -q -U pip"
  install+=" && ~/$REMOTE_VENV/bin/pip install -q -e ~/$REMOTE_DIR 'jax[tpu]>=0.10.2,<0.11'"
  run "${GCLOUD_TPU[@]}" ssh "$NAME" "${LOCATION[@]}" --worker=all --command="$install"
fi

# 3. Train on all workers: the same command on every host of the slice.
train="cd ~/$REMOTE_DIR && ~/$REMOTE_VENV/bin/python -m jaxsi.train"
train+=" --config=$(quote "$CONFIG") --workdir=$(quote "$WORKDIR")"
for override in "${OVERRIDES[@]}"; do train+=" $(quote "$override")"; done
if ((DETACH)); then
  train="nohup bash -c $(quote "$train") > ~/jaxsi_train.log 2>&1 &"
fi
run "${GCLOUD_TPU[@]}" ssh "$NAME" "${LOCATION[@]}" --worker=all --command="$train"

if ((DETACH)) && ((!DRY_RUN)); then
  echo "Training started on every worker of $NAME. Follow it with:"
  echo "  ${GCLOUD_TPU[*]} ssh $NAME --zone=$ZONE --worker=0 --command='tail -f ~/jaxsi_train.log'"
fi
