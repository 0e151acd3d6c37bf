"""PivotalLoRALoader: one file per character — a LoRA file with its bundled embedding, applied to MODEL and CLIP."""

import hashlib
from pathlib import Path

from ..pti_ops.files import load_lora, save_embedding, split_bundled
from ..pti_ops.user_warnings import warn_user
from . import bridge
from .common import node_result, node_warnings
from .inputs import NODE_ID, float_input, link

# Where the loader puts the embeddings it takes out of LoRA files, inside ComfyUI's temporary folder.
BUNDLED_FOLDER = "pivotal_bundled_embeddings"


class PivotalLoRALoader:
    """A LoRA file (`bundle_emb.NAME.clip_l` keys beside the LoRA's) → MODEL and CLIP with both applied + the trigger."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": link("MODEL", "The model to apply the LoRA to (a patched clone is returned; the input is not changed)."),
                "clip": link("CLIP", "The CLIP to apply the LoRA's text-encoder part to and to give the bundled embedding "
                    "(a clone is returned: other CLIPs do not know the trigger)."),
                "lora_name": (bridge.lora_file_names(), {"tooltip": "A LoRA file in ComfyUI's loras folder, best one "
                    "written by Pivotal LoRA Tune with bundle_embedding on (or by OneTrainer): its bundled embedding "
                    "becomes usable as the trigger. A file without one is loaded as LoraLoader would."}),
                "strength_model": float_input(1.0, -100.0, 100.0, 0.01, "How strongly the LoRA changes the model "
                    "(1 = as trained)."),
                "strength_clip": float_input(1.0, -100.0, 100.0, 0.01, "How strongly the LoRA changes the CLIP, where "
                    "it has text-encoder weights. The embedding is used as it is."),
            },
            "hidden": NODE_ID,
        }  # fmt: skip

    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model", "clip", "trigger")
    OUTPUT_TOOLTIPS = (
        "The model with the LoRA applied.",
        "The CLIP with the LoRA applied and the bundled embedding known: prompts encoded with it may use the trigger.",
        "embedding:NAME of the bundled embedding(s), for prompt text (PivotalPrompt); empty when the file bundles none.",
    )
    FUNCTION = "load"
    CATEGORY = "pivotal_tuning/loaders"
    DESCRIPTION = (
        "Loads a character from one file: the LoRA part goes onto MODEL and CLIP (as LoraLoader does), the bundled "
        "embedding onto that CLIP only, and the trigger output says how to prompt for it."
    )

    def load(self, model, clip, lora_name, strength_model, strength_clip, unique_id=None):
        path = bridge.lora_file_path(lora_name)
        with node_warnings() as warned:
            lora, embeddings = split_bundled(load_lora(path)[0], str(path))
            model_out, clip_out = (bridge.apply_lora_file(model, clip, lora, strength_model, strength_clip) if lora
                                   else (model.clone(), clip.clone()))  # fmt: skip
            if embeddings:
                clip_out = bridge.clip_with_embedding_folder(clip_out, _write_embeddings(path, embeddings))
            else:
                warn_user(f"Pivotal LoRA Loader: {path.name} bundles no embedding (no bundle_emb.NAME.clip_l key): only "
                          "its LoRA was applied and the trigger is empty.")  # fmt: skip
        trigger = ", ".join(f"embedding:{name}" for name in embeddings)
        return node_result((model_out, clip_out, trigger), warned, unique_id)

    @classmethod
    def IS_CHANGED(cls, lora_name="", **_):
        path = bridge.lora_file_path(lora_name)
        return bridge.hash_files([path]) if path.is_file() else f"missing:{path}"


def _write_embeddings(path: Path, embeddings: dict) -> Path:
    """The bundled embeddings as `NAME.safetensors` files in a folder of their own (by the LoRA file's content)."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    folder = bridge.temp_directory() / BUNDLED_FOLDER / f"{path.stem}-{digest}"
    for name, vectors in embeddings.items():
        save_embedding(folder / f"{name}.safetensors", vectors, metadata={"bundled_in": path.name}, overwrite=True)
    return folder


NODE_CLASS_MAPPINGS = {"PivotalLoRALoader": PivotalLoRALoader}
NODE_DISPLAY_NAME_MAPPINGS = {"PivotalLoRALoader": "Pivotal LoRA Loader"}
