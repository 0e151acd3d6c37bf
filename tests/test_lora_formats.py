"""LoRAs of other trainers (ComfyUI's stock Train LoRA node, diffusers/PEFT) read into our models (issue #16).

The stock trainer's dict is built by `helpers.stock_trainer_lora` as comfy_extras/nodes_train.py builds it
(checked against a real ComfyUI 0.3.64 run on the tiny checkpoint: 69 LoRA modules, 27 `.diff`, 72
`.diff_b`, convs flattened). The reference applies it the way ComfyUI patches weights, on the LDM state
dict, and converts that back to diffusers with diffusers' own converter: independent of the names our
converter derives.
"""

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file

from pti_ops.errors import InvalidInputError
from pti_ops.files.lora_file import apply_kohya_lora, load_lora, lora_state_dict_to_kohya
from pti_ops.metrics.sampling import apply_lora, set_lora_strength
from pti_ops.models.ldm_layout import unet_to_ldm
from pti_ops.models.tiny_model import build_tiny_bundle
from pti_ops.training.adapters import adapters_disabled
from helpers import stock_trainer_lora

LDM = "model.diffusion_model."


def patched_reference(unet, lora, strength: float = 1.0):
    """A fresh UNet whose weights are patched as ComfyUI patches them, in LDM names, converted back by diffusers."""
    ldm = {key: value.clone() for key, value in unet_to_ldm(unet.state_dict(), dict(unet.config)).items()}
    for key, weight in ldm.items():
        module = "diffusion_model." + key[len(LDM):].rsplit(".", 1)[0]
        if key.endswith(".weight") and f"{module}.lora_up.weight" in lora:
            up, down = lora[f"{module}.lora_up.weight"], lora[f"{module}.lora_down.weight"]
            scale = float(lora[f"{module}.alpha"]) / down.shape[0]
            weight += strength * scale * (up @ down).reshape(weight.shape)
        elif key.endswith(".weight") and f"{module}.diff" in lora:
            weight += strength * lora[f"{module}.diff"]
        elif key.endswith(".bias") and f"{module}.diff_b" in lora:
            weight += strength * lora[f"{module}.diff_b"]
    reference = build_tiny_bundle().unet
    reference.load_state_dict(convert_ldm_unet_checkpoint(ldm, dict(unet.config)))
    return reference


def prediction(unet):
    generator = torch.Generator().manual_seed(1)
    latent = torch.randn(1, 4, 16, 16, generator=generator)  # (b, c, h, w)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(latent, 500, context).sample


def test_stock_trainer_lora_model_reproduces_comfyuis_patched_weights():
    bundle = build_tiny_bundle()
    lora = stock_trainer_lora(bundle.unet)
    assert any(k.endswith(".diff") for k in lora) and any(k.endswith(".diff_b") for k in lora)
    base = prediction(bundle.unet)
    apply_lora(bundle, lora)
    expected = prediction(patched_reference(build_tiny_bundle().unet, lora))
    assert not torch.allclose(expected, base, atol=1e-3)  # the LoRA does change the model
    torch.testing.assert_close(prediction(bundle.unet), expected, atol=1e-5, rtol=1e-4)
    # Base vs tuned (locality) switches the deltas off with the LoRA, without a copy.
    with adapters_disabled(bundle):
        torch.testing.assert_close(prediction(bundle.unet), base, atol=0, rtol=0)
    # The strength scales the deltas as ComfyUI's "diff" patches are scaled.
    set_lora_strength(bundle, 0.5)
    expected_half = prediction(patched_reference(build_tiny_bundle().unet, lora, strength=0.5))
    torch.testing.assert_close(prediction(bundle.unet), expected_half, atol=1e-5, rtol=1e-4)


def test_stock_save_lora_file_loads_and_applies(tmp_path):
    """Save LoRA writes the same dict (bf16 by default) to a file: load_lora reads it, apply converts it."""
    bundle = build_tiny_bundle()
    lora = {key: value.to(torch.bfloat16) for key, value in stock_trainer_lora(bundle.unet).items()}
    path = tmp_path / "ComfyUI_trained_lora_16_steps_00001_.safetensors"
    save_file(lora, str(path))
    tensors, _ = load_lora(path)
    assert apply_kohya_lora(bundle.unet, bundle.text_encoder, tensors) == []


