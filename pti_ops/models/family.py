"""What differs between model families, as data: `ModelFamily` and its `TextEncoderSpec`s.

The method's modules never branch on a family name; they read what they need from
`bundle.family`. The descriptions themselves live in `families/` (one module per family) with
the registry `FAMILIES`, `get_family` and `detect_family`.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .conditioning import Conditioning


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family, and where its weights and vectors sit in each layout.

    Args:
        name (`str`): ComfyUI's name for the encoder (`clip.cond_stage_model.clip_l`), which is also
            the key of its vectors in embedding files, as ComfyUI reads them (`clip_l`).
        width (`int`): its token-embedding width in the released models (768 for CLIP-L; the tiny
            test models are narrower), for messages.
        lora_prefix (`str`): kohya LoRA prefix of its modules (`lora_te_`).
        single_file_prefix (`str`): prefix of its weights in a single-file LDM checkpoint.
        comfy_tokenizer (`str`): folder of its BPE files beside ComfyUI's `comfy/sd1_clip.py`.
        pad_token (`str`, *optional*): what its prompts are padded with; None: the end token (CLIP-L).
            SDXL's bigG pads with `!` (id 0), as diffusers' `tokenizer_2` and ComfyUI do.
        with_projection (`bool`): a `CLIPTextModelWithProjection`, whose projected EOS state is the
            pooled embedding of the added conditioning (SDXL's bigG).
        open_clip_layout (`bool`): its single-file weights have OpenCLIP names (`transformer.resblocks.N`,
            fused `in_proj`), not transformers' (`text_model.encoder.layers.N`).
    """

    name: str
    width: int
    lora_prefix: str
    single_file_prefix: str
    comfy_tokenizer: str
    pad_token: str | None = None
    with_projection: bool = False
    open_clip_layout: bool = False

    @property
    def comfy_prefix(self) -> str:
        """Prefix of its weights in ComfyUI's `clip.cond_stage_model` state dict (`clip_l.`)."""
        return self.name + "."

    def lora_name(self, module_name: str) -> str:
        """Kohya module name of a CLIP module, for transformers 4.x and 5.x module names.

        transformers 5.x flattened `CLIPTextModel` (`encoder.layers.0…`), 4.x has `text_model.encoder…`;
        ComfyUI and diffusers both expect the `text_model_` part in the key, so it is added when absent.
        `CLIPTextModelWithProjection`'s `text_projection` sits beside `text_model` (`lora_te2_text_projection`).
        """
        if not module_name.startswith(("text_model.", "text_projection")):
            module_name = "text_model." + module_name
        return self.lora_prefix + module_name.replace(".", "_")


