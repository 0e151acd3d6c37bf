"""Single-file SD1.5 checkpoints: `ldm_layout.save_ldm_checkpoint` and `single_file.load_single_file`."""

import gzip
import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from pti_ops.models import ldm_layout, single_file
from pti_ops.models import load_bundle
from pti_ops.models.clip_vocab import BOS_TOKEN, EOS_TOKEN, write_clip_vocab
from pti_ops.errors import MissingModelFileError, ModelLoadError, OutputExistsError
from pti_ops.models.ldm_layout import clip_to_ldm, save_ldm_checkpoint, unet_to_ldm, vae_to_ldm
from pti_ops.models.single_file import build_openai_clip_vocab, load_single_file
from pti_ops.models.tiny_model import TINY_WORDS, build_tiny_bundle

PROMPTS = ["a photo of a cat", "an anime girl holding a sword, beach", "zebra xylophone!"]
PARTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_bundle()


@pytest.fixture(scope="module")
def tiny_file(tiny, tmp_path_factory):
    return save_ldm_checkpoint(tiny, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", dtype=torch.float32)


@pytest.fixture
def no_clip_package(monkeypatch):
    """Hide an installed `clip`/`open_clip` package so the tokenizer search cannot fall back to it."""
    monkeypatch.setattr(single_file, "find_openai_bpe_file", lambda: None)


def _assert_same_weights(a, b, atol=0.0):
    for part in PARTS:
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys(), part
        for key in sa:
            if atol == 0.0:
                assert torch.equal(sa[key], sb[key]), f"{part}.{key}"
            else:
                torch.testing.assert_close(sb[key], sa[key], atol=atol, rtol=1e-3, msg=f"{part}.{key}")


def _rewrite(src, dst, edit=lambda state: state):
    """Copy a checkpoint with `edit` applied to its tensors, keeping its metadata."""
    with safe_open(str(src), framework="pt") as file:
        metadata = file.metadata()
    save_file(edit(load_file(str(src))), str(dst), metadata=metadata)
    return dst


def test_float32_round_trip_is_bit_identical(tiny, tiny_file, no_clip_package):
    loaded = load_bundle(tiny_file)
    _assert_same_weights(tiny, loaded)
    for prompt in PROMPTS:
        assert loaded.tokenizer(prompt).input_ids == tiny.tokenizer(prompt).input_ids
    assert len(loaded.tokenizer) == len(tiny.tokenizer)
    assert loaded.noise_scheduler.config.prediction_type == "epsilon"
    assert loaded.name == "tiny-sd15" and loaded.family == "sd15"
    ids = tiny.tokenizer(PROMPTS, padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded.text_encoder(ids).last_hidden_state, tiny.text_encoder(ids).last_hidden_state)


def test_file_has_ldm_layout_and_schedule(tiny_file):
    state = load_file(str(tiny_file))
    assert "model.diffusion_model.input_blocks.0.0.weight" in state
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in state
    assert state["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv in LDM
    assert state["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    assert state["alphas_cumprod"].shape == (1000,)
    torch.testing.assert_close(state["alphas_cumprod"], build_tiny_bundle().noise_scheduler.alphas_cumprod)


def test_float16_round_trip_within_tolerance(tiny, tmp_path, no_clip_package):
    path = save_ldm_checkpoint(tiny, tmp_path / "half.safetensors")  # float16 by default
    assert load_file(str(path))["model.diffusion_model.out.2.weight"].dtype == torch.float16
    loaded = load_bundle(path)
    assert loaded.unet.conv_out.weight.dtype == torch.float32
    _assert_same_weights(tiny, loaded, atol=1e-3)


def test_deeper_unet_and_vae_round_trip(tiny, tmp_path, no_clip_package):
    """Three levels and two layers per block: the renames are not tied to the tiny shape."""
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 32, 64), layers_per_block=2, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 64), layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, sample_size=32,
    )  # fmt: skip
    deeper = build_tiny_bundle()
    deeper.unet, deeper.vae = unet, vae
    loaded = load_bundle(save_ldm_checkpoint(deeper, tmp_path / "deep.safetensors", dtype=torch.float32))
    _assert_same_weights(deeper, loaded)


