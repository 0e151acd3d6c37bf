"""Norm statistics: closed-form answers on synthetic shells, the tiny model, caption files, CLI."""

import argparse
import copy
import json
import math
import random

import pytest
import torch
from transformers import CLIPTextModelWithProjection

from pti_ops.errors import InvalidInputError, OutputExistsError
from pti_ops.norm_stats.compute import (
    NormStats,
    NormStatsConfig,
    compute_norm_stats,
    held_out_stats,
    interpolation_gaps,
    load_captions,
    shell_expectations,
    shell_stats,
    stats_of_vectors,
    synthetic_layernorm,
    synthetic_shell,
)
from pti_ops.placeholder import add_placeholder
from pti_ops.training.text_conditioning import encode_prompts, text_transformer, tokenize
from pti_ops.models.tiny_model import build_tiny_bundle
from helpers import warns_user

TEMPLATE = "an anime illustration of {}"
SUBJECTS = "character person man woman girl boy cat dog robot creature".split()
COLOURS = "red blue green yellow black white orange purple small big".split()
PLACES = "forest city snow beach".split()


def tiny_captions(n: int = 120, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        f"a {rng.choice(COLOURS)} {rng.choice(SUBJECTS)} {rng.choice(['standing', 'sitting'])} in the {rng.choice(PLACES)}"
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_bundle()


def placeholder_bundle(scale: float = 0.05):
    """A fresh tiny bundle with `tok1` added from `character`, its row perturbed so the endpoints differ."""
    bundle = build_tiny_bundle()
    token = add_placeholder(bundle.tokenizer, bundle.text_encoder, "tok1", "character")
    with torch.no_grad():
        noise = torch.randn(bundle.embedding_dim, generator=torch.Generator().manual_seed(1))
        bundle.text_encoder.get_input_embeddings().weight[token.token_ids[0]] += scale * noise
    return bundle, token


# --- synthetic shells: closed forms ---------------------------------------------------------------

SHELL_CASES = {
    # name: (centre, radii, thickness, tolerance on the along-mean share). The share's estimator is
    # noisy when the shell is thin (~0.04 standard error for the thin sphere's centred norms here).
    "thin offset sphere": (torch.tensor([3.0] + [0.0] * 15), 1.0, 0.01, 0.15),
    "thick offset sphere": (torch.tensor([1.0, 2.0] + [0.0] * 14), 1.0, 0.1, 0.02),
    "offset ellipsoid": (torch.tensor([2.0, 1.0] + [0.0] * 14), torch.linspace(0.5, 1.5, 16), 0.02, 0.02),
}


@pytest.mark.parametrize("name", list(SHELL_CASES))
def test_shell_stats_match_closed_form(name):
    centre, radii, thickness, share_tolerance = SHELL_CASES[name]
    stats = stats_of_vectors(synthetic_shell(20000, centre, radii, thickness, seed=3), name)
    expected = shell_expectations(centre, radii, thickness)
    assert torch.allclose(stats.centre_for_positions()[0], centre.float(), atol=0.03)
    for kind in ("raw", "centred"):
        got, want = getattr(stats, kind), expected[kind]
        assert got.mean_norm == pytest.approx(want.mean_norm, rel=0.01), kind
        assert got.cv == pytest.approx(want.cv, rel=0.06), kind
        assert got.var_sq_norm == pytest.approx(want.var_sq_norm, rel=0.08), kind
        assert got.along_mean_share == pytest.approx(want.along_mean_share, abs=share_tolerance), kind


def test_sphere_closed_form_is_the_textbook_one():
    # Offset sphere of radius R with relative thickness s: centred norms have mean R and CV s, and
    # only 1/d of their squared-norm variance lies along any one direction.
    centre, s, d = torch.tensor([3.0] + [0.0] * 15), 0.01, 16
    centred = shell_expectations(centre, 1.0, s)["centred"]
    assert centred.mean_norm == pytest.approx(1.0, abs=1e-6)
    assert centred.cv == pytest.approx(s, rel=1e-3)
    assert centred.along_mean_share == pytest.approx(1 / d)


def test_centring_lowers_cv_on_offset_shell_and_summary_says_so():
    centre, radii, thickness, _ = SHELL_CASES["thin offset sphere"]
    stats = stats_of_vectors(synthetic_shell(4000, centre, radii, thickness), "shell")
    assert stats.centred.cv < stats.raw.cv / 3
    assert stats.offset == pytest.approx(3.0, rel=0.02)
    assert "centring lowers the CV" in stats.summary()
    assert "shell structure holds" in stats.summary()


def test_layernorm_outputs_have_constant_raw_norms_and_summary_says_so():
    stats = stats_of_vectors(synthetic_layernorm(2000, 64), "layernorm")
    assert stats.raw.mean_norm == pytest.approx(8.0, rel=1e-4)  # sqrt(64)
    assert stats.raw.cv < 1e-5
    assert math.isnan(stats.raw.along_mean_share)  # no variance to share out
    assert stats.centred.cv > 0.05  # centring can only add spread here
    assert "raw norms are near-constant" in stats.summary()


def test_centring_removes_exactly_the_along_mean_terms_of_the_squared_norm():
    # ‖x‖² = ‖x−μ‖² + 2m⟨x−μ,u⟩ + m², so var‖x‖² − var‖x−μ‖² = 4m²var(b) + 4m·cov(b, ‖x−μ‖²), b = ⟨x−μ,u⟩.
    x = synthetic_shell(3000, torch.tensor([1.5, 0.5, 0.0, 0.0]), torch.tensor([1.0, 0.7, 0.5, 0.3]), 0.05)
    mu = x[0::2].mean(0)
    m, u, y = mu.norm(), mu / mu.norm(), x[1::2] - mu
    raw, centred = shell_stats(x[1::2], u), shell_stats(y, u)
    b, ysq = y @ u, (y**2).sum(1)
    cov = ((b - b.mean()) * (ysq - ysq.mean())).mean()
    difference = 4 * m**2 * b.var(correction=0) + 4 * m * cov
    assert raw.var_sq_norm - centred.var_sq_norm == pytest.approx(difference.item(), rel=1e-9)
    assert held_out_stats(x)[0] == raw


def test_held_out_needs_two_vectors():
    with pytest.raises(InvalidInputError, match="at least 2 vectors"):
        held_out_stats(torch.ones(1, 4))


def test_interpolation_gap_closed_form():
    # Equal norms at angle θ: the paths differ most at t=0.5, by sec(θ/2) − 1 of the chord's point.
    theta = math.radians(40)
    a = torch.tensor([[1.0, 0.0, 0.0]])
    b = torch.tensor([[math.cos(theta), math.sin(theta), 0.0]])
    gap, vgap = interpolation_gaps(a, b, torch.zeros(3))
    assert gap.item() == pytest.approx(1 / math.cos(theta / 2) - 1, rel=1e-6)
    assert vgap.item() == pytest.approx(gap.item(), rel=1e-9)  # vSLERP around the origin is SLERP
    same, _ = interpolation_gaps(a, a.clone(), torch.zeros(3))
    assert same.item() == 0.0


# --- the tiny model -------------------------------------------------------------------------------


def test_hidden_space_of_tiny_model(tiny):
    captions = tiny_captions()
    stats = compute_norm_stats(tiny.tokenizer, tiny.text_encoder, captions, NormStatsConfig(space="hidden", position=5))
    # The final LayerNorm has unit gain and zero bias at init: every norm is sqrt(32) (less LayerNorm's eps).
    assert stats.raw.mean_norm == pytest.approx(math.sqrt(32), rel=1e-4)
    assert stats.raw.cv < 1e-4
    assert "raw norms are near-constant, as the final LayerNorm makes them" in stats.summary()
    # Centres for every position, equal to the mean conditioning of the captions.
    assert stats.centres.shape == (77, 32)
    expected = encode_prompts(tiny.tokenizer, tiny.text_encoder, captions).mean(0)
    assert torch.allclose(stats.centres, expected, atol=1e-5)
    assert torch.equal(stats.centre_for_positions(range(5, 77)), stats.centres[5:])
    assert stats.num_captions == len(captions)


def test_pooled_uses_the_first_end_token_not_the_legacy_argmax():
    bundle, token = placeholder_bundle()
    encoder = copy.deepcopy(bundle.text_encoder)
    encoder.eos_token_id = 2  # SD1.5's legacy config: pooler_output takes the argmax id (the placeholder)
    captions = ["a tok1 cat", "a red tok1 in the snow", "the tok1"]
    stats = compute_norm_stats(bundle.tokenizer, encoder, captions, NormStatsConfig(space="pooled"))
    ids = tokenize(bundle.tokenizer, captions)
    with torch.no_grad():
        out = encoder(ids)
    eos = (ids == bundle.tokenizer.eos_token_id).int().argmax(1)
    first_eos = out.last_hidden_state[torch.arange(3), eos]
    assert torch.allclose(stats.centres[0], first_eos.mean(0), atol=1e-6)
    assert not torch.allclose(out.pooler_output.mean(0), first_eos.mean(0), atol=1e-3)


def test_projected_space_needs_a_projection(tiny):
    with pytest.raises(InvalidInputError, match="space `projected` needs a text encoder with a text projection"):
        compute_norm_stats(tiny.tokenizer, tiny.text_encoder, tiny_captions(4), NormStatsConfig(space="projected"))
    torch.manual_seed(0)
    with_projection = CLIPTextModelWithProjection(tiny.text_encoder.config).eval()
    with_projection.text_model.load_state_dict(tiny.text_encoder.state_dict())
    captions = tiny_captions(6)
    stats = compute_norm_stats(tiny.tokenizer, with_projection, captions, NormStatsConfig(space="projected"))
    with torch.no_grad():
        text_embeds = with_projection(tokenize(tiny.tokenizer, captions)).text_embeds
    assert torch.allclose(stats.centres[0], text_embeds.mean(0), atol=1e-6)
    assert stats.position == "eos"


def test_endpoint_angles_are_zero_before_the_placeholder():
    bundle, token = placeholder_bundle()
    config = NormStatsConfig(space="hidden", template=TEMPLATE, class_word="character")
    stats = compute_norm_stats(bundle.tokenizer, bundle.text_encoder, tiny_captions(40), config, placeholder=token)
    e = stats.endpoints
    assert stats.position == e.index == 5  # default position: the placeholder's index
    assert e.placeholder_prompt == "an anime illustration of tok1"
    assert e.trained
    # Causal mask: positions before the placeholder see identical tokens.
    assert max(e.angle_raw[:5]) < 1e-4 and max(e.angle_centred[:5]) < 1e-4
    assert max(e.slerp_gap[:5]) < 1e-9
    assert e.angle_raw[5] > 1.0 and min(e.angle_raw[6:]) > 0.0
    assert "slerp and lerp differ by at most" in stats.summary()


def test_without_a_trained_placeholder_the_endpoints_coincide(tiny):
    config = NormStatsConfig(space="hidden", template=TEMPLATE, class_word="character")
    stats = compute_norm_stats(tiny.tokenizer, tiny.text_encoder, tiny_captions(10), config)
    assert not stats.endpoints.trained
    assert max(stats.endpoints.angle_raw) < 1e-4
    assert "endpoints coincide" in stats.summary()


def test_word_position_is_found_per_caption(tiny):
    captions = ["a cat in the snow", "the big red cat", "a dog"]
    with warns_user("1 caption\\(s\\) without 'cat' are left out \\(first: caption 3\\)"):
        stats = compute_norm_stats(tiny.tokenizer, tiny.text_encoder, captions, NormStatsConfig(space="token_embedding", position="cat"))
    assert stats.num_captions == 2 and stats.position == "cat"
    cat_row = tiny.text_encoder.get_input_embeddings().weight[tiny.tokenizer.convert_tokens_to_ids("cat</w>")]
    assert stats.raw.mean_norm == pytest.approx(cat_row.norm().item(), rel=1e-6)
    with pytest.raises(InvalidInputError, match="no caption contains the word 'robot'"):
        compute_norm_stats(tiny.tokenizer, tiny.text_encoder, captions, NormStatsConfig(position="robot"))


def test_identical_vectors_are_reported_as_no_spread(tiny):
    stats = compute_norm_stats(tiny.tokenizer, tiny.text_encoder, tiny_captions(10), NormStatsConfig(space="hidden", position=0))
    assert "every caption gives the same vector" in stats.summary()


# --- centre on the final LayerNorm's bias ---------------------------------------------------------


def chosen_affine(dim: int, uniform: bool):
    """A LayerNorm gain γ (uniform 1.5, or spread 0.5..1.5) and a bias β far from the origin."""
    g = torch.Generator().manual_seed(7)
    gain = torch.full((dim,), 1.5, dtype=torch.float64) if uniform else 0.5 + torch.rand(dim, generator=g, dtype=torch.float64)
    return gain, 2.0 + torch.randn(dim, generator=g, dtype=torch.float64)


def same_norms(a, b) -> bool:
    """Equal norm statistics (the along-centre share differs: it is taken along each centre's direction)."""
    return (a.mean_norm, a.std_norm, a.cv, a.var_sq_norm) == (b.mean_norm, b.std_norm, b.cv, b.var_sq_norm)


def test_layernorm_bias_centre_on_synthetic_outputs_is_exact():
    gain, bias = chosen_affine(64, uniform=False)
    x = synthetic_layernorm(2000, 64, weight=gain, bias=bias)
    stats = stats_of_vectors(x, "layernorm", layernorm_bias=bias)
    assert stats.centre == "layernorm_bias"
    assert torch.equal(stats.centre_for_positions()[0], bias.float())
    assert stats.centre_norm == pytest.approx(bias.norm().item(), rel=1e-12)
    # Every output is γ⊙ẑ + β with ‖ẑ‖ = √d: undoing the affine part leaves a constant norm.
    undone = shell_stats((x - bias) / gain, torch.zeros(64))
    assert undone.mean_norm == pytest.approx(8.0, rel=1e-4)  # sqrt(64), less LayerNorm's eps
    assert undone.cv < 1e-6
    # A spread-out gain makes the shell an ellipsoid around β: ‖x − β‖ is not constant.
    assert stats.centred.cv > 0.01
    assert held_out_stats(x, bias)[1] == stats.centred
    assert "ellipsoid around β" in stats.summary()


def test_layernorm_bias_centre_with_uniform_gain_is_a_sphere():
    gain, bias = chosen_affine(64, uniform=True)
    x = synthetic_layernorm(2000, 64, weight=gain, bias=bias)
    around_bias, around_mean = stats_of_vectors(x, "ln", layernorm_bias=bias), stats_of_vectors(x, "ln")
    assert around_bias.centred.mean_norm == pytest.approx(1.5 * 8.0, rel=1e-4)
    assert around_bias.centred.cv < 1e-6 < 0.05 < around_mean.centred.cv
    assert same_norms(around_bias.raw, around_mean.raw)  # the same held-out rows whichever the centre
    assert "the norms around β are near-constant" in around_bias.summary()


def tiny_with_final_layernorm(uniform: bool):
    bundle = build_tiny_bundle()
    gain, bias = chosen_affine(bundle.embedding_dim, uniform)
    norm = text_transformer(bundle.text_encoder).final_layer_norm
    with torch.no_grad():
        norm.weight.copy_(gain)
        norm.bias.copy_(bias)
    return bundle, norm.weight.detach().double().clone(), norm.bias.detach().double().clone()


@pytest.mark.parametrize("uniform", [False, True])
def test_layernorm_bias_centre_of_the_tiny_model(uniform):
    bundle, gain, bias = tiny_with_final_layernorm(uniform)
    captions = tiny_captions(60)
    config = NormStatsConfig(space="hidden", position=5, centre="layernorm_bias")
    stats = compute_norm_stats(bundle.tokenizer, bundle.text_encoder, captions, config)
    assert stats.centre == "layernorm_bias"
    assert stats.centres.shape == (77, 32)
    assert torch.equal(stats.centres, bias.float().expand(77, 32))  # β at every position, exactly
    x = encode_prompts(bundle.tokenizer, bundle.text_encoder, captions)[:, 5].double()
    assert shell_stats((x - bias) / gain, torch.zeros(32)).cv < 1e-5
    held = x[1::2] - bias
    assert stats.centred.mean_norm == pytest.approx(held.norm(dim=1).mean().item(), rel=1e-6)
    mean_stats = compute_norm_stats(bundle.tokenizer, bundle.text_encoder, captions, NormStatsConfig(space="hidden", position=5))
    assert same_norms(stats.raw, mean_stats.raw)
    if uniform:
        assert stats.centred.cv < 1e-5 < 0.05 < mean_stats.centred.cv
    pooled = compute_norm_stats(
        bundle.tokenizer, bundle.text_encoder, captions, NormStatsConfig(space="pooled", centre="layernorm_bias")
    )
    assert torch.equal(pooled.centres, bias.float()[None])


def test_layernorm_bias_centre_is_used_by_the_endpoints():
    bundle, token = placeholder_bundle()
    norm = text_transformer(bundle.text_encoder).final_layer_norm
    with torch.no_grad():
        norm.bias.copy_(chosen_affine(32, uniform=True)[1])
    config = NormStatsConfig(space="hidden", template=TEMPLATE, class_word="character", centre="layernorm_bias")
    stats = compute_norm_stats(bundle.tokenizer, bundle.text_encoder, tiny_captions(20), config, placeholder=token)
    ids = tokenize(bundle.tokenizer, [stats.endpoints.placeholder_prompt, stats.endpoints.class_prompt])
    with torch.no_grad():
        a, b = (v[5].double() - norm.bias.double() for v in bundle.text_encoder(ids).last_hidden_state)
    angle = math.degrees(math.acos((a @ b / (a.norm() * b.norm())).item()))
    assert stats.endpoints.angle_centred[5] == pytest.approx(angle, rel=1e-4)


def test_layernorm_bias_centre_needs_a_space_after_the_final_layernorm():
    with pytest.raises(InvalidInputError, match="`centre` must be one of mean, layernorm_bias; got 'median'"):
        NormStatsConfig(centre="median")
    for space in ("hidden_prenorm", "projected", "token_embedding"):
        with pytest.raises(InvalidInputError, match=f"needs a space read right after the final LayerNorm.*`{space}` is not"):
            NormStatsConfig(space=space, centre="layernorm_bias")


def test_layernorm_bias_centre_warns_when_every_vector_is_the_same(tiny):
    config = NormStatsConfig(space="hidden", position=0, centre="layernorm_bias")
    with warns_user("every caption gives the same vector at position 0"):
        compute_norm_stats(tiny.tokenizer, tiny.text_encoder, tiny_captions(10), config)


def test_layernorm_bias_centre_round_trips_through_json(tmp_path):
    bundle, _, bias = tiny_with_final_layernorm(uniform=False)
    config = NormStatsConfig(space="hidden", position=5, centre="layernorm_bias")
    stats = compute_norm_stats(bundle.tokenizer, bundle.text_encoder, tiny_captions(20), config)
    loaded = NormStats.load_json(stats.save_json(tmp_path / "stats.json"))
    assert loaded.centre == "layernorm_bias" and torch.equal(loaded.centres, stats.centres)
    assert loaded.summary() == stats.summary()
    assert "centre (final LayerNorm bias β) norm" in stats.report()
    data = stats.to_json()
    del data["centre"]  # a file written before the option: centred on the mean
    assert NormStats.load_json(data).centre == "mean"


def test_norm_statistics_with_nan_centres_are_refused(tmp_path):
    bundle, _, _ = tiny_with_final_layernorm(uniform=False)
    stats = compute_norm_stats(bundle.tokenizer, bundle.text_encoder, tiny_captions(20), NormStatsConfig(space="hidden", position=5))
    data = stats.to_json()
    data["centres"][3][0] = float("nan")
    with pytest.raises(InvalidInputError, match="vSLERP centres of norm statistics .* NaN or infinite"):
        NormStats.load_json(data)


# --- captions -------------------------------------------------------------------------------------


def test_caption_file_skips_blank_lines_and_truncates_long_captions(tiny, tmp_path):
    path = tmp_path / "captions.txt"
    long_caption = " ".join(["red cat"] * 60)  # 120 words: over 77 tokens
    path.write_text("\ufeffa red cat\n\n   \na blue dog\r\n" + long_caption + "\n", encoding="utf-8")
    texts, labels = load_captions(path)
    assert texts == ["a red cat", "a blue dog", long_caption]
    assert labels[-1] == "captions.txt line 5"
    with warns_user("1 caption\\(s\\) are longer than the model's 77 tokens and were truncated.*line 5"):
        stats = compute_norm_stats(tiny.tokenizer, tiny.text_encoder, path, NormStatsConfig(space="pooled"))
    assert stats.num_captions == 3


def test_caption_file_with_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"a red cat\na blue dog\na caf\xe9 sign\n")
    with pytest.raises(InvalidInputError, match="bad.txt line 3 is not valid UTF-8 \\(byte 0xe9"):
        load_captions(path)


