"""LoRAs written by other trainers, read as our kohya dict for the model that receives them.

A key is `<module><part>`. The layouts accepted (detected key by key, so a mixed dict works too):
```
kohya (ours, sd-scripts)   lora_unet_down_blocks_0_…_to_q  .lora_down.weight .lora_up.weight .alpha
                           lora_unet_input_blocks_1_1_…_to_q  (SD1.5 on the original UNet's names), lora_te_…
ComfyUI's own              diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q  .lora_down.weight …
  (the stock Train LoRA node's LORA_MODEL and Save LoRA's file; convs flattened: down [rank, in·kh·kw])
                           diffusion_model.input_blocks.1.0.in_layers.0  .diff   (a 1-D weight's full delta)
                           diffusion_model.input_blocks.1.0.in_layers.2  .diff_b (a bias's full delta)
                           clip_l.transformer.text_model.…, text_encoders.clip_l.transformer.…
diffusers / PEFT           unet.down_blocks.0.…to_q  .lora_A.weight .lora_B.weight   (no alpha: scale 1)
                           text_encoder.text_model.…q_proj, bare module names, `.lora.down.weight`,
                           `.lora_linear_layer.down.weight`, `attn1.processor.to_q_lora.down.weight`
```
The result is keyed by the model family's kohya names (`ModelFamily.unet_lora_name`,
`TextEncoderSpec.lora_name`), with `.alpha` always present (the rank where a file has none, as
kohya and diffusers read such files: scale 1), conv LoRAs 4-D, and full deltas as `.diff` /
`.diff_b` on the same names (LyCORIS's "full" keys, which ComfyUI's LoraLoader reads too). Our own
files are written kohya-keyed and need no conversion.
"""

from collections.abc import Sequence

import torch

from ..errors import InvalidInputError
from ..models import ModelFamily
from ..models.ldm_unet_names import ldm_unet_module_name

DOWN, UP, ALPHA, DIFF, DIFF_B = "lora_down.weight", "lora_up.weight", "alpha", "diff", "diff_b"
LORA_PARTS = (DOWN, UP, ALPHA)
DELTA_PARTS = (DIFF, DIFF_B)

# Key endings of the other layouts → our part; longest first, so `.lora_A.default.weight` wins over `.weight`.
_PART_SUFFIXES = sorted({
    f".{DOWN}": DOWN, f".{UP}": UP, f".{ALPHA}": ALPHA, f".{DIFF}": DIFF, f".{DIFF_B}": DIFF_B,
    ".lora_A.weight": DOWN, ".lora_B.weight": UP, ".lora_A.default.weight": DOWN, ".lora_B.default.weight": UP,
    ".lora.down.weight": DOWN, ".lora.up.weight": UP,
    ".lora_linear_layer.down.weight": DOWN, ".lora_linear_layer.up.weight": UP,
    "_lora.down.weight": DOWN, "_lora.up.weight": UP,  # diffusers' attention processors: `processor.to_q_lora`
}.items(), key=lambda item: -len(item[0]))
# Parts of adapters that are not a LoRA (or a LoRA variant we cannot represent), with what they are.
_OTHER_ADAPTERS = {
    ".hada_w1_a": "LoHa", ".hada_w1_b": "LoHa", ".hada_w2_a": "LoHa", ".hada_w2_b": "LoHa", ".hada_t1": "LoHa",
    ".lokr_w1": "LoKr", ".lokr_w2": "LoKr", ".lokr_w1_a": "LoKr", ".lokr_w2_a": "LoKr", ".lokr_t2": "LoKr",
    ".oft_blocks": "OFT", ".oft_diag": "OFT", ".a1.weight": "GLoRA", ".dora_scale": "DoRA",
    ".lora_mid.weight": "LoCon (Tucker) mid weights", ".w_norm": "a norm delta (w_norm)",
    ".b_norm": "a norm delta (b_norm)", ".set_weight": "a weight replacement (set_weight)",
    ".reshape_weight": "a reshaped weight",
}  # fmt: skip

