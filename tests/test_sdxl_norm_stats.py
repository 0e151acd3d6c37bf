"""EmbeddingNormStats on SDXL (tiny-sdxl): each encoder in its own space, the conditioning's raw norms not
fixed by a LayerNorm, the vSLERP centres of the whole conditioning (+ the pooled one) for the regulariser,
files, the CLI and the nodes."""

import json
import sys

import pytest
import torch
from comfy_stubs import PACK_NAME, comfy_env, fake_models, nodes, run_node  # noqa: F401

from pti_ops.cli import main
from pti_ops.errors import InvalidInputError
from pti_ops.models import load_bundle
from pti_ops.norm_stats import (
    NormStats,
    NormStatsConfig,
    PerEncoderNormStats,
    compute_norm_stats,
    load_norm_stats,
    measure_norm_stats,
)
from pti_ops.norm_stats.report import NEAR_CONSTANT_CV
from pti_ops.pivot import Pivot
from pti_ops.regularizer import LocalityRegularizer, RegularizerConfig
from pti_ops.training.text_conditioning import encode_conditioning

TEMPLATE = "an anime illustration of {}"
SUBJECTS = ["a girl", "a boy", "a cat", "a dog", "a robot", "a man", "a woman", "a creature"]
ACTIONS = ["standing", "sitting", "running", "holding a sword"]
# Position 6 holds the subject's noun (after "an anime illustration of a"), where the captions differ.
CAPTIONS = [f"an anime illustration of {s} {a} in the {p}" for s in SUBJECTS for a in ACTIONS for p in ("city", "forest")]


@pytest.fixture(scope="module")
def xl():
    return load_bundle("tiny-sdxl")


def _measure(bundle, **settings):
    return measure_norm_stats(bundle.tokenizers, bundle.text_encoders, CAPTIONS, NormStatsConfig(**settings),
                              family=bundle.family, model_name=bundle.name)  # fmt: skip


@pytest.fixture(scope="module")
def hidden(xl):
    return _measure(xl, space="hidden", position=6)


def test_hidden_statistics_are_the_conditionings_per_encoder_means_and_pooled_mean(xl, hidden):
    """Measured per encoder in SDXL's conditioning (penultimate layer, no final LayerNorm); side by side they
    are the mean of the very `Conditioning` the UNet gets, and the pooled centre its pooled mean."""
    assert isinstance(hidden, PerEncoderNormStats) and list(hidden.encoders) == ["clip_l", "clip_g"]
    assert [s.centres.shape for s in hidden.encoders.values()] == [(77, 32), (77, 64)]
    assert all(s.clip_skip == 2 and s.position == 6 and s.num_captions == len(CAPTIONS) for s in hidden.encoders.values())
    conditioning = encode_conditioning(xl, CAPTIONS)  # the family default: clip_skip 2
    centre = hidden.centre_for_positions()
    assert centre.shape == (77, 96)
    torch.testing.assert_close(centre, conditioning.hidden.double().mean(dim=0).float(), atol=1e-5, rtol=0)
    pooled = hidden.pooled_centre()
    assert pooled.shape == (48,)
    torch.testing.assert_close(pooled, conditioning.pooled.double().mean(dim=0).float(), atol=1e-5, rtol=0)
    assert torch.equal(hidden.centre_for_positions([6, 7]), centre[[6, 7]])


def test_sdxl_conditioning_norms_are_not_fixed_by_a_layernorm(xl, hidden):
    """SD1.5's `hidden` comes out of the final LayerNorm (raw CV ~1e-6); SDXL's penultimate layer does not,
    so its raw norms spread, while the same layer through the final LayerNorm is fixed again."""
    postnorm = _measure(xl, space="hidden_postnorm", position=6)
    for key in ("clip_l", "clip_g"):
        raw, normed = hidden.encoders[key], postnorm.encoders[key]
        assert raw.raw.cv > NEAR_CONSTANT_CV and raw.raw.cv > 1000 * normed.raw.cv and not raw.after_final_norm
        assert normed.raw.cv < 1e-4 and normed.after_final_norm
        assert "as the final LayerNorm makes them" in normed.summary()
        assert "LayerNorm" not in raw.summary()
    width = {"clip_l": 32, "clip_g": 64}
    assert all(abs(postnorm.encoders[k].raw.mean_norm - width[k] ** 0.5) < 1e-3 for k in width)  # √d, unit gain at init
    sd15 = load_bundle("tiny")
    assert compute_norm_stats(sd15.tokenizer, sd15.text_encoder, CAPTIONS, NormStatsConfig(position=6)).raw.cv < 1e-4


