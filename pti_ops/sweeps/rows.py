"""The rows and summaries of the sweeps (`sweeps.py`): metric columns, the edit drift, the fit, knee and onset.

Edit drift (`edit_drift_*`), the CLIP-free editability proxy: for each edit prompt and seed, the
image with the placeholder against the image of the same prompt with the class word, same seed.
It is 0 while the token still is its initializer and grows as the token takes the prompt over; it
cannot tell "shows the character in the edit" from "ignores the edit" (only the CLIP score can), so
it measures how much the edit prompt still behaves as it does for the class word.
"""

from ..metrics.evaluation import Scorers
from ..metrics.lpips_model import lpips_pairs
from .analysis import find_knee, fit_through_origin, position_learning_onset
from .report import PER_ENCODER_COLUMNS

INVERSION_METRICS = ("reconstruction_lpips", "reconstruction_l2", "reconstruction_clip", "editability_clip",
                     "diversity_lpips", "position_spread")
LORA_METRICS = ("reconstruction_lpips", "reconstruction_l2", "reconstruction_clip", "editability_clip",
                "locality_eps_mse", "locality_lpips", "diversity_lpips", "position_spread")
# Knee axes, in order of preference; the lower-is-better ones are negated for `find_knee`.
RECONSTRUCTION_AXES = ("reconstruction_lpips", "reconstruction_l2")
EDITABILITY_AXES = ("editability_clip", "edit_drift_lpips", "edit_drift_l2")
HIGHER_IS_BETTER = ("editability_clip", "reconstruction_clip")


# --- rows ---------------------------------------------------------------------------------------


def inversion_row(run: str, lr: float, step: int, result, stopped: str) -> dict:
    """The run's columns at `step` from its history (step 0: the `initial` row, the initializer itself).

    Args:
        run (`str`): the run's label, `lr=…`.
        lr (`float`): its learning rate.
        step (`int`): a recorded step, or 0.
        result (`InversionResult`): the run (its history holds `step`).
        stopped (`str`): why the run stopped early, or empty.
    """
    if step == 0:
        zero = {"distance": 0.0, "norm": result.initial_vectors.norm(dim=-1).mean().item(), "cosine": 1.0, "loss": None}
        return {"run": "initial", "lr": None, "step": 0, "lr_x_steps": 0.0, **zero, **_initial_per_encoder(result),
                "nearest": result.token.initializer, "stopped": "",
                "reasons": {"lr": "the initializer's embedding, before any run", "loss": "not trained"}}
    record = next(h for h in result.history if h["step"] == step)
    nearest = " / ".join(" ".join(tokens) for tokens in record["nearest"])
    per_encoder = {f"{key}_{name}": record[f"{key}_{name}"] for key in _encoder_keys(result) for name in PER_ENCODER_COLUMNS}
    return {"run": run, "lr": lr, "step": step, "lr_x_steps": lr * step, "distance": record["distance"],
            "norm": record["norm"], "cosine": record["cosine"], **per_encoder, "loss": record["loss"], "nearest": nearest,
            "stopped": stopped, "reasons": {}}


def _encoder_keys(result) -> list[str]:
    """The embedding keys of a run with several text encoders (their own columns); none for one encoder."""
    keys = list(result.initial_by_key)
    return keys if len(keys) > 1 else []


def _initial_per_encoder(result) -> dict:
    """Per-encoder columns of the `initial` row: distance 0, cosine 1, each initializer's own norm."""
    out = {}
    for key in _encoder_keys(result):
        norm = result.initial_by_key[key].norm(dim=-1).mean().item()
        out.update({f"{key}_distance": 0.0, f"{key}_norm": norm, f"{key}_cosine": 1.0})
    return out


def lora_row(run: str, label: str, lr: float | None, result, stopped: str, evaluated: dict) -> dict:
    """A LoRA run's columns: final losses and the evaluated metrics (`result` None: the `base` row).

    Args:
        run (`str`): the run's label, `REGULARISER lr=…`, or `base`.
        label (`str`): the regulariser's label (empty for `base`).
        lr (`float`, *optional*): the learning rate (None for `base`).
        result (`TuneResult`, *optional*): the run.
        stopped (`str`): why the run stopped early, or empty.
        evaluated (`dict`): metric columns with their `reasons`.
    """
    last = result.history[-1] if result is not None and result.history else {}
    reasons = evaluated.pop("reasons")
    if result is None:
        reasons.update(lr="base model: no LoRA", loss="base model: not trained", reg_loss="base model: not trained")
    elif "reg_loss" not in last:
        reasons["reg_loss"] = "no regulariser"
    return {"run": run, "regularizer": label, "lr": lr, "step": last.get("step", 0), "loss": last.get("loss"),
            "reg_loss": last.get("reg_loss"), "stopped": stopped, **evaluated, "reasons": reasons}


