"""What the tuning did, measured: reconstruction, editability, locality, diversity, distance.

Every metric is one named number with a one-line description of what it measures
(`METRIC_DESCRIPTIONS`), or `None` with the reason it was not computed (no CLIP model, no training
images, no LoRA): never a crash and never a stand-in number. Images are float `[N, H, W, 3]` in
[0, 1] (ComfyUI's IMAGE layout). LPIPS lives in `lpips_model.py`, CLIP in `clip.py`, the
placeholder's distance in `distance.py`, the whole evaluation run in `evaluation.py`.
"""

import json
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..models.bundle import ModelBundle
from ..dataset import ImageDataset
from ..errors import InvalidInputError
from .clip import ClipScorer, clip_image_similarity, clip_text_similarity
from .lpips_model import lpips_matrix, lpips_pairs
from ..training.adapters import adapters_disabled
from .sampling import predict_noise

METRIC_DESCRIPTIONS: dict[str, str] = {
    "reconstruction_lpips": "LPIPS from each generation of a training prompt to its closest training image, mean (lower = closer to the character).",
    "reconstruction_l2": "mean squared RGB difference (in [0, 1]) from each generation of a training prompt to its closest training image, mean (lower = closer).",
    "reconstruction_clip": "CLIP image cosine between each generation of a training prompt and its closest training image, mean (higher = closer).",
    "editability_clip": "CLIP text-image cosine of each edit-prompt generation with its prompt, placeholder replaced by the class word, mean (higher = follows edits; TI paper protocol).",
    "locality_eps_mse": "mean squared difference of base and tuned noise predictions on fixed noisy latents, prompts without the placeholder (0 = nothing else changed).",
    "locality_lpips": "LPIPS between base and tuned images of prompts without the placeholder, same seeds, mean (0 = nothing else changed).",
    "diversity_lpips": "mean pairwise LPIPS among the generations of each training prompt across seeds (low = collapsed to one image).",
    "position_spread": "RMS distance of the subject's centre of mass from its mean across seeds, in image sides (low = the model learned fixed positions).",
    "embedding_distance": "||e - e0|| over all placeholder vectors: how far the token moved from its initializer.",
    "embedding_norm": "mean ||e|| of the placeholder vectors.",
    "embedding_cosine": "mean cos(e, e0) of each placeholder vector with its initializer row.",
}
METRIC_NAMES: tuple[str, ...] = tuple(METRIC_DESCRIPTIONS)
# A pixel belongs to the subject when a channel differs from the background colour by more than this.
DEFAULT_SUBJECT_THRESHOLD = 0.1
# Locality timesteps: spread over the 1000-step schedule, so every noise level counts once.
LOCALITY_TIMESTEPS = (100, 300, 500, 700, 900)


@dataclass
class Metric:
    """One measured number, or the reason it is missing.

    Args:
        value (`float`, *optional*): the number; None when not computed.
        description (`str`): what it measures, in one line.
        reason (`str`): why it was not computed (empty when it was).
        details (`dict`): per-prompt or per-image values behind the number.
    """

    value: float | None
    description: str
    reason: str = ""
    details: dict = field(default_factory=dict)

    @property
    def computed(self) -> bool:
        return self.value is not None


def metric(name: str, value: float | None = None, reason: str = "", **details) -> Metric:
    """A `Metric` with its registered description; a None value must come with a reason."""
    if name not in METRIC_DESCRIPTIONS:
        raise InvalidInputError(f"unknown metric {name!r}; known: {', '.join(METRIC_NAMES)}.")
    if value is None and not reason:
        raise InvalidInputError(f"metric {name!r} has no value and no reason: say why it was not computed.")
    return Metric(None if value is None else float(value), METRIC_DESCRIPTIONS[name], reason, details)


def not_computed(names: tuple[str, ...] | list[str], reason: str) -> dict[str, Metric]:
    """The named metrics, all marked not computed for `reason`."""
    return {name: metric(name, reason=reason) for name in names}


