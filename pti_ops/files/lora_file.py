"""LoRA files in kohya format: export from peft adapters, write, read, check, apply.

One module of a file is three tensors under one prefix (the module's diffusers path, `.` → `_`):
```
lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight  [rank, in]
lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight    [out, rank]
lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha             []
```
(conv modules keep 4-D weights: down `[rank, in, kh, kw]`, up `[out, rank, 1, 1]`). The update is
`up @ down * alpha / rank`. Text-encoder modules are `lora_te_text_model_encoder_layers_N_…`.
The module names are the model family's rule (`ModelFamily.unet_lora_name`, `TextEncoderSpec.lora_name`);
the above is SD1.5's, what ComfyUI's stock LoraLoader and diffusers' `load_lora_weights` read. SDXL files
name UNet modules by the original UNet's blocks (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`)
and its two encoders `lora_te1_…` / `lora_te2_…` (models/families/sdxl_lora.py). The PEFT spelling
(`unet.….lora_A.weight`) is never written because ComfyUI skips it for attention. What ComfyUI accepts
is re-derived in `comfy_lora_keys.py`.
"""

import math
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError, safe_open

from ..checks import check_finite
from ..errors import InvalidInputError, MissingModelFileError
from ..models import DEFAULT_FAMILY, FAMILIES, ModelFamily, get_family, supported_families
from ..models.families.sdxl_lora import CLIP_G_LORA_PREFIX, CLIP_L_LORA_PREFIX, LORA_UNET_PREFIX
from ..safe_write import write_safetensors
# Re-exported: the key maps were defined here before they got their own module.
from .comfy_lora_keys import comfyui_lora_key_map, comfyui_sdxl_lora_key_map  # noqa: F401
from .bundled_embeddings import bundle_tensors, split_bundled
from .lora_formats import ALPHA, DIFF, DIFF_B, DOWN, LORA_PARTS, UP, module_aliases, split_key, to_kohya
from .weight_deltas import add_weight_delta


# A kohya key: the module prefix of a known family (`lora_unet_`, `lora_te_`…) or of kohya's SDXL files
# (`lora_te1_`, `lora_te2_`), then one of the three parts.
_FAMILY_PREFIXES = tuple(prefix for family in FAMILIES.values() for prefix in family.lora_prefixes)
KOHYA_PREFIXES = tuple(dict.fromkeys(_FAMILY_PREFIXES + (LORA_UNET_PREFIX, CLIP_L_LORA_PREFIX, CLIP_G_LORA_PREFIX)))
_KOHYA_KEY = re.compile(
    rf"^((?:{'|'.join(map(re.escape, KOHYA_PREFIXES))})\w+)\.({re.escape(DOWN)}|{re.escape(UP)}|{ALPHA}|{DIFF}|{DIFF_B})$"
)
_EXPECTED_PREFIXES = " or ".join(f"`{prefix}…`" for prefix in KOHYA_PREFIXES)

# The text encoder(s) a call reads or changes: one model (the family's first encoder), or one per encoder
# of the family in its order, None where absent (SDXL: `[text_encoder, text_encoder_2]`).
TextEncoders = torch.nn.Module | Sequence[torch.nn.Module | None] | None

# Metadata keys the caller must give; rank and alpha are derived from the tensors if absent.
REQUIRED_METADATA = ("pivotal.placeholder", "pivotal.base_model")


# ---------------------------------------------------------------------------------------------
# Key rules
# ---------------------------------------------------------------------------------------------


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside a `PeftModel` (whose module names start with `base_model.model.`)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _models(unet, text_encoder: TextEncoders, family: ModelFamily) -> list[tuple[torch.nn.Module, Callable[[str], str]]]:
    """The given models, each with the family's function that names its modules' kohya prefixes."""
    pairs = []
    if unet is not None:
        unet = _unwrap(unet)
        config = getattr(unet, "config", None)  # the block numbers of SDXL's names depend on it
        pairs.append((unet, lambda name: family.unet_lora_name(name, config)))
    encoders = list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]
    if len(encoders) > len(family.text_encoders):
        raise InvalidInputError(
            f"{len(encoders)} text encoders were given but {family.display_name} has {len(family.text_encoders)} "
            f"({', '.join(family.embedding_keys)}): give one per encoder, in that order, None where not tuned."
        )
    pairs += [(_unwrap(model), spec.lora_name) for model, spec in zip(encoders, family.text_encoders) if model is not None]
    return pairs


