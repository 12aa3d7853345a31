"""The demo (``make demo``): X-Former and BLIP-2, trained and evaluated side by side on the embedded shapes data.

    python -m lavis_xformer.demo                      # CPU, 3 seeds: about 14 min on 2 idle cores; output/demo/
    python -m lavis_xformer.demo --seeds 5            # more seeds: narrower intervals
    python -m lavis_xformer.demo --smoke --out /tmp/d # the same pipeline on a few images, 2 seeds (the test suite's)
    python -m lavis_xformer.demo --device cuda --jobs 1 --options run.batch_size_train=128

Setup: the shapes data is generated (once, before any run), and the frozen encoders get their stand-ins. The paper's
are hub weights; the ``tiny`` types' are random, which leaves both Q-Formers only random image features, nothing for
a frozen MAE decoder to reconstruct with and no language for a visual prefix to steer. So the demo pretrains, once
for all seeds, the tiny CLIP-ViT (``standins.CLIP_STANDIN``: CLIP's contrastive objective on the training images and
captions, with a tiny BERT text tower that is then discarded), the tiny MAE (``standins.MAE_STANDIN``: MAE's own
objective on the training images) and the tiny OPT (``standins.LLM_STANDIN``: a text LM on the training captions
and question-answer pairs, each after its image's caption placed before the BOS token, the slot the visual prefix
takes, so that the LM learns to read that slot), and passes them to the runs as ``model.vit_weights`` (every run of both models: one
file, the same CLIP for both), ``model.mae_weights`` (X-Former) and ``model.opt_model`` (the LLM stages), frozen
like hub weights (``--random-clip``, ``--random-mae``, ``--random-llm``: keep the random ones).

For each model -- X-Former (``xformer`` / ``xformer_opt``) and its twin BLIP-2 (LAVIS's ``Blip2Qformer`` /
``Blip2OPT`` as ``blip2_baseline`` / ``blip2_baseline_opt``) -- it runs, as subprocesses, the plugin's LAVIS entry
points on the yamls in ``projects/xformer/demo/`` (each ``_blip2`` twin differs only in ``model:`` and its output
folder)::

    1. stage 1   python -m lavis_xformer.train    --cfg-path pretrain_stage1_shapes.yaml    (ITC, ITM, ITG [, rec])
    2. retrieval python -m lavis_xformer.evaluate --cfg-path ret_shapes_eval.yaml           (zero-shot, test split)
    3. stage 2   python -m lavis_xformer.train    --cfg-path pretrain_stage2_shapes.yaml    (LM loss, frozen OPT)
    4. VQA       python -m lavis_xformer.evaluate --cfg-path vqa_shapes_eval.yaml           (zero-shot, test split)
    5. VQA FT    python -m lavis_xformer.train    --cfg-path vqa_ft_shapes.yaml             (answers; then test split)

each stage starting from the checkpoint of the one before (``model.finetuned`` / ``model.pretrained``; VQA
fine-tuning also reads the Q-Former's text parts from stage 1, ``model.qformer_text_init``). Every seed
(``--seeds N``: 0..N-1, ``run.seed`` of every run) reruns all of it for both models. The two models' pipelines run
side by side on the CPU (``--jobs 2``: one thread each, which on 2 cores is faster than one after the other) and
their output is streamed with a ``[X-Former seed k]`` / ``[BLIP-2 seed k]`` prefix. Then it reads LAVIS's outputs
(``<run>/<job id>/log.txt``: one json line of epoch averages per epoch, read by ``pipeline.epoch_stats`` alone;
``evaluate.txt``: the metrics; ``result/*.json``: the answers, re-scored per question with LAVIS's ``VQAEval``) and
writes to ``--out``:

* ``demo_results.json`` / ``demo_results.md`` -- the headline (also printed): for fine-tuned VQA overall / counting /
  identification, retrieval R@1 and zero-shot VQA, each model's mean over seeds with a t 95% interval, the
  difference with its interval, the paired test (VQA: McNemar's exact test on the per-question outcomes pooled over
  seeds, with the paired bootstrap interval; retrieval: paired t-test over seeds), the majority-answer or chance
  baseline and a verdict sentence; then the per-metric table of means over seeds (parameter counts, stage-1 losses
  with the first and last epoch's reconstruction loss, retrieval R@1/5/10, LM losses, VQA per question type) and
  every seed's rows; a few example answers;
* ``loss_curves.png`` -- every seed's training losses of both models (stage 1: total and each term; stage 2: LM;
  VQA fine-tuning: the answer loss);
* ``reconstructions.png`` -- test images, their MAE masks (ratio 0.5, a fixed draw) and what the first seed's
  trained X-Former reconstructs from M' through the frozen MAE decoder;
* ``runs/seed<k>/<model>/<stage>/`` -- the LAVIS output folders, ``logs/seed<k>/<model>_<stage>.log`` -- each run's
  full output.

Sizes and steps live in the yamls alone (the ``tiny`` models, 2048 training images, epochs, learning rates), so
the same demo runs larger by editing them or with ``--options`` (applied to every run, e.g. ``run.device=cuda``).
``--smoke`` shrinks the data and epochs (``SMOKE_OPTIONS``) for the test suite.

Modules: ``pipeline`` (what runs, the settings, the subprocess runner, LAVIS's output folders), ``standins`` (the
pretrained CLIP-ViT, MAE and OPT stand-ins), ``report`` (parameter counts, multi-seed tables and paired tests via
``analysis.stats``, figures via ``analysis.figures``),
``__main__`` (the command: setup, both pipelines, report).
"""
