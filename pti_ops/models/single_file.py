"""Load a single-file SD1.5 checkpoint (original LDM layout, `.safetensors`) as a `ModelBundle`.

The tensors are read with `safetensors.safe_open` (no pickle), upcast to float32 and converted
with diffusers' own LDM → diffusers functions (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`), none of which touches the network.
The key prefixes and the shipped configs are the model family's (`single_file_prefixes`, and
`config_dir`: `models/configs/sd15/` for SD1.5); files written by `ldm_layout.save_ldm_checkpoint`
(e.g. the tiny model) carry their own configs in their metadata.
Every tensor is accounted for: a file key the conversion did not use, or a model weight the file
lacks, is an error that names it.

The tokenizer is not in a checkpoint: SD1.5 needs CLIP's BPE vocabulary (`vocab.json` +
`merges.txt`, 49,408 tokens). It is looked for, in this order:
  (a) the `tokenizer_dir` argument: a folder with `vocab.json` + `merges.txt` (a diffusers
      `tokenizer/` folder, ComfyUI's `comfy/sd1_tokenizer/`), or a transformers `tokenizer.json`;
  (b) a `tokenizer/` folder next to the checkpoint;
  (c) the checkpoint's own metadata (small vocabularies written by `save_ldm_checkpoint`);
  (d) the BPE file of the optional pip packages `clip-anytorch` (module `clip`) or `open_clip_torch`
      (module `open_clip`), turned into `vocab.json` + `merges.txt` as OpenAI's `simple_tokenizer.py`
      does and cached in the temp folder;
otherwise `MissingModelFileError` names the missing files and these ways to supply them.
"""

import gzip
import hashlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from safetensors import SafetensorError, safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .bundle import ModelBundle
from .clip_vocab import BOS_TOKEN, END_OF_WORD, EOS_TOKEN, bytes_to_unicode
from ..errors import MissingModelFileError, ModelLoadError
from ..safe_write import atomic_write
from .families import DEFAULT_FAMILY, FAMILIES, detect_family
from .family import ModelFamily
from .ldm_layout import META_ADDED_TOKENS, META_CONFIG_KEYS, META_MERGES, META_PREFIX, META_VOCAB

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

