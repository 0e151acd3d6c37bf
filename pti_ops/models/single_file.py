"""Load a single-file checkpoint (original layout, `.safetensors`) of SD1.5 or the SDXL family as a `ModelBundle`.

The tensors are read with `safetensors.safe_open` (no pickle), upcast to float32 and converted
with diffusers' own LDM → diffusers functions (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, and `convert_open_clip_checkpoint` for
SDXL's bigG), none of which touches the network. The family is recognised from the key prefixes
(`single_file_prefixes`); its shipped configs (`config_dir`: `models/configs/sd15/`, `…/sdxl/`) fill
in what a file does not say, except SDXL's UNet config, which is derived from the tensor shapes so
that SSD-1B, Segmind Vega and KOALA load too (`ldm_shapes.py`). Files written by
`ldm_layout.save_ldm_checkpoint` (e.g. the tiny models) carry their own configs in their metadata.
SDXL's `v_pred` / `ztsnr` marker keys make the schedule v-prediction / zero terminal SNR.
Every tensor is accounted for: a file key the conversion did not use, or a model weight the file
lacks, is an error that names it.

The tokenizers are not in a checkpoint: `tokenizer_files.py` says where they are looked for.
"""

import json
import os
import types
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors import SafetensorError, safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .bundle import ModelBundle
from ..errors import ModelLoadError
from .families import DEFAULT_FAMILY, FAMILIES, detect_family, supported_families
from .family import ModelFamily, TextEncoderSpec
from .ldm_layout import META_CONFIG_KEYS, META_PREFIX
from .tokenizer_files import check_tokenizer_fits, resolve_tokenizers

# File keys that are not weights of the three models: LDM's DDPM schedule buffers, EMA copies
# (full checkpoints keep both; the non-EMA weights are used, as ComfyUI does) and LDM's `logvar`.
IGNORED_PREFIXES = ("model_ema.",)
IGNORED_KEYS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar",
}  # fmt: skip
# Keys of textual-inversion files: ours/ComfyUI's (`clip_l`, `clip_g`), kohya's (`emb_params`), A1111's (`string_to_*`).
EMBEDDING_KEYS = {"clip_l", "clip_g", "emb_params"}
# Text-encoder keys that CLIPTextModel does not have: the position ids buffer (rebuilt by the model),
# and the projection / logit scale that ComfyUI-saved checkpoints may carry (unused by SD1.5).
IGNORED_CLIP_SUFFIXES = ("position_ids", "text_projection.weight", "logit_scale")
# OpenCLIP keys that diffusers' converter copies (split q/k/v, transposed projection) rather than
# renames, so they are accounted for by the converted model's completeness; and its unused temperature.
COPIED_OPEN_CLIP_SUFFIXES = ("attn.in_proj_weight", "attn.in_proj_bias", "text_projection")
IGNORED_OPEN_CLIP_SUFFIXES = ("logit_scale",)


def load_single_file(path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None) -> ModelBundle:
    """Build a `ModelBundle` from an SD1.5 or SDXL-family single-file `.safetensors` checkpoint.

    Args:
        path (`str`): the checkpoint file.
        tokenizer_dir (`str`, *optional*): folder with CLIP's `vocab.json` + `merges.txt` (or with
            `tokenizer/` and `tokenizer_2/`); see `tokenizer_files.py` for where they are looked for without it.
    """
    path = Path(path)
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise ModelLoadError(
            f"checkpoint {str(path)!r} is not a .safetensors file. Pickled checkpoints (.ckpt/.pt) are refused "
            "because loading them can run arbitrary code; convert them to .safetensors first."
        )
    state, metadata = read_safetensors(path)
    family = family_of_state(state)
    check_layout(state, path, family)
    configs = load_configs(metadata, family, state)
    text_config = CLIPTextConfig.from_dict(configs["text_encoder"])
    # The tokenizers are the part most likely to be missing: look for them before the costly conversion.
    tokenizers = resolve_tokenizers(path, metadata, tokenizer_dir, text_config.max_position_embeddings, family)
    name = metadata.get(META_PREFIX + "name", path.stem)
    return bundle_from_ldm_state(
        state, configs, tokenizers[0], name=name, source=str(path), where=path, family=family,
        tokenizer_2=tokenizers[1] if len(tokenizers) > 1 else None,
    )  # fmt: skip


