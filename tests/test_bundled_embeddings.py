"""Embeddings bundled into a LoRA file (`bundle_emb.NAME.clip_l`): written, read back, left out of the weights."""

import pytest
import torch
from helpers import kohya_lora
from safetensors.torch import load_file

from pti_ops.errors import InvalidInputError
from pti_ops.files import BUNDLE_PREFIX, bundle_tensors, comfyui_lora_key_map, split_bundled
from pti_ops.files.lora_file import apply_kohya_lora, load_lora, save_lora
from pti_ops.models.tiny_model import build_tiny_bundle

METADATA = {"pivotal.placeholder": "tok1", "pivotal.base_model": "tiny-sd15"}


def test_bundle_and_split_are_inverse():
    vectors = {"clip_l": torch.randn(2, 32)}
    tensors = {**kohya_lora(), **bundle_tensors("tok1", vectors)}
    assert f"{BUNDLE_PREFIX}tok1.clip_l" in tensors
    lora, embeddings = split_bundled(tensors)
    assert not any(key.startswith(BUNDLE_PREFIX) for key in lora) and set(lora) == set(kohya_lora())
    assert torch.equal(embeddings["tok1"]["clip_l"], vectors["clip_l"])


def test_a_bundled_file_holds_the_lora_and_the_embedding(tmp_path):
    lora, vectors = kohya_lora(), torch.randn(1, 32)
    path = save_lora(tmp_path / "char.safetensors", lora, METADATA, embeddings={"tok1": {"clip_l": vectors}})
    saved = load_file(str(path))
    assert torch.equal(saved["bundle_emb.tok1.clip_l"], vectors) and set(saved) == set(lora) | {"bundle_emb.tok1.clip_l"}
    tensors, metadata = load_lora(path)
    assert metadata["pivotal.bundled_embeddings"] == "tok1"
    # The LoRA part is what ComfyUI's LoraLoader maps, every module of it; the bundle key is not a weight.
    unet_modules = [name for name, _ in build_tiny_bundle().unet.named_modules()]
    modules = {key.rsplit(".", 2)[0] for key in split_bundled(tensors)[0] if key.endswith("lora_down.weight")}
    assert modules <= comfyui_lora_key_map(unet_modules, [])
    # As ComfyUI's load_embed picks it from a file in the embeddings folder: the bundle_emb.*.clip_l tensors.
    picked = [value for key, value in saved.items() if key.startswith("bundle_emb.") and key.endswith(".clip_l")]
    assert len(picked) == 1 and torch.equal(picked[0], vectors)
    bundle = build_tiny_bundle()
    assert apply_kohya_lora(bundle.unet, None, tensors) == []


@pytest.mark.parametrize("name, vectors, message", [
    ("tok.1", {"clip_l": torch.zeros(1, 32)}, "may only use letters, digits"),
    ("tok1", {"clip_l": torch.zeros(32)}, r"must be \[n_vectors, dim\]"),
])  # fmt: skip
def test_bad_bundles_are_refused(name, vectors, message):
    with pytest.raises(InvalidInputError, match=message):
        bundle_tensors(name, vectors)


def test_a_damaged_bundle_key_is_named():
    with pytest.raises(InvalidInputError, match="'bundle_emb.clip_l' is not a bundled embedding"):
        split_bundled({"bundle_emb.clip_l": torch.zeros(1, 32)})
