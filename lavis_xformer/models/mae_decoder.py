"""The frozen MAE decoder, able to predict some patches only: the reconstruction loss reads the masked ones alone.

    M' tokens [B, 1 + visible, decoder input width], ids_restore [B, N], patches [B, n] -> logits [B, n, patch pixels]

Every decoder layer but the last runs on all tokens, as ``ViTMAEDecoder.forward`` does; the last computes only the
requested patches' rows (their queries still attend to every token). The class is swapped onto the built decoder
(``predict_some_patches``): same modules, same weights.
"""

import torch
from transformers.models.vit_mae.modeling_vit_mae import ViTMAEDecoder, ViTMAEDecoderOutput

from lavis_xformer.models.class_swaps import swap_class
from lavis_xformer.models.masking import gather_tokens
from lavis_xformer.models.sdpa import SdpaViTMAESelfAttention


class MaePatchDecoder(ViTMAEDecoder):
    """transformers' MAE decoder; given ``patches`` ([B, n] indices), ``logits`` are [B, n, patch pixels]."""

    def forward(self, hidden_states, ids_restore, output_attentions=False, output_hidden_states=False,
                return_dict=True, patches=None):
        last = self.decoder_layers[-1]
        rows_only = isinstance(last.attention.attention, SdpaViTMAESelfAttention)  # it takes ``query_rows``
        if patches is None or output_attentions or output_hidden_states or not rows_only:
            output = super().forward(hidden_states, ids_restore, output_attentions, output_hidden_states)
            if patches is not None:
                output.logits = gather_tokens(output.logits, patches)
            return output if return_dict else output.to_tuple()
        # embedding, mask tokens, un-shuffling and positions: ViTMAEDecoder.forward's
        embedded = self.decoder_embed(hidden_states)
        mask_tokens = self.mask_token.expand(embedded.shape[0], ids_restore.shape[1] + 1 - embedded.shape[1], -1)
        patch_tokens = torch.cat([embedded[:, 1:], mask_tokens], dim=1)
        patch_tokens = gather_tokens(patch_tokens, ids_restore)
        hidden = torch.cat([embedded[:, :1], patch_tokens], dim=1) + self.decoder_pos_embed
        for layer in self.decoder_layers[:-1]:
            hidden = layer(hidden)[0]
        rows = patches + 1  # [CLS] is token 0
        context = last.attention.attention(last.layernorm_before(hidden), query_rows=rows)[0]
        residual = gather_tokens(hidden, rows)
        hidden = last.attention.output(context, None) + residual
        hidden = last.output(last.intermediate(last.layernorm_after(hidden)), hidden)
        logits = self.decoder_pred(self.decoder_norm(hidden))
        return ViTMAEDecoderOutput(logits=logits) if return_dict else (logits,)


def predict_some_patches(decoder: ViTMAEDecoder) -> MaePatchDecoder:
    """Make a built transformers MAE decoder a ``MaePatchDecoder``, in place."""
    return swap_class(decoder, MaePatchDecoder, "mae_patch_decoder")
