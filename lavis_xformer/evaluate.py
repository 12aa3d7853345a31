"""Evaluate with LAVIS's machinery and the plugin: ``python -m lavis_xformer.evaluate --cfg-path X.yaml [--options ...]``.

Runs the config's ``run.test_splits`` with the weights the model config loads (``finetuned`` / ``pretrained``),
as LAVIS's evaluate.py does (``runner.evaluate(skip_reload=True)``). Under ``torchrun`` the ranks share the work.
Console script: ``lavis-xformer-evaluate``.
"""

from lavis_xformer.common import provenance
from lavis_xformer.launch import build_runner


def main(argv=None):
    # The metrics are logged and written to <output>/evaluate.txt; nothing is returned, as console scripts
    # pass main()'s return value to sys.exit. <output>/provenance.json says what produced them.
    runner = build_runner(argv, description="Evaluation")
    provenance.write_for_runner(runner)
    runner.evaluate(skip_reload=True)


if __name__ == "__main__":
    main()
