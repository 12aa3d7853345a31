"""The plugin's runners; importing this module registers them with LAVIS."""

from lavis_xformer.runners.runner_xformer import RunnerXFormer

__all__ = ["RunnerXFormer"]