# OpenAI CLIP's BPE: 49,152 vocabulary entries minus the 256 + 256 byte symbols (with and without
# `</w>`) leaves 48,894 merges; the two special tokens bring the vocabulary to 49,408.
NUM_CLIP_MERGES = 49152 - 256 - 2
CLIP_VOCAB_SIZE = 49408
OPENAI_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
TOKENIZER_KWARGS = dict(unk_token=EOS_TOKEN, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


def load_single_file(path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None) -> ModelBundle:
    """Build a `ModelBundle` from an SD1.5 single-file `.safetensors` checkpoint.

    Args:
        path (`str`): the checkpoint file.
        tokenizer_dir (`str`, *optional*): folder with CLIP's `vocab.json` + `merges.txt`; see the
            module docstring for where the tokenizer is looked for without it.
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
    configs = load_configs(metadata, family)
    text_config = CLIPTextConfig.from_dict(configs["text_encoder"])
    # The tokenizer is the part most likely to be missing: look for it before the costly conversion.
    tokenizer = resolve_tokenizer(path, metadata, tokenizer_dir, text_config.max_position_embeddings)
    name = metadata.get(META_PREFIX + "name", path.stem)
    return bundle_from_ldm_state(state, configs, tokenizer, name=name, source=str(path), where=path, family=family)


def bundle_from_ldm_state(
    state: dict[str, torch.Tensor],
    configs: dict[str, dict],
    tokenizer: CLIPTokenizer,
    name: str,
    source: str,
    where: Path,
    family: ModelFamily = DEFAULT_FAMILY,
) -> ModelBundle:
    """Build a `ModelBundle` from an LDM-layout state dict, the parts' configs and a tokenizer.

    Used for checkpoint files and for the weights of models already loaded elsewhere (ComfyUI's
    MODEL/CLIP/VAE, renamed to the LDM layout by `comfy_layout.py`).

    Args:
        state (`dict`): float32 tensors under `model.diffusion_model.*`, `first_stage_model.*` and
            `cond_stage_model.transformer.*` for SD1.5 (checked by `check_layout`).
        configs (`dict`): diffusers/transformers configs of `unet`, `vae`, `text_encoder`, `scheduler`.
        tokenizer (`CLIPTokenizer`): the text encoder's tokenizer.
        name (`str`): base model name recorded in the files written from the bundle.
        source (`str`): where the weights came from.
        where (`Path`): what error messages name (`where.name`): the file, or the connected models.
        family (`ModelFamily`): the family whose layout `state` has.
    """
    text_config = CLIPTextConfig.from_dict(configs["text_encoder"])
    _check_tokenizer_fits(tokenizer, text_config.vocab_size, where)
    converted = convert_to_diffusers(state, configs, where, family)
    unet = _build_model(lambda: UNet2DConditionModel.from_config(configs["unet"]), converted["unet"], "UNet", where)
    vae = _build_model(lambda: AutoencoderKL.from_config(configs["vae"]), converted["vae"], "VAE", where)
    text_encoder = _build_model(lambda: CLIPTextModel(text_config), converted["text_encoder"], "text encoder", where)
    scheduler = DDPMScheduler.from_config(configs["scheduler"])
    family = detect_family(text_encoder, unet)
    return ModelBundle(tokenizer, text_encoder, unet, vae, scheduler, family=family, name=name, source=source)


def text_encoder_from_ldm_state(state: dict[str, torch.Tensor], text_config: dict, where: Path) -> CLIPTextModel:
    """The CLIP text encoder alone, from `cond_stage_model.transformer.*` tensors (for measurements).

    Args:
        state (`dict`): float32 tensors in the LDM layout (other parts are ignored).
        text_config (`dict`): the `CLIPTextConfig` as a dict.
        where (`Path`): what error messages name (`where.name`).
    """
    converted = {k: v for k, v in convert_ldm_clip_checkpoint(state).items() if not k.endswith(IGNORED_CLIP_SUFFIXES)}
    return _build_model(lambda: CLIPTextModel(CLIPTextConfig.from_dict(text_config)), converted, "text encoder", where)


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
    """The family whose single-file prefixes all occur among the keys; the default family when none does
    (its `check_layout` then says what the file looks like)."""
    for family in FAMILIES.values():
        if all(any(key.startswith(prefix) for key in state) for prefix in family.single_file_prefixes.values()):
            return family
    return DEFAULT_FAMILY


def _describe_unsupported(keys: list[str], family: ModelFamily) -> str | None:
    """What a file outside the family's layout looks like, from its keys (None when it has that layout)."""
    if not keys:
        return "an empty file (no tensors)"
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "an SDXL checkpoint (`conditioner.embedders.*` text encoders)"
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


def check_layout(state: dict[str, torch.Tensor], path: Path, family: ModelFamily = DEFAULT_FAMILY) -> None:
    """Raise `ModelLoadError` unless the keys are those of a single-file LDM checkpoint of `family`.

    Args:
        state (`dict`): the file's tensors by key.
        path (`Path`): the file, for the message.
        family (`ModelFamily`): the family whose layout is expected.
    """
    prefixes = family.single_file_prefixes
    what = _describe_unsupported(list(state), family)
    if what is not None:
        raise ModelLoadError(
            f"unsupported model: {path.name} looks like {what}; only {family.display_name} single-file checkpoints "
            f"are supported (with UNet `{prefixes['unet']}*`, text encoder `{prefixes['text_encoder']}*` and VAE "
            f"`{prefixes['vae']}*`)."
        )
    parts = tuple(prefixes.values())
    unknown = [k for k in state if not k.startswith(parts + IGNORED_PREFIXES) and k not in IGNORED_KEYS]
    if unknown:
        raise ModelLoadError(
            f"{path.name} has {len(unknown)} tensor(s) outside the {family.display_name} layout, e.g. "
            f"{', '.join(unknown[:5])}: it is not a plain {family.display_name} checkpoint (merged extras are not "
            "supported)."
        )


def _read_config(name: str, family: ModelFamily = DEFAULT_FAMILY) -> dict:
    return json.loads((family.config_dir / name).read_text(encoding="utf-8"))


def load_configs(metadata: dict[str, str], family: ModelFamily = DEFAULT_FAMILY) -> dict[str, dict]:
    """diffusers/transformers configs of the four parts: the file's own (our files) or the family's shipped ones.

    Args:
        metadata (`dict`): the checkpoint's safetensors metadata.
        family (`ModelFamily`): whose shipped configs fill in what the metadata lacks.
    """
    configs = {}
    for part, key in META_CONFIG_KEYS.items():
        try:
            configs[part] = json.loads(metadata[key]) if key in metadata else _read_config(f"{part}_config.json", family)
        except json.JSONDecodeError as err:
            raise ModelLoadError(f"the checkpoint's metadata entry {key} is not valid JSON: {err}") from err
    return configs


def _unused_keys(state: dict[str, torch.Tensor], prefix: str, converted: dict[str, torch.Tensor]) -> list[str]:
    # The converters rename tensors and at most take views of them (1x1 conv -> linear), so a source
    # tensor was used exactly when its storage appears among the converted tensors.
    used = {t.data_ptr() for t in converted.values()}
    return [k for k, t in state.items() if k.startswith(prefix) and t.data_ptr() not in used]


def convert_to_diffusers(
    state: dict[str, torch.Tensor], configs: dict[str, dict], path: Path, family: ModelFamily = DEFAULT_FAMILY
) -> dict[str, dict]:
    """LDM state dict -> diffusers state dicts of `unet`, `vae`, `text_encoder`, with diffusers' converters.

    Args:
        state (`dict`): the checkpoint's tensors (checked by `check_layout`).
        configs (`dict`): the parts' configs (`load_configs`).
        path (`Path`): the file, for messages.
        family (`ModelFamily`): gives the parts' prefixes.
    """
    converted = {
        "unet": convert_ldm_unet_checkpoint(state, configs["unet"]),
        "vae": convert_ldm_vae_checkpoint(state, configs["vae"]),
        "text_encoder": convert_ldm_clip_checkpoint(state),
    }
    for part, prefix in family.single_file_prefixes.items():
        unused = _unused_keys(state, prefix, converted[part])
        if unused:
            raise ModelLoadError(
                f"{path.name}: {len(unused)} {part} tensor(s) were not converted, e.g. {', '.join(unused[:5])}: "
                f"the file does not match the {family.display_name} architecture."
            )
    clip = {k: v for k, v in converted["text_encoder"].items() if not k.endswith(IGNORED_CLIP_SUFFIXES)}
    converted["text_encoder"] = clip
    return converted


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
            f"is {list(got)}, expected {list(want)} (an inpainting or other variant of SD1.5?)."
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


# ---------------------------------------------------------------- tokenizer


def resolve_tokenizer(
    path: Path, metadata: dict[str, str], tokenizer_dir: str | os.PathLike | None, model_max_length: int
) -> CLIPTokenizer:
    """The checkpoint's CLIP tokenizer, found as the module docstring describes.

    Args:
        path (`Path`): the checkpoint (a `tokenizer/` folder beside it is used).
        metadata (`dict`): its metadata (small vocabularies and added tokens of our own files).
        tokenizer_dir (`str`, *optional*): folder given by the user; it must hold the files.
        model_max_length (`int`): prompt length in tokens (77).
    """
    if tokenizer_dir is not None:
        tokenizer = tokenizer_from_folder(Path(tokenizer_dir), model_max_length)
    elif (path.parent / "tokenizer").is_dir():
        tokenizer = tokenizer_from_folder(path.parent / "tokenizer", model_max_length)
    elif META_VOCAB in metadata and META_MERGES in metadata:
        tokenizer = _tokenizer_from_metadata(metadata, model_max_length)
    elif (bpe_file := find_openai_bpe_file()) is not None:
        tokenizer = tokenizer_from_folder(openai_tokenizer_folder(bpe_file), model_max_length)
    else:
        raise MissingModelFileError(
            f"the CLIP tokenizer files vocab.json and merges.txt for {path.name} were not found (a checkpoint "
            "does not contain them). Supply them in one of three ways: give `tokenizer_dir` (a folder with "
            "vocab.json + merges.txt, e.g. a diffusers model's tokenizer/ folder or ComfyUI's comfy/sd1_tokenizer/); "
            f"put a tokenizer/ folder with them next to the checkpoint ({path.parent / 'tokenizer'}); or "
            "`pip install clip-anytorch` (or open_clip_torch), whose BPE file is converted automatically."
        )
    _add_stored_tokens(tokenizer, metadata, path)
    return tokenizer


def tokenizer_from_folder(folder: Path, model_max_length: int) -> CLIPTokenizer:
    has_bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not has_bpe and not (folder / "tokenizer.json").is_file():
        missing = [name for name in ("vocab.json", "merges.txt") if not (folder / name).is_file()]
        raise MissingModelFileError(
            f"tokenizer folder {folder} lacks {' and '.join(missing)}: it needs CLIP's vocab.json and merges.txt "
            "(as in a diffusers model's tokenizer/ folder or ComfyUI's comfy/sd1_tokenizer/)."
        )
    try:
        return CLIPTokenizer.from_pretrained(
            folder, local_files_only=True, model_max_length=model_max_length, **TOKENIZER_KWARGS
        )
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load the CLIP tokenizer in {folder}: {err}") from err


def _tokenizer_from_metadata(metadata: dict[str, str], model_max_length: int) -> CLIPTokenizer:
    vocab, merges = json.loads(metadata[META_VOCAB]), json.loads(metadata[META_MERGES])
    # `from_pretrained` on written files is the one construction path transformers 4.x and 5.x share.
    with tempfile.TemporaryDirectory() as folder:
        write_vocab_files(Path(folder), vocab, merges)
        return tokenizer_from_folder(Path(folder), model_max_length)


def _add_stored_tokens(tokenizer: CLIPTokenizer, metadata: dict[str, str], path: Path) -> None:
    """Re-add the placeholder tokens our writer recorded, checking they get their original ids."""
    if META_ADDED_TOKENS not in metadata:
        return
    added = json.loads(metadata[META_ADDED_TOKENS])
    tokenizer.add_tokens([content for _, content in added])
    wrong = [(content, i) for i, content in added if tokenizer.convert_tokens_to_ids(content) != i]
    if wrong:
        raise ModelLoadError(
            f"{path.name}: the added token(s) {wrong[:3]} do not get their original ids with this tokenizer: "
            "the tokenizer files do not belong to this checkpoint."
        )


def _check_tokenizer_fits(tokenizer: CLIPTokenizer, vocab_size: int, path: Path) -> None:
    if len(tokenizer) != vocab_size:
        raise ModelLoadError(
            f"{path.name}: the tokenizer has {len(tokenizer)} tokens but the text encoder has {vocab_size} "
            "embedding rows: the tokenizer files belong to another model."
        )


def write_vocab_files(folder: Path, vocab: dict[str, int], merges: list[str]) -> None:
    """Write `vocab.json` and `merges.txt` (with the `#version` header transformers expects) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab_text = json.dumps(vocab, ensure_ascii=False)
    merges_text = "#version: 0.2\n" + "\n".join(merges) + "\n"
    # Replacing is safe: the files are a pure function of the inputs; atomic so concurrent readers never see half.
    atomic_write(folder / "vocab.json", lambda tmp: Path(tmp).write_text(vocab_text, encoding="utf-8"), overwrite=True)
    atomic_write(folder / "merges.txt", lambda tmp: Path(tmp).write_text(merges_text, encoding="utf-8"), overwrite=True)


def find_openai_bpe_file() -> Path | None:
    """OpenAI's `bpe_simple_vocab_16e6.txt.gz` from the `clip` or `open_clip` package, if installed."""
    for module in ("clip", "open_clip"):
        # find_spec locates the package without importing it (and its torchvision dependency).
        spec = importlib.util.find_spec(module)
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(location) / OPENAI_BPE_FILE
            if candidate.is_file():
                return candidate
    return None


def build_openai_clip_vocab(bpe_file: str | os.PathLike, num_merges: int = NUM_CLIP_MERGES) -> tuple[dict[str, int], list[str]]:
    """CLIP's `vocab.json` / `merges.txt` content from OpenAI's gzipped BPE file, as `simple_tokenizer.py` builds it.

    Args:
        bpe_file (`str`): path of `bpe_simple_vocab_16e6.txt.gz` (a header line, then one merge per line).
        num_merges (`int`): merges to keep after the header (48,894 for CLIP).

    Returns:
        `(vocab, merges)`: token -> id, and the `"left right"` merges in priority order.
    """
    with gzip.open(bpe_file, "rt", encoding="utf-8") as file:
        lines = file.read().split("\n")
    merges = lines[1 : num_merges + 1]
    if len(merges) < num_merges or any(len(m.split()) != 2 for m in merges):
        raise ModelLoadError(f"{bpe_file} does not hold {num_merges} BPE merges after its header line.")
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m.split()) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, merges


def openai_tokenizer_folder(bpe_file: Path) -> Path:
    """A cached folder with CLIP's `vocab.json` + `merges.txt` built from `bpe_file` (built on first use)."""
    digest = hashlib.sha256(bpe_file.read_bytes()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"pti_ops_clip_tokenizer_{digest}"
    if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        vocab, merges = build_openai_clip_vocab(bpe_file)
        if len(vocab) != CLIP_VOCAB_SIZE:
            raise ModelLoadError(f"{bpe_file} gives {len(vocab)} tokens, not CLIP's {CLIP_VOCAB_SIZE}.")
        write_vocab_files(folder, vocab, merges)
    return folder
