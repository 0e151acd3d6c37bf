"""Every output checked before any training, and a full disk that never loses a trained result.

Up front: a folder in a file's place, a file without --overwrite, two options naming one file, a folder
that cannot be written and a disk without room for the expected sizes are refused before the model
loads or trains. At the end: a write that fails (ENOSPC) names the file, the space it needs and where to
free it, keeps the earlier file of that name, and the CLI saves the result to its rescue folder.
"""

import errno
import os
import pathlib
import shutil
from collections import namedtuple

import pytest
import torch
from comfy_stubs import comfy_env, fake_models, nodes, run_node  # noqa: F401
from safetensors.torch import load_file

from pti_ops.cli import main
from pti_ops.cli.outputs import embedding_bytes, lora_bytes
from pti_ops.errors import OutputExistsError, OutputWriteError
from pti_ops.files import save_embedding
from pti_ops.lora_tune import TuneConfig
from pti_ops.models import load_bundle
from pti_ops.safe_write import atomic_write, write_safetensors

Usage = namedtuple("Usage", "total used free")


@pytest.fixture
def embedding(tmp_path):
    path = tmp_path / "tok1.safetensors"
    save_embedding(path, torch.randn(1, 32), metadata={"placeholder": "tok1", "initializer": "character"})
    return str(path)


@pytest.fixture
def no_training(monkeypatch):
    """Anything that loads or trains fails the test: the refusal must come first."""
    for target in ("pti_ops.cli.invert.invert", "pti_ops.cli.tune.tune_around", "pti_ops.cli.tune.pivotal_tune"):
        monkeypatch.setattr(target, lambda *a, **k: pytest.fail("trained before refusing"))


def command(kind, images, out, *extra, embedding=None):
    base = [kind, "--model", "tiny", "--images", str(images), "--steps", "1"]
    if kind == "invert":
        return [*base, "--out", str(out), *extra]
    if kind == "tune":
        return [*base, "--embedding", embedding, "--out", str(out), *extra]
    return [*base, "--ti-steps", "1", *extra]


def refused(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    return err


# --- up front --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["invert", "tune"])
def test_out_an_existing_folder_is_refused_up_front_even_with_overwrite(tmp_path, image_folder, embedding, capsys,
                                                                        monkeypatch, kind):  # fmt: skip
    monkeypatch.setattr(f"pti_ops.cli.{kind}.load_bundle", lambda *a, **k: pytest.fail("loaded the model"))
    folder = tmp_path / "out.safetensors"
    folder.mkdir()
    refused(capsys, command(kind, image_folder, folder, "--overwrite", embedding=embedding),
            f"--out {folder} is a folder: give the path of a file to write")
    assert list(folder.iterdir()) == []


def test_run_with_out_lora_a_folder_writes_nothing_not_even_the_embedding(tmp_path, image_folder, capsys, no_training):
    folder = tmp_path / "loras.safetensors"
    folder.mkdir()
    argv = command("run", image_folder, None, "--out-embedding", str(tmp_path / "e.safetensors"), "--out-lora", str(folder),
                   "--overwrite")
    refused(capsys, argv, f"--out-lora {folder} is a folder")
    assert not (tmp_path / "e.safetensors").exists()


def test_two_options_naming_one_file_are_refused(tmp_path, image_folder, capsys, no_training):
    same = str(tmp_path / "x.safetensors")
    refused(capsys, command("run", image_folder, None, "--out-embedding", same, "--out-lora", same),
            f"--out-embedding and --out-lora name the same file {same}")
    refused(capsys, command("invert", image_folder, same, "--history", same), "--out and --history name the same file")
    assert not (tmp_path / "x.safetensors").exists()


def test_an_output_below_a_file_or_in_an_unwritable_folder_is_refused(tmp_path, image_folder, capsys, monkeypatch, no_training):
    (tmp_path / "notes.txt").write_text("a file")
    refused(capsys, command("invert", image_folder, tmp_path / "notes.txt" / "e.safetensors"),
            f"cannot be written: {tmp_path / 'notes.txt'} is a file, not a folder")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(locked) else real_access(path, mode))
    refused(capsys, command("invert", image_folder, locked / "new" / "e.safetensors"), f"the folder {locked} is not writable")
    refused(capsys, ["sweep", "--model", "tiny", "--images", str(image_folder), "--kind", "inversion", "--lrs", "1e-3",
                     "--out", str(locked / "report")], f"{locked} is not a writable folder")  # fmt: skip
    assert list(locked.iterdir()) == []


def test_a_disk_without_room_for_the_expected_files_is_refused_before_training(tmp_path, image_folder, capsys,
                                                                             monkeypatch, no_training):  # fmt: skip
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 20_000, 20_000))
    err = refused(capsys, command("run", image_folder, None, "--out-embedding", str(tmp_path / "e.safetensors"),
                                  "--out-lora", str(tmp_path / "l.safetensors")), "not enough free disk space for")
    assert "e.safetensors" in err and "l.safetensors" in err and "20 kB are free in" in err and "nothing was trained" in err
    assert not list(tmp_path.glob("*.safetensors"))


