"""Learning-rate sweeps: the analysis on synthetic curves, both sweeps and the command on the tiny model."""

import csv
import json
import math
import random

import pytest
import torch
from PIL import Image

from pti_ops.models import load_bundle
from pti_ops.cli import main
from pti_ops.files.embedding_file import load_embedding, save_embedding
from pti_ops.errors import InvalidInputError, OutputExistsError
from pti_ops.inversion import InversionConfig
from pti_ops.files.lora_file import load_lora
from pti_ops.lora_tune import TuneConfig
from pti_ops.metrics.evaluation import EvaluationConfig, Scorers
from pti_ops.metrics.lpips_model import load_lpips
from pti_ops.regularizer import RegularizerConfig
from pti_ops.metrics.sampling import SamplingConfig
from pti_ops.sweeps.run import _check_regularizers, inversion_sweep, lora_sweep
from pti_ops.sweeps.analysis import check_learning_rates, find_knee, fit_through_origin, position_learning_onset
from pti_ops.sweeps.report import SweepReport, check_sweep_kind

LRS = [2e-3, 1e-2]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from pti_ops.dataset import DatasetConfig, load_image_folder
    from example_images import write_example_images

    folder = tmp_path_factory.mktemp("images")
    write_example_images(folder, count=3, size=48)
    return load_image_folder(folder, DatasetConfig(resolution=32))


@pytest.fixture(scope="module")
def scorers():
    torch.manual_seed(0)
    # A random backbone, asked for explicitly: no weights are read. Identical images still score 0.
    return Scorers(lpips=load_lpips("alex", random_backbone=True))


def _eval_config(**overrides):
    settings = dict(prompts=["an anime illustration of {}"], edit_prompts=["a photo of {} on the beach"], seeds=[0, 1],
                    sampling=SamplingConfig(steps=2), locality_timesteps=(500,))
    return EvaluationConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def inversion_report(dataset, scorers):
    config = InversionConfig(steps=6, history_every=3, max_norm_ratio=None)
    return inversion_sweep(lambda: load_bundle("tiny"), dataset, config, LRS, _eval_config(), scorers, eval_every=3)


def _no_bundle():
    pytest.fail("a bad input must be refused before any model is loaded")


# --- the analysis on synthetic inputs --------------------------------------------------------------


def test_fit_through_origin_known_answers():
    exact = fit_through_origin([1, 2, 3], [2, 4, 6])
    assert exact.slope == pytest.approx(2.0) and exact.r_squared == pytest.approx(1.0) and exact.points == 3
    noisy = fit_through_origin([1, 2, 3, 4], [1.1, 1.9, 3.2, 3.9])
    assert noisy.slope == pytest.approx((1.1 + 3.8 + 9.6 + 15.6) / 30) and 0.9 < noisy.r_squared < 1
    assert fit_through_origin([1], [5]).r_squared is None
    with pytest.raises(InvalidInputError, match="at least one record with lr × steps > 0"):
        fit_through_origin([0, 0], [1, 2])


def _kneed_curve():
    """Reconstruction gains 1 per unit distance up to d = 1, then 0.1; editability falls throughout."""
    d = [i * 0.25 for i in range(9)]
    r = [min(x, 1.0) + 0.1 * max(x - 1.0, 0.0) for x in d]
    e = [1.0 - 0.3 * x for x in d]
    return d, r, e


def test_knee_is_found_where_the_gain_falls_while_editability_falls():
    d, r, e = _kneed_curve()
    knee, reason = find_knee(d, r, e, threshold=0.5)
    assert reason == "" and knee.index == 4 and knee.distance == 1.0
    assert knee.initial_slope == pytest.approx(1.0) and knee.slope_after == pytest.approx(0.1)
    order = list(range(9))
    random.Random(0).shuffle(order)  # the order of the points does not matter; the index is the caller's
    knee, _ = find_knee([d[i] for i in order], [r[i] for i in order], [e[i] for i in order])
    assert order[knee.index] == 4
    # Repeated distances (two runs at one distance) are averaged, not divided by zero.
    knee, _ = find_knee(d + [1.0], r + [1.0], e + [0.7])
    assert knee.distance == 1.0


