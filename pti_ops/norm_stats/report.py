"""What norm statistics conclude, and how they are written: summary, report, JSON, plot.

The functions take a `NormStats` (norm_stats.py) and are its methods' bodies; JSON reading
returns the constructor's keyword arguments, so this module does not import the class.
"""

import json
import math
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch

from ..checks import check_finite
from ..errors import InvalidInputError
from .endpoints import EndpointStats
from .geometry import ROUNDING, ShellStats
from .spaces import EOS
from ..metrics.plots import new_figure

# A shell is "thin" when the norms vary by less than 10 % of their mean. Any cloud in d dimensions
# has CV ~ 1/sqrt(2d) (0.026 at d=768), so this only screens out clouds that are not shells at all.
SHELL_CV = 0.1
# Raw norms count as fixed by construction (LayerNorm) below 1 % CV: in docs/norm-stats.md a
# unit-gain LayerNorm gives ~1e-7 (rounding), a spread-out gain 0.009, offset shells 0.015-0.076.
NEAR_CONSTANT_CV = 0.01
# When SLERP and vSLERP both stay within 1 % of the straight path (relative to its norm), they
# are within 2 % of each other everywhere: a convention for "immaterial", always shown with the numbers.
IMMATERIAL_GAP = 0.01
JSON_FORMAT = "pti_ops.norm_stats.compute"
JSON_VERSION = 1
LAYERNORM_BIAS = "layernorm_bias"  # the `centre` mode whose centre is the final LayerNorm's bias β


def where(stats) -> str:
    """`position 5`, `the EOS vector` or `the word 'cat'`."""
    if isinstance(stats.position, int):
        return f"position {stats.position}"
    return "the EOS vector" if stats.position == EOS else f"the word {stats.position!r}"


def summary(stats) -> str:
    """The conclusion in one sentence (`NormStats.summary`)."""
    raw, centred = stats.raw.cv, stats.centred.cv
    if stats.centre != LAYERNORM_BIAS and not stats.centred.mean_norm > ROUNDING * stats.raw.mean_norm:
        return (
            f"at {where(stats)} of `{stats.space}` every caption gives the same vector (the same token there, "
            "after the same tokens), so there is no spread to measure: choose a position inside the captions' words."
        )
    holds = min(raw, centred) < SHELL_CV  # False if both are NaN
    if stats.centre == LAYERNORM_BIAS:
        around = f"around the final LayerNorm's bias β (held-out; β lies {stats.offset:.2f} radii from the origin)"
    else:
        around = f"centred (held-out; the centre lies {stats.offset:.2f} radii from the origin)"
    parts = [
        f"shell structure {'holds' if holds else 'does not hold'} at {where(stats)} of `{stats.space}`: "
        f"CV {raw:.3g} raw, {centred:.3g} {around}",
        _bias_verdict(stats) if stats.centre == LAYERNORM_BIAS else _mean_verdict(stats),
    ]
    if stats.endpoints is not None:
        parts.append(_endpoint_verdict(stats.endpoints))
    return "; ".join(parts) + "."


def _mean_verdict(stats) -> str:
    raw, centred = stats.raw.cv, stats.centred.cv
    if raw < NEAR_CONSTANT_CV and not centred < raw:
        why = ", as the final LayerNorm makes them" if stats.after_final_norm else " (as after a LayerNorm)"
        return (
            f"raw norms are near-constant{why}, so centring cannot lower their spread and this says "
            "nothing against an offset centre"
        )
    if centred < raw:
        return "centring lowers the CV: the shell is offset from the origin and vSLERP around the stored centres follows it"
    after_norm = " (taken after the final LayerNorm, which nearly fixes raw norms)" if stats.after_final_norm else ""
    return (
        f"centring does not lower the CV{after_norm}: the spread around the centre (thickness or "
        "anisotropy of the shell) is divided by a smaller radius than the raw spread is, so compare the "
        "centre's distance from the origin, not the CVs, to judge the offset"
    )


