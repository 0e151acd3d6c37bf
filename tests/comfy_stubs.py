"""Stand-ins for ComfyUI's `folder_paths` and `comfy.*` modules, and fake MODEL / CLIP / VAE objects.

The node layer is imported under these stubs with `patch.dict(sys.modules, ...)`, the way
ComfyUI's own unit tests import node modules (tests-unit/comfy_extras_test/). The fakes expose
exactly the attributes the bridge reads from ComfyUI objects, filled with the tiny test model's
weights renamed to ComfyUI's layout (LDM names, `clip_l.` prefix) by `pti_ops.models.ldm_layout`.
The LoRA key map is re-derived by `pti_ops.files.lora_file.comfyui_lora_key_map` (tested against
ComfyUI's rules in test_lora_file.py).
"""

import contextlib
import enum
import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from unittest.mock import patch

import pytest
import torch

from pti_ops.files.comfy_lora_keys import comfyui_sdxl_lora_key_map
from pti_ops.files.lora_file import comfyui_lora_key_map
from pti_ops.models.clip_vocab import write_clip_vocab
from pti_ops.models.ldm_layout import unet_to_ldm, vae_to_ldm
from pti_ops.models.tiny_model import TINY_WORDS, build_tiny_bundle

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "pivotal_tuning_pack"


class InterruptProcessingException(Exception):
    """ComfyUI's Cancel exception (comfy.model_management)."""


@dataclass
class StubState:
    """What the stubs recorded, and switches the tests set."""

    folders: dict[str, Path]
    progress: list[tuple[int, int]] = field(default_factory=list)
    previews: list = field(default_factory=list)  # (step, preview tuple) given to the progress bar
    progress_bars: int = 0
    interrupt_at_step: int | None = None  # raise InterruptProcessingException at this progress value
    unloads: int = 0
    not_loaded: list = field(default_factory=list)  # keys load_lora_for_models would log "NOT LOADED"
    node_texts: list = field(default_factory=list)  # (node id, text) sent with PromptServer.send_progress_text


# ---------------------------------------------------------------------------------------------
# Fake ComfyUI objects
# ---------------------------------------------------------------------------------------------


class ModelType(enum.Enum):
    EPS = 1
    V_PREDICTION = 2


# comfy/model_sampling.py: the prediction types (each defines `calculate_denoised`) and the discrete schedule.
class EPS:
    def calculate_denoised(self, sigma, model_output, model_input):
        return model_input - model_output * sigma


class V_PREDICTION(EPS):
    def calculate_denoised(self, sigma, model_output, model_input):
        return model_input * 1.0 / (sigma**2 + 1.0) - model_output * sigma / (sigma**2 + 1.0) ** 0.5


class X0(EPS):
    def calculate_denoised(self, sigma, model_output, model_input):
        return model_output


class ModelSamplingDiscrete(torch.nn.Module):
    def __init__(self, model_config=None, zsnr=None):
        super().__init__()
        self.zsnr = bool(zsnr)


class ModelSamplingContinuousEDM(torch.nn.Module):
    def __init__(self, model_config=None, zsnr=None):
        super().__init__()


def model_sampling(prediction: type = EPS, zsnr: bool = False, base: type = ModelSamplingDiscrete):
    """A model_sampling object as ComfyUI builds one (model_base.model_sampling, ModelSamplingDiscrete's node:
    `class ModelSamplingAdvanced(sampling_base, sampling_type)`)."""
    return type("ModelSamplingAdvanced", (base, prediction), {})(None, zsnr=zsnr)


