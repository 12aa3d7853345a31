#!/usr/bin/env bash
# Stage-2 alignment with a frozen OPT-6.7B (language modelling), 1 epoch.
# MODEL=blip2 runs the BLIP-2 twin; NPROC_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT: ../torchrun.sh.
# STAGE1_CKPT (required): the checkpoint to start from, e.g.
#   STAGE1_CKPT=output/xformer/pretrain_stage1/<job_id>/checkpoint_8.pth
# Extra arguments are k=v config overrides, e.g. run.batch_size_train=16.
set -euo pipefail
exec "$(dirname "$0")/../torchrun.sh" train projects/xformer/train/pretrain_stage2_opt6.7b.yaml \
  model.pretrained="${STAGE1_CKPT:?set STAGE1_CKPT to the checkpoint (see the comment at the top of $0)}" "$@"