def metric_columns(report, names: tuple[str, ...], reasons: dict) -> dict:
    """`{name: value}` of the named metrics of an `EvaluationReport`; the reasons of missing ones go into `reasons`."""
    out = {}
    for name in names:
        m = report.metrics[name]
        out[name] = m.value
        if not m.computed:
            reasons[name] = m.reason
    return out


def edit_drift(placeholder_set, class_images, scorers: Scorers, reasons: dict) -> dict:
    """`edit_drift_lpips` and `edit_drift_l2`: the placeholder's edit images against the class word's.

    Args:
        placeholder_set (`SampleResult`, *optional*): the evaluation's `editability` set.
        class_images (`torch.Tensor`, *optional*): the same prompts with the class word, same seeds and order.
        scorers (`Scorers`): LPIPS (None → only the L2 drift).
        reasons (`dict`): receives the reasons of missing columns.
    """
    if placeholder_set is None or class_images is None:
        reasons.update(edit_drift_lpips="no edit prompts given", edit_drift_l2="no edit prompts given")
        return {"edit_drift_lpips": None, "edit_drift_l2": None}
    images = placeholder_set.images
    l2 = ((images.double() - class_images.double()) ** 2).mean(dim=(1, 2, 3)).mean().item()
    if scorers.lpips is None:
        reasons["edit_drift_lpips"] = scorers.lpips_reason
        return {"edit_drift_lpips": None, "edit_drift_l2": l2}
    return {"edit_drift_lpips": lpips_pairs(scorers.lpips, images, class_images).mean().item(), "edit_drift_l2": l2}


def scorer_names(scorers: Scorers) -> dict:
    """JSON-ready note of which scorers were used, or why not."""
    return {"lpips": None if scorers.lpips is None else type(scorers.lpips).__name__, "lpips_reason": scorers.lpips_reason or None,
            "clip": None if scorers.clip is None else scorers.clip.name, "clip_reason": None if scorers.clip else scorers.clip_reason}


# --- summaries ----------------------------------------------------------------------------------


def inversion_summary(rows: list[dict], traces: dict, threshold: float) -> dict:
    """The fit of distance vs lr × steps over every history record, the ratio per run, and the knee.

    The knee is found on all evaluated rows together (reconstruction and editability as functions of
    distance, whichever run measured them), with the first computed of `RECONSTRUCTION_AXES` and of
    `EDITABILITY_AXES`, oriented higher = better.
    """
    points = [p for trace in traces.values() for p in trace]
    if not points:
        return {"distance_fit": None, "knee": None, "knee_reason": "no run recorded any step"}
    fit = fit_through_origin([p["lr_x_steps"] for p in points], [p["distance"] for p in points])
    summary = {"distance_fit": fit.to_dict(),
               "distance_per_lr_x_steps": {run: t[-1]["distance"] / t[-1]["lr_x_steps"] for run, t in traces.items() if t}}
    recon = _first_computed(rows, RECONSTRUCTION_AXES)
    edit = _first_computed(rows, EDITABILITY_AXES)
    if recon is None or edit is None:
        summary.update(knee=None, knee_reason=f"no {'reconstruction' if recon is None else 'editability'} measure was computed")
        return summary
    summary["knee_axes"] = {"reconstruction": recon, "editability": edit}
    usable = [r for r in rows if r.get(recon) is not None and r.get(edit) is not None]
    knee, reason = find_knee([r["distance"] for r in usable], [_better(recon, r[recon]) for r in usable],
                             [_better(edit, r[edit]) for r in usable], threshold)
    summary["knee_threshold"] = threshold
    if knee is None:
        summary.update(knee=None, knee_reason=reason)
        return summary
    row = usable[knee.index]
    summary["knee"] = {"run": row["run"], "lr": row["lr"], "step": row["step"], "distance": knee.distance,
                       "initial_slope": knee.initial_slope, "slope_after": knee.slope_after,
                       "row_values": {"reconstruction": row[recon], "editability": row[edit]}}
    return summary


def lora_summary(rows: list[dict], labels: list[str], fraction: float) -> dict:
    """The base model's position spread and, per regulariser, the onset lr of position learning."""
    base = next(row for row in rows if row["run"] == "base")
    onset, reasons = {}, {}
    for label in labels:
        runs = [r for r in rows if r["regularizer"] == label]
        onset[label], reason = position_learning_onset([r["lr"] for r in runs], [r["position_spread"] for r in runs],
                                                       base["position_spread"], fraction)
        if reason:
            reasons[label] = reason
    return {"base_position_spread": base["position_spread"], "onset_fraction": fraction, "onset_lr": onset,
            "onset_reason": reasons}


def _first_computed(rows: list[dict], names: tuple[str, ...]) -> str | None:
    return next((n for n in names if any(r.get(n) is not None for r in rows)), None)


def _better(name: str, value: float) -> float:
    """`value` oriented higher = better."""
    return value if name in HIGHER_IS_BETTER else -value
