"""A seeded fuzz test of the command line: malformed inputs of every kind, each refused cleanly.

A fixed-seed generator draws cases from the kinds of inputs users get wrong — broken, truncated, empty,
odd-mode, 1x1, forged-header and animated images; empty, binary and huge captions; odd placeholder names;
out-of-range and non-numeric numbers; files with NaN; garbage files; bad model and output paths — and runs
each through `main()` in this process (`--model tiny`, one step). For each it asserts what the README
promises: exit code 2 with an `error:` sentence, no traceback, nothing written to the outputs; or, for the
inputs documented as warnings (skipped images, animated images, prompts cut at 77 tokens), exit 0 with that
warning. A new seed draws other cases: `PTI_FUZZ_SEED=… pytest tests/test_cli_fuzz.py`.
"""

import json
import os
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from example_images import write_animated, write_example_images, write_png_header
from PIL import Image
from safetensors.torch import save_file

from pti_ops.cli import main
from pti_ops.files import save_embedding, save_lora

SEED = int(os.environ.get("PTI_FUZZ_SEED", "20240617"))
CASES_PER_KIND = 8


@dataclass
class Case:
    """One command line and what it must give: `refused` (exit 2) or a documented warning (exit 0)."""

    name: str
    argv: list[str]
    warning: str | None = None  # a regex the run's repeated warnings must match; None = refused


class Workspace:
    """Good inputs made once (images, an embedding, a LoRA, norm statistics), and a fresh folder per case."""

    def __init__(self, root: Path):
        self.root = root
        self.good = root / "good"
        write_example_images(self.good, count=2, size=48)
        self.embedding = root / "tok1.safetensors"
        save_embedding(self.embedding, torch.randn(1, 32) * 0.1, metadata={"placeholder": "tok1", "initializer": "character"})
        (root / "captions.txt").write_text("a red character\na blue character\na character in a city\na cat\n")
        self.captions = root / "captions.txt"
        self.count = 0

    def folder(self, name: str) -> Path:
        self.count += 1
        path = self.root / f"{self.count:03d}_{name}"
        path.mkdir()
        return path

    def images_with(self, name: str, write, good: int = 2) -> Path:
        folder = self.folder(name)
        if good:
            write_example_images(folder, count=good, size=48)
        write(folder)
        return folder


def invert(ws: Workspace, images, *extra, name="invert") -> Case:
    out = ws.folder("out") / "e.safetensors"
    return Case(name, ["invert", "--model", "tiny", "--images", str(images), "--steps", "1", "--out", str(out), *extra])  # fmt: skip


def tune(ws: Workspace, *extra, embedding=None, name="tune") -> Case:
    out = ws.folder("out") / "l.safetensors"
    return Case(name, ["tune", "--model", "tiny", "--images", str(ws.good), "--embedding", str(embedding or ws.embedding),
                       "--steps", "1", "--out", str(out), *extra])  # fmt: skip


def evaluate(ws: Workspace, *extra, name="evaluate") -> Case:
    out = ws.folder("report")
    return Case(name, ["evaluate", "--model", "tiny", "--seeds", "0,1", "--steps", "1", "--lpips", "off", "--out", str(out),
                       *extra])  # fmt: skip


def norm_stats(ws: Workspace, *extra, name="norm-stats") -> Case:
    out = ws.folder("out") / "stats.json"
    return Case(name, ["norm-stats", "--model", "tiny", "--captions", str(ws.captions), "--out", str(out), *extra])  # fmt: skip


def garbage(rng: random.Random, folder: Path, name: str) -> Path:
    """Random bytes, a zero-byte file, or the start of a real file, under `name`."""
    path = folder / name
    kind = rng.choice(["random", "empty", "text", "truncated_safetensors"])
    if kind == "random":
        path.write_bytes(rng.randbytes(rng.randint(1, 4096)))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("".join(rng.choices(string.printable, k=rng.randint(1, 300))))
    else:
        save_file({"clip_l": torch.randn(1, 32)}, str(path))
        data = path.read_bytes()
        path.write_bytes(data[: rng.randint(1, len(data) - 1)])
    return path


