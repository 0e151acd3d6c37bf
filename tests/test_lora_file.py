"""kohya LoRA files: export from peft, write/read, apply back, and what ComfyUI and diffusers accept."""

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from pti_ops.errors import InvalidInputError, MissingModelFileError, OutputExistsError
from pti_ops.files.lora_file import (
    apply_kohya_lora,
    comfyui_lora_key_map,
    load_lora,
    lora_state_dict_to_kohya,
    save_lora,
)
from pti_ops.models.tiny_model import build_tiny_bundle

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
METADATA = {"pivotal.placeholder": "<sks>", "pivotal.base_model": "tiny-sd15"}
Q_PREFIX = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def tuned_bundle(text_encoder=False, unet_targets=UNET_TARGETS, text_targets=TEXT_TARGETS, random_up=True, **config):
    """A tiny bundle with a peft LoRA (rank 4, alpha 8 unless overridden) and seeded non-zero lora_B."""
    bundle = build_tiny_bundle()
    torch.manual_seed(0)
    models = [(bundle.unet, unet_targets)] + ([(bundle.text_encoder, text_targets)] if text_encoder else [])
    for model, targets in models:
        inject_adapter_in_model(LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": targets, **config}), model)
        if random_up:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.normal_(0.0, 0.1)
    return bundle


def outputs(bundle):
    """Text-encoder output and UNet noise prediction for a fixed prompt, latent and timestep."""
    generator = torch.Generator().manual_seed(1)
    latent = torch.randn(1, 4, 16, 16, generator=generator)  # (b, c, h, w)
    ids = bundle.tokenizer(["a red cat"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        text = bundle.text_encoder(ids)[0]  # (b, 77, 32)
        return text, bundle.unet(latent, 500, text).sample


def write(tmp_path, kohya, name="lora.safetensors"):
    return save_lora(tmp_path / name, kohya, METADATA)


def test_unet_round_trip_through_file_reproduces_outputs(tmp_path):
    tuned = tuned_bundle()
    kohya = lora_state_dict_to_kohya(unet=tuned.unet)
    tensors, metadata = load_lora(write(tmp_path, kohya))

    fresh = build_tiny_bundle()
    assert apply_kohya_lora(fresh.unet, None, tensors) == []
    torch.testing.assert_close(outputs(fresh)[1], outputs(tuned)[1], atol=1e-5, rtol=0)
    assert not torch.allclose(outputs(build_tiny_bundle())[1], outputs(tuned)[1], atol=1e-3)  # LoRA matters
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "8")
    assert (metadata["pivotal.rank"], metadata["pivotal.alpha"], metadata["pivotal.placeholder"]) == ("4", "8", "<sks>")


def test_export_keys_shapes_and_copies():
    tuned = tuned_bundle()
    kohya = lora_state_dict_to_kohya(unet=tuned.unet)
    assert kohya[f"{Q_PREFIX}.lora_down.weight"].shape == (4, 32)
    assert kohya[f"{Q_PREFIX}.lora_up.weight"].shape == (32, 4)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha" in kohya
    assert kohya["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 32, 1, 1)  # conv
    prefixes = {key.split(".")[0] for key in kohya}
    assert all(f"{prefix}.alpha" in kohya and kohya[f"{prefix}.alpha"].item() == 8.0 for prefix in prefixes)
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in kohya.values())
    # copies, not views: changing the live adapter leaves the export as it was
    layer = tuned.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    before = kohya[f"{Q_PREFIX}.lora_up.weight"].clone()
    with torch.no_grad():
        layer.lora_B["default"].weight.add_(1.0)
    assert torch.equal(kohya[f"{Q_PREFIX}.lora_up.weight"], before)


def test_text_encoder_round_trip_uses_text_model_keys(tmp_path):
    tuned = tuned_bundle(text_encoder=True)
    kohya = lora_state_dict_to_kohya(unet=tuned.unet, text_encoder=tuned.text_encoder)
    # transformers 5.x names the module encoder.layers.0…; the key keeps kohya's text_model_ part
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2.alpha" in kohya
    tensors, _ = load_lora(write(tmp_path, kohya))

    fresh = build_tiny_bundle()
    assert apply_kohya_lora(fresh.unet, fresh.text_encoder, tensors) == []
    for got, want in zip(outputs(fresh), outputs(tuned)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_per_module_rank_alpha_and_rslora_round_trip(tmp_path):
    tuned = tuned_bundle(rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 3}, use_rslora=True)
    kohya = lora_state_dict_to_kohya(unet=tuned.unet)
    attn = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1"
    assert kohya[f"{attn}_to_k.lora_down.weight"].shape == (2, 32)
    # rsLoRA scales by alpha/sqrt(r): kohya's alpha/r gives the same with alpha*sqrt(r)
    assert kohya[f"{attn}_to_q.alpha"].item() == pytest.approx(8 * 2)
    assert kohya[f"{attn}_to_k.alpha"].item() == pytest.approx(8 * 2**0.5)
    assert kohya[f"{attn}_to_v.alpha"].item() == pytest.approx(3 * 2)
    tensors, metadata = load_lora(write(tmp_path, kohya))
    assert metadata["ss_network_dim"] == "Dynamic"

    fresh = build_tiny_bundle()
    apply_kohya_lora(fresh.unet, None, tensors)
    assert fresh.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k").r["default"] == 2
    torch.testing.assert_close(outputs(fresh)[1], outputs(tuned)[1], atol=1e-5, rtol=0)


def test_export_through_diffusers_add_adapter():
    bundle = build_tiny_bundle()
    bundle.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q"]), adapter_name="pivotal")
    kohya = lora_state_dict_to_kohya(unet=bundle.unet, adapter_name="pivotal")
    assert f"{Q_PREFIX}.alpha" in kohya and len(kohya) == 3 * 8  # 4 transformer blocks x (attn1, attn2)


def test_zero_lora_leaves_outputs_bit_identical(tmp_path):
    tuned = tuned_bundle(text_encoder=True, random_up=False)  # peft default: lora_B = 0
    tensors, _ = load_lora(write(tmp_path, lora_state_dict_to_kohya(tuned.unet, tuned.text_encoder)))
    fresh = build_tiny_bundle()
    apply_kohya_lora(fresh.unet, fresh.text_encoder, tensors)
    for got, want in zip(outputs(fresh), outputs(build_tiny_bundle())):
        assert torch.equal(got, want)


def test_diffusers_load_lora_weights_reads_every_key(tmp_path):
    from diffusers import StableDiffusionPipeline

    tuned = tuned_bundle(text_encoder=True)
    path = write(tmp_path, lora_state_dict_to_kohya(tuned.unet, tuned.text_encoder))
    fresh = build_tiny_bundle()
    pipe = StableDiffusionPipeline(
        vae=fresh.vae,
        text_encoder=fresh.text_encoder,
        tokenizer=fresh.tokenizer,
        unet=fresh.unet,
        scheduler=fresh.noise_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.load_lora_weights(str(path))
    # equal outputs mean every module, with its alpha, was loaded (diffusers raises on unrenamed keys)
    for got, want in zip(outputs(fresh), outputs(tuned)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def module_names(model):
    return [name for name, _ in model.named_modules()]


def test_every_written_prefix_is_accepted_by_comfyui():
    tuned = tuned_bundle(text_encoder=True)
    kohya = lora_state_dict_to_kohya(tuned.unet, tuned.text_encoder)
    plain = build_tiny_bundle()
    accepted = comfyui_lora_key_map(module_names(plain.unet), module_names(plain.text_encoder))
    prefixes = {key.split(".")[0] for key in kohya}
    assert prefixes - accepted == set()
    assert any(p.startswith("lora_te_") for p in prefixes) and any(p.startswith("lora_unet_") for p in prefixes)


def test_peft_style_keys_are_not_accepted_by_comfyui():
    # UNet only: for the text encoder, ComfyUI does accept `text_encoder.text_model.…` (transformers 4.x names)
    tuned = tuned_bundle(unet_targets=["to_q", "to_k", "to_v", "to_out.0"])
    plain = build_tiny_bundle()
    accepted = comfyui_lora_key_map(module_names(plain.unet), module_names(plain.text_encoder))
    # the PEFT / diffusers-saved spelling: unet.<module>.lora_A.weight (and without `unet.`)
    peft_prefixes = {
        f"{model_prefix}{name}"
        for name, module in tuned.unet.named_modules()
        if isinstance(module, LoraLayer)
        for model_prefix in ("unet.", "")
    }
    assert len(peft_prefixes) == 2 * (4 * 2 * 4)  # 4 transformer blocks x (attn1, attn2) x 4 projections
    assert peft_prefixes & accepted == set()


def test_comfyui_key_map_known_entries():
    plain = build_tiny_bundle()
    te_names = module_names(plain.text_encoder)
    accepted = comfyui_lora_key_map(module_names(plain.unet), te_names)
    for key in (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
        "lora_unet_down_blocks_0_resnets_0_conv1",
        "lora_unet_time_embedding_linear_1",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out",
        "lora_te_text_model_encoder_layers_1_mlp_fc2",
    ):
        assert key in accepted
    for key in (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1",  # a container, no weight
        "lora_te_text_model_embeddings_token_embedding",  # not in ComfyUI's LORA_CLIP_MAP
    ):
        assert key not in accepted
    # transformers 4.x names (text_model.…) give the same text-encoder keys
    assert comfyui_lora_key_map([], te_names) == comfyui_lora_key_map([], [f"text_model.{n}" for n in te_names])


@pytest.fixture
def good_file_tensors():
    return lora_state_dict_to_kohya(unet=tuned_bundle(unet_targets=["to_q"]).unet)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: d.pop(f"{Q_PREFIX}.lora_up.weight"), r"`lora_unet_.*_attn1_to_q\.lora_up\.weight` is missing"),
        (lambda d: d.pop(f"{Q_PREFIX}.alpha"), r"`lora_unet_.*_attn1_to_q\.alpha` is missing"),
        (lambda d: d.update({f"{Q_PREFIX}.lora_up.weight": torch.zeros(32, 3)}), r"has shape \[32, 3\] and `\.lora_down\.weight` \[4, 32\]"),
        (lambda d: d.update({f"{Q_PREFIX}.alpha": torch.ones(2)}), r"`lora_unet_.*_to_q\.alpha` must be a single number"),
        (lambda d: d.update({"model.diffusion_model.out.2.weight": torch.zeros(1)}), r"'model\.diffusion_model\.out\.2\.weight' is not a LoRA key"),
        (lambda d: d.clear() or d.update({"other": torch.zeros(1)}), r"'other' is not a LoRA key"),
    ],
)
def test_bad_files_raise_naming_the_key(tmp_path, good_file_tensors, damage, message):
    damage(good_file_tensors)
    path = tmp_path / "bad.safetensors"
    save_file(good_file_tensors, str(path))
    with pytest.raises(InvalidInputError, match=message):
        load_lora(path)


def test_unreadable_or_missing_file(tmp_path):
    with pytest.raises(MissingModelFileError, match="LoRA file .*nothing.safetensors not found"):
        load_lora(tmp_path / "nothing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InvalidInputError, match="is not a readable .safetensors file"):
        load_lora(tmp_path / "junk.safetensors")


def test_save_refuses_overwrite_and_bad_metadata(tmp_path, good_file_tensors):
    path = write(tmp_path, good_file_tensors)
    with pytest.raises(OutputExistsError, match="already exists"):
        write(tmp_path, good_file_tensors)
    assert save_lora(path, good_file_tensors, {**METADATA, "pivotal.placeholder": "<new>"}, overwrite=True) == path
    assert load_lora(path)[1]["pivotal.placeholder"] == "<new>"
    with pytest.raises(InvalidInputError, match="metadata lacks pivotal.base_model"):
        save_lora(tmp_path / "b.safetensors", good_file_tensors, {"pivotal.placeholder": ""})
    with pytest.raises(InvalidInputError, match="'pivotal.steps' is not"):
        save_lora(tmp_path / "c.safetensors", good_file_tensors, {**METADATA, "pivotal.steps": 10})
    with pytest.raises(InvalidInputError, match=r"'.*lora\.pt' must end in \.safetensors"):
        save_lora(tmp_path / "lora.pt", good_file_tensors, METADATA)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]  # no partial files


def test_apply_accounts_for_every_key(tmp_path):
    tuned = tuned_bundle(text_encoder=True, unet_targets=["to_q"], text_targets=["q_proj"])
    kohya = load_file(str(write(tmp_path, lora_state_dict_to_kohya(tuned.unet, tuned.text_encoder))))
    fresh = build_tiny_bundle()
    with pytest.raises(InvalidInputError, match=r"6 LoRA keys match no module .* first: lora_te_text_model_encoder_layers_0_self_attn_q_proj\.alpha"):
        apply_kohya_lora(fresh.unet, None, kohya)
    assert not any(isinstance(m, LoraLayer) for m in fresh.unet.modules())  # checked before changing anything
    unmatched = apply_kohya_lora(fresh.unet, None, kohya, strict=False)
    assert len(unmatched) == 6 and all(key.startswith("lora_te_") for key in unmatched)
    with pytest.raises(InvalidInputError, match="already has a LoRA adapter named 'default'"):
        apply_kohya_lora(fresh.unet, None, kohya, strict=False)


def test_apply_refuses_weights_of_another_size(good_file_tensors):
    good_file_tensors[f"{Q_PREFIX}.lora_down.weight"] = torch.zeros(4, 16)
    fresh = build_tiny_bundle()
    with pytest.raises(InvalidInputError, match=rf"{Q_PREFIX} has down \[4, 16\] / up \[32, 4\], which does not fit"):
        apply_kohya_lora(fresh.unet, None, good_file_tensors)


def test_export_without_adapter_raises():
    with pytest.raises(InvalidInputError, match="no LoRA adapter named 'pivotal'"):
        lora_state_dict_to_kohya(unet=tuned_bundle().unet, adapter_name="pivotal")


@pytest.mark.parametrize("key_suffix, value", [("lora_up.weight", float("nan")), ("alpha", float("inf"))])
def test_a_lora_file_with_nan_or_inf_is_refused_at_load_naming_file_and_tensor(tmp_path, good_file_tensors, key_suffix, value):
    key = f"{Q_PREFIX}.{key_suffix}"
    good_file_tensors[key] = good_file_tensors[key].clone().flatten().index_fill(0, torch.tensor([0]), value).view_as(
        good_file_tensors[key])
    path = write(tmp_path, good_file_tensors, "diverged.safetensors")
    with pytest.raises(InvalidInputError, match=rf"tensor '{key}' of LoRA file .*diverged\.safetensors holds 1 NaN or infinite"):
        load_lora(path)
    # A LoRA dict from another node (LORA_MODEL) is checked where it is applied.
    with pytest.raises(InvalidInputError, match=rf"tensor '{key}' of the LoRA to apply holds 1 NaN"):
        apply_kohya_lora(build_tiny_bundle().unet, None, good_file_tensors)


def test_evaluate_refuses_a_lora_with_nan_before_loading_the_model(tmp_path, good_file_tensors, capsys, monkeypatch):
    from pti_ops.cli import main

    good_file_tensors[f"{Q_PREFIX}.lora_down.weight"][0, 0] = float("nan")
    save_file(good_file_tensors, str(tmp_path / "nan.safetensors"))
    monkeypatch.setattr("pti_ops.cli.evaluate.load_bundle", lambda *a, **k: pytest.fail("loaded the model"))
    code = main(["evaluate", "--model", "tiny", "--lora", str(tmp_path / "nan.safetensors"), "--lpips", "off",
                 "--out", str(tmp_path / "report")])
    err = capsys.readouterr().err
    assert code == 2 and "nan.safetensors holds 1 NaN or infinite value" in err and "Traceback" not in err
    assert not (tmp_path / "report").exists()
