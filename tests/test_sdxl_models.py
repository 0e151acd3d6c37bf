"""The SDXL model layer: the family, the two-encoder bundle, conditioning as SDXL consumes it (checked
against diffusers' own `StableDiffusionXLPipeline.encode_prompt`), `tiny-sdxl`, the diffusers folder
loader and `detect_family`."""

import json
import types

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.configuration_utils import FrozenDict

from pti_ops.errors import InvalidInputError, MissingModelFileError, ModelLoadError
from pti_ops.models import Conditioning, ModelBundle, add_time_ids, detect_family, get_family, load_bundle
from pti_ops.models.families.sdxl import SDXL
from pti_ops.models.tiny_model import build_tiny_bundle, build_tiny_sdxl_bundle
from pti_ops.training.text_conditioning import encode_conditioning, encode_ids, encode_prompts, tokenize, tokenize_per_encoder

PROMPTS = ["a photo of a red cat", "an anime girl holding a sword, beach"]


@pytest.fixture(scope="module")
def tiny_xl():
    return load_bundle("tiny-sdxl")


@pytest.fixture(scope="module")
def pipe(tiny_xl):
    b = tiny_xl
    return StableDiffusionXLPipeline(
        vae=b.vae, text_encoder=b.text_encoder, text_encoder_2=b.text_encoder_2, tokenizer=b.tokenizer,
        tokenizer_2=b.tokenizer_2, unet=b.unet, scheduler=b.noise_scheduler,
    )  # fmt: skip


def _states(bundle):
    parts = {"unet": bundle.unet, "vae": bundle.vae, "text_encoder": bundle.text_encoder, "text_encoder_2": bundle.text_encoder_2}
    return {f"{part}.{k}": v for part, module in parts.items() for k, v in module.state_dict().items()}


def _assert_same_states(a, b):
    sa, sb = _states(a), _states(b)
    assert sa.keys() == sb.keys()
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []


# ---------------------------------------------------------------- the family and the bundle


def test_sdxl_family_description():
    assert get_family("sdxl") is SDXL and SDXL.display_name == "SDXL"
    assert SDXL.embedding_keys == ("clip_l", "clip_g")
    assert SDXL.lora_prefixes == ("lora_unet_", "lora_te1_", "lora_te2_")
    assert SDXL.single_file_prefixes == {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "conditioner.embedders.0.transformer.",
        "text_encoder_2": "conditioner.embedders.1.model.",
    }
    assert SDXL.latent_scaling_factor == 0.13025 and SDXL.unet_addition_embed_type == "text_time"
    assert SDXL.default_clip_skip == 2 and SDXL.num_time_ids == 6
    assert [spec.width for spec in SDXL.text_encoders] == [768, 1280]
    assert SDXL.text_encoders[1].pad_token == "!" and SDXL.text_encoders[1].with_projection


def test_sdxl_lora_unet_names_are_the_original_block_names():
    config = json.loads((SDXL.config_dir / "unet_config.json").read_text())
    assert SDXL.unet_lora_name("down_blocks.1.attentions.0.proj_in", config) == "lora_unet_input_blocks_4_1_proj_in"
    assert [spec.lora_prefix for spec in SDXL.text_encoders] == ["lora_te1_", "lora_te2_"]