class FakePatcher:
    """The parts of comfy.model_patcher.ModelPatcher the bridge and LoRA stubs use."""

    def __init__(self, weights: dict[str, torch.Tensor], model=None):
        self.weights = weights  # shared between clones, like ModelPatcher.model
        self.model = model
        self.patches: dict[str, list] = {}
        self.object_patches: dict[str, object] = {}

    def clone(self):
        other = self.__class__(self.weights, self.model)
        other.patches = {k: list(v) for k, v in self.patches.items()}
        other.object_patches = dict(self.object_patches)
        return other

    def add_object_patch(self, name, obj):
        self.object_patches[name] = obj

    def get_model_object(self, name):
        return self.object_patches[name] if name in self.object_patches else getattr(self.model, name)

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        added = []
        for key, patch_value in patches.items():
            if key in self.weights:
                self.patches.setdefault(key, []).append((strength_patch, patch_value, strength_model, None, None))
                added.append(key)
        return added

    def get_key_patches(self, filter_prefix=None):
        identity = lambda weight, **kwargs: weight  # noqa: E731
        return {
            key: [(weight, identity)] + self.patches.get(key, [])
            for key, weight in self.weights.items()
            if filter_prefix is None or key.startswith(filter_prefix)
        }


class SD15:
    """Named like ComfyUI's supported_models.SD15 (the bridge records the class name)."""

    def __init__(self, unet_config: dict):
        self.unet_config = unet_config


class SDXL(SD15):
    """Named like ComfyUI's supported_models.SDXL."""


class FakeModel(FakePatcher):
    """MODEL: a patcher whose `.model` has the config, latent format and prediction type."""

    def __init__(self, weights, model):
        super().__init__(weights, model)


class FakeCLIP:
    """CLIP: `cond_stage_model.clip_l…`, a patcher over its weights, `layer_idx`, `clone`."""

    def __init__(self, patcher: FakePatcher, cond_stage_model, layer_idx=None, tokenizer=None):
        self.patcher = patcher
        self.cond_stage_model = cond_stage_model
        self.layer_idx = layer_idx
        # ComfyUI's SD1Tokenizer / SDXLTokenizer: one SDTokenizer per encoder, each searching `embedding_directory`
        # for embedding:NAME.
        if tokenizer is None:
            names = [name for name in ("clip_l", "clip_g") if hasattr(cond_stage_model, name)]
            tokenizer = types.SimpleNamespace(**{name: types.SimpleNamespace(embedding_directory=[]) for name in names})
            if names == ["clip_l"]:
                tokenizer.clip_name = "l"
        self.tokenizer = tokenizer

    def clone(self):
        return FakeCLIP(self.patcher.clone(), self.cond_stage_model, self.layer_idx, self.tokenizer)  # the tokenizer is shared

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return self.patcher.add_patches(patches, strength_patch, strength_model)


class FakeVAE:
    def __init__(self, weights):
        self.first_stage_model = types.SimpleNamespace(state_dict=lambda: dict(weights))
        self.patcher = FakePatcher(weights)


