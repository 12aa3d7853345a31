"""Train with LAVIS's machinery and the plugin: ``python -m lavis_xformer.train --cfg-path X.yaml [--options k=v ...]``.

Single process: ``python -m lavis_xformer.train --cfg-path projects/xformer/demo/pretrain_stage1_shapes.yaml``
Multi-GPU / multi-node, or several CPU processes (gloo): ``torchrun --nproc_per_node=N -m lavis_xformer.train ...``
(see run_scripts/xformer/). Console script: ``lavis-xformer-train``. A user error found before training starts (the
config, data or checkpoint paths, the output folder) is one ``error:`` line per problem and exit status 1;
``--debug`` (or ``LAVIS_XFORMER_DEBUG=1``) shows the traceback. An error during training keeps its traceback (a crash
hours in must be diagnosable from its log).
"""

import sys

from lavis_xformer.cli import USER_ERRORS, report_user_error, split_debug
from lavis_xformer.launch import build_runner


def main(argv=None) -> int:
    argv, debug = split_debug(argv)
    try:
        runner = build_runner(argv, description="Training")
    except USER_ERRORS as error:
        if debug:
            raise
        return report_user_error(error)
    runner.train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