@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(threshold=0.05), "never fell below 0.05 × the initial slope"),
        (dict(e=[1.0 + 0.3 * i for i in range(9)]), "while editability fell"),
        (dict(r=[-x for x in _kneed_curve()[0]]), "did not improve on the first segment"),
        (dict(d=[0, 1], r=[0, 1], e=[1, 0]), "needs at least 3 points at different distances, got 2"),
    ],
)
def test_no_knee_says_why(change, reason):
    d, r, e = _kneed_curve()
    args = dict(d=d, r=r, e=e, threshold=0.5) | change
    knee, why = find_knee(args["d"], args["r"], args["e"], args["threshold"])
    assert knee is None and reason in why


def test_onset_of_position_learning_on_synthetic_spreads():
    lrs, spreads = [5e-3, 1e-4, 2e-3, 5e-4], [0.02, 0.2, 0.08, 0.18]
    assert position_learning_onset(lrs, spreads, base_spread=0.2) == (2e-3, "")
    assert position_learning_onset(lrs, spreads, base_spread=0.2, fraction=0.3) == (5e-3, "")
    assert position_learning_onset(lrs, [None, 0.2, 0.08, 0.18], 0.2) == (2e-3, "")  # unmeasured rows are skipped
    lr, reason = position_learning_onset(lrs, [0.19] * 4, 0.2)
    assert lr is None and "stayed at or above 0.5 × the base spread (0.1)" in reason
    assert position_learning_onset(lrs, spreads, None)[0] is None
    with pytest.raises(InvalidInputError, match="`onset_fraction` must be a fraction in \\(0, 1\\], got 1.5"):
        position_learning_onset(lrs, spreads, 0.2, fraction=1.5)


@pytest.mark.parametrize(
    "lrs, message",
    [
        ([], "`learning_rates` is empty: give at least one learning rate"),
        ([1e-4, -1e-3], "must hold positive finite numbers, got -0.001 at position 2"),
        ([0.0], "must hold positive finite numbers, got 0.0 at position 1"),
        ([1e-4, 1e-4], "lists 0.0001 twice"),
    ],
)
def test_bad_learning_rates_raise_clear_errors(lrs, message):
    with pytest.raises(InvalidInputError, match=message):
        check_learning_rates(lrs)


def test_bad_sweep_inputs_are_refused_before_any_model_is_loaded(dataset):
    config = InversionConfig(steps=4, history_every=2)
    with pytest.raises(InvalidInputError, match="`learning_rates` is empty"):
        inversion_sweep(_no_bundle, dataset, config, [], _eval_config())
    with pytest.raises(InvalidInputError, match="`eval_every` \\(3\\) must be a multiple of `history_every` \\(2\\)"):
        inversion_sweep(_no_bundle, dataset, config, LRS, _eval_config(), eval_every=3)
    with pytest.raises(InvalidInputError, match="placeholder 'cat' is not the trained token 'tok1'"):
        inversion_sweep(_no_bundle, dataset, config, LRS, _eval_config(placeholder="cat"))
    with pytest.raises(InvalidInputError, match="`knee_threshold` must be a fraction"):
        inversion_sweep(_no_bundle, dataset, config, LRS, _eval_config(), knee_threshold=0)
    vectors, tune = torch.zeros(1, 32), TuneConfig(steps=2)
    with pytest.raises(InvalidInputError, match="`regularizers` is empty: give \\[None\\]"):
        lora_sweep(_no_bundle, dataset, vectors, "tok1", "character", tune, LRS, [], _eval_config())
    with pytest.raises(InvalidInputError, match="`interpolation` is `vslerp` but no centre was given"):
        lora_sweep(_no_bundle, dataset, vectors, "tok1", "character", tune, LRS,
                   [RegularizerConfig(mode="path", interpolation="vslerp")], _eval_config())
    with pytest.raises(InvalidInputError, match="sweep kind must be one of inversion, lora, got 'gan'"):
        check_sweep_kind("gan")
    with pytest.raises(InvalidInputError, match="sweep kind must be one of"):
        SweepReport("gan", [])


