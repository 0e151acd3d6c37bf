"""TokenInversion, SlerpRegularizer and PivotalLoRATune on fake ComfyUI objects over the tiny model."""

import pytest
import torch
from comfy_stubs import InterruptProcessingException, comfy_env, fake_models, nodes, run_node  # noqa: F401
from comfy_stubs import run_node_with_ui
from safetensors import safe_open
from safetensors.torch import load_file

from pti_ops.dataset import DatasetConfig, load_image_folder
from example_images import write_example_images
from pti_ops.files.lora_file import comfyui_lora_key_map
from pti_ops.models.tiny_model import build_tiny_bundle

TEMPLATE = "an anime illustration of {}"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    write_example_images(folder, count=4, size=32)
    return load_image_folder(folder, DatasetConfig(resolution=32))


def invert(nodes, fake_models, dataset, **overrides):
    model, clip, vae = fake_models
    inputs = dict(
        model=model, clip=clip, vae=vae, dataset=dataset, placeholder="tok1", initializer="character", num_vectors=1,
        templates=TEMPLATE, steps=3, learning_rate=1e-2, batch_size=2, seed=0, norm_mode="none",
        embedding_name="tok1", overwrite=False,
    )  # fmt: skip
    inputs.update(overrides)
    return run_node(nodes["TokenInversion"], **inputs)


def tune(nodes, fake_models, dataset, embedding, **overrides):
    model, clip, vae = fake_models
    inputs = dict(
        model=model, clip=clip, vae=vae, dataset=dataset, embedding=embedding, rank=2, alpha=0.0,
        targets="attention", learning_rate=1e-3, steps=2, batch_size=1, seed=0, schedule="sequential",
        train_text_encoder=False, lora_name="tok1_lora", overwrite=False,
    )  # fmt: skip
    inputs.update(overrides)
    return run_node(nodes["PivotalLoRATune"], **inputs)


def regularizer(nodes, **overrides):
    inputs = dict(
        mode="path", anchor="character", templates=TEMPLATE, interpolation="slerp", t=0.5, t_jitter=0.0,
        weight=1.0, every=1, samples=1, timestep_min=0, timestep_max=999,
    )  # fmt: skip
    inputs.update(overrides)
    return run_node(nodes["SlerpRegularizer"], **inputs)[0]


def test_token_inversion_writes_the_embedding_and_reports_every_step(nodes, comfy_env, fake_models, dataset):
    state = comfy_env[1]
    model, clip, _ = fake_models
    embedding, clip_out, trigger, loss, plot, snapshots = invert(nodes, fake_models, dataset)
    path = state.folders["embeddings"] / "tok1.safetensors"
    assert trigger == "embedding:tok1" and embedding.trigger == trigger
    tensors = load_file(path)
    assert list(tensors) == ["clip_l"] and tensors["clip_l"].shape == (1, 32)
    assert torch.equal(tensors["clip_l"], embedding.vectors)
    with safe_open(str(path), framework="pt") as file:
        assert file.metadata()["placeholder"] == "tok1" and file.metadata()["initializer"] == "character"
    assert state.progress == [(1, 3), (2, 3), (3, 3)]
    assert len(loss["loss"]) == 3 and all(isinstance(v, float) for v in loss["loss"])
    assert plot.ndim == 4 and plot.shape[0] == 1 and plot.shape[-1] == 3 and plot.dtype == torch.float32
    assert clip_out is not clip and model.patches == {} and clip.patcher.patches == {}
    assert state.unloads >= 1  # ComfyUI's copies were unloaded before training
    assert embedding.templates == [TEMPLATE]
    assert snapshots == ""  # save_every off


