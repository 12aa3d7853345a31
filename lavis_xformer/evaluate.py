"""Evaluate with LAVIS's machinery and the plugin: ``python -m lavis_xformer.evaluate --cfg-path X.yaml [--options ...]``.

Runs the config's ``run.test_splits`` with the weights the model config loads (``finetuned`` / ``pretrained``),
as LAVIS's evaluate.py does (``runner.evaluate(skip_reload=True)``). Under ``torchrun`` the ranks share the work.
Console script: ``lavis-xformer-evaluate``. User errors before the evaluation starts: one line each, exit 1, as
``lavis_xformer.train``.
"""

import sys

from lavis_xformer.cli import USER_ERRORS, report_user_error, split_debug
from lavis_xformer.common import provenance
from lavis_xformer.launch import build_runner


def main(argv=None) -> int:
    # The metrics are logged and written to <output>/evaluate.txt; <output>/provenance.json says what produced them.
    argv, debug = split_debug(argv)
    try:
        runner = build_runner(argv, description="Evaluation")
    except USER_ERRORS as error:
        if debug:
            raise
        return report_user_error(error)
    provenance.write_for_runner(runner)
    runner.evaluate(skip_reload=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
