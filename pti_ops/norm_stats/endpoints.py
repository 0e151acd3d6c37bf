"""SLERP endpoints of norm statistics: does SLERP vs vSLERP matter between two prompts?

The placeholder prompt and its class prompt are encoded; per position of the space, the angle
between them (raw and around the centre) and how far SLERP and vSLERP stray from the straight
LERP path are measured.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..errors import InvalidInputError
from ..interpolation import angle_between, lerp, slerp, vslerp
from ..models import DEFAULT_FAMILY, ModelFamily
from .spaces import encode_space
from ..placeholder import PlaceholderToken
from ..training.text_conditioning import tokenize
from ..user_warnings import warn_user

T_STEPS = 101  # points on [0, 1] where the SLERP/LERP gap is measured; the max is at t=0.5 for equal norms


@dataclass
class EndpointStats:
    """SLERP endpoints (placeholder prompt vs class prompt), per position of the space.

    Args:
        placeholder_prompt (`str`), class_prompt (`str`): the two prompts.
        index (`int`): the placeholder's first token index (positions before it are identical in
            both prompts, and under CLIP's causal mask their outputs are too).
        trained (`bool`): False when no placeholder embedding was given: the placeholder then
            equals its class-word initialisation and the endpoints coincide.
        angle_raw (`list[float]`): angle in degrees between the endpoints, per position.
        angle_centred (`list[float]`): the same around the per-position centre.
        slerp_gap (`list[float]`): max over t of ‖slerp − lerp‖ / ‖lerp‖, per position.
        vslerp_gap (`list[float]`): the same with vSLERP around the per-position centre.
    """

    placeholder_prompt: str
    class_prompt: str
    index: int
    trained: bool
    angle_raw: list[float]
    angle_centred: list[float]
    slerp_gap: list[float]
    vslerp_gap: list[float]

    @property
    def max_gap(self) -> tuple[float, float]:
        """(slerp, vslerp) largest relative gap to LERP over all positions."""
        return max(self.slerp_gap), max(self.vslerp_gap)


def interpolation_gaps(a: torch.Tensor, b: torch.Tensor, centre: torch.Tensor, steps: int = T_STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Max over t of ‖slerp − lerp‖/‖lerp‖ and ‖vslerp − lerp‖/‖lerp‖, per row of `a`, `b` `[p, dim]`.

    LERP is the same path raw or centred (μ + lerp(a−μ, b−μ) = lerp(a, b)), so both gaps are
    measured against it.

    Args:
        a (`torch.Tensor`), b (`torch.Tensor`): endpoints `[p, dim]`.
        centre (`torch.Tensor`): vSLERP centres, `[p, dim]` or `[dim]`.
        steps (`int`): points on [0, 1].
    """
    a, b, centre = a.double(), b.double(), centre.double()
    t = torch.linspace(0, 1, steps, dtype=torch.float64)[:, None, None]  # (steps, 1, 1)
    line = lerp(a, b, t)  # (steps, p, dim)
    scale = line.norm(dim=-1).clamp_min(1e-12)
    gap = ((slerp(a, b, t) - line).norm(dim=-1) / scale).amax(dim=0)
    vgap = ((vslerp(a, b, t, centre) - line).norm(dim=-1) / scale).amax(dim=0)
    return gap, vgap


class EndpointPrompts(NamedTuple):
    prompt: str  # with the placeholder (the class prompt again when no placeholder is given)
    class_prompt: str
    index: int  # the placeholder's first token position
    ids: torch.Tensor  # (2, max_length): prompt, class prompt
    trained: bool


def endpoint_prompts(
    tokenizer, template: str | None, class_word: str | None, placeholder: PlaceholderToken | None
) -> EndpointPrompts | None:
    """The two prompts of the SLERP endpoints, tokenized and checked; None without a template."""
    if template is None:
        if placeholder is not None:
            warn_user("`placeholder` is ignored because no `template` is given.")
        return None
    word = class_word.strip()
    class_prompt = template.replace("{}", word)
    prefix = template[: template.index("{}")]
    index = 1 + len(tokenizer(prefix, add_special_tokens=False).input_ids)  # 1 for the start token
    if placeholder is None:
        prompt, first_id = class_prompt, tokenizer(word, add_special_tokens=False).input_ids[0]
    else:
        prompt = placeholder.expand(template.replace("{}", placeholder.placeholder))
        first_id = placeholder.token_ids[0]
    ids = tokenize(tokenizer, [prompt, class_prompt])
    if index >= ids.shape[1] - 1 or int(ids[0, index]) != first_id:
        raise InvalidInputError(
            f"`template` {template!r} does not put the placeholder at a word boundary within the model's "
            f"{ids.shape[1]} tokens: write it with spaces around `{{}}`, e.g. 'an anime illustration of {{}}'."
        )
    return EndpointPrompts(prompt, class_prompt, index, ids, placeholder is not None)


def endpoint_stats(
    text_encoder, prompts: EndpointPrompts, centres: torch.Tensor, space: str, clip_skip: int, eos_id: int,
    family: ModelFamily = DEFAULT_FAMILY,
) -> EndpointStats:
    """Angles and SLERP/LERP gaps between the two prompts' vectors, per position.

    Args:
        text_encoder (`CLIPTextModel`): the (checked, float32) encoder.
        prompts (`EndpointPrompts`): from `endpoint_prompts`.
        centres (`torch.Tensor`): vSLERP centres `[positions, dim]` of the space.
        space (`str`), clip_skip (`int`): what to encode.
        eos_id (`int`): the tokenizer's end token.
        family (`ModelFamily`): whose rule makes the `hidden` space.
    """
    with torch.no_grad():
        out = encode_space(text_encoder, prompts.ids, space, clip_skip, eos_id, family).double().cpu()
    a, b = out[0], out[1]  # (positions, dim)
    centres = centres.double()
    angle_raw = torch.rad2deg(angle_between(a, b)).squeeze(-1)
    angle_centred = torch.rad2deg(angle_between(a - centres, b - centres)).squeeze(-1)
    gap, vgap = interpolation_gaps(a, b, centres)
    return EndpointStats(
        prompts.prompt, prompts.class_prompt, prompts.index, prompts.trained,
        angle_raw.tolist(), angle_centred.tolist(), gap.tolist(), vgap.tolist(),
    )
