#!/usr/bin/env bash
# Stage-1 pre-training: 9 epochs on COCO, VG, CC3M, CC12M and SBU.
# MODEL=blip2 runs the BLIP-2 twin; NPROC_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT: ../torchrun.sh.
# Extra arguments are k=v config overrides, e.g. run.batch_size_train=16.
set -euo pipefail
exec "$(dirname "$0")/../torchrun.sh" train projects/xformer/train/pretrain_stage1.yaml "$@"