def test_regulariser_labels_are_unique():
    regs = _check_regularizers([None, {"mode": "path"}, RegularizerConfig(mode="path", weight=0.5),
                                RegularizerConfig(mode="path"), RegularizerConfig(mode="class", weight=0)])
    assert list(regs) == ["none", "path", "path w=0.5", "path #2", "none #2"]
    assert regs["none #2"] is None  # weight 0 is no regulariser


# --- the inversion sweep on the tiny model ---------------------------------------------------------


def test_inversion_sweep_distance_grows_with_lr_and_fits_a_positive_slope(inversion_report):
    rows = inversion_report.rows
    assert [(r["run"], r["step"]) for r in rows] == [("initial", 0), ("lr=0.002", 3), ("lr=0.002", 6), ("lr=0.01", 3), ("lr=0.01", 6)]
    final = [r for r in rows if r["step"] == 6]
    assert [r["lr"] for r in final] == LRS and final[0]["distance"] < final[1]["distance"]  # same steps, same seed
    for row in rows[1:]:
        assert row["lr_x_steps"] == pytest.approx(row["lr"] * row["step"])
        trace = {p["step"]: p["distance"] for p in inversion_report.traces[row["run"]]}
        assert row["distance"] == trace[row["step"]]
    fit = inversion_report.summary["distance_fit"]
    assert fit["slope"] > 0 and fit["points"] == 4 and fit["r_squared"] is not None and fit["r_squared"] <= 1
    # The initializer itself: distance 0, and its edit images are the class word's, pixel for pixel.
    assert rows[0]["distance"] == 0.0 and rows[0]["edit_drift_l2"] == 0.0 and rows[0]["edit_drift_lpips"] == 0.0
    assert rows[-1]["edit_drift_l2"] > 0
    assert inversion_report.summary["knee_axes"] == {"reconstruction": "reconstruction_lpips", "editability": "edit_drift_lpips"}
    knee = inversion_report.summary["knee"]
    assert (knee is None and inversion_report.summary["knee_reason"]) or knee["distance"] > 0


def test_missing_clip_makes_clip_columns_not_computed_with_the_reason(inversion_report):
    not_computed = inversion_report.not_computed
    assert not_computed["reconstruction_clip"].startswith("no CLIP model folder given")
    assert not_computed["editability_clip"].startswith("no CLIP model folder given")
    assert all(r["editability_clip"] is None for r in inversion_report.rows)
    markdown = inversion_report.to_markdown()
    assert "- editability_clip: no CLIP model folder given" in markdown and "| n/c |" in markdown


