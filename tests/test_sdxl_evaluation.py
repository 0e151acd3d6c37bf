"""Metrics, evaluation and sweeps on SDXL bundles (tiny-sdxl): per-encoder distances and nearest tokens,
locality with LoRAs on both text encoders, the inversion and LoRA sweeps through the core, the CLI and
the PivotalSweep node."""

import json
import math
import sys

import pytest
import torch
from comfy_stubs import PACK_NAME, comfy_env, fake_models, nodes, run_node  # noqa: F401

from pti_ops.cli import main
from pti_ops.dataset import DatasetConfig, load_image_folder
from pti_ops.errors import InvalidInputError
from pti_ops.files.embedding_file import load_embedding
from pti_ops.files.lora_file import load_lora
from pti_ops.inversion import InversionConfig, invert
from pti_ops.lora_tune import TuneConfig, tune_around
from pti_ops.metrics import EvaluationConfig, SamplingConfig, Scorers, evaluate_tuned, nearest_tokens
from pti_ops.metrics.lpips_model import load_lpips
from pti_ops.metrics.scores import locality_eps_mse
from pti_ops.models import load_bundle
from pti_ops.sweeps import SweepConfig, run_sweep

from example_images import write_example_images

TEMPLATE = "an anime illustration of {}"
PER_ENCODER = ("clip_l_distance", "clip_l_norm", "clip_l_cosine", "clip_l_nearest",
               "clip_g_distance", "clip_g_norm", "clip_g_cosine", "clip_g_nearest")  # fmt: skip


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xl_images")
    write_example_images(folder, count=3, size=48)
    return folder


@pytest.fixture(scope="module")
def dataset(images):
    return load_image_folder(images, DatasetConfig(resolution=32))


@pytest.fixture(scope="module")
def lpips_model():
    torch.manual_seed(0)
    return load_lpips("alex", random_backbone=True)  # asked for explicitly: nothing is read or downloaded


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """`(inversion, tuning, embedding file, LoRA file)`: a few steps each, the LoRA on the UNet and both encoders."""
    bundle = load_bundle("tiny-sdxl")
    inversion = invert(bundle, dataset, InversionConfig(steps=4, history_every=2, learning_rate=5e-2, templates=[TEMPLATE]))
    tuning = tune_around(bundle, dataset, inversion.pivot, TuneConfig(steps=4, history_every=2, learning_rate=1e-2,
                                                                      train_text_encoder=True, templates=[TEMPLATE]))
    folder = tmp_path_factory.mktemp("xl_files")
    return inversion, tuning, inversion.save(folder / "tok1.safetensors"), tuning.save(folder / "tok1_lora.safetensors")


def _eval_config(**overrides):
    settings = dict(prompts=[TEMPLATE], edit_prompts=["a photo of {} on the beach"], seeds=[0, 1],
                    sampling=SamplingConfig(steps=2), locality_timesteps=(500,))  # fmt: skip
    return EvaluationConfig(**{**settings, **overrides})


# --- distances and nearest tokens per encoder -----------------------------------------------------


def test_nearest_tokens_searches_the_chosen_encoders_vocabulary():
    bundle = load_bundle("tiny-sdxl")
    for index, tokenizer in enumerate(bundle.tokenizers):
        row = tokenizer.convert_tokens_to_ids("robot</w>")
        vectors = bundle.text_encoders[index].get_input_embeddings().weight[[row]].detach()
        assert nearest_tokens(bundle, vectors, len(tokenizer), k=2, encoder=index)[0][0] == "robot</w>"
    # CLIP-L's rows are 32 wide, bigG's 64: each is searched in its own space.
    with pytest.raises(InvalidInputError, match="`encoder` 2 is not one of this model's 2 text encoder"):
        nearest_tokens(bundle, vectors, 10, encoder=2)


def test_inversion_records_each_encoders_nearest_tokens_with_the_public_function(trained):
    inversion = trained[0]
    last = inversion.history[-1]
    assert all(key in last for key in PER_ENCODER) and last["nearest"] == last["clip_l_nearest"]
    bundle = load_bundle("tiny-sdxl")
    inversion.pivot.apply(bundle)
    vocabulary = [min(token.token_ids) for token in inversion.tokens]
    final = inversion.snapshot_by_key(last["step"])
    assert last["clip_g_nearest"] == nearest_tokens(bundle, final["clip_g"], vocabulary[1], encoder=1)
    assert last["clip_l_nearest"] == nearest_tokens(bundle, final["clip_l"], vocabulary[0], encoder=0)


def test_inversion_snapshots_hold_every_encoders_vectors(trained):
    inversion = trained[0]
    assert sorted(inversion.snapshots) == [2, 4]
    at_2, at_4 = inversion.snapshot_by_key(2), inversion.snapshot_by_key(4)
    assert list(at_2) == ["clip_l", "clip_g"] and at_2["clip_g"].shape == (1, 64)
    assert torch.equal(at_4["clip_g"], inversion.pivot.extra_vectors["clip_g"])
    assert not torch.equal(at_2["clip_g"], at_4["clip_g"])
    assert torch.equal(inversion.snapshot_by_key(0)["clip_g"], inversion.initial_by_key["clip_g"])
    with pytest.raises(InvalidInputError, match="step 3 was not recorded"):
        inversion.snapshot_by_key(3)


