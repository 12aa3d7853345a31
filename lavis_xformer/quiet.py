"""Third-party warnings that are no concern of the plugin's users, filtered narrowly (category, module, message).

They come from LAVIS 1.0.2's own code: at import, fairscale's use of the deprecated ``torch.cuda.amp.custom_fwd/bwd``
and the ``torch.jit.script`` decorators in LAVIS's and timm's modules; at the first forward, LAVIS's
``maybe_autocast`` (deprecated ``torch.cuda.amp.autocast``, and "CUDA is not available" on a CPU). Nothing a user
of the plugin can change; everything else (including every other FutureWarning/DeprecationWarning of these
libraries) still shows. Installed by ``lavis_xformer/__init__.py`` before it imports LAVIS: every entry point
(``python -m lavis_xformer.train`` / ``evaluate`` / ``check`` / ``demo`` / ``compare``, the console scripts) imports
the package first, so this is the one place that precedes those imports.
"""

import warnings

# (category, module the warning is attributed to (regex), message start (regex))
THIRD_PARTY_IMPORT_WARNINGS = (
    (FutureWarning, r"fairscale(\.|$)", r"`torch\.cuda\.amp\.custom_(fwd|bwd)"),
    (FutureWarning, r"torch\.jit\._script$", r"`torch\.jit\.script` is deprecated"),
    # LAVIS's Blip2Base.maybe_autocast calls torch.cuda.amp.autocast, which on a CPU-only machine also says so
    (FutureWarning, r"lavis\.models\.blip2_models\.blip2$", r"`torch\.cuda\.amp\.autocast"),
    (UserWarning, r"torch\.cuda\.amp\.autocast_mode$", r"CUDA is not available"),
)


def filter_third_party_warnings() -> None:
    for category, module, message in THIRD_PARTY_IMPORT_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
