"""Safe output files: name checks, a policy for names already taken (increment, overwrite, error), output
paths and free disk space checked before anything runs, atomic writes (temp file + rename) whose failure
names the file and the space it needs."""

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Literal, Sequence, get_args

from .errors import InvalidInputError, OutputExistsError, OutputWriteError

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
    folders_in_place = [path for path in taken if path.is_dir()]
    if folders_in_place and if_exists == "overwrite":  # refused now, not after training
        raise OutputExistsError(f"{folders_in_place[0]} is a folder: nothing can be written in its place. Choose "
                                f"another `{what}`, or set `if_exists` to increment.")  # fmt: skip
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

    Refused: a file in its place; a place that is not writable; without `overwrite`, a folder that is not
    empty, or (with `files`) one that already holds one of those files. A missing folder is fine (the writer creates it).
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
    place = existing_folder(folder)
    if not place.is_dir() or not os.access(place, os.W_OK | os.X_OK):
        raise OutputWriteError(f"{what} {folder} cannot be written: {place} is not a writable folder.")
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


def check_output_file(path: str | os.PathLike, overwrite: bool, what: str = "the output",
                      hint: str = "set `overwrite` to replace it") -> Path:  # fmt: skip
    """Return `path` as a Path if a file may be written there, else raise, before anything costly runs.

    Refused: a folder in its place (even with `overwrite`); an existing file without `overwrite`; a path
    below a file; a folder that is not writable.

    Args:
        path (`str` or `PathLike`): the file to write.
        overwrite (`bool`): the user allowed replacing an existing file.
        what (`str`): the input as the user sees it, e.g. `--out-lora`.
        hint (`str`): how the user allows replacing, e.g. `pass --overwrite`.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(f"{what} {path} is a folder: give the path of a file to write (e.g. {path / 'name.safetensors'}).")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists: choose another {what} or {hint}.")
    place = existing_folder(path.parent)
    if not place.is_dir():
        raise OutputWriteError(f"{what} {path} cannot be written: {place} is a file, not a folder.")
    if not os.access(place, os.W_OK | os.X_OK):
        raise OutputWriteError(f"{what} {path} cannot be written: the folder {place} is not writable for this user.")
    return path


def existing_folder(folder: str | os.PathLike) -> Path:
    """`folder`, or its nearest ancestor that exists (where a missing output folder would be created)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def space_needed(size: int) -> int:
    """Free bytes asked for a file of about `size` bytes: 5 % over the estimate, 16 KiB for the file system's blocks."""
    return size + size // 20 + 16 * 1024


def megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.0f} kB"


def check_free_space(sizes: dict[str | os.PathLike, int]) -> None:
    """Raise `OutputWriteError` unless the disk of each output has room for it (the outputs on one disk together).

    Check before training, with sizes estimated from the shapes to be written, so that a run is not lost
    to a full disk at its end. A replaced file still counts: the new one is written before the old goes.

    Args:
        sizes (`dict`): output path → its expected size in bytes.
    """
    disks: dict[int, list] = {}
    for path, size in sizes.items():
        place = existing_folder(Path(path).parent)
        disk = disks.setdefault(os.stat(place).st_dev, [place, 0, []])
        disk[1] += space_needed(size)
        disk[2].append(str(path))
    for place, needed, paths in disks.values():
        free = shutil.disk_usage(place).free
        if needed > free:
            raise OutputWriteError(
                f"not enough free disk space for {', '.join(paths)}: about {megabytes(needed)} are needed and "
                f"{megabytes(free)} are free in {place}. Free space there or choose another folder; nothing was "
                "trained."
            )


def _write_failure(path: Path, err: OSError, size: int | None) -> OutputWriteError:
    """The error of a write that failed: the file, the cause, the space it needs and where to free it."""
    try:
        free = f"{megabytes(shutil.disk_usage(existing_folder(path.parent)).free)} are free in {path.parent}"
    except OSError:
        free = f"the free space of {path.parent} is unknown"
    needs = f"it needs about {megabytes(size)} and " if size else ""
    action = ("free space there or choose another folder" if err.errno in (errno.ENOSPC, errno.EDQUOT)
              else "check the folder and its permissions")  # fmt: skip
    return OutputWriteError(
        f"could not write {path}: {err.strerror or err}; {needs}{free}: {action}. Any earlier file of that name is "
        "unchanged."
    )


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], overwrite: bool = False,
                 size: int | None = None) -> Path:  # fmt: skip
    """Write a file through `write(tmp_path)` and move it into place in one rename.

    A crash or an exception inside `write` leaves no partial file at `path` (an earlier file of that
    name stays as it was) and removes the temporary file. The existence check is repeated just before
    the rename. A failing write (a full disk, a read-only folder) raises `OutputWriteError` naming the
    file, the space it needs (`size`, where the caller knows it) and the free space of its folder.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(f"{path} is a folder: nothing can be written in its place.")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass overwrite=True to replace it.")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        # mkstemp makes 0600 (and some writers re-create the file): give outputs the usual permissions.
        os.chmod(tmp, 0o666 & ~_current_umask())
        if path.exists() and not overwrite:
            raise OutputExistsError(f"{path} appeared while it was being written; nothing was replaced.")
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and not isinstance(err, (OutputExistsError, OutputWriteError)):
            raise _write_failure(path, err, size) from err
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
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), overwrite=overwrite, size=len(data))
