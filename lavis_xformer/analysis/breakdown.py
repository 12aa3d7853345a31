"""Where the time of one training step or one feature extraction goes, component by component.

    with component_labels(model):            # record_function ranges at the component boundaries
        table = profile_components(step)     # {component: CPU seconds}, forward and backward together

The components are the model's own submodules, found by attribute name, so the same labels cover X-Former and LAVIS's
BLIP-2 (whose code cannot carry labels of its own): the frozen CLIP-ViT (``visual_encoder`` + ``ln_vision``), the
frozen MAE encoder, the fusion (the dual block), the Q-Former (``Qformer`` and the heads around it), the frozen MAE
decoder (+ ``mae_out_proj``), the LLM (+ its projection) and the optimiser step. ``component_labels`` wraps each
component's forward in ``torch.profiler.record_function`` by forward hooks that exist only inside the block, so the
model costs nothing extra when not profiled.

The backward is attributed too: ``torch.profiler`` gives every backward node (``autograd::engine::evaluate_function``)
the sequence number of the forward op that created it, and that forward op lies inside a component's range. Whatever
runs outside every component (the losses' own arithmetic, masking, the tokenizer, autograd bookkeeping) is ``other``.
Times are each op's self CPU time (on CUDA: the time of the kernels it launched), so nested ranges are not counted
twice and the rows add up to the profiled total.
"""

import contextlib
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.autograd.profiler import record_function

# (label, attribute paths on the model), in the order of the image pathway.
COMPONENTS: List[Tuple[str, Tuple[str, ...]]] = [
    ("CLIP-ViT", ("visual_encoder", "ln_vision")),
    ("MAE encoder", ("mae_encoder",)),
    ("Q-Former", ("Qformer", "Qformer.bert", "Qformer.cls", "vision_proj", "text_proj", "itm_head")),
    ("fusion", ("dual_block", "mae_align")),
    ("MAE decoder", ("mae_decoder", "mae_out_proj")),
    ("LLM", ("opt_model", "t5_model", "opt_proj", "t5_proj")),
]
OPTIMISER = "optimiser"
OTHER = "other"
LABELS = [label for label, _ in COMPONENTS] + [OPTIMISER, OTHER]


def _modules_of(model: torch.nn.Module, paths) -> List[torch.nn.Module]:
    found = []
    for path in paths:
        module = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, torch.nn.Module):
            found.append(module)
    return found


@contextlib.contextmanager
def component_labels(model: torch.nn.Module):
    """Within the block, every component's forward runs inside ``record_function(label)``; hooks removed on exit.

    The hooks sit on every submodule of a component too, since model code may call a submodule directly (the dual
    block's work on M alone, ``fusion.MaeStream``; ITG's enriched cache through the Q-Former's key and value
    projections). A module called inside a range of its own component (the Q-Former's ``bert`` inside ``Qformer``)
    opens no second range."""
    handles, open_ranges, hooked = [], [], set()
    for label, paths in COMPONENTS:
        for module in (sub for top in _modules_of(model, paths) for sub in top.modules()):
            if id(module) in hooked:
                continue
            hooked.add(id(module))

            def enter(module, args, label=label):
                ranged = None
                if not open_ranges or open_ranges[-1][0] != label:
                    ranged = record_function(label)
                    ranged.__enter__()
                open_ranges.append((label, ranged))

            def leave(module, args, output):
                _, ranged = open_ranges.pop()
                if ranged is not None:
                    ranged.__exit__(None, None, None)

            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def labelled_optimiser_step(optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    def step():
        with record_function(OPTIMISER):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def _label_of(event, labels) -> Optional[str]:
    while event is not None:
        if event.name in labels:
            return event.name
        event = event.cpu_parent
    return None


def attribute(events, labels=LABELS, device_time: bool = False) -> Dict[str, float]:
    """Seconds per component from a profiler's ``events()`` (see the module docstring): each op's self CPU time, or
    with ``device_time`` the GPU time of the kernels it launched."""
    labels = set(labels)
    by_sequence: Dict[int, str] = {}
    backward_node = "autograd::engine::evaluate_function: "
    for event in events:  # forward ops: the component whose range holds them
        if event.sequence_nr >= 0 and not event.name.startswith(backward_node):
            label = _label_of(event, labels)
            if label is not None:
                by_sequence.setdefault(event.sequence_nr, label)
    seconds = {label: 0.0 for label in LABELS}
    for event in events:
        label = _label_of(event, labels)
        if label is None:  # a backward op: the component of the forward op its node came from
            node = event
            while node is not None and not node.name.startswith(backward_node):
                node = node.cpu_parent
            if node is not None:
                label = by_sequence.get(node.sequence_nr)
        own = event.self_device_time_total if device_time else event.self_cpu_time_total
        seconds[label or OTHER] += own / 1e6
    return seconds


def profile_components(fn: Callable[[], None], model: torch.nn.Module, repeats: int = 1) -> Dict[str, float]:
    """Mean seconds per call of ``fn`` per component (``fn`` already warmed up), with the model's components labelled:
    CPU time on a CPU, the kernels' time on CUDA (where an op's CPU time is only its launch)."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = any(p.is_cuda for p in model.parameters())
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with component_labels(model), profile(activities=activities) as prof:
        for _ in range(repeats):
            fn()
        if on_cuda:
            torch.cuda.synchronize()
    seconds = attribute(prof.events(), device_time=on_cuda)
    return {label: value / repeats for label, value in seconds.items()}
