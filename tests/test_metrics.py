"""Metrics on constructed inputs with known answers; the evaluation run and its command on the tiny model."""

import argparse
import json
import math

import pytest
import torch
import torchvision
from transformers import CLIPConfig, CLIPModel

from pti_ops.models.clip_vocab import make_clip_tokenizer
from pti_ops.files.embedding_file import save_embedding
from pti_ops.errors import InvalidInputError, MissingModelFileError, OutputExistsError
from pti_ops.files.lora_file import save_lora
from pti_ops.metrics.scores import (
    METRIC_NAMES,
    EvaluationReport,
    centroid_spread,
    dataset_images,
    diversity_metrics,
    l2_matrix,
    locality_eps_mse,
    mean_pairwise_lpips,
    metric,
    reconstruction_metrics,
    subject_centroids,
)
from pti_ops.metrics.clip import clip_image_similarity, load_clip, try_load_clip
from pti_ops.metrics.distance import distance_from_history, embedding_distance
from pti_ops.metrics.evaluation import EvaluationConfig, Scorers, evaluate, evaluate_tuned, evaluation_batches
from pti_ops.metrics.lpips_model import BACKBONE_FILES, load_lpips, lpips_matrix
from pti_ops.metrics.sampling import SamplingConfig, apply_lora
from pti_ops.models.tiny_model import TINY_WORDS, build_tiny_bundle
from pti_ops.pivot import Pivot, family_name
from helpers import kohya_lora, warns_user