def test_training_nodes_take_the_trainer_options_and_list_their_snapshots(nodes, comfy_env, fake_models, dataset):
    state = comfy_env[1]
    *_, snapshots = invert(nodes, fake_models, dataset, steps=3, save_every=2, lr_schedule="cosine", warmup_steps=1,
                           snr_gamma=5.0, noise_offset=0.05)
    assert snapshots == "tok1_step0002.safetensors" and (state.folders["embeddings"] / snapshots).is_file()
    embedding = invert(nodes, fake_models, dataset, steps=1, embedding_name="other")[0]
    *_, snapshots = tune(nodes, fake_models, dataset, embedding, steps=4, save_every=2, optimizer="adafactor")
    assert snapshots.splitlines() == ["tok1_lora_step0002.safetensors"]
    assert (state.folders["loras"] / "tok1_lora_step0002.safetensors").is_file()
    assert state.previews == []
    invert(nodes, fake_models, dataset, steps=3, preview_every=2, preview_prompts="a photo of {}", embedding_name="seen")
    assert [step for step, _ in state.previews] == [2, 3]
    kind, image, side = state.previews[0][1]
    assert kind == "JPEG" and side == 512 and image.size[0] > 0  # a PIL image, as ComfyUI's previewers send
    with pytest.raises(Exception, match="`warmup_steps` needs a schedule with warm-up"):
        invert(nodes, fake_models, dataset, steps=3, warmup_steps=1, embedding_name="third")


def test_existing_embedding_is_refused_before_training_with_if_exists_error(nodes, comfy_env, fake_models, dataset):
    state = comfy_env[1]
    (state.folders["embeddings"] / "tok1.safetensors").write_bytes(b"user file")
    with pytest.raises(FileExistsError, match="Choose another `embedding_name`, set `if_exists` to increment"):
        invert(nodes, fake_models, dataset, if_exists="error")
    assert state.progress_bars == 0
    assert (state.folders["embeddings"] / "tok1.safetensors").read_bytes() == b"user file"
    invert(nodes, fake_models, dataset, if_exists="overwrite", steps=1)
    assert (state.folders["embeddings"] / "tok1.safetensors").read_bytes() != b"user file"


def test_overwrite_switch_of_saved_workflows_still_replaces(nodes, comfy_env, fake_models, dataset):
    state = comfy_env[1]
    (state.folders["embeddings"] / "tok1.safetensors").write_bytes(b"user file")
    *_, trigger, _, _, _ = invert(nodes, fake_models, dataset, overwrite=True, if_exists="error", steps=1)
    assert trigger == "embedding:tok1"
    assert (state.folders["embeddings"] / "tok1.safetensors").read_bytes() != b"user file"
    assert [p.name for p in state.folders["embeddings"].iterdir()] == ["tok1.safetensors"]


def test_requeued_inversion_writes_numbered_files_and_names_them(nodes, comfy_env, fake_models, dataset):
    """A saved workflow (overwrite off, no if_exists widget yet) queued three times: no error, three files."""
    state = comfy_env[1]
    triggers = [invert(nodes, fake_models, dataset, steps=1)[2] for _ in range(3)]
    assert triggers == ["embedding:tok1", "embedding:tok1_00001", "embedding:tok1_00002"]
    assert sorted(p.name for p in state.folders["embeddings"].iterdir()) == [
        "tok1.safetensors", "tok1_00001.safetensors", "tok1_00002.safetensors"]
    embedding = invert(nodes, fake_models, dataset, steps=1)[0]
    assert embedding.trigger == "embedding:tok1_00003" and embedding.file.name == "tok1_00003.safetensors"


def test_cancel_stops_within_a_step_and_writes_nothing(nodes, comfy_env, fake_models, dataset):
    state = comfy_env[1]
    state.interrupt_at_step = 2
    with pytest.raises(InterruptProcessingException):
        invert(nodes, fake_models, dataset, steps=50)
    assert state.progress == [(1, 50)]
    assert list(state.folders["embeddings"].iterdir()) == []


def test_bad_names_fail_validation(nodes):
    assert nodes["TokenInversion"].VALIDATE_INPUTS(embedding_name="my tok") != True  # noqa: E712
    assert "path separator" in nodes["PivotalLoRATune"].VALIDATE_INPUTS(lora_name="../x")
    assert nodes["TokenInversion"].VALIDATE_INPUTS(embedding_name="tok1") is True


def test_placeholder_already_a_word_is_a_clear_error(nodes, fake_models, dataset):
    with pytest.raises(ValueError, match="already contains the token 'character'"):
        invert(nodes, fake_models, dataset, placeholder="character")