def comfy_unet_config(config: dict) -> dict:
    """ComfyUI's detected `unet_config` for a diffusers UNet config (the shape model_detection gives)."""
    base = config["block_out_channels"][0]
    r = config["layers_per_block"]
    down = [1 if "CrossAttn" in t else 0 for t in config["down_block_types"]]
    up = [1 if "CrossAttn" in t else 0 for t in config["up_block_types"]]
    return {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": config["in_channels"], "out_channels": config["out_channels"],
        "model_channels": base, "num_res_blocks": [r] * len(down),
        "transformer_depth": [d for d in down for _ in range(r)],
        "transformer_depth_output": [d for d in up for _ in range(r + 1)][::-1],  # last output block first
        "channel_mult": [c // base for c in config["block_out_channels"]], "transformer_depth_middle": 1,
        "use_linear_in_transformer": bool(config["use_linear_projection"]), "context_dim": config["cross_attention_dim"],
        "use_temporal_resblock": False, "use_temporal_attention": False,
        "num_heads": config["attention_head_dim"], "num_head_channels": -1, "dtype": torch.float32,
    }  # fmt: skip


def comfy_clip_weights(name: str, encoder) -> dict[str, torch.Tensor]:
    """A text encoder's weights as ComfyUI's CLIP holds them: `NAME.transformer.text_model.*` in transformers'
    names (bigG too), a `text_projection` (CLIP-L's unused, as ComfyUI always builds one), `NAME.logit_scale`,
    no position-ids buffer."""
    out = {}
    for key, value in encoder.state_dict().items():
        if key.endswith("position_ids"):
            continue
        key = key if key.startswith(("text_model.", "text_projection")) else "text_model." + key
        out[f"{name}.transformer.{key}"] = value.clone()
    out.setdefault(f"{name}.transformer.text_projection.weight", torch.eye(encoder.config.hidden_size))
    out[f"{name}.logit_scale"] = torch.tensor(4.6055)
    return out


def _encoder_module(encoder):
    layer = types.SimpleNamespace(self_attn=types.SimpleNamespace(heads=encoder.config.num_attention_heads))
    text_model = types.SimpleNamespace(encoder=types.SimpleNamespace(layers=[layer]))
    return types.SimpleNamespace(transformer=types.SimpleNamespace(text_model=text_model))


def _lora_key_maps(bundle) -> tuple[set[str], set[str]]:
    """(UNet keys, CLIP keys) ComfyUI's `model_lora_keys_unet` / `_clip` give for the bundle's models."""
    unet_modules = [name for name, _ in bundle.unet.named_modules()]
    encoder_modules = [[name for name, _ in encoder.named_modules()] for encoder in bundle.text_encoders]
    if len(encoder_modules) == 1:
        return set(comfyui_lora_key_map(unet_modules, [])), set(comfyui_lora_key_map([], encoder_modules[0]))
    every = comfyui_sdxl_lora_key_map(unet_modules, *encoder_modules)
    clip = {key for key in every if key.startswith(("lora_te", "lora_prior_te", "text_encoder"))}
    return every - clip, clip


def fake_comfy_models(bundle=None, prediction: type = EPS, zsnr: bool = False):
    """`(MODEL, CLIP, VAE)` fakes holding `bundle`'s weights (default: the tiny model) in ComfyUI's layout.

    An SD1.5 bundle gives ComfyUI's SD15 objects, an SDXL one its SDXL objects (`clip_l` + `clip_g`); the
    MODEL samples with `prediction` (EPS, V_PREDICTION) and `zsnr`, as a checkpoint's own sampling.
    """
    bundle = bundle or build_tiny_bundle()
    family = bundle.family
    unet_config = dict(bundle.unet.config)
    ldm_unet = unet_to_ldm(bundle.unet.state_dict(), unet_config, family)
    unet = {k.removeprefix("model."): v.clone() for k, v in ldm_unet.items()}
    unet_keys, clip_keys = _lora_key_maps(bundle)
    model_class = SDXL if len(bundle.text_encoders) > 1 else SD15
    comfy_config = comfy_unet_config(unet_config)
    if len(bundle.text_encoders) > 1:
        comfy_config.update(adm_in_channels=unet_config["projection_class_embeddings_input_dim"], num_heads=-1, num_head_channels=64)
    base_model = types.SimpleNamespace(
        model_config=model_class(comfy_config),
        latent_format=types.SimpleNamespace(scale_factor=bundle.vae.config.scaling_factor),
        model_type=ModelType[prediction.__name__],
        model_sampling=model_sampling(prediction, zsnr),
        lora_keys=unet_keys,
    )
    model = FakeModel(unet, base_model)

    clip_weights, encoders = {}, {}
    for spec, encoder in zip(family.text_encoders, bundle.text_encoders):
        clip_weights.update(comfy_clip_weights(spec.name, encoder))
        encoders[spec.name] = _encoder_module(encoder)
    cond_stage_model = types.SimpleNamespace(**encoders, lora_keys=clip_keys)
    clip = FakeCLIP(FakePatcher(clip_weights, cond_stage_model), cond_stage_model)

    vae_state = vae_to_ldm(bundle.vae.state_dict(), dict(bundle.vae.config), family)
    vae = {k.removeprefix(family.vae_prefix): v.clone() for k, v in vae_state.items()}
    return model, clip, FakeVAE(vae)


# ---------------------------------------------------------------------------------------------
# Stub modules
# ---------------------------------------------------------------------------------------------


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def make_stub_modules(state: StubState, tokenizer_root: Path) -> dict[str, types.ModuleType]:
    """`folder_paths` and `comfy.{utils,model_management,sd,lora,sd1_clip}` recording into `state`."""

    def get_folder_paths(name):
        return [str(state.folders[name])]

    def get_filename_list(name):
        return sorted(p.name for p in state.folders[name].iterdir() if p.is_file())

    def get_full_path(name, filename):
        path = state.folders[name] / filename
        return str(path) if path.is_file() else None

    folder_paths = _module(
        "folder_paths",
        get_folder_paths=get_folder_paths,
        get_filename_list=get_filename_list,
        get_full_path=get_full_path,
        get_input_directory=lambda: str(state.folders["input"]),
        get_temp_directory=lambda: str(state.folders["temp"]),
        get_output_directory=lambda: str(state.folders["output"]),
    )

    def throw_exception_if_processing_interrupted():
        pass  # the progress bar raises at `interrupt_at_step`, as ComfyUI's progress hook does

    def unload_all_models():
        state.unloads += 1

    model_management = _module(
        "comfy.model_management",
        InterruptProcessingException=InterruptProcessingException,
        get_torch_device=lambda: torch.device("cpu"),
        unload_all_models=unload_all_models,
        soft_empty_cache=lambda force=False: None,
        throw_exception_if_processing_interrupted=throw_exception_if_processing_interrupted,
    )

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.current = total, 0
            state.progress_bars += 1

        def update_absolute(self, value, total=None, preview=None):
            if total is not None:
                self.total = total
            self.current = min(value, self.total)
            if state.interrupt_at_step is not None and value >= state.interrupt_at_step:
                raise InterruptProcessingException()
            state.progress.append((self.current, self.total))
            if preview is not None:
                state.previews.append((self.current, preview))

        def update(self, value):
            self.update_absolute(self.current + value)

    utils = _module("comfy.utils", ProgressBar=ProgressBar)

    def model_lora_keys_unet(model, key_map=None):
        key_map = {} if key_map is None else key_map
        key_map.update({key: key for key in model.lora_keys})
        return key_map

    def model_lora_keys_clip(model, key_map=None):
        key_map = {} if key_map is None else key_map
        key_map.update({key: key for key in model.lora_keys})
        return key_map

    def calculate_weight(patches, weight, key, intermediate_dtype=torch.float32):
        # Only the "diff" patch type: weight + strength · diff (enough to test that patches are applied).
        for strength, value, strength_model, _, _ in patches:
            kind, (diff,) = value
            assert kind == "diff", kind
            weight = weight * strength_model + strength * diff.to(weight)
        return weight

    lora = _module(
        "comfy.lora",
        model_lora_keys_unet=model_lora_keys_unet,
        model_lora_keys_clip=model_lora_keys_clip,
        calculate_weight=calculate_weight,
    )

    def load_lora_for_models(model, clip, lora_sd, strength_model, strength_clip):
        modules = {key.rsplit(".", 2)[0] if key.endswith("weight") else key.rsplit(".", 1)[0] for key in lora_sd}
        unet_keys = model_lora_keys_unet(model.model) if model is not None else {}
        clip_keys = model_lora_keys_clip(clip.cond_stage_model) if clip is not None else {}
        state.not_loaded.extend(sorted(m for m in modules if m not in unet_keys and m not in clip_keys))
        new_model = model.clone() if model is not None else None
        new_clip = clip.clone() if clip is not None else None
        if new_model is not None:
            new_model.patches.setdefault("lora", []).extend(("lora", m, strength_model) for m in sorted(modules & set(unet_keys)))
        if new_clip is not None:
            new_clip.patcher.patches.setdefault("lora", []).extend(("lora", m, strength_clip) for m in sorted(modules & set(clip_keys)))
        return new_model, new_clip

    sd = _module("comfy.sd", load_lora_for_models=load_lora_for_models)
    sd1_clip = _module("comfy.sd1_clip", __file__=str(tokenizer_root / "sd1_clip.py"))
    comfy = _module("comfy", __path__=[], utils=utils, model_management=model_management, sd=sd, lora=lora, sd1_clip=sd1_clip)

    class PromptServer:
        instance = None

        def send_progress_text(self, text, node_id, sid=None):
            state.node_texts.append((node_id, text))

    PromptServer.instance = PromptServer()
    server = _module("server", PromptServer=PromptServer)
    return {
        "server": server,
        "folder_paths": folder_paths,
        "comfy": comfy,
        "comfy.utils": utils,
        "comfy.model_management": model_management,
        "comfy.sd": sd,
        "comfy.lora": lora,
        "comfy.sd1_clip": sd1_clip,
    }


def make_folders(root: Path) -> dict[str, Path]:
    folders = {name: root / name for name in ("embeddings", "loras", "input", "output", "temp", "comfy")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    # ComfyUI ships CLIP's vocabulary in comfy/sd1_tokenizer/; the stub ships the tiny model's.
    write_clip_vocab(folders["comfy"] / "sd1_tokenizer", list(TINY_WORDS))
    return folders


def load_pack(name: str = PACK_NAME) -> types.ModuleType:
    """Import the repository root as a package named `name`, as ComfyUI imports a custom node folder."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def comfy_pack(root: Path, name: str = PACK_NAME, extra_modules: dict | None = None):
    """Yield `(pack, state)`: the pack imported under stub ComfyUI modules, and what they record.

    Args:
        root (`Path`): folder for the stub ComfyUI folders (models, input, temp, tokenizer).
        name (`str`): package name to import the pack under.
        extra_modules (`dict`, *optional*): more `sys.modules` entries (None hides a package).
    """
    state = StubState(make_folders(root))
    stubs = make_stub_modules(state, state.folders["comfy"])
    with patch.dict(sys.modules, {**stubs, **(extra_modules or {})}):
        yield load_pack(name), state


def run_node(cls, **inputs):
    """Run a node's FUNCTION the way ComfyUI does: a fresh instance, inside `torch.inference_mode()`; its outputs."""
    return run_node_with_ui(cls, **inputs)[0]


def run_node_with_ui(cls, **inputs):
    """`(outputs, ui)`: a node's outputs and the UI part of its answer (None when it returned a plain tuple)."""
    with torch.inference_mode():
        answer = getattr(cls(), cls.FUNCTION)(**inputs)
    if isinstance(answer, dict):  # ComfyUI's {"ui": ..., "result": ...}
        return answer["result"], answer.get("ui")
    return answer, None


# ---------------------------------------------------------------------------------------------
# pytest fixtures (import them into a test module to use them)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def comfy_env(tmp_path_factory):
    """`(nodes, state)`: the pack's node classes by id under stub ComfyUI modules, and the stubs' record."""
    with comfy_pack(tmp_path_factory.mktemp("comfy")) as (pack, state):
        yield pack.nodes.NODE_CLASS_MAPPINGS, state


@pytest.fixture
def nodes(comfy_env):
    """The node classes by id, with the stubs' record and the output folders emptied for this test."""
    mappings, state = comfy_env
    state.progress.clear()
    state.not_loaded.clear()
    state.progress_bars = state.unloads = 0
    state.interrupt_at_step = None
    for name in ("embeddings", "loras"):
        for path in state.folders[name].iterdir():
            path.unlink()
    return mappings


@pytest.fixture(scope="module")
def fake_models():
    """`(MODEL, CLIP, VAE)` fakes over the tiny model's weights."""
    return fake_comfy_models(build_tiny_bundle())