@pytest.fixture(scope="module")
def lpips_model():
    # A random backbone, asked for explicitly: no weights are read or downloaded. Not perceptual, but
    # identical images still score 0 and different ones more.
    return load_lpips("alex", random_backbone=True)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny random CLIPModel saved like a real one (config, weights, tokenizer files)."""
    folder = tmp_path_factory.mktemp("clip")
    tokenizer = make_clip_tokenizer(list(TINY_WORDS))
    common = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    text = dict(common, vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=dict(common, image_size=32, patch_size=8), projection_dim=16)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def blob_images(centres, size=32, radius=4, background=0.9):
    """Plain-background images with one dark square blob centred at each `(x, y)` (fractions of the side)."""
    images = torch.full((len(centres), size, size, 3), background)
    for i, (x, y) in enumerate(centres):
        cx, cy = round(x * size), round(y * size)
        images[i, cy - radius : cy + radius, cx - radius : cx + radius] = torch.tensor([0.8, 0.1, 0.1])
    return images


def random_images(n, seed=0, size=32):
    return torch.rand(n, size, size, 3, generator=torch.Generator().manual_seed(seed))


# --- LPIPS ---------------------------------------------------------------------------------------


def test_lpips_matrix_is_lpips_own_distance_and_zero_on_identical_images(lpips_model):
    a, b = random_images(3, 0), random_images(2, 1)
    matrix = lpips_matrix(lpips_model, a, b)
    with torch.no_grad():
        reference = [[lpips_model(x[None].permute(0, 3, 1, 2), y[None].permute(0, 3, 1, 2), normalize=True).item() for y in b] for x in a]
    torch.testing.assert_close(matrix, torch.tensor(reference), atol=1e-6, rtol=1e-5)
    assert torch.all(lpips_matrix(lpips_model, a, a).diag() == 0)


def test_lpips_reads_backbone_weights_from_the_local_hub_cache_only(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(MissingModelFileError, match=f"{BACKBONE_FILES['alex']}, not found in {tmp_path / 'checkpoints'}"):
        load_lpips("alex")
    weights = torchvision.models.alexnet(weights=None).state_dict()
    (tmp_path / "checkpoints").mkdir()
    torch.save(weights, tmp_path / "checkpoints" / BACKBONE_FILES["alex"])
    model = load_lpips("alex")
    assert torch.equal(getattr(model.net.slice3, "6").weight, weights["features.6.weight"])
    assert model.lin0.model[1].weight.abs().sum() > 0  # the calibrated linear layers shipped with lpips


# --- reconstruction and CLIP ---------------------------------------------------------------------


def test_reconstruction_of_the_training_images_is_perfect_and_better_than_noise(lpips_model):
    training = blob_images([(0.3, 0.4), (0.6, 0.5), (0.5, 0.7)])
    exact = reconstruction_metrics(training[[2, 0]], training, lpips_model)
    assert exact["reconstruction_lpips"].value == 0 and exact["reconstruction_l2"].value == 0
    assert exact["reconstruction_l2"].details["best_match"] == [2, 0]
    noisy = reconstruction_metrics(random_images(2), training, lpips_model)
    assert noisy["reconstruction_lpips"].value > 0 and noisy["reconstruction_l2"].value > 0.05
    assert l2_matrix(torch.zeros(1, 2, 2, 3), torch.ones(1, 2, 2, 3)).item() == 1.0


def test_missing_clip_model_means_not_computed_with_the_reason(tmp_path, lpips_model):
    scorer, reason = try_load_clip(tmp_path / "no_such_clip")
    assert scorer is None and "no_such_clip" in reason and "config.json" in reason
    assert try_load_clip(None)[1].startswith("no CLIP model folder given")
    result = reconstruction_metrics(random_images(1), random_images(2, 1), lpips_model, None, clip_reason=reason)
    assert result["reconstruction_clip"].value is None and result["reconstruction_clip"].reason == reason
    report = EvaluationReport(result)
    assert f"not computed: {reason}" in report.to_markdown()
    assert json.loads(report.to_json())["metrics"]["reconstruction_clip"] == {
        "value": None, "description": result["reconstruction_clip"].description, "reason": reason, "details": {}}
    with pytest.raises(MissingModelFileError, match="has no config.json"):
        load_clip(tmp_path)


def test_clip_similarity_of_an_image_with_itself_is_one(clip_folder):
    scorer = load_clip(clip_folder)
    images = random_images(2)
    sims = clip_image_similarity(scorer, images, images)
    torch.testing.assert_close(sims.diag(), torch.ones(2), atol=1e-5, rtol=0)
    result = reconstruction_metrics(images, images[[1, 0]], clip=scorer)
    assert math.isclose(result["reconstruction_clip"].value, 1.0, abs_tol=1e-5)
    assert result["reconstruction_clip"].details["best_match"] == [1, 0]


# --- locality ------------------------------------------------------------------------------------


def test_a_tuned_model_equal_to_the_base_has_locality_exactly_zero():
    zero = build_tiny_bundle()
    apply_lora(zero, kohya_lora(up_std=0.0, text_encoder=True))
    assert locality_eps_mse(zero, ["a red cat", "a dog"], timesteps=(100, 900)) == 0.0
    changed = build_tiny_bundle()
    apply_lora(changed, kohya_lora(up_std=0.05))
    assert locality_eps_mse(changed, ["a red cat", "a dog"], timesteps=(100, 900)) > 0


# --- diversity and positions ---------------------------------------------------------------------


def test_collapsed_generations_are_less_diverse_than_varied_ones(lpips_model):
    collapsed = random_images(1).repeat(4, 1, 1, 1)
    assert mean_pairwise_lpips(lpips_model, collapsed) == 0
    assert mean_pairwise_lpips(lpips_model, random_images(4)) > 0
    with pytest.raises(InvalidInputError, match="at least 2 images"):
        mean_pairwise_lpips(lpips_model, collapsed[:1])


def test_subject_centroid_spread_is_zero_when_identical_and_known_for_shifted_blobs():
    centroids = subject_centroids(blob_images([(0.25, 0.5), (0.75, 0.5)]))
    torch.testing.assert_close(centroids, torch.tensor([[0.25, 0.5], [0.75, 0.5]], dtype=torch.float64))
    assert math.isclose(centroid_spread(centroids), 0.25)
    assert centroid_spread(subject_centroids(blob_images([(0.4, 0.6)] * 3))) == 0
    # No subject (a plain image) is left out, never placed at a made-up position.
    plain = torch.full((2, 32, 32, 3), 0.5)
    assert subject_centroids(plain).isnan().all() and centroid_spread(subject_centroids(plain)) is None
    result = diversity_metrics([plain])
    assert result["position_spread"].value is None and "no subject found" in result["position_spread"].reason
    assert result["diversity_lpips"].reason == "no LPIPS model given"


# --- distance, metric registry -------------------------------------------------------------------


def test_embedding_distance_known_answers():
    e0, e = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    d = embedding_distance(e, e0)
    assert math.isclose(d["distance"], math.sqrt(2)) and math.isclose(d["norm"], 1.5) and math.isclose(d["cosine"], 0.5)
    assert distance_from_history([{"step": 1, "distance": 3.0, "norm": 1.0, "cosine": 0.2, "nearest": []}]) == {
        "distance": 3.0, "norm": 1.0, "cosine": 0.2}
    with pytest.raises(InvalidInputError, match=r"shape \(1, 2\) cannot be compared with its initializer \(1, 3\)"):
        embedding_distance(torch.zeros(1, 2), torch.zeros(1, 3))


def test_every_metric_is_described_and_a_missing_value_needs_a_reason():
    assert all(metric(name, 0.0).description for name in METRIC_NAMES)
    with pytest.raises(InvalidInputError, match="unknown metric 'sharpness'"):
        metric("sharpness", 1.0)
    with pytest.raises(InvalidInputError, match="has no value and no reason"):
        metric("locality_lpips")


# --- the evaluation run and its command ----------------------------------------------------------


def test_evaluate_on_the_tiny_model(tiny_dataset, lpips_model):
    bundle = build_tiny_bundle()
    apply_lora(bundle, kohya_lora(up_std=0.0))  # equal to the base: locality must come out 0
    config = EvaluationConfig(prompts=["a picture of {}"], edit_prompts=["a photo of {} on the beach"], placeholder="cat",
                              seeds=[0, 1], sampling=SamplingConfig(steps=2), locality_timesteps=(500,))
    result = evaluate(bundle, config, Scorers(lpips=lpips_model), dataset_images(tiny_dataset, (32, 32)))
    report = result.report
    assert list(report.metrics) == list(METRIC_NAMES)
    assert report.value("locality_eps_mse") == 0.0 and report.value("locality_lpips") == 0.0
    assert report.value("reconstruction_lpips") > 0 and report.value("diversity_lpips") > 0
    assert report.metrics["editability_clip"].reason == "no CLIP model folder given"
    assert report.metrics["embedding_distance"].reason.startswith("no embedding given")
    assert config.locality_prompts == ["a picture of character", "a photo of character on the beach"]
    assert [name for name in result.samples] == ["reconstruction", "editability", "locality_tuned", "locality_base"]
    assert result.samples["reconstruction"].items == [("a picture of {}", 0), ("a picture of {}", 1)]
    assert result.grid().shape[-1] == 3


def test_evaluate_tuned_applies_the_token_and_the_lora_and_counts_every_batch(tiny_dataset, lpips_model):
    bundle = build_tiny_bundle()
    config = EvaluationConfig(prompts=["a picture of {}"], edit_prompts=["a photo of {} on the beach"], placeholder="tok1",
                              seeds=[0, 1, 2], sampling=SamplingConfig(steps=1, batch_size=2, resolution=32),
                              locality_timesteps=(500,))  # fmt: skip
    assert evaluation_batches(config, with_lora=False) == 4 and evaluation_batches(config, with_lora=True) == 10
    calls = []
    pivot = Pivot("tok1", "cat", torch.randn(1, 32, generator=torch.Generator().manual_seed(0)) * 0.1, family_name(bundle))
    with pytest.raises(InvalidInputError, match="the evaluation's placeholder 'tok1' is not the trained token 'tok2'"):
        evaluate_tuned(bundle, config, pivot=Pivot("tok2", "cat", pivot.vectors, pivot.family))
    result = evaluate_tuned(bundle, config, Scorers(lpips=lpips_model), pivot=pivot,
                            lora=kohya_lora(up_std=0.0), lora_strength=0.5, dataset=tiny_dataset,
                            on_step=lambda done, total, logs: calls.append((done, total, logs["stage"])))  # fmt: skip
    # One count over all four sets, set by set: 3 images per prompt set and 6 per locality set, in batches of 2.
    assert [(done, total) for done, total, _ in calls] == [(i, 10) for i in range(1, 11)]
    stages = [stage for *_, stage in calls]
    assert stages == ["reconstruction"] * 2 + ["editability"] * 2 + ["locality_tuned"] * 3 + ["locality_base"] * 3
    report = result.report
    assert report.metrics["embedding_distance"].details["initializer"] == "cat" and report.value("embedding_distance") > 0
    assert report.value("locality_eps_mse") == 0.0 and report.value("reconstruction_l2") is not None
    assert "tok1" in bundle.tokenizer.get_added_vocab()


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(prompts=["a picture of tok1"]), "has no \\{\\}: write \\{\\} where the placeholder goes"),
        (dict(prompts=[]), "`prompts` is empty"),
        (dict(locality_prompts=["a tok1 on the beach"]), "must not contain the placeholder, got 'a tok1 on the beach'"),
        (dict(sampling={"sampler": "plms"}), "`sampler` must be one of"),
    ],
)
def test_bad_evaluation_settings_raise_clear_errors(settings, message):
    with pytest.raises(InvalidInputError, match=message):
        EvaluationConfig(**settings)


def _evaluate_args(*extra):
    from pti_ops.cli.evaluate import add_evaluate_command

    parser = argparse.ArgumentParser()
    add_evaluate_command(parser.add_subparsers(dest="command"))
    return parser.parse_args(["evaluate", "--model", "tiny", "--seeds", "0,1", "--steps", "1", *extra])


def test_evaluate_command_writes_json_markdown_and_grid(tmp_path, image_folder, clip_folder):
    out, embedding, lora = tmp_path / "report", tmp_path / "tok1.safetensors", tmp_path / "zero_lora.safetensors"
    vectors = torch.randn(1, 32, generator=torch.Generator().manual_seed(0))
    save_embedding(embedding, vectors, metadata={"placeholder": "tok1", "initializer": "cat"})
    save_lora(lora, kohya_lora(up_std=0.0), {"pivotal.placeholder": "tok1", "pivotal.base_model": "tiny-sd15"})
    args = _evaluate_args("--images", str(image_folder), "--prompts", "a picture of {}", "--edit-prompts", "a photo of {}",
                          "--embedding", str(embedding), "--lora", str(lora), "--clip-model", str(clip_folder),
                          "--lpips", "random", "--out", str(out))
    assert args.handler(args) == 0
    data = json.loads((out / "metrics.json").read_text())
    metrics, settings = data["metrics"], data["settings"]
    assert settings["placeholder"] == "tok1" and settings["class_word"] == "cat" and settings["seeds"] == [0, 1]
    assert metrics["editability_clip"]["value"] is not None and len(metrics["editability_clip"]["details"]["per_image"]) == 2
    assert metrics["locality_eps_mse"]["value"] == 0.0
    # Independent recomputation of the distance from the saved embedding and the base model's 'cat' row.
    base = build_tiny_bundle()
    cat_row = base.text_encoder.get_input_embeddings().weight[base.tokenizer.convert_tokens_to_ids("cat</w>")]
    assert math.isclose(metrics["embedding_distance"]["value"], (vectors[0] - cat_row).norm().item(), rel_tol=1e-5)
    assert metrics["embedding_distance"]["details"]["initializer"] == "cat"
    assert "| reconstruction_lpips |" in (out / "metrics.md").read_text()
    assert (out / "grid.png").stat().st_size > 0
    with pytest.raises(OutputExistsError, match="metrics.json already exists"):
        args.handler(args)


def test_evaluate_command_refuses_bad_seeds_and_an_explicit_backbone_without_its_weights(tmp_path, monkeypatch):
    from pti_ops.cli.evaluate import build_scorers, parse_seeds

    with pytest.raises(InvalidInputError, match="--seeds '0,x' must be comma-separated integers"):
        parse_seeds("0,x")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(MissingModelFileError, match="Nothing is downloaded: copy the file there"):
        build_scorers(_evaluate_args("--lpips", "alex", "--out", str(tmp_path / "r")))
    with warns_user("LPIPS metrics not computed: LPIPS needs the torchvision alex weights alexnet-owt-7be5be79.pth"):
        scorers = build_scorers(_evaluate_args("--out", str(tmp_path / "r")))  # the default, auto: a reason
    assert scorers.lpips is None and "(--lpips auto: LPIPS is computed where its weights are on disk" in scorers.lpips_reason


def test_load_scorers_auto_uses_the_weights_where_present(tmp_path, monkeypatch):
    from pti_ops.metrics import load_scorers
    from pti_ops.metrics import scorers as scorers_module

    loaded = []
    monkeypatch.setattr(scorers_module, "load_lpips", lambda net, device="cpu", **k: loaded.append(net) or torch.nn.Identity())
    found = load_scorers("auto")
    assert loaded == ["alex"] and found.lpips is not None and found.lpips_reason == ""
    assert "no CLIP model folder given (`clip_model_folder`)" in found.clip_reason
    off = load_scorers("off", what="--lpips")
    assert off.lpips is None and off.lpips_reason == "LPIPS switched off (--lpips off)" and loaded == ["alex"]


def test_evaluate_with_default_options_on_a_fresh_machine_reports_lpips_not_computed(tmp_path, monkeypatch, capsys):
    from pti_ops.cli import main

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "fresh_hub"))
    out = tmp_path / "report"
    assert main(["evaluate", "--model", "tiny", "--seeds", "0,1", "--steps", "1", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["diversity_lpips"]["value"] is None and "alexnet-owt-7be5be79.pth" in metrics["diversity_lpips"]["reason"]
    assert "LPIPS metrics not computed" in capsys.readouterr().err