@dataclass
class EvaluationReport:
    """Metrics of one evaluation with the settings that produced them.

    Args:
        metrics (`dict[str, Metric]`): by name, in report order.
        settings (`dict`): JSON-ready inputs (model, prompts, seeds, sampler…).
    """

    metrics: dict[str, Metric]
    settings: dict = field(default_factory=dict)

    def value(self, name: str) -> float | None:
        """The named metric's value (None when not computed)."""
        return self.metrics[name].value

    def to_dict(self) -> dict:
        metrics = {
            name: {"value": m.value, "description": m.description, "reason": m.reason or None, "details": m.details}
            for name, m in self.metrics.items()
        }
        return {"settings": self.settings, "metrics": metrics}

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def to_markdown(self) -> str:
        """A Markdown table: metric, value (or "not computed: reason"), what it measures."""
        lines = ["| metric | value | what it measures |", "|---|---|---|"]
        for name, m in self.metrics.items():
            shown = f"{m.value:.6g}" if m.computed else f"not computed: {m.reason}"
            lines.append(f"| {name} | {_cell(shown)} | {_cell(m.description)} |")
        return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def dataset_images(dataset: ImageDataset, size: tuple[int, int] | None = None) -> torch.Tensor:
    """The training images as float `[n, H, W, 3]` in [0, 1], resized (antialiased) to `size` if given.

    Args:
        dataset (`ImageDataset`): the training images (`pixels()` is in [-1, 1]).
        size (`tuple[int, int]`, *optional*): `(H, W)` of the generations they are compared with.
    """
    if dataset.bucketed and len(dataset.groups()) > 1:
        if size is None:
            raise InvalidInputError("training images in several aspect-ratio buckets need the `size` to compare them at.")
        x = torch.cat([_centre_crop_to_aspect(dataset.pixels([i]) / 2 + 0.5, size) for i in range(len(dataset))])
    else:
        x = dataset.pixels() / 2 + 0.5  # (n, 3, H, W) in [0, 1]
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    return x.permute(0, 2, 3, 1).contiguous()


