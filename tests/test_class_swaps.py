"""The in-place class swaps: all made through ``class_swaps.swap_class``, each registered and keeping the weights."""

import ast
import importlib
from pathlib import Path

import pytest
import torch
from lavis.models import load_model

import lavis_xformer  # noqa: F401  (registers the models)
from lavis_xformer.models.activation_checkpointing import CheckpointedLayer, checkpoint_trainable_layers
from lavis_xformer.models.class_swaps import SWAPS, mixed_class, swap_class
from lavis_xformer.models.fusion import EarlyCrossAttentionLayer
from lavis_xformer.models.mae_decoder import MaePatchDecoder
from lavis_xformer.models.sdpa import SdpaBertSelfAttention, use_reference_attention, use_sdpa_attention

PACKAGE = Path(lavis_xformer.__file__).parent
REPO = PACKAGE.parent


def _class_assignments(path: Path):
    """Line numbers of every ``x.__class__ = ...`` in a source file."""
    tree = ast.parse(path.read_text())
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Attribute) and t.attr == "__class__" for t in node.targets)
    ]


def test_no_class_is_swapped_outside_the_table_module():
    outside = {
        str(path.relative_to(PACKAGE)): lines
        for path in PACKAGE.rglob("*.py")
        if path.name != "class_swaps.py" and (lines := _class_assignments(path))
    }
    assert not outside, f"__class__ assigned outside models/class_swaps.py (use swap_class): {outside}"


@pytest.mark.parametrize("name", sorted(SWAPS))
def test_every_swap_names_its_maker_and_a_test_that_exists(name):
    swap = SWAPS[name]
    module_name, function_name = swap.made_by.rsplit(".", 1)
    module = importlib.import_module(f"lavis_xformer.models.{module_name}")
    source = Path(module.__file__).read_text()
    assert callable(getattr(module, function_name)), swap.made_by
    assert f'"{name}"' in source, f"{swap.made_by} does not pass the swap name {name!r} to swap_class"
    assert (REPO / swap.test).exists(), swap.test


def test_unregistered_or_unrelated_swaps_are_refused():
    layer = torch.nn.Linear(2, 2)
    with pytest.raises(KeyError, match="unregistered class swap 'mine'"):
        swap_class(layer, type("MyLinear", (torch.nn.Linear,), {}), "mine")
    with pytest.raises(TypeError, match="neither a subclass nor a parent of Linear"):
        swap_class(layer, torch.nn.Conv1d, "sdpa_attention")
    assert type(layer) is torch.nn.Linear


def test_mixed_classes_are_one_class_per_arguments():
    a = mixed_class(CheckpointedLayer, torch.nn.Linear, "Checkpointed")
    assert a is mixed_class(CheckpointedLayer, torch.nn.Linear, "Checkpointed")
    assert a.__name__ == "CheckpointedLinear" and issubclass(a, torch.nn.Linear)
    assert mixed_class(CheckpointedLayer, torch.nn.Linear, "X", flag=1) is not a


def _weights(model):
    return {name: tensor.data_ptr() for name, tensor in model.state_dict().items()}


def test_each_swap_keeps_every_weight_where_it_was():
    model = load_model("xformer", "tiny")  # the tiny type swaps SDPA in and the MAE decoder at build
    assert isinstance(model.mae_decoder, MaePatchDecoder)
    before = _weights(model)

    assert use_reference_attention(model) > 0
    assert not any(isinstance(m, SdpaBertSelfAttention) for m in model.modules())
    assert _weights(model) == before
    assert use_sdpa_attention(model) > 0
    assert _weights(model) == before

    assert checkpoint_trainable_layers(model) > 0
    assert checkpoint_trainable_layers(model) == 0  # already switched: nothing to do
    assert _weights(model) == before


def test_early_cross_attention_swap_adds_blocks_and_keeps_the_qformer_weights():
    plain = load_model("xformer", "tiny")
    early = load_model("xformer", "early_ca_tiny")
    layers = early.Qformer.bert.encoder.layer
    assert all(isinstance(layer, EarlyCrossAttentionLayer) for layer in layers)
    given = [i for i, layer in enumerate(layers) if layer.mae_block is not None]
    assert given and all(not layers[i].has_cross_attention for i in given)
    plain_keys = {k for k in plain.Qformer.state_dict() if ".mae_block." not in k}
    early_keys = {k for k in early.Qformer.state_dict() if ".mae_block." not in k}
    assert plain_keys == early_keys