# Where each model's modules are known under their diffusers/transformers names, besides kohya's.
_UNET_ALIASES = ("", "unet.", "base_model.model.", "model.diffusion_model.")  # the last: LDM names (below)
_LDM_UNET_PREFIXES = ("diffusion_model.", "model.diffusion_model.")


def split_key(key: str) -> tuple[str, str] | None:
    """`(module, part)` of a LoRA key in any accepted layout, None when the key has no LoRA part.

    Raises `InvalidInputError` for a part of another adapter type (LoHa, LoKr, OFT, DoRA, …).
    """
    for suffix, kind in _OTHER_ADAPTERS.items():
        if key.endswith(suffix):
            raise InvalidInputError(
                f"LoRA key {key!r} is part of {kind}, which is not a plain LoRA: this pack reads LoRA (up/down/alpha) "
                "and full weight deltas (diff, diff_b). Convert the file to a plain LoRA, or use it with the stock "
                "LoraLoader only."
            )
    for suffix, part in _PART_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            module = key[: -len(suffix)]
            if suffix.startswith("_lora."):  # attn1.processor.to_q_lora → attn1.to_q (to_out → to_out.0)
                module = module.replace(".processor.to_out", ".to_out.0").replace(".processor.", ".")
            return module, part
    return None


def module_aliases(unet, text_encoders: Sequence, family: ModelFamily) -> dict[str, tuple[str, torch.nn.Module]]:
    """Every spelling of every weighted module's name → `(its kohya name, the module)`.

    Args:
        unet (`UNet2DConditionModel`, *optional*): the diffusers UNet.
        text_encoders (`list`): the family's text encoders in its order, None where absent.
        family (`ModelFamily`): whose rule gives the kohya names.
    """
    aliases: dict[str, tuple[str, torch.nn.Module]] = {}
    if unet is not None:
        config = getattr(unet, "config", None)
        for name, module in _weighted_modules(unet):
            entry = (family.unet_lora_name(name, config), module)
            names = [prefix + name for prefix in _UNET_ALIASES[:3]] + [family.lora_unet_prefix + name.replace(".", "_")]
            ldm = _ldm_name(name, config)
            if ldm is not None:
                names += [prefix + ldm for prefix in _LDM_UNET_PREFIXES] + [family.lora_unet_prefix + ldm.replace(".", "_")]
            aliases.update(dict.fromkeys(names, entry))
    for index, (model, spec) in enumerate(zip(text_encoders, family.text_encoders)):
        if model is None:
            continue
        diffusers_name = "text_encoder" if index == 0 else f"text_encoder_{index + 1}"
        for name, module in _weighted_modules(model):
            full = name if name.startswith(("text_model.", "text_projection")) else "text_model." + name
            entry = (spec.lora_name(name), module)
            names = [spec.lora_name(name), f"{diffusers_name}.{name}", f"{diffusers_name}.{full}", name, full,
                     f"{spec.comfy_prefix}transformer.{full}", f"text_encoders.{spec.comfy_prefix}transformer.{full}"]
            aliases.update(dict.fromkeys(names, entry))
    return aliases


# Submodules peft and torch's parametrizations add inside a module; they are not the model's own modules.
_ADDED_PARTS = {"base_layer", "lora_A", "lora_B", "lora_dropout", "lora_embedding_A", "lora_embedding_B",
                "lora_magnitude_vector", "parametrizations"}


def _weighted_modules(model: torch.nn.Module):
    """`(name, module)` of the modules owning a weight (Linear, Conv, norms); a peft wrapper stands for its base layer."""
    for name, module in model.named_modules():
        if _ADDED_PARTS.intersection(name.split(".")):
            continue
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if isinstance(getattr(base, "weight", None), torch.Tensor):
            yield name, base


def _ldm_name(name: str, config) -> str | None:
    try:
        return ldm_unet_module_name(name, config) if config is not None else None
    except (InvalidInputError, KeyError, TypeError):
        return None  # a module the LDM layout has no place for


