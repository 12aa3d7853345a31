#!/usr/bin/env bash
# VQAv2 fine-tuning on VQAv2 train+val and Visual Genome QA (supplement section 2), image 490, lr 1e-5: the question
# enters the Q-Former, the LLM learns "Question: {} Short answer:" -> one drawn answer.
# MODEL=blip2 runs the BLIP-2 twin; NPROC_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT: ../torchrun.sh.
# LLM=opt2.7b (default) or flant5xl: projects/xformer/train/vqa_ft.yaml or vqa_ft_flant5xl.yaml.
# STAGE2_CKPT (required): the stage-2 checkpoint to start from, e.g.
#   STAGE2_CKPT=output/xformer/pretrain_stage2_opt2.7b/<job_id>/checkpoint_0.pth
# STAGE1_CKPT (required): the stage-1 checkpoint stage 2 started from; the Q-Former's text weights come from it, e.g.
#   STAGE1_CKPT=output/xformer/pretrain_stage1/<job_id>/checkpoint_8.pth
# Extra arguments are k=v config overrides, e.g. run.batch_size_train=16.
set -euo pipefail
case "${LLM:-opt2.7b}" in
  opt2.7b) cfg=projects/xformer/train/vqa_ft.yaml ;;
  flant5xl) cfg=projects/xformer/train/vqa_ft_flant5xl.yaml ;;
  *) echo "LLM must be opt2.7b or flant5xl, not '${LLM}'" >&2; exit 2 ;;
esac
case "${MODEL:-xformer}" in
  perceiver|projector)  # one-stage connectors: no Q-Former, so no text parts to supply (docs/connectors.md)
    exec "$(dirname "$0")/../torchrun.sh" train "$cfg" \
      model.pretrained="${STAGE2_CKPT:?set STAGE2_CKPT to the one-stage checkpoint (train/pretrain_onestage.sh)}" "$@" ;;
esac
exec "$(dirname "$0")/../torchrun.sh" train "$cfg" \
  model.pretrained="${STAGE2_CKPT:?set STAGE2_CKPT to the checkpoint (see the comment at the top of $0)}" \
  model.qformer_text_init="${STAGE1_CKPT:?set STAGE1_CKPT to the stage-1 checkpoint (see the comment at the top of $0)}" "$@"
