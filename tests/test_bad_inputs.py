"""The catalogue of bad inputs at the command line: each one is refused with a sentence naming the
input and what was expected, before any training, and nothing is written."""

import pickle
import re

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from example_images import write_example_images, write_png_header
from pti_ops.cli import main
from pti_ops.files.embedding_file import save_embedding


class Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


@pytest.fixture
def files(tmp_path, image_folder):
    """Inputs of every kind, good and bad, in a scratch folder; outputs go to tmp_path/out."""
    (tmp_path / "out").mkdir()
    save_embedding(tmp_path / "good.safetensors", torch.randn(1, 32), metadata={"placeholder": "tok1", "initializer": "character"})
    save_embedding(tmp_path / "sdxl_width.safetensors", torch.randn(1, 1280), metadata={"placeholder": "tok1"})
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"string_to_param": {"*": Payload()}}, f)
    save_file({"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 4)},
              str(tmp_path / "sdxl.safetensors"))
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "latin1.txt").write_bytes(b"a caf\xe9 on the beach\n")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (tmp_path / "bomb").mkdir()
    write_example_images(tmp_path / "bomb", count=2, size=48)
    write_png_header(tmp_path / "bomb" / "huge.png", 20000, 20000)
    (tmp_path / "dot").mkdir()
    Image.new("RGB", (1, 1)).save(tmp_path / "dot" / "one.png")
    (tmp_path / "grey").mkdir()
    Image.new("L", (48, 48), 200).save(tmp_path / "grey" / "g.png")
    return tmp_path


def invert(images, *extra, out="out/e.safetensors"):
    return ["invert", "--model", "tiny", "--images", images, "--steps", "2", "--out", out, *extra]


def tune(*extra, embedding="good.safetensors"):
    return ["tune", "--model", "tiny", "--images", "IMAGES", "--embedding", embedding, "--steps", "2",
            "--out", "out/l.safetensors", *extra]


CASES = [
    ("empty image folder", invert("empty_dir"), "contains no image"),
    ("missing image folder", invert("nowhere"), "does not exist or is not a folder"),
    ("only unreadable images", invert("broken"), "could not be read as images: a.png"),
    ("decompression-bomb image", invert("bomb"), "huge.png \\(400 Mpx, above the limit of 64 Mpx\\).*pass --skip-bad-images"),
    ("a 1x1 image", invert("dot"), "one.png \\(1x1 px, shorter side under 8 px.*No usable image is left"),
    ("seed past 2**64", invert("IMAGES", "--seed", str(2**70)), "--seed must be a whole number from 0 to 18446744073709551615"),
    ("negative seed", invert("IMAGES", "--seed", "-1"), "--seed must be a whole number from 0"),
    ("clip skip past the layers", invert("IMAGES", "--clip-skip", "99"), "--clip-skip must be between 1 \\(last layer\\) and 2"),
    ("norm strength nan", invert("IMAGES", "--norm-strength", "nan"), "--norm-strength must be a finite number"),
    ("max timestep 0", tune("--max-timestep", "0"), "--t-min/--t-max must satisfy"),
    ("placeholder past CLIP's 77 tokens", invert("IMAGES", "--template", "word " * 100 + "{}"),
     "puts the placeholder after CLIP's 77-token limit"),
    ("lora strength nan", ["evaluate", "--model", "tiny", "--lora-strength", "nan", "--out", "out/r"], "--lora-strength must be a finite number"),
    ("two-token initializer names --num-vectors", invert("IMAGES", "--init-word", "red character"), "or set --num-vectors to 2"),
    ("steps 0", invert("IMAGES", "--steps", "0"), "--steps must be a positive integer, got 0"),
    ("lr 0", invert("IMAGES", "--lr", "0"), "--lr must be a positive finite number"),
    ("lr nan", invert("IMAGES", "--lr", "nan"), "--lr must be a positive finite number"),
    ("placeholder in vocabulary", invert("IMAGES", "--token", "character"), "already contains the token 'character'"),
    ("placeholder with capitals", invert("IMAGES", "--token", "Tok1"), "must be one lowercase word"),
    ("two-token initializer, one vector", invert("IMAGES", "--init-word", "red character"), "is 2 tokens"),
    ("template without {}", invert("IMAGES", "--template", "a drawing of tok1"), "has no '\\{\\}'"),
    ("resolution off the model's grid", invert("IMAGES", "--resolution", "30"), "--resolution 30 is not a multiple of 4.*use 32"),
    ("timesteps reversed", invert("IMAGES", "--t-min", "900", "--t-max", "100"), "--t-min/--t-max must satisfy"),
    ("captions missing", invert("IMAGES", "--captions", "files"), "have no same-name .txt file"),
    ("device absent", invert("IMAGES", "--device", "cuda:7"), "not available on this machine"),
    ("output not .safetensors", invert("IMAGES", out="out/e.pt"), "must end in .safetensors"),
    ("rank 0", tune("--rank", "0"), "--rank must be a positive integer"),
    ("embedding of another width", tune(embedding="sdxl_width.safetensors"), "1280 wide but this sd15 model's text encoder needs 32"),
    ("pickled code in a .pt embedding", tune(embedding="evil.pt"), "was refused: it is not a plain tensor file"),
    ("class word of another length", tune("--reg", "path", "--reg-anchor", "red character"), "class word --reg-anchor 'red character' is 2 tokens"),
    ("vslerp without centres", tune("--reg", "path", "--reg-interp", "vslerp"), "no centre was given"),
    ("regulariser t out of range", tune("--reg", "path", "--reg-t", "2"), "--reg-t must be between 0.0 and 1.0, got 2.0"),
    ("SDXL single-file model", invert("IMAGES") [:2] + ["sdxl.safetensors"] + invert("IMAGES")[3:], "unsupported model"),
    ("empty caption file", ["norm-stats", "--model", "tiny", "--captions", "empty.txt", "--out", "out/s.json"], "empty.txt has no captions.*give at least 2 captions"),
    ("caption file not UTF-8", ["norm-stats", "--model", "tiny", "--captions", "latin1.txt", "--out", "out/s.json"], "latin1.txt line 1 is not valid UTF-8.*save the file as UTF-8"),
]


@pytest.mark.parametrize("args, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_clearly_and_nothing_is_written(files, image_folder, monkeypatch, capsys, args, message):
    monkeypatch.chdir(files)
    args = [str(image_folder) if a == "IMAGES" else a for a in args]
    printed = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: printed.append(" ".join(map(str, a))))
    assert main(args) == 2
    error = " ".join(printed) + capsys.readouterr().err
    assert "error:" in error
    assert re.search(message, error), error
    assert "pickled code ran" not in error
    assert list((files / "out").iterdir()) == []


def test_grayscale_images_train(files, monkeypatch):
    monkeypatch.chdir(files)
    assert main(invert("grey")) == 0
    assert (files / "out" / "e.safetensors").is_file()


def test_a_bomb_beside_good_images_is_skipped_with_a_warning_under_skip_bad_images(files, monkeypatch, capsys):
    monkeypatch.chdir(files)
    assert main(invert("bomb", "--skip-bad-images")) == 0
    err = capsys.readouterr().err
    assert "skipped 1 image(s) of a refused size" in err and "huge.png (400 Mpx" in err and "Traceback" not in err
    assert (files / "out" / "e.safetensors").is_file()
