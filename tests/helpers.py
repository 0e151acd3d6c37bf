"""Small builders shared by several test modules."""

import contextlib
import re

import torch
from peft import LoraConfig, inject_adapter_in_model

from pti_ops.files.lora_file import lora_state_dict_to_kohya
from pti_ops.models.ldm_layout import unet_to_ldm
from pti_ops.models.tiny_model import build_tiny_bundle
from pti_ops.user_warnings import collect_warnings


@contextlib.contextmanager
def warns_user(match: str):
    """Like `pytest.warns`, for the core's `warn_user`: some warning given inside the block matches `match`."""
    with collect_warnings() as collected:
        yield collected
    assert any(re.search(match, message) for message in collected), f"no warning matches {match!r}: {collected}"


def kohya_lora(up_std: float = 0.05, text_encoder: bool = False) -> dict[str, torch.Tensor]:
    """A kohya LoRA dict for the tiny model: rank 4 on the attention projections, up weights ~N(0, up_std)."""
    donor = build_tiny_bundle()
    torch.manual_seed(0)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), donor.unet)
    if text_encoder:
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]), donor.text_encoder)
    with torch.no_grad():
        for model in (donor.unet, donor.text_encoder):
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, up_std) if up_std else param.zero_()
    return lora_state_dict_to_kohya(unet=donor.unet, text_encoder=donor.text_encoder if text_encoder else None)


def stock_trainer_lora(unet, rank: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """What ComfyUI's Train LoRA node returns as LORA_MODEL for this UNet (trained: every tensor non-zero).

    As comfy_extras/nodes_train.py builds it, on ComfyUI's (LDM) module names: a LoRA (`lora_up [out, r]`,
    `lora_down [r, in·kh·kw]`, alpha 1) on weights of 2+ dimensions, `.diff` on 1-D weights, `.diff_b` on biases.
    """
    generator = torch.Generator().manual_seed(seed)
    ldm = unet_to_ldm(unet.state_dict(), dict(unet.config))
    lora = {}
    for key, weight in sorted(ldm.items()):
        module = "diffusion_model." + key[len("model.diffusion_model."):].rsplit(".", 1)[0]
        if key.endswith(".weight") and weight.dim() >= 2:
            lora[f"{module}.lora_up.weight"] = torch.randn(weight.shape[0], rank, generator=generator) * 0.05
            lora[f"{module}.lora_down.weight"] = torch.randn(rank, weight[0].numel(), generator=generator) * 0.05
            lora[f"{module}.alpha"] = torch.tensor(1.0)
        elif key.endswith(".weight"):
            lora[f"{module}.diff"] = torch.randn(weight.shape, generator=generator) * 0.05
        elif key.endswith(".bias"):
            lora[f"{module}.diff_b"] = torch.randn(weight.shape, generator=generator) * 0.05
    return lora
