"""The locality regulariser of pivotal tuning for diffusion (METHOD.md step 3).

While the UNet's LoRA learns the placeholder, the tuned UNet must keep predicting what the
original UNet predicts at *other* conditionings `c_r`, near the placeholder's. This module picks
those conditionings; the trainer compares the two UNets' predictions there (`locality_loss`).

Modes (`REGULARIZER_MODES`):
- `none`: no regularisation.
- `empty`: the encoding of the empty prompt `""` (PTI's "random image" baseline); other trainers call
  this blank-prompt preservation.
- `class`: the template with the class word (`anchor`) instead of the placeholder: the tuned model
  must give the base model's prediction there. This is the idea of Differential Output Preservation
  (DOP), as ai-toolkit and kohya-style trainers name it (trigger word replaced by the class word).
- `path`: per token position, SLERP (or vSLERP around a centre) between the encoding of the
  template with the placeholder and with the class word, at t. Positions before the placeholder
  are identical in both prompts under CLIP's causal mask; they are copied from the placeholder
  prompt's encoding.
- `sphere`: per token position, a random point at the same angle from the placeholder's encoding
  (and the same norm) as the `path` point at t (note 003).

The encodings of both endpoints do not change while the LoRA is tuned (the pivot is frozen), so
they are computed once, by one text-encoder call; only the cheap interpolation is redone per step
when t is sampled or the mode is random.
"""

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Literal, Mapping, get_args

import torch

from .models.bundle import ModelBundle
from .errors import InvalidInputError, TokenizerError
from .interpolation import rotate_towards_random, slerp, vslerp
from .checks import check_choice, check_number, check_positive_int, check_range
from .models.conditioning import Conditioning
from .placeholder import DEFAULT_TEMPLATES, PlaceholderToken, check_templates, fill_placeholder, placeholder_in_tokenizers
from .training.text_conditioning import encode_conditioning, tokenize
from .user_warnings import warn_user

InterpolationMode = Literal["slerp", "vslerp"]
INTERPOLATION_MODES: tuple[str, ...] = get_args(InterpolationMode)
DEFAULT_T = 0.5


def _path_point(start, end, t, centre, generator):
    """SLERP from the placeholder's encoding towards the class word's (vSLERP around `centre`)."""
    return slerp(start, end, t) if centre is None else vslerp(start, end, t, centre)


def _sphere_point(start, end, t, centre, generator):
    """A random point at the path point's angle from the placeholder's encoding, at its norm (note 003)."""
    origin = torch.zeros((), device=start.device) if centre is None else centre
    return origin + rotate_towards_random(start - origin, end - origin, t, generator)


@dataclass(frozen=True)
class RegularizerModeSpec:
    """What one mode encodes and how it makes a conditioning from it.

    Args:
        name (`str`): the mode's name in configs, the CLI and nodes.
        summary (`str`): one line for help texts.
        encodes (`str`, *optional*): `empty` (the empty prompt), `anchor` (the class-word prompts) or
            `both` (placeholder and class-word prompts, for a point between them); None: nothing.
        point (`callable`, *optional*): `point(start, end, t, centre, generator)` per token position
            (modes that encode `both`); without it the encoding itself is the conditioning.
        always_random (`bool`): a new conditioning at each application even with a fixed t.
    """

    name: str
    summary: str
    encodes: Literal["empty", "anchor", "both"] | None = None
    point: Callable | None = None
    always_random: bool = False

    @property
    def positional(self) -> bool:
        """Compares the placeholder prompt and the class prompt position by position."""
        return self.point is not None


# The registry: adding a mode is one entry here.
MODES: dict[str, RegularizerModeSpec] = {spec.name: spec for spec in (
    RegularizerModeSpec("none", "no regularisation"),
    RegularizerModeSpec("empty", "the empty prompt: blank-prompt preservation (PTI's 'random image' baseline)", "empty"),
    RegularizerModeSpec("class", "the class-word prompt: Differential Output Preservation (DOP, as ai-toolkit and "
                        "kohya-style trainers call it)", "anchor"),
    RegularizerModeSpec("path", "SLERP halfway between the token's prompt and the class word's, per position (the "
                        "method's default)", "both", _path_point),
    RegularizerModeSpec("sphere", "random points at the path point's angle from the token's prompt", "both", _sphere_point,
                        always_random=True),
)}
REGULARIZER_MODES: tuple[str, ...] = tuple(MODES)
RegularizerMode = str  # one of REGULARIZER_MODES
# Modes that interpolate between the placeholder prompt and the class prompt, position by position.
POSITIONAL_MODES = tuple(name for name, spec in MODES.items() if spec.positional)


