"""Write configs/models/<arch>/<arch>_<type>.yaml for the connector types (models/connector_llm.py).

    python tools/generate_connector_yamls.py          # (re)write them
    python tools/generate_connector_yamls.py --check  # exit 1 if one differs from what this script writes

Each yaml is a shared block (the frozen CLIP-ViT, the frozen LLM, the processors: BLIP-2's, so that a comparison
differs only in the connector) plus the connector's fields, listed in ``CONNECTORS`` below.
"""

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "configs" / "models"

TINY_VIT = """\
  image_size: 32
  vit_weights: null
  vit_patch_size: 8
  vit_embed_dim: 32
  vit_depth: 2
  vit_num_heads: 2
  vit_mlp_ratio: 2.0
  vit_precision: fp32
"""
TINY_MAE = """\
  use_mae: True
  mae_weights: null
  mae_image_size: 32
  mae_patch_size: 8
  mae_hidden_size: 48
  mae_num_layers: 2
  mae_num_heads: 2
  mae_intermediate_size: 96
  mae_decoder_hidden_size: 32
  mae_decoder_num_layers: 1
  mae_decoder_num_heads: 2
  mae_decoder_intermediate_size: 64
  mask_ratio: 0.5
  eval_mask_ratio: 0.0
  reconstruction_loss: True
  dual_num_layers: 1
  dual_num_heads: 2
  dual_intermediate_size: 64
"""
PAPER_MAE = """\
  use_mae: True
  mae_weights: facebook/vit-mae-huge
  mask_ratio: 0.5        # the paper's stage-1 masking: the reconstruction loss trains in this one stage
  eval_mask_ratio: 0.0
  reconstruction_loss: True
  dual_num_layers: 1
  dual_num_heads: 16     # 1408 = 16 x 88 (the dual block runs at the perceiver's width, the CLIP-ViT's)
  dual_intermediate_size: 5632
"""
TINY_LLM = {
    "opt": """\
  opt_model: null
  llm_tokenizer: tiny_opt
  llm_precision: fp32
  llm_hidden_size: 64
  llm_num_layers: 2
  llm_num_heads: 4
  llm_ffn_dim: 128
  llm_max_positions: 128
  prompt: ""
  max_txt_len: 32
""",
    "t5": """\
  t5_model: null
  llm_tokenizer: tiny_t5
  llm_precision: fp32
  llm_hidden_size: 64
  llm_num_layers: 2
  llm_num_heads: 4
  llm_head_dim: 16
  llm_ffn_dim: 128
  prompt: ""
  max_txt_len: 32
""",
}
PAPER_LLM = {
    "opt2.7b": "  opt_model: facebook/opt-2.7b\n  llm_precision: auto  # as blip2_baseline_opt's: OPT in fp16 with CUDA; "
               "fp32 on a CPU\n  prompt: \"\"\n  max_txt_len: 32\n",
    "flant5xl": "  t5_model: google/flan-t5-xl\n  llm_precision: auto  # as blip2_baseline_t5's: FlanT5 in bf16 with "
                "CUDA; fp32 on a CPU\n  prompt: \"\"\n  max_txt_len: 32\n",
}
LLM_WIDTH = {"opt2.7b": 2560, "flant5xl": 2048, "opt": 64, "t5": 64}

PERCEIVER_BLIP3 = dict(num_query_token=128, perceiver_depth=6, perceiver_num_heads=16, perceiver_head_dim=96,
                       perceiver_ff_mult=4)
# BLIP-2's stage-2 trainable count (Q-Former without its text parts + ln_vision + projection: 107.1M with OPT-2.7B)
# and token count (32): BLIP-3's head width (96), 4 layers of 18 heads: 106.0M with the projection (analysis.params).
PERCEIVER_MATCHED = dict(num_query_token=32, perceiver_depth=4, perceiver_num_heads=18, perceiver_head_dim=96,
                         perceiver_ff_mult=4)
PERCEIVER_TINY = dict(num_query_token=8, perceiver_depth=2, perceiver_num_heads=2, perceiver_head_dim=16,
                      perceiver_ff_mult=2)


def fields(values: dict) -> str:
    return "".join(f"  {key}: {value}\n" for key, value in values.items())


def preprocess(size: int, vqa: bool) -> str:
    text = "blip_question" if vqa else "blip_caption"
    return f"""
preprocess:
  vis_processor:
    train:
      name: "xformer_image_train"
      image_size: {size}
    eval:
      name: "xformer_image_eval"
      image_size: {size}
  text_processor:
    train:
      name: "{text}"
    eval:
      name: "{text}"
"""