def bundle_from_ldm_state(
    state: dict[str, torch.Tensor],
    configs: dict[str, dict],
    tokenizer: CLIPTokenizer,
    name: str,
    source: str,
    where: Path,
    family: ModelFamily = DEFAULT_FAMILY,
    tokenizer_2: CLIPTokenizer | None = None,
) -> ModelBundle:
    """Build a `ModelBundle` from a single-file-layout state dict, the parts' configs and the tokenizer(s).

    Used for checkpoint files and for the weights of models already loaded elsewhere (ComfyUI's
    MODEL/CLIP/VAE, renamed to the LDM layout by `comfy_layout.py`).

    Args:
        state (`dict`): float32 tensors under the family's `single_file_prefixes` (SD1.5:
            `model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.*`; checked
            by `check_layout`).
        configs (`dict`): diffusers/transformers configs of `family.config_parts` (`unet`, `vae`,
            `text_encoder` [, `text_encoder_2`], `scheduler`).
        tokenizer (`CLIPTokenizer`): the (first) text encoder's tokenizer.
        name (`str`): base model name recorded in the files written from the bundle.
        source (`str`): where the weights came from.
        where (`Path`): what error messages name (`where.name`): the file, or the connected models.
        family (`ModelFamily`): the family whose layout `state` has.
        tokenizer_2 (`CLIPTokenizer`, *optional*): SDXL's second tokenizer.
    """
    tokenizers = (tokenizer,) if tokenizer_2 is None else (tokenizer, tokenizer_2)
    parts = family.text_encoder_parts
    if len(tokenizers) != len(parts):
        raise ModelLoadError(f"{where.name}: a {family.display_name} model needs {len(parts)} tokenizer(s), got {len(tokenizers)}.")
    for part, tok in zip(parts, tokenizers):
        check_tokenizer_fits(tok, configs[part]["vocab_size"], where)
    converted = convert_to_diffusers(state, configs, where, family)
    unet = _build_model(lambda: UNet2DConditionModel.from_config(configs["unet"]), converted["unet"], "UNet", where)
    vae = _build_model(lambda: AutoencoderKL.from_config(configs["vae"]), converted["vae"], "VAE", where)
    encoders = _build_text_encoders(converted, configs, family, where)
    scheduler = DDPMScheduler.from_config(configs["scheduler"])
    family = detect_family(encoders[0], unet, encoders[1] if len(encoders) > 1 else None)
    return ModelBundle(
        tokenizer, encoders[0], unet, vae, scheduler, family=family, name=name, source=source,
        tokenizer_2=tokenizer_2, text_encoder_2=encoders[1] if len(encoders) > 1 else None,
    )  # fmt: skip


def text_encoders_from_ldm_state(
    state: dict[str, torch.Tensor], configs: dict[str, dict], family: ModelFamily, where: Path
) -> list[torch.nn.Module]:
    """The family's text encoders alone, in family order, from their single-file-layout tensors (for measurements).

    Args:
        state (`dict`): float32 tensors under the text encoders' single-file prefixes (other parts are ignored).
        configs (`dict`): the `CLIPTextConfig` dicts by part (`text_encoder` [, `text_encoder_2`]).
        family (`ModelFamily`): gives the encoders' prefixes, namings and classes.
        where (`Path`): what error messages name (`where.name`).
    """
    return _build_text_encoders(convert_text_encoders(state, configs, where, family), configs, family, where)