def to_kohya(state_dict: dict[str, torch.Tensor], aliases: dict[str, tuple[str, torch.nn.Module]],
             where: str = "LoRA") -> tuple[dict[str, torch.Tensor], list[str]]:
    """`(kohya dict, keys matching no module)` of a LoRA in any accepted layout, for the models of `aliases`.

    Everything is checked before anything is returned; the caller decides what unmatched keys mean.

    Args:
        state_dict (`dict[str, Tensor]`): the LoRA (a file's tensors, or ComfyUI's LORA_MODEL).
        aliases (`dict`): `module_aliases(unet, text_encoders, family)` of the models receiving it.
        where (`str`): what the dict is, to start messages with.
    """
    modules: dict[str, dict[str, torch.Tensor]] = {}
    owners: dict[str, torch.nn.Module] = {}
    unmatched, unknown = [], []
    for key in sorted(state_dict):
        split = split_key(key)
        if split is None:
            unknown.append(key)
        elif split[0] not in aliases:
            unmatched.append(key)
        else:
            target, module = aliases[split[0]]
            modules.setdefault(target, {})[split[1]] = state_dict[key]
            owners[target] = module
    if unknown:
        raise InvalidInputError(
            f"{where}: {len(unknown)} key(s) are not LoRA keys, e.g. {', '.join(map(repr, unknown[:3]))}; expected "
            "kohya (`lora_unet_…`, `lora_te_…`), ComfyUI's (`diffusion_model.….lora_up.weight`, `.diff`, `.diff_b`) "
            "or diffusers/PEFT keys (`unet.….lora_A.weight`). Is this a LoRA file?"
        )
    kohya = {}
    for target in sorted(modules):
        kohya.update(_module_parts(target, modules[target], owners[target], where))
    return kohya, unmatched


def _module_parts(target: str, parts: dict[str, torch.Tensor], module: torch.nn.Module, where: str) -> dict:
    """One module's kohya tensors, float32: down/up shaped like our export for the module, alpha, deltas."""
    out = {}
    lora = [part for part in LORA_PARTS if part in parts]
    if lora and not (DOWN in parts and UP in parts):
        missing = UP if DOWN in parts else DOWN
        raise InvalidInputError(f"{where}: module {target} has `{', '.join(lora)}` but no `{missing}`: the LoRA is incomplete.")
    weight = module.weight
    if DOWN in parts:
        down, up = parts[DOWN].float(), parts[UP].float()
        rank = down.shape[0]
        kernel = tuple(weight.shape[2:])
        if down.numel() != rank * weight[0].numel() or up.numel() != weight.shape[0] * rank:
            raise InvalidInputError(
                f"{where}: module {target} has down {list(down.shape)} / up {list(up.shape)}, which does not fit the "
                f"model's weight {list(weight.shape)}: the LoRA was made for a model of another size."
            )
        out[f"{target}.{DOWN}"] = down.reshape(rank, *weight.shape[1:]).contiguous()
        out[f"{target}.{UP}"] = up.reshape(weight.shape[0], rank, *([1] * len(kernel))).contiguous()
        alpha = parts.get(ALPHA)
        out[f"{target}.{ALPHA}"] = torch.tensor(float(rank) if alpha is None else float(alpha), dtype=torch.float32)
    for part, name in ((DIFF, "weight"), (DIFF_B, "bias")):
        if part in parts:
            out[f"{target}.{part}"] = _delta(target, part, parts[part], getattr(module, name, None), where)
    return out


def _delta(target: str, part: str, delta: torch.Tensor, parameter, where: str) -> torch.Tensor:
    if parameter is None:
        raise InvalidInputError(f"{where}: `{target}.{part}` changes a bias, but that module of the model has none.")
    if delta.numel() != parameter.numel():
        raise InvalidInputError(
            f"{where}: `{target}.{part}` has shape {list(delta.shape)}, the model's {'bias' if part == DIFF_B else 'weight'} "
            f"{list(parameter.shape)}: the LoRA was made for a model of another size."
        )
    return delta.float().reshape(parameter.shape).contiguous()