def test_sd15_shapes_give_the_sd15_key_names():
    """The shipped SD1.5 configs renamed to LDM give the key counts and names of v1-5-pruned-emaonly,
    and convert back onto SD1.5-sized models (built on the meta device: no memory, no time)."""
    read = single_file._read_config
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(read("unet_config.json"))
        vae = AutoencoderKL.from_config(read("vae_config.json"))
        clip = CLIPTextModel(CLIPTextConfig.from_dict(read("text_encoder_config.json")))
    ldm_unet = unet_to_ldm(unet.state_dict(), dict(unet.config))
    ldm_vae = vae_to_ldm(vae.state_dict(), dict(vae.config))
    ldm_clip = clip_to_ldm(clip.state_dict(), 77)
    assert (len(ldm_unet), len(ldm_vae), len(ldm_clip)) == (686, 248, 197)
    for key in (
        "model.diffusion_model.input_blocks.9.0.op.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.8.2.conv.weight",
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
    ):
        assert key in ldm_unet
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in ldm_vae
    assert "first_stage_model.decoder.up.0.block.2.conv2.weight" in ldm_vae
    assert "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.bias" in ldm_clip
    # diffusers' converters map the names back onto every weight, with SD1.5's shapes (no data:
    # each tensor is a zero-strided view of one scalar).
    state = {k: torch.zeros(()).expand(t.shape) for d in (ldm_unet, ldm_vae, ldm_clip) for k, t in d.items()}
    single_file.check_layout(state, Path("sd15.safetensors"))
    back = {
        "unet": single_file.convert_ldm_unet_checkpoint(state, dict(unet.config)),
        "vae": single_file.convert_ldm_vae_checkpoint(state, dict(vae.config)),
        "text_encoder": {k: v for k, v in single_file.convert_ldm_clip_checkpoint(state).items() if "position_ids" not in k},
    }
    for part, model in (("unet", unet), ("vae", vae), ("text_encoder", clip)):
        expected = model.state_dict()
        converted = single_file._match_prefix(back[part], set(expected))
        single_file._check_state_dict(converted, expected, part, Path("sd15.safetensors"))


def test_placeholder_tokens_survive(tmp_path, no_clip_package):
    bundle = build_tiny_bundle()
    bundle.tokenizer.add_tokens(["<sks>"])
    bundle.text_encoder.resize_token_embeddings(len(bundle.tokenizer))
    loaded = load_bundle(save_ldm_checkpoint(bundle, tmp_path / "placeholder.safetensors", dtype=torch.float32))
    assert loaded.tokenizer("a <sks> toy").input_ids == bundle.tokenizer("a <sks> toy").input_ids
    _assert_same_weights(bundle, loaded)


