import pytest

from pti_ops.errors import InvalidInputError, OutputExistsError
from pti_ops.safe_write import atomic_write, check_output_folder, check_output_name, output_folder, output_path, output_paths


@pytest.mark.parametrize("name", ["my_char", "tok1-v2", "A.b_c"])
def test_plain_names_are_accepted(name):
    assert check_output_name(name) == name


@pytest.mark.parametrize(
    "name, message",
    [
        ("", "is empty"),
        ("../evil", "path separator or '..'"),
        ("sub/name", "path separator"),
        ("a\\b", "path separator"),
        ("my char", "may only use letters"),
        ("name(1)", "may only use letters"),
        ("emb:x", "may only use letters"),
        (".hidden", "must not start"),
    ],
)
def test_unsafe_names_are_refused(name, message):
    with pytest.raises(InvalidInputError, match=message):
        check_output_name(name, "embedding name")


def test_output_path_refuses_existing_file_with_error_policy(tmp_path):
    (tmp_path / "x.safetensors").write_text("mine")
    with pytest.raises(OutputExistsError, match="x.safetensors already exists. Choose another `name`, set `if_exists` to "
                       "increment .* or set `overwrite`"):
        output_path(tmp_path, "x", ".safetensors", "error")
    assert output_path(tmp_path, "x", ".safetensors", "overwrite") == tmp_path / "x.safetensors"
    # the older bool: True = overwrite, False = error
    assert output_path(tmp_path, "x", ".safetensors", True) == tmp_path / "x.safetensors"
    with pytest.raises(OutputExistsError):
        output_path(tmp_path, "x", ".safetensors", False)


def test_output_path_increments_like_saveimage(tmp_path):
    assert output_path(tmp_path, "tok1", ".safetensors", "increment") == tmp_path / "tok1.safetensors"
    (tmp_path / "tok1.safetensors").write_text("first")
    assert output_path(tmp_path, "tok1", ".safetensors", "increment") == tmp_path / "tok1_00001.safetensors"
    (tmp_path / "tok1_00001.safetensors").write_text("second")
    assert output_path(tmp_path, "tok1.safetensors", ".safetensors", "increment") == tmp_path / "tok1_00002.safetensors"
    # counted on from the highest number present (a gap is not filled), other names do not count
    (tmp_path / "tok1_00007.safetensors").write_text("seventh")
    (tmp_path / "tok10_00020.safetensors").write_text("another name")
    (tmp_path / "tok1_00009.pt").write_text("another extension")
    assert output_path(tmp_path, "tok1", ".safetensors", "increment") == tmp_path / "tok1_00008.safetensors"


def test_output_paths_share_one_counter_across_folders(tmp_path):
    loras, embeddings = tmp_path / "loras", tmp_path / "embeddings"
    loras.mkdir(), embeddings.mkdir()
    (embeddings / "run.safetensors").write_text("x")  # only one of the two is taken
    (loras / "run_00003.safetensors").write_text("x")
    assert output_paths([loras, embeddings], "run", ".safetensors", "increment") == [
        loras / "run_00004.safetensors", embeddings / "run_00004.safetensors"]


def test_if_exists_policy_is_checked(tmp_path):
    with pytest.raises(InvalidInputError, match="`if_exists` must be one of increment, overwrite, error; got 'keep'"):
        output_path(tmp_path, "x", ".safetensors", "keep")