# ---------------------------------------------------------------------------------------------
# peft adapters → kohya dict
# ---------------------------------------------------------------------------------------------


def lora_state_dict_to_kohya(
    unet: torch.nn.Module | None = None,
    text_encoder: TextEncoders = None,
    adapter_name: str = "default",
    family: ModelFamily | str = DEFAULT_FAMILY,
) -> dict[str, torch.Tensor]:
    """Read the peft LoRA adapter `adapter_name` of the UNet and/or text encoder as a kohya dict.

    Every module gets `.lora_down.weight` (peft's lora_A), `.lora_up.weight` (lora_B) and `.alpha`,
    with per-module ranks and alphas as peft has them. Tensors are float32 copies.

    Args:
        unet (`UNet2DConditionModel`, *optional*): the UNet carrying the adapter (or a `PeftModel` of it).
        text_encoder (`CLIPTextModel` or `list`, *optional*): the text encoder carrying the adapter, if it was
            tuned; for a family with several (SDXL), a list with one per encoder in the family's order
            (`[text_encoder, text_encoder_2]`), None where not tuned. A single model is the first encoder.
        adapter_name (`str`): the peft adapter to export.
        family (`ModelFamily` or `str`): the model family, whose rule names the modules.
    """
    kohya: dict[str, torch.Tensor] = {}
    for model, to_prefix in _models(unet, text_encoder, get_family(family)):
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
                kohya.update(_export_layer(to_prefix(name), module, adapter_name))
    if not kohya:
        raise InvalidInputError(
            f"no LoRA adapter named {adapter_name!r} was found on the given model(s): inject one with peft "
            "before exporting, or pass the adapter's name as `adapter_name`."
        )
    return kohya


def _export_layer(prefix: str, layer: LoraLayer, adapter_name: str) -> dict[str, torch.Tensor]:
    """The three kohya tensors of one peft LoRA layer."""
    base = layer.get_base_layer()
    if not isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
        raise InvalidInputError(
            f"LoRA on {prefix} wraps a {type(base).__name__}: the kohya format holds Linear and Conv2d "
            "modules only. Remove that module from the LoRA `target_modules`."
        )
    if layer.use_dora.get(adapter_name) or layer.lora_bias.get(adapter_name):
        raise InvalidInputError(
            f"LoRA on {prefix} uses DoRA or a LoRA bias, which this kohya export does not write: "
            "train with `use_dora=False` and `lora_bias=False`."
        )
    rank = layer.r[adapter_name]
    return {
        f"{prefix}.{DOWN}": _copy(layer.lora_A[adapter_name].weight),
        f"{prefix}.{UP}": _copy(layer.lora_B[adapter_name].weight),
        f"{prefix}.{ALPHA}": torch.tensor(_kohya_alpha(layer, adapter_name, rank), dtype=torch.float32),
    }


def _kohya_alpha(layer: LoraLayer, adapter_name: str, rank: int) -> float:
    """The alpha for which kohya's `alpha / rank` equals peft's scaling of this layer.

    peft scales by `lora_alpha / rank`, or `lora_alpha / sqrt(rank)` with rsLoRA, so rsLoRA
    needs `lora_alpha * sqrt(rank)`. If the scaling was changed at run time (diffusers'
    `set_adapters` weights), the effective scaling is what the file must reproduce.
    """
    alpha = layer.lora_alpha[adapter_name]
    if layer.use_rslora.get(adapter_name, False):
        alpha = alpha * math.sqrt(rank)
    scaling = layer.scaling[adapter_name]
    if not math.isclose(alpha / rank, scaling, rel_tol=1e-6):
        alpha = scaling * rank
    return float(alpha)