UNSUPPORTED = {
    "sdxl": ({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(4),
              "model.diffusion_model.out.2.weight": torch.ones(4)}, "an SDXL checkpoint"),
    "sd2": ({"cond_stage_model.model.ln_final.weight": torch.ones(4),
             "model.diffusion_model.out.2.weight": torch.ones(4)}, "an SD2.x checkpoint"),
    "embedding": ({"clip_l": torch.ones(2, 768)}, "a textual-inversion embedding"),
    "lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(4, 4)}, "a LoRA"),
    "empty": ({}, "an empty file"),
    "unet_only": ({"model.diffusion_model.out.2.weight": torch.ones(4)},
                  r"a file without vae `first_stage_model\.\*`, text_encoder `cond_stage_model\.transformer\.\*`"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_files_are_named(case, tmp_path):
    state, found = UNSUPPORTED[case]
    path = tmp_path / f"{case}.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelLoadError, match=rf"unsupported model: {case}\.safetensors looks like {found}.*only SD1\.5"):
        load_bundle(path)


def test_unconverted_tensor_is_named(tiny_file, tmp_path):
    extra = "model.diffusion_model.label_emb.0.0.weight"
    path = _rewrite(tiny_file, tmp_path / "extra.safetensors", lambda s: {**s, extra: torch.ones(2)})
    with pytest.raises(ModelLoadError, match=rf"unet tensor\(s\) were not converted, e\.g\. {extra}"):
        load_single_file(path)


def test_stray_top_level_tensor_is_named(tiny_file, tmp_path):
    path = _rewrite(tiny_file, tmp_path / "stray.safetensors", lambda s: {**s, "embedding_manager.x": torch.ones(2)})
    with pytest.raises(ModelLoadError, match="outside the SD1.5 layout, e.g. embedding_manager.x"):
        load_single_file(path)


def test_missing_weight_is_named(tiny_file, tmp_path):
    gone = "model.diffusion_model.out.2.bias"
    path = _rewrite(tiny_file, tmp_path / "missing.safetensors", lambda s: {k: v for k, v in s.items() if k != gone})
    with pytest.raises(ModelLoadError, match=r"UNet weights do not match .*missing \['conv_out.bias'\]"):
        load_single_file(path)


def test_wrong_shape_is_named(tiny_file, tmp_path):
    key = "model.diffusion_model.input_blocks.0.0.weight"  # an inpainting UNet takes 9 channels
    path = _rewrite(tiny_file, tmp_path / "inpaint.safetensors", lambda s: {**s, key: torch.ones(32, 9, 3, 3)})
    with pytest.raises(ModelLoadError, match=r"conv_in.weight is \[32, 9, 3, 3\], expected \[32, 4, 3, 3\]"):
        load_single_file(path)


@pytest.fixture
def file_without_tokenizer(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(ldm_layout, "MAX_EMBEDDED_VOCAB", 0)  # as for a full-size CLIP vocabulary
    path = save_ldm_checkpoint(tiny, tmp_path / "model" / "novocab.safetensors", dtype=torch.float32)
    assert ldm_layout.META_VOCAB not in safe_open(str(path), framework="pt").metadata()
    return path


def test_missing_tokenizer_names_the_files(file_without_tokenizer, no_clip_package):
    with pytest.raises(MissingModelFileError, match="vocab.json and merges.txt .* `tokenizer_dir`.*clip-anytorch"):
        load_bundle(file_without_tokenizer)


def test_tokenizer_dir_and_neighbour_folder(tiny, file_without_tokenizer, tmp_path, no_clip_package):
    write_clip_vocab(tmp_path / "vocab", list(TINY_WORDS))
    given = load_bundle(file_without_tokenizer, tokenizer_dir=str(tmp_path / "vocab"))
    write_clip_vocab(file_without_tokenizer.parent / "tokenizer", list(TINY_WORDS))
    beside = load_bundle(file_without_tokenizer)
    for prompt in PROMPTS:
        assert given.tokenizer(prompt).input_ids == beside.tokenizer(prompt).input_ids == tiny.tokenizer(prompt).input_ids


def test_incomplete_tokenizer_dir_is_refused(tiny_file, tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(MissingModelFileError, match="lacks merges.txt"):
        load_bundle(tiny_file, tokenizer_dir=str(tmp_path))


def test_pickled_checkpoint_is_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"not opened")
    with pytest.raises(ModelLoadError, match="Pickled checkpoints"):
        load_bundle(path)
    with pytest.raises(ModelLoadError, match="Pickled checkpoints"):
        load_single_file(path)


def test_existing_output_is_kept(tiny, tmp_path):
    path = tmp_path / "taken.safetensors"
    path.write_bytes(b"user data")
    with pytest.raises(OutputExistsError, match="already exists"):
        save_ldm_checkpoint(tiny, path)
    assert path.read_bytes() == b"user data"
    assert [p.name for p in tmp_path.iterdir()] == ["taken.safetensors"]  # no temp file left
    save_ldm_checkpoint(tiny, path, overwrite=True)
    assert "model.diffusion_model.out.2.weight" in load_file(str(path))


def test_openai_vocab_builder(tmp_path):
    """Built as OpenAI's simple_tokenizer: bytes, bytes + </w>, one token per merge, then the two specials."""
    merges = ["c a", "ca t</w>", "d o"]
    bpe = tmp_path / "bpe.txt.gz"
    with gzip.open(bpe, "wt", encoding="utf-8") as file:
        file.write("\n".join(["\"bpe_simple_vocab_16e6.txt#version: 0.2", *merges, "unused merge"]))
    vocab, kept = build_openai_clip_vocab(bpe, num_merges=3)
    assert kept == merges
    assert len(vocab) == 512 + 3 + 2
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert [vocab["ca"], vocab["cat</w>"], vocab["do"]] == [512, 513, 514]
    assert (vocab[BOS_TOKEN], vocab[EOS_TOKEN]) == (515, 516)
    with pytest.raises(ModelLoadError, match="does not hold 5 BPE merges"):
        build_openai_clip_vocab(bpe, num_merges=5)


def test_openai_vocab_files_load_as_clip_tokenizer(tmp_path):
    merges = ["c a", "ca t</w>"]
    bpe = tmp_path / "bpe.txt.gz"
    with gzip.open(bpe, "wt", encoding="utf-8") as file:
        file.write("\n".join(["header", *merges]))
    vocab, kept = build_openai_clip_vocab(bpe, num_merges=2)
    single_file.write_vocab_files(tmp_path / "tok", vocab, kept)
    assert json.loads((tmp_path / "tok" / "vocab.json").read_text(encoding="utf-8")) == vocab
    tokenizer = single_file.tokenizer_from_folder(tmp_path / "tok", 77)
    assert tokenizer("cat").input_ids == [vocab[BOS_TOKEN], vocab["cat</w>"], vocab[EOS_TOKEN]]
