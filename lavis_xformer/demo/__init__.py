"""The demo (``make demo``): X-Former and BLIP-2, trained and evaluated side by side on the embedded shapes data.

    python -m lavis_xformer.demo                      # CPU: about 3 minutes on 2 idle cores; output/demo/
    python -m lavis_xformer.demo --smoke --out /tmp/d # the same pipeline on a few images (the test suite runs it)
    python -m lavis_xformer.demo --device cuda --jobs 1 --options run.batch_size_train=128

Setup: the shapes data is generated (once, before any run), and the frozen encoders get their stand-ins. The paper's
are hub weights; the ``tiny`` types' are random, which leaves nothing for a frozen MAE decoder to reconstruct with
or for a visual prefix to steer in a frozen LLM. So the demo pretrains the tiny MAE (``standins.MAE_STANDIN``: MAE's own
objective on the training images) and the tiny OPT (``standins.LLM_STANDIN``: a text LM on the training captions and
question-answer pairs), saves them with ``save_pretrained`` and passes them to the runs as ``model.mae_weights``
(X-Former) and ``model.opt_model`` (stage 2 and VQA, both models), frozen like hub weights (``--random-mae``,
``--random-llm``: keep the random ones). The CLIP-ViT stays random (both models share it).

For each model -- X-Former (``xformer`` / ``xformer_opt``) and its twin BLIP-2 (LAVIS's ``Blip2Qformer`` /
``Blip2OPT`` as ``blip2_baseline`` / ``blip2_baseline_opt``) -- it runs, as subprocesses, the plugin's LAVIS entry
points on the yamls in ``projects/xformer/demo/`` (each ``_blip2`` twin differs only in ``model:`` and its output
folder)::

    1. stage 1   python -m lavis_xformer.train    --cfg-path pretrain_stage1_shapes.yaml    (ITC, ITM, ITG [, rec])
    2. retrieval python -m lavis_xformer.evaluate --cfg-path ret_shapes_eval.yaml           (zero-shot, test split)
    3. stage 2   python -m lavis_xformer.train    --cfg-path pretrain_stage2_shapes.yaml    (LM loss, frozen OPT)
    4. VQA       python -m lavis_xformer.evaluate --cfg-path vqa_shapes_eval.yaml           (zero-shot, test split)

each stage starting from the checkpoint of the one before (``model.finetuned`` / ``model.pretrained``). The two
models' pipelines run side by side on the CPU (``--jobs 2``: one thread each, which on 2 cores is faster than one
after the other) and their output is streamed with a ``[X-Former]`` / ``[BLIP-2]`` prefix. Then it reads LAVIS's
outputs (``<run>/<job id>/log.txt``: one json line of epoch averages per epoch; ``evaluate.txt``: the metrics;
``result/*.json``: the predictions) and writes to ``--out``:

* ``demo_results.json`` / ``demo_results.md`` -- the side-by-side table (also printed): parameter counts, final
  stage-1 losses, retrieval R@1/5/10 (text and image), the final stage-2 LM loss, VQA accuracy overall and per
  question type (counting = the "number" answers, identification = "yes/no"), plus a few example answers;
* ``loss_curves.png`` -- per-epoch training losses of both models (stage 1: total and each term; stage 2: LM);
* ``reconstructions.png`` -- test images, their MAE masks (ratio 0.5, a fixed draw) and what the trained X-Former
  reconstructs from M' through the frozen MAE decoder;
* ``runs/<model>/<stage>/`` -- the LAVIS output folders, ``logs/<model>_<stage>.log`` -- each run's full output.

Sizes and steps live in the yamls alone (the ``tiny`` models, 2048 training images, epochs, learning rates), so
the same demo runs larger by editing them or with ``--options`` (applied to every run, e.g. ``run.device=cuda``).
``--smoke`` shrinks the data and epochs (``SMOKE_OPTIONS``) for the test suite.

Modules: ``pipeline`` (what runs, the settings, the subprocess runner, LAVIS's output folders), ``standins`` (the
pretrained MAE and OPT stand-ins), ``report`` (parameter counts, tables, figures via ``analysis.figures``),
``__main__`` (the command: setup, both pipelines, report).
"""
