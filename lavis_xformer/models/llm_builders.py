"""Builders for the frozen LLMs of stage 2 (OPT, FlanT5) and their tokenizers: from the hub, or offline.

LAVIS's ``Blip2OPT`` / ``Blip2T5`` load the LLM and its tokenizer from the hub inside ``__init__``. These builders
make the same objects (LAVIS's own ``OPTForCausalLM`` / ``T5ForConditionalGeneration`` copies, which the BLIP-2
code relies on) from a typed config:

* a hub checkpoint (``opt_model`` / ``t5_model``): the real weights and tokenizer, as LAVIS loads them;
* inside ``no_hub()``: the same architecture from ``published_llm.py`` with random weights (on the ``meta``
  device for parameter counts) and the tiny tokenizer as a stand-in (the vocabulary size comes from the config);
* no checkpoint (``tiny`` types): a random LLM of the ``llm_*`` sizes and tokenizer files shipped in
  ``lavis_xformer/assets``. ``python -m lavis_xformer.models.llm_builders [--out-dir DIR]`` regenerates those files
  into ``DIR`` (default: the user's cache folder; never into the installed package unless named).
"""

import argparse
import itertools
import logging
import re
from pathlib import Path

import torch
import torch.nn as nn
from lavis.models.blip2_models.modeling_opt import OPTConfig, OPTForCausalLM
from lavis.models.blip2_models.modeling_t5 import T5Config, T5ForConditionalGeneration
from transformers import AutoTokenizer, GPT2Tokenizer, T5TokenizerFast

from lavis_xformer.models import published_llm
from lavis_xformer.models.builders import ASSETS_DIR, hub_allowed, resolve_asset, standin_weights
from lavis_xformer.models.precision import DTYPES, log_choice_once, resolve_llm_precision

TINY_OPT_TOKENIZER = "tiny_opt"  # assets/tiny_opt-vocab.json + assets/tiny_opt-merges.txt (GPT-2 byte-level BPE)
TINY_T5_TOKENIZER = "tiny_t5"  # assets/tiny_t5-tokenizer.json (Unigram, T5's special-token layout)

# OPT's tokenizer (facebook/opt-*): GPT-2 BPE, "</s>" as bos/eos/unk and prepended to every text, "<pad>" at id 1.
OPT_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, as in OPT's vocab.json
# T5's tokenizer: <pad> 0, </s> 1, <unk> 2; "</s>" appended to every text.
T5_SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]
WORD_START = "\u2581"  # SentencePiece's "▁": marks a piece that begins a word


def llm_dtype(cfg, lavis_half: str) -> torch.dtype:
    """The frozen LLM's weight dtype (``precision.choose_llm_precision``: LAVIS's ``lavis_half`` with CUDA under
    ``llm_precision: auto``, fp32 on a CPU), logged once."""
    return DTYPES[log_choice_once("llm", resolve_llm_precision(cfg, lavis_half)).name]


def freeze_llm(model: nn.Module) -> nn.Module:
    """No gradient into the LLM. Like LAVIS, its train/eval mode is left alone (its own dropout is its config's)."""
    for param in model.parameters():
        param.requires_grad = False
    return model


# The Q-Former's text path: what ``drop_qformer_text_parts`` removes besides the MLM head (which no stage 2 runs).
_QFORMER_TEXT_PART = re.compile(
    r"(^|\.)Qformer\.bert\.(embeddings\.(word|position)_embeddings|encoder\.layer\.\d+\.(intermediate|output))\."
)


def is_qformer_text_part(name: str) -> bool:
    """Whether the parameter ``name`` belongs to the Q-Former's text path: word and position embeddings, each layer's
    text feed-forward (``intermediate`` / ``output``; not the queries' ``intermediate_query`` / ``output_query``)."""
    return bool(_QFORMER_TEXT_PART.search(name))