def test_diffusers_peft_keys_equal_our_kohya_keys():
    donor = build_tiny_bundle()
    torch.manual_seed(0)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v", "proj_in"]), donor.unet)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]), donor.text_encoder)
    with torch.no_grad():
        for model in (donor.unet, donor.text_encoder):
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.1)
    kohya = lora_state_dict_to_kohya(unet=donor.unet, text_encoder=donor.text_encoder)
    peft = {f"unet.{k}": v for k, v in get_peft_model_state_dict(donor.unet).items()}  # diffusers' save_lora_weights
    peft |= {f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(donor.text_encoder).items()}
    assert any(".lora_A.weight" in key for key in peft) and not any(key.endswith(".alpha") for key in peft)
    ours, theirs = build_tiny_bundle(), build_tiny_bundle()
    apply_lora(ours, kohya)
    apply_lora(theirs, peft)
    torch.testing.assert_close(prediction(theirs.unet), prediction(ours.unet), atol=0, rtol=0)
    ids = ours.tokenizer(["a red cat"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(theirs.text_encoder(ids)[0], ours.text_encoder(ids)[0], atol=0, rtol=0)


def test_kohya_keys_on_the_original_unets_names_are_read_for_sd15():
    bundle = build_tiny_bundle()
    up, down = torch.randn(32, 2) * 0.1, torch.randn(2, 32) * 0.1
    ldm_named = {"lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight": up,
                 "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight": down}
    ours = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": up,
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": down,
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(2.0)}
    other = build_tiny_bundle()
    apply_lora(bundle, ldm_named)  # no alpha: the rank, as kohya reads such files (scale 1)
    apply_lora(other, ours)
    torch.testing.assert_close(prediction(bundle.unet), prediction(other.unet), atol=0, rtol=0)


def test_keys_without_meaning_for_the_model_are_named():
    bundle = build_tiny_bundle()
    sdxl_only = {"diffusion_model.label_emb.0.0.lora_up.weight": torch.zeros(32, 2),
                 "diffusion_model.label_emb.0.0.lora_down.weight": torch.zeros(2, 16)}
    with pytest.raises(InvalidInputError, match=r"2 LoRA keys match no module .*diffusion_model\.label_emb\.0\.0\.lora_down"
                       r"\.weight.* no meaning for this SD1\.5 model"):
        apply_lora(bundle, sdxl_only)
    assert apply_kohya_lora(bundle.unet, None, sdxl_only, strict=False) == sorted(sdxl_only)


@pytest.mark.parametrize("key, message", [
    ("diffusion_model.input_blocks.1.1.proj_in.hada_w1_a", "is part of LoHa, which is not a plain LoRA"),
    ("lora_unet_conv_in.lokr_w1", "is part of LoKr"),
    ("diffusion_model.out.2.dora_scale", "is part of DoRA"),
    ("diffusion_model.out.2.weight", r"not LoRA keys, e.g. 'diffusion_model\.out\.2\.weight'"),
])  # fmt: skip
def test_other_adapters_and_non_lora_keys_are_refused_clearly(key, message):
    bundle = build_tiny_bundle()
    with pytest.raises(InvalidInputError, match=message):
        apply_lora(bundle, {key: torch.zeros(1)})


def test_parts_that_do_not_fit_the_model_are_refused():
    bundle = build_tiny_bundle()
    module = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    with pytest.raises(InvalidInputError, match="to_q has down \\[2, 48\\] / up \\[32, 2\\], which does not fit"):
        apply_lora(bundle, {f"{module}.lora_down.weight": torch.zeros(2, 48), f"{module}.lora_up.weight": torch.zeros(32, 2)})
    with pytest.raises(InvalidInputError, match="has `lora_down.weight` but no `lora_up.weight`"):
        apply_lora(bundle, {f"{module}.lora_down.weight": torch.zeros(2, 32)})
    with pytest.raises(InvalidInputError, match="changes a bias, but that module of the model has none"):
        apply_lora(bundle, {f"{module}.diff_b": torch.zeros(32)})
