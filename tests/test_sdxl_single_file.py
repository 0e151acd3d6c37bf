"""Single-file SDXL-family checkpoints: `ldm_layout` writes SDXL's original layout, `single_file` reads it
back with diffusers' converters, the UNet config of files without one comes from the tensor shapes
(`ldm_shapes`: SDXL, SSD-1B, Vega, KOALA), and `v_pred` / `ztsnr` markers set the schedule."""

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pti_ops.errors import MissingModelFileError, ModelLoadError
from pti_ops.models import add_time_ids, ldm_layout, load_bundle, single_file, tokenizer_files
from pti_ops.models.clip_vocab import write_clip_vocab
from pti_ops.models.families.sdxl import SDXL
from pti_ops.models.ldm_layout import META_CONFIG_KEYS, save_ldm_checkpoint, unet_to_ldm
from pti_ops.models.tiny_model import TINY_WORDS, build_tiny_sdxl_bundle
from pti_ops.training.text_conditioning import encode_conditioning

PROMPTS = ["a photo of a cat", "an anime girl holding a sword, beach", "zebra xylophone!"]
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")

# Layouts of SDXL's variants, diffusers side (the tiny model's widths): KOALA-700M-like (one res block
# per level, no middle block, output depths other than the input ones), SSD-1B/Vega-like (a middle
# block with a res block only, output depths that differ within a level).
VARIANTS = {
    "sdxl": {},
    "koala": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 3),
        reverse_transformer_layers_per_block=((3, 1), (1, 2), (1, 1)),
        attention_head_dim=(1, 1, 1),
        mid_block_type=None,
    ),
    "ssd": dict(
        layers_per_block=2,
        mid_block_type="UNetMidBlock2D",
        transformer_layers_per_block=(1, 3),
        reverse_transformer_layers_per_block=((3, 3, 1), (1, 1, 1)),
    ),
}
# Config entries a file's shapes decide.
SHAPE_KEYS = (
    "in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
    "mid_block_type", "transformer_layers_per_block", "reverse_transformer_layers_per_block", "attention_head_dim",
    "cross_attention_dim", "use_linear_projection", "addition_embed_type", "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_xl():
    return build_tiny_sdxl_bundle()


@pytest.fixture(scope="module")
def tiny_xl_file(tiny_xl, tmp_path_factory):
    return save_ldm_checkpoint(tiny_xl, tmp_path_factory.mktemp("xl") / "tiny-sdxl.safetensors", dtype=torch.float32)


@pytest.fixture
def no_clip_package(monkeypatch):
    monkeypatch.setattr(tokenizer_files, "find_openai_bpe_file", lambda: None)


def _assert_same_weights(a, b):
    for part in PARTS:
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys(), part
        assert [k for k in sa if not torch.equal(sa[k], sb[k])] == [], part


def _rewrite(src, dst, edit_state=lambda s: s, edit_metadata=lambda m: m):
    with safe_open(str(src), framework="pt") as file:
        metadata = dict(file.metadata())
    save_file(edit_state(load_file(str(src))), str(dst), metadata=edit_metadata(metadata))
    return dst


def _without(*keys):
    return lambda metadata: {k: v for k, v in metadata.items() if k not in keys}


def _config(model, keys=SHAPE_KEYS):
    return {k: json.loads(json.dumps(model.config.get(k), default=list)) for k in keys}


# ---------------------------------------------------------------- round trips


def test_float32_round_trip_is_bit_identical(tiny_xl, tiny_xl_file, no_clip_package):
    loaded = load_bundle(tiny_xl_file)
    assert loaded.family == "sdxl" and loaded.name == "tiny-sdxl"
    _assert_same_weights(tiny_xl, loaded)
    for tokenizer, reloaded in zip(tiny_xl.tokenizers, loaded.tokenizers):
        assert reloaded(PROMPTS, padding="max_length").input_ids == tokenizer(PROMPTS, padding="max_length").input_ids
    assert loaded.tokenizer_2.pad_token == "!"
    assert loaded.noise_scheduler.config.prediction_type == "epsilon"
    a, b = encode_conditioning(tiny_xl, PROMPTS), encode_conditioning(loaded, PROMPTS)
    assert torch.equal(a.hidden, b.hidden) and torch.equal(a.pooled, b.pooled)


def test_file_has_sdxl_base_layout(tiny_xl, tiny_xl_file):
    state = load_file(str(tiny_xl_file))
    width_g = tiny_xl.text_encoder_2.config.hidden_size
    g = "conditioner.embedders.1.model."
    assert state[g + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * width_g, width_g)
    assert state[g + "text_projection"].shape == (width_g, 48)  # OpenCLIP's x @ P
    assert torch.equal(state[g + "text_projection"], tiny_xl.text_encoder_2.text_projection.weight.t())
    assert {g + "positional_embedding", g + "token_embedding.weight", g + "ln_final.weight", g + "logit_scale"} <= state.keys()
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.2.mlp.fc2.weight" in state
    assert state["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    assert "model.diffusion_model.label_emb.0.0.weight" in state and "model.diffusion_model.middle_block.1.proj_in.weight" in state
    assert "alphas_cumprod" not in state and "v_pred" not in state  # SDXL files carry no schedule buffers
    assert {k.split(".")[0] for k in state} == {"model", "first_stage_model", "conditioner"}


def test_float16_round_trip_within_tolerance(tiny_xl, tmp_path, no_clip_package):
    loaded = load_bundle(save_ldm_checkpoint(tiny_xl, tmp_path / "half.safetensors"))
    for part in PARTS:
        for key, value in getattr(tiny_xl, part).state_dict().items():
            torch.testing.assert_close(getattr(loaded, part).state_dict()[key], value, atol=1e-3, rtol=1e-3, msg=f"{part}.{key}")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_unet_config_of_a_file_without_one_comes_from_its_shapes(variant, tmp_path, no_clip_package):
    bundle = build_tiny_sdxl_bundle(unet_overrides=VARIANTS[variant])
    written = save_ldm_checkpoint(bundle, tmp_path / "with_config.safetensors", dtype=torch.float32)
    path = _rewrite(written, tmp_path / f"{variant}.safetensors", edit_metadata=_without(META_CONFIG_KEYS["unet"]))
    loaded = load_bundle(path)
    assert _config(loaded.unet) == _config(bundle.unet)
    _assert_same_weights(bundle, loaded)
    cond = encode_conditioning(bundle, PROMPTS[:2])
    noisy, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 700])
    kwargs = cond.unet_kwargs(add_time_ids((32, 32), batch_size=2))
    with torch.no_grad():
        assert torch.equal(loaded.unet(noisy, t, **kwargs).sample, bundle.unet(noisy, t, **kwargs).sample)