def keep_qformer_text_parts(qformer, vocab_size: int) -> None:
    """The Q-Former of VQA fine-tuning (``qformer_text_input``), as LAVIS's InstructBLIP builds it: the text path
    stays, the embeddings sized to the tokenizer with BLIP-2's [DEC] token (as in stage 1, so that stage-1 weights
    load), and the MLM head, which nothing runs, is removed. The last layer's text feed-forward still runs (LAVIS's
    ``BertLayer`` has no switch) but nothing reads its output, the query positions being the model's output: it
    is frozen, since no gradient reaches it (and DDP refuses trainable parameters without one)."""
    qformer.resize_token_embeddings(vocab_size)
    qformer.cls = None
    last_layer = qformer.bert.encoder.layer[-1]
    for unread in (last_layer.intermediate, last_layer.output):
        unread.requires_grad_(False)


def drop_qformer_text_parts(qformer) -> None:
    """The Q-Former parts stage 2 never runs (no text enters it), removed exactly as ``Blip2OPT.__init__`` does."""
    qformer.cls = None
    qformer.bert.embeddings.word_embeddings = None
    qformer.bert.embeddings.position_embeddings = None
    for layer in qformer.bert.encoder.layer:
        layer.output = None
        layer.intermediate = None


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------------------
def _local_files(prefix: str, *suffixes: str):
    paths = [resolve_asset(f"{prefix}-{suffix}") for suffix in suffixes]
    return paths if all(p.is_file() for p in paths) else None


def build_opt_tokenizer(name_or_prefix: str) -> GPT2Tokenizer:
    """OPT's slow GPT-2 tokenizer (LAVIS uses ``use_fast=False``): local BPE files, the hub, or the tiny stand-in."""
    local = _local_files(name_or_prefix, "vocab.json", "merges.txt")
    if local is None and not hub_allowed():
        local = _local_files(TINY_OPT_TOKENIZER, "vocab.json", "merges.txt")  # only the LLM's config sizes matter
    if local is None:
        return AutoTokenizer.from_pretrained(name_or_prefix, use_fast=False)
    vocab, merges = local
    return GPT2Tokenizer(
        vocab_file=str(vocab),
        merges_file=str(merges),
        bos_token="</s>",
        eos_token="</s>",
        unk_token="</s>",
        pad_token="<pad>",
        add_bos_token=True,
    )


def build_t5_tokenizer(name_or_prefix: str) -> T5TokenizerFast:
    """T5's fast tokenizer: a local tokenizer.json, the hub, or the tiny stand-in."""
    local = _local_files(name_or_prefix, "tokenizer.json")
    if local is None and not hub_allowed():
        local = _local_files(TINY_T5_TOKENIZER, "tokenizer.json")
    if local is None:
        return T5TokenizerFast.from_pretrained(name_or_prefix)
    return T5TokenizerFast(tokenizer_file=str(local[0]), extra_ids=0)


# ----------------------------------------------------------------------------------------------------------------
# OPT
# ----------------------------------------------------------------------------------------------------------------
def opt_config(cfg, vocab_size: int) -> OPTConfig:
    """The published config of ``cfg.opt_model``, or a random-size OPT from the ``llm_*`` fields."""
    if cfg.opt_model is not None:
        if cfg.opt_model not in published_llm.OPT_CONFIGS:
            raise ValueError(
                f"no published config for opt_model={cfg.opt_model!r} to build without the hub; known: "
                f"{sorted(published_llm.OPT_CONFIGS)} (add it to lavis_xformer/models/published_llm.py)"
            )
        return OPTConfig(**published_llm.OPT_CONFIGS[cfg.opt_model])
    return OPTConfig(
        **{
            **published_llm._OPT_COMMON,
            "vocab_size": cfg.llm_vocab_size or vocab_size,
            "hidden_size": cfg.llm_hidden_size,
            "word_embed_proj_dim": cfg.llm_hidden_size,
            "num_hidden_layers": cfg.llm_num_layers,
            "num_attention_heads": cfg.llm_num_heads,
            "ffn_dim": cfg.llm_ffn_dim,
            "max_position_embeddings": cfg.llm_max_positions,
        }
    )