# --- evaluate -------------------------------------------------------------------------------------


def test_evaluate_an_inversion_pivot_on_sdxl(trained, dataset, lpips_model):
    inversion = trained[0]
    result = evaluate_tuned(load_bundle("tiny-sdxl"), _eval_config(), Scorers(lpips=lpips_model), pivot=inversion.pivot,
                            dataset=dataset)  # fmt: skip
    report, last = result.report, inversion.history[-1]
    details = report.metrics["embedding_distance"].details
    # Measured from the saved vectors and each base encoder's initializer rows: the inversion's own numbers.
    for key in PER_ENCODER:
        if key.endswith("nearest"):
            assert details[key] == last[key]
        else:
            assert math.isclose(details[key], last[key], rel_tol=1e-5), key
    assert report.value("embedding_distance") == details["clip_l_distance"]
    assert report.value("reconstruction_lpips") > 0 and report.value("diversity_lpips") > 0
    assert "no LoRA applied" in report.metrics["locality_eps_mse"].reason
    assert result.samples["reconstruction"].images.shape == (2, 32, 32, 3)


def test_evaluate_a_lora_on_both_encoders_and_its_strength(trained, dataset, lpips_model):
    pivot, lora = trained[1].pivot, trained[1].lora
    assert {key.split("_")[1] for key in lora} == {"unet", "te1", "te2"}
    config = _eval_config()
    tuned = evaluate_tuned(load_bundle("tiny-sdxl"), config, Scorers(lpips=lpips_model), pivot=pivot, lora=lora, dataset=dataset)
    assert tuned.report.value("locality_eps_mse") > 0 and tuned.report.value("locality_lpips") > 0
    off = evaluate_tuned(load_bundle("tiny-sdxl"), config, Scorers(lpips=lpips_model), pivot=pivot, lora=lora,
                         lora_strength=0.0, dataset=dataset)  # fmt: skip
    assert off.report.value("locality_eps_mse") == 0.0 and off.report.value("locality_lpips") == 0.0
    assert torch.equal(off.samples["locality_tuned"].images, off.samples["locality_base"].images)


def test_a_lora_on_the_second_encoder_alone_counts_for_locality(trained):
    """bigG's adapters are switched by the strength and by `adapters_disabled`, like CLIP-L's and the UNet's."""
    te2_only = {k: v for k, v in trained[1].lora.items() if k.startswith("lora_te2_")}
    bundle = load_bundle("tiny-sdxl")
    from pti_ops.metrics import apply_lora
    from pti_ops.metrics.sampling import set_lora_strength

    apply_lora(bundle, te2_only)
    prompts = ["an anime illustration of character", "a photo of a cat"]
    assert locality_eps_mse(bundle, prompts, (500,)) > 0
    set_lora_strength(bundle, 0.0)
    assert locality_eps_mse(bundle, prompts, (500,)) == 0.0


def test_evaluate_command_on_tiny_sdxl_with_our_files(trained, images, tmp_path):
    _, _, embedding, lora = trained
    out = tmp_path / "report"
    assert main(["evaluate", "--model", "tiny-sdxl", "--embedding", str(embedding), "--lora", str(lora), "--images",
                 str(images), "--prompts", TEMPLATE, "--edit-prompts", "a photo of {} on the beach", "--seeds", "0,1",
                 "--steps", "1", "--lpips", "random", "--resolution", "64",
                 "--out", str(out)]) == 0  # fmt: skip
    data = json.loads((out / "metrics.json").read_text())
    metrics = data["metrics"]
    assert metrics["locality_eps_mse"]["value"] > 0 and metrics["reconstruction_lpips"]["value"] is not None
    assert metrics["embedding_distance"]["details"]["clip_g_distance"] > 0
    assert data["settings"]["sampling"]["resolution"] == 64 and data["settings"]["sampling"]["clip_skip"] is None
    from PIL import Image

    assert Image.open(out / "grid.png").height > 4 * 64  # four rows of 64 px images


# --- sweeps ---------------------------------------------------------------------------------------