def test_tiny_sdxl_bundle(tiny_xl):
    b = tiny_xl
    assert b.family == "sdxl" and b.name == "tiny-sdxl" and b.source == "tiny-sdxl"
    assert b.tokenizers == (b.tokenizer, b.tokenizer_2) and b.text_encoders == (b.text_encoder, b.text_encoder_2)
    assert b.embedding_dim == 32 and b.embedding_dims == {"clip_l": 32, "clip_g": 64}
    assert type(b.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert b.unet.config.cross_attention_dim == 96 and b.unet.config.addition_embed_type == "text_time"
    assert b.vae.config.scaling_factor == 0.13025 and b.vae_scale_factor == 2 and b.resolution_multiple == 4
    assert b.noise_scheduler.config.beta_schedule == "scaled_linear" and b.noise_scheduler.config.beta_end == 0.012
    assert not any(p.requires_grad for module in b.modules for p in module.parameters())


def test_the_second_tokenizer_pads_with_exclamation_marks(tiny_xl):
    ids_l, ids_g = tokenize_per_encoder(tiny_xl, ["a cat"])
    assert tiny_xl.tokenizer_2.pad_token == "!" and tiny_xl.tokenizer_2.pad_token_id == 0
    eos = tiny_xl.tokenizer.eos_token_id
    assert ids_l[0, :4].tolist() == ids_g[0, :4].tolist()  # same BPE, same prompt tokens
    assert set(ids_l[0, 4:].tolist()) == {eos} and set(ids_g[0, 4:].tolist()) == {0}


def test_tiny_sdxl_is_seeded():
    a, b, c = build_tiny_sdxl_bundle(seed=0), build_tiny_sdxl_bundle(seed=0), build_tiny_sdxl_bundle(seed=1)
    _assert_same_states(a, b)
    assert not torch.equal(a.text_encoder_2.text_projection.weight, c.text_encoder_2.text_projection.weight)


def test_unet_forward_with_conditioning_and_time_ids_is_deterministic(tiny_xl):
    cond = encode_conditioning(tiny_xl, PROMPTS)
    time_ids = add_time_ids((32, 32), (0, 0), (32, 32), batch_size=2)
    noisy = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 900])
    with torch.no_grad():
        first = tiny_xl.unet(noisy, t, **cond.unet_kwargs(time_ids)).sample
        again = build_tiny_sdxl_bundle().unet(noisy, t, **cond.unet_kwargs(time_ids)).sample
        other_size = tiny_xl.unet(noisy, t, **cond.unet_kwargs(add_time_ids((64, 48), (8, 0), (32, 32), batch_size=2))).sample
    assert first.shape == (2, 4, 16, 16) and torch.isfinite(first).all()
    assert torch.equal(first, again)
    assert not torch.allclose(first, other_size)  # the time ids reach the UNet


def test_bundle_refuses_a_missing_or_extra_second_encoder():
    sdxl, sd15 = build_tiny_sdxl_bundle(), build_tiny_bundle()
    parts = (sdxl.tokenizer, sdxl.text_encoder, sdxl.unet, sdxl.vae, sdxl.noise_scheduler)
    with pytest.raises(InvalidInputError, match="SDXL models have 2 tokenizer/text-encoder pair"):
        ModelBundle(*parts, family="sdxl")
    with pytest.raises(InvalidInputError, match="SD1.5 models have 1 tokenizer/text-encoder pair"):
        ModelBundle(*parts[:2], sd15.unet, sd15.vae, sd15.noise_scheduler, tokenizer_2=sdxl.tokenizer_2, text_encoder_2=sdxl.text_encoder_2)


def test_sd15_bundles_have_no_second_encoder(tiny_bundle):
    assert tiny_bundle.tokenizer_2 is None and tiny_bundle.text_encoder_2 is None
    assert tiny_bundle.tokenizers == (tiny_bundle.tokenizer,) and tiny_bundle.text_encoders == (tiny_bundle.text_encoder,)
    assert tiny_bundle.embedding_dims == {"clip_l": 32}
    assert tiny_bundle.modules == (tiny_bundle.text_encoder, tiny_bundle.unet, tiny_bundle.vae)


# ---------------------------------------------------------------- conditioning


@pytest.mark.parametrize("diffusers_clip_skip, ours", [(None, 2), (0, 2), (1, 3)])
def test_conditioning_is_diffusers_encode_prompt(tiny_xl, pipe, diffusers_clip_skip, ours):
    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, clip_skip=diffusers_clip_skip)
    cond = encode_conditioning(tiny_xl, PROMPTS, clip_skip=ours)
    assert cond.hidden.shape == (2, 77, 96) and cond.pooled.shape == (2, 48) and cond.widths == (32, 64)
    assert torch.equal(cond.hidden, hidden) and torch.equal(cond.pooled, pooled)


