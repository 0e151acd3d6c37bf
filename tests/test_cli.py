import json

import pytest
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
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "4"]) == 0
    assert (out / "tok1.safetensors").is_file() and (out / "history.json").is_file()
    assert len(list((out / "images").glob("*.png"))) == 6
    assert "demo report in" in capsys.readouterr().out
    assert main(["demo", "--out", str(out), "--steps", "4"]) == 2