def yaml_text(arch, comment, connector, llm, size=224, vqa=False, mae=False, tiny=False):
    vit = TINY_VIT if tiny else (
        f"  image_size: {size}\n  vit_weights: eva_clip_g\n  vit_precision: fp16\n  freeze_vit: True\n"
        + ("  freeze_vit_layernorms: False   # supplement section 2: the CLIP-ViT's layer norms train\n"
           "  use_grad_checkpoint: True\n" if vqa else "")
    )
    llm_text = TINY_LLM[llm] if tiny else PAPER_LLM[llm]
    mae_text = (TINY_MAE if tiny else PAPER_MAE) if mae else ""
    vqa_text = '  vqa_prompt: "Question: {} Short Answer:"   # the question enters the LLM prompt\n' if vqa else ""
    pretrained = ('""   # the same type\'s one-stage checkpoint (pretrain_...), or a checkpoint to evaluate'
                  if not tiny else '""')
    return (
        "".join(f"# {line}\n" for line in comment.splitlines())
        + f"model:\n  arch: {arch}\n  load_finetuned: False\n  load_pretrained: True\n  pretrained: {pretrained}\n"
        + '  finetuned: ""\n\n'
        + vit + "\n  # connector\n" + fields(connector) + ("\n" + mae_text if mae_text else "")
        + "\n  # frozen LLM\n" + llm_text + vqa_text
        + preprocess(32 if tiny else size, vqa)
    )


def connector_yamls():
    """{path: text} of every connector yaml."""
    out = {}
    for llm, paper in (("opt", "opt2.7b"), ("t5", "flant5xl")):
        width = LLM_WIDTH[paper]
        # ---- perceiver ----
        arch = f"perceiver_{llm}"
        out[f"{arch}/{arch}_tiny.yaml"] = yaml_text(
            arch, f"Perceiver Resampler + frozen {llm.upper()}, tiny: random weights, local tokenizers; offline.",
            PERCEIVER_TINY, llm, tiny=True)
        out[f"{arch}/{arch}_pretrain_{paper}.yaml"] = yaml_text(
            arch, f"Perceiver Resampler with xGen-MM (BLIP-3)'s hyperparameters (depth 6, 16 heads x 96, 128 latents, "
            f"ff x4) + frozen {paper},\none stage, LM loss only; frozen EVA-CLIP ViT-g as BLIP-2's.",
            PERCEIVER_BLIP3, paper)
        out[f"{arch}/{arch}_pretrain_matched_{paper}.yaml"] = yaml_text(
            arch, f"Perceiver Resampler parameter- and token-matched to BLIP-2's Q-Former (32 latents, 4 layers of "
            f"18 heads x 96)\n+ frozen {paper}, one stage, LM loss only.",
            PERCEIVER_MATCHED, paper)
        out[f"{arch}/{arch}_vqa_ft_{paper}.yaml"] = yaml_text(
            arch, f"Perceiver Resampler (BLIP-3 hyperparameters) + frozen {paper}: VQA fine-tuning at 490 px (the "
            "question in the LLM prompt);\nset `pretrained` to the one-stage checkpoint.",
            PERCEIVER_BLIP3, paper, size=490, vqa=True)
        # ---- projector ----
        arch = f"projector_{llm}"
        out[f"{arch}/{arch}_tiny.yaml"] = yaml_text(
            arch, f"Average-pooled patch tokens + MLP + frozen {llm.upper()}, tiny: random weights; offline.",
            dict(num_query_token=4, projector_layers=2, projector_hidden_size=64), llm, tiny=True)
        out[f"{arch}/{arch}_pretrain_{paper}.yaml"] = yaml_text(
            arch, f"MM1's average-pooling connector (16 x 16 patches pooled to 8 x 8 = 64 tokens) + a 2-layer GELU "
            f"MLP + frozen {paper},\none stage, LM loss only.",
            dict(num_query_token=64, projector_layers=2, projector_hidden_size=width), paper)
        out[f"{arch}/{arch}_pretrain_llava_{paper}.yaml"] = yaml_text(
            arch, f"LLaVA-1.5's projector: every patch token (256 at 224 px) through mlp2x_gelu + frozen {paper},\n"
            "one stage, LM loss only.",
            dict(num_query_token=0, projector_layers=2, projector_hidden_size=width), paper)
        out[f"{arch}/{arch}_vqa_ft_{paper}.yaml"] = yaml_text(
            arch, f"MM1 average-pooling projector (64 tokens) + frozen {paper}: VQA fine-tuning at 490 px;\nset "
            "`pretrained` to the one-stage checkpoint.",
            dict(num_query_token=64, projector_layers=2, projector_hidden_size=width), paper, size=490, vqa=True)
        # ---- perceiver + dual block over the MAE ----
        arch = f"perceiver_dual_{llm}"
        out[f"{arch}/{arch}_tiny.yaml"] = yaml_text(
            arch, f"Perceiver + X-Former's dual block over the frozen MAE + frozen {llm.upper()}, tiny; offline.",
            PERCEIVER_TINY, llm, mae=True, tiny=True)
        out[f"{arch}/{arch}_pretrain_{paper}.yaml"] = yaml_text(
            arch, f"Perceiver Resampler (BLIP-3 hyperparameters) whose latents the dual cross-attention enriches with "
            f"the frozen MAE ViT-H,\n+ frozen {paper}; one stage, LM loss + MAE reconstruction.",
            PERCEIVER_BLIP3, paper, mae=True)
    return {MODELS / path: text for path, text in out.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a yaml differs from what would be written")
    args = parser.parse_args(argv)
    stale = []
    for path, text in {**connector_yamls(), **run_yamls()}.items():
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path.relative_to(ROOT)))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if stale:
        print("stale connector yamls (run python tools/generate_connector_yamls.py):", *stale, sep="\n  ")
        return 1
    return 0