def test_inversion_sweep_on_sdxl_evaluates_every_encoders_snapshot(dataset, lpips_model, tmp_path):
    config = SweepConfig(kind="inversion", learning_rates=[2e-3, 5e-2], steps=4, history_every=2, eval_every=2,
                         templates=[TEMPLATE], prompts=[TEMPLATE], edit_prompts=["a photo of {} on the beach"],
                         sample_seeds=[0, 1], sampling=SamplingConfig(steps=2), out=tmp_path / "sweep")  # fmt: skip
    report = run_sweep(config, lambda: load_bundle("tiny-sdxl"), dataset, Scorers(lpips=lpips_model))
    rows = report.rows
    assert [(row["run"], row["step"]) for row in rows] == [("initial", 0), ("lr=0.002", 2), ("lr=0.002", 4),
                                                           ("lr=0.05", 2), ("lr=0.05", 4)]  # fmt: skip
    assert rows[0]["clip_g_distance"] == 0.0 and rows[-1]["clip_g_distance"] > rows[2]["clip_g_distance"] > 0
    assert rows[-1]["clip_l_distance"] == rows[-1]["distance"]
    # The intermediate snapshot's file holds both encoders' vectors at that step.
    saved = load_embedding(tmp_path / "sweep" / rows[3]["embedding_file"])
    assert set(saved.vectors) == {"clip_l", "clip_g"} and saved.metadata["steps"] == "2"
    data = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert "clip_g" in data["descriptions"]["clip_g_distance"]
    # Reconstruction differs between the snapshots: the evaluation saw each step's vectors in both encoders.
    assert rows[3]["reconstruction_l2"] != rows[4]["reconstruction_l2"]


def test_sweep_commands_on_tiny_sdxl(trained, images, tmp_path):
    common = ["--model", "tiny-sdxl", "--images", str(images), "--resolution", "32", "--steps", "2", "--history-every", "1",
              "--seeds", "0,1", "--sample-steps", "2", "--lpips", "random", "--prompts", TEMPLATE, "--template", TEMPLATE,
              "--edit-prompts", "a photo of {} on the beach"]  # fmt: skip
    out = tmp_path / "inversion"
    assert main(["sweep", "--kind", "inversion", "--lrs", "1e-2", *common, "--out", str(out)]) == 0
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [row["run"] for row in rows] == ["initial", "lr=0.01"] and rows[1]["clip_g_distance"] > 0
    out = tmp_path / "lora"
    assert main(["sweep", "--kind", "lora", "--embedding", str(trained[2]), "--lrs", "1e-2", "--reg", "none,path",
                 "--sample-resolution", "64", *common, "--out", str(out)]) == 0  # fmt: skip
    data = json.loads((out / "sweep.json").read_text())
    assert [row["run"] for row in data["rows"]] == ["base", "none lr=0.01", "path lr=0.01"]
    assert data["rows"][2]["reg_loss"] > 0 and data["rows"][1]["locality_eps_mse"] > 0
    assert data["settings"]["evaluation"]["sampling"]["resolution"] == 64
    kohya, _ = load_lora(out / data["rows"][-1]["lora_file"])
    assert any(key.startswith("lora_unet_") for key in kohya)


def test_pivotal_sweep_node_on_an_sdxl_bundle(nodes, comfy_env, fake_models, dataset, trained, lpips_model, monkeypatch):
    """The node delegates to the core, whatever family the bridge's bundle is (here tiny-sdxl stands in for the
    converted SDXL models)."""
    module = sys.modules[PACK_NAME + ".pti_ops.metrics.scorers"]  # the nodes' LPIPS loader is the core's
    bridge = sys.modules[PACK_NAME + ".nodes.bridge"]
    monkeypatch.setattr(module, "load_lpips", lambda net, device="cpu": lpips_model)
    pack_models = sys.modules[PACK_NAME + ".pti_ops.models"]  # the pack's own classes, as the node's code sees them
    monkeypatch.setattr(bridge, "bundle_from_comfy", lambda model, clip, vae: pack_models.load_bundle("tiny-sdxl"))
    model, clip, vae = fake_models
    common = dict(
        model=model, clip=clip, vae=vae, dataset=dataset, learning_rates="1e-2", steps=2, eval_every=0, placeholder="tok1",
        initializer="character", templates=TEMPLATE, batch_size=1, seed=0, lora_rank=2, compare_without_regularizer=True,
        prompts=TEMPLATE, edit_prompts="a photo of {} on the beach", sample_seeds="0,1", sample_steps=2, cfg=5.0,
        sampler="ddim", resolution=32, lpips="alex", clip_model_folder="", overwrite=False,
    )  # fmt: skip
    table = run_node(nodes["PivotalSweep"], kind="inversion", output_folder="xl_inversion", **common)[0]
    assert "clip_g_distance" in table
    pivot_type = sys.modules[PACK_NAME + ".pti_ops.pivot"].Pivot
    pivot = pivot_type(**{f: getattr(trained[1].pivot, f) for f in ("placeholder", "initializer", "vectors", "family",
                                                                    "templates", "extra_vectors")})  # fmt: skip
    run_node(nodes["PivotalSweep"], kind="lora", embedding=pivot, output_folder="xl_lora", **common)
    rows = json.loads((comfy_env[1].folders["output"] / "xl_lora" / "sweep.json").read_text())["rows"]
    assert [row["run"] for row in rows] == ["base", "none lr=0.01"] and rows[1]["locality_eps_mse"] > 0
