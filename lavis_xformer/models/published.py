"""Published architecture configs of the frozen and pretrained parts, written out as dicts.

They let every paper-scale model build on the ``meta`` device (for parameter and FLOP counts) with no
download: the sizes are copied from the released checkpoints' configs.
"""

# EVA-CLIP ViT-g/14 as LAVIS builds it (``lavis.models.eva_vit.create_eva_vit_g``): 40 blocks were trained, LAVIS
# keeps 39 so that the output is the second-to-last layer, which BLIP-2 and X-Former both read.
EVA_VIT_G = dict(
    img_size=224,
    patch_size=14,
    embed_dim=1408,
    depth=39,
    num_heads=1408 // 88,
    mlp_ratio=4.3637,
)

# facebook/vit-mae-huge (config.json of the transformers checkpoint).
VIT_MAE_HUGE = dict(
    image_size=224,
    patch_size=14,
    num_channels=3,
    hidden_size=1280,
    num_hidden_layers=32,
    num_attention_heads=16,
    intermediate_size=5120,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    qkv_bias=True,
    decoder_hidden_size=512,
    decoder_num_hidden_layers=8,
    decoder_num_attention_heads=16,
    decoder_intermediate_size=2048,
    norm_pix_loss=False,
)

# bert-base-uncased (config.json), the Q-Former's initialisation in BLIP-2.
BERT_BASE_UNCASED = dict(
    vocab_size=30522,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    max_position_embeddings=512,
    type_vocab_size=2,
    initializer_range=0.02,
    layer_norm_eps=1e-12,
    pad_token_id=0,
    position_embedding_type="absolute",
)
BERT_BASE_UNCASED_VOCAB_SIZE = 30522


# ---------------------------------------------------------------------------------------------------------------
# Released weights
# ---------------------------------------------------------------------------------------------------------------
# X-Former's authors released no weights: the paper-scale model types of xformer / xformer_opt / xformer_t5
# (`pretrain`, `pretrain_opt2.7b`, `caption_coco_opt2.7b`, ...) are named after LAVIS's BLIP-2 types for
# symmetry, but only their frozen encoders and LLM (and the Q-Former's BERT initialisation) come from the hub.


def untrained_weights_notice(class_name: str, cfg):
    """The WARNING for a paper-scale model built with no checkpoint for its trainable parts (None for the
    offline ``tiny`` types, whose every weight is a stand-in anyway)."""
    paper_scale = getattr(cfg, "vit_weights", None) == "eva_clip_g" or getattr(cfg, "qformer_weights", None)
    if not paper_scale:
        return None
    if hasattr(cfg, "perceiver_depth") or hasattr(cfg, "projector_layers"):  # models/connector_llm.py
        return (f"{class_name}: no checkpoint was given: the connector, ln_vision and LLM projection are UNTRAINED "
                "(random initialisation). Expected when training it (one stage, projects/xformer/train/); otherwise "
                "set model.pretrained or model.finetuned")
    if hasattr(cfg, "dual_num_layers"):  # an X-Former architecture
        return (f"{class_name}: no released X-Former weights exist, and no checkpoint was given: the Q-Former, "
                "queries, dual cross-attention block (and LLM projection) are UNTRAINED (BERT / random "
                "initialisation). Expected when training stage 1 from scratch; otherwise train with "
                "projects/xformer/train/ and set model.pretrained (stage 2 / evaluation) or model.finetuned")
    return (f"{class_name}: no checkpoint was given: the Q-Former and queries are UNTRAINED (BERT / random "
            "initialisation). Expected when training stage 1 from scratch; LAVIS's released BLIP-2 weights load "
            "with model.pretrained set to their URL (see LAVIS's blip2 model yamls)")
