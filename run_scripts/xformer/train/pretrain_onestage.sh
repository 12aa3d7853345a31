#!/usr/bin/env bash
# One-stage training of a connector (BLIP-3's recipe: the LM loss only, the connector from random weights) on the
# BLIP-2 stage-2 data with a frozen OPT-2.7B (LLM=opt2.7b, default) or FlanT5-XL (LLM=flant5xl); same data and
# settings as BLIP-2's stage 2 (projects/xformer/train/pretrain_stage2_<LLM>_<MODEL>.yaml).
# MODEL (required): perceiver, perceiver_matched, projector, projector_llava or perceiver_dual (docs/connectors.md).
# NPROC_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT: ../torchrun.sh.
# Extra arguments are k=v config overrides, e.g. run.batch_size_train=16.
# Then: STAGE2_CKPT=output/$MODEL/pretrain_stage2_<LLM>/<job_id>/checkpoint_0.pth MODEL=$MODEL ../eval/vqav2_zeroshot_opt2.7b.sh
set -euo pipefail
: "${MODEL:?set MODEL to perceiver, perceiver_matched, projector, projector_llava or perceiver_dual}"
exec "$(dirname "$0")/../torchrun.sh" train "projects/xformer/train/pretrain_stage2_${LLM:-opt2.7b}.yaml" "$@"
