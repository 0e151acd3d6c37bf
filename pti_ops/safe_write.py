"""Safe output files: name checks, a policy for names already taken (increment, overwrite, error), atomic
writes (temp file + rename)."""

import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Literal, Sequence, get_args

from .errors import InvalidInputError, OutputExistsError

# ComfyUI's prompt parser splits `embedding:NAME` at spaces and treats ( ) : , as syntax,
# so an output name is limited to characters that survive it unchanged.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def check_output_name(name: str, what: str = "name") -> str:
    """Return `name` if it is a plain file name usable in ComfyUI prompts, else raise.

    Args:
        name (`str`): the name the user typed, without folder (an extension is allowed).
        what (`str`): the input's name as the user sees it, for the error message.
    """
    if not isinstance(name, str) or not name.strip():
        raise InvalidInputError(f"`{what}` is empty: give a file name such as `my_character`.")
    if "/" in name or "\\" in name or ".." in name:
        raise InvalidInputError(
            f"`{what}` {name!r} contains a path separator or '..': give a plain file name "
            "(the folder is chosen for you)."
        )
    if not _SAFE_NAME.match(name):
        raise InvalidInputError(
            f"`{what}` {name!r} may only use letters, digits, '_', '-' and '.', and must not start "
            "with '.' or '-' (ComfyUI's `embedding:NAME` prompt syntax cannot read other characters)."
        )
    return name


IfExists = Literal["increment", "overwrite", "error"]
IF_EXISTS_POLICIES: tuple[str, ...] = get_args(IfExists)
# `NAME_00001`, … as ComfyUI's SaveImage numbers its files (five digits, counting up from the highest).
COUNTER_DIGITS = 5


def check_if_exists(value: str | bool, what: str = "if_exists") -> str:
    """One of `IF_EXISTS_POLICIES` (a bool is the older `overwrite` switch: `overwrite` / `error`), else
    `InvalidInputError` naming the input."""
    if isinstance(value, bool):
        return "overwrite" if value else "error"
    if value not in IF_EXISTS_POLICIES:
        raise InvalidInputError(f"`{what}` must be one of {', '.join(IF_EXISTS_POLICIES)}; got {value!r}.")
    return value


def output_path(folder: str | os.PathLike, name: str, extension: str, if_exists: IfExists | bool = "error",
                what: str = "name") -> Path:
    """Path of a new output file `folder/NAME.extension`, by the policy for a name already taken.

    Args:
        folder (`str` or `PathLike`): the folder the file goes into.
        name (`str`): the name the user gave (an extension is allowed).
        extension (`str`): e.g. `.safetensors`.
        if_exists (`str`): `increment` (`NAME_00001.ext`, then `_00002`, … after the highest number present,
            as ComfyUI's SaveImage counts), `overwrite` (the same path; the file is replaced when written) or
            `error` (`OutputExistsError` before anything runs). A bool is the old `overwrite` switch.
        what (`str`): the input as the user sees it, for messages.
    """
    return output_paths([folder], name, extension, if_exists, what)[0]


def output_paths(folders: Sequence[str | os.PathLike], name: str, extension: str, if_exists: IfExists | bool = "error",
                 what: str = "name") -> list[Path]:
    """`folder/NAME.extension` in each folder, with one name free in all of them (see `output_path`).

    Files written together (a LoRA and its `joint` embedding) share their name, and with it the counter.
    """
    if_exists = check_if_exists(if_exists)
    check_output_name(name, what)
    stem = name[: -len(extension)] if name.endswith(extension) else name
    folders = [Path(folder) for folder in folders]
    paths = [folder / (stem + extension) for folder in folders]
    taken = [path for path in paths if path.exists()]
    if not taken or if_exists == "overwrite":
        return paths
    if if_exists == "error":
        raise OutputExistsError(
            f"{taken[0]} already exists. Choose another `{what}`, set `if_exists` to increment (a new numbered "
            "file) or overwrite, or set `overwrite` to replace it."
        )
    number = 1 + max(_highest_counter(folder, stem, extension) for folder in folders)
    return [folder / f"{stem}_{number:0{COUNTER_DIGITS}d}{extension}" for folder in folders]


