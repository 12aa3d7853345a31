#!/usr/bin/env bash
# COCO image-text retrieval (Karpathy 5K test) with the stage-1 model, no fine-tuning.
# MODEL=blip2 runs the BLIP-2 twin; NPROC_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT: ../torchrun.sh.
# STAGE1_CKPT (required): the checkpoint to evaluate, e.g.
#   STAGE1_CKPT=output/xformer/pretrain_stage1/<job_id>/checkpoint_8.pth
# Extra arguments are k=v config overrides, e.g. run.batch_size_eval=16.
set -euo pipefail
exec "$(dirname "$0")/../torchrun.sh" evaluate projects/xformer/eval/ret_coco_stage1.yaml \
  model.pretrained="${STAGE1_CKPT:?set STAGE1_CKPT to the checkpoint (see the comment at the top of $0)}" "$@"
