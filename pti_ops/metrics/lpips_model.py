"""LPIPS (the `lpips` package) built from local files only, and distance matrices between image sets.

`lpips.LPIPS()` with its defaults downloads the backbone through torchvision. We never let it:
the network is built with a random backbone and no weights, then the torchvision backbone weights
are read from the local torch hub cache and the calibrated linear layers from the `lpips` package
itself. A missing file is an error that names the file and the folder to put it in. Tests may ask
for a random backbone explicitly (`random_backbone=True`): distances are then not perceptual, but
identical images still score exactly 0.
"""

import re
import warnings
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from ..errors import InvalidInputError, MissingModelFileError

LpipsNet = Literal["alex", "vgg"]
LPIPS_NETS: tuple[str, ...] = ("alex", "vgg")
# torchvision's file names for the ImageNet weights lpips was calibrated on (hub cache, `checkpoints/`).
BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
BACKBONE_URLS = {
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
}
# AlexNet's first conv and pools shrink 32 px to 1 px; smaller images are upsampled to this side.
LPIPS_MIN_SIDE = 32
# lpips' backbone slice `net.slice3.6.weight` holds torchvision's `features.6.weight`.
_SLICE_KEY = re.compile(r"^slice\d+\.(\d+)\.(.+)$")


def backbone_path(net: LpipsNet) -> Path:
    """Where the torchvision backbone weights of `net` are looked for (`torch.hub.get_dir()/checkpoints`)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILES[net]


def linear_weights_path(net: LpipsNet) -> Path:
    """The calibrated LPIPS linear layers shipped inside the `lpips` package (`weights/v0.1/NET.pth`)."""
    import lpips

    return Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"


def load_lpips(net: LpipsNet = "alex", random_backbone: bool = False, device: str | torch.device = "cpu") -> torch.nn.Module:
    """An `lpips.LPIPS` network in eval mode, from local files only.

    Args:
        net (`str`): backbone, `alex` (the LPIPS default) or `vgg`.
        random_backbone (`bool`): skip the backbone weights (tests only: values are not perceptual).
        device (`str`): where to put the network.
    """
    import lpips

    if net not in LPIPS_NETS:
        raise InvalidInputError(f"LPIPS `net` must be one of {LPIPS_NETS}, got {net!r}.")
    backbone = None if random_backbone else _read_backbone(net)
    linear = _read_weights(linear_weights_path(net), "the `lpips` package's linear-layer weights (reinstall lpips)")
    # pretrained=False: lpips would otherwise load its linear layers itself with an unsafe torch.load.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation notes on `pretrained=`
        model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
    if backbone is not None:
        model.net.load_state_dict(_backbone_state(model.net, backbone, net))
    missing, unexpected = model.load_state_dict(linear, strict=False)
    if unexpected or not any(k.startswith("lin0.") for k in linear):
        raise InvalidInputError(f"{linear_weights_path(net)} does not hold LPIPS linear layers for {net!r}.")
    return model.train(False).requires_grad_(False).to(device)  # eval mode


def _read_backbone(net: LpipsNet) -> dict[str, torch.Tensor]:
    path = backbone_path(net)
    if not path.is_file():
        raise MissingModelFileError(
            f"LPIPS needs the torchvision {net} weights {path.name}, not found in {path.parent}. Nothing is "
            f"downloaded: copy the file there (it is {BACKBONE_URLS[net]}), or set TORCH_HOME to a folder whose "
            "`hub/checkpoints/` holds it."
        )
    return _read_weights(path, f"torchvision {net} weights")


def _read_weights(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise MissingModelFileError(f"{what}: file {path} not found.")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        raise InvalidInputError(f"{what}: {path} could not be read ({type(err).__name__}: {err}).") from err


def _backbone_state(pnet: torch.nn.Module, torchvision_state: dict, net: str) -> dict[str, torch.Tensor]:
    """torchvision `features.N.*` weights renamed to lpips' `sliceK.N.*`, every key accounted for."""
    state = {}
    for key in pnet.state_dict():
        index, rest = _SLICE_KEY.match(key).groups()
        source = f"features.{index}.{rest}"
        if source not in torchvision_state:
            raise InvalidInputError(f"{backbone_path(net)} lacks {source}: it is not torchvision's {net} checkpoint.")
        state[key] = torchvision_state[source]
    return state


def _to_lpips_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`[N, H, W, 3]` in [0, 1] → `[N, 3, H, W]` in [-1, 1] (LPIPS' range), upsampled below the minimum side."""
    x = images.to(device, torch.float32).permute(0, 3, 1, 2) * 2 - 1
    side = min(x.shape[-2:])
    if side < LPIPS_MIN_SIDE:
        scale = LPIPS_MIN_SIDE / side
        x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    return x


@torch.no_grad()
def lpips_features(model: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Unit-normalised backbone features per layer, `[N, C_l, h_l, w_l]`, as LPIPS compares them.

    Args:
        model (`lpips.LPIPS`): from `load_lpips`.
        images (`torch.Tensor`): `[N, H, W, 3]` in [0, 1].
    """
    import lpips

    device = next(model.parameters()).device
    outs = model.net(model.scaling_layer(_to_lpips_input(images, device)))
    return [lpips.normalize_tensor(o) for o in outs]


@torch.no_grad()
def lpips_matrix(model: torch.nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LPIPS between every image of `a` and every image of `b`, `[len(a), len(b)]` (0 = identical).

    Each image goes through the backbone once (n + m passes, not n · m); the per-pair sum is
    lpips' own: Σ_layers mean_spatial(lin_l((f_a − f_b)²)).

    Args:
        model (`lpips.LPIPS`): from `load_lpips`.
        a (`torch.Tensor`): `[n, H, W, 3]` in [0, 1].
        b (`torch.Tensor`): `[m, H, W, 3]` in [0, 1], the same size as `a`.
    """
    if a.shape[1:] != b.shape[1:]:
        raise InvalidInputError(f"LPIPS compares images of one size, got {tuple(a.shape[1:])} and {tuple(b.shape[1:])}.")
    feats_a, feats_b = lpips_features(model, a), lpips_features(model, b)
    rows = []
    for i in range(a.shape[0]):
        total = 0.0
        for lin, fa, fb in zip(model.lins, feats_a, feats_b):
            total = total + lin((fa[i : i + 1] - fb) ** 2).mean(dim=(1, 2, 3))  # (m,)
        rows.append(total)
    return torch.stack(rows).cpu()


def lpips_pairs(model: torch.nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LPIPS between `a[i]` and `b[i]` for each i, `[n]`.

    Args:
        model (`lpips.LPIPS`): from `load_lpips`.
        a (`torch.Tensor`): `[n, H, W, 3]` in [0, 1].
        b (`torch.Tensor`): `[n, H, W, 3]` in [0, 1].
    """
    if a.shape != b.shape:
        raise InvalidInputError(f"paired LPIPS needs two batches of one shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    return torch.stack([lpips_matrix(model, a[i : i + 1], b[i : i + 1])[0, 0] for i in range(a.shape[0])])

