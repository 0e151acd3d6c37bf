"""Config checks speak the user's words: the CLI names the option typed, a node the widget."""

import argparse
import re

import pytest
import torch
from comfy_stubs import comfy_env, fake_models, nodes, run_node  # noqa: F401

from pti_ops.checks import check_number, check_positive_int
from pti_ops.cli import main
from pti_ops.cli.option_words import in_option_words, name_option, option_names
from pti_ops.dataset import DatasetConfig, load_image_folder
from pti_ops.errors import InvalidInputError
from pti_ops.files.embedding_file import save_embedding


def test_a_check_error_carries_its_field_and_renames_it_once():
    with pytest.raises(InvalidInputError) as caught:
        check_number("t", 2.0, 0.0, 1.0)
    assert caught.value.field == "t"
    caught.value.rename("--reg-t")
    assert str(caught.value) == "--reg-t must be between 0.0 and 1.0, got 2.0." and caught.value.field is None
    assert InvalidInputError("`dropout` must be in [0, 1), got 2.").field == "dropout"  # written outside checks.py
    assert InvalidInputError("the dataset has no image.").field is None


def test_option_names_come_from_the_parser_and_fields_map_to_them():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", dest="sample_steps", type=int)
    parser.add_argument("-n", "--num-vectors", type=int)
    args = parser.parse_args([])
    args.option_names = option_names(parser)
    assert args.option_names == {"help": "--help", "sample_steps": "--steps", "num_vectors": "--num-vectors"}
    with pytest.raises(InvalidInputError, match=r"^--steps must be a positive integer"):
        with in_option_words(args, {"steps": "sample_steps"}):
            check_positive_int("steps", 0)
    err = name_option(InvalidInputError("`timestep_range` must satisfy …"), args, {"timestep_range": "--t-min/--t-max"})
    assert str(err).startswith("--t-min/--t-max must satisfy")
    assert str(name_option(InvalidInputError("`unknown` is bad"), args)) == "`unknown` is bad"  # no option: as it was


@pytest.fixture
def embedding(tmp_path):
    path = tmp_path / "tok1.safetensors"
    save_embedding(path, torch.randn(1, 32), metadata={"placeholder": "tok1", "initializer": "character"})
    return str(path)


CASES = [
    ("tune", ["--reg", "path", "--reg-t", "5"], "--reg-t must be between 0.0 and 1.0, got 5.0"),
    ("tune", ["--reg", "path", "--reg-weight", "-1"], "--reg-weight must be at least 0.0, got -1.0"),
    ("tune", ["--reg", "path", "--reg-every", "0"], "--reg-every must be a positive integer, got 0"),
    ("tune", ["--lr", "0"], "--lr must be a positive finite number"),
    ("invert", ["--num-vectors", "0"], "--num-vectors must be between 1 and 16, got 0"),  # checked inside training
    ("invert", ["--grad-accum", "0"], "--grad-accum must be a positive integer"),
    ("run", ["--ti-steps", "0"], "--ti-steps must be a positive integer, got 0"),
    ("run", ["--steps", "0"], "^error: --steps must be a positive integer, got 0"),
    ("run", ["--ti-lr", "-1"], "--ti-lr must be a positive finite number"),
]


@pytest.mark.parametrize("command, extra, message", CASES, ids=[" ".join(c[1]) for c in CASES])
def test_the_cli_names_the_option_typed(tmp_path, image_folder, embedding, capsys, command, extra, message):
    out = tmp_path / "out"
    args = {"invert": ["--out", str(out / "e.safetensors")], "tune": ["--embedding", embedding, "--out", str(out / "l.safetensors")],
            "run": ["--out-embedding", str(out / "e.safetensors"), "--out-lora", str(out / "l.safetensors")]}[command]
    argv = [command, "--model", "tiny", "--images", str(image_folder), *args, *extra]
    if "--steps" not in extra and command != "run":
        argv += ["--steps", "1"]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert re.search(message, error, flags=re.M), error
    assert "`" not in error.split("\n")[0].split(",")[0]  # no config field name left in the sentence's subject
    assert not out.exists()


def test_the_sweep_names_its_sampling_options_apart_from_its_training_ones(tmp_path, image_folder, capsys):
    base = ["sweep", "--model", "tiny", "--images", str(image_folder), "--kind", "inversion", "--lrs", "1e-3",
            "--out", str(tmp_path / "sweep")]
    assert main([*base, "--sample-steps", "0"]) == 2
    assert "error: --sample-steps must be a positive integer, got 0" in capsys.readouterr().err
    assert main([*base, "--steps", "0"]) == 2
    assert "error: --steps must be a positive integer, got 0" in capsys.readouterr().err
    assert main([*base, "--cfg", "-1"]) == 2
    assert "error: --cfg must be 0 or more" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_a_node_names_its_widget_where_it_differs_from_the_field(nodes, fake_models, tmp_path):
    images = tmp_path / "images"
    from example_images import write_example_images

    write_example_images(images, count=2, size=32)
    dataset = load_image_folder(images, DatasetConfig(resolution=32))
    model, clip, vae = fake_models
    inputs = dict(
        model=model, clip=clip, vae=vae, dataset=dataset, kind="inversion", learning_rates="1e-3", steps=1, eval_every=0,
        placeholder="tok1", initializer="character", templates="a {}", batch_size=1, seed=0, lora_rank=1,
        compare_without_regularizer=True, prompts="a {}", edit_prompts="", sample_seeds="0", sample_steps=1, cfg=-1.0,
        sampler="ddim", resolution=16, lpips="off", clip_model_folder="", output_folder="sweep", overwrite=False,
    )  # fmt: skip
    # (ComfyUI's widget bounds stop -1 in the editor; a config check is the last word for what they miss.)
    with pytest.raises(ValueError, match=r"^`cfg` must be 0 or more, got -1.0"):  # the field is `cfg_scale`
        run_node(nodes["PivotalSweep"], **inputs)
