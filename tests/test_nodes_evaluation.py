"""PivotalEvaluate and PivotalSweep on fake ComfyUI objects over the tiny model.

LPIPS uses a random backbone here (the node's loader is patched, so nothing is read or downloaded);
a missing backbone file and a missing CLIP folder are tested as what users get: "not computed"
with the reason.
"""

import json
import sys

import pytest
import torch
from comfy_stubs import PACK_NAME, InterruptProcessingException, comfy_env, fake_models, nodes, run_node  # noqa: F401
from transformers import CLIPConfig, CLIPModel

from pti_ops.models.clip_vocab import make_clip_tokenizer
from pti_ops.dataset import DatasetConfig, load_image_folder
from example_images import write_example_images
from pti_ops.metrics.lpips_model import load_lpips
from pti_ops.models.tiny_model import TINY_WORDS

TEMPLATE = "an anime illustration of {}"
SMALL_EVAL = dict(
    prompts=TEMPLATE, edit_prompts="a photo of {} on the beach", seeds="0,1", steps=2, cfg=5.0, sampler="ddim",
    resolution=32, lpips="alex", clip_model_folder="",
)  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    write_example_images(folder, count=3, size=32)
    return load_image_folder(folder, DatasetConfig(resolution=32))


@pytest.fixture
def random_lpips(monkeypatch, comfy_env):
    """The nodes' LPIPS loader (the core's `load_scorers`) with a random backbone (nothing read or downloaded)."""
    module = sys.modules[PACK_NAME + ".pti_ops.metrics.scorers"]
    monkeypatch.setattr(module, "load_lpips", lambda net, device="cpu": load_lpips(net, random_backbone=True, device=device))


@pytest.fixture(autouse=True)
def small_native_size(monkeypatch, comfy_env):
    """The converted tiny UNet keeps SD1.5's native 64-latent size, at which the core computes the locality
    ε-MSE; 8 latents (16 px) keep these tests fast. Sampling uses the `resolution` input anyway."""
    bridge = sys.modules[PACK_NAME + ".nodes.bridge"]
    convert = bridge.bundle_from_comfy

    def bundle_from_comfy(model, clip, vae):
        bundle = convert(model, clip, vae)
        bundle.unet.register_to_config(sample_size=8)
        return bundle

    monkeypatch.setattr(bridge, "bundle_from_comfy", bundle_from_comfy)


@pytest.fixture(scope="module")
def trained(comfy_env, fake_models, dataset):
    """`(embedding, lora)` from TokenInversion and PivotalLoRATune, a few steps each."""
    nodes_by_id = comfy_env[0]
    model, clip, vae = fake_models
    embedding = run_node(
        nodes_by_id["TokenInversion"], model=model, clip=clip, vae=vae, dataset=dataset, placeholder="tok1",
        initializer="character", num_vectors=1, templates=TEMPLATE, steps=2, learning_rate=1e-2, batch_size=1, seed=0,
        norm_mode="none", embedding_name="eval_tok1", overwrite=True,
    )[0]  # fmt: skip
    lora = run_node(
        nodes_by_id["PivotalLoRATune"], model=model, clip=clip, vae=vae, dataset=dataset, embedding=embedding, rank=2,
        alpha=0.0, targets="attention", learning_rate=1e-2, steps=2, batch_size=1, seed=0, schedule="sequential",
        train_text_encoder=False, lora_name="eval_lora", overwrite=True,
    )[2]  # fmt: skip
    return embedding, lora


@pytest.fixture(scope="module")
def clip_folder(comfy_env):
    """A tiny random CLIPModel saved in the stub's models/clip_vision/tiny-clip (config, weights, tokenizer)."""
    state = comfy_env[1]
    root = state.folders["output"].parent / "clip_vision"
    state.folders["clip_vision"] = root
    folder = root / "tiny-clip"
    tokenizer = make_clip_tokenizer(list(TINY_WORDS))
    common = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    text = dict(common, vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=dict(common, image_size=32, patch_size=8), projection_dim=16)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def evaluate(nodes, fake_models, **overrides):
    model, clip, vae = fake_models
    inputs = dict(model=model, clip=clip, vae=vae, class_word="", batch_size=4, **SMALL_EVAL)
    inputs.update(overrides)
    return run_node(nodes["PivotalEvaluate"], **inputs)


