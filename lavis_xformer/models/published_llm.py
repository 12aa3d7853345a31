"""Published configs of the frozen LLMs of stage 2, written out as dicts (the released checkpoints' config.json).

With them the paper-scale stage-2 models build on the ``meta`` device inside ``no_hub()`` (parameter and FLOP
counts) with no download. Keys are the hub names LAVIS's yaml files use (``opt_model`` / ``t5_model``).
"""

# facebook/opt-2.7b and facebook/opt-6.7b: the fields of their config.json that shape OPTForCausalLM.
_OPT_COMMON = dict(
    vocab_size=50272,
    max_position_embeddings=2048,
    activation_function="relu",
    do_layer_norm_before=True,
    dropout=0.1,
    attention_dropout=0.0,
    activation_dropout=0.0,
    layerdrop=0.0,
    init_std=0.02,
    enable_bias=True,
    layer_norm_elementwise_affine=True,
    pad_token_id=1,
    bos_token_id=2,
    eos_token_id=2,
    prefix="</s>",
    use_cache=True,
)
OPT_2_7B = dict(
    _OPT_COMMON,
    hidden_size=2560,
    word_embed_proj_dim=2560,
    num_hidden_layers=32,
    num_attention_heads=32,
    ffn_dim=10240,
)
OPT_6_7B = dict(
    _OPT_COMMON,
    hidden_size=4096,
    word_embed_proj_dim=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    ffn_dim=16384,
)

# google/flan-t5-xl (config.json). LAVIS then sets dense_act_fn="gelu" on it (see llm_builders.t5_config).
FLAN_T5_XL = dict(
    vocab_size=32128,
    d_model=2048,
    d_kv=64,
    d_ff=5120,
    num_layers=24,
    num_decoder_layers=24,
    num_heads=32,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dropout_rate=0.1,
    layer_norm_epsilon=1e-6,
    initializer_factor=1.0,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
    is_encoder_decoder=True,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
    use_cache=True,
)

OPT_CONFIGS = {"facebook/opt-2.7b": OPT_2_7B, "facebook/opt-6.7b": OPT_6_7B}
T5_CONFIGS = {"google/flan-t5-xl": FLAN_T5_XL}
