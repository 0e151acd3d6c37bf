"""CLIP scoring from a local transformers `CLIPModel` folder: image–image and text–image cosines.

Nothing is downloaded. When no folder is given, or it cannot be loaded, the CLIP metrics are
reported as not computed with the reason (`try_load_clip`), never estimated some other way.
Images are preprocessed in torch as CLIPImageProcessor does (shorter side resized to the model's
input size, bicubic; centre crop; normalised with the folder's mean/std, else OpenAI CLIP's).
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPTokenizer

from ..models.loaders import no_weight_loading_bar
from ..errors import MissingModelFileError, ModelLoadError

logger = logging.getLogger(__name__)

# OpenAI CLIP's normalisation (CLIPImageProcessor's defaults), used when the folder has no preprocessor config.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipScorer:
    """A CLIP model with what it needs to embed images and texts.

    Args:
        model (`CLIPModel`): vision and text towers with their projections.
        tokenizer (`CLIPTokenizer`, *optional*): None when the folder has no tokenizer files
            (`tokenizer.json`, or `vocab.json` + `merges.txt`); text scores are then not computed.
        image_size (`int`): side of the square image the vision tower takes.
        mean (`tuple[float, float, float]`): per-channel normalisation mean.
        std (`tuple[float, float, float]`): per-channel normalisation std.
        name (`str`): the folder, for reports.
    """

    model: CLIPModel
    tokenizer: CLIPTokenizer | None
    image_size: int
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    name: str = ""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """`[N, H, W, 3]` in [0, 1] → normalised `[N, 3, S, S]` pixel values for the vision tower."""
        x = images.to(self.device, torch.float32).permute(0, 3, 1, 2)
        h, w = x.shape[-2:]
        scale = self.image_size / min(h, w)
        size = (max(self.image_size, round(h * scale)), max(self.image_size, round(w * scale)))
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
        x = x[..., top : top + self.image_size, left : left + self.image_size]
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-length projected image embeddings `[N, D]` of images `[N, H, W, 3]` in [0, 1]."""
        out = self.model.get_image_features(pixel_values=self.preprocess(images).to(self.model.dtype))
        return F.normalize(_pooled(out).float(), dim=-1).cpu()

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """Unit-length projected text embeddings `[N, D]`."""
        if self.tokenizer is None:
            raise ModelLoadError(f"the CLIP folder {self.name} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt).")
        ids = self.tokenizer(list(texts), padding="max_length", truncation=True, return_tensors="pt").input_ids
        out = self.model.get_text_features(input_ids=ids.to(self.device))
        return F.normalize(_pooled(out).float(), dim=-1).cpu()


def _pooled(output) -> torch.Tensor:
    """transformers 4.x returns the projected tensor; 5.x an output whose `pooler_output` holds it."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_clip(folder: str | Path, device: str | torch.device = "cpu") -> ClipScorer:
    """Load a CLIP scorer from a local folder (`config.json` + weights, tokenizer files optional).

    Args:
        folder (`str`): a transformers `CLIPModel` folder (e.g. `openai/clip-vit-large-patch14` saved locally).
        device (`str`): where to put the model.
    """
    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise MissingModelFileError(f"CLIP model folder {folder} not found or has no config.json (nothing is downloaded).")
    try:
        with no_weight_loading_bar():
            model = CLIPModel.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise ModelLoadError(f"could not load a CLIPModel from {folder}: {err}") from err
    tokenizer = _load_tokenizer(folder)
    mean, std = _normalisation(folder)
    model = model.train(False).requires_grad_(False).to(device)  # eval mode
    return ClipScorer(model, tokenizer, model.config.vision_config.image_size, mean, std, name=str(folder))


def _load_tokenizer(folder: Path) -> CLIPTokenizer | None:
    """The folder's tokenizer (`tokenizer.json`, or `vocab.json` + `merges.txt`), None when it has none."""
    has_files = (folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())
    if not has_files:
        logger.warning("CLIP folder %s has no tokenizer files: text-image scores will not be computed.", folder)
        return None
    try:
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load the CLIP tokenizer in {folder}: {err}") from err


def _normalisation(folder: Path) -> tuple[tuple, tuple]:
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    config = json.loads(path.read_text(encoding="utf-8"))
    return tuple(config.get("image_mean", OPENAI_CLIP_MEAN)), tuple(config.get("image_std", OPENAI_CLIP_STD))


def try_load_clip(folder: str | Path | None, device: str | torch.device = "cpu") -> tuple[ClipScorer | None, str]:
    """`(scorer, "")`, or `(None, reason)` when no folder is given or it cannot be loaded.

    Args:
        folder (`str`, *optional*): a local `CLIPModel` folder, or None.
        device (`str`): where to put the model.
    """
    if not folder:
        return None, "no CLIP model folder given: CLIP scores need a local transformers CLIPModel folder (--clip-model)"
    try:
        return load_clip(folder, device), ""
    except ModelLoadError as err:  # MissingModelFileError included
        logger.warning("CLIP metrics not computed: %s", err)
        return None, str(err)


def clip_image_similarity(scorer: ClipScorer, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of CLIP image embeddings between every image of `a` and of `b`, `[len(a), len(b)]`.

    Args:
        scorer (`ClipScorer`): from `load_clip`.
        a (`torch.Tensor`): `[n, H, W, 3]` in [0, 1].
        b (`torch.Tensor`): `[m, H', W', 3]` in [0, 1] (sizes may differ).
    """
    return scorer.image_features(a) @ scorer.image_features(b).T


def clip_text_similarity(scorer: ClipScorer, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """Cosine between each image's CLIP embedding and its own text's, `[n]`.

    Args:
        scorer (`ClipScorer`): from `load_clip`.
        images (`torch.Tensor`): `[n, H, W, 3]` in [0, 1].
        texts (`list[str]`): one text per image.
    """
    return (scorer.image_features(images) * scorer.text_features(texts)).sum(-1)
