"""The CLIP tokenizers of a single-file checkpoint, which never contains them.

SD1.5 needs CLIP's BPE vocabulary (`vocab.json` + `merges.txt`, 49,408 tokens); SDXL needs it for
both encoders (the second tokenizer pads with `!`, id 0, as diffusers' `tokenizer_2` and ComfyUI's
bigG tokenizer do). It is looked for, in this order:
  (a) the `tokenizer_dir` argument: a folder with `vocab.json` + `merges.txt` (a diffusers
      `tokenizer/` folder, ComfyUI's `comfy/sd1_tokenizer/`), or a transformers `tokenizer.json`,
      used for every encoder; or a folder holding `tokenizer/` (and `tokenizer_2/`) sub-folders;
  (b) a `tokenizer/` folder next to the checkpoint (and `tokenizer_2/`, else `tokenizer/` again);
  (c) the checkpoint's own metadata (small vocabularies written by `save_ldm_checkpoint`);
  (d) the BPE file of the optional pip packages `clip-anytorch` (module `clip`) or `open_clip_torch`
      (module `open_clip`), turned into `vocab.json` + `merges.txt` as OpenAI's `simple_tokenizer.py`
      does and cached in the temp folder;
otherwise `MissingModelFileError` names the missing files and these ways to supply them.
"""

import gzip
import hashlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer

from ..errors import MissingModelFileError, ModelLoadError
from ..safe_write import atomic_write
from .clip_vocab import BOS_TOKEN, END_OF_WORD, EOS_TOKEN, bytes_to_unicode
from .families import DEFAULT_FAMILY
from .family import ModelFamily
from .ldm_layout import tokenizer_meta_keys

META_VOCAB_KEY, META_MERGES_KEY, _ = tokenizer_meta_keys(0)

# OpenAI CLIP's BPE: 49,152 vocabulary entries minus the 256 + 256 byte symbols (with and without
# `</w>`) leaves 48,894 merges; the two special tokens bring the vocabulary to 49,408.
NUM_CLIP_MERGES = 49152 - 256 - 2
CLIP_VOCAB_SIZE = 49408
OPENAI_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
TOKENIZER_KWARGS = dict(unk_token=EOS_TOKEN, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


def resolve_tokenizers(
    path: Path,
    metadata: dict[str, str],
    tokenizer_dir: str | os.PathLike | None,
    model_max_length: int,
    family: ModelFamily = DEFAULT_FAMILY,
) -> tuple[CLIPTokenizer, ...]:
    """The checkpoint's tokenizers, one per text encoder of `family`, found as the module docstring describes.

    Args:
        path (`Path`): the checkpoint (`tokenizer/`, `tokenizer_2/` folders beside it are used).
        metadata (`dict`): its metadata (small vocabularies and added tokens of our own files).
        tokenizer_dir (`str`, *optional*): folder given by the user; it must hold the files.
        model_max_length (`int`): prompt length in tokens (77).
        family (`ModelFamily`): how many tokenizers, and what each pads with.
    """
    pads = [spec.pad_token or EOS_TOKEN for spec in family.text_encoders]
    folders = _tokenizer_folders(path, tokenizer_dir, len(pads))
    if folders is not None:
        tokenizers = [tokenizer_from_folder(folder, model_max_length, pad) for folder, pad in zip(folders, pads)]
    elif META_VOCAB_KEY in metadata and META_MERGES_KEY in metadata:
        tokenizers = [_tokenizer_from_metadata(metadata, index, model_max_length, pad) for index, pad in enumerate(pads)]
    elif (bpe_file := find_openai_bpe_file()) is not None:
        tokenizers = [tokenizer_from_folder(openai_tokenizer_folder(bpe_file), model_max_length, pad) for pad in pads]
    else:
        second = " (and tokenizer_2/ for the second encoder, else tokenizer/ serves both)" if len(pads) > 1 else ""
        raise MissingModelFileError(
            f"the CLIP tokenizer files vocab.json and merges.txt for {path.name} were not found (a checkpoint "
            "does not contain them). Supply them in one of three ways: give `tokenizer_dir` (a folder with "
            "vocab.json + merges.txt, e.g. a diffusers model's tokenizer/ folder or ComfyUI's comfy/sd1_tokenizer/); "
            f"put a tokenizer/ folder with them next to the checkpoint ({path.parent / 'tokenizer'}){second}; or "
            "`pip install clip-anytorch` (or open_clip_torch), whose BPE file is converted automatically."
        )
    for index, tokenizer in enumerate(tokenizers):
        _add_stored_tokens(tokenizer, metadata, index, path)
    return tuple(tokenizers)


def _has_vocab_files(folder: Path) -> bool:
    return ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()) or (folder / "tokenizer.json").is_file()


def _tokenizer_folders(path: Path, tokenizer_dir: str | os.PathLike | None, count: int) -> list[Path] | None:
    """The folder of each tokenizer from (a) `tokenizer_dir` or (b) the checkpoint's neighbours; None if neither."""
    if tokenizer_dir is not None:
        given = Path(tokenizer_dir)
        if not _has_vocab_files(given) and (given / "tokenizer").is_dir():
            return _subfolders(given, count)
        return [given] * count  # a folder without the files is refused by `tokenizer_from_folder`, naming them
    if (path.parent / "tokenizer").is_dir():
        return _subfolders(path.parent, count)
    return None


def _subfolders(root: Path, count: int) -> list[Path]:
    """`tokenizer/`, `tokenizer_2/`, … under `root`; `tokenizer/` stands in for a missing one (same BPE files)."""
    names = ["tokenizer" if i == 0 else f"tokenizer_{i + 1}" for i in range(count)]
    return [root / name if (root / name).is_dir() else root / "tokenizer" for name in names]