def test_empty_caption_sets_are_errors(tiny, tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(InvalidInputError, match="empty.txt has no captions"):
        load_captions(path)
    with pytest.raises(InvalidInputError, match="the caption list has no captions"):
        compute_norm_stats(tiny.tokenizer, tiny.text_encoder, [], NormStatsConfig())
    with pytest.raises(InvalidInputError, match="at least 2 captions; 1 can be used"):
        compute_norm_stats(tiny.tokenizer, tiny.text_encoder, ["a cat"], NormStatsConfig())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"space": "pooler"}, "`space` must be one of hidden, hidden_prenorm"),
        ({"template": "a photo of tok1"}, "must contain `\\{\\}` exactly once"),
        ({"template": "a photo of {}"}, "`class_word` is empty"),
        ({"position": -1}, "`position` must be 0 or more"),
        ({"clip_skip": 0}, "`clip_skip` must be 1"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        NormStatsConfig(**kwargs)


def test_position_beyond_the_model_length(tiny):
    with pytest.raises(InvalidInputError, match="`position` 80 is beyond the model's 77 tokens"):
        compute_norm_stats(tiny.tokenizer, tiny.text_encoder, tiny_captions(4), NormStatsConfig(position=80))


# --- outputs --------------------------------------------------------------------------------------


def test_json_round_trip_plot_and_no_silent_overwrite(tiny, tmp_path):
    stats = compute_norm_stats(tiny.tokenizer, tiny.text_encoder, tiny_captions(20), NormStatsConfig(space="hidden", position=5))
    path = stats.save_json(tmp_path / "stats.json")
    data = json.loads(path.read_text())
    assert data["raw"]["along_mean_share"] is None  # NaN written as null
    loaded = NormStats.load_json(path)
    assert torch.equal(loaded.centres, stats.centres)
    assert loaded.summary() == stats.summary() == data["summary"]
    with pytest.raises(OutputExistsError):
        stats.save_json(path)
    image = stats.plot_image()
    assert image.ndim == 3 and image.shape[2] == 3 and 0.0 <= image.min() and image.max() <= 1.0
    png = stats.save_plot(tmp_path / "stats.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    with pytest.raises(InvalidInputError, match="is not a norm statistics file"):
        NormStats.load_json(tmp_path / "other.json")
    del data["centres"]
    with pytest.raises(InvalidInputError, match="are incomplete or damaged: KeyError\\('centres'\\)"):
        NormStats.load_json(data)


def test_cli_writes_stats_and_plot(tmp_path, capsys):
    from pti_ops.cli.norm_stats import add_norm_stats_command
    from pti_ops.files.embedding_file import save_embedding

    bundle, token = placeholder_bundle()
    trained = bundle.text_encoder.get_input_embeddings().weight[list(token.token_ids)].detach()
    embedding = save_embedding(tmp_path / "tok1.safetensors", trained)
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(tiny_captions(30)) + "\n", encoding="utf-8")
    parser = argparse.ArgumentParser()
    add_norm_stats_command(parser.add_subparsers())
    argv = [
        "norm-stats", "--model", "tiny", "--captions", str(captions), "--space", "hidden", "--position", "5",
        "--template", TEMPLATE, "--class-word", "character", "--embedding", str(embedding),
        "--out", str(tmp_path / "stats.json"), "--plot", str(tmp_path / "stats.png"),
    ]
    args = parser.parse_args(argv)
    assert args.handler(args) == 0
    data = json.loads((tmp_path / "stats.json").read_text())
    assert data["position"] == 5 and data["space"] == "hidden" and data["endpoints"]["trained"]
    assert data["endpoints"]["angle_raw"][5] > 1.0
    assert (tmp_path / "stats.png").stat().st_size > 0
    assert "conclusion: shell structure holds at position 5 of `hidden`" in capsys.readouterr().out
    args = parser.parse_args(argv)
    with pytest.raises(OutputExistsError, match="stats.json already exists"):
        args.handler(args)


def test_cli_centre_option(tmp_path, capsys):
    from pti_ops.cli.norm_stats import add_norm_stats_command

    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(tiny_captions(20)) + "\n", encoding="utf-8")
    parser = argparse.ArgumentParser()
    add_norm_stats_command(parser.add_subparsers())
    base = ["norm-stats", "--model", "tiny", "--captions", str(captions), "--out", str(tmp_path / "stats.json")]
    args = parser.parse_args(base + ["--space", "pooled", "--centre", "layernorm_bias"])
    assert args.handler(args) == 0
    data = json.loads((tmp_path / "stats.json").read_text())
    assert data["centre"] == "layernorm_bias" and data["centres"] == [[0.0] * 32]  # the tiny model's β at init
    assert "around the final LayerNorm's bias β" in capsys.readouterr().out
    args = parser.parse_args(base + ["--space", "token_embedding", "--centre", "layernorm_bias", "--overwrite"])
    with pytest.raises(InvalidInputError, match="needs a space read right after the final LayerNorm"):
        args.handler(args)