def test_one_encoder_at_a_time_and_the_centres_refuse_a_partial_measurement(xl, hidden):
    clip_g = _measure(xl, space="hidden", position=6, encoder="clip_g")
    assert list(clip_g.encoders) == ["clip_g"]
    assert torch.equal(clip_g.encoders["clip_g"].centres, hidden.encoders["clip_g"].centres)
    assert torch.equal(clip_g.pooled_centre(), hidden.pooled_centre())
    with pytest.raises(InvalidInputError, match="measured clip_g only.*missing clip_l.*measure every encoder"):
        clip_g.centre_for_positions()
    assert _measure(xl, space="hidden", position=6, encoder="clip_l").pooled_centre() is None
    projected = _measure(xl, space="projected", encoder="clip_g")
    assert projected.encoders["clip_g"].centres.shape == (1, 48)
    assert projected.pooled_centre() is None  # only the conditioning space carries the pooled centre


def test_per_encoder_statistics_round_trip_through_json(xl, hidden, tmp_path):
    path = hidden.save_json(tmp_path / "xl.json")
    loaded = load_norm_stats(path)
    assert isinstance(loaded, PerEncoderNormStats) and loaded.family == "sdxl"
    assert torch.equal(loaded.centre_for_positions(), hidden.centre_for_positions())
    assert torch.equal(loaded.pooled_centre(), hidden.pooled_centre())
    assert loaded.summary() == hidden.summary() and loaded.to_json() == hidden.to_json()
    with pytest.raises(FileExistsError):
        hidden.save_json(path)
    assert hidden.plot_image().shape[-1] == 3 and hidden.save_plot(tmp_path / "xl.png").stat().st_size > 0
    data = json.loads(path.read_text())
    data["pooled_centre"][0] = None  # a damaged file: NaN where a number was
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(InvalidInputError, match="pooled vSLERP centre"):
        load_norm_stats(tmp_path / "bad.json")


def test_sd15_statistics_are_unchanged_and_load_as_before(tmp_path):
    sd15 = load_bundle("tiny")
    config = NormStatsConfig(position=6, template=TEMPLATE, class_word="character")
    single = compute_norm_stats(sd15.tokenizer, sd15.text_encoder, CAPTIONS, config)
    measured = measure_norm_stats(sd15.tokenizers, sd15.text_encoders, CAPTIONS, config, family=sd15.family)
    assert isinstance(measured, NormStats) and measured.to_json() == single.to_json()
    assert measured.pooled_centre() is None and measured.clip_skip == 1 and measured.after_final_norm
    # A file written before the per-encoder statistics (no `after_final_norm` key) still loads.
    data = single.to_json()
    del data["after_final_norm"]
    old = load_norm_stats(data)
    assert old.after_final_norm and old.summary() == single.summary()


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(space="projected"), "clip_l has none: set `encoder` to clip_g"),
        (dict(space="hidden", centre="layernorm_bias"), "SDXL's `hidden` conditioning is the raw hidden state"),
        (dict(encoder="clip_x"), "`encoder` must be one of clip_l, clip_g"),
    ],
)
def test_bad_settings_for_sdxl_name_the_setting(xl, settings, message):
    with pytest.raises(InvalidInputError, match=message):
        _measure(xl, **settings)


def test_an_sd15_model_has_no_clip_g():
    sd15 = load_bundle("tiny")
    with pytest.raises(InvalidInputError, match="`encoder` 'clip_g' is not a text encoder of SD1.5 models"):
        measure_norm_stats(sd15.tokenizers, sd15.text_encoders, CAPTIONS, NormStatsConfig(encoder="clip_g"), family=sd15.family)


def test_the_regulariser_takes_both_centres_and_interpolates_around_them(xl, hidden):
    bundle = load_bundle("tiny-sdxl")
    pivot = Pivot.at_initializer(bundle, "tok1", "character", templates=[TEMPLATE])
    g = torch.Generator().manual_seed(3)
    pivot = pivot.with_vectors([v + 0.5 * torch.randn(v.shape, generator=g) for v in pivot.vectors_by_key.values()], [], {})
    token = pivot.apply(bundle)
    centres = dict(centre=hidden.centre_for_positions(), pooled_centre=hidden.pooled_centre())
    vslerp = LocalityRegularizer(bundle, token, RegularizerConfig(mode="path", interpolation="vslerp", **centres)).conditionings(0)
    slerp = LocalityRegularizer(bundle, token, RegularizerConfig(mode="path")).conditionings(0)
    assert vslerp.hidden.shape == (1, 77, 96) and vslerp.pooled.shape == (1, 48)
    assert (vslerp.hidden - slerp.hidden).abs().max() > 1e-4 and (vslerp.pooled - slerp.pooled).abs().max() > 1e-4