def _bias_verdict(stats) -> str:
    # Every vector is γ ⊙ ẑ + β with ‖ẑ‖ = √d: ‖x − β‖ is constant exactly when γ is uniform.
    if stats.centred.cv < NEAR_CONSTANT_CV:
        return (
            "the norms around β are near-constant: the final LayerNorm's shell γ⊙ẑ+β is (close to) a sphere "
            "around β, its gain γ (nearly) uniform, so vSLERP around the stored centres (β) follows it"
        )
    return (
        "the norms around β still vary: the final LayerNorm's shell γ⊙ẑ+β is an ellipsoid around β (its gain "
        "γ is not uniform; ‖(x−β)/γ‖ is the constant), so vSLERP around β keeps ‖x−β‖ but only approximates the shell"
    )


def _endpoint_verdict(endpoints: EndpointStats) -> str:
    if not endpoints.trained:
        return (
            "no trained placeholder embedding was given, so the SLERP endpoints coincide (the placeholder "
            "starts as its class word) and the SLERP/vSLERP choice cannot be judged yet"
        )
    gap, vgap = endpoints.max_gap
    text = f"slerp and lerp differ by at most {gap:.2%} between the endpoints (vslerp: {vgap:.2%})"
    if max(gap, vgap) < IMMATERIAL_GAP:
        return text + ", so the SLERP/vSLERP choice is immaterial here"
    return text + ", so the SLERP/vSLERP choice matters here"


def report(stats) -> str:
    """A few lines: both spreads, the centre, the endpoints and the summary (`NormStats.report`)."""
    n_fit = (stats.num_captions + 1) // 2
    fitted = f"{n_fit} fit the centre" if stats.centre != LAYERNORM_BIAS else f"{n_fit} unused: the centre is β"
    lines = [
        f"space `{stats.space}` at {where(stats)}, clip_skip {stats.clip_skip}, model {stats.model or '?'}: "
        f"{stats.num_captions} captions ({fitted}, {stats.num_captions - n_fit} are measured)",
        f"{'':8} {'mean norm':>11} {'std norm':>11} {'CV':>9} {'var(|x|^2)':>12} {'along-mean':>11}",
    ]
    for name, s in (("raw", stats.raw), ("centred", stats.centred)):
        lines.append(
            f"{name:8} {s.mean_norm:11.5g} {s.std_norm:11.4g} {s.cv:9.4g} {s.var_sq_norm:12.4g} {s.along_mean_share:11.3g}"
        )
    which = "centre (final LayerNorm bias β)" if stats.centre == LAYERNORM_BIAS else "centre"
    lines.append(f"{which} norm {stats.centre_norm:.5g} ({stats.offset:.3g} radii from the origin)")
    e = stats.endpoints
    if e is not None:
        i = min(e.index, len(e.angle_raw) - 1)
        lines.append(
            f"endpoints {e.placeholder_prompt!r} vs {e.class_prompt!r}: angle at position {e.index} "
            f"{e.angle_raw[i]:.4g} deg raw, {e.angle_centred[i]:.4g} deg centred; max |slerp-lerp|/|lerp| "
            f"{e.max_gap[0]:.3%}, vslerp {e.max_gap[1]:.3%}"
        )
    lines.append("conclusion: " + stats.summary())
    return "\n".join(lines)


def _nan_to_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    return value


def _none_to_nan(value):
    if value is None:
        return math.nan
    if isinstance(value, list):
        return [_none_to_nan(v) for v in value]
    return value


def to_json(stats) -> dict:
    """A JSON-ready dict, NaN as null (`NormStats.to_json`)."""
    return _nan_to_none({
        "format": JSON_FORMAT,
        "version": JSON_VERSION,
        "summary": stats.summary(),
        "space": stats.space,
        "position": stats.position,
        "clip_skip": stats.clip_skip,
        "model": stats.model,
        "num_captions": stats.num_captions,
        "centre": stats.centre,
        "after_final_norm": stats.after_final_norm,
        "raw": asdict(stats.raw),
        "centred": asdict(stats.centred),
        "centre_norm": stats.centre_norm,
        "offset": stats.offset,  # derived; ignored when loading
        "endpoints": None if stats.endpoints is None else asdict(stats.endpoints),
        "centres": stats.centres.tolist(),
        "raw_norms": stats.raw_norms.tolist(),
        "centred_norms": stats.centred_norms.tolist(),
    })