def test_default_clip_skip_is_the_penultimate_layer_without_final_layer_norm(tiny_xl):
    cond = encode_conditioning(tiny_xl, PROMPTS)
    ids_l, ids_g = tokenize_per_encoder(tiny_xl, PROMPTS)
    with torch.no_grad():
        out_l = tiny_xl.text_encoder(ids_l, output_hidden_states=True)
        out_g = tiny_xl.text_encoder_2(ids_g, output_hidden_states=True)
    block_l, block_g = cond.blocks()
    assert torch.equal(block_l, out_l.hidden_states[-2]) and torch.equal(block_g, out_g.hidden_states[-2])
    assert torch.equal(cond.pooled, out_g.text_embeds)
    last = encode_conditioning(tiny_xl, PROMPTS, clip_skip=1)  # CLIPSetLastLayer -1: still no final LayerNorm
    assert torch.equal(last.blocks()[0], out_l.hidden_states[-1]) and not torch.allclose(last.blocks()[0], out_l.last_hidden_state)
    assert torch.equal(last.pooled, cond.pooled)  # the pooled embedding does not depend on clip_skip


def test_clip_skip_out_of_range_is_refused(tiny_xl):
    with pytest.raises(InvalidInputError, match=r"`clip_skip` must be between 1 \(last layer\) and 3 .* got 4; SDXL uses 2"):
        encode_conditioning(tiny_xl, PROMPTS, clip_skip=4)
    with pytest.raises(InvalidInputError, match="got 0"):
        encode_conditioning(tiny_xl, PROMPTS, clip_skip=0)


def test_per_encoder_rule_is_the_blocks_of_the_conditioning(tiny_xl):
    ids = tokenize_per_encoder(tiny_xl, PROMPTS)
    cond = encode_conditioning(tiny_xl, PROMPTS, clip_skip=3)
    with torch.no_grad():
        blocks = [tiny_xl.family.encode_tokens(encoder, i, 3) for encoder, i in zip(tiny_xl.text_encoders, ids)]
    assert all(torch.equal(a, b) for a, b in zip(cond.blocks(), blocks))


def test_gradients_reach_the_token_embeddings_of_both_encoders():
    bundle = build_tiny_sdxl_bundle()
    embeddings = [encoder.get_input_embeddings().weight for encoder in bundle.text_encoders]
    for weight in embeddings:
        weight.requires_grad_(True)
    cond = encode_ids(bundle, tokenize_per_encoder(bundle, PROMPTS))
    (cond.hidden.square().mean() + cond.pooled.square().mean()).backward()
    assert all(weight.grad is not None and weight.grad.abs().sum() > 0 for weight in embeddings)


def test_pooled_embedding_comes_from_the_end_token_with_a_placeholder_and_a_legacy_config():
    """Released configs say `eos_token_id` 2, with which transformers pools at the highest id: an added
    placeholder. The bundle makes it pool at the first end token, as ComfyUI does."""
    tiny = build_tiny_sdxl_bundle()
    tiny.tokenizer_2.add_tokens(["<sks>"])
    tiny.text_encoder_2.resize_token_embeddings(len(tiny.tokenizer_2))
    for module in tiny.text_encoder_2.modules():
        if hasattr(module, "eos_token_id"):
            module.eos_token_id = 2
    tiny.text_encoder_2.config.eos_token_id = 2
    bundle = ModelBundle(
        tiny.tokenizer, tiny.text_encoder, tiny.unet, tiny.vae, tiny.noise_scheduler, family="sdxl",
        tokenizer_2=tiny.tokenizer_2, text_encoder_2=tiny.text_encoder_2,
    )  # fmt: skip
    ids = tokenize(bundle.tokenizer_2, ["a <sks> cat"])
    end = (ids[0] == bundle.tokenizer_2.eos_token_id).nonzero()[0, 0]
    assert ids[0].argmax() != end  # the placeholder has the highest id
    with torch.no_grad():
        out = bundle.text_encoder_2(ids)
        expected = bundle.text_encoder_2.text_projection(out.last_hidden_state[0, end])
    assert bundle.text_encoder_2.config.eos_token_id == bundle.tokenizer_2.eos_token_id
    torch.testing.assert_close(out.text_embeds[0], expected, rtol=0, atol=0)


