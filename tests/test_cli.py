import json

import pytest
import torch
from safetensors import safe_open

from pti_ops.cli import main


def _invert_args(images, out, *extra):
    return ["invert", "--model", "tiny", "--images", str(images), "--token", "tok1", "--init-word", "character",
            "--template", "an anime illustration of {}", "--steps", "6", "--lr", "0.01", "--out", str(out), *extra]


def test_invert_writes_embedding_and_history(tmp_path, image_folder):
    out, history = tmp_path / "tok1.safetensors", tmp_path / "history.json"
    assert main(_invert_args(image_folder, out, "--history", str(history), "--history-every", "3")) == 0
    with safe_open(str(out), framework="pt") as f:
        assert list(f.keys()) == ["clip_l"] and f.get_tensor("clip_l").shape == (1, 32)
        meta = f.metadata()
    assert meta["placeholder"] == "tok1" and meta["initializer"] == "character"
    assert meta["steps"] == "6" and meta["lr"] == "0.01" and meta["norm_mode"] == "none" and meta["base_model"] == "tiny-sd15"
    data = json.loads(history.read_text())
    assert [r["step"] for r in data["history"]] == [3, 6]
    assert data["config"]["learning_rate"] == 0.01


def test_existing_output_is_kept_and_reported(tmp_path, image_folder, capsys):
    out = tmp_path / "tok1.safetensors"
    out.write_bytes(b"precious")
    assert main(_invert_args(image_folder, out)) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"


def test_user_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "tok1.safetensors"
    assert main(_invert_args(tmp_path / "missing", out)) == 2
    assert "error: image folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(_invert_args(tmp_path / "empty", out)) == 2
    assert "contains no image" in capsys.readouterr().err
    assert main(_invert_args(tmp_path / "empty", out)[:2] + ["no_model"] + _invert_args(tmp_path, out)[3:]) == 2
    assert "nothing is downloaded" in capsys.readouterr().err
    assert not out.exists()


def test_placeholder_already_known_is_reported(tmp_path, image_folder, capsys):
    args = _invert_args(image_folder, tmp_path / "x.safetensors")
    args[args.index("tok1")] = "character"
    assert main(args) == 2
    assert "already contains the token 'character'" in capsys.readouterr().err


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["invert", "--help"])
    text = capsys.readouterr().out
    for option in ("--model", "--images", "--token", "--init-word", "--template", "--steps", "--lr", "--out", "--history", "--norm-mode"):
        assert option in text


def test_demo_writes_its_report(tmp_path, capsys):
    from pti_ops.toyworld.train import build_untrained_bundle

    model = tmp_path / "toy_model"  # the pipeline, not the numbers: an untrained toy-world model
    build_untrained_bundle(0).save_pretrained(model)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--model", str(model)]) == 0
    for name in ("metrics.md", "metrics.json", "grid_reconstruction.png", "grid_edits.png", "inversion.png",
                 "lora_none.png", "lora_path.png", "tok1.safetensors", "lora_path.safetensors", "norm_stats.json"):
        assert (out / name).is_file(), name
    assert len(list((out / "images").glob("*.png"))) == 8
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {"inversion only", "LoRA, regulariser none", "LoRA, regulariser path"}
    assert "demo report in" in capsys.readouterr().out
    assert main(["demo", "--out", str(out), "--quick", "--model", str(model)]) == 2


def _tune_common(images):
    return ["--model", "tiny", "--images", str(images), "--steps", "4", "--lr", "0.001", "--rank", "2"]


