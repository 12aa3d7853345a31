"""VQA fine-tuning learns from the answers, end to end on the shapes data: the tiny X-Former and its BLIP-2 twin,
fine-tuned on the shapes VQA train split (LAVIS's dataset class and collater), answer the test split with the
paper's prompt, scored by LAVIS's official VQA evaluator.

The frozen LLM is a stand-in (a simpler one than the demo's ``standins.LLM_STANDIN``): a random OPT cannot be steered by any visual prefix (its loss stays at
its initial value), so the tiny OPT is first pretrained as a text LM on the training questions and answers, written
"Question: q Answer: a". The paper's prompt, "Question: {} Short answer:", is new to it: zero-shot it answers
nothing right. Fine-tuning (the LLM frozen; Q-Former, queries, projection, CLIP layer norms train) has to teach the
prompt -> answer mapping through the visual prefix alone.

What the figures mean (measured, see the assertion messages): at this size and number of steps the fine-tuned
models answer from each question type's prior (the same answer to every yes/no question, the most frequent count to
every counting question), not from the image; both models alike. The test proves that fine-tuning learns from the
answers with the test-time prompt, not that the tiny models read the image; the demo, with both pretraining stages
and an OPT stand-in that reads a caption placed where the visual prefix goes, shows that (README, "Latest demo
results")."""

import collections
import json

import pytest
import torch
from lavis.common.registry import registry
from lavis.common.vqa_tools.vqa import VQA
from lavis.common.vqa_tools.vqa_eval import VQAEval
from omegaconf import OmegaConf

import lavis_xformer  # noqa: F401  (registers the plugin)
from test_stage2 import model_config

SHAPES = dict(seed=0, image_size=32, num_train=512, num_val=8, num_test=64)
FINETUNE = dict(qformer_text_input=True, freeze_vit_layernorms=False)
STANDIN_STEPS, FINETUNE_STEPS, BATCH = 150, 150, 32


@pytest.fixture(scope="module")
def shapes_vqa(tmp_path_factory):
    builder = registry.get_builder_class("xformer_shapes_vqa")
    cfg = OmegaConf.load(builder.default_config_path()).datasets["xformer_shapes_vqa"]
    cfg.shapes.update(SHAPES, root=str(tmp_path_factory.mktemp("shapes")))
    cfg.vis_processor = {  # as projects/xformer/demo/vqa_ft_shapes.yaml: flips only, a crop could change a count
        "train": {"name": "xformer_image_train", "image_size": 32, "min_scale": 1.0},
        "eval": {"name": "xformer_image_eval", "image_size": 32},
    }
    cfg.text_processor = {"train": {"name": "blip_question"}, "eval": {"name": "blip_question"}}
    return builder(cfg).build_datasets()


def pretrain_standin_opt(model, annotations, generator):
    """The frozen OPT's stand-in: a text LM on the training questions and answers, in a template other than the
    VQA prompt; frozen again afterwards."""
    texts = [f"Question: {a['question']} Answer: {a['answer'][0]}\n" for a in annotations]
    opt, tokenizer = model.opt_model, model.opt_tokenizer
    opt.requires_grad_(True)
    optimizer = torch.optim.AdamW(opt.parameters(), lr=3e-3)
    tokenizer.padding_side = "right"
    for _ in range(STANDIN_STEPS):
        batch = [texts[i] for i in torch.randint(len(texts), (64,), generator=generator).tolist()]
        tokens = tokenizer(batch, padding="longest", return_tensors="pt")
        labels = tokens.input_ids.masked_fill(tokens.attention_mask == 0, -100)
        loss = opt(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    opt.requires_grad_(False)


def official_accuracy(model, test, folder) -> dict:
    """LAVIS's VQA evaluator (the official VQAv2 accuracy) on the test split, answers by ``predict_answers`` with
    the config's prompt (the fine-tuning prompt), greedy."""
    model.eval()
    results = []
    with torch.no_grad():
        loader = torch.utils.data.DataLoader(test, batch_size=64, collate_fn=test.collater)
        for batch in loader:
            answers = model.predict_answers(batch, num_beams=1, max_len=3, length_penalty=0)
            results += [{"question_id": int(q), "answer": a} for q, a in zip(batch["question_id"], answers)]
    path = folder / "results.json"
    path.write_text(json.dumps(results))
    official = VQA(test.coco_fmt_anno_file, test.coco_fmt_qust_file)
    scorer = VQAEval(official, official.loadRes(str(path), test.coco_fmt_qust_file), n=2)
    scorer.evaluate()
    return {"overall": scorer.accuracy["overall"], **scorer.accuracy["perAnswerType"],
            "answers": collections.Counter(r["answer"] for r in results).most_common(4)}


@pytest.mark.parametrize("arch", ["xformer_opt", "blip2_baseline_opt"])
def test_finetuning_on_shapes_raises_accuracy_above_the_majority_answer(shapes_vqa, arch, tmp_path):
    train, test = shapes_vqa["train"], shapes_vqa["test"]
    train_answers = collections.Counter(a["answer"][0] for a in train.dataset.annotation)
    majority, _ = train_answers.most_common(1)[0]
    test_truth = [a["answer"][0] for a in test.annotation]
    majority_baseline = 100.0 * sum(t == majority for t in test_truth) / len(test_truth)
    # for the report: a blind model that knows each question type's most frequent answer (the language prior)
    kind = {answer: "number" if answer.isdigit() else "yes/no" for answer in train_answers}
    type_prior = {k: next(a for a, _ in train_answers.most_common() if kind[a] == k) for k in ("number", "yes/no")}
    prior_baseline = 100.0 * sum(t == type_prior[kind.get(t, "number")] for t in test_truth) / len(test_truth)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains fastest on one thread
    try:
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(0)
        unmasked = {"mask_ratio": 0.0} if arch.startswith("xformer") else {}  # fine-tuning, as the vqa_ft types
        model = registry.get_model_class(arch)(model_config(arch, **FINETUNE, **unmasked))
        pretrain_standin_opt(model, train.dataset.annotation, generator)
        zero_shot = official_accuracy(model, test, tmp_path)

        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.05)
        loader = torch.utils.data.DataLoader(
            train, batch_size=BATCH, shuffle=True, collate_fn=train.collater, generator=generator
        )
        losses, step = [], 0
        while step < FINETUNE_STEPS:
            for batch in loader:
                loss = model(batch).loss  # LAVIS's VQA batch: answer, weight, n_answers
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                step += 1
                if step == FINETUNE_STEPS:
                    break
        finetuned = official_accuracy(model, test, tmp_path)
    finally:
        torch.set_num_threads(threads)

    report = (
        f"{arch}: majority answer {majority!r} scores {majority_baseline:.1f}; per-type prior {type_prior} scores "
        f"{prior_baseline:.1f}; zero-shot {zero_shot}; "
        f"fine-tuned {finetuned}; loss {sum(losses[:10]) / 10:.3f} -> {sum(losses[-10:]) / 10:.3f}"
    )
    print(report)
    assert zero_shot["overall"] < majority_baseline, report
    assert finetuned["overall"] >= majority_baseline + 10, report
    assert sum(losses[-10:]) < sum(losses[:10]), report