def build_opt(cfg):
    """(tokenizer, frozen ``OPTForCausalLM``) as ``Blip2OPT.__init__`` makes them, from a config."""
    tokenizer = build_opt_tokenizer(cfg.llm_tokenizer or cfg.opt_model)
    dtype = llm_dtype(cfg, lavis_half="fp16")  # LAVIS's Blip2OPT: OPT in fp16
    if cfg.opt_model is not None and hub_allowed():
        model = OPTForCausalLM.from_pretrained(cfg.opt_model, torch_dtype=dtype)
    else:
        with standin_weights("opt"):
            model = OPTForCausalLM(opt_config(cfg, len(tokenizer))).to(dtype)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"the OPT tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size} embeddings"
        )
    return tokenizer, freeze_llm(model)


# ----------------------------------------------------------------------------------------------------------------
# FlanT5
# ----------------------------------------------------------------------------------------------------------------
def t5_config(cfg, vocab_size: int) -> T5Config:
    """The published config of ``cfg.t5_model`` (or random-size T5), with LAVIS's ``dense_act_fn = "gelu"``."""
    if cfg.t5_model is not None:
        if cfg.t5_model not in published_llm.T5_CONFIGS:
            raise ValueError(
                f"no published config for t5_model={cfg.t5_model!r} to build without the hub; known: "
                f"{sorted(published_llm.T5_CONFIGS)} (add it to lavis_xformer/models/published_llm.py)"
            )
        config = T5Config(**published_llm.T5_CONFIGS[cfg.t5_model])
    else:
        config = T5Config(
            **{
                **published_llm.FLAN_T5_XL,
                "vocab_size": cfg.llm_vocab_size or vocab_size,
                "d_model": cfg.llm_hidden_size,
                "d_kv": cfg.llm_head_dim,
                "d_ff": cfg.llm_ffn_dim,
                "num_layers": cfg.llm_num_layers,
                "num_decoder_layers": cfg.llm_num_layers,
                "num_heads": cfg.llm_num_heads,
            }
        )
    # Blip2T5.__init__ replaces FlanT5's gelu_new with exact gelu; the released BLIP-2 projections were trained so.
    config.dense_act_fn = "gelu"
    return config


def build_t5(cfg):
    """(tokenizer, frozen ``T5ForConditionalGeneration``) as ``Blip2T5.__init__`` makes them, from a config."""
    tokenizer = build_t5_tokenizer(cfg.llm_tokenizer or cfg.t5_model)
    dtype = llm_dtype(cfg, lavis_half="bf16")  # LAVIS's Blip2T5: T5 in bf16 (fp16 overflows it)
    if cfg.t5_model is not None and hub_allowed():
        config = T5Config.from_pretrained(cfg.t5_model)
        config.dense_act_fn = "gelu"
        model = T5ForConditionalGeneration.from_pretrained(cfg.t5_model, config=config, torch_dtype=dtype)
    else:
        with standin_weights("t5"):
            model = T5ForConditionalGeneration(t5_config(cfg, len(tokenizer))).to(dtype)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"the T5 tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size} embeddings"
        )
    return tokenizer, freeze_llm(model)


# ----------------------------------------------------------------------------------------------------------------
# The tiny tokenizer files (shipped in lavis_xformer/assets; this regenerates them)
# ----------------------------------------------------------------------------------------------------------------
_WORDS = {
    "colours": "red green blue yellow purple orange white black gray grey pink brown",
    "shapes": "circle circles square squares triangle triangles star stars shape shapes object objects",
    "numbers": "zero one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9 10",
    "sizes and places": "small large big tiny left right top bottom middle center above below next near far",
    "caption words": "a an the of in on at and or is are there this that it its has have with without to "
    "image picture photo background showing shows contains man woman dog cat car people person table cup "
    "plate bus train bird horse boat tree street room",
    "question words": "how many what which where who why when does do you see color colour shape kind yes no "
    "answer question short",
}
_PROMPTS = ["Question: {} Short answer:", "Question: {} Answer:", "a photo of", "a picture of"]
_QUESTIONS = [
    "how many {colour} {shape} are there?",
    "what color is the {shape}?",
    "what shape is {colour}?",
    "is there a {colour} {shape} in the image?",
    "which side is the {shape} on?",
]