def tokenizer_from_folder(folder: Path, model_max_length: int, pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """A `CLIPTokenizer` from `vocab.json` + `merges.txt` (or `tokenizer.json`) in `folder`, padding with `pad_token`."""
    if not _has_vocab_files(folder):
        missing = [name for name in ("vocab.json", "merges.txt") if not (folder / name).is_file()]
        raise MissingModelFileError(
            f"tokenizer folder {folder} lacks {' and '.join(missing)}: it needs CLIP's vocab.json and merges.txt "
            "(as in a diffusers model's tokenizer/ folder or ComfyUI's comfy/sd1_tokenizer/)."
        )
    try:
        return CLIPTokenizer.from_pretrained(
            folder, local_files_only=True, model_max_length=model_max_length, **{**TOKENIZER_KWARGS, "pad_token": pad_token}
        )
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load the CLIP tokenizer in {folder}: {err}") from err


def _tokenizer_from_metadata(metadata: dict[str, str], index: int, model_max_length: int, pad_token: str) -> CLIPTokenizer:
    vocab_key, merges_key, _ = tokenizer_meta_keys(index)
    if vocab_key not in metadata:  # a second tokenizer with the first one's files
        vocab_key, merges_key = META_VOCAB_KEY, META_MERGES_KEY
    vocab, merges = json.loads(metadata[vocab_key]), json.loads(metadata[merges_key])
    # `from_pretrained` on written files is the one construction path transformers 4.x and 5.x share.
    with tempfile.TemporaryDirectory() as folder:
        write_vocab_files(Path(folder), vocab, merges)
        return tokenizer_from_folder(Path(folder), model_max_length, pad_token)


def _add_stored_tokens(tokenizer: CLIPTokenizer, metadata: dict[str, str], index: int, path: Path) -> None:
    """Re-add the placeholder tokens our writer recorded, checking they get their original ids."""
    _, _, added_key = tokenizer_meta_keys(index)
    if added_key not in metadata:
        return
    added = json.loads(metadata[added_key])
    tokenizer.add_tokens([content for _, content in added])
    wrong = [(content, i) for i, content in added if tokenizer.convert_tokens_to_ids(content) != i]
    if wrong:
        raise ModelLoadError(
            f"{path.name}: the added token(s) {wrong[:3]} do not get their original ids with this tokenizer: "
            "the tokenizer files do not belong to this checkpoint."
        )


def check_tokenizer_fits(tokenizer: CLIPTokenizer, vocab_size: int, path: Path) -> None:
    """Raise unless `tokenizer` has exactly one id per embedding row of its text encoder."""
    if len(tokenizer) != vocab_size:
        raise ModelLoadError(
            f"{path.name}: the tokenizer has {len(tokenizer)} tokens but the text encoder has {vocab_size} "
            "embedding rows: the tokenizer files belong to another model."
        )


def write_vocab_files(folder: Path, vocab: dict[str, int], merges: list[str]) -> None:
    """Write `vocab.json` and `merges.txt` (with the `#version` header transformers expects) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab_text = json.dumps(vocab, ensure_ascii=False)
    merges_text = "#version: 0.2\n" + "\n".join(merges) + "\n"
    # Replacing is safe: the files are a pure function of the inputs; atomic so concurrent readers never see half.
    atomic_write(folder / "vocab.json", lambda tmp: Path(tmp).write_text(vocab_text, encoding="utf-8"), overwrite=True)
    atomic_write(folder / "merges.txt", lambda tmp: Path(tmp).write_text(merges_text, encoding="utf-8"), overwrite=True)


def find_openai_bpe_file() -> Path | None:
    """OpenAI's `bpe_simple_vocab_16e6.txt.gz` from the `clip` or `open_clip` package, if installed."""
    for module in ("clip", "open_clip"):
        # find_spec locates the package without importing it (and its torchvision dependency).
        spec = importlib.util.find_spec(module)
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(location) / OPENAI_BPE_FILE
            if candidate.is_file():
                return candidate
    return None


def build_openai_clip_vocab(bpe_file: str | os.PathLike, num_merges: int = NUM_CLIP_MERGES) -> tuple[dict[str, int], list[str]]:
    """CLIP's `vocab.json` / `merges.txt` content from OpenAI's gzipped BPE file, as `simple_tokenizer.py` builds it.

    Args:
        bpe_file (`str`): path of `bpe_simple_vocab_16e6.txt.gz` (a header line, then one merge per line).
        num_merges (`int`): merges to keep after the header (48,894 for CLIP).

    Returns:
        `(vocab, merges)`: token -> id, and the `"left right"` merges in priority order.
    """
    with gzip.open(bpe_file, "rt", encoding="utf-8") as file:
        lines = file.read().split("\n")
    merges = lines[1 : num_merges + 1]
    if len(merges) < num_merges or any(len(m.split()) != 2 for m in merges):
        raise ModelLoadError(f"{bpe_file} does not hold {num_merges} BPE merges after its header line.")
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m.split()) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, merges


def openai_tokenizer_folder(bpe_file: Path) -> Path:
    """A cached folder with CLIP's `vocab.json` + `merges.txt` built from `bpe_file` (built on first use)."""
    digest = hashlib.sha256(bpe_file.read_bytes()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"pti_ops_clip_tokenizer_{digest}"
    if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        vocab, merges = build_openai_clip_vocab(bpe_file)
        if len(vocab) != CLIP_VOCAB_SIZE:
            raise ModelLoadError(f"{bpe_file} gives {len(vocab)} tokens, not CLIP's {CLIP_VOCAB_SIZE}.")
        write_vocab_files(folder, vocab, merges)
    return folder