def test_sd15_conditioning_is_todays_tensor(tiny_bundle):
    cond = encode_conditioning(tiny_bundle, PROMPTS)
    assert cond.pooled is None and cond.widths == (32,)
    assert torch.equal(cond.hidden, encode_prompts(tiny_bundle.tokenizer, tiny_bundle.text_encoder, PROMPTS))
    skip2 = encode_conditioning(tiny_bundle, PROMPTS, clip_skip=2)
    assert torch.equal(skip2.hidden, encode_prompts(tiny_bundle.tokenizer, tiny_bundle.text_encoder, PROMPTS, 2))
    assert cond.unet_kwargs().keys() == {"encoder_hidden_states"}


# ---------------------------------------------------------------- detect_family


def test_detect_family_picks_sdxl(tiny_xl):
    assert detect_family(tiny_xl.text_encoder, tiny_xl.unet, tiny_xl.text_encoder_2) is SDXL


def unet_with(**config):
    """A stand-in UNet: `detect_family` reads only the config."""
    return types.SimpleNamespace(config=FrozenDict(config))


SDXL_UNET = dict(addition_embed_type="text_time", cross_attention_dim=96, addition_time_embed_dim=8, projection_class_embeddings_input_dim=96)


def test_detect_family_refuses_widths_that_do_not_add_up(tiny_xl):
    unet = unet_with(**{**SDXL_UNET, "cross_attention_dim": 2048})
    with pytest.raises(ModelLoadError, match=r"expects 2048-wide text conditioning but the text encoders give 32 \+ 64 = 96"):
        detect_family(tiny_xl.text_encoder, unet, tiny_xl.text_encoder_2)


def test_detect_family_refuses_a_pooled_width_that_does_not_fit(tiny_xl):
    unet = unet_with(**{**SDXL_UNET, "projection_class_embeddings_input_dim": 2816})
    with pytest.raises(ModelLoadError, match=r"takes 2816 inputs but the text encoder's pooled 48 \+ 6 × 8 time ids make 96"):
        detect_family(tiny_xl.text_encoder, unet, tiny_xl.text_encoder_2)


def test_detect_family_refuses_a_second_encoder_without_projection(tiny_xl):
    with pytest.raises(ModelLoadError, match="must have a projection .*got CLIPTextModel"):
        detect_family(tiny_xl.text_encoder, unet_with(**{**SDXL_UNET, "cross_attention_dim": 64}), tiny_xl.text_encoder)


def test_detect_family_refuses_two_encoders_for_an_sd15_unet(tiny_xl, tiny_bundle):
    with pytest.raises(ModelLoadError, match=r"SD1\.5's added conditioning \(None\) but 2 text encoder\(s\) were given; SD1\.5 needs 1"):
        detect_family(tiny_xl.text_encoder, tiny_bundle.unet, tiny_xl.text_encoder_2)


# ---------------------------------------------------------------- diffusers folders


def test_sdxl_diffusers_folder_round_trip(tiny_xl, tmp_path):
    tiny_xl.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "tokenizer_2").is_dir() and (tmp_path / "model" / "text_encoder_2").is_dir()
    loaded = load_bundle(tmp_path / "model")
    assert loaded.family == "sdxl" and loaded.tokenizer_2.pad_token == "!"
    _assert_same_states(tiny_xl, loaded)
    for tokenizer, reloaded in zip(tiny_xl.tokenizers, loaded.tokenizers):
        assert reloaded(PROMPTS, padding="max_length").input_ids == tokenizer(PROMPTS, padding="max_length").input_ids
    assert torch.equal(encode_conditioning(loaded, PROMPTS).hidden, encode_conditioning(tiny_xl, PROMPTS).hidden)


