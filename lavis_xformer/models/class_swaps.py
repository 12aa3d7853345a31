"""Every in-place class swap the models make, in one table (``SWAPS``), and the one function that makes them.

    swap_class(module, new_class, "sdpa_attention")     # module.__class__ = new_class, checked and registered

The attention, layers and encoders come from LAVIS's and transformers' constructors. A swap gives such a built module
a subclass of its class (or, undoing one, its parent back): the same parameters, buffers and state-dict keys, other
forward code. Each entry names the function that makes the swap and the test that checks the swapped module against
the original; ``tests/test_class_swaps.py`` checks that no ``__class__`` is assigned anywhere else.
"""

from dataclasses import dataclass
from typing import Dict, Tuple

import torch.nn as nn


@dataclass(frozen=True)
class ClassSwap:
    made_by: str  # the function that swaps, as module.function under lavis_xformer.models
    what: str  # which classes become which
    test: str  # the test file that checks the swapped forward against the original


SWAPS: Dict[str, ClassSwap] = {
    "sdpa_attention": ClassSwap(
        "sdpa.use_sdpa_attention",
        "LAVIS's Q-Former BertSelfAttention, EVA ViT attention, transformers' ViTMAESelfAttention -> SDPA subclasses",
        "tests/test_sdpa.py",
    ),
    "reference_attention": ClassSwap(
        "sdpa.use_reference_attention", "the SDPA subclasses back to their parents", "tests/test_sdpa.py"
    ),
    "half_precision": ClassSwap(
        "precision.run_in_half_precision",
        "a frozen encoder -> a subclass running under autocast to fp16 / bf16, outputs fp32",
        "tests/test_precision.py",
    ),
    "activation_checkpointing": ClassSwap(
        "activation_checkpointing.checkpoint_trainable_layers",
        "Q-Former and dual-block layers -> subclasses that recompute their activations in the backward",
        "tests/test_activation_checkpointing.py",
    ),
    "early_cross_attention": ClassSwap(
        "fusion.add_early_cross_attention",
        "Q-Former BertLayer -> EarlyCrossAttentionLayer (an MAE cross-attention block after the layer, where given)",
        "tests/test_variants.py",
    ),
    "mae_patch_decoder": ClassSwap(
        "mae_decoder.predict_some_patches",
        "transformers' ViTMAEDecoder -> MaePatchDecoder (its last layer computes the requested patches only)",
        "tests/test_xformer_stage1.py",
    ),
}


def swap_class(module: nn.Module, new_class: type, swap: str) -> nn.Module:
    """Give ``module`` the class ``new_class`` in place, for the registered swap ``swap``; returns ``module``.

    ``new_class`` must be a subclass of the module's class (or its parent, undoing a swap), so that every attribute
    the old class's code set is still what the new class's code reads.
    """
    if swap not in SWAPS:
        raise KeyError(f"unregistered class swap {swap!r}: add it to SWAPS in lavis_xformer/models/class_swaps.py")
    old_class = type(module)
    if not (issubclass(new_class, old_class) or issubclass(old_class, new_class)):
        raise TypeError(
            f"class swap {swap!r}: {new_class.__name__} is neither a subclass nor a parent of {old_class.__name__}"
        )
    module.__class__ = new_class
    return module


_MIXED: Dict[Tuple[type, type, tuple], type] = {}


def mixed_class(mixin: type, cls: type, prefix: str, **attributes) -> type:
    """The class ``prefix + cls.__name__`` with ``mixin`` placed before ``cls`` (one per arguments, cached), so that
    every swap of the same class gives the same new class."""
    key = (mixin, cls, tuple(sorted(attributes.items(), key=lambda item: item[0])))
    if key not in _MIXED:
        _MIXED[key] = type(f"{prefix}{cls.__name__}", (mixin, cls), {"__module__": cls.__module__, **attributes})
    return _MIXED[key]
