"""The scorers of an evaluation (LPIPS, CLIP) as one call for every face: what to load, and why not.

A default never needs a file the package cannot ship: `lpips="auto"` (the default of the CLI and the
nodes) uses AlexNet's LPIPS where torchvision's weights are in the torch hub cache and otherwise reports
the LPIPS metrics as not computed, with the reason and where to put the file (a warning, on every run).
A backbone named explicitly (`alex`, `vgg`) is required where the face says so (the CLI: a missing file
stops before any generation); elsewhere (the nodes, whose saved workflows hold `alex`) it is a reason too.
"""

import logging
from typing import Literal

import torch

from ..errors import ModelLoadError
from ..user_warnings import warn_user
from .clip import try_load_clip
from .evaluation import Scorers
from .lpips_model import load_lpips

logger = logging.getLogger(__name__)

LpipsChoice = Literal["auto", "alex", "vgg", "random", "off"]
LPIPS_CHOICES: tuple[str, ...] = ("auto", "alex", "vgg", "random", "off")
# `auto` tries LPIPS' own default backbone.
AUTO_NET = "alex"


def load_scorers(
    lpips: LpipsChoice = "auto",
    clip_model: str | None = None,
    device: str | torch.device = "cpu",
    required: bool = False,
    what: str = "`lpips`",
    clip_what: str = "`clip_model_folder`",
) -> Scorers:
    """LPIPS and CLIP scorers; one that cannot be loaded is None with the reason.

    Args:
        lpips (`str`): `auto` (alex where its weights are on disk, else not computed), `alex` or `vgg`,
            `random` (an untrained backbone: tests the pipeline, values not perceptual) or `off`.
        clip_model (`str`, *optional*): a local transformers CLIPModel folder; None: CLIP scores not computed.
        device (`str`): where the networks go.
        required (`bool`): a backbone named explicitly must load (its missing file raises).
        what (`str`): the LPIPS input as the user sees it (`--lpips`, `` `lpips` ``), for the reasons.
        clip_what (`str`): the CLIP folder input as the user sees it.
    """
    if clip_model:
        clip, clip_reason = try_load_clip(clip_model, device)
    else:
        clip, clip_reason = None, f"no CLIP model folder given ({clip_what}): CLIP scores need a local transformers CLIPModel folder"
    if lpips == "off":
        return Scorers(None, clip, f"LPIPS switched off ({what} off)", clip_reason)
    if lpips == "random":
        warn_user("LPIPS with a random backbone: its values test the pipeline and are not perceptual distances.")
        return Scorers(load_lpips(AUTO_NET, random_backbone=True, device=device), clip, "", clip_reason)
    try:
        return Scorers(load_lpips(AUTO_NET if lpips == "auto" else lpips, device=device), clip, "", clip_reason)
    except (ModelLoadError, ModuleNotFoundError) as err:  # MissingModelFileError included
        if required and lpips != "auto":
            raise
        reason = f"{err} ({what} {lpips}: LPIPS is computed where its weights are on disk; `off` silences this)"
        warn_user(f"LPIPS metrics not computed: {reason}")
        return Scorers(None, clip, reason, clip_reason)