def _build_text_encoders(converted: dict[str, dict], configs: dict[str, dict], family: ModelFamily, where: Path) -> list:
    """The text encoders from their converted state dicts (`CLIPTextModelWithProjection` where the family's has one)."""
    encoders = []
    for index, (part, spec) in enumerate(zip(family.text_encoder_parts, family.text_encoders)):
        model_class = CLIPTextModelWithProjection if spec.with_projection else CLIPTextModel
        config = CLIPTextConfig.from_dict(configs[part])
        what = "text encoder" if index == 0 else f"text encoder {index + 1}"
        encoders.append(_build_model(lambda: model_class(config), converted[part], what, where))
    return encoders


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a `.safetensors` file (floating point upcast to float32) and its metadata."""
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            # float16/bfloat16 weights are trained in float32 here; integer buffers keep their type.
            state = {}
            for key in file.keys():
                tensor = file.get_tensor(key)
                state[key] = tensor.float() if tensor.is_floating_point() else tensor
    except (SafetensorError, OSError) as err:
        raise ModelLoadError(f"could not read {path} as a .safetensors file: {err}") from err
    return state, metadata


def family_of_state(state: dict[str, torch.Tensor]) -> ModelFamily:
    """The family whose single-file prefixes all occur among the keys; otherwise the one with the most of
    its text-encoder prefixes present (its `check_layout` then says what is missing); the default family
    when none is present."""
    def present(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in state)

    for family in FAMILIES.values():
        if all(present(prefix) for prefix in family.single_file_prefixes.values()):
            return family
    counts = {family: sum(present(spec.single_file_prefix) for spec in family.text_encoders) for family in FAMILIES.values()}
    best = max(counts, key=counts.get)
    return best if counts[best] else DEFAULT_FAMILY


def _describe_unsupported(keys: list[str], family: ModelFamily) -> str | None:
    """What a file outside the family's layout looks like, from its keys (None when it has that layout)."""
    if not keys:
        return "an empty file (no tensors)"
    own_text = any(k.startswith(spec.single_file_prefix) for spec in family.text_encoders for k in keys)
    if not own_text and any(k.startswith("conditioner.embedders.") for k in keys):
        return (
            "an SDXL-style checkpoint with other text encoders than SDXL base's CLIP-L + bigG "
            "(`conditioner.embedders.*`; the SDXL refiner?)"
        )
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "an SD2.x checkpoint (OpenCLIP text encoder `cond_stage_model.model.*`)"
    if any("lora_" in k or ".lora." in k for k in keys):
        return f"a LoRA (keys such as `{next(k for k in keys if 'lora' in k)}`)"
    if all(k in EMBEDDING_KEYS or k.startswith(("string_to_param.", "string_to_token.")) for k in keys):
        return f"a textual-inversion embedding (keys {', '.join(sorted(keys)[:4])})"
    parts = family.single_file_prefixes.items()
    missing = [f"{part} `{prefix}*`" for part, prefix in parts if not any(k.startswith(prefix) for k in keys)]
    if missing:
        found = sorted({k.split(".")[0] + ".*" for k in keys})[:6]
        return f"a file without {', '.join(missing)} (its keys start with {', '.join(found)})"
    return None


def _layout_summary(family: ModelFamily) -> str:
    """`UNet `model.diffusion_model.*`, text encoder `…*` and VAE `first_stage_model.*`` for messages."""
    texts = " and ".join(f"`{spec.single_file_prefix}*`" for spec in family.text_encoders)
    noun = "text encoder" if len(family.text_encoders) == 1 else "text encoders"
    return f"UNet `{family.unet_prefix}*`, {noun} {texts} and VAE `{family.vae_prefix}*`"


def check_layout(state: dict[str, torch.Tensor], path: Path, family: ModelFamily = DEFAULT_FAMILY) -> None:
    """Raise `ModelLoadError` unless the keys are those of a single-file checkpoint of `family`.

    Args:
        state (`dict`): the file's tensors by key.
        path (`Path`): the file, for the message.
        family (`ModelFamily`): the family whose layout is expected.
    """
    what = _describe_unsupported(list(state), family)
    if what is not None:
        raise ModelLoadError(
            f"unsupported model: {path.name} looks like {what}; {supported_families()} single-file checkpoints are "
            f"supported ({family.display_name} ones have {_layout_summary(family)})."
        )
    parts = tuple(family.single_file_prefixes.values())
    allowed = IGNORED_KEYS | set(family.prediction_markers)
    unknown = [k for k in state if not k.startswith(parts + IGNORED_PREFIXES) and k not in allowed]
    if unknown:
        raise ModelLoadError(
            f"{path.name} has {len(unknown)} tensor(s) outside the {family.display_name} layout, e.g. "
            f"{', '.join(unknown[:5])}: it is not a plain {family.display_name} checkpoint (merged extras are not "
            "supported)."
        )


def _read_config(name: str, family: ModelFamily = DEFAULT_FAMILY) -> dict:
    return json.loads((family.config_dir / name).read_text(encoding="utf-8"))