def test_sweep_report_files_are_written_and_readable(inversion_report, tmp_path):
    written = inversion_report.save(tmp_path)
    with open(tmp_path / "sweep.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(inversion_report.rows) and table[0]["reconstruction_clip"] == ""
    assert [float(r["distance"]) for r in table] == [r["distance"] for r in inversion_report.rows]
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["kind"] == "inversion" and data["summary"]["distance_fit"]["slope"] > 0
    assert data["not_computed"]["editability_clip"].startswith("no CLIP") and data["settings"]["learning_rates"] == LRS
    assert "| run | lr | step |" in (tmp_path / "sweep.md").read_text()
    for name in ("plots/inversion_curves.png", "plots/distance_fit.png", "grids/reconstruction.png", "grids/editability.png"):
        with Image.open(tmp_path / name) as image:
            assert image.mode == "RGB" and image.width > 100 and image.height > 50
    # The saved embedding of a row reproduces its measured distance from the initializer row.
    row = inversion_report.rows[-1]
    base = load_bundle("tiny")
    start = base.text_encoder.get_input_embeddings().weight[base.tokenizer.convert_tokens_to_ids("character</w>")]
    saved = load_embedding(tmp_path / row["embedding_file"])
    assert math.isclose((saved.for_family("sd15", 32)[0] - start).norm().item(), row["distance"], rel_tol=1e-5)
    assert saved.metadata["steps"] == "6" and len(written) == 7 + 4
    with pytest.raises(OutputExistsError, match="sweep.csv already exists"):
        inversion_report.save(tmp_path)


# --- the LoRA sweep on the tiny model --------------------------------------------------------------


def test_lora_sweep_measures_locality_spread_and_onset(dataset, scorers):
    vectors = torch.randn(1, 32, generator=torch.Generator().manual_seed(0)) * 0.1
    report = lora_sweep(lambda: load_bundle("tiny"), dataset, vectors, "tok1", "character", TuneConfig(steps=2, history_every=1),
                        [1e-3, 1e-1], [None], _eval_config(), scorers)
    base, low, high = report.rows
    assert [r["run"] for r in report.rows] == ["base", "none lr=0.001", "none lr=0.1"]
    assert base["locality_eps_mse"] is None and "no LoRA applied" in base["reasons"]["locality_eps_mse"]
    assert 0 < low["locality_eps_mse"] < high["locality_eps_mse"]  # a larger lr changes other prompts more
    assert all(r["position_spread"] is not None and r["diversity_lpips"] > 0 for r in report.rows)
    summary = report.summary
    assert summary["base_position_spread"] == base["position_spread"] and "none" in summary["onset_lr"]
    assert summary["onset_lr"]["none"] is not None or summary["onset_reason"]["none"]
    assert set(report.plots) == {"lora_curves"} and set(report.grids) == {"reconstruction", "editability"}
    assert low["lora_file"] == "loras/tok1_none_lr0.001.safetensors" and low["reg_loss"] is None


# --- the command ----------------------------------------------------------------------------------


def _sweep_args(*extra):
    from pti_ops.cli import build_parser

    return build_parser().parse_args(["sweep", "--model", "tiny", "--images", "unused", *extra])


@pytest.mark.parametrize(
    "extra, error, message",
    [
        (["--kind", "gan", "--lrs", "1e-3"], InvalidInputError, "sweep kind must be one of inversion, lora, got 'gan'"),
        (["--kind", "inversion", "--lrs", "1e-3,x"], InvalidInputError, "--lrs '1e-3,x' must be comma-separated numbers"),
        (["--kind", "inversion", "--lrs", ","], InvalidInputError, "^--lrs is empty"),
        (["--kind", "inversion", "--lrs", "1e-3,-2e-3"], InvalidInputError, "^--lrs must hold positive finite numbers, got -0.002"),
        (["--kind", "lora", "--lrs", "1e-3"], InvalidInputError, "--kind lora needs --embedding"),
        (["--kind", "lora", "--lrs", "1e-3", "--embedding", "x", "--reg", "none,blur"], InvalidInputError, "--reg 'blur' is not a regulariser"),
    ],
)
def test_command_refuses_bad_inputs(tmp_path, extra, error, message, monkeypatch):
    import pti_ops.cli.sweep as cli_sweep

    monkeypatch.setattr(cli_sweep, "load_embedding", lambda path: type("E", (), {"metadata": {}})())
    monkeypatch.setattr(cli_sweep, "load_bundle", lambda *a, **k: pytest.fail("loaded a model before checking the inputs"))
    args = _sweep_args(*extra, "--out", str(tmp_path / "report"))
    with pytest.raises(error, match=message):
        args.handler(args)


def test_command_refuses_a_non_empty_out_before_training(tmp_path, image_folder, monkeypatch):
    import pti_ops.cli.sweep as cli_sweep

    out = tmp_path / "report"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    monkeypatch.setattr(cli_sweep, "load_bundle", lambda *a, **k: pytest.fail("loaded a model before checking --out"))
    args = _sweep_args("--kind", "inversion", "--lrs", "1e-3", "--out", str(out))
    with pytest.raises(OutputExistsError, match="is not empty: choose another folder or pass --overwrite"):
        args.handler(args)
    assert (out / "notes.txt").read_text() == "precious"


def test_sweep_command_end_to_end(tmp_path, image_folder, capsys):
    embedding, out = tmp_path / "tok1.safetensors", tmp_path / "lora_report"
    save_embedding(embedding, torch.randn(1, 32, generator=torch.Generator().manual_seed(0)) * 0.1,
                   metadata={"placeholder": "tok1", "initializer": "character"})
    common = ["--model", "tiny", "--images", str(image_folder), "--resolution", "32", "--steps", "2", "--history-every", "1",
              "--seeds", "0,1", "--sample-steps", "2", "--lpips", "random", "--prompts", "a picture of {}",
              "--edit-prompts", "a photo of {} on the beach", "--clip-model", str(tmp_path / "no_clip")]
    assert main(["sweep", "--kind", "lora", "--embedding", str(embedding), "--lrs", "1e-2", "--reg", "none,class",
                 *common, "--out", str(out)]) == 0
    data = json.loads((out / "sweep.json").read_text())
    assert [r["run"] for r in data["rows"]] == ["base", "none lr=0.01", "class lr=0.01"]
    assert data["rows"][1]["reg_loss"] is None and data["rows"][2]["reg_loss"] > 0
    assert "no_clip" in data["not_computed"]["editability_clip"]  # the folder is named in the reason
    assert data["settings"]["regularizers"]["class"]["anchor"] == "character"
    assert (out / "plots" / "lora_curves.png").stat().st_size > 0 and (out / "grids" / "reconstruction.png").stat().st_size > 0
    kohya, _ = load_lora(out / data["rows"][-1]["lora_file"])
    assert kohya
    assert main(["sweep", "--kind", "lora", "--embedding", str(embedding), "--lrs", "1e-3", *common, "--out", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_a_diverging_run_is_reported_and_the_sweep_goes_on(dataset, scorers):
    # lr 1 moves the tiny model's token (vocabulary norm ~0.1) far past 1.5 x that norm at its first step.
    config = InversionConfig(steps=2, history_every=1, max_norm_ratio=1.5)
    report = inversion_sweep(lambda: load_bundle("tiny"), dataset, config, [1.0, 1e-3], _eval_config(), scorers)
    assert "training diverged" in report.summary["stopped_before_any_record"]["lr=1"]
    assert [(r["run"], r["step"]) for r in report.rows] == [("initial", 0), ("lr=0.001", 2)]
    assert list(report.traces) == ["lr=0.001"] and set(report.plots) == {"inversion_curves", "distance_fit"}


def test_sweep_with_default_scorers_on_a_fresh_machine_goes_on_without_lpips(tmp_path, image_folder, monkeypatch, capsys):
    """A default never needs a file the package cannot ship: no AlexNet weights → LPIPS 'not computed', with the reason."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "fresh_hub"))
    out = tmp_path / "report"
    assert main(["sweep", "--model", "tiny", "--images", str(image_folder), "--resolution", "32", "--kind", "inversion",
                 "--lrs", "1e-3", "--steps", "1", "--history-every", "1", "--seeds", "0,1", "--sample-steps", "1",
                 "--out", str(out)]) == 0  # fmt: skip
    data = json.loads((out / "sweep.json").read_text())
    assert any("alexnet-owt-7be5be79.pth" in reason for reason in data["not_computed"].values()), data["not_computed"]
    assert "LPIPS metrics not computed" in capsys.readouterr().err