# ---- run yamls: the BLIP-2 twin's train / eval yamls with only `model:` and the output folder changed ----------
PROJECTS = ROOT / "projects" / "xformer"
# MODEL name (run_scripts/xformer/torchrun.sh's MODEL=...) -> (OPT arch and pretrain type, T5 arch and type, title)
RUN_CONNECTORS = {
    "perceiver": ("perceiver_opt", "pretrain_opt2.7b", "perceiver_t5", "pretrain_flant5xl",
                  "Perceiver Resampler, BLIP-3 hyperparameters"),
    "perceiver_matched": ("perceiver_opt", "pretrain_matched_opt2.7b", "perceiver_t5", "pretrain_matched_flant5xl",
                          "Perceiver Resampler matched to the Q-Former's parameters and tokens"),
    "projector": ("projector_opt", "pretrain_opt2.7b", "projector_t5", "pretrain_flant5xl",
                  "MM1 average-pooling projector, 64 tokens"),
    "projector_llava": ("projector_opt", "pretrain_llava_opt2.7b", "projector_t5", "pretrain_llava_flant5xl",
                        "LLaVA-1.5 MLP projector of every patch"),
    "perceiver_dual": ("perceiver_dual_opt", "pretrain_opt2.7b", "perceiver_dual_t5", "pretrain_flant5xl",
                       "perceiver + X-Former's dual block over the frozen MAE"),
}
RUN_TWINS = {  # the BLIP-2 yaml -> (which model section, what `pretrained` is)
    "train/pretrain_stage2_opt2.7b": ("pretrain", "opt", None),
    "train/pretrain_stage2_flant5xl": ("pretrain", "t5", None),
    "train/vqa_ft": ("vqa_ft", "opt", "pretrain_stage2_opt2.7b"),
    "train/vqa_ft_flant5xl": ("vqa_ft", "t5", "pretrain_stage2_flant5xl"),
    "eval/vqav2_zeroshot_opt2.7b": ("pretrain", "opt", "pretrain_stage2_opt2.7b"),
    "eval/gqa_zeroshot_opt2.7b": ("pretrain", "opt", "pretrain_stage2_opt2.7b"),
    "eval/okvqa_zeroshot_opt2.7b": ("pretrain", "opt", "pretrain_stage2_opt2.7b"),
    "eval/gqa_zeroshot_flant5xl": ("pretrain", "t5", "pretrain_stage2_flant5xl"),
    "eval/okvqa_zeroshot_flant5xl": ("pretrain", "t5", "pretrain_stage2_flant5xl"),
}


def run_yamls():
    """{path: text}: for each twin and connector, ``<twin>_<connector>.yaml``."""
    out = {}
    for twin, (kind, llm, source) in RUN_TWINS.items():
        text = (PROJECTS / f"{twin}_blip2.yaml").read_text()
        head, rest = text.split("\nmodel:\n", 1)
        rest = rest[rest.index("\ndatasets:"):]
        for name, (opt_arch, opt_type, t5_arch, t5_type, title) in RUN_CONNECTORS.items():
            arch, model_type = (opt_arch, opt_type) if llm == "opt" else (t5_arch, t5_type)
            if kind == "vqa_ft":
                if name not in ("perceiver", "projector"):
                    continue  # VQA fine-tuning types exist for the BLIP-3 perceiver and the MM1 projector
                model_type = model_type.replace("pretrain", "vqa_ft")
            if source is None:  # one-stage training from the frozen encoders and LLM
                pretrained = ("  load_pretrained: False   # one stage (BLIP-3's recipe): the connector starts random\n"
                              '  pretrained: ""\n')
            else:
                pretrained = ("  load_pretrained: True\n  # The checkpoint to start from / evaluate (pass --options "
                              "model.pretrained=... ; see run_scripts).\n"
                              f'  pretrained: "output/{name}/{source}/<job_id>/checkpoint_0.pth"\n')
            body = re.sub(r'output_dir: "output/blip2/', f'output_dir: "output/{name}/', rest)
            comment = (f"# {title} ({arch}, {model_type}): generated by tools/generate_connector_yamls.py from\n"
                       f"# {twin}_blip2.yaml, whose data and settings it keeps; only `model:` and the output folder "
                       "differ.\n")
            out[PROJECTS / f"{twin}_{name}.yaml"] = (
                comment + f"model:\n  arch: {arch}\n  model_type: {model_type}\n  load_finetuned: False\n"
                + pretrained + body
            )
    return out


if __name__ == "__main__":
    sys.exit(main())