@dataclass(frozen=True, eq=False)
class ModelFamily:
    """Everything the pack needs to know that differs between model families.

    A family compares equal to its name (`bundle.family == "sd15"`), the string written to files.

    Args:
        name (`str`): short name written in file metadata (`model_family`) and given on the command line.
        display_name (`str`): how messages name the family (`SD1.5`).
        text_encoders (`tuple[TextEncoderSpec, ...]`): the text encoders, in conditioning order.
        config_dir (`Path`): the shipped diffusers/transformers configs (`unet_config.json`, …) used for
            single-file checkpoints that carry none.
        latent_scaling_factor (`float`): VAE latent scale, when a source does not say it.
        unet_prefix (`str`): prefix of the UNet weights in a single-file LDM checkpoint.
        vae_prefix (`str`): prefix of the VAE weights there.
        unet_addition_embed_type (`str`, *optional*): the UNet config's `addition_embed_type` for this
            family (None: conditioning on text alone); `detect_family` matches on it.
        lora_unet_prefix (`str`): kohya LoRA prefix of UNet modules (`lora_unet_`).
        unet_lora_module (`Callable[[str, Mapping | None], str]`): (diffusers UNet module name, the UNet's
            diffusers config) → the rest of its kohya name. SD1.5 keeps diffusers' names and ignores the
            config; SDXL's LDM block numbers depend on it (`families/sdxl_lora.py`).
        encode_tokens (`Callable`): `(text_encoder, input_ids [b, tokens], clip_skip) -> [b, tokens, dim]`,
            how one encoder's token ids become its block of the cross-attention conditioning.
        encode_conditioning (`Callable`): `(text_encoders, input_ids, clip_skip) -> Conditioning`, the
            encoders and one id tensor per encoder in family order: all the UNet is conditioned on.
        default_clip_skip (`int`): the layer the family is sampled with when nothing says otherwise
            (`clip_skip` counts as ComfyUI's `CLIPSetLastLayer` -n: 1 = last; SD1.5 1, SDXL 2).
        conditioning_final_norm (`bool`): whether `encode_tokens` passes the layer through the encoder's
            final LayerNorm (SD1.5) or gives the raw hidden state (SDXL), which decides whether the
            conditioning's norms are fixed by construction (norm statistics).
        num_time_ids (`int`): length of the UNet's `add_time_ids` (SDXL 6; 0 = none).
        prediction_markers (`tuple[str, ...]`): top-level single-file keys that flag v-prediction and
            zero terminal SNR (SDXL: `v_pred`, `ztsnr`, as ComfyUI reads them), in that order.
        derive_unet_config (`Callable`, *optional*): `(ldm_state, shipped_config) -> config`, the UNet
            config of a single file from its tensor shapes (SDXL variants); None: the shipped one.
    """

    name: str
    display_name: str
    text_encoders: tuple[TextEncoderSpec, ...]
    config_dir: Path
    latent_scaling_factor: float
    unet_prefix: str
    vae_prefix: str
    unet_addition_embed_type: str | None
    lora_unet_prefix: str
    unet_lora_module: Callable[[str, Mapping | None], str] = field(repr=False)
    encode_tokens: Callable[[torch.nn.Module, torch.Tensor, int], torch.Tensor] = field(repr=False)
    encode_conditioning: Callable[[Sequence[torch.nn.Module], Sequence[torch.Tensor], int], Conditioning] = field(repr=False)
    default_clip_skip: int = 1
    conditioning_final_norm: bool = True
    num_time_ids: int = 0
    prediction_markers: tuple[str, ...] = ()
    derive_unet_config: Callable[[dict, dict], dict] | None = field(default=None, repr=False)

    def __eq__(self, other) -> bool:
        if isinstance(other, ModelFamily):
            return other.name == self.name
        if isinstance(other, str):
            return other == self.name
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.name)

    def __str__(self) -> str:
        return self.name

    @property
    def embedding_keys(self) -> tuple[str, ...]:
        """Keys of an embedding file for this family, one per text encoder (`("clip_l",)`)."""
        return tuple(encoder.name for encoder in self.text_encoders)

    @property
    def text_encoder_parts(self) -> tuple[str, ...]:
        """diffusers names of the text encoders, in family order (`text_encoder`, `text_encoder_2`)."""
        return tuple("text_encoder" if i == 0 else f"text_encoder_{i + 1}" for i in range(len(self.text_encoders)))

    @property
    def config_parts(self) -> tuple[str, ...]:
        """The parts with a shipped config (`unet`, `vae`, the text encoders, `scheduler`)."""
        return ("unet", "vae", *self.text_encoder_parts, "scheduler")

    @property
    def single_file_prefixes(self) -> dict[str, str]:
        """diffusers part name (`unet`, `vae`, `text_encoder`, `text_encoder_2`…) → prefix of its weights in
        a single-file LDM checkpoint."""
        prefixes = {"unet": self.unet_prefix, "vae": self.vae_prefix}
        for part, encoder in zip(self.text_encoder_parts, self.text_encoders):
            prefixes[part] = encoder.single_file_prefix
        return prefixes

    @property
    def lora_prefixes(self) -> tuple[str, ...]:
        """Every kohya module prefix a LoRA of this family uses (UNet first)."""
        return (self.lora_unet_prefix,) + tuple(encoder.lora_prefix for encoder in self.text_encoders)

    def unet_lora_name(self, module_name: str, unet_config: Mapping | None = None) -> str:
        """Kohya module name of a diffusers UNet module (`lora_unet_down_blocks_0_…_to_q` for SD1.5).

        Args:
            module_name (`str`): as `unet.named_modules()` gives it.
            unet_config (`dict`, *optional*): the UNet's diffusers config (`unet.config`), which families that
                rename blocks (SDXL) need.
        """
        return self.lora_unet_prefix + self.unet_lora_module(module_name, unet_config)
