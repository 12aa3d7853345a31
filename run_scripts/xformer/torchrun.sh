#!/usr/bin/env bash
# Shared launcher of the run scripts: torchrun on one node or several, LAVIS's machinery with the plugin.
#
#   run_scripts/xformer/torchrun.sh train|evaluate CONFIG.yaml [k=v ...]
#
# Environment (torchrun's multi-node rendezvous; defaults: one node with every visible GPU):
#   NPROC_PER_NODE  processes (GPUs) per node       default: number of GPUs (nvidia-smi), else 1
#   NNODES          nodes                            default: 1
#   NODE_RANK       this node's rank, 0..NNODES-1    default: 0
#   MASTER_ADDR     address of the node with rank 0  default: 127.0.0.1
#   MASTER_PORT     a free port on that node         default: 29500
#   MODEL=blip2     run the BLIP-2 twin of CONFIG (CONFIG with _blip2 before .yaml): same data and settings;
#                   likewise the connectors (docs/connectors.md): perceiver, perceiver_matched, projector,
#                   projector_llava, perceiver_dual
# Extra k=v arguments are LAVIS config overrides (all go into one --options list).
set -euo pipefail

if [ $# -lt 2 ] || { [ "$1" != train ] && [ "$1" != evaluate ]; }; then
  sed -n '2,15p' "$0" >&2
  exit 2
fi
entry=$1
cfg=$2
shift 2

case "${MODEL:-xformer}" in
  xformer) ;;
  blip2|perceiver|perceiver_matched|projector|projector_llava|perceiver_dual) cfg=${cfg%.yaml}_${MODEL}.yaml ;;
  *) echo "MODEL must be xformer, blip2, perceiver, perceiver_matched, projector, projector_llava or" \
       "perceiver_dual, not '${MODEL}'" >&2
     exit 2 ;;
esac

cd "$(dirname "$0")/../.."
[ -f "$cfg" ] || { echo "no config $cfg" >&2; exit 2; }

if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$( (nvidia-smi --list-gpus 2>/dev/null || true) | grep -c '^GPU' || true)
  [ "$NPROC_PER_NODE" -gt 0 ] || NPROC_PER_NODE=1
fi

options=()
[ $# -gt 0 ] && options=(--options "$@")

set -x
exec torchrun \
  --nproc_per_node="$NPROC_PER_NODE" \
  --nnodes="${NNODES:-1}" \
  --node_rank="${NODE_RANK:-0}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" \
  --master_port="${MASTER_PORT:-29500}" \
  -m "lavis_xformer.$entry" --cfg-path "$cfg" "${options[@]}"