def _highest_counter(folder: Path, stem: str, extension: str) -> int:
    """The highest N of the `STEM_N.extension` files (and `STEM_N` folders) in `folder`; 0 if none."""
    pattern = re.compile(rf"^{re.escape(stem)}_(\d{{{COUNTER_DIGITS},}}){re.escape(extension)}$")
    if not folder.is_dir():
        return 0
    numbers = [int(match.group(1)) for entry in folder.iterdir() if (match := pattern.match(entry.name))]
    return max(numbers, default=0)


def output_folder(parent: str | os.PathLike, name: str, if_exists: IfExists | bool = "error",
                  what: str = "the output folder") -> Path:
    """A report folder `parent/NAME` by the policy for one already holding files (see `output_path`).

    A missing or empty folder is used as it is; `increment` picks `NAME_00001`, … (the first one free
    after the highest number present); `overwrite` writes into it; `error` refuses.
    """
    if_exists = check_if_exists(if_exists)
    folder = Path(parent) / check_output_name(name, what)
    if if_exists == "increment" and folder.exists() and not (folder.is_dir() and not any(folder.iterdir())):
        folder = Path(parent) / f"{name}_{1 + _highest_counter(Path(parent), name, ''):0{COUNTER_DIGITS}d}"
    hint = "set `if_exists` to increment (a new numbered folder) or overwrite, or set `overwrite` to replace its files"
    return check_output_folder(folder, if_exists == "overwrite", what=what, hint=hint)


def check_output_folder(
    folder: str | os.PathLike,
    overwrite: bool,
    what: str = "the output folder",
    hint: str = "set `overwrite` to replace its files",
    files: Sequence[str] | None = None,
) -> Path:
    """Return `folder` as a Path if a report may be written into it, else raise `OutputExistsError`.

    Refused: a file in its place; without `overwrite`, a folder that is not empty, or (with `files`)
    one that already holds one of those files. A missing folder is fine (the writer creates it).
    Check before anything costly runs, so nothing is trained for a folder that is then refused.

    Args:
        folder (`str` or `PathLike`): the folder the report goes into.
        overwrite (`bool`): the user allowed replacing files.
        what (`str`): the input as the user sees it, e.g. `--out` or `` `output_folder` ``.
        hint (`str`): how the user allows replacing, e.g. `pass --overwrite`.
        files (`list[str]`, *optional*): the names the report writes; only those count as taken.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(f"{what} {folder} is a file: give a folder for the report.")
    if overwrite or not folder.is_dir():
        return folder
    if files is None:
        if any(folder.iterdir()):
            raise OutputExistsError(f"{what} {folder} is not empty: choose another folder or {hint}.")
        return folder
    existing = [folder / name for name in files if (folder / name).exists()]
    if existing:
        raise OutputExistsError(f"{existing[0]} already exists: choose another {what} or {hint}.")
    return folder


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], overwrite: bool = False) -> Path:
    """Write a file through `write(tmp_path)` and move it into place in one rename.

    A crash or an exception inside `write` leaves no partial file at `path` and removes the
    temporary file. The existence check is repeated just before the rename.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass overwrite=True to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes 0600 (and some writers re-create the file): give outputs the usual permissions.
        os.chmod(tmp, 0o666 & ~_current_umask())
        if path.exists() and not overwrite:
            raise OutputExistsError(f"{path} appeared while it was being written; nothing was replaced.")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def canonical_safetensors(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """The `.safetensors` bytes of `tensors`, the same bytes for the same inputs.

    safetensors writes its JSON header from a hash map, so the metadata's order (and with it the
    file's bytes) changes from one write to the next. Here the header is re-serialised with sorted
    keys; the tensor data and offsets are safetensors' own, so every reader sees the same file.
    """
    import json
    import struct

    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors pads it
    return struct.pack("<Q", len(text)) + text + raw[8 + length :]


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None,
                      overwrite: bool = False) -> Path:
    """Write `tensors` (and string `metadata`) atomically as a canonical `.safetensors` file."""
    data = canonical_safetensors(tensors, metadata)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), overwrite=overwrite)