def sweep(nodes, fake_models, dataset, **overrides):
    model, clip, vae = fake_models
    inputs = dict(
        model=model, clip=clip, vae=vae, dataset=dataset, kind="inversion", learning_rates="2e-3, 1e-2", steps=2,
        eval_every=0, placeholder="tok1", initializer="character", templates=TEMPLATE, batch_size=1, seed=0,
        lora_rank=2, compare_without_regularizer=True, prompts=TEMPLATE, edit_prompts="a photo of {} on the beach",
        sample_seeds="0,1", sample_steps=2, cfg=5.0, sampler="ddim", resolution=32, lpips="alex", clip_model_folder="",
        output_folder="sweep", overwrite=False,
    )  # fmt: skip
    inputs.update(overrides)
    return run_node(nodes["PivotalSweep"], **inputs)


def metrics_of(text_json: str) -> dict:
    return json.loads(text_json)["metrics"]


# --- PivotalEvaluate ------------------------------------------------------------------------------


def test_evaluate_with_embedding_lora_and_dataset(nodes, comfy_env, fake_models, dataset, trained, random_lpips):
    state = comfy_env[1]
    model, clip, _ = fake_models
    embedding, lora = trained
    table, text_json, grid = evaluate(nodes, fake_models, embedding=embedding, lora=lora, dataset=dataset)
    metrics = metrics_of(text_json)
    for name in ("reconstruction_lpips", "reconstruction_l2", "locality_eps_mse", "locality_lpips", "diversity_lpips", "embedding_distance"):
        assert metrics[name]["value"] is not None, (name, metrics[name]["reason"])
    assert metrics["locality_eps_mse"]["value"] > 0  # the LoRA changed something
    assert metrics["editability_clip"]["value"] is None and "clip_model_folder" in metrics["editability_clip"]["reason"]
    assert "| editability_clip | not computed: no CLIP model folder given" in table
    # 4 sets (reconstruction, editability, locality tuned and base) x 1 prompt x 2 seeds, at 32 px, in one grid.
    assert grid.ndim == 4 and grid.shape[0] == 1 and grid.shape[1] > 4 * 32 and grid.shape[2] > 2 * 32
    assert state.progress[-1] == (4, 4) and len(state.progress) == 4  # one batch of 2 images per set
    assert model.patches == {} and clip.patcher.patches == {}  # the inputs are only read


def test_evaluate_the_base_model_alone(nodes, fake_models, random_lpips):
    table, text_json, grid = evaluate(nodes, fake_models, class_word="girl")
    metrics = metrics_of(text_json)
    assert metrics["reconstruction_lpips"]["value"] is None and metrics["embedding_distance"]["value"] is None
    assert "no LoRA applied" in metrics["locality_eps_mse"]["reason"]
    assert metrics["diversity_lpips"]["value"] is not None
    assert json.loads(text_json)["settings"]["placeholder"] == "girl"
    assert grid.shape[0] == 1


