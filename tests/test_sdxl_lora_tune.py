"""LoRA tuning around the pivot on SDXL (tiny-sdxl): both encoders' captions, pooled and time-id
conditioning in every UNet pass, the regulariser per encoder block, files that ComfyUI and diffusers read."""

import pytest
import torch

from pti_ops.dataset import dataset_from_tensor
from pti_ops.errors import InvalidInputError
from pti_ops.files.comfy_lora_keys import comfyui_sdxl_lora_key_map
from pti_ops.files.lora_file import apply_kohya_lora, load_lora
from pti_ops.lora_tune import TuneConfig, tune_around
from pti_ops.models import load_bundle
from pti_ops.models.conditioning import add_time_ids
from pti_ops.pivot import Pivot
from pti_ops.regularizer import LocalityRegularizer, RegularizerConfig
from pti_ops.training.adapters import adapters_disabled
from pti_ops.training.batches import batch_time_ids
from pti_ops.training.text_conditioning import encode_conditioning

RESOLUTION = 32
TEMPLATE = "an anime illustration of {}"


def _setup(seed=0):
    bundle = load_bundle("tiny-sdxl")
    images = torch.rand(4, RESOLUTION, RESOLUTION, 3, generator=torch.Generator().manual_seed(seed))
    dataset = dataset_from_tensor(images, RESOLUTION)
    dataset.original_sizes = [(48, 64), (40, 40), (48, 64), (64, 32)]
    start = Pivot.at_initializer(bundle, "tok1", "character", templates=[TEMPLATE])
    g = torch.Generator().manual_seed(5)  # an inverted token: moved away from its class word
    pivot = start.with_vectors([v + 0.5 * torch.randn(v.shape, generator=g) for v in start.vectors_by_key.values()], [], {})
    pivot.apply(bundle)
    return bundle, dataset, pivot


def _config(**overrides):
    return TuneConfig(**{"steps": 12, "learning_rate": 2e-3, "batch_size": 2, "history_every": 4, "seed": 0, **overrides})


