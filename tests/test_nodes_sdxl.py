"""The nodes on SDXL (fake ComfyUI SDXL objects over tiny-sdxl), and ModelSamplingDiscrete in both families."""

import pytest
import torch
from comfy_stubs import V_PREDICTION, comfy_env, fake_comfy_models, model_sampling, nodes, run_node  # noqa: F401  (fixtures)
from safetensors import safe_open
from safetensors.torch import load_file

from example_images import write_example_images
from pti_ops.dataset import DatasetConfig, load_image_folder
from pti_ops.models.tiny_model import TINY_SDXL_TEXT_WIDTHS, build_tiny_bundle, build_tiny_sdxl_bundle

TEMPLATE = "an anime illustration of {}"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    write_example_images(folder, count=2, size=32)
    return load_image_folder(folder, DatasetConfig(resolution=32))


@pytest.fixture(scope="module")
def sdxl_models():
    return fake_comfy_models(build_tiny_sdxl_bundle())


def invert(nodes, models, dataset, **overrides):
    model, clip, vae = models
    inputs = dict(
        model=model, clip=clip, vae=vae, dataset=dataset, placeholder="tok1", initializer="character", num_vectors=2,
        templates=TEMPLATE, steps=2, learning_rate=1e-2, batch_size=2, seed=0, norm_mode="none",
        embedding_name="tok1", overwrite=False, if_exists="overwrite",
    )  # fmt: skip
    inputs.update(overrides)
    return run_node(nodes["TokenInversion"], **inputs)


def test_token_inversion_on_sdxl_trains_both_encoders_and_writes_clip_l_and_clip_g(nodes, comfy_env, sdxl_models, dataset):
    state = comfy_env[1]
    model, clip, _ = sdxl_models
    embedding, clip_out, trigger, loss = invert(nodes, sdxl_models, dataset)[:4]
    assert trigger == "embedding:tok1" and len(loss["loss"]) == 2
    path = state.folders["embeddings"] / "tok1.safetensors"
    tensors = load_file(path)
    assert sorted(tensors) == ["clip_g", "clip_l"]  # ComfyUI's SDXL encoders read one key each
    assert [tensors[key].shape[1] for key in ("clip_l", "clip_g")] == list(TINY_SDXL_TEXT_WIDTHS)
    assert all(tensors[key].shape[0] == 2 and tensors[key].dtype == torch.float32 for key in tensors)
    assert torch.equal(tensors["clip_l"], embedding.vectors_by_key["clip_l"])
    assert torch.equal(tensors["clip_g"], embedding.vectors_by_key["clip_g"])
    with safe_open(str(path), framework="pt") as file:
        assert file.metadata()["model_family"] == "sdxl"
    assert model.patches == {} and clip.patcher.patches == {} and clip_out is not clip


def test_clip_set_last_layer_on_sdxl_reaches_the_inversion(nodes, sdxl_models, dataset):
    """No CLIPSetLastLayer = the penultimate layer (-2): the same embedding as -2, another than -1."""
    model, clip, vae = sdxl_models
    default = invert(nodes, sdxl_models, dataset)[0].vectors_by_key
    penultimate, last = clip.clone(), clip.clone()
    penultimate.layer_idx, last.layer_idx = -2, -1
    at_2 = invert(nodes, (model, penultimate, vae), dataset)[0].vectors_by_key
    at_1 = invert(nodes, (model, last, vae), dataset)[0].vectors_by_key
    assert all(torch.equal(default[key], at_2[key]) for key in default)
    assert not any(torch.equal(default[key], at_1[key]) for key in default)


@pytest.mark.parametrize("bundle_factory", [build_tiny_bundle, build_tiny_sdxl_bundle], ids=["sd15", "sdxl"])
def test_an_upstream_model_sampling_discrete_changes_what_is_trained(nodes, dataset, bundle_factory):
    """ModelSamplingDiscrete v_prediction (zsnr) before TokenInversion: v targets, another embedding (it used to
    come out bit-identical to one trained without the node)."""
    model, clip, vae = fake_comfy_models(bundle_factory())
    v_model = model.clone()
    v_model.add_object_patch("model_sampling", model_sampling(V_PREDICTION, zsnr=True))
    eps = invert(nodes, (model, clip, vae), dataset)[0].vectors_by_key
    again = invert(nodes, (model, clip, vae), dataset)[0].vectors_by_key
    v = invert(nodes, (v_model, clip, vae), dataset)[0].vectors_by_key
    assert all(torch.equal(eps[key], again[key]) for key in eps)  # the runs are deterministic: the difference is v
    assert all(not torch.allclose(eps[key], v[key]) for key in eps)


def test_norm_stats_on_an_sdxl_clip_measure_both_encoders_for_vslerp(nodes, sdxl_models):
    """EmbeddingNormStats converts both of SDXL's text encoders; its centres fit SDXL's conditioning in the regulariser."""
    captions = "\n".join(f"an anime illustration of a {word}" for word in ("girl", "boy", "cat", "dog", "robot", "flower"))
    inputs = dict(clip=sdxl_models[1], captions=captions, captions_file="", space="hidden", position="", template=TEMPLATE,
                  class_word="character")  # fmt: skip
    stats, summary, _ = run_node(nodes["EmbeddingNormStats"], **inputs)
    assert list(stats.encoders) == ["clip_l", "clip_g"] and "clip_g" in summary
    regularizer = run_node(nodes["SlerpRegularizer"], mode="path", anchor="character", templates=TEMPLATE,
                           interpolation="vslerp", t=0.5, t_jitter=0.0, weight=1.0, every=1, samples=1, timestep_min=0,
                           timestep_max=999, norm_stats=stats)[0]  # fmt: skip
    assert regularizer.centre.shape == (77, sum(TINY_SDXL_TEXT_WIDTHS)) and regularizer.pooled_centre is not None
