import pickle

import pytest
import torch
from safetensors import safe_open

from pti_ops.files.embedding_file import load_embedding, save_embedding
from pti_ops.errors import InvalidInputError, OutputExistsError
from pti_ops.placeholder import add_placeholder


def test_file_round_trips_bit_exactly_with_metadata(tmp_path):
    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    path = save_embedding(tmp_path / "tok1.safetensors", vectors, metadata={"placeholder": "tok1", "lr": 0.005})
    with safe_open(str(path), framework="pt") as f:
        assert list(f.keys()) == ["clip_l"]
        stored = f.get_tensor("clip_l")
        meta = f.metadata()
    assert stored.dtype == torch.float32 and stored.is_contiguous() and stored.shape == (3, 32)
    assert meta["placeholder"] == "tok1" and meta["lr"] == "0.005" and meta["model_family"] == "sd15"
    loaded = load_embedding(path)
    assert torch.equal(loaded.vectors["clip_l"], vectors)
    assert torch.equal(loaded.for_family("sd15", 32), vectors)
    assert loaded.metadata["placeholder"] == "tok1"


def test_existing_file_is_not_replaced_without_overwrite(tmp_path):
    path = tmp_path / "tok1.safetensors"
    path.write_bytes(b"user file")
    with pytest.raises(OutputExistsError):
        save_embedding(path, torch.zeros(1, 32))
    assert path.read_bytes() == b"user file"
    save_embedding(path, torch.ones(1, 32), overwrite=True)
    assert torch.equal(load_embedding(path).vectors["clip_l"], torch.ones(1, 32))


def test_a1111_pt_and_emb_params_files_load(tmp_path):
    vectors = torch.randn(2, 32)
    torch.save({"string_to_param": {"*": vectors}, "name": "tok1", "step": 100}, tmp_path / "a1111.pt")
    assert torch.equal(load_embedding(tmp_path / "a1111.pt").for_family("sd15", 32), vectors)
    from safetensors.torch import save_file

    save_file({"emb_params": vectors}, str(tmp_path / "other.safetensors"))
    assert torch.equal(load_embedding(tmp_path / "other.safetensors").for_family("sd15", 32), vectors)


class Payload:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_pickle_with_arbitrary_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"string_to_param": {"*": Payload()}}, f)
    with pytest.raises(InvalidInputError, match="was refused: it is not a plain tensor file"):
        load_embedding(path)


def test_embedding_for_another_model_width_is_refused(tmp_path):
    path = save_embedding(tmp_path / "sdxl_like.safetensors", torch.zeros(1, 768))
    with pytest.raises(InvalidInputError, match="768 wide but this sd15 model's text encoder needs 32"):
        load_embedding(path).for_family("sd15", 32)


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_embedding(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(InvalidInputError, match="not a readable .safetensors"):
        load_embedding(tmp_path / "junk.safetensors")
    with pytest.raises(InvalidInputError, match="must end in .safetensors"):
        save_embedding(tmp_path / "x.pt", torch.zeros(1, 32))


def test_diffusers_load_textual_inversion_reads_our_file(tmp_path, tiny_bundle):
    from diffusers import StableDiffusionPipeline

    vectors = torch.randn(2, tiny_bundle.embedding_dim, generator=torch.Generator().manual_seed(3))
    path = save_embedding(tmp_path / "tok1.safetensors", vectors, metadata={"placeholder": "tok1"})
    tiny_bundle.save_pretrained(tmp_path / "pipe")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(path), token="tok1")
    ids = pipe.tokenizer(pipe.maybe_convert_prompt("a tok1", pipe.tokenizer), add_special_tokens=False).input_ids[1:]
    assert len(ids) == 2
    rows = pipe.text_encoder.get_input_embeddings().weight[ids]
    assert torch.equal(rows, vectors)
    # Our own loader gives the same conditioning for the same prompt.
    add_placeholder(tiny_bundle.tokenizer, tiny_bundle.text_encoder, "tok1", "character", vectors=vectors)
    assert torch.equal(tiny_bundle.text_encoder.get_input_embeddings().weight[-2:], rows)