def test_placeholder_tokens_survive_in_both_tokenizers(tmp_path, no_clip_package):
    bundle = build_tiny_sdxl_bundle()
    for tokenizer, encoder in zip(bundle.tokenizers, bundle.text_encoders):
        tokenizer.add_tokens(["<sks>"])
        encoder.resize_token_embeddings(len(tokenizer))
    loaded = load_bundle(save_ldm_checkpoint(bundle, tmp_path / "placeholder.safetensors", dtype=torch.float32))
    for tokenizer, reloaded in zip(bundle.tokenizers, loaded.tokenizers):
        assert reloaded("a <sks> toy").input_ids == tokenizer("a <sks> toy").input_ids
    _assert_same_weights(bundle, loaded)


# ---------------------------------------------------------------- v-prediction markers


def test_v_prediction_and_zero_snr_are_written_and_read_as_markers(tmp_path, no_clip_package):
    bundle = build_tiny_sdxl_bundle(prediction_type="v_prediction")
    bundle.noise_scheduler.register_to_config(rescale_betas_zero_snr=True)
    path = save_ldm_checkpoint(bundle, tmp_path / "vpred.safetensors", dtype=torch.float32)
    state = load_file(str(path))
    assert state["v_pred"].numel() == 0 and state["ztsnr"].numel() == 0
    # The markers alone decide, as for real files (no scheduler config in their metadata).
    bare = _rewrite(path, tmp_path / "bare.safetensors", edit_metadata=_without(META_CONFIG_KEYS["scheduler"]))
    for loaded in (load_bundle(path), load_bundle(bare)):
        config = loaded.noise_scheduler.config
        assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == ("v_prediction", True, "trailing")
        assert loaded.noise_scheduler.alphas_cumprod[-1] < 1e-6  # zero terminal SNR
    v_only = _rewrite(bare, tmp_path / "v_only.safetensors", edit_state=lambda s: {k: v for k, v in s.items() if k != "ztsnr"})
    config = load_bundle(v_only).noise_scheduler.config
    assert (config.prediction_type, config.rescale_betas_zero_snr) == ("v_prediction", False)


def test_a_file_without_markers_is_epsilon(tiny_xl_file, tmp_path, no_clip_package):
    bare = _rewrite(tiny_xl_file, tmp_path / "eps.safetensors", edit_metadata=_without(META_CONFIG_KEYS["scheduler"]))
    config = load_bundle(bare).noise_scheduler.config
    assert (config.prediction_type, config.rescale_betas_zero_snr, config.beta_end) == ("epsilon", False, 0.012)