def test_evaluate_and_norm_stats_check_their_space_too(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000))
    refused(capsys, ["evaluate", "--model", "tiny", "--seeds", "0,1", "--steps", "1", "--lpips", "off",
                     "--out", str(tmp_path / "report")], "not enough free disk space for")  # fmt: skip
    (tmp_path / "captions.txt").write_text("a cat\na dog\na bird\n")
    refused(capsys, ["norm-stats", "--model", "tiny", "--captions", str(tmp_path / "captions.txt"),
                     "--out", str(tmp_path / "s.json")], "not enough free disk space for")  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions.txt"]


def test_the_size_estimates_cover_the_files_written(tmp_path, image_folder):
    assert main(command("run", image_folder, None, "--out-embedding", str(tmp_path / "e.safetensors"),
                        "--out-lora", str(tmp_path / "l.safetensors"), "--rank", "2", "--train-text-encoder")) == 0
    bundle = load_bundle("tiny")
    lora = lora_bytes(bundle, TuneConfig(rank=2, train_text_encoder=True))
    emb = embedding_bytes(bundle, 1)
    real_lora, real_emb = (tmp_path / "l.safetensors").stat().st_size, (tmp_path / "e.safetensors").stat().st_size
    assert real_lora <= lora < 2 * real_lora + 8192, (real_lora, lora)
    assert real_emb <= emb < real_emb + 8192


# --- a write that fails anyway ---------------------------------------------------------------------


@pytest.fixture
def full_disk(monkeypatch):
    """Writes of bytes into the folders in the returned list fail with ENOSPC, as on a full disk."""
    full = []
    real = pathlib.Path.write_bytes

    def write_bytes(self, data):
        if any(self.parent == folder for folder in full):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)
    return full


def test_a_failing_write_keeps_the_earlier_file_and_names_path_and_space(tmp_path, full_disk):
    path = write_safetensors(tmp_path / "e.safetensors", {"clip_l": torch.ones(1, 4)})
    before = path.read_bytes()
    full_disk.append(tmp_path)
    with pytest.raises(OutputWriteError, match=rf"could not write {path}: No space left on device; it needs about \d+ kB "
                                               rf"and .* are free in {tmp_path}: free space there or choose another "
                                               "folder. Any earlier file of that name is unchanged"):  # fmt: skip
        write_safetensors(path, {"clip_l": torch.zeros(1, 4)}, overwrite=True)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["e.safetensors"]  # no temp left
    with pytest.raises(OutputExistsError, match="is a folder"):
        atomic_write(tmp_path, lambda tmp: None, overwrite=True)


def test_the_cli_saves_a_result_it_could_not_write_to_its_rescue_folder(tmp_path, image_folder, capsys, monkeypatch, full_disk):
    out, rescue = tmp_path / "out", tmp_path / "system_tmp"
    out.mkdir()
    rescue.mkdir()
    (out / "l.safetensors").write_bytes(b"the user's earlier LoRA")
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(rescue))
    full_disk.append(out)
    argv = command("run", image_folder, None, "--out-embedding", str(tmp_path / "e.safetensors"), "--out-lora",
                   str(out / "l.safetensors"), "--overwrite")
    err = refused(capsys, argv, f"--out-lora: could not write {out / 'l.safetensors'}: No space left on device")
    saved = rescue / "pti_ops_rescue" / "l.safetensors"
    assert f"The trained result was saved to {saved} instead: move it to {out / 'l.safetensors'} once there is space" in err
    assert (out / "l.safetensors").read_bytes() == b"the user's earlier LoRA"
    assert any(key.endswith("lora_down.weight") for key in load_file(str(saved)))
    assert (tmp_path / "e.safetensors").is_file()  # the embedding could be written: it was


def test_when_the_rescue_fails_too_the_message_says_nothing_was_kept(tmp_path, image_folder, capsys, monkeypatch, full_disk):
    rescue = tmp_path / "system_tmp"
    rescue.mkdir()
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(rescue))
    full_disk += [tmp_path / "out", rescue / "pti_ops_rescue"]
    err = refused(capsys, command("invert", image_folder, tmp_path / "out" / "e.safetensors"), "--out: could not write")
    assert f"It could not be saved in {rescue / 'pti_ops_rescue'} either" in err and "run the command again" in err
    assert not list(tmp_path.glob("**/*.safetensors"))


def test_a_node_whose_file_cannot_be_written_names_where_to_free_space(nodes, comfy_env, fake_models, tmp_path, full_disk):
    from example_images import write_example_images
    from pti_ops.dataset import DatasetConfig, load_image_folder

    write_example_images(tmp_path / "images", count=2, size=32)
    dataset = load_image_folder(tmp_path / "images", DatasetConfig(resolution=32))
    model, clip, vae = fake_models
    folder = comfy_env[1].folders["embeddings"]
    full_disk.append(folder)
    with pytest.raises(OSError, match=rf"could not write {folder / 'tok1.safetensors'}: No space left on device; .* "
                                      rf"free in {folder}: free space there or choose another folder"):
        run_node(nodes["TokenInversion"], model=model, clip=clip, vae=vae, dataset=dataset, placeholder="tok1",
                 initializer="character", num_vectors=1, templates="a {}", steps=1, learning_rate=1e-3, batch_size=1,
                 seed=0, norm_mode="none", embedding_name="tok1", overwrite=False)  # fmt: skip
    assert list(folder.iterdir()) == []