def test_cli_measures_every_encoder_and_tune_reads_both_centres(xl, tmp_path, capsys):
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n")
    bundle = load_bundle("tiny-sdxl")
    embedding = Pivot.at_initializer(bundle, "tok1", "character", templates=[TEMPLATE]).save(tmp_path / "tok1.safetensors")
    out = tmp_path / "stats.json"
    assert main(["norm-stats", "--model", "tiny-sdxl", "--captions", str(captions), "--space", "hidden", "--template",
                 TEMPLATE, "--class-word", "character", "--embedding", str(embedding), "--out", str(out),
                 "--plot", str(tmp_path / "stats.png")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "text encoder clip_l (32 wide)" in printed and "text encoder clip_g (64 wide)" in printed
    stats = load_norm_stats(out)
    assert stats.centre_for_positions().shape == (77, 96) and stats.pooled_centre().shape == (48,)
    assert all(s.endpoints.trained and s.endpoints.index == 5 for s in stats.encoders.values())
    assert main(["norm-stats", "--model", "tiny-sdxl", "--captions", str(captions), "--space", "projected",
                 "--out", str(tmp_path / "projected.json")]) == 2  # fmt: skip
    assert "set --encoder to clip_g" in capsys.readouterr().err and not (tmp_path / "projected.json").exists()

    import argparse

    from pti_ops.cli.tune import add_tune_command, regularizer_from

    parser = argparse.ArgumentParser()
    add_tune_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tune", "--model", "tiny-sdxl", "--images", str(tmp_path), "--embedding", str(embedding),
                              "--reg", "path", "--reg-interp", "vslerp", "--norm-stats", str(out), "--out", str(tmp_path)])
    config = regularizer_from(args, "character", [TEMPLATE])
    assert torch.equal(config.centre, stats.centre_for_positions()) and torch.equal(config.pooled_centre, stats.pooled_centre())


def test_nodes_measure_an_sdxl_clip_and_feed_both_centres_to_the_regulariser(nodes, fake_models, monkeypatch):
    """EmbeddingNormStats with the bridge's SDXL encoders (tiny-sdxl standing in for a converted SDXL CLIP)."""
    bridge = sys.modules[PACK_NAME + ".nodes.bridge"]
    pack_bundle = sys.modules[PACK_NAME + ".pti_ops.models"].load_bundle("tiny-sdxl")
    monkeypatch.setattr(bridge, "text_encoders_from_comfy",
                        lambda clip: (pack_bundle.family, pack_bundle.tokenizers, pack_bundle.text_encoders))
    inputs = dict(clip=fake_models[1], captions="\n".join(CAPTIONS[:8]), captions_file="", space="hidden", position="",
                  template=TEMPLATE, class_word="character")  # fmt: skip
    stats, summary, plot = run_node(nodes["EmbeddingNormStats"], **inputs)
    assert list(stats.encoders) == ["clip_l", "clip_g"] and "text encoder clip_g" in summary
    assert plot.shape[0] == 1 and plot.shape[1] > 500  # one image, a row of histograms per encoder
    reg = run_node(nodes["SlerpRegularizer"], mode="path", anchor="character", templates=TEMPLATE, interpolation="vslerp",
                   t=0.5, t_jitter=0.0, weight=1.0, every=1, samples=1, timestep_min=0, timestep_max=999,
                   norm_stats=stats)[0]  # fmt: skip
    assert reg.centre.shape == (77, 96) and reg.pooled_centre.shape == (48,)
    only_g = run_node(nodes["EmbeddingNormStats"], **inputs, encoder="clip_g")[0]
    with pytest.raises(ValueError, match="measured clip_g only"):
        run_node(nodes["SlerpRegularizer"], mode="path", anchor="character", templates=TEMPLATE, interpolation="vslerp",
                 t=0.5, t_jitter=0.0, weight=1.0, every=1, samples=1, timestep_min=0, timestep_max=999,
                 norm_stats=only_g)  # fmt: skip