# ---------------------------------------------------------------- tokenizers


@pytest.fixture
def xl_file_without_tokenizer(tiny_xl, tmp_path, monkeypatch):
    monkeypatch.setattr(ldm_layout, "MAX_EMBEDDED_VOCAB", 0)  # as for a full-size CLIP vocabulary
    return save_ldm_checkpoint(tiny_xl, tmp_path / "model" / "novocab.safetensors", dtype=torch.float32)


def test_missing_tokenizers_are_named(xl_file_without_tokenizer, no_clip_package):
    with pytest.raises(MissingModelFileError, match=r"vocab.json and merges.txt .* `tokenizer_dir`.*\(and tokenizer_2/ .*clip-anytorch"):
        load_bundle(xl_file_without_tokenizer)


def test_one_tokenizer_folder_serves_both_encoders(tiny_xl, xl_file_without_tokenizer, tmp_path, no_clip_package):
    write_clip_vocab(tmp_path / "vocab", list(TINY_WORDS))
    given = load_bundle(xl_file_without_tokenizer, tokenizer_dir=str(tmp_path / "vocab"))
    write_clip_vocab(xl_file_without_tokenizer.parent / "tokenizer", list(TINY_WORDS))
    beside = load_bundle(xl_file_without_tokenizer)
    for loaded in (given, beside):
        assert loaded.tokenizer.pad_token == "<|endoftext|>" and loaded.tokenizer_2.pad_token == "!"
        for tokenizer, reloaded in zip(tiny_xl.tokenizers, loaded.tokenizers):
            assert reloaded(PROMPTS, padding="max_length").input_ids == tokenizer(PROMPTS, padding="max_length").input_ids


def test_a_diffusers_style_folder_gives_tokenizer_and_tokenizer_2(tiny_xl, xl_file_without_tokenizer, tmp_path, no_clip_package):
    for sub in ("tokenizer", "tokenizer_2"):
        write_clip_vocab(tmp_path / "sdxl" / sub, list(TINY_WORDS))
    loaded = load_bundle(xl_file_without_tokenizer, tokenizer_dir=str(tmp_path / "sdxl"))
    assert loaded.tokenizer_2.pad_token == "!"
    assert loaded.tokenizer_2(PROMPTS).input_ids == tiny_xl.tokenizer_2(PROMPTS).input_ids


# ---------------------------------------------------------------- what is refused


def test_stray_tensor_is_named(tiny_xl_file, tmp_path):
    path = _rewrite(tiny_xl_file, tmp_path / "stray.safetensors", lambda s: {**s, "denoiser.sigmas": torch.ones(2)})
    with pytest.raises(ModelLoadError, match="outside the SDXL layout, e.g. denoiser.sigmas"):
        load_bundle(path)


def test_unconverted_bigg_tensor_is_named(tiny_xl_file, tmp_path):
    extra = "conditioner.embedders.1.model.transformer.resblocks.9.ln_1.weight"  # a layer the config does not have
    path = _rewrite(tiny_xl_file, tmp_path / "deeper.safetensors", lambda s: {**s, extra: torch.ones(64)})
    with pytest.raises(ModelLoadError, match=r"text encoder 2 weights do not match its configuration: .*unexpected \['text_model.encoder.layers.9"):
        load_bundle(path)


def test_partial_sdxl_file_names_the_missing_part(tiny_xl_file, tmp_path):
    path = _rewrite(tiny_xl_file, tmp_path / "no_bigg.safetensors", lambda s: {k: v for k, v in s.items() if ".embedders.1." not in k})
    with pytest.raises(ModelLoadError, match=r"looks like a file without text_encoder_2 `conditioner\.embedders\.1\.model\.\*`.*SDXL ones have"):
        load_bundle(path)


# ---------------------------------------------------------------- config from shapes, at real sizes (meta device)


def _shipped_unet():
    return single_file._read_config("unet_config.json", SDXL)


