import pytest
import torch

from pti_ops.models import load_bundle
from pti_ops.errors import MissingModelFileError, ModelLoadError


def _state(bundle):
    return {f"{name}.{k}": v for name in ("unet", "vae", "text_encoder") for k, v in getattr(bundle, name).state_dict().items()}


def test_tiny_bundle_is_seeded_and_frozen():
    a, b = load_bundle("tiny"), load_bundle("tiny")
    state_a, state_b = _state(a), _state(b)
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not any(p.requires_grad for m in (a.unet, a.vae, a.text_encoder) for p in m.parameters())
    assert a.family == "sd15" and a.embedding_dim == 32 and a.vae_scale_factor == 2


def test_diffusers_folder_round_trip(tmp_path):
    bundle = load_bundle("tiny")
    bundle.save_pretrained(tmp_path / "model")
    loaded = load_bundle(tmp_path / "model")
    original, reloaded = _state(bundle), _state(loaded)
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)
    prompt = "an anime illustration of a character"
    assert loaded.tokenizer(prompt).input_ids == bundle.tokenizer(prompt).input_ids
    assert loaded.noise_scheduler.config.beta_schedule == "scaled_linear"


def test_missing_model_path_names_it(tmp_path):
    with pytest.raises(MissingModelFileError, match="nothing is downloaded"):
        load_bundle(tmp_path / "no_such_model")


def test_folder_without_subfolders_names_what_is_missing(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(MissingModelFileError, match="lacks the sub-folder.*tokenizer.*text_encoder"):
        load_bundle(tmp_path)


def test_pickled_checkpoint_is_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"not read")
    with pytest.raises(ModelLoadError, match="Pickled checkpoints"):
        load_bundle(path)