def load_configs(
    metadata: dict[str, str], family: ModelFamily = DEFAULT_FAMILY, state: dict[str, torch.Tensor] | None = None
) -> dict[str, dict]:
    """diffusers/transformers configs of the family's parts: the file's own (our files) or the family's shipped ones.

    Args:
        metadata (`dict`): the checkpoint's safetensors metadata.
        family (`ModelFamily`): whose shipped configs fill in what the metadata lacks.
        state (`dict`, *optional*): the file's tensors: a UNet config the metadata lacks is derived from
            their shapes (`family.derive_unet_config`, SDXL), and the family's prediction markers set
            the schedule's prediction type.
    """
    configs = {}
    for part in family.config_parts:
        key = META_CONFIG_KEYS[part]
        try:
            configs[part] = json.loads(metadata[key]) if key in metadata else _read_config(f"{part}_config.json", family)
        except json.JSONDecodeError as err:
            raise ModelLoadError(f"the checkpoint's metadata entry {key} is not valid JSON: {err}") from err
    if state is not None:
        if family.derive_unet_config is not None and META_CONFIG_KEYS["unet"] not in metadata:
            configs["unet"] = family.derive_unet_config(state, configs["unet"])
        configs["scheduler"] = scheduler_config_with_markers(configs["scheduler"], state, family)
    return configs


def scheduler_config_with_markers(config: dict, state: dict[str, torch.Tensor], family: ModelFamily) -> dict:
    """`config` with v-prediction (and zero terminal SNR) where the file carries the family's marker keys.

    ComfyUI reads `v_pred` as v-prediction and, with it, `ztsnr` as zero terminal SNR (NoobAI-XL
    v-pred and ComfyUI-saved files carry them); diffusers' counterparts are `prediction_type`,
    `rescale_betas_zero_snr` and the `trailing` timestep spacing diffusers recommends with it.
    """
    if not family.prediction_markers:
        return config
    v_pred, ztsnr = family.prediction_markers
    if v_pred not in state:
        return config
    return prediction_config(config, "v_prediction", zero_terminal_snr=ztsnr in state)


def prediction_config(config: dict, prediction_type: str, zero_terminal_snr: bool) -> dict:
    """A copy of a DDPM scheduler config predicting `prediction_type`, with zero terminal SNR when asked.

    diffusers' zero-terminal-SNR schedule is `rescale_betas_zero_snr` with the `trailing` timestep spacing
    it recommends; ComfyUI's `zsnr` rescales its sigmas by the same rule (Lin et al. 2023, Algorithm 1).

    Args:
        config (`dict`): a `DDPMScheduler` config.
        prediction_type (`str`): diffusers' name (`epsilon`, `v_prediction`).
        zero_terminal_snr (`bool`): rescale the betas so that the last timestep is pure noise.
    """
    config = dict(config, prediction_type=prediction_type)
    if zero_terminal_snr:
        config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return config


def _unused_keys(state: dict[str, torch.Tensor], prefix: str, converted: dict[str, torch.Tensor]) -> list[str]:
    # The converters rename tensors and at most take views of them (1x1 conv -> linear), so a source
    # tensor was used exactly when its storage appears among the converted tensors.
    used = {t.data_ptr() for t in converted.values()}
    return [k for k, t in state.items() if k.startswith(prefix) and t.data_ptr() not in used]


def _convert_text_encoder(state: dict[str, torch.Tensor], spec: TextEncoderSpec, config: dict) -> dict[str, torch.Tensor]:
    """One text encoder's diffusers state dict, by diffusers' converter for its naming."""
    if not spec.open_clip_layout:
        return convert_ldm_clip_checkpoint(state)
    # diffusers' OpenCLIP converter reads only `config.hidden_size` of the model it is given.
    holder = types.SimpleNamespace(config=CLIPTextConfig.from_dict(config))
    return convert_open_clip_checkpoint(holder, state, prefix=spec.single_file_prefix)


def convert_to_diffusers(
    state: dict[str, torch.Tensor], configs: dict[str, dict], path: Path, family: ModelFamily = DEFAULT_FAMILY
) -> dict[str, dict]:
    """Single-file state dict -> diffusers state dicts of `unet`, `vae` and the text encoders, with diffusers' converters.

    Args:
        state (`dict`): the checkpoint's tensors (checked by `check_layout`).
        configs (`dict`): the parts' configs (`load_configs`).
        path (`Path`): the file, for messages.
        family (`ModelFamily`): gives the parts' prefixes and namings.
    """
    converted = {
        "unet": convert_ldm_unet_checkpoint(state, configs["unet"]),
        "vae": convert_ldm_vae_checkpoint(state, configs["vae"]),
    }
    for part in ("unet", "vae"):
        _raise_unused(_unused_keys(state, family.single_file_prefixes[part], converted[part]), part, path, family)
    return {**converted, **convert_text_encoders(state, configs, path, family)}