def _copy(weight: torch.Tensor) -> torch.Tensor:
    """A float32 contiguous copy, detached from the live parameter."""
    return weight.detach().to(torch.float32).clone(memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------------
# Checks shared by save, load and apply
# ---------------------------------------------------------------------------------------------


def is_kohya_key(key: str) -> bool:
    """Whether `key` is a kohya LoRA key (`lora_unet_…` / `lora_te_…` + `.lora_down.weight`, `.alpha`, `.diff`, …)."""
    return _KOHYA_KEY.match(key) is not None


def group_kohya_modules(kohya_dict: dict[str, torch.Tensor], where: str = "LoRA") -> dict[str, dict[str, torch.Tensor]]:
    """Group a kohya dict by module prefix after checking it, raising on the first bad key.

    Args:
        kohya_dict (`dict[str, Tensor]`): kohya keys → tensors.
        where (`str`): what the dict is (a file path), to start error messages with.
    """
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key in sorted(kohya_dict):
        match = _KOHYA_KEY.match(key)
        if match is None:
            raise InvalidInputError(
                f"{where}: key {key!r} is not a kohya LoRA key (expected {_EXPECTED_PREFIXES} "
                f"followed by `.lora_down.weight`, `.lora_up.weight` or `.alpha`, or a full delta `.diff` / "
                f"`.diff_b`). Is this a kohya-format LoRA file for {supported_families()}?"
            )
        modules.setdefault(match.group(1), {})[match.group(2)] = kohya_dict[key]
    if not modules:
        raise InvalidInputError(f"{where}: contains no LoRA weights.")
    for prefix in sorted(modules):
        _check_module(prefix, modules[prefix], where)
    return modules


def _check_module(prefix: str, parts: dict[str, torch.Tensor], where: str) -> None:
    """Raise unless one module's down, up and alpha exist and fit together (a module of full deltas has none)."""
    if not any(part in parts for part in LORA_PARTS):
        return  # `.diff` / `.diff_b` only: their shapes are the model's, checked where they are applied
    for part in LORA_PARTS:
        if part not in parts:
            present = ", ".join(f"`.{p}`" for p in sorted(parts))
            raise InvalidInputError(
                f"{where}: `{prefix}.{part}` is missing (the module has only {present}); every LoRA "
                "module needs `.lora_down.weight`, `.lora_up.weight` and `.alpha`. The file is "
                "incomplete or was not written in kohya format."
            )
    down, up, alpha = parts[DOWN], parts[UP], parts[ALPHA]
    if alpha.numel() != 1:
        raise InvalidInputError(f"{where}: `{prefix}.alpha` must be a single number, got shape {list(alpha.shape)}.")
    conv_ok = down.dim() == 4 and up.dim() == 4 and tuple(up.shape[2:]) == (1, 1)
    if not (down.dim() == up.dim() == 2 or conv_ok) or up.shape[1] != down.shape[0]:
        raise InvalidInputError(
            f"{where}: `{prefix}.lora_up.weight` has shape {list(up.shape)} and `.lora_down.weight` "
            f"{list(down.shape)}; expected up [out, rank] with down [rank, in] (conv: up [out, rank, 1, 1] "
            "with down [rank, in, kh, kw]). The file is damaged or not a LoRA."
        )


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


# Header bytes per kohya module: three keys with their dtype, shape and offsets in the JSON header.
_MODULE_HEADER_BYTES = 600


def lora_file_size(models: Sequence[tuple[torch.nn.Module | None, Sequence[str]]], rank: int, extra_bytes: int = 0) -> int:
    """Bytes of the LoRA file that adapters of `rank` on these modules give, about (float32, as written).

    Args:
        models (`list`): `(model, target suffixes)` pairs, as peft matches them (`to_q` matches `….to_q`);
            a None model is left out.
        rank (`int`): the adapters' rank.
        extra_bytes (`int`): more in the file (a bundled embedding).
    """
    total = 4 * 1024 + extra_bytes  # metadata
    for model, targets in models:
        for name, module in ([] if model is None else model.named_modules()):
            if not any(name == t or name.endswith("." + t) for t in targets) or not hasattr(module, "weight"):
                continue
            shape = module.weight.shape  # [out, in] or [out, in, kh, kw]
            total += 4 * rank * (int(shape[0]) + math.prod(int(n) for n in shape[1:])) + 4 + _MODULE_HEADER_BYTES
    return total


def save_lora(
    path: str | os.PathLike,
    kohya_dict: dict[str, torch.Tensor],
    metadata: dict[str, str],
    overwrite: bool = False,
    embeddings: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write a kohya LoRA `.safetensors` file atomically, after checking every key.

    The kohya metadata (`ss_network_module`, `ss_network_dim`, `ss_network_alpha`) is derived from
    the tensors so it cannot disagree with them; `pivotal.rank` / `pivotal.alpha` default to the same.

    Args:
        path (`str`): the file to write.
        kohya_dict (`dict[str, Tensor]`): from `lora_state_dict_to_kohya`.
        metadata (`dict[str, str]`): at least `pivotal.placeholder` and `pivotal.base_model`.
        overwrite (`bool`): replace an existing file instead of refusing.
        embeddings (`dict`, *optional*): embeddings to bundle into the file, `{name: {encoder key: vectors}}`, as
            `bundle_emb.NAME.clip_l` keys (`bundled_embeddings.py`): one file per character.
    """
    if Path(path).suffix.lower() != ".safetensors":
        raise InvalidInputError(f"LoRA path {str(path)!r} must end in .safetensors (the only format LoraLoader reads safely).")
    modules = group_kohya_modules(kohya_dict, "LoRA to save")
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise InvalidInputError(f"LoRA metadata lacks {', '.join(missing)}: give them (an empty string is allowed).")
    not_text = [key for key, value in metadata.items() if not isinstance(key, str) or not isinstance(value, str)]
    if not_text:
        raise InvalidInputError(f"LoRA metadata values must be strings; {not_text[0]!r} is not.")
    rank, alpha = _summary(modules)
    file_metadata = {"pivotal.rank": rank, "pivotal.alpha": alpha, **metadata}
    file_metadata.update(ss_network_module="networks.lora", ss_network_dim=rank, ss_network_alpha=alpha)
    tensors = {key: value.detach().contiguous() for key, value in kohya_dict.items()}
    for name, vectors in (embeddings or {}).items():
        tensors.update(bundle_tensors(name, vectors))
    if embeddings:
        file_metadata["pivotal.bundled_embeddings"] = ",".join(embeddings)
    return write_safetensors(path, tensors, file_metadata, overwrite=overwrite)


def _summary(modules: dict[str, dict[str, torch.Tensor]]) -> tuple[str, str]:
    """Rank and alpha as metadata strings; `"Dynamic"` when modules differ, as kohya's resize tool writes."""
    modules = {prefix: parts for prefix, parts in modules.items() if DOWN in parts}  # full deltas have no rank
    ranks = {int(parts[DOWN].shape[0]) for parts in modules.values()}
    alphas = {float(parts[ALPHA]) for parts in modules.values()}
    rank = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
    alpha = f"{alphas.pop():g}" if len(alphas) == 1 else "Dynamic"
    return rank, alpha


def load_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read and check a LoRA file; returns `(tensors, metadata)`, bundled embeddings' keys included.

    A kohya file (ours) is checked in full here. Files of ComfyUI's stock trainer and of diffusers/PEFT
    (`lora_formats.py`) have their keys checked here and are converted, module by module, when applied to a
    model (`apply_kohya_lora`), which knows the names and shapes they refer to.

    Args:
        path (`str`): a `.safetensors` LoRA file.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingModelFileError(f"LoRA file {path} not found.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            tensors = {key: file.get_tensor(key) for key in file.keys()}
            metadata = dict(file.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise InvalidInputError(f"{path} is not a readable .safetensors file: {err}") from err
    check_lora_keys(split_bundled(tensors, str(path))[0], str(path))
    check_lora_finite(tensors, f"LoRA file {path}")
    return tensors, metadata


def check_lora_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Raise naming the first tensor with NaN or infinite values (a diverged run's or a damaged file)."""
    for key in sorted(tensors):
        if tensors[key].is_floating_point():
            check_finite(tensors[key], f"tensor {key!r} of {where}")


def check_lora_keys(tensors: dict[str, torch.Tensor], where: str = "LoRA") -> None:
    """Raise unless `tensors` is a kohya LoRA (checked in full) or has only keys of another accepted layout."""
    if all(_KOHYA_KEY.match(key) for key in tensors):
        group_kohya_modules(tensors, where)
        return
    if not tensors:
        raise InvalidInputError(f"{where}: contains no LoRA weights.")
    for key in sorted(tensors):
        if split_key(key) is None:  # other adapter types raise inside, naming themselves
            raise InvalidInputError(
                f"{where}: key {key!r} is not a LoRA key: expected kohya keys ({_EXPECTED_PREFIXES} followed by "
                "`.lora_down.weight`, `.lora_up.weight`, `.alpha`), ComfyUI's (`diffusion_model.….lora_up.weight`, "
                "`.diff`, `.diff_b`) or diffusers/PEFT keys (`unet.….lora_A.weight`). Is this a LoRA file?"
            )


# ---------------------------------------------------------------------------------------------
# kohya dict → peft adapters
# ---------------------------------------------------------------------------------------------


def apply_kohya_lora(
    unet: torch.nn.Module | None,
    text_encoder: TextEncoders,
    kohya_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    strict: bool = True,
    family: ModelFamily | str = DEFAULT_FAMILY,
) -> list[str]:
    """Inject peft LoRA adapters with the file's per-module ranks and alphas, and load its weights.

    Any accepted layout is read (kohya, ComfyUI's stock trainer, diffusers/PEFT: `lora_formats.py`); full
    deltas (`.diff` / `.diff_b`) become switchable weight deltas (`weight_deltas.py`). The models are
    changed in place (pass clones to keep the originals). Everything is checked before the first model is
    touched. Returns the keys that match no module (empty when all loaded).

    Args:
        unet (`UNet2DConditionModel`, *optional*): receives the `lora_unet_` modules.
        text_encoder (`CLIPTextModel` or `list`, *optional*): receives the `lora_te_` modules; for SDXL a list
            `[text_encoder, text_encoder_2]` receiving `lora_te1_` / `lora_te2_` (None where not wanted).
        kohya_dict (`dict[str, Tensor]`): from `load_lora`, or a LORA_MODEL of ComfyUI's stock nodes.
        adapter_name (`str`): name of the new peft adapter; must not exist yet.
        strict (`bool`): raise if any key matches no module, instead of returning them.
        family (`ModelFamily` or `str`): the model family, whose rule names the modules.
    """
    family = get_family(family)
    kohya_dict = split_bundled(kohya_dict)[0]  # bundled embeddings are not weights (`bundled_embeddings.py`)
    check_lora_finite(kohya_dict, "the LoRA to apply")  # also a LORA_MODEL from another node
    aliases = module_aliases(unet and _unwrap(unet), _encoder_list(text_encoder, family), family)
    converted, unmatched = to_kohya(kohya_dict, aliases, "LoRA to apply")
    modules = group_kohya_modules(converted, "LoRA to apply") if converted else {}
    lora_modules = {prefix: parts for prefix, parts in modules.items() if DOWN in parts}
    plans, unplaced = _plan(unet, text_encoder, lora_modules, adapter_name, family)
    unmatched = sorted(unmatched + unplaced)
    if unmatched and strict:
        raise InvalidInputError(
            f"{len(unmatched)} LoRA keys match no module of the given UNet / text encoder, first: "
            f"{', '.join(unmatched[:3])}. They have no meaning for this {family.display_name} model: the LoRA was "
            "made for another model (family), or it has text-encoder weights and no text encoder was given."
        )
    for model, targets in plans:
        if targets:
            _inject(model, targets, adapter_name)
    for prefix, parts in modules.items():
        for part, parameter in ((DIFF, "weight"), (DIFF_B, "bias")):
            if part in parts:
                add_weight_delta(aliases[prefix][1], parameter, parts[part])
    return unmatched


def _encoder_list(text_encoder: TextEncoders, family: ModelFamily) -> list:
    """The text encoders as one entry per family encoder (None where absent), peft wrappers unwrapped."""
    encoders = list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]
    encoders += [None] * (len(family.text_encoders) - len(encoders))
    return [None if model is None else _unwrap(model) for model in encoders]


def _plan(unet, text_encoder, modules, adapter_name, family: ModelFamily):
    """Pair every file module with a model module, checking shapes; returns the plans and unmatched keys."""
    plans, found = [], set()
    for model, to_prefix in _models(unet, text_encoder, family):
        _check_adapter_free(model, adapter_name)
        targets = {}
        for name, module in model.named_modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, LoraLayer)):
                continue  # containers have no kohya name (and no LDM one in SDXL's rule)
            prefix = to_prefix(name)
            if prefix in modules:
                _check_fits(prefix, modules[prefix], module)
                targets[name] = modules[prefix]
                found.add(prefix)
        plans.append((model, targets))
    unmatched = sorted(f"{prefix}.{part}" for prefix in modules if prefix not in found for part in modules[prefix])
    return plans, unmatched


def _check_adapter_free(model: torch.nn.Module, adapter_name: str) -> None:
    if any(isinstance(m, LoraLayer) and adapter_name in m.lora_A for m in model.modules()):
        raise InvalidInputError(
            f"the model already has a LoRA adapter named {adapter_name!r}: pass another `adapter_name` "
            "or apply the LoRA to a fresh copy of the model."
        )


def _check_fits(prefix: str, parts: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    """Raise unless the file's down/up shapes fit the module's weight."""
    base = module.get_base_layer() if isinstance(module, LoraLayer) else module
    out_dim, in_dim, *kernel = base.weight.shape
    down, up = parts[DOWN], parts[UP]
    if down.shape[1] != in_dim or up.shape[0] != out_dim or list(down.shape[2:]) != kernel:
        raise InvalidInputError(
            f"LoRA module {prefix} has down {list(down.shape)} / up {list(up.shape)}, which does not fit "
            f"the model's weight {list(base.weight.shape)}: the LoRA was made for a model of another size."
        )


def _inject(model: torch.nn.Module, targets: dict[str, dict[str, torch.Tensor]], adapter_name: str) -> None:
    """Add one peft adapter on exactly the named modules and copy the file's weights into it."""
    ranks = {name: int(parts[DOWN].shape[0]) for name, parts in targets.items()}
    alphas = {name: float(parts[ALPHA]) for name, parts in targets.items()}
    # The most common rank/alpha are the config's defaults; the others go in peft's patterns,
    # whose keys are regexes matched against the end of module names (hence re.escape).
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        # A string is matched in full against each module name: exactly these modules, no suffix matches.
        target_modules="|".join(re.escape(name) for name in sorted(targets)),
        rank_pattern={re.escape(n): r for n, r in ranks.items() if r != rank},
        alpha_pattern={re.escape(n): a for n, a in alphas.items() if a != alpha},
    )
    inject_adapter_in_model(config, model, adapter_name=adapter_name)
    with torch.no_grad():
        for name, parts in targets.items():
            layer = model.get_submodule(name)
            layer.lora_A[adapter_name].weight.copy_(parts[DOWN])
            layer.lora_B[adapter_name].weight.copy_(parts[UP])
