"""Train with LAVIS's machinery and the plugin: ``python -m lavis_xformer.train --cfg-path X.yaml [--options k=v ...]``.

Single process: ``python -m lavis_xformer.train --cfg-path projects/xformer/demo/pretrain_stage1_shapes.yaml``
Multi-GPU / multi-node, or several CPU processes (gloo): ``torchrun --nproc_per_node=N -m lavis_xformer.train ...``
(see run_scripts/xformer/). Console script: ``lavis-xformer-train``.
"""

from lavis_xformer.launch import build_runner


def main(argv=None):
    build_runner(argv, description="Training").train()


if __name__ == "__main__":
    main()
