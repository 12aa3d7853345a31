#!/usr/bin/env bash
# Supplement Table 5 "w/o HFlip": stage-1 pre-training as pretrain_stage1.sh without the horizontal flip augmentation.
# MODEL=blip2 runs the BLIP-2 twin; NPROC_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT: ../torchrun.sh.
# Extra arguments are k=v config overrides, e.g. run.batch_size_train=16.
set -euo pipefail
exec "$(dirname "$0")/../torchrun.sh" train projects/xformer/train/pretrain_stage1_no_hflip.yaml "$@"