def test_output_folder_policy(tmp_path):
    assert output_folder(tmp_path, "report", "error") == tmp_path / "report"
    (tmp_path / "report").mkdir()
    assert output_folder(tmp_path, "report", "increment") == tmp_path / "report"  # empty: used as it is
    (tmp_path / "report" / "sweep.csv").write_text("x")
    assert output_folder(tmp_path, "report", "increment") == tmp_path / "report_00001"
    (tmp_path / "report_00001").mkdir()
    (tmp_path / "report_00001" / "sweep.csv").write_text("x")
    assert output_folder(tmp_path, "report", "increment") == tmp_path / "report_00002"
    assert output_folder(tmp_path, "report", "overwrite") == tmp_path / "report"
    with pytest.raises(OutputExistsError, match="`output_folder` .*report is not empty: choose another folder or set "
                       "`if_exists` to increment"):
        output_folder(tmp_path, "report", "error", what="`output_folder`")


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "out.bin"

    def failing_write(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing_write)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_existing_file_unless_overwrite(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("user data")
    with pytest.raises(OutputExistsError):
        atomic_write(target, lambda tmp: open(tmp, "w").write("new"))
    assert target.read_text() == "user data"
    atomic_write(target, lambda tmp: open(tmp, "w").write("new"), overwrite=True)
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_written_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    import torch
    from safetensors.torch import save_file

    old = os.umask(0o022)
    try:
        text = atomic_write(tmp_path / "f.txt", lambda tmp: open(tmp, "w").write("x"))
        # safetensors replaces the temporary file with a new one of its own.
        tensors = atomic_write(tmp_path / "t.safetensors", lambda tmp: save_file({"x": torch.zeros(1)}, tmp))
    finally:
        os.umask(old)
    assert stat.S_IMODE(text.stat().st_mode) == 0o644
    assert stat.S_IMODE(tensors.stat().st_mode) == 0o644


def test_output_folder_new_or_empty_is_accepted(tmp_path):
    assert check_output_folder(tmp_path / "new", overwrite=False) == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert check_output_folder(str(tmp_path / "empty"), overwrite=False) == tmp_path / "empty"


def test_output_folder_not_empty_is_refused_without_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="--out .* is not empty: choose another folder or pass --overwrite"):
        check_output_folder(tmp_path, overwrite=False, what="--out", hint="pass --overwrite")
    assert check_output_folder(tmp_path, overwrite=True) == tmp_path
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_output_folder_that_is_a_file_is_refused_even_with_overwrite(tmp_path):
    (tmp_path / "a_file").write_text("user file")
    with pytest.raises(OutputExistsError, match="`output_folder` .*a_file is a file"):
        check_output_folder(tmp_path / "a_file", overwrite=True, what="`output_folder`")


def test_output_folder_with_named_files_refuses_only_those(tmp_path):
    (tmp_path / "other.txt").write_text("kept")
    assert check_output_folder(tmp_path, overwrite=False, files=["metrics.json", "grid.png"]) == tmp_path
    (tmp_path / "grid.png").write_bytes(b"")
    with pytest.raises(OutputExistsError, match="grid.png already exists: choose another --out or pass --overwrite"):
        check_output_folder(tmp_path, overwrite=False, what="--out", hint="pass --overwrite", files=["metrics.json", "grid.png"])


def test_safetensors_files_are_byte_identical_for_the_same_inputs(tmp_path):
    import hashlib
    import subprocess
    import sys

    import torch
    from safetensors import safe_open

    from pti_ops.safe_write import write_safetensors

    # In fresh processes: hash-map order differs between interpreters, not only between calls.
    script = (
        "import sys, torch; from pti_ops.safe_write import write_safetensors; "
        "g = torch.Generator().manual_seed(0); "
        "t = {'b': torch.randn(3, 5, generator=g), 'a': torch.randn(7, generator=g).half()}; "
        "m = {k: str(i) for i, k in enumerate(['z', 'placeholder', 'lr', 'seed', 'alpha', 'k9', 'base_model'])}; "
        "write_safetensors(sys.argv[1], t, m)"
    )
    digests = []
    for i in range(3):
        path = tmp_path / f"f{i}.safetensors"
        subprocess.run([sys.executable, "-c", script, str(path)], check=True)
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(set(digests)) == 1
    with safe_open(str(tmp_path / "f0.safetensors"), framework="pt") as f:
        assert f.metadata()["placeholder"] == "1" and sorted(f.keys()) == ["a", "b"]
        assert f.get_tensor("a").dtype == torch.float16
    with pytest.raises(OutputExistsError):
        write_safetensors(tmp_path / "f0.safetensors", {"x": torch.zeros(1)})


def test_a_folder_in_the_place_of_a_node_output_is_refused_up_front_or_stepped_over(tmp_path):
    (tmp_path / "tok1.safetensors").mkdir()
    with pytest.raises(OutputExistsError, match=r"tok1.safetensors is a folder: nothing can be written in its place. "
                                                r"Choose another `embedding_name`"):
        output_path(tmp_path, "tok1", ".safetensors", "overwrite", what="embedding_name")
    assert output_path(tmp_path, "tok1", ".safetensors", "increment") == tmp_path / "tok1_00001.safetensors"
