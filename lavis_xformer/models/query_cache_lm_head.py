"""The Q-Former's BERT LM head, able to decode captions from a given query cache (X-Former's ``generate``).

    query_cache: one (key, value) per Q-Former layer, [B, heads, Q, head width]  ->  caption tokens

LAVIS's ``prepare_inputs_for_generation`` runs [queries; text] through the Q-Former at every step, which reproduces
BLIP-2's ITG conditioning but not X-Former's, where the text attends to the enriched cache (``XFormer.itg_cache``).
"""

import torch
from lavis.models.blip2_models.Qformer import BertLMHeadModel


class QueryCacheLMHead(BertLMHeadModel):
    """LAVIS's Q-Former with its BERT LM head (same modules, same weights), able to decode from a given query cache.

    LAVIS's ``prepare_inputs_for_generation`` runs [queries; text] through the Q-Former at every step from
    ``query_embeds`` and the image, which reproduces BLIP-2's ITG conditioning but not X-Former's: there the text
    attends to the enriched cache (``XFormer.itg_cache``), which no ``query_embeds`` produce. Given ``query_cache``
    (one (key, value) per Q-Former layer, what ITG's text attends to), the first step feeds the [DEC] token against
    it and each later step the newest token against the cache grown by the text so far (the model's own
    ``past_key_values``). Without ``query_cache`` it is LAVIS's.
    """

    def prepare_inputs_for_generation(
        self, input_ids, query_embeds=None, past=None, attention_mask=None, query_cache=None, past_key_values=None,
        **model_kwargs,
    ):
        if query_cache is None:
            return super().prepare_inputs_for_generation(input_ids, query_embeds, past, attention_mask, **model_kwargs)
        if attention_mask is None:
            attention_mask = input_ids.new_ones(input_ids.shape)
        query_mask = input_ids.new_ones((input_ids.shape[0], query_cache[0][0].shape[2]))
        if past_key_values is None:
            past_key_values = query_cache
        else:
            input_ids = input_ids[:, -1:]
        return {
            "input_ids": input_ids,
            "attention_mask": torch.cat([query_mask, attention_mask], dim=-1),
            "past_key_values": past_key_values,
            "is_decoder": True,
        }
