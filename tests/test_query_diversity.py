"""Query diversity as the supplement measures it (section 6): image queries against text queries, marginalised over
the text, the spread over image queries averaged over image-text pairs."""

import numpy as np
import pytest
import torch
from lavis.models import load_model
from lavis.models.blip2_models.blip2_qformer import Blip2Qformer

from lavis_xformer.analysis import query_diversity

CAPTIONS = ["a red circle", "two blue squares and a star", "a green triangle", "three yellow circles"]


def images(size=4, seed=0):
    return torch.randn(size, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def reference_diversity(image_queries, text_queries):
    """The formula of the module, written out with numpy loops."""
    spreads, matrices = [], []
    for z, t in zip(image_queries.double().numpy(), text_queries.double().numpy()):
        z = z / np.linalg.norm(z, axis=-1, keepdims=True)
        t = t / np.linalg.norm(t, axis=-1, keepdims=True)
        similarity = np.array([[z[i] @ t[j] for j in range(len(t))] for i in range(len(z))])
        scores = similarity.mean(axis=1)  # marginalised over the text queries: one score per image query
        spreads.append(np.sqrt(np.mean((scores - scores.mean()) ** 2)))
        matrices.append(similarity)
    return float(np.mean(spreads)), np.mean(matrices, axis=0)


def test_scores_and_spread_follow_the_formula():
    generator = torch.Generator().manual_seed(0)
    z, t = torch.randn(3, 6, 5, generator=generator), torch.randn(3, 6, 5, generator=generator)
    similarity, scores = query_diversity.image_text_scores(z, t)
    expected_diversity, expected_matrix = reference_diversity(z, t)
    np.testing.assert_allclose(similarity.double().mean(0).numpy(), expected_matrix, atol=1e-6)
    np.testing.assert_allclose(float(query_diversity.score_spread(scores).mean()), expected_diversity, atol=1e-6)
    # Image queries that all relate to the text alike have no spread.
    same = z[:, :1].expand(-1, 6, -1)
    assert float(query_diversity.score_spread(query_diversity.image_text_scores(same, t)[1]).max()) < 1e-6


@pytest.mark.parametrize("arch", ["xformer", "blip2_baseline"])
def test_text_queries_are_the_image_text_pass_queries(arch):
    """X-Former: the ITM pass then the dual block (``multimodal_queries``); BLIP-2: LAVIS's own multimodal features."""
    torch.manual_seed(0)
    model = load_model(arch, "tiny").eval()
    image = images()
    queries = query_diversity.text_conditioned_queries(model, image, CAPTIONS)
    assert queries.shape == (4, model.config.num_query_token, model.config.qformer_hidden_size)
    text = model.tokenizer(CAPTIONS, return_tensors="pt", padding=True)
    if arch == "xformer":
        path = model.encode(image, model.config.eval_mask_ratio)
        with torch.no_grad():
            expected = model.multimodal_queries(path.clip_features, path.mae_features, text.input_ids, text.attention_mask)
    else:
        expected = Blip2Qformer.extract_features(model, {"image": image, "text_input": CAPTIONS}, mode="multimodal").multimodal_embeds
    torch.testing.assert_close(queries, expected, rtol=0, atol=1e-6)
    # The text matters: other captions, other text queries; the image queries do not see it.
    other = query_diversity.text_conditioned_queries(model, image, CAPTIONS[::-1])
    assert (other - queries).abs().max() > 1e-4


def test_measure_image_text_averages_over_pairs_and_batches():
    torch.manual_seed(0)
    model = load_model("xformer", "tiny").eval()
    first, second = images(4, seed=0), images(2, seed=1)
    result = query_diversity.measure_image_text(model, [(first, CAPTIONS), (second, CAPTIONS[:2])], "xformer")
    all_images, all_texts = torch.cat([first, second]), CAPTIONS + CAPTIONS[:2]
    expected_diversity, expected_matrix = reference_diversity(
        query_diversity.output_queries(model, all_images),
        query_diversity.text_conditioned_queries(model, all_images, all_texts),
    )
    assert result.num_images == 6 and result.mean_similarity.shape == (8, 8)
    assert result.diversity == pytest.approx(expected_diversity, abs=1e-6) and result.diversity > 0
    np.testing.assert_allclose(result.mean_similarity, expected_matrix, atol=1e-6)
    assert result.mean_score == pytest.approx(expected_matrix.mean(), abs=1e-6)
    restored = query_diversity.ImageTextDiversity.from_dict(result.to_dict())
    assert (restored.diversity, restored.num_images, restored.label) == (result.diversity, 6, "xformer")
    np.testing.assert_allclose(restored.mean_similarity, result.mean_similarity)
    assert query_diversity.relative_difference([result, restored])[1]["relative_to_reference_percent"] == 0.0
    # The MAE branch is part of the measure (Z' and the text queries both see M): another M, another figure.
    with torch.no_grad():
        for param in model.mae_encoder.parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(2)) * 0.5)
    changed = query_diversity.measure_image_text(model, [(first, CAPTIONS), (second, CAPTIONS[:2])], "xformer")
    assert abs(changed.diversity - result.diversity) > 1e-6


def test_measure_image_text_refuses_stage2_models_and_unpaired_texts():
    torch.manual_seed(0)
    with pytest.raises(TypeError, match="needs a stage-1 model"):
        query_diversity.text_conditioned_queries(load_model("xformer_opt", "tiny").eval(), images(2), CAPTIONS[:2])
    with pytest.raises(ValueError, match="4 images but 3 texts"):
        query_diversity.measure_image_text(load_model("xformer", "tiny").eval(), [(images(), CAPTIONS[:3])], "x")
