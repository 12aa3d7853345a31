#!/usr/bin/env bash
# Zero-shot GQA test-dev (balanced) with the stage-2 OPT-6.7B model.
# MODEL=blip2 runs the BLIP-2 twin; NPROC_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT: ../torchrun.sh.
# STAGE2_CKPT (required): the checkpoint to evaluate, e.g.
#   STAGE2_CKPT=output/xformer/pretrain_stage2_opt6.7b/<job_id>/checkpoint_0.pth
# Extra arguments are k=v config overrides, e.g. run.batch_size_eval=16.
set -euo pipefail
exec "$(dirname "$0")/../torchrun.sh" evaluate projects/xformer/eval/gqa_zeroshot_opt6.7b.yaml \
  model.pretrained="${STAGE2_CKPT:?set STAGE2_CKPT to the checkpoint (see the comment at the top of $0)}" "$@"