def _prediction(bundle, prompt, seed=11, n=2):
    """The UNet's prediction on fixed noisy latents, SDXL-conditioned on `prompt` (pooled + time ids)."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, RESOLUTION // bundle.vae_scale_factor, RESOLUTION // bundle.vae_scale_factor, generator=g)
    timesteps = torch.randint(0, 1000, (n,), generator=g)
    conditioning = encode_conditioning(bundle, [prompt] * n)
    time_ids = add_time_ids((RESOLUTION, RESOLUTION), batch_size=n)
    with torch.no_grad():
        return bundle.unet(latents, timesteps, **conditioning.unet_kwargs(time_ids)).sample


def test_tuning_lowers_the_loss_and_leaves_every_original_weight():
    bundle, dataset, pivot = _setup()
    base = _prediction(bundle, "an anime illustration of tok1")
    originals = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    result = tune_around(bundle, dataset, pivot, _config(steps=40, history_every=10, learning_rate=5e-3))
    losses = [record["loss"] for record in result.history]
    assert losses[-1] < losses[0]
    assert not torch.equal(_prediction(bundle, "an anime illustration of tok1"), base)
    with adapters_disabled(bundle):
        assert torch.equal(_prediction(bundle, "an anime illustration of tok1"), base)
    state = bundle.unet.state_dict()
    for key, value in originals.items():
        tuned_key = key if key in state else key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(state[tuned_key], value), key
    assert sorted(result.pivot.vectors_by_key) == ["clip_g", "clip_l"] and torch.equal(result.pivot.vectors, pivot.vectors)


def test_every_unet_pass_gets_the_pooled_embedding_and_the_images_time_ids():
    """Batches carry their images' recorded sizes; the regularisation rows reuse the ids of the image
    whose latents they reuse, identical in the tuned and the frozen pass."""
    bundle, dataset, pivot = _setup()
    calls = []

    def record(module, args, kwargs):
        added = kwargs.get("added_cond_kwargs")
        calls.append(None if added is None else (added["time_ids"].clone(), added["text_embeds"].shape))

    handle = bundle.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        tune_around(bundle, dataset, pivot, _config(steps=1, batch_size=2), RegularizerConfig(mode="path", samples=3))
    finally:
        handle.remove()
    (tuned_ids, tuned_pooled), (frozen_ids, frozen_pooled) = calls
    pooled = bundle.text_encoder_2.config.projection_dim  # bigG's projection
    assert tuned_pooled == (5, pooled) and frozen_pooled == (3, pooled)  # 2 images + 3 regularisation rows
    known = {tuple(row.tolist()) for row in batch_time_ids(dataset, torch.arange(len(dataset)))}
    assert {tuple(row.tolist()) for row in tuned_ids} <= known
    assert torch.equal(tuned_ids[2:], frozen_ids)
    assert torch.equal(frozen_ids, tuned_ids[torch.tensor([0, 1, 0])])


def test_text_encoder_lora_and_joint_token_train_both_encoders():
    bundle, dataset, pivot = _setup()
    rows = {key: encoder.get_input_embeddings().weight.detach().clone()
            for key, encoder in zip(("clip_l", "clip_g"), bundle.text_encoders)}
    result = tune_around(bundle, dataset, pivot, _config(steps=6, schedule="joint", train_text_encoder=True, ti_learning_rate=0.05))
    assert {key.split("_")[1] for key in result.lora} == {"unet", "te1", "te2"}
    ids = [bundle.tokenizer.convert_tokens_to_ids("tok1"), bundle.tokenizer_2.convert_tokens_to_ids("tok1")]
    for (key, before), encoder, token_id in zip(rows.items(), bundle.text_encoders, ids):
        after = encoder.get_input_embeddings().weight.detach()
        changed = (after != before).any(dim=-1).nonzero().flatten().tolist()
        assert changed == [token_id], key
        assert torch.equal(result.pivot.vectors_by_key[key], after[token_id:token_id + 1])
        assert not torch.equal(result.pivot.vectors_by_key[key], pivot.vectors_by_key[key])


def test_saved_lora_loads_in_comfyui_and_diffusers_and_back_into_our_tooling(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    bundle, dataset, pivot = _setup()
    result = tune_around(bundle, dataset, pivot, _config(steps=4, train_text_encoder=True, targets="attention_ff"))
    path = result.save(tmp_path / "tok1_lora.safetensors", bundle_embedding=True)
    tensors, _ = load_lora(path)
    # ComfyUI's stock LoraLoader maps every module written (no "lora key not loaded")
    fresh = load_bundle("tiny-sdxl")
    names = [[n for n, _ in model.named_modules()] for model in (fresh.unet, fresh.text_encoder, fresh.text_encoder_2)]
    written = {key.rsplit(".", 2)[0] if key.endswith((".lora_up.weight", ".lora_down.weight")) else key.rsplit(".", 1)[0]
               for key in tensors if not key.startswith("bundle_emb.")}
    assert written and written - comfyui_sdxl_lora_key_map(*names) == set()
    assert {k for k in tensors if k.startswith("bundle_emb.")} == {"bundle_emb.tok1.clip_l", "bundle_emb.tok1.clip_g"}
    # diffusers' SDXL pipeline: the same predictions as the trained adapters
    pipe = StableDiffusionXLPipeline(
        vae=fresh.vae, text_encoder=fresh.text_encoder, text_encoder_2=fresh.text_encoder_2, tokenizer=fresh.tokenizer,
        tokenizer_2=fresh.tokenizer_2, unet=fresh.unet, scheduler=fresh.noise_scheduler,
    )  # fmt: skip
    pipe.load_lora_weights({k: v for k, v in tensors.items() if not k.startswith("bundle_emb.")})
    torch.testing.assert_close(_prediction(fresh, "a character"), _prediction(bundle, "a character"), atol=1e-5, rtol=0)
    # our own import
    ours = load_bundle("tiny-sdxl")
    assert apply_kohya_lora(ours.unet, list(ours.text_encoders), result.lora, family=ours.family) == []
    torch.testing.assert_close(_prediction(ours, "a character"), _prediction(bundle, "a character"), atol=1e-5, rtol=0)


def _slerp(a, b, t):
    """SLERP written out per vector (independent of pti_ops.interpolation)."""
    cos = (a * b).sum(-1, keepdim=True) / (a.norm(dim=-1, keepdim=True) * b.norm(dim=-1, keepdim=True))
    omega = torch.arccos(cos.clamp(-1, 1))
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


def test_path_conditioning_is_a_slerp_within_each_encoders_block_and_of_the_pooled_vector():
    bundle, _, pivot = _setup()
    token = pivot.apply(bundle)
    reg = LocalityRegularizer(bundle, token, RegularizerConfig(mode="path", t=0.3, templates=[TEMPLATE]))
    got = reg.conditionings(0)
    placeholder, anchor = (encode_conditioning(bundle, [TEMPLATE.format(w)]) for w in ("tok1", "character"))
    start = int((bundle.tokenizer([TEMPLATE.format("tok1")]).input_ids[0]).index(token.token_ids[0]))
    assert got.widths == placeholder.widths == (32, 64)
    for block, first, last in zip(got.blocks(), placeholder.blocks(), anchor.blocks()):
        assert torch.equal(block[0, :start], first[0, :start])  # before the placeholder: untouched
        torch.testing.assert_close(block[0, start:], _slerp(first[0, start:], last[0, start:], 0.3), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.pooled[0], _slerp(placeholder.pooled[0], anchor.pooled[0], 0.3), atol=1e-5, rtol=1e-5)
    # one space per encoder: a SLERP of the concatenated 96-wide vectors is a different point
    joint = _slerp(placeholder.hidden[0, start:], anchor.hidden[0, start:], 0.3)
    assert not torch.allclose(got.hidden[0, start:], joint, atol=1e-4)


def test_vslerp_on_sdxl_takes_a_centre_per_block_and_a_pooled_centre():
    bundle, _, pivot = _setup()
    token = pivot.apply(bundle)
    zero_centres = RegularizerConfig(interpolation="vslerp", t=0.3, centre=torch.zeros(77, 96), pooled_centre=torch.zeros(48))
    by_vslerp = LocalityRegularizer(bundle, token, zero_centres).conditionings(0)
    by_slerp = LocalityRegularizer(bundle, token, RegularizerConfig(t=0.3)).conditionings(0)
    torch.testing.assert_close(by_vslerp.hidden, by_slerp.hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(by_vslerp.pooled, by_slerp.pooled, atol=1e-5, rtol=1e-5)
    with pytest.raises(InvalidInputError, match=r"does not fit this model's conditioning, which is \[77, 96\]"):
        LocalityRegularizer(bundle, token, RegularizerConfig(interpolation="vslerp", centre=torch.zeros(77, 32)))
    with pytest.raises(InvalidInputError, match=r"around `pooled_centre` \[48\]"):
        LocalityRegularizer(bundle, token, RegularizerConfig(interpolation="vslerp", centre=torch.zeros(96)))


def _class_drift(regularizer):
    bundle, dataset, pivot = _setup()
    before = _prediction(bundle, "an anime illustration of character")
    tune_around(bundle, dataset, pivot, _config(steps=30, learning_rate=1e-2), regularizer)
    return (_prediction(bundle, "an anime illustration of character") - before).pow(2).mean().item()


def test_path_keeps_an_sdxl_class_prompt_closer_to_the_original_than_no_regulariser():
    free, kept = _class_drift(None), _class_drift(RegularizerConfig(mode="path", samples=2))
    assert 0 < kept < free


def test_offloaded_text_encoders_give_the_same_lora_and_are_not_run_while_tuning():
    bundle, dataset, pivot = _setup()
    plain = tune_around(bundle, dataset, pivot, _config(steps=3), RegularizerConfig(mode="class"))
    bundle, dataset, pivot = _setup()
    calls = []
    handles = [encoder.register_forward_hook(lambda *args: calls.append(1)) for encoder in bundle.text_encoders]
    steps_seen = []
    offloaded = tune_around(bundle, dataset, pivot, _config(steps=3, offload_text_encoders=True), RegularizerConfig(mode="class"),
                            on_step=lambda step, total, logs: steps_seen.append(len(calls)))
    for handle in handles:
        handle.remove()
    assert len(set(steps_seen)) == 1  # every prompt was encoded before the first step
    assert all(torch.equal(plain.lora[k], offloaded.lora[k]) for k in plain.lora)
    with pytest.raises(InvalidInputError, match="`offload_text_encoders` needs the text encoders frozen"):
        TuneConfig(offload_text_encoders=True, schedule="joint")


def test_v_prediction_models_train_towards_the_velocity():
    """The target is the scheduler's velocity for a v-prediction model (one per micro-batch), the noise otherwise."""
    losses, velocities = {}, {}
    for prediction_type in ("epsilon", "v_prediction"):
        bundle, dataset, pivot = _setup()
        scheduler = bundle.noise_scheduler
        scheduler.register_to_config(prediction_type=prediction_type)
        calls, get_velocity = [], scheduler.get_velocity
        scheduler.get_velocity = lambda *args: calls.append(1) or get_velocity(*args)
        result = tune_around(bundle, dataset, pivot, _config(steps=2, history_every=1, gradient_accumulation_steps=2))
        losses[prediction_type], velocities[prediction_type] = result.history[0]["loss"], len(calls)
    assert velocities == {"epsilon": 0, "v_prediction": 4}
    assert losses["epsilon"] != pytest.approx(losses["v_prediction"], rel=1e-3)


def test_cli_run_trains_an_sdxl_token_and_lora_with_the_memory_options(tmp_path):
    from safetensors import safe_open

    from example_images import write_example_images
    from pti_ops.cli import main

    images = tmp_path / "images"
    write_example_images(images, count=3, size=48)
    embedding, lora = tmp_path / "tok1.safetensors", tmp_path / "tok1_lora.safetensors"
    args = ["run", "--model", "tiny-sdxl", "--images", str(images), "--resolution", "32", "--token", "tok1",
            "--init-word", "character", "--ti-steps", "2", "--steps", "2", "--reg", "path", "--offload-text-encoders",
            "--mixed-precision", "bf16", "--gradient-checkpointing", "--out-embedding", str(embedding), "--out-lora", str(lora)]
    assert main(args) == 0
    with safe_open(str(embedding), framework="pt") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l"]
    with safe_open(str(lora), framework="pt") as f:
        assert f.keys() and all(key.startswith("lora_unet_") for key in f.keys())
        assert f.metadata()["pivotal.regularizer"] != "none"
