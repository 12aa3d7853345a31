"""The switch that keeps model builds off the network: inside ``no_hub()`` every part is built from its config
with random weights and a size-only vocabulary (``models/builders.py`` and ``models/llm_builders.py`` read it).

It lives apart from the builders so that code below the models (``checkpoints``, which builds a model on the
``meta`` device to learn its trainable parameters) can use it without importing them.
"""

import contextlib
import contextvars

_HUB_ALLOWED = contextvars.ContextVar("lavis_xformer_hub_allowed", default=True)


@contextlib.contextmanager
def no_hub():
    """Build every part from its config with random weights and a size-only vocabulary; nothing is downloaded.

    Used for ``meta``-device builds of the paper-scale architectures (parameter and FLOP counts).
    """
    token = _HUB_ALLOWED.set(False)
    try:
        yield
    finally:
        _HUB_ALLOWED.reset(token)


def hub_allowed() -> bool:
    return _HUB_ALLOWED.get()
