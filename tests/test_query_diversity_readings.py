"""Supplement section 6's query diversity, its four readings (text side: ITM-pass queries or the padded caption
tokens; statistic: mean or spread of the text-marginalised scores), against a written-out reference."""

import json

import numpy as np
import pytest
import torch
from lavis.models import load_model

from lavis_xformer.analysis import query_diversity

CAPTIONS = ["a red circle", "two blue squares and a star", "a green triangle", "three yellow circles"]


def images(size=4, seed=0):
    return torch.randn(size, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def reference_readings(image_queries, itm_queries, text_tokens):
    """The four readings with numpy loops: cosines, the mean over the text, then the average or the spread."""
    out = {}
    for side, text_side in (("itm_queries", itm_queries), ("text_tokens", text_tokens)):
        all_scores, spreads = [], []
        for z, t in zip(image_queries.double().numpy(), text_side.double().numpy()):
            scores = []
            for i in range(len(z)):
                cosines = [z[i] @ t[j] / (np.linalg.norm(z[i]) * np.linalg.norm(t[j])) for j in range(len(t))]
                scores.append(sum(cosines) / len(cosines))
            all_scores += scores
            mean = sum(scores) / len(scores)
            spreads.append((sum((s - mean) ** 2 for s in scores) / len(scores)) ** 0.5)
        out[f"{side}/mean"] = sum(all_scores) / len(all_scores)
        out[f"{side}/std"] = sum(spreads) / len(spreads)
    return out


def test_four_readings_match_the_written_out_reference_on_fixed_inputs():
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(3, 6, 5, generator=generator)  # 3 pairs, 6 image queries
    itm = torch.randn(3, 6, 5, generator=generator)  # 6 ITM-pass queries
    tokens = torch.randn(3, 9, 5, generator=generator)  # 9 padded text positions
    ours = query_diversity.four_readings(z, itm, tokens)
    expected = reference_readings(z, itm, tokens)
    assert set(ours) == {"itm_queries/mean", "itm_queries/std", "text_tokens/mean", "text_tokens/std"}
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key  # float32 cosines
    # The readings differ (the choice matters), and identical image queries have no spread but a mean.
    assert len({round(v, 6) for v in ours.values()}) == 4
    same = query_diversity.four_readings(z[:, :1].expand(-1, 6, -1), itm, tokens)
    assert same["itm_queries/std"] < 1e-9 and abs(same["itm_queries/mean"]) > 1e-3


def test_four_readings_of_a_hand_computed_case():
    # One pair, two image queries, two text vectors: cosines [[1, 0], [0, 1]] and [[1, 1], [1, 1]] / sqrt(2)s.
    z = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    itm = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # scores: z1 -> 1, z2 -> 0: mean 0.5, std 0.5
    tokens = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]])  # scores: both 1/sqrt(2): mean 0.7071, std 0
    readings = query_diversity.four_readings(z, itm, tokens)
    assert readings == pytest.approx({"itm_queries/mean": 0.5, "itm_queries/std": 0.5,
                                      "text_tokens/mean": 2 ** -0.5, "text_tokens/std": 0.0}, abs=1e-7)


@pytest.mark.parametrize("arch", ["xformer", "blip2_baseline"])
def test_text_tokens_are_the_padded_caption_states_of_the_text_pass(arch):
    torch.manual_seed(0)
    model = load_model(arch, "tiny").eval()
    states = query_diversity.text_token_states(model, CAPTIONS)
    assert states.shape == (4, model.max_txt_len, model.config.qformer_hidden_size)  # padding included: 32 x 32
    tokens = model.tokenizer(CAPTIONS, padding="max_length", truncation=True, max_length=model.max_txt_len,
                             return_tensors="pt")
    with torch.no_grad():
        expected = model.Qformer.bert(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    torch.testing.assert_close(states, expected, rtol=0, atol=0)


def test_measure_readings_averages_pairs_across_batches_and_agrees_with_measure_image_text():
    torch.manual_seed(0)
    model = load_model("xformer", "tiny").eval()
    first, second = images(4, seed=0), images(2, seed=1)
    batches = [(first, CAPTIONS), (second, CAPTIONS[:2])]
    result = query_diversity.measure_readings(model, batches, "X-Former")
    all_images, all_texts = torch.cat([first, second]), CAPTIONS + CAPTIONS[:2]
    expected = reference_readings(
        query_diversity.output_queries(model, all_images),
        query_diversity.text_conditioned_queries(model, all_images, all_texts),
        query_diversity.text_token_states(model, all_texts),
    )
    assert result.num_pairs == 6
    for key, value in expected.items():
        assert result.readings[key] == pytest.approx(value, abs=1e-6), key
    assert result.headline == result.readings["itm_queries/mean"] == result.readings[query_diversity.HEADLINE]
    # The demo's figure is the itm_queries/std reading.
    assert query_diversity.measure_image_text(model, batches, "X-Former").diversity == pytest.approx(
        result.readings["itm_queries/std"], abs=1e-9)
    restored = query_diversity.QueryDiversityReadings.from_dict(json.loads(json.dumps(result.to_dict())))
    assert restored == result
    table = query_diversity.readings_markdown([result])
    assert "itm_queries/mean (headline)" in table and "| X-Former | 6 |" in table


def test_text_matters_for_both_text_sides():
    torch.manual_seed(0)
    model = load_model("xformer", "tiny").eval()
    a = query_diversity.measure_readings(model, [(images(), CAPTIONS)], "x").readings
    b = query_diversity.measure_readings(model, [(images(), CAPTIONS[::-1])], "x").readings
    assert abs(a["itm_queries/mean"] - b["itm_queries/mean"]) > 1e-7
    assert abs(a["text_tokens/mean"] - b["text_tokens/mean"]) > 1e-7


def test_measure_readings_refuses_stage2_models_and_unpaired_texts():
    torch.manual_seed(0)
    with pytest.raises(TypeError, match="stage-1"):
        query_diversity.measure_readings(load_model("xformer_opt", "tiny").eval(), [(images(2), CAPTIONS[:2])], "x")
    with pytest.raises(ValueError, match="4 images but 3 texts"):
        query_diversity.measure_readings(load_model("xformer", "tiny").eval(), [(images(), CAPTIONS[:3])], "x")


def test_cli_reports_the_four_readings_of_a_stage1_yaml_on_its_retrieval_test_split(tmp_path, capsys):
    shapes = "datasets.xformer_shapes_retrieval.shapes"
    out = tmp_path / "readings.json"
    code = query_diversity.main([
        "--cfg-path", "projects/xformer/demo/ret_shapes_eval.yaml", "--label", "X-Former", "--max-images", "3",
        "--json", str(out), "--options", "model.load_finetuned=False", f"{shapes}.root={tmp_path / 'shapes'}",
        f"{shapes}.num_train=8", f"{shapes}.num_val=4", f"{shapes}.num_test=4",
    ])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["headline"] == "itm_queries/mean" and data["num_pairs"] >= 3  # every caption of 3 images
    assert set(data["readings"]) == {"itm_queries/mean", "itm_queries/std", "text_tokens/mean", "text_tokens/std"}
    assert "| X-Former |" in capsys.readouterr().out
