"""The demo and the benchmark run end to end (quick sizes, an untrained toy-world model: the pipeline, not the numbers)."""

import json

import pytest
from PIL import Image

from pti_ops.cli import main
from pti_ops.toyworld.benchmark import BenchmarkConfig, results_markdown, run_benchmark, write_results
from pti_ops.toyworld.study import StudySettings, measure
from pti_ops.toyworld.world import HELD_OUT_CHARACTERS, character_images


@pytest.fixture(scope="module")
def untrained_model(tmp_path_factory):
    from pti_ops.toyworld.train import build_untrained_bundle

    folder = tmp_path_factory.mktemp("toy") / "model"
    build_untrained_bundle(0).save_pretrained(folder)
    return str(folder)


def test_benchmark_quick_runs_and_writes_its_report(untrained_model, tmp_path):
    report = run_benchmark(BenchmarkConfig.quick(untrained_model), log=lambda *_: None)
    rows = report["rows"]
    assert {r["lr"] for r in rows["inversion"]} == {1e-3, 1e-2}
    # Distances grow with lr at equal steps, and the fitted slope says so.
    by_lr = {lr: max(r["distance"] for r in rows["inversion"] if r["lr"] == lr) for lr in (1e-3, 1e-2)}
    assert by_lr[1e-2] > by_lr[1e-3] > 0
    assert report["results"]["inversion"]["slope"]["slope"] > 0
    assert {m["mode"] for m in report["results"]["modes"]} == {"none", "path"}
    path = write_results(report, tmp_path / "results.md")
    text = path.read_text()
    assert text.startswith("# Toy-world benchmark results") and "## 3. Regulariser modes" in text
    assert json.loads(path.with_suffix(".json").read_text())["results"] == json.loads(json.dumps(report["results"]))
    assert results_markdown(report) == text


def test_benchmark_command_quick(untrained_model, tmp_path, capsys):
    out = tmp_path / "docs" / "results.md"
    assert main(["benchmark", "toyworld", "--quick", "--model", untrained_model, "--out", str(out)]) == 0
    assert out.is_file() and "wrote" in capsys.readouterr().out


def test_measure_reads_the_rendered_character_back(untrained_model, monkeypatch):
    """With generations replaced by renders of the character, the oracle scores are exact."""
    import torch

    from pti_ops.models import load_bundle
    from pti_ops.toyworld import study

    character = HELD_OUT_CHARACTERS[1]
    renders = character_images(character, n=2, corner="middle right", size="small")
    monkeypatch.setattr(study, "_generate", lambda bundle, prompts, settings: renders.repeat(len(prompts), 1, 1, 1))
    metrics, _ = measure(load_bundle(untrained_model), "tok1", character, StudySettings(seeds=[0, 1]), with_locality=False)
    assert metrics["reconstruction"] == 1.0 and metrics["edit_identity"] == 1.0
    # Small renders on the right obey "a small tok1" and "a small tok1 on the right", not "… in the bottom right".
    assert metrics["editability"] == pytest.approx(2 / 3) and metrics["edit_obeyed"] == pytest.approx(2 / 3)
    assert metrics["position_spread_px"] < 1.5
    assert torch.equal(renders, character_images(character, n=2, corner="middle right", size="small"))