def test_sdxl_folder_without_its_second_encoder_names_it(tiny_xl, tmp_path):
    tiny_xl.save_pretrained(tmp_path / "model")
    for file in (tmp_path / "model" / "text_encoder_2").iterdir():
        file.unlink()
    (tmp_path / "model" / "text_encoder_2").rmdir()
    with pytest.raises(MissingModelFileError, match=r"lacks the sub-folder\(s\) text_encoder_2: an SDXL folder"):
        load_bundle(tmp_path / "model")


def test_unknown_source_lists_the_tiny_models(tmp_path):
    with pytest.raises(MissingModelFileError, match="give `tiny`, `tiny-sdxl`, a diffusers model folder"):
        load_bundle(tmp_path / "nothing")


# ---------------------------------------------------------------- Conditioning and time ids


def test_add_time_ids_is_original_crop_target():
    ids = add_time_ids((1024, 768), (16, 8), (512, 384))
    assert ids.tolist() == [[1024.0, 768.0, 16.0, 8.0, 512.0, 384.0]] and ids.dtype == torch.float32
    per_image = add_time_ids([(64, 64), (96, 32)], (0, 0), (32, 32))
    assert per_image.tolist() == [[64, 64, 0, 0, 32, 32], [96, 32, 0, 0, 32, 32]]
    assert add_time_ids((32, 32), batch_size=3).tolist() == [[32, 32, 0, 0, 32, 32]] * 3  # target = original
    with pytest.raises(InvalidInputError, match="`crop_top_left` has 2 pairs for a batch of 3"):
        add_time_ids([(1, 1)] * 3, [(0, 0)] * 2)
    with pytest.raises(InvalidInputError, match="`original_size` must be a \\(height, width\\) pair"):
        add_time_ids((32, 32, 32))


def test_unet_kwargs_need_time_ids_exactly_when_pooled(tiny_xl, tiny_bundle):
    cond = encode_conditioning(tiny_xl, PROMPTS)
    kwargs = cond.unet_kwargs(add_time_ids((32, 32))[0])  # one [6] row is broadcast to the batch
    assert kwargs["added_cond_kwargs"]["time_ids"].shape == (2, 6) and kwargs["added_cond_kwargs"]["text_embeds"] is cond.pooled
    with pytest.raises(InvalidInputError, match="has a pooled embedding \\(SDXL\\): give `time_ids`"):
        cond.unet_kwargs()
    with pytest.raises(InvalidInputError, match=r"`time_ids` must be \[2, 6\], got \[3, 6\]"):
        cond.unet_kwargs(add_time_ids((32, 32), batch_size=3))
    with pytest.raises(InvalidInputError, match="without a pooled embedding"):
        encode_conditioning(tiny_bundle, PROMPTS).unet_kwargs(add_time_ids((32, 32)))


def test_conditioning_batch_operations():
    hidden, pooled = torch.randn(3, 5, 7), torch.randn(3, 4)
    cond = Conditioning(hidden, pooled, (3, 4))
    assert [b.shape[-1] for b in cond.blocks()] == [3, 4]
    assert torch.equal(Conditioning.from_blocks(cond.blocks(), pooled).hidden, hidden)
    assert torch.equal(cond[1].hidden, hidden[1:2]) and torch.equal(cond[-1].pooled, pooled[2:])
    assert torch.equal(cond[1:].pooled, pooled[1:])
    both = Conditioning.cat([cond[:1], cond[1:]])
    assert torch.equal(both.hidden, hidden) and torch.equal(both.pooled, pooled)
    assert torch.equal(cond.repeat(2).hidden, hidden.repeat_interleave(2, 0)) and cond.repeat(2).pooled.shape == (6, 4)
    assert cond.to(dtype=torch.float64).hidden.dtype == torch.float64
    with pytest.raises(ValueError, match="conditioning is 7 wide but its blocks \\(3, 3\\) sum to 6"):
        Conditioning(hidden, pooled, (3, 3))
    with pytest.raises(ValueError, match="different blocks"):
        Conditioning.cat([cond, Conditioning(hidden, pooled, (4, 3))])