def fields_from_json(source) -> dict:
    """`NormStats` keyword arguments from a file written by `save_json` or a `to_json` dict."""
    if isinstance(source, dict):
        data = source
    else:
        try:
            data = json.loads(Path(source).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InvalidInputError(f"norm statistics file {source} cannot be read as JSON: {err}") from err
    if not isinstance(data, dict) or data.get("format") != JSON_FORMAT or data.get("version") != JSON_VERSION:
        raise InvalidInputError(
            f"{source if not isinstance(source, dict) else 'the data'} is not a norm statistics file "
            f"(expected format {JSON_FORMAT!r} version {JSON_VERSION}): write one with `norm-stats --out`."
        )
    try:
        found = _fields_from_dict(data)
    except (KeyError, TypeError, ValueError) as err:
        raise InvalidInputError(f"norm statistics {source if not isinstance(source, dict) else 'data'} are incomplete or damaged: {err!r}.") from err
    check_finite(found["centres"], f"the vSLERP centres of norm statistics {source if not isinstance(source, dict) else 'data'}")
    return found


def _fields_from_dict(data: dict) -> dict:
    def shell(d: dict) -> ShellStats:
        return ShellStats(**{f.name: _none_to_nan(d[f.name]) for f in fields(ShellStats)})

    e = data["endpoints"]
    endpoints = None if e is None else EndpointStats(**{f.name: _none_to_nan(e[f.name]) for f in fields(EndpointStats)})
    return dict(
        space=data["space"], position=data["position"], clip_skip=data["clip_skip"], model=data["model"],
        num_captions=data["num_captions"], raw=shell(data["raw"]), centred=shell(data["centred"]),
        centre_norm=_none_to_nan(data["centre_norm"]), centres=torch.tensor(data["centres"], dtype=torch.float32),
        raw_norms=torch.tensor(data["raw_norms"], dtype=torch.float32),
        centred_norms=torch.tensor(data["centred_norms"], dtype=torch.float32), endpoints=endpoints,
        centre=data.get("centre", "mean"),  # files written before the option centred on the mean
        # Files written before SDXL: SD1.5's `hidden` and `pooled` were the spaces after the final LayerNorm.
        after_final_norm=data.get("after_final_norm", data["space"] in ("hidden", "pooled")),
    )


def plot(stats):
    """Histograms of raw vs centred held-out norms, absolute and relative (`NormStats.plot_figure`)."""
    figure = new_figure(9.0, 3.6)
    plot_into(figure.subplots(1, 2), stats)
    figure.suptitle(f"`{stats.space}` at {where(stats)}: held-out norms of {len(stats.raw_norms)} captions", fontsize=10)
    return figure


def plot_into(panels, stats, label: str = "") -> None:
    """Draw `stats`' two histograms (absolute, relative to the means) into two matplotlib axes.

    Args:
        panels: two axes.
        stats (`NormStats`): what to draw.
        label (`str`): prefix of the panel titles (e.g. the text encoder).
    """
    centred_name = "centred on β" if stats.centre == LAYERNORM_BIAS else "centred"
    sets = [("raw", stats.raw_norms.double().numpy(), stats.raw), (centred_name, stats.centred_norms.double().numpy(), stats.centred)]
    for panel, relative in zip(panels, (False, True)):
        values = [v / s.mean_norm if relative else v for _, v, s in sets if not relative or s.mean_norm > 0]
        # Shared bins, so a near-constant set shows as one tall bar rather than an invisible sliver.
        edges = np.histogram_bin_edges(np.concatenate(values), bins=40)
        for (name, _, s), v in zip(sets, values):
            panel.hist(v, bins=edges, alpha=0.6, label=f"{name} (CV {s.cv:.3g})")
        panel.legend(fontsize=8)
    prefix = f"{label}: " if label else ""
    panels[0].set(xlabel="norm ‖x‖", ylabel="captions", title=prefix + "norms")
    panels[1].set(xlabel="norm / mean norm", title=prefix + "relative spread (compare these)")
