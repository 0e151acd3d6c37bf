"""PivotalLoRALoader: one file per character (a LoRA with its bundled embedding) onto MODEL and CLIP."""

import pytest
import torch
from comfy_stubs import comfy_env, fake_models, nodes, run_node, run_node_with_ui  # noqa: F401  (fixtures)
from safetensors.torch import load_file

from example_images import write_example_images
from pti_ops.dataset import DatasetConfig, load_image_folder

TEMPLATE = "an anime illustration of {}"


@pytest.fixture(scope="module")
def trained(comfy_env, fake_models, tmp_path_factory):
    """`(pivot, file name, file bytes, embedding files)`: TokenInversion + PivotalLoRATune with bundle_embedding on."""
    folder = tmp_path_factory.mktemp("images")
    write_example_images(folder, count=2, size=32)
    dataset = load_image_folder(folder, DatasetConfig(resolution=32))
    model, clip, vae = fake_models
    pivot = run_node(
        nodes_of(comfy_env)["TokenInversion"], model=model, clip=clip, vae=vae, dataset=dataset, placeholder="tokb",
        initializer="character", num_vectors=2, templates=TEMPLATE, steps=1, learning_rate=1e-2, batch_size=1, seed=0,
        norm_mode="none", embedding_name="tokb_embedding", overwrite=False,
    )[0]  # fmt: skip
    outputs = run_node(
        nodes_of(comfy_env)["PivotalLoRATune"], model=model, clip=clip, vae=vae, dataset=dataset, embedding=pivot, rank=2,
        alpha=0.0, targets="attention", learning_rate=1e-2, steps=1, batch_size=1, seed=0, schedule="sequential",
        train_text_encoder=True, lora_name="character", overwrite=False, bundle_embedding=True,
    )  # fmt: skip
    state = comfy_env[1]
    embeddings = sorted(p.name for p in state.folders["embeddings"].iterdir())
    return pivot, outputs[5], (state.folders["loras"] / outputs[5]).read_bytes(), embeddings


@pytest.fixture
def bundled(nodes, comfy_env, trained):
    """`(pivot, file name)`, the file in the stub's loras folder (which each test starts empty)."""
    pivot, name, data, _ = trained
    (comfy_env[1].folders["loras"] / name).write_bytes(data)
    return pivot, name


def nodes_of(comfy_env):
    return comfy_env[0]


def test_pivotal_lora_tune_bundles_the_embedding(comfy_env, bundled, trained):
    pivot, name = bundled
    saved = load_file(str(comfy_env[1].folders["loras"] / name))
    assert torch.equal(saved["bundle_emb.tokb.clip_l"], pivot.vectors) and saved["bundle_emb.tokb.clip_l"].shape == (2, 32)
    assert any(key.startswith("lora_unet_") for key in saved) and any(key.startswith("lora_te_") for key in saved)
    assert trained[3] == ["tokb_embedding.safetensors"]  # the embedding file is written too


def test_loader_applies_the_lora_and_gives_only_its_clip_the_embedding(nodes, comfy_env, fake_models, bundled):
    pivot, name = bundled
    model, clip, _ = fake_models
    model_out, clip_out, trigger = run_node(nodes["PivotalLoRALoader"], model=model, clip=clip, lora_name=name,
                                            strength_model=1.0, strength_clip=0.5)  # fmt: skip
    assert trigger == "embedding:tokb"
    assert model_out.patches["lora"] and clip_out.patcher.patches["lora"] and comfy_env[1].not_loaded == []
    assert model.patches == {} and clip.patcher.patches == {}
    folder = clip_out.tokenizer.clip_l.embedding_directory[0]
    written = load_file(f"{folder}/tokb.safetensors")
    assert torch.equal(written["clip_l"], pivot.vectors)
    # Only the returned CLIP looks there: the input's tokenizer (shared by ComfyUI's clones) is unchanged.
    assert clip.tokenizer.clip_l.embedding_directory == [] and clip.clone().tokenizer.clip_l.embedding_directory == []
    assert clip_out.tokenizer.clip_name == "l"


def test_a_file_without_an_embedding_loads_with_a_warning(nodes, comfy_env, fake_models, bundled):
    model, clip, _ = fake_models
    from safetensors.torch import save_file

    lora = {k: v for k, v in load_file(str(comfy_env[1].folders["loras"] / bundled[1])).items() if not k.startswith("bundle_emb.")}
    save_file(lora, str(comfy_env[1].folders["loras"] / "plain.safetensors"))
    (model_out, clip_out, trigger), ui = run_node_with_ui(nodes["PivotalLoRALoader"], model=model, clip=clip,
                                                          lora_name="plain.safetensors", strength_model=1.0,
                                                          strength_clip=1.0)  # fmt: skip
    assert trigger == "" and model_out.patches["lora"] and "bundles no embedding" in ui["text"][0]


def test_loader_lists_the_lora_files_and_follows_their_content(nodes, comfy_env, bundled):
    node = nodes["PivotalLoRALoader"]
    assert bundled[1] in node.INPUT_TYPES()["required"]["lora_name"][0]
    before = node.IS_CHANGED(lora_name=bundled[1])
    path = comfy_env[1].folders["loras"] / bundled[1]
    path.write_bytes(path.read_bytes())
    assert node.IS_CHANGED(lora_name=bundled[1]) == before
    with pytest.raises(ValueError, match="`lora_name` 'missing.safetensors' is not in ComfyUI's loras folders"):
        node.IS_CHANGED(lora_name="missing.safetensors")


def test_the_loader_refuses_a_file_with_nan_naming_it(nodes, comfy_env, fake_models, bundled):
    model, clip, _ = fake_models
    from safetensors.torch import save_file

    tensors = load_file(str(comfy_env[1].folders["loras"] / bundled[1]))
    key = next(k for k in sorted(tensors) if k.endswith("lora_up.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(comfy_env[1].folders["loras"] / "diverged.safetensors"))
    with pytest.raises(ValueError, match=rf"tensor '{key}' of LoRA file .*diverged\.safetensors holds 1 NaN"):
        run_node(nodes["PivotalLoRALoader"], model=model, clip=clip, lora_name="diverged.safetensors",
                 strength_model=1.0, strength_clip=1.0)  # fmt: skip
    assert model.patches == {} and clip.patcher.patches == {}