def _centre_crop_to_aspect(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`x` `[n, 3, h, w]` centre-cropped to the aspect ratio of `size`, then resized to it (a bucketed image
    compared with square generations as the square dataset would be)."""
    height, width = x.shape[-2:]
    keep_h, keep_w = min(height, round(width * size[0] / size[1])), min(width, round(height * size[1] / size[0]))
    top, left = (height - keep_h) // 2, (width - keep_w) // 2
    x = x[..., top:top + keep_h, left:left + keep_w]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


def l2_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared pixel difference between every image of `a` and of `b`, `[len(a), len(b)]`.

    Args:
        a (`torch.Tensor`): `[n, H, W, 3]` in [0, 1].
        b (`torch.Tensor`): `[m, H, W, 3]` in [0, 1].
    """
    fa, fb = a.flatten(1).double(), b.flatten(1).double()
    # ||x - y||² expanded would cancel badly for near-identical images; the direct form is exact at 0.
    return torch.stack([((x - fb) ** 2).mean(-1) for x in fa]).float()


def best_matches(distances: torch.Tensor, higher_is_better: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row (a generation), the best value over the columns (training images) and its index.

    Args:
        distances (`torch.Tensor`): `[n, m]` scores.
        higher_is_better (`bool`): similarities (max) instead of distances (min).
    """
    return distances.max(dim=1) if higher_is_better else distances.min(dim=1)


def reconstruction_metrics(
    generated: torch.Tensor, references: torch.Tensor | None, lpips_model=None, clip: ClipScorer | None = None,
    lpips_reason: str = "no LPIPS model given", clip_reason: str = "no CLIP model given",
) -> dict[str, Metric]:
    """Reconstruction: each generation against its closest training image, by LPIPS, L2 and CLIP.

    Args:
        generated (`torch.Tensor`): generations of the training prompts, `[n, H, W, 3]`.
        references (`torch.Tensor`, *optional*): training images `[m, H, W, 3]` (same size for LPIPS/L2).
        lpips_model (`lpips.LPIPS`, *optional*): from `load_lpips`; None → LPIPS not computed.
        clip (`ClipScorer`, *optional*): None → CLIP similarity not computed.
        lpips_reason (`str`): why `lpips_model` is None.
        clip_reason (`str`): why `clip` is None.
    """
    names = ("reconstruction_lpips", "reconstruction_l2", "reconstruction_clip")
    if references is None or len(references) == 0:
        return not_computed(names, "no training images given (--images)")
    l2, l2_index = best_matches(l2_matrix(generated, references))
    out = {"reconstruction_l2": metric(names[1], l2.mean(), per_image=l2.tolist(), best_match=l2_index.tolist())}
    if lpips_model is None:
        out["reconstruction_lpips"] = metric(names[0], reason=lpips_reason)
    else:
        lp, lp_index = best_matches(lpips_matrix(lpips_model, generated, references))
        out["reconstruction_lpips"] = metric(names[0], lp.mean(), per_image=lp.tolist(), best_match=lp_index.tolist())
    if clip is None:
        out["reconstruction_clip"] = metric(names[2], reason=clip_reason)
    else:
        sim, sim_index = best_matches(clip_image_similarity(clip, generated, references), higher_is_better=True)
        out["reconstruction_clip"] = metric(names[2], sim.mean(), per_image=sim.tolist(), best_match=sim_index.tolist())
    return {name: out[name] for name in names}


def editability_metric(images: torch.Tensor, class_prompts: list[str], clip: ClipScorer | None, clip_reason: str = "no CLIP model given") -> Metric:
    """Editability: CLIP cosine of each edit generation with its prompt written with the class word.

    Args:
        images (`torch.Tensor`): generations of the edit prompts (placeholder filled), `[n, H, W, 3]`.
        class_prompts (`list[str]`): the same prompts with the class word in place of the placeholder.
        clip (`ClipScorer`, *optional*): None → not computed.
        clip_reason (`str`): why `clip` is None.
    """
    if clip is None:
        return metric("editability_clip", reason=clip_reason)
    if clip.tokenizer is None:
        return metric("editability_clip", reason=f"the CLIP folder {clip.name} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt)")
    if len(images) == 0:
        return metric("editability_clip", reason="no edit prompts given (--edit-prompts)")
    sims = clip_text_similarity(clip, images, class_prompts)
    return metric("editability_clip", sims.mean(), per_image=sims.tolist())


# ---------------------------------------------------------------------------------------------
# Locality: base vs tuned
# ---------------------------------------------------------------------------------------------


def fixed_noisy_latents(bundle: ModelBundle, count: int, timesteps: tuple[int, ...] = LOCALITY_TIMESTEPS, seed: int = 0):
    """`count × len(timesteps)` noisy latents and their timesteps, the same for every call with `seed`.

    The clean latents are unit Gaussian (the scale of SD's scaled latents): locality asks whether the
    two UNets agree on a fixed input, not whether the input is a real image.

    Args:
        bundle (`ModelBundle`): fixes the latent shape and the noise schedule.
        count (`int`): latents per timestep (one per prompt).
        timesteps (`tuple[int, ...]`): training timesteps to noise to.
        seed (`int`): seed of the CPU generator.
    """
    side, channels = bundle.unet.config.sample_size, bundle.unet.config.in_channels
    generator = torch.Generator().manual_seed(seed)
    n = count * len(timesteps)
    clean = torch.randn((n, channels, side, side), generator=generator)
    noise = torch.randn((n, channels, side, side), generator=generator)
    t = torch.tensor(timesteps, dtype=torch.long).repeat_interleave(count)  # (n,) timestep-major
    return bundle.noise_scheduler.add_noise(clean, noise, t), t


def locality_eps_mse(bundle: ModelBundle, prompts: list[str], timesteps: tuple[int, ...] = LOCALITY_TIMESTEPS,
                     seed: int = 0, clip_skip: int | None = None, batch_size: int = 8) -> float:
    """Mean squared difference between tuned and base (adapters off) predictions on fixed noisy latents.

    Args:
        bundle (`ModelBundle`): the tuned model (peft adapters on).
        prompts (`list[str]`): prompts without the placeholder.
        timesteps (`tuple[int, ...]`): noise levels, each used with every prompt.
        seed (`int`): seed of the fixed latents.
        clip_skip (`int`, *optional*): text-encoder layer, as sampled (None: the family's).
        batch_size (`int`): latents per UNet call.
    """
    if not prompts:
        raise InvalidInputError("locality needs at least one prompt without the placeholder.")
    noisy, t = fixed_noisy_latents(bundle, len(prompts), timesteps, seed)
    texts = list(prompts) * len(timesteps)  # matches the timestep-major latents
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        chunk = slice(start, start + batch_size)
        tuned = predict_noise(bundle, texts[chunk], noisy[chunk], t[chunk], clip_skip)
        with adapters_disabled(bundle):
            base = predict_noise(bundle, texts[chunk], noisy[chunk], t[chunk], clip_skip)
        total += ((tuned.double() - base.double()) ** 2).sum().item()
        count += tuned.numel()
    return total / count


def locality_lpips(lpips_model, base_images: torch.Tensor, tuned_images: torch.Tensor) -> torch.Tensor:
    """LPIPS between base and tuned images of the same (prompt, seed), `[n]`.

    Args:
        lpips_model (`lpips.LPIPS`): from `load_lpips`.
        base_images (`torch.Tensor`): `[n, H, W, 3]`, adapters off.
        tuned_images (`torch.Tensor`): `[n, H, W, 3]`, adapters on, same seeds and order.
    """
    return lpips_pairs(lpips_model, base_images, tuned_images)


# ---------------------------------------------------------------------------------------------
# Diversity and position learning
# ---------------------------------------------------------------------------------------------


def mean_pairwise_lpips(lpips_model, images: torch.Tensor) -> float:
    """Mean LPIPS over all pairs i < j of `images` `[n, H, W, 3]` (n ≥ 2); 0 when all are identical."""
    n = len(images)
    if n < 2:
        raise InvalidInputError(f"diversity needs at least 2 images (2 seeds), got {n}.")
    matrix = lpips_matrix(lpips_model, images, images)
    upper = torch.triu_indices(n, n, offset=1)
    return matrix[upper[0], upper[1]].mean().item()


def background_colour(image: torch.Tensor) -> torch.Tensor:
    """Per-channel median of the image's outermost pixel ring, `[3]` (the background colour)."""
    border = torch.cat([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])  # (perimeter, 3)
    return border.median(dim=0).values


def subject_mask(image: torch.Tensor, threshold: float = DEFAULT_SUBJECT_THRESHOLD) -> torch.Tensor:
    """`[H, W]` bool: pixels with a channel farther than `threshold` from the background colour."""
    return (image - background_colour(image)).abs().amax(dim=-1) > threshold


def subject_centroids(images: torch.Tensor, threshold: float = DEFAULT_SUBJECT_THRESHOLD) -> torch.Tensor:
    """Centre of mass `(x, y)` of each image's subject mask in fractions of the side, `[n, 2]`; NaN where empty.

    Args:
        images (`torch.Tensor`): `[n, H, W, 3]` in [0, 1].
        threshold (`float`): colour distance from the background that counts as subject.
    """
    n, h, w, _ = images.shape
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    out = torch.full((n, 2), float("nan"), dtype=torch.float64)
    for i in range(n):
        mask = subject_mask(images[i].float(), threshold).double()
        if mask.sum() > 0:
            out[i, 0] = (mask.sum(0) * xs).sum() / mask.sum()
            out[i, 1] = (mask.sum(1) * ys).sum() / mask.sum()
    return out


def centroid_spread(centroids: torch.Tensor) -> float | None:
    """RMS distance of the centroids `[n, 2]` from their mean (NaN rows left out); None if fewer than 2 remain."""
    found = centroids[~centroids.isnan().any(dim=1)]
    if len(found) < 2:
        return None
    return (found - found.mean(dim=0)).pow(2).sum(dim=1).mean().sqrt().item()


def diversity_metrics(groups: list[torch.Tensor], lpips_model=None, lpips_reason: str = "no LPIPS model given",
                      threshold: float = DEFAULT_SUBJECT_THRESHOLD) -> dict[str, Metric]:
    """Diversity (mean pairwise LPIPS) and position spread, per prompt across seeds, averaged over prompts.

    Args:
        groups (`list[torch.Tensor]`): per training prompt, its generations `[n_seeds, H, W, 3]`.
        lpips_model (`lpips.LPIPS`, *optional*): None → diversity not computed.
        lpips_reason (`str`): why `lpips_model` is None.
        threshold (`float`): subject-mask colour threshold.
    """
    if not groups or len(groups[0]) < 2:
        return not_computed(("diversity_lpips", "position_spread"), "needs at least 2 seeds (--seeds)")
    spreads = [centroid_spread(subject_centroids(g, threshold)) for g in groups]
    found = [s for s in spreads if s is not None]
    if found:
        spread = metric("position_spread", sum(found) / len(found), per_prompt=spreads)
    else:
        spread = metric("position_spread", reason="no subject found apart from the background in 2 or more images per prompt")
    if lpips_model is None:
        return {"diversity_lpips": metric("diversity_lpips", reason=lpips_reason), "position_spread": spread}
    per_prompt = [mean_pairwise_lpips(lpips_model, g) for g in groups]
    return {"diversity_lpips": metric("diversity_lpips", sum(per_prompt) / len(per_prompt), per_prompt=per_prompt),
            "position_spread": spread}