def _comfy_depths(ldm: dict) -> tuple[list[int], list[int], int]:
    """ComfyUI's `transformer_depth` (input res blocks), `transformer_depth_output` (last output block first)
    and `transformer_depth_middle` (-1: res block only, -2: none), read off the keys as `model_detection.py` does."""
    def depth(block):
        prefix = f"model.diffusion_model.{block}.1.transformer_blocks."
        return len({k[len(prefix):].split(".")[0] for k in ldm if k.startswith(prefix)})

    inputs = sorted({int(k.split(".")[3]) for k in ldm if k.startswith("model.diffusion_model.input_blocks.")})
    res = [i for i in inputs[1:] if f"model.diffusion_model.input_blocks.{i}.0.op.weight" not in ldm]
    outputs = sorted({int(k.split(".")[3]) for k in ldm if k.startswith("model.diffusion_model.output_blocks.")})
    if "model.diffusion_model.middle_block.1.proj_in.weight" in ldm:
        middle = depth("middle_block")
    else:
        middle = -1 if "model.diffusion_model.middle_block.0.in_layers.0.weight" in ldm else -2
    return [depth(f"input_blocks.{i}") for i in res], [depth(f"output_blocks.{i}") for i in outputs][::-1], middle


# ComfyUI's detected configs (comfy/model_detection.py) and the diffusers configs that have those layouts.
COMFY_LAYOUTS = {
    "SDXL": (([0, 0, 2, 2, 10, 10], [0, 0, 0, 2, 2, 2, 10, 10, 10], 10), {}),
    "SSD_1B": (([0, 0, 2, 2, 4, 4], [0, 0, 0, 1, 1, 2, 10, 4, 4], -1),
               dict(transformer_layers_per_block=[1, 2, 4], reverse_transformer_layers_per_block=[[4, 4, 10], [2, 1, 1], [1, 1, 1]],
                    mid_block_type="UNetMidBlock2D")),
    "Segmind_Vega": (([0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 1, 2, 2, 2], -1),
                     dict(transformer_layers_per_block=[1, 1, 2], mid_block_type="UNetMidBlock2D")),
    "KOALA_700M": (([0, 2, 5], [0, 0, 2, 2, 5, 5], -2), dict(layers_per_block=1, transformer_layers_per_block=[1, 2, 5], mid_block_type=None)),
    "KOALA_1B": (([0, 2, 6], [0, 0, 2, 2, 6, 6], 6), dict(layers_per_block=1, transformer_layers_per_block=[1, 2, 6])),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(COMFY_LAYOUTS))
def test_sdxl_family_layouts_give_their_configs_back(name):
    """Each variant's LDM key names have ComfyUI's depths, and its config is read back off them."""
    comfy, overrides = COMFY_LAYOUTS[name]
    config = {**_shipped_unet(), **overrides}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    ldm = unet_to_ldm(unet.state_dict(), dict(unet.config))
    assert _comfy_depths(ldm) == comfy
    derived = SDXL.derive_unet_config(ldm, _shipped_unet())
    with torch.device("meta"):
        rebuilt = UNet2DConditionModel.from_config(derived)
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert _config(rebuilt) == _config(unet)
    back = convert_ldm_unet_checkpoint(ldm, derived)  # diffusers' converter maps every name back
    assert back.keys() == unet.state_dict().keys()


def test_sdxl_base_shapes_derive_the_shipped_config():
    shipped = _shipped_unet()
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(shipped)
    ldm = unet_to_ldm(unet.state_dict(), shipped)
    assert len(ldm) == 1680  # the UNet tensors of sd_xl_base_1.0.safetensors
    pooled = {SDXL.text_encoders[1].single_file_prefix + "text_projection": torch.empty(1280, 1280, device="meta")}
    derived = SDXL.derive_unet_config({**ldm, **pooled}, shipped)
    assert {k: derived[k] for k in SHAPE_KEYS} == {k: shipped.get(k) for k in SHAPE_KEYS}


def test_shapes_diffusers_cannot_build_are_refused(tiny_xl):
    ldm = unet_to_ldm(tiny_xl.unet.state_dict(), dict(tiny_xl.unet.config))
    half = {k: v for k, v in ldm.items() if not k.startswith("model.diffusion_model.output_blocks.1.1.")}
    with pytest.raises(ModelLoadError, match=r"output level 0 has attention in some res blocks only \(\[2, 0\]\)"):
        SDXL.derive_unet_config(half, _shipped_unet())
    shallow_mid = {k: v for k, v in ldm.items() if not k.startswith("model.diffusion_model.middle_block.1.transformer_blocks.1.")}
    with pytest.raises(ModelLoadError, match="middle block has 1 transformer blocks and its last level 2"):
        SDXL.derive_unet_config(shallow_mid, _shipped_unet())
    wrong_pool = {**ldm, "conditioner.embedders.1.model.text_projection": torch.zeros(64, 40)}
    with pytest.raises(ModelLoadError, match="takes 96 inputs, which is not the pooled text width 40 plus 6 time-id embeddings"):
        SDXL.derive_unet_config(wrong_pool, _shipped_unet())
