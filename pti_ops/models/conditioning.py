"""What the UNet is conditioned on for a batch of prompts: `Conditioning`, and SDXL's size/crop ids.

SD1.5 conditions on per-token states alone (`hidden`, `pooled` None). SDXL (diffusers'
`StableDiffusionXLPipeline.encode_prompt`) concatenates CLIP-L's and bigG's per-token states along
the width (`[b, 77, 768 + 1280]`) and adds bigG's pooled, projected EOS state (`[b, 1280]`) and six
`add_time_ids` (original height/width, crop top/left, target height/width), all given to the UNet
as `added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}`.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import InvalidInputError

# SDXL's added conditioning: original size (h, w), crop top-left (top, left), target size (h, w).
NUM_TIME_IDS = 6
SizePair = tuple[int, int] | Sequence[tuple[int, int]] | torch.Tensor


@dataclass
class Conditioning:
    """A batch of prompt conditionings, as the UNet consumes them.

    Args:
        hidden (`torch.Tensor`): `[batch, tokens, sum(widths)]`, the cross-attention input
            (`encoder_hidden_states`): each text encoder's per-token states side by side, in family order.
        pooled (`torch.Tensor`, *optional*): `[batch, pooled_dim]`, the pooled text embedding of the
            added conditioning (SDXL: bigG's `text_embeds`, 1280 wide); None for SD1.5.
        widths (`tuple[int, ...]`): the width of each encoder's block of `hidden` (SD1.5 `(768,)`,
            SDXL `(768, 1280)`), so per-encoder work (the regulariser) can split it.
    """

    hidden: torch.Tensor
    pooled: torch.Tensor | None
    widths: tuple[int, ...]

    def __post_init__(self):
        if self.hidden.shape[-1] != sum(self.widths):
            raise ValueError(f"conditioning is {self.hidden.shape[-1]} wide but its blocks {self.widths} sum to {sum(self.widths)}")
        if self.pooled is not None and self.pooled.shape[0] != self.hidden.shape[0]:
            raise ValueError(f"pooled batch {self.pooled.shape[0]} differs from hidden batch {self.hidden.shape[0]}")

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    def blocks(self) -> tuple[torch.Tensor, ...]:
        """Each encoder's `[batch, tokens, width]` block of `hidden`, in family order (views)."""
        return tuple(torch.split(self.hidden, list(self.widths), dim=-1))

    @classmethod
    def from_blocks(cls, blocks: Sequence[torch.Tensor], pooled: torch.Tensor | None = None) -> "Conditioning":
        """The conditioning whose `hidden` is `blocks` concatenated along the width."""
        return cls(torch.cat(list(blocks), dim=-1), pooled, tuple(b.shape[-1] for b in blocks))

    @classmethod
    def cat(cls, items: Sequence["Conditioning"]) -> "Conditioning":
        """Concatenate along the batch (all items must have the same blocks)."""
        widths = {item.widths for item in items}
        if len(widths) != 1:
            raise ValueError(f"cannot concatenate conditionings of different blocks {sorted(widths)}")
        pooled = None if items[0].pooled is None else torch.cat([item.pooled for item in items])
        return cls(torch.cat([item.hidden for item in items]), pooled, items[0].widths)

    def __getitem__(self, index) -> "Conditioning":
        """Select along the batch (`cond[2:4]`, `cond[mask]`), keeping the batch dimension."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return Conditioning(self.hidden[index], None if self.pooled is None else self.pooled[index], self.widths)

    def repeat(self, times: int) -> "Conditioning":
        """Each item `times` times in a row (`[a, b]` → `[a, a, b, b]`), as for several images per prompt."""
        pooled = None if self.pooled is None else self.pooled.repeat_interleave(times, dim=0)
        return Conditioning(self.hidden.repeat_interleave(times, dim=0), pooled, self.widths)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Conditioning":
        pooled = None if self.pooled is None else self.pooled.to(device=device, dtype=dtype)
        return Conditioning(self.hidden.to(device=device, dtype=dtype), pooled, self.widths)

    def detach(self) -> "Conditioning":
        return Conditioning(self.hidden.detach(), None if self.pooled is None else self.pooled.detach(), self.widths)

    def unet_kwargs(self, time_ids: torch.Tensor | None = None) -> dict:
        """Keyword arguments of `UNet2DConditionModel.forward` for this conditioning.

        SD1.5: `{"encoder_hidden_states": hidden}`, exactly today's call. With a pooled embedding
        (SDXL) `time_ids` `[batch, 6]` (`add_time_ids`) is required, and the pair goes in as
        `added_cond_kwargs`; both are moved to `hidden`'s device and dtype.

        Args:
            time_ids (`torch.Tensor`, *optional*): `[batch, 6]` or `[6]` (broadcast to the batch).
        """
        if self.pooled is None:
            if time_ids is not None:
                raise InvalidInputError("`time_ids` were given for a conditioning without a pooled embedding (SD1.5 takes none).")
            return {"encoder_hidden_states": self.hidden}
        if time_ids is None:
            raise InvalidInputError("this conditioning has a pooled embedding (SDXL): give `time_ids` from `add_time_ids`.")
        time_ids = time_ids.to(self.hidden.device, self.hidden.dtype)
        if time_ids.ndim == 1:
            time_ids = time_ids.expand(self.batch_size, -1)
        if time_ids.shape != (self.batch_size, NUM_TIME_IDS):
            raise InvalidInputError(f"`time_ids` must be [{self.batch_size}, {NUM_TIME_IDS}], got {list(time_ids.shape)}.")
        added = {"text_embeds": self.pooled.to(self.hidden.dtype), "time_ids": time_ids}
        return {"encoder_hidden_states": self.hidden, "added_cond_kwargs": added}


def _pairs(value: SizePair, name: str) -> torch.Tensor:
    """`value` as `[n, 2]` float64 (exact for any image size)."""
    pairs = torch.as_tensor(value, dtype=torch.float64)
    if pairs.numel() == 0 or pairs.numel() % 2 or (pairs.ndim > 1 and pairs.shape[-1] != 2):
        raise InvalidInputError(f"`{name}` must be a (height, width) pair or one pair per image, got {value!r}.")
    return pairs.reshape(-1, 2)


def add_time_ids(
    original_size: SizePair,
    crop_top_left: SizePair = (0, 0),
    target_size: SizePair | None = None,
    batch_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """SDXL's `add_time_ids` `[batch, 6]`: (original h, w, crop top, crop left, target h, w) per image.

    As diffusers' `StableDiffusionXLPipeline._get_add_time_ids` (`original_size + crops_coords_top_left
    + target_size`), for a batch. Each argument is one pair for all images or one pair per image.

    Args:
        original_size (`tuple[int, int]`): the training image's size before resizing/cropping, (height, width).
        crop_top_left (`tuple[int, int]`): the crop's top-left corner in the resized image, (top, left).
        target_size (`tuple[int, int]`, *optional*): the size trained/sampled at, (height, width);
            `original_size` when None.
        batch_size (`int`, *optional*): rows wanted; the longest argument's count when None.
        dtype (`torch.dtype`): of the result.
        device (`torch.device`, *optional*): of the result.
    """
    parts = [_pairs(original_size, "original_size"), _pairs(crop_top_left, "crop_top_left"),
             _pairs(original_size if target_size is None else target_size, "target_size")]  # fmt: skip
    rows = batch_size or max(p.shape[0] for p in parts)
    for name, part in zip(("original_size", "crop_top_left", "target_size"), parts):
        if part.shape[0] not in (1, rows):
            raise InvalidInputError(f"`{name}` has {part.shape[0]} pairs for a batch of {rows}: give one pair or one per image.")
    ids = torch.cat([part.expand(rows, 2) for part in parts], dim=1)
    return ids.to(device=device, dtype=dtype)