@dataclass
class RegularizerConfig:
    """Settings of the locality regulariser.

    Args:
        mode (`str`): which conditionings to keep unchanged: `none`, `empty`, `class`, `path` (the
            method's default: halfway between the placeholder and the class word) or `sphere`.
        anchor (`str`): the class word that replaces the placeholder, e.g. `character`.
        templates (`list[str]`): prompt templates with `{}` where the placeholder / class word goes.
        interpolation (`str`): `slerp` (around the origin) or `vslerp` (around `centre`).
        centre (`torch.Tensor`, *optional*): vSLERP centre, `[tokens, dim]` or `[dim]` (e.g. the
            per-position centres of the norm statistics); needed by vSLERP in `path` and `sphere`.
            With several text encoders (SDXL) `dim` is their widths side by side, in family order
            (`[77, 768 + 1280]`), as the conditioning concatenates them; each block is its own space.
        pooled_centre (`torch.Tensor`, *optional*): vSLERP centre `[pooled_dim]` of the pooled
            embedding (SDXL's bigG projection, 1280); needed by vSLERP on SDXL.
        t (`float`): position on the path, 0 = placeholder prompt, 1 = class prompt.
        t_range (`tuple[float, float]`, *optional*): sample t uniformly in [min, max] at each
            application instead (then `t` is ignored).
        weight (`float`): λ_R, the weight of the locality loss next to the diffusion loss. 1.0 as
            DreamBooth's prior-preservation weight: both are ε-prediction MSEs, on the same scale
            (PTI's 0.1 weighs an image-space LPIPS term, a different scale). 0 turns it off.
        every (`int`): apply the regulariser every k training steps (fewer UNet passes).
        samples (`int`): regularisation conditionings per application (a UNet pass each).
        image_space (`bool`): also compare decoded x0 predictions with LPIPS + L2, as PTI does
            (costs two VAE decodes; the trainer computes it).
        image_l2_weight (`float`): λ_L2 of that image-space L2 term (PTI's λ^R_L2 = 0.1).
        timestep_range (`tuple[int, int]`, *optional*): (min, max) timesteps, inclusive, for the
            regularisation's noisy latents; None uses the training timesteps.
    """

    mode: RegularizerMode = "path"
    anchor: str = "character"
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    interpolation: InterpolationMode = "slerp"
    # compare/repr off: a [77, 768] tensor has no truth value and would flood the repr.
    centre: torch.Tensor | None = field(default=None, compare=False, repr=False)
    pooled_centre: torch.Tensor | None = field(default=None, compare=False, repr=False)
    t: float = DEFAULT_T
    t_range: tuple[float, float] | None = None
    weight: float = 1.0
    every: int = 1
    samples: int = 1
    image_space: bool = False
    image_l2_weight: float = 0.1
    timestep_range: tuple[int, int] | None = None

    def __post_init__(self):
        check_choice("mode", self.mode, REGULARIZER_MODES)
        check_choice("interpolation", self.interpolation, INTERPOLATION_MODES)
        if not isinstance(self.anchor, str) or not self.anchor.strip() or "{}" in self.anchor:
            raise InvalidInputError(f"`anchor` must be a class word such as `character`, got {self.anchor!r}.")
        self.anchor = self.anchor.strip()
        self.templates = check_templates(self.templates)
        self.t = check_number("t", self.t, 0.0, 1.0)
        if self.t_range is not None:
            self.t_range = check_range("t_range", self.t_range, 0.0, 1.0, float)
            if self.t != DEFAULT_T:
                warn_user(f"`t`={self.t} is ignored because `t_range` {self.t_range} is given.")
        self.weight = check_number("weight", self.weight, 0.0)
        self.every = check_positive_int("every", self.every)
        self.samples = check_positive_int("samples", self.samples)
        if not isinstance(self.image_space, bool):
            raise InvalidInputError(f"`image_space` must be true or false, got {self.image_space!r}.")
        self.image_l2_weight = check_number("image_l2_weight", self.image_l2_weight, 0.0)
        if self.timestep_range is not None:
            self.timestep_range = check_range("timestep_range", self.timestep_range, 0, None, int)
        self._check_centre()

    @property
    def spec(self) -> RegularizerModeSpec:
        return MODES[self.mode]

    @property
    def is_active(self) -> bool:
        """Whether this config regularises at all (a mode other than `none` and a weight above 0)."""
        return self.mode != "none" and self.weight > 0

    def _check_centre(self) -> None:
        if self.centre is None:
            if self.spec.positional and self.interpolation == "vslerp":
                raise InvalidInputError(
                    "`interpolation` is `vslerp` but no centre was given: connect norm statistics, give "
                    "`centre`, or use `slerp`."
                )
            if self.pooled_centre is not None:
                raise InvalidInputError("`pooled_centre` was given without `centre`: give both (norm statistics of SDXL give both).")
            return
        self.centre = _finite_tensor("centre", self.centre, (1, 2), "[tokens, dim] or [dim]")
        if self.pooled_centre is not None:
            self.pooled_centre = _finite_tensor("pooled_centre", self.pooled_centre, (1,), "[pooled_dim]")
        if self.interpolation != "vslerp":
            warn_user("`centre` is ignored because `interpolation` is not `vslerp`.")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RegularizerConfig":
        """A config from a plain dict (sweep file, JSON input); unknown keys are an error.

        `centre_shape` and `pooled_centre_shape`, written by `to_dict` for metadata, are accepted
        and ignored: the centre tensors themselves must be given again.
        """
        names = {f.name for f in fields(cls)}
        data = {k: v for k, v in dict(data).items() if k not in ("centre_shape", "pooled_centre_shape")}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InvalidInputError(
                f"unknown regulariser setting(s) {', '.join(map(repr, unknown))}; valid settings are "
                f"{', '.join(sorted(names))}."
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings for file metadata; the centre tensor is recorded by its shape only."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("centre", "pooled_centre")}
        out["templates"] = list(self.templates)
        for key in ("t_range", "timestep_range"):
            out[key] = None if out[key] is None else list(out[key])
        out["centre_shape"] = None if self.centre is None else list(self.centre.shape)
        if self.pooled_centre is not None:
            out["pooled_centre_shape"] = list(self.pooled_centre.shape)
        return out


def _finite_tensor(name: str, value, ndims: tuple[int, ...], shape: str) -> torch.Tensor:
    """`value` (a tensor, or a list from JSON) as a float32 tensor; raises unless finite and of `ndims` dimensions."""
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(value, dtype=torch.float32)
    if tensor.ndim not in ndims or not torch.isfinite(tensor).all():
        raise InvalidInputError(f"`{name}` must be a finite {shape} tensor, got shape {tuple(tensor.shape)}.")
    return tensor


@dataclass
class _Encodings:
    """The encoder outputs the conditionings are made from, computed once.

    `placeholder`, `anchor`: `Conditioning`s of `n_templates` prompts (`anchor` alone for `class`,
    the empty prompt alone for `empty`). `interpolated`: per text encoder, `[n_templates, tokens, 1]`,
    True at positions from the placeholder's first token on in that encoder's prompt.
    """

    placeholder: Conditioning | None
    anchor: Conditioning
    interpolated: tuple[torch.Tensor, ...] | None


class LocalityRegularizer:
    """Regularisation conditionings `c_r` for one placeholder, one model and one config.

    Everything is checked when it is built; the text encoders run once, on first use (so build it
    once the pivot is final, or call `refresh()` after the placeholder's vectors change, as in a
    joint schedule). With a text-encoder LoRA, make the first call before tuning starts so that
    `c_r` comes from the original encoders.

    With several text encoders (SDXL) the positional modes interpolate each encoder's block of the
    conditioning in its own space (CLIP-L's 768 and bigG's 1280 separately, each around its part of
    the centre), and the pooled embedding the same way between the two prompts' pooled vectors.

    Args:
        bundle (`ModelBundle`): the model, its tokenizers and text encoders holding the placeholder.
        token (`PlaceholderToken`): the placeholder, as returned by `add_placeholder` (any tokenizer's).
        config (`RegularizerConfig`): the settings.
        clip_skip (`int`, *optional*): encoder layer, as in training (1 = last); None: the family's default.
    """

    def __init__(
        self,
        bundle: ModelBundle,
        token: PlaceholderToken,
        config: RegularizerConfig,
        clip_skip: int | None = None,
    ):
        self.bundle, self.config, self.clip_skip = bundle, config, clip_skip
        self.tokens = placeholder_in_tokenizers(bundle.tokenizers, token)
        self.token = self.tokens[0]
        self.mode = config.spec
        self.placeholder_prompts = [token.fill(template) for template in config.templates]
        self.anchor_prompts = [fill_placeholder(template, config.anchor) for template in config.templates]
        self.centres, self.pooled_centre = self._check_centre_fits()
        self._check_timestep_range()
        self._starts = self._check_alignment() if self.mode.positional else None
        self._encodings: _Encodings | None = None
        self._fixed: Conditioning | None = None  # final conditionings when nothing is sampled

    # -- checks (all before any encoding) -------------------------------------------------------

    def _check_centre_fits(self) -> tuple[tuple[torch.Tensor, ...] | None, torch.Tensor | None]:
        """The centre split into one block per text encoder, and the pooled centre (vSLERP only)."""
        config, bundle = self.config, self.bundle
        if config.interpolation != "vslerp" or not self.mode.positional:
            return None, None
        tokens, widths = bundle.tokenizer.model_max_length, tuple(bundle.embedding_dims.values())
        dim = sum(widths)
        centre = config.centre.detach().float()
        if centre.shape not in ((dim,), (tokens, dim)):
            raise InvalidInputError(
                f"vSLERP centre of shape {tuple(centre.shape)} does not fit this model's conditioning, which is "
                f"[{tokens}, {dim}] per prompt: use centres measured on the same model."
            )
        pooled_dim = _pooled_width(bundle)
        if pooled_dim is None:
            pooled = None
        elif config.pooled_centre is None:
            raise InvalidInputError(
                f"vSLERP on {bundle.family.display_name} also interpolates the pooled embedding, around `pooled_centre` "
                f"[{pooled_dim}]: connect norm statistics measured on this model (they give both centres) or use slerp."
            )
        else:
            pooled = config.pooled_centre.detach().float()
            if pooled.shape != (pooled_dim,):
                raise InvalidInputError(f"`pooled_centre` of shape {tuple(pooled.shape)} does not fit this model's pooled "
                                        f"embedding [{pooled_dim}]: use centres measured on the same model.")
        return tuple(torch.split(centre, list(widths), dim=-1)), pooled

    def _check_timestep_range(self) -> None:
        span = self.config.timestep_range
        total = self.bundle.noise_scheduler.config.num_train_timesteps
        if span is not None and span[1] >= total:
            raise InvalidInputError(f"`timestep_range` {span} goes past the model's last timestep {total - 1}.")

    def _check_alignment(self) -> tuple[torch.Tensor, ...]:
        """Per tokenizer, the index of the placeholder's first token in each template; raises if positions misalign."""
        return tuple(self._starts_in(tokenizer, token) for tokenizer, token in zip(self.bundle.tokenizers, self.tokens))

    def _starts_in(self, tokenizer, token: PlaceholderToken) -> torch.Tensor:
        anchor_ids = tokenizer(self.config.anchor, add_special_tokens=False).input_ids
        if len(anchor_ids) != token.num_vectors:
            pieces = " ".join(tokenizer.convert_ids_to_tokens(anchor_ids))
            raise TokenizerError(
                f"class word `anchor` {self.config.anchor!r} is {len(anchor_ids)} tokens ({pieces}) but the "
                f"placeholder {token.placeholder!r} is {token.num_vectors}: the `{self.config.mode}` mode "
                f"compares the two prompts position by position. Choose a class word of {token.num_vectors} "
                f"token(s) (a single-token word for a one-vector placeholder) or set `num_vectors` to "
                f"{len(anchor_ids)}."
            )
        with_placeholder = tokenize(tokenizer, self.placeholder_prompts)
        with_anchor = tokenize(tokenizer, self.anchor_prompts)
        is_placeholder = torch.isin(with_placeholder, torch.tensor(token.token_ids))
        starts = []
        for i, template in enumerate(self.config.templates):
            if not is_placeholder[i].any():
                raise InvalidInputError(
                    f"template {template!r} is longer than the {with_placeholder.shape[1]} tokens the text "
                    "encoder reads and the placeholder is cut off: shorten it."
                )
            if not torch.equal(with_placeholder[i][~is_placeholder[i]], with_anchor[i][~is_placeholder[i]]):
                raise TokenizerError(
                    f"template {template!r} tokenizes differently around the placeholder and around the class "
                    f"word {self.config.anchor!r}, so positions do not line up: put spaces around {{}}."
                )
            starts.append(int(is_placeholder[i].nonzero()[0]))
        return torch.tensor(starts)

    # -- encodings, computed once ---------------------------------------------------------------

    def refresh(self) -> None:
        """Forget the cached encodings (after the placeholder's vectors changed)."""
        self._encodings, self._fixed = None, None

    def _encode(self) -> _Encodings:
        if self._encodings is not None:
            return self._encodings
        encode = lambda prompts: encode_conditioning(self.bundle, prompts, self.clip_skip)  # noqa: E731
        if self.mode.encodes == "empty":
            self._encodings = _Encodings(None, encode([""]), None)
        elif self.mode.encodes == "anchor":
            self._encodings = _Encodings(None, encode(self.anchor_prompts), None)
        else:
            # One call per encoder for both endpoints of every template.
            both = encode(self.placeholder_prompts + self.anchor_prompts)
            n = len(self.placeholder_prompts)
            positions = torch.arange(both.hidden.shape[1])
            interpolated = tuple((positions[None, :] >= starts[:, None]).unsqueeze(-1).to(both.hidden.device)
                                 for starts in self._starts)
            self._encodings = _Encodings(both[:n], both[n:], interpolated)
        return self._encodings

    # -- per application ------------------------------------------------------------------------

    @property
    def is_random(self) -> bool:
        """Whether conditionings change between applications (sampled t or random directions)."""
        return self.mode.always_random or (self.mode.positional and self.config.t_range is not None)

    def is_active(self, step: int) -> bool:
        """Whether training step `step` (counted from 0) includes the locality loss."""
        config = self.config
        return config.is_active and step % config.every == 0

    def conditionings(self, step: int, generator: torch.Generator | None = None) -> Conditioning | None:
        """The conditionings `c_r` for step `step` (`samples` of them), or None if inactive.

        Args:
            step (`int`): the training step, counted from 0.
            generator (`torch.Generator`, *optional*): for sampled t, random directions and the
                choice of templates when `samples` is smaller than their number.
        """
        if not self.is_active(step):
            return None
        picks = self._pick_templates(generator)
        if not self.is_random:
            if self._fixed is None:
                self._fixed = self._build(torch.arange(self._num_sources()), generator)
            return self._fixed[picks]
        return self._build(picks, generator)

    def _num_sources(self) -> int:
        return 1 if self.mode.encodes == "empty" else len(self.config.templates)

    def _pick_templates(self, generator: torch.Generator | None) -> torch.Tensor:
        """Which template each sample uses: all in turn, or a random subset when samples < templates."""
        n, samples = self._num_sources(), self.config.samples
        if samples >= n:
            return torch.arange(samples) % n
        device = generator.device if generator is not None else "cpu"
        return torch.randperm(n, generator=generator, device=device)[:samples].cpu()

    def _sample_t(self, count: int, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
        """t per sample, `[count, 1, 1]`."""
        if self.config.t_range is None:
            return torch.full((count, 1, 1), self.config.t, dtype=torch.float32, device=like.device)
        t_min, t_max = self.config.t_range
        device = generator.device if generator is not None else "cpu"
        u = torch.rand((count, 1, 1), generator=generator, device=device).to(like.device)
        return t_min + (t_max - t_min) * u

    def _build(self, picks: torch.Tensor, generator: torch.Generator | None) -> Conditioning:
        """Conditionings for the templates `picks`, one per pick."""
        enc = self._encode()
        if not self.mode.positional:
            return enc.anchor[picks]
        start, end = enc.placeholder[picks], enc.anchor[picks]
        t = self._sample_t(len(picks), generator, start.hidden)
        centres = self.centres or (None,) * len(start.widths)
        blocks = []
        for first, last, centre, interpolated in zip(start.blocks(), end.blocks(), centres, enc.interpolated):
            inner = self.mode.point(first, last, t, _on(centre, first), generator)
            # Positions before the placeholder stay exactly the placeholder prompt's.
            blocks.append(torch.where(interpolated[picks], inner.to(first.dtype), first))
        pooled = None
        if start.pooled is not None:  # [n, dim] as one position, between the two prompts' pooled vectors
            first = start.pooled[:, None]
            pooled = self.mode.point(first, end.pooled[:, None], t, _on(self.pooled_centre, first), generator)[:, 0]
            pooled = pooled.to(start.pooled.dtype)
        return Conditioning.from_blocks(blocks, pooled)


def _on(centre: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if centre is None else centre.to(like.device)


def _pooled_width(bundle: ModelBundle) -> int | None:
    """Width of the pooled embedding the UNet is conditioned on (SDXL: bigG's projection), None if none."""
    for spec, encoder in zip(bundle.family.text_encoders, bundle.text_encoders):
        if spec.with_projection:
            return encoder.config.projection_dim
    return None


def locality_loss(tuned_pred: torch.Tensor, base_pred: torch.Tensor) -> torch.Tensor:
    """MSE between the tuned UNet's prediction and the original one's at the same input.

    Args:
        tuned_pred (`torch.Tensor`): prediction with the adapters enabled (carries the gradient).
        base_pred (`torch.Tensor`): prediction with the adapters disabled (the target; detached).
    """
    if tuned_pred.shape != base_pred.shape:
        raise ValueError(f"prediction shapes differ: {tuple(tuned_pred.shape)} and {tuple(base_pred.shape)}.")
    return torch.nn.functional.mse_loss(tuned_pred.float(), base_pred.detach().float())
