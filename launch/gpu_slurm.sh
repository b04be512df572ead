#!/usr/bin/env bash
# Multi-node GPU training with jaxsi under Slurm.
#
#   sbatch --nodes=4 launch/gpu_slurm.sh --config=configs/xsum_sft.py:t5_large \
#       --workdir=/shared/runs/xsum_large -- --config.mesh.fsdp=-1 --config.mesh.data=1
#
# srun starts one JAX process per node (default; each process drives all the node's GPUs) or
# one per GPU (--per=gpu). The processes find each other through Slurm's environment:
# jaxsi calls `jax.distributed.initialize()` when SLURM_NTASKS > 1, and JAX reads the
# coordinator, process count and process id from SLURM_* variables. The workdir must be on a
# filesystem every node sees (NFS, Lustre, gs://): each process writes its checkpoint shards
# there. Resubmitting the same command resumes from the last checkpoint.
# `bash launch/gpu_slurm.sh --dry_run ...` prints the srun command without running it.
#
#SBATCH --job-name=jaxsi
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=jaxsi-%j.out
set -euo pipefail

usage() {
  cat <<'EOF'
usage: sbatch [--nodes=N] launch/gpu_slurm.sh --config=FILE[:variant] --workdir=DIR [options]
              [-- --config.KEY=VALUE ...]
options:
  --per=node|gpu        one process per node (default) or one per GPU
  --gpus_per_node=N     GPUs on each node (default: $SLURM_GPUS_ON_NODE, else 8)
  --python=BIN          interpreter with jaxsi and jax[cuda] installed (default: python)
  --dry_run             print the srun command instead of running it
EOF
}

die() {
  echo "error: $*" >&2
  exit 2
}

CONFIG="" WORKDIR="" PER="node" PYTHON="python" DRY_RUN=0
GPUS_PER_NODE="${SLURM_GPUS_ON_NODE:-8}"
OVERRIDES=()
while (($#)); do
  case "$1" in
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --per=*) PER="${1#*=}" ;;
    --gpus_per_node=*) GPUS_PER_NODE="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --dry_run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; OVERRIDES=("$@"); break ;;
    --config.*) OVERRIDES+=("$1") ;;
    *) usage >&2; die "unknown argument '$1'; see the options above." ;;
  esac
  shift
done

[[ -n "$CONFIG" ]] || die "--config is required (e.g. --config=configs/xsum_sft.py:t5_small)."
[[ -n "$WORKDIR" ]] || die "--workdir is required (a directory every node can write)."
[[ "$PER" == node || "$PER" == gpu ]] || die "--per=$PER is invalid; use --per=node or --per=gpu."
[[ "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] ||
  die "--gpus_per_node=$GPUS_PER_NODE is invalid; pass a positive integer."
if ((!DRY_RUN)) && [[ -z "${SLURM_JOB_ID:-}" ]]; then
  die "not inside a Slurm allocation; submit with sbatch (or use --dry_run to see the command)."
fi
for override in "${OVERRIDES[@]}"; do
  [[ "$override" == --config.*=* ]] ||
    die "'$override' is not a --config.KEY=VALUE override; put only overrides after --."
done

if [[ "$PER" == node ]]; then
  # One task per node sees every GPU of its node. JAX would otherwise pin a Slurm task to the
  # GPU numbered like its SLURM_LOCALID (GPU 0 here), so list all of them explicitly.
  local_ids="$(seq -s, 0 $((GPUS_PER_NODE - 1)))"
  ENV=(env "JAX_LOCAL_DEVICE_IDS=$local_ids")
  TASKS_PER_NODE=1
else
  # One task per GPU: JAX pins task i of a node to GPU i (its SLURM_LOCALID) by itself.
  ENV=()
  TASKS_PER_NODE="$GPUS_PER_NODE"
fi

CMD=(srun "--ntasks-per-node=$TASKS_PER_NODE" "--gpus-per-node=$GPUS_PER_NODE" --kill-on-bad-exit=1)
# Share the node's CPUs among its tasks (input pipelines and host work run there); srun does
# not always inherit --cpus-per-task from the allocation.
if [[ -n "${SLURM_CPUS_ON_NODE:-}" ]]; then
  CMD+=("--cpus-per-task=$((SLURM_CPUS_ON_NODE / TASKS_PER_NODE))")
fi
CMD+=("${ENV[@]}" "$PYTHON" -m jaxsi.train "--config=$CONFIG" "--workdir=$WORKDIR" "${OVERRIDES[@]}")

quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

if ((DRY_RUN)); then
  line="+"
  for arg in "${CMD[@]}"; do line+=" $(quote "$arg")"; done
  echo "$line"
  exit 0
fi

echo "jaxsi: job $SLURM_JOB_ID on ${SLURM_JOB_NUM_NODES:-?} node(s), $TASKS_PER_NODE process(es)" \
     "per node, $GPUS_PER_NODE GPU(s) per node"
exec "${CMD[@]}"