def convert_text_encoders(
    state: dict[str, torch.Tensor], configs: dict[str, dict], path: Path, family: ModelFamily = DEFAULT_FAMILY
) -> dict[str, dict]:
    """Single-file state dict -> the diffusers state dict of each text encoder (`text_encoder`, …), every tensor used.

    Args:
        state (`dict`): tensors under the encoders' single-file prefixes (other parts are ignored).
        configs (`dict`): the encoders' configs by part.
        path (`Path`): the file, for messages.
        family (`ModelFamily`): gives the encoders' prefixes and namings.
    """
    converted = {}
    for part, spec in zip(family.text_encoder_parts, family.text_encoders):
        weights = _convert_text_encoder(state, spec, configs[part])
        unused = _unused_keys(state, spec.single_file_prefix, weights)
        if spec.open_clip_layout:
            unused = [k for k in unused if not k.endswith(COPIED_OPEN_CLIP_SUFFIXES + IGNORED_OPEN_CLIP_SUFFIXES)]
        _raise_unused(unused, part, path, family)
        # An encoder with projection keeps its `text_projection.weight`.
        ignored = IGNORED_CLIP_SUFFIXES
        if spec.with_projection:
            ignored = tuple(suffix for suffix in IGNORED_CLIP_SUFFIXES if suffix != "text_projection.weight")
        converted[part] = {k: v for k, v in weights.items() if not k.endswith(ignored)}
    return converted


def _raise_unused(unused: list[str], part: str, path: Path, family: ModelFamily) -> None:
    if unused:
        raise ModelLoadError(
            f"{path.name}: {len(unused)} {part} tensor(s) were not converted, e.g. {', '.join(unused[:5])}: "
            f"the file does not match the {family.display_name} architecture."
        )


def _match_prefix(converted: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    # diffusers names CLIP weights `text_model.*` (transformers 4); transformers 5's CLIPTextModel has no
    # `text_model` level, so strip it when the model's own keys lack it.
    if any(k.startswith("text_model.") for k in expected):
        return converted
    return {k.removeprefix("text_model."): v for k, v in converted.items()}


def _check_state_dict(converted: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str, path: Path) -> None:
    missing = [k for k in expected if k not in converted]
    unexpected = [k for k in converted if k not in expected]
    if missing or unexpected:
        raise ModelLoadError(
            f"{path.name}: the {what} weights do not match its configuration: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} ({len(missing)} missing, {len(unexpected)} unexpected)."
        )
    wrong = [(k, tuple(converted[k].shape), tuple(v.shape)) for k, v in expected.items() if converted[k].shape != v.shape]
    if wrong:
        key, got, want = wrong[0]
        raise ModelLoadError(
            f"{path.name}: {len(wrong)} {what} tensor(s) do not have the shape its configuration expects, e.g. {key} "
            f"is {list(got)}, expected {list(want)} (an inpainting or other variant?)."
        )


def _build_model(factory, converted: dict[str, torch.Tensor], what: str, path: Path) -> torch.nn.Module:
    """Build a model without initialising its weights, then put the converted tensors in place."""
    # Random initialisation of an 860M-parameter UNet costs seconds and is overwritten: build on the
    # meta device and assign the loaded tensors instead.
    with torch.device("meta"):
        model = factory()
    expected = model.state_dict()
    converted = _match_prefix(converted, set(expected))
    _check_state_dict(converted, expected, what, path)
    model.load_state_dict(converted, strict=True, assign=True)
    _fill_position_ids(model)
    return model.eval()


def _fill_position_ids(model: torch.nn.Module) -> None:
    # Non-persistent buffers are not in the state dict and stay on the meta device: CLIP's
    # `position_ids` is the only one in these models, and it is simply 0..n-1.
    for name, buffer in list(model.named_buffers()):
        if not buffer.is_meta:
            continue
        if not name.endswith("position_ids"):
            raise RuntimeError(f"buffer {name} was not loaded and cannot be rebuilt")
        owner = model.get_submodule(name.rpartition(".")[0])
        positions = torch.arange(buffer.shape[-1], dtype=torch.int64).expand(buffer.shape)
        owner.register_buffer("position_ids", positions, persistent=False)