def test_lora_tune_applies_the_lora_to_clones_and_writes_a_kohya_file(nodes, comfy_env, fake_models, dataset):
    state = comfy_env[1]
    model, clip, _ = fake_models
    embedding = invert(nodes, fake_models, dataset, steps=1)[0]
    reg = regularizer(nodes)
    model_out, clip_out, lora, loss, plot, lora_file, trigger, snapshots = tune(nodes, fake_models, dataset, embedding, regularizer=reg)
    assert lora_file == "tok1_lora.safetensors" and trigger == "embedding:tok1"
    assert model_out is not model and clip_out is not clip
    assert model.patches == {} and clip.patcher.patches == {}
    assert model_out.patches["lora"] and state.not_loaded == []
    saved = load_file(state.folders["loras"] / lora_file)
    assert set(saved) == set(lora) and all(torch.equal(saved[k], lora[k]) for k in lora)
    modules = {key.rsplit(".", 2)[0] for key in lora if key.endswith("lora_down.weight")}
    unet_modules = [name for name, _ in build_tiny_bundle().unet.named_modules()]
    assert modules and modules <= comfyui_lora_key_map(unet_modules, [])
    assert all(key.startswith("lora_unet_") for key in lora)
    assert len(loss["loss"]) == 2 and plot.shape[0] == 1
    assert state.progress[-2:] == [(1, 2), (2, 2)]


def test_lora_tune_with_text_encoder_patches_the_clip_too(nodes, comfy_env, fake_models, dataset):
    embedding = invert(nodes, fake_models, dataset, steps=1)[0]
    _, clip_out, lora, *_ = tune(nodes, fake_models, dataset, embedding, train_text_encoder=True)
    assert any(key.startswith("lora_te_") for key in lora)
    assert clip_out.patcher.patches["lora"] and comfy_env[1].not_loaded == []


def test_joint_schedule_saves_its_own_embedding(nodes, comfy_env, fake_models, dataset):
    state = comfy_env[1]
    embedding = invert(nodes, fake_models, dataset, steps=1)[0]
    *_, lora_file, trigger, _ = tune(nodes, fake_models, dataset, embedding, schedule="joint", lora_name="joint_run")
    assert trigger == "embedding:joint_run"
    vectors = load_file(state.folders["embeddings"] / "joint_run.safetensors")["clip_l"]
    assert not torch.equal(vectors, embedding.vectors)


def test_lora_name_taken_is_refused_before_training(nodes, comfy_env, fake_models, dataset):
    state = comfy_env[1]
    embedding = invert(nodes, fake_models, dataset, steps=1)[0]
    (state.folders["loras"] / "tok1_lora.safetensors").write_bytes(b"user file")
    bars = state.progress_bars
    with pytest.raises(FileExistsError, match="tok1_lora.safetensors already exists"):
        tune(nodes, fake_models, dataset, embedding, if_exists="error")
    assert state.progress_bars == bars


def test_lora_name_taken_increments_and_the_outputs_name_the_file_written(nodes, comfy_env, fake_models, dataset):
    state = comfy_env[1]
    embedding = invert(nodes, fake_models, dataset, steps=1)[0]
    (state.folders["loras"] / "tok1_lora.safetensors").write_bytes(b"user file")
    *_, lora_file, trigger, _ = tune(nodes, fake_models, dataset, embedding)
    assert lora_file == "tok1_lora_00001.safetensors" and trigger == "embedding:tok1"
    assert (state.folders["loras"] / "tok1_lora.safetensors").read_bytes() == b"user file"
    assert (state.folders["loras"] / lora_file).is_file()


def test_joint_schedule_increments_lora_and_embedding_together(nodes, comfy_env, fake_models, dataset):
    state = comfy_env[1]
    embedding = invert(nodes, fake_models, dataset, steps=1)[0]
    (state.folders["embeddings"] / "joint_run.safetensors").write_bytes(b"user file")  # only the embedding is taken
    *_, lora_file, trigger, _ = tune(nodes, fake_models, dataset, embedding, schedule="joint", lora_name="joint_run")
    assert lora_file == "joint_run_00001.safetensors" and trigger == "embedding:joint_run_00001"
    assert (state.folders["embeddings"] / "joint_run_00001.safetensors").is_file()
    assert not (state.folders["loras"] / "joint_run.safetensors").exists()


def test_regularizer_settings(nodes):
    reg = regularizer(nodes, t=0.3, t_jitter=0.1, timestep_min=100, timestep_max=800, samples=2)
    assert reg.t_range == pytest.approx((0.2, 0.4)) and reg.timestep_range == (100, 800) and reg.samples == 2
    assert regularizer(nodes).timestep_range is None and regularizer(nodes).t == 0.5