def test_tune_writes_a_kohya_lora_around_the_embedding(tmp_path, image_folder):
    embedding = tmp_path / "tok1.safetensors"
    assert main(_invert_args(image_folder, embedding)) == 0
    lora, history = tmp_path / "tok1_lora.safetensors", tmp_path / "tune.json"
    args = ["tune", *_tune_common(image_folder), "--embedding", str(embedding), "--reg", "path", "--reg-weight", "0.5",
            "--out", str(lora), "--history", str(history)]
    assert main(args) == 0
    with safe_open(str(lora), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert sum(k.endswith(".alpha") for k in keys) * 3 == len(keys)
    assert meta["pivotal.placeholder"] == "tok1" and meta["pivotal.rank"] == "2"
    assert json.loads(meta["pivotal.regularizer"])["mode"] == "path"
    assert all("reg_loss" in r for r in json.loads(history.read_text())["history"])


def test_run_does_both_phases(tmp_path, image_folder):
    emb, lora = tmp_path / "e.safetensors", tmp_path / "l.safetensors"
    args = ["run", *_tune_common(image_folder), "--ti-steps", "3", "--ti-lr", "0.01", "--reg", "class",
            "--out-embedding", str(emb), "--out-lora", str(lora)]
    assert main(args) == 0
    with safe_open(str(emb), framework="pt") as f:
        assert f.metadata()["steps"] == "3"
    assert main(args) == 2  # outputs exist now


def test_vslerp_without_centres_is_reported(tmp_path, image_folder, capsys):
    args = ["run", *_tune_common(image_folder), "--ti-steps", "2", "--reg", "path", "--reg-interp", "vslerp",
            "--out-embedding", str(tmp_path / "e.safetensors"), "--out-lora", str(tmp_path / "l.safetensors")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no centre was given" in err
    assert "pivotal tuning of tok1" not in err  # refused before any training step
    assert not (tmp_path / "e.safetensors").exists()


def test_evaluate_and_sweep_share_the_sampling_options_and_defaults():
    import argparse

    from pti_ops.cli.evaluate import add_evaluate_command
    from pti_ops.cli.options import sampling_config
    from pti_ops.cli.sweep import add_sweep_command
    from pti_ops.metrics import SamplingConfig

    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command")
    add_evaluate_command(commands)
    add_sweep_command(commands)
    evaluate = parser.parse_args(["evaluate", "--model", "tiny", "--out", "r"])
    sweep = parser.parse_args(["sweep", "--model", "tiny", "--images", "i", "--kind", "inversion", "--lrs", "1e-3", "--out", "r"])
    assert sampling_config(evaluate) == sampling_config(sweep) == SamplingConfig()
    evaluate = parser.parse_args(["evaluate", "--model", "tiny", "--out", "r", "--steps", "7", "--batch-size", "2", "--cfg", "3"])
    sweep = parser.parse_args(["sweep", "--model", "tiny", "--images", "i", "--kind", "inversion", "--lrs", "1e-3", "--out", "r",
                               "--steps", "50", "--sample-steps", "7", "--sample-batch-size", "2", "--cfg", "3"])  # fmt: skip
    assert sampling_config(evaluate) == sampling_config(sweep) == SamplingConfig(steps=7, batch_size=2, cfg_scale=3.0)
    assert sweep.steps == 50  # the sweep's --steps trains


def test_the_same_run_gives_byte_identical_files_across_processes(tmp_path, image_folder):
    """Reproducibility a user can check with sha256sum: `run` twice, each in a fresh interpreter."""
    import hashlib
    import subprocess
    import sys
    from pathlib import Path

    digests = []
    for run in ("a", "b"):
        folder = tmp_path / run
        args = ["run", *_tune_common(image_folder), "--token", "tok1", "--init-word", "character", "--ti-steps", "3",
                "--ti-lr", "0.01", "--out-embedding", str(folder / "tok1.safetensors"), "--out-lora", str(folder / "lora.safetensors")]
        repo = Path(__file__).resolve().parents[1]
        subprocess.run([sys.executable, "-m", "pti_ops", *args], check=True, cwd=repo, capture_output=True)
        digests.append([hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in ("tok1.safetensors", "lora.safetensors")])
    assert digests[0] == digests[1]


def test_skipped_images_are_reported_on_every_run(tmp_path, image_folder, capsys, caplog):
    """Issue #16: the second run in the same process says it again (logged, and listed at the end of the output)."""
    (image_folder / "corrupt.png").write_bytes(b"garbage")
    for run in range(2):
        out = tmp_path / f"tok{run}.safetensors"
        with caplog.at_level("WARNING"):
            assert main(_invert_args(image_folder, out, "--skip-bad-images", "--steps", "1")) == 0
        err = capsys.readouterr().err
        assert "1 warning(s) during this run:" in err and "skipped 1 unreadable image(s)" in err and "corrupt.png" in err
    assert sum("corrupt.png" in record.getMessage() for record in caplog.records) == 2
    (image_folder / "corrupt.png").unlink()


def test_reg_help_names_the_modes_as_other_trainers_do(capsys):
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Differential Output Preservation (DOP" in text and "blank-prompt preservation" in text


def test_tune_bundles_the_embedding_into_the_lora_file(tmp_path, image_folder):
    embedding = tmp_path / "tok1.safetensors"
    assert main(_invert_args(image_folder, embedding, "--steps", "1")) == 0
    lora = tmp_path / "tok1_lora.safetensors"
    args = ["tune", *_tune_common(image_folder), "--embedding", str(embedding), "--out", str(lora), "--bundle-embedding"]
    assert main(args) == 0
    with safe_open(str(lora), framework="pt") as f, safe_open(str(embedding), framework="pt") as e:
        assert torch.equal(f.get_tensor("bundle_emb.tok1.clip_l"), e.get_tensor("clip_l"))
        assert f.metadata()["pivotal.bundled_embeddings"] == "tok1"


DATASET_OPTIONS = ["--buckets", "--mask-from", "alpha", "--mask-floor", "0.1", "--shuffle-tags", "--keep-tokens", "2",
                   "--caption-dropout", "0.2"]
COMMAND_ARGS = {
    "invert": ["--out", "e.safetensors"],
    "tune": ["--embedding", "e.safetensors", "--out", "l.safetensors"],
    "run": ["--out-embedding", "e.safetensors", "--out-lora", "l.safetensors"],
    "sweep": ["--kind", "inversion", "--lrs", "1e-3", "--out", "report"],
}


@pytest.mark.parametrize("command", sorted(COMMAND_ARGS))
def test_every_training_command_gives_the_dataset_its_buckets_masks_and_tags(command, tmp_path):
    from example_images import write_shaped_images
    from pti_ops.cli.invert import load_dataset_for
    from pti_ops.cli.main import build_parser
    from pti_ops.models import load_bundle
    from pti_ops.tag_captions import TagCaptions

    write_shaped_images(tmp_path, [(48, 48), (60, 36)], alpha_left=True)
    args = build_parser().parse_args([command, "--model", "tiny", "--images", str(tmp_path), "--resolution", "32",
                                      *COMMAND_ARGS[command], *DATASET_OPTIONS])
    dataset = load_dataset_for(args, load_bundle("tiny"))
    assert dataset.bucketed and [dataset.image_size(i) for i in range(2)] == [(32, 32), (24, 40)]
    assert dataset.masks is not None and dataset.masks[0].float().mean() < 200 and dataset.mask_floor == 0.1
    assert dataset.tag_captions == TagCaptions(shuffle_tags=True, keep_tokens=2, caption_dropout=0.2)
    defaults = build_parser().parse_args([command, "--model", "tiny", "--images", str(tmp_path), *COMMAND_ARGS[command]])
    plain = load_dataset_for(defaults, load_bundle("tiny"))
    assert not plain.bucketed and plain.masks is None and not plain.tag_captions.active


def test_run_trains_on_buckets_masks_and_tags_and_reports_the_buckets(tmp_path, caplog):
    from PIL import Image

    from example_images import write_shaped_images

    images = tmp_path / "images"
    for path in write_shaped_images(images, [(48, 48), (60, 36), (36, 60)], alpha_left=True):
        path.with_suffix(".txt").write_text("1girl, red body, blue hat")
        with Image.open(path) as image:
            image.putalpha(0)  # all transparent: nothing is left in the loss but the floor
            image.save(path)
    history = tmp_path / "history.json"
    args = ["run", "--model", "tiny-sdxl", "--images", str(images), "--resolution", "32", "--ti-steps", "2", "--steps", "2",
            "--captions", "files", *DATASET_OPTIONS, "--history", str(history), "--overwrite",
            "--out-embedding", str(tmp_path / "e.safetensors"), "--out-lora", str(tmp_path / "l.safetensors")]
    with caplog.at_level("INFO", logger="pti_ops"):
        assert main(args) == 0
    assert "3 aspect-ratio buckets (width x height): 40x24: 1 image, 32x32: 1 image, 24x40: 1 image" in caplog.messages
    floored = json.loads(history.read_text())
    assert main([*args, "--mask-floor", "0"]) == 0
    masked_out = json.loads(history.read_text())
    for phase in ("inversion", "tuning"):
        assert all(r["loss"] > 0 for r in floored[phase]["history"])
        assert all(r["loss"] == 0 for r in masked_out[phase]["history"])  # the mask reached both phases' loss


@pytest.mark.parametrize("option, value, message", [
    ("--mask-floor", "2", "--mask-floor must be between 0.0 and 1.0, got 2.0"),
    ("--caption-dropout", "1", "--caption-dropout must be below 1"),
    ("--bucket-step", "0", "--bucket-step must be a whole number of pixels"),
])  # fmt: skip
def test_bad_dataset_options_exit_2_naming_them_and_write_nothing(tmp_path, image_folder, capsys, option, value, message):
    out = tmp_path / "tok1.safetensors"
    assert main(_invert_args(image_folder, out, "--buckets", option, value)) == 2
    assert message in capsys.readouterr().err and not out.exists()