def tiny_corpus():
    """Captions, questions and prompts over the shapes/colours/counting vocabulary of the tiny data."""
    words = " ".join(_WORDS.values()).split()
    colours, shapes = _WORDS["colours"].split(), _WORDS["shapes"].split()[:8]
    numbers = _WORDS["numbers"].split()[:11]
    lines = [" ".join(words), " ".join(w.capitalize() for w in words)]
    for number, colour, shape in itertools.product(numbers, colours, shapes):
        lines.append(f"there are {number} {colour} {shape} in the image.")
    for template, colour, shape in itertools.product(_QUESTIONS, colours, shapes):
        question = template.format(colour=colour, shape=shape)
        for prompt in _PROMPTS[:2]:
            lines.append(prompt.format(question) + " " + colour)
    lines += [f"{prompt} a {colour} {shape}\n" for prompt in _PROMPTS[2:] for colour in colours for shape in shapes]
    return lines


def write_tiny_tokenizers(out_dir: Path):
    """Train the tiny OPT byte-level BPE and the tiny T5 Unigram on ``tiny_corpus()`` and write them to ``out_dir``."""
    from tokenizers import ByteLevelBPETokenizer, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, processors

    corpus = tiny_corpus()
    out_dir = Path(out_dir)

    # OPT: GPT-2's byte-level BPE (all 256 bytes in the alphabet, so any text encodes; "\n" is one token, which
    # Blip2OPT uses as its end-of-answer id).
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(
        corpus, vocab_size=1024, min_frequency=2, special_tokens=OPT_SPECIAL_TOKENS, show_progress=False
    )
    bpe.save_model(str(out_dir), TINY_OPT_TOKENIZER)

    # T5: a Unigram model with T5's normaliser/pre-tokeniser/decoder conventions and "</s>" appended to every text.
    # Its vocabulary is written out rather than trained (EM on a corpus this small keeps mostly letters): every
    # word of the list is one piece, and any printable character is a fallback piece, so nothing becomes <unk>.
    words = sorted({w for line in _WORDS.values() for w in line.split()} | {"Question", "Short", "Answer", "answer"})
    words += [w.capitalize() for w in words if w.islower() and w.capitalize() not in words]
    characters = [chr(c) for c in range(33, 127)]
    pieces = [(token, 0.0) for token in T5_SPECIAL_TOKENS]
    pieces += [(WORD_START + word, -5.0) for word in words]  # one word: better than any split into >= 2 pieces
    pieces += [(WORD_START, -8.0)] + [(WORD_START + c, -9.0) for c in characters if c not in words]
    pieces += [(c, -10.0) for c in characters]
    unigram = Tokenizer(models.Unigram(pieces, unk_id=T5_SPECIAL_TOKENS.index("<unk>")))
    unigram.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    unigram.pre_tokenizer = pre_tokenizers.Metaspace(replacement=WORD_START, add_prefix_space=True)
    unigram.decoder = decoders.Metaspace(replacement=WORD_START, add_prefix_space=True)
    unigram.add_special_tokens(T5_SPECIAL_TOKENS)  # so decoding with skip_special_tokens drops them
    unigram.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", unigram.token_to_id("</s>"))]
    )
    unigram.save(str(out_dir / f"{TINY_T5_TOKENIZER}-tokenizer.json"))
    logging.info("wrote %s and %s tokenizer files to %s", TINY_OPT_TOKENIZER, TINY_T5_TOKENIZER, out_dir)


def default_tokenizer_out_dir() -> Path:
    """``lavis_xformer/tiny_tokenizers`` in the user's cache folder (``$XDG_CACHE_HOME`` or ~/.cache)."""
    import os

    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache_home) / "lavis_xformer" / "tiny_tokenizers"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Regenerate the tiny OPT and T5 tokenizer files of the `tiny` model types. They are written to "
                    "--out-dir, never into the installed package unless it is named: to replace the shipped files, "
                    f"pass --out-dir {ASSETS_DIR}.")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help=f"where to write them (default: {default_tokenizer_out_dir()})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    out_dir = args.out_dir if args.out_dir is not None else default_tokenizer_out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizers(out_dir)
    print(f"wrote {TINY_OPT_TOKENIZER}-vocab.json, {TINY_OPT_TOKENIZER}-merges.txt and "
          f"{TINY_T5_TOKENIZER}-tokenizer.json to {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