def test_regularizer_vslerp_needs_hidden_norm_stats(nodes, fake_models):
    with pytest.raises(ValueError, match="no centre was given: connect norm statistics"):
        regularizer(nodes, interpolation="vslerp")
    captions = "a photo of a cat\na drawing of a dog\na girl with a hat\na boy in the city"
    stats_inputs = dict(clip=fake_models[1], captions=captions, captions_file="", position="", template=TEMPLATE, class_word="character")
    hidden = run_node(nodes["EmbeddingNormStats"], space="hidden", **stats_inputs)[0]
    reg = regularizer(nodes, interpolation="vslerp", norm_stats=hidden)
    assert reg.centre.shape == (77, 32)
    with pytest.raises(ValueError, match="`interpolation` is `slerp`, which has no centre"):
        regularizer(nodes, norm_stats=hidden)
    tokens = run_node(nodes["EmbeddingNormStats"], space="token_embedding", **stats_inputs)[0]
    with pytest.raises(ValueError, match="connect statistics of the `hidden` space"):
        regularizer(nodes, interpolation="vslerp", norm_stats=tokens)


def test_memory_options_reach_the_core(nodes, fake_models, dataset):
    embedding = invert(nodes, fake_models, dataset, steps=1, mixed_precision="bf16", gradient_checkpointing=True)[0]
    assert torch.isfinite(embedding.vectors).all()
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        tune(nodes, fake_models, dataset, embedding, mixed_precision="fp16")


def test_regularizer_image_space_needs_the_lpips_weights(nodes, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="`image_space` needs LPIPS's AlexNet weights alexnet-owt-7be5be79.pth"):
        regularizer(nodes, image_space=True)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "alexnet-owt-7be5be79.pth").write_bytes(b"")
    reg = regularizer(nodes, image_space=True, image_l2_weight=0.2)
    assert reg.image_space is True and reg.image_l2_weight == pytest.approx(0.2)


def test_training_on_a_dataset_with_skipped_images_says_so_every_run(nodes, comfy_env, fake_models, tmp_path, caplog):
    """The dataset node ran once (ComfyUI caches it); each TokenInversion run repeats its warning (issue #16)."""
    state = comfy_env[1]
    write_example_images(tmp_path, count=2, size=32)
    (tmp_path / "corrupt.png").write_bytes(b"garbage")
    data = load_image_folder(tmp_path, DatasetConfig(resolution=32, on_bad_image="skip"))
    model, clip, vae = fake_models
    inputs = dict(model=model, clip=clip, vae=vae, dataset=data, placeholder="tok1", initializer="character",
                  num_vectors=1, templates=TEMPLATE, steps=1, learning_rate=1e-2, batch_size=1, seed=0,
                  norm_mode="none", embedding_name="skipped", overwrite=False, unique_id="4")  # fmt: skip
    caplog.clear()
    with caplog.at_level("WARNING"):
        for run in range(2):
            (embedding, *_), ui = run_node_with_ui(nodes["TokenInversion"], **inputs)
            assert "the training images: skipped 1 unreadable image(s)" in ui["text"][0] and "corrupt.png" in ui["text"][0]
            assert state.node_texts[-1] == ("4", ui["text"][0])
    assert sum("corrupt.png" in record.getMessage() for record in caplog.records) == 2
    *_, ui = run_node_with_ui(nodes["PivotalLoRATune"], model=model, clip=clip, vae=vae, dataset=data,
                              embedding=embedding, rank=2, alpha=0.0, targets="attention", learning_rate=1e-3,
                              steps=1, batch_size=1, seed=0, schedule="sequential", train_text_encoder=False,
                              lora_name="skipped_lora", overwrite=False)  # fmt: skip
    assert "corrupt.png" in ui["text"][0]


def test_mode_tooltip_uses_the_registry_and_the_names_users_know(nodes):
    from pti_ops.regularizer import MODES

    tooltip = nodes["SlerpRegularizer"].INPUT_TYPES()["required"]["mode"][1]["tooltip"]
    assert all(f"{name}: {spec.summary}" in tooltip for name, spec in MODES.items())
    assert "class: the class-word prompt: Differential Output Preservation (DOP" in tooltip
    assert "empty: the empty prompt: blank-prompt preservation" in tooltip
