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


# ---------------------------------------------------------------- SDXL: one vector set per text encoder


def _sdxl_vectors(n=2):
    generator = torch.Generator().manual_seed(1)
    return {"clip_l": torch.randn(n, 32, generator=generator), "clip_g": torch.randn(n, 64, generator=generator)}


def test_sdxl_embedding_has_both_keys_float32(tmp_path):
    vectors = _sdxl_vectors()
    path = save_embedding(tmp_path / "xl.safetensors", {k: v.half() for k, v in vectors.items()}, "sdxl", {"placeholder": "tok1"})
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l"] and f.metadata()["model_family"] == "sdxl"
        assert all(f.get_tensor(k).dtype == torch.float32 and f.get_tensor(k).is_contiguous() for k in f.keys())
    loaded = load_embedding(path)
    assert loaded.written_for() == "sdxl"
    got = loaded.vectors_for("sdxl", {"clip_l": 32, "clip_g": 64})
    assert list(got) == ["clip_l", "clip_g"]
    assert all(torch.equal(got[k], vectors[k].half().float()) for k in got)
    assert torch.equal(loaded.for_family("sdxl", 32), got["clip_l"])  # the first encoder's


def test_sdxl_embedding_from_other_trainers_is_recognised_by_its_keys(tmp_path):
    from safetensors.torch import save_file

    save_file(_sdxl_vectors(), str(tmp_path / "kohya.safetensors"))
    loaded = load_embedding(tmp_path / "kohya.safetensors")
    assert loaded.metadata == {} and loaded.written_for() == "sdxl"
    assert loaded.vectors_for("sdxl", {"clip_l": 32, "clip_g": 64})["clip_g"].shape == (2, 64)


def test_an_embedding_of_the_other_family_is_refused_naming_both(tmp_path):
    sd15 = load_embedding(save_embedding(tmp_path / "sd15.safetensors", torch.zeros(1, 768)))
    with pytest.raises(InvalidInputError, match=r"this embedding is for SD1\.5 \(keys clip_l\) but the model is SDXL, which needs clip_l and clip_g"):
        sd15.vectors_for("sdxl", {"clip_l": 768, "clip_g": 1280})
    with pytest.raises(InvalidInputError, match=r"is for SD1\.5 .* but the model is SDXL"):
        sd15.for_family("sdxl", 768)
    sdxl = load_embedding(save_embedding(tmp_path / "sdxl.safetensors", _sdxl_vectors(), "sdxl"))
    with pytest.raises(InvalidInputError, match=r"this embedding is for SDXL \(keys clip_g, clip_l\) but the model is SD1\.5, which needs clip_l"):
        sdxl.for_family("sd15", 32)  # its clip_l part alone would have fitted: refused all the same
    with pytest.raises(InvalidInputError, match=r"is for SDXL .* but the model is SD1\.5"):
        sdxl.vectors_for("sd15", {"clip_l": 32})


def test_vectors_for_sd15_is_for_family(tmp_path):
    vectors = torch.randn(3, 32)
    loaded = load_embedding(save_embedding(tmp_path / "tok.safetensors", vectors))
    assert list(loaded.vectors_for("sd15", {"clip_l": 32})) == ["clip_l"]
    assert torch.equal(loaded.vectors_for("sd15", {"clip_l": 32})["clip_l"], loaded.for_family("sd15", 32))
    torch.save({"string_to_param": {"*": vectors}}, tmp_path / "a1111.pt")
    assert torch.equal(load_embedding(tmp_path / "a1111.pt").vectors_for("sd15", {"clip_l": 32})["clip_l"], vectors)


def test_sdxl_vectors_are_checked_per_encoder(tmp_path):
    loaded = load_embedding(save_embedding(tmp_path / "xl.safetensors", _sdxl_vectors(), "sdxl"))
    with pytest.raises(InvalidInputError, match="embedding vectors are 64 wide but this sdxl model's clip_g text encoder needs 1280"):
        loaded.vectors_for("sdxl", {"clip_l": 32, "clip_g": 1280})
    with pytest.raises(InvalidInputError, match=r"embedding keys \['clip_l'\] are not the SDXL text encoders' \['clip_l', 'clip_g'\]"):
        save_embedding(tmp_path / "half.safetensors", {"clip_l": torch.zeros(1, 32)}, "sdxl")
    with pytest.raises(InvalidInputError, match=r"different number of vectors per text encoder \{'clip_l': 1, 'clip_g': 2\}"):
        save_embedding(tmp_path / "uneven.safetensors", {"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(2, 64)}, "sdxl")


def test_diffusers_loads_our_sdxl_file_into_both_encoders(tmp_path):
    """diffusers' SDXL recipe: `load_textual_inversion(state_dict[key], token, text_encoder, tokenizer)` per encoder."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from pti_ops.models import load_bundle

    bundle, vectors = load_bundle("tiny-sdxl"), _sdxl_vectors()
    path = save_embedding(tmp_path / "tok1.safetensors", vectors, "sdxl", {"placeholder": "tok1"})
    pipe = StableDiffusionXLPipeline(
        vae=bundle.vae, text_encoder=bundle.text_encoder, text_encoder_2=bundle.text_encoder_2, tokenizer=bundle.tokenizer,
        tokenizer_2=bundle.tokenizer_2, unet=bundle.unet, scheduler=bundle.noise_scheduler,
    )  # fmt: skip
    state = load_file(str(path))
    pipe.load_textual_inversion(state["clip_l"], token="tok1", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="tok1", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    for key, tokenizer, encoder in (("clip_l", pipe.tokenizer, pipe.text_encoder), ("clip_g", pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tokenizer(pipe.maybe_convert_prompt("a tok1", tokenizer), add_special_tokens=False).input_ids[1:]
        assert torch.equal(encoder.get_input_embeddings().weight[ids], vectors[key])


def test_embedding_with_nan_is_refused_at_load_naming_file_and_tensor(tmp_path, capsys):
    path = save_embedding(tmp_path / "bad.safetensors", torch.tensor([[1.0, float("nan"), 2.0]]))
    with pytest.raises(InvalidInputError, match=r"embedding 'clip_l' in .*bad\.safetensors holds 1 NaN or infinite value"):
        load_embedding(path)
    # Through the CLI: exit 2 with that message, not a divergence blamed on the learning rate.
    from pti_ops.cli import main

    captions = tmp_path / "captions.txt"
    captions.write_text("a red character\na blue character\na character in the city\n")
    code = main(["norm-stats", "--model", "tiny", "--captions", str(captions), "--template", "a drawing of {}",
                 "--class-word", "character", "--embedding", str(path), "--out", str(tmp_path / "s.json")])
    assert code == 2 and "NaN or infinite" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()