def test_evaluate_missing_lpips_weights_and_clip_folder_are_reasons_not_errors(nodes, fake_models, dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # no backbone file there
    _, text_json, _ = evaluate(nodes, fake_models, dataset=dataset, clip_model_folder=str(tmp_path / "no-clip"))
    metrics = metrics_of(text_json)
    assert metrics["reconstruction_lpips"]["value"] is None
    assert "alexnet-owt-7be5be79.pth" in metrics["reconstruction_lpips"]["reason"]
    assert metrics["reconstruction_l2"]["value"] is not None
    assert metrics["editability_clip"]["value"] is None and "no-clip" in metrics["editability_clip"]["reason"]


def test_evaluate_with_a_clip_folder_in_clip_vision(nodes, fake_models, dataset, trained, clip_folder, random_lpips):
    _, text_json, _ = evaluate(nodes, fake_models, embedding=trained[0], dataset=dataset, clip_model_folder="tiny-clip")
    metrics = metrics_of(text_json)
    assert metrics["editability_clip"]["value"] is not None and metrics["reconstruction_clip"]["value"] is not None
    node = nodes["PivotalEvaluate"]
    before = node.IS_CHANGED(clip_model_folder="tiny-clip")
    assert before and before == node.IS_CHANGED(clip_model_folder="tiny-clip") and node.IS_CHANGED(clip_model_folder="") == ""
    (clip_folder / "extra.txt").write_text("changed")
    assert node.IS_CHANGED(clip_model_folder="tiny-clip") != before


def test_evaluate_a_stock_train_lora_model_without_an_embedding(nodes, fake_models, random_lpips):
    """The stock Train LoRA node's LORA_MODEL (ComfyUI's own keys, .diff/.diff_b): measured, locality not computed."""
    from helpers import stock_trainer_lora

    from pti_ops.models.tiny_model import build_tiny_bundle

    lora = stock_trainer_lora(build_tiny_bundle().unet)
    text, text_json, _ = evaluate(nodes, fake_models, lora=lora)
    metrics = metrics_of(text_json)
    assert "no prompts without the placeholder: connect the embedding" in metrics["locality_eps_mse"]["reason"]
    assert metrics["diversity_lpips"]["value"] is not None or metrics["diversity_lpips"]["reason"]


def test_evaluate_refuses_bad_seeds(nodes):
    assert "comma-separated whole numbers" in nodes["PivotalEvaluate"].VALIDATE_INPUTS(seeds="0,x")
    assert nodes["PivotalEvaluate"].VALIDATE_INPUTS(seeds="0, 1") is True


# --- PivotalSweep ---------------------------------------------------------------------------------


def test_inversion_sweep_writes_the_report_and_returns_table_plots_grids(nodes, comfy_env, fake_models, dataset, random_lpips):
    state = comfy_env[1]
    model, clip, _ = fake_models
    table, plot, grid = sweep(nodes, fake_models, dataset, output_folder="inversion_sweep")
    assert "# Inversion learning-rate sweep" in table and "lr=0.002" in table and "lr=0.01" in table
    assert "distance_fit" in table
    assert plot.ndim == 4 and plot.shape[0] == 2 and plot.shape[-1] == 3  # curves vs distance, distance fit
    assert grid.ndim == 4 and grid.shape[0] == 2  # reconstruction and editability grids
    folder = state.folders["output"] / "inversion_sweep"
    for name in ("sweep.csv", "sweep.json", "sweep.md", "plots/inversion_curves.png", "plots/distance_fit.png",
                 "grids/reconstruction.png", "grids/editability.png"):  # fmt: skip
        assert (folder / name).is_file(), name
    assert len(list((folder / "embeddings").glob("*.safetensors"))) == 2
    report = json.loads((folder / "sweep.json").read_text())
    assert [row["run"] for row in report["rows"]] == ["initial", "lr=0.002", "lr=0.01"]
    assert report["rows"][2]["distance"] > report["rows"][1]["distance"] > 0
    # One progress bar over both runs' training steps, ending full.
    assert state.progress_bars >= 1 and state.progress[-1] == (4, 4)
    assert [done for done, _ in state.progress] == sorted(done for done, _ in state.progress)
    assert model.patches == {} and clip.patcher.patches == {}
    # The folder is now taken: refused before any training with if_exists error.
    bars = state.progress_bars
    with pytest.raises(FileExistsError, match="is not empty: choose another folder or set `if_exists` to increment"):
        sweep(nodes, fake_models, dataset, output_folder="inversion_sweep", if_exists="error")
    assert state.progress_bars == bars


def test_requeued_sweep_writes_a_numbered_report_folder(nodes, comfy_env, fake_models, dataset, random_lpips):
    """A saved sweep workflow (overwrite off, no if_exists widget) queued again: the next report goes to NAME_00001."""
    output = comfy_env[1].folders["output"]
    for _ in range(2):
        sweep(nodes, fake_models, dataset, learning_rates="1e-2", steps=1, output_folder="requeued")
    assert (output / "requeued" / "sweep.json").is_file() and (output / "requeued_00001" / "sweep.json").is_file()
    settings = json.loads((output / "requeued_00001" / "sweep.json").read_text())["settings"]
    assert settings["output_folder"] == str(output / "requeued_00001")


def test_inversion_sweep_eval_every_adds_intermediate_rows(nodes, comfy_env, fake_models, dataset, random_lpips):
    sweep(nodes, fake_models, dataset, learning_rates="1e-2", steps=4, eval_every=2, output_folder="every2")
    rows = json.loads((comfy_env[1].folders["output"] / "every2" / "sweep.json").read_text())["rows"]
    assert [(row["run"], row["step"]) for row in rows] == [("initial", 0), ("lr=0.01", 2), ("lr=0.01", 4)]


def test_lora_sweep_with_and_without_the_regularizer(nodes, comfy_env, fake_models, dataset, trained, random_lpips):
    state = comfy_env[1]
    reg = run_node(
        nodes["SlerpRegularizer"], mode="path", anchor="character", templates=TEMPLATE, interpolation="slerp", t=0.5,
        t_jitter=0.0, weight=1.0, every=1, samples=1, timestep_min=0, timestep_max=999,
    )[0]  # fmt: skip
    table, plot, grid = sweep(nodes, fake_models, dataset, kind="lora", learning_rates="1e-3,1e-2", embedding=trained[0],
                              regularizer=reg, output_folder="lora_sweep")  # fmt: skip
    assert "# LoRA learning-rate sweep" in table and "none lr=0.001" in table and "path lr=0.01" in table
    assert plot.shape[0] == 1 and grid.shape[0] == 2
    folder = state.folders["output"] / "lora_sweep"
    rows = json.loads((folder / "sweep.json").read_text())["rows"]
    assert [row["run"] for row in rows] == ["base", "none lr=0.001", "none lr=0.01", "path lr=0.001", "path lr=0.01"]
    assert all(row["locality_eps_mse"] is not None for row in rows[1:])
    assert len(list((folder / "loras").glob("*.safetensors"))) == 4
    assert state.progress[-1] == (8, 8)  # 2 regularisers x 2 lrs x 2 steps
    # Without the comparison only the regularised runs; without a regulariser only unregularised ones.
    sweep(nodes, fake_models, dataset, kind="lora", learning_rates="1e-2", embedding=trained[0], regularizer=reg,
          compare_without_regularizer=False, output_folder="lora_reg_only")  # fmt: skip
    rows = json.loads((state.folders["output"] / "lora_reg_only" / "sweep.json").read_text())["rows"]
    assert [row["run"] for row in rows] == ["base", "path lr=0.01"]


def test_cancel_stops_the_sweep_within_a_step_and_writes_nothing(nodes, comfy_env, fake_models, dataset, random_lpips):
    state = comfy_env[1]
    state.interrupt_at_step = 3  # during the second run's training
    with pytest.raises(InterruptProcessingException):
        sweep(nodes, fake_models, dataset, output_folder="cancelled")
    assert max(done for done, _ in state.progress) == 2  # stopped at the first step of the second run
    assert not (state.folders["output"] / "cancelled").exists()


def test_sweep_refuses_bad_inputs_before_training(nodes, comfy_env, fake_models, dataset):
    state = comfy_env[1]
    with pytest.raises(ValueError, match="kind `lora` needs `embedding`"):
        sweep(nodes, fake_models, dataset, kind="lora", output_folder="no_embedding")
    with pytest.raises(ValueError, match="lists 0.01 twice"):
        sweep(nodes, fake_models, dataset, learning_rates="1e-2, 0.01", output_folder="twice")
    (state.folders["output"] / "a_file").write_text("user file")
    for policy in ("error", "overwrite"):
        with pytest.raises(FileExistsError, match="is a file"):
            sweep(nodes, fake_models, dataset, output_folder="a_file", if_exists=policy)
    assert state.progress_bars == 0
    node = nodes["PivotalSweep"]
    assert "path separator" in node.VALIDATE_INPUTS(output_folder="../elsewhere")
    assert "comma-separated numbers" in node.VALIDATE_INPUTS(learning_rates="1e-4, fast")
    assert "positive finite" in node.VALIDATE_INPUTS(learning_rates="-1e-4")
    assert "comma-separated whole numbers" in node.VALIDATE_INPUTS(sample_seeds="1.5")
    assert node.VALIDATE_INPUTS(learning_rates="1e-4,5e-4", sample_seeds="0,1", output_folder="my_sweep") is True
