import pytest

from pti_ops.errors import InvalidInputError, OutputExistsError
from pti_ops.safe_write import atomic_write, check_output_name, output_path


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


def test_output_path_refuses_existing_file_without_overwrite(tmp_path):
    (tmp_path / "x.safetensors").write_text("mine")
    with pytest.raises(OutputExistsError, match="set `overwrite`"):
        output_path(tmp_path, "x", ".safetensors", overwrite=False)
    assert output_path(tmp_path, "x", ".safetensors", overwrite=True) == tmp_path / "x.safetensors"


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