# --- the kinds of malformed input -------------------------------------------------------------------


def bad_image(rng: random.Random, ws: Workspace) -> Case:
    """A broken, forged, tiny or unreadable image beside good ones; skipped with a warning when asked."""
    kind = rng.choice(["truncated", "zero_bytes", "random_bytes", "huge_header", "tiny", "text_as_jpeg"])
    suffix = rng.choice([".png", ".jpg", ".webp"])

    def write(folder: Path):
        path = folder / f"bad{suffix}"
        if kind == "truncated":
            Image.new("RGB", (64, 64), (200, 10, 10)).save(path)
            data = path.read_bytes()
            path.write_bytes(data[: rng.randint(8, len(data) // 2)])
        elif kind == "zero_bytes":
            path.write_bytes(b"")
        elif kind == "random_bytes":
            path.write_bytes(rng.randbytes(rng.randint(1, 2048)))
        elif kind == "huge_header":
            side = rng.randint(8001, 60000)
            write_png_header(path.with_suffix(".png"), side, rng.randint(64_000_000 // side + 1, 60000))
        elif kind == "tiny":
            Image.new("RGB", (rng.randint(1, 7), rng.randint(1, 64)), (0, 0, 0)).save(path.with_suffix(".png"))
        else:
            path.with_suffix(".jpg").write_text("not an image at all")

    skip = rng.random() < 0.3
    case = invert(ws, ws.images_with(f"bad_{kind}", write), *(["--skip-bad-images"] if skip else []), name=f"image {kind}")
    case.warning = r"skipped 1 (unreadable image|image\(s\) of a refused size)" if skip else None
    return case


def only_bad_images(rng: random.Random, ws: Workspace) -> Case:
    """Nothing usable is left, even when skipping."""
    def write(folder: Path):
        for i in range(rng.randint(1, 3)):
            if rng.random() < 0.5:
                Image.new(rng.choice(["RGB", "L"]), (1, 1)).save(folder / f"dot{i}.png")
            else:
                garbage(rng, folder, f"junk{i}{rng.choice(['.png', '.jpg', '.webp'])}")

    return invert(ws, ws.images_with("only_bad", write, good=0), "--skip-bad-images", name="only bad images")


def animated_image(rng: random.Random, ws: Workspace) -> Case:
    suffix = rng.choice([".webp", ".png"])
    frames = [tuple(rng.randrange(256) for _ in range(3)) for _ in range(rng.randint(2, 4))]
    folder = ws.images_with("animated", lambda f: write_animated(f / f"moving{suffix}", frames))
    case = invert(ws, folder, name=f"animated {suffix}")
    case.warning = r"1 animated image\(s\) .*only the first frame"
    return case


def odd_caption(rng: random.Random, ws: Workspace) -> Case:
    kind = rng.choice(["empty", "blank", "binary", "no_placeholder", "huge_placeholder_last", "huge_placeholder_first",
                       "missing"])  # fmt: skip
    texts = {
        "empty": b"", "blank": b" \n\t \n", "binary": b"\xff\xfe" + rng.randbytes(64), "no_placeholder": b"a picture of a cat",
        "huge_placeholder_last": ("word " * rng.randint(80, 3000) + "{}").encode(),
        "huge_placeholder_first": ("{} " + "word " * rng.randint(80, 3000)).encode(),
    }  # fmt: skip

    def write(folder: Path):
        for image in folder.glob("*.png"):
            if kind != "missing":
                image.with_suffix(".txt").write_bytes(texts[kind])

    case = invert(ws, ws.images_with(f"caption_{kind}", write), "--captions", "files", name=f"caption {kind}")
    if kind == "huge_placeholder_first":
        case.warning = r"training prompt\(s\) are longer than CLIP's 77 tokens and are cut there"
    if kind == "no_placeholder":  # documented: the token goes in front as the first tag, with a warning
        case.warning = r"caption\(s\) hold neither \{\} nor the token 'tok1'; it was put in front of them"
    return case


def odd_placeholder(rng: random.Random, ws: Workspace) -> Case:
    """Names no placeholder may have: a bad character somewhere, a bad start, or a word already in the vocabulary."""
    kind = rng.choice(["bad_char", "bad_start", "vocabulary", "empty"])
    word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 8)))
    if kind == "bad_char":
        at = rng.randint(0, len(word))
        word = word[:at] + rng.choice(list(" -!<>.,:;()[]{}\"'é字🙂\tA\n")) + word[at:]
    elif kind == "bad_start":
        word = rng.choice(list("0123456789_")) + word
    elif kind == "vocabulary":
        word = rng.choice(["character", "cat", "red", "a"])
    else:
        word = rng.choice(["", " ", "\t"])
    option = rng.choice(["--token", "--init-word"]) if kind == "empty" else "--token"
    return invert(ws, ws.good, option, word, name=f"placeholder {kind} {word!r}")


# Options and values that are wrong by construction: (command, option, values).
BAD_NUMBERS = [
    ("invert", "--steps", ["0", "-3", "1.5", "1e3", "", "abc", "100001"]),
    ("invert", "--lr", ["0", "-1e-3", "nan", "inf", "-inf", "1e999", "0x10", "1,5", "fast"]),
    ("invert", "--batch-size", ["0", "-1", "65", "two"]),
    ("invert", "--num-vectors", ["0", "17", "-2", "1.0"]),
    ("invert", "--resolution", ["-8", "4", "7", "33", "2049", "100000", "512px"]),
    ("invert", "--seed", ["-1", str(2**64), str(2**80), "seed"]),
    ("invert", "--grad-accum", ["0", "1025", "-4"]),
    ("invert", "--history-every", ["0", "-10"]),
    ("invert", "--clip-skip", ["0", "3", "99", "-1"]),
    ("invert", "--norm-strength", ["-1", "nan", "inf"]),
    ("invert", "--t-min", ["-5", "1000", "5000"]),
    ("tune", "--rank", ["0", "-4", "257", "4.5"]),
    ("tune", "--alpha", ["0", "-1", "nan", "inf"]),
    ("tune", "--reg-t", ["-0.1", "1.5", "nan", "inf"]),
    ("tune", "--reg-weight", ["-1", "nan", "-inf"]),
    ("tune", "--reg-every", ["0", "-2"]),
    ("tune", "--reg-samples", ["0", "65"]),
    ("tune", "--max-timestep", ["0", "-1", "1001"]),
    ("evaluate", "--seeds", ["", "x", "0,x", "-1,2", f"0,{2**70}", ",,,"]),
    ("evaluate", "--cfg", ["-1", "nan"]),
    ("evaluate", "--lora-strength", ["nan", "inf", "-inf"]),
    ("evaluate", "--steps", ["0", "1001", "-5"]),
    ("norm-stats", "--position", ["-1", "77", "500"]),
    ("norm-stats", "--batch-size", ["0", "-1"]),
    ("norm-stats", "--clip-skip", ["0", "9"]),
]
NEEDS_REGULARIZER = {"--reg-t", "--reg-weight", "--reg-every", "--reg-samples"}


def bad_number(rng: random.Random, ws: Workspace) -> Case:
    command, option, values = rng.choice(BAD_NUMBERS)
    value = rng.choice(values)
    extra = [option, value] + (["--reg", "path"] if option in NEEDS_REGULARIZER else [])
    name = f"{command} {option} {value!r}"
    if command == "invert":
        return invert(ws, ws.good, *extra, name=name)
    if command == "tune":
        return tune(ws, *extra, name=name)
    if command == "evaluate":
        return evaluate(ws, *extra, name=name)
    return norm_stats(ws, *extra, name=name)


def nan_file(rng: random.Random, ws: Workspace) -> Case:
    """An embedding, a LoRA or norm statistics holding a NaN or an infinity somewhere."""
    bad = rng.choice([float("nan"), float("inf"), float("-inf")])
    folder = ws.folder("nan")
    kind = rng.choice(["embedding_tune", "embedding_norm_stats", "embedding_evaluate", "lora", "norm_stats"])
    if kind.startswith("embedding"):
        vectors = torch.randn(rng.randint(1, 3), 32)
        vectors.view(-1)[rng.randrange(vectors.numel())] = bad
        path = save_embedding(folder / "nan.safetensors", vectors, metadata={"placeholder": "tok1", "initializer": "character"})
        if kind == "embedding_tune":
            return tune(ws, embedding=path, name=f"{kind} {bad}")
        if kind == "embedding_evaluate":
            return evaluate(ws, "--embedding", str(path), name=f"{kind} {bad}")
        return norm_stats(ws, "--embedding", str(path), "--template", "a picture of {}", "--class-word", "character",
                          name=f"{kind} {bad}")  # fmt: skip
    if kind == "lora":
        from helpers import kohya_lora

        tensors = kohya_lora()
        key = rng.choice(sorted(tensors))
        tensors[key].view(-1)[rng.randrange(tensors[key].numel())] = bad
        path = save_lora(folder / "nan.safetensors", tensors, {"pivotal.placeholder": "tok1", "pivotal.base_model": "tiny"})
        return evaluate(ws, "--lora", str(path), name=f"lora {bad} in {key}")
    stats = json.loads(ws.stats.read_text())
    centres = torch.tensor(stats["centres"])
    centres.view(-1)[rng.randrange(centres.numel())] = bad
    stats["centres"] = centres.tolist()
    (folder / "stats.json").write_text(json.dumps(stats))  # Python writes NaN/Infinity, as a broken writer would
    return tune(ws, "--reg", "path", "--reg-interp", "vslerp", "--norm-stats", str(folder / "stats.json"),
                name=f"norm stats centre {bad}")  # fmt: skip


def bad_file(rng: random.Random, ws: Workspace) -> Case:
    """Garbage, empty or truncated files, or missing paths, where a file is read."""
    folder = ws.folder("files")
    option = rng.choice(["--embedding", "--lora", "--norm-stats", "--model", "--captions"])
    missing = rng.random() < 0.2
    suffix = {"--norm-stats": ".json", "--captions": ".txt"}.get(option, ".safetensors")
    path = folder / f"nowhere{suffix}" if missing else garbage(rng, folder, f"bad{suffix}")
    name = f"{option} {'missing' if missing else 'garbage'}"
    if option == "--embedding":
        return tune(ws, embedding=path, name=name)
    if option == "--lora":
        return evaluate(ws, "--lora", str(path), name=name)
    if option == "--norm-stats":
        return tune(ws, "--reg", "path", "--reg-interp", "vslerp", "--norm-stats", str(path), name=name)
    if option == "--captions":
        if not missing and path.read_bytes().strip():  # printable text is a valid caption file: make it binary
            path.write_bytes(b"\xff\xfe\x00" + path.read_bytes())
        case = norm_stats(ws, name=name)
        case.argv[case.argv.index("--captions") + 1] = str(path)
        return case
    case = invert(ws, ws.good, name=name)
    case.argv[case.argv.index("--model") + 1] = str(path)
    return case


def bad_model_path(rng: random.Random, ws: Workspace) -> Case:
    folder = ws.folder("model")
    kind = rng.choice(["missing", "empty_folder", "folder_of_junk", "pickle", "embedding_as_model", "name"])
    path = {
        "missing": folder / "no_such_model", "empty_folder": folder, "name": "sd-v1-5-from-the-hub",
        "embedding_as_model": ws.embedding,
    }.get(kind)  # fmt: skip
    if kind == "folder_of_junk":
        for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            (folder / sub).mkdir()
            garbage(rng, folder / sub, "config.json")
        path = folder
    elif kind == "pickle":
        path = folder / rng.choice(["model.ckpt", "model.pt", "model.bin"])
        path.write_bytes(b"PK\x03\x04" + rng.randbytes(64))
    case = invert(ws, ws.good, name=f"model {kind}")
    case.argv[case.argv.index("--model") + 1] = str(path)
    return case


def bad_output(rng: random.Random, ws: Workspace) -> Case:
    folder = ws.folder("outputs")
    kind = rng.choice(["folder", "below_a_file", "not_safetensors", "same_twice", "existing"])
    (folder / "file.txt").write_text("keep me")
    (folder / "taken.safetensors").write_bytes(b"the user's file")
    if kind == "same_twice":
        same = folder / "x.safetensors"
        return Case("output same twice", ["run", "--model", "tiny", "--images", str(ws.good), "--steps", "1", "--ti-steps",
                    "1", "--out-embedding", str(same), "--out-lora", str(same)])  # fmt: skip
    out = {"folder": folder, "below_a_file": folder / "file.txt" / "e.safetensors",
           "not_safetensors": folder / rng.choice(["e.pt", "e.bin", "e", "e.safetensors.tmp"]),
           "existing": folder / "taken.safetensors"}[kind]  # fmt: skip
    case = invert(ws, ws.good, *(["--overwrite"] if kind == "folder" else []), name=f"output {kind}")
    case.argv[case.argv.index("--out") + 1] = str(out)
    return case


KINDS = [bad_image, only_bad_images, animated_image, odd_caption, odd_placeholder, bad_number, bad_number, nan_file,
         bad_file, bad_model_path, bad_output]  # fmt: skip


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("fuzz"))
    stats = ws.root / "stats.json"
    assert main(["norm-stats", "--model", "tiny", "--captions", str(ws.captions), "--out", str(stats)]) == 0
    ws.stats = stats
    rng = random.Random(SEED)
    drawn = [kind(rng, ws) for kind in KINDS for _ in range(CASES_PER_KIND // (2 if kind in (animated_image, only_bad_images) else 1))]
    before = {path: path.read_bytes() for path in ws.root.rglob("*") if path.is_file()}
    return ws, drawn, before


def files_under(root: Path) -> dict[Path, tuple[int, int]]:
    """Every file below `root` with its size and modification time: what a refused run must leave as it was."""
    return {path: (stat.st_size, stat.st_mtime_ns) for path in root.rglob("*") if path.is_file() and (stat := path.stat())}


def test_every_malformed_input_is_refused_cleanly_or_warned_about(cases, capsys):
    ws, drawn, before = cases
    failures = []
    for case in drawn:
        capsys.readouterr()
        files = files_under(ws.root)
        try:
            code = main(case.argv)
        except SystemExit as exit_:  # argparse: a value of the wrong type, a usage line and exit 2
            code = exit_.code
        except BaseException as err:  # noqa: BLE001 - any exception escaping main() is the failure looked for
            failures.append(f"{case.name}: {type(err).__name__} escaped main(): {err}")
            continue
        err = capsys.readouterr().err
        if "Traceback (most recent call last)" in err:
            failures.append(f"{case.name}: a traceback in stderr")
        elif case.warning is None and (code != 2 or "error:" not in err):
            failures.append(f"{case.name}: expected exit 2 with an error, got {code}: {err[-300:]!r}")
        elif case.warning is None and files_under(ws.root) != files:
            failures.append(f"{case.name}: refused but wrote {sorted(set(files_under(ws.root).items()) - set(files.items()))}")
        elif case.warning is not None and (code != 0 or not re.search(case.warning, err)):
            failures.append(f"{case.name}: expected exit 0 with a warning /{case.warning}/, got {code}: {err[-300:]!r}")
    changed = [str(path) for path, data in before.items() if not path.is_file() or path.read_bytes() != data]
    assert not changed, f"inputs were modified or removed: {changed}"
    assert not failures, f"seed {SEED}, {len(failures)} of {len(drawn)} case(s):\n" + "\n".join(failures)


def test_the_generator_is_seeded_and_covers_every_kind(tmp_path):
    def names(seed: int, root: Path) -> list[str]:
        ws = Workspace(root)
        ws.stats = root / "stats.json"  # only its centres are read while drawing
        ws.stats.write_text(json.dumps({"centres": [[0.0] * 4] * 2}))
        rng = random.Random(seed)
        return [kind(rng, ws).name for kind in KINDS]

    first = names(SEED, tmp_path / "a")
    assert first == names(SEED, tmp_path / "b")
    assert first != names(SEED + 1, tmp_path / "c")
