"""Regenerate the numbers of docs/norm-stats.md: `python docs/norm_stats_demo.py` (CPU, ~40 s).

Every number comes from pti_ops.norm_stats: synthetic shells with closed-form answers, LayerNorm
outputs, and the tiny random SD1.5- and SDXL-shaped models. Seeds are fixed, so the output is reproducible.
"""

import random
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pti_ops.norm_stats.compute import (  # noqa: E402
    NormStatsConfig,
    compute_norm_stats,
    shell_expectations,
    shell_stats,
    stats_of_vectors,
    synthetic_layernorm,
    synthetic_shell,
)
from pti_ops.norm_stats import measure_norm_stats  # noqa: E402
from pti_ops.placeholder import add_placeholder, add_placeholders  # noqa: E402
from pti_ops.training.text_conditioning import encode_prompts, text_transformer  # noqa: E402
from pti_ops.models.tiny_model import build_tiny_bundle, build_tiny_sdxl_bundle  # noqa: E402

N = 20000  # vectors per synthetic case: half fit the centre, half are measured


def axis(dim: int, length: float, second: float = 0.0) -> torch.Tensor:
    """A centre `length` along the first axis (and `second` along the second)."""
    centre = torch.zeros(dim, dtype=torch.float64)
    centre[0], centre[1] = length, second
    return centre


def affine(dim: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """A LayerNorm gain ~ 1 + 0.2·N(0,1) and bias ~ 0.1·N(0,1), like a trained one."""
    g = torch.Generator().manual_seed(seed)
    return 1 + 0.2 * torch.randn(dim, generator=g, dtype=torch.float64), 0.1 * torch.randn(dim, generator=g, dtype=torch.float64)


def synthetic_cases() -> list[tuple[str, torch.Tensor, dict | None]]:
    """(label, vectors, closed form or None) for each synthetic case of the document."""
    thin_sphere = (axis(16, 3.0), 1.0, 0.01)
    thin_ellipsoid = (axis(16, 3.0), torch.linspace(0.9, 1.1, 16, dtype=torch.float64), 0.01)
    thick_768 = (axis(768, 3.0), 1.0, 0.1)
    abs_vs_cv = (axis(64, 3.0), 1.0, 0.05)
    cases = [
        ("A offset sphere d=16, |c|=3R, thickness 1%", thin_sphere),
        ("B offset ellipsoid d=16, radii 0.9-1.1, |c|=3, thickness 1%", thin_ellipsoid),
        ("C offset sphere d=768, |c|=3R, thickness 10%", thick_768),
        ("D offset sphere d=64, |c|=3R, thickness 5%", abs_vs_cv),
    ]
    out = [(label, synthetic_shell(N, *shell, seed=1), shell_expectations(*shell)) for label, shell in cases]
    weight, bias = affine(768)
    out += [
        ("E LayerNorm outputs d=768, unit gain, zero bias", synthetic_layernorm(N, 768), None),
        ("F LayerNorm outputs d=768, gain 1+0.2N, bias 0.1N", synthetic_layernorm(N, 768, weight=weight, bias=bias), None),
        ("G case A's shell through a unit LayerNorm", torch.nn.functional.layer_norm(synthetic_shell(N, *thin_sphere, seed=1), (16,)), None),
    ]
    return out


def print_synthetic() -> None:
    print("## Synthetic data\n")
    print("| case | raw mean | raw std | raw CV | centred mean | centred std | centred CV | var‖x‖² raw → centred | along-mean share raw / centred | offset (radii) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, vectors, expected in synthetic_cases():
        s = stats_of_vectors(vectors, label)
        print(
            f"| {label} | {s.raw.mean_norm:.4g} | {s.raw.std_norm:.3g} | {s.raw.cv:.3g} | {s.centred.mean_norm:.4g} | "
            f"{s.centred.std_norm:.3g} | {s.centred.cv:.3g} | {s.raw.var_sq_norm:.3g} → {s.centred.var_sq_norm:.3g} | "
            f"{s.raw.along_mean_share:.3g} / {s.centred.along_mean_share:.3g} | {s.offset:.3g} |"
        )
        if expected is not None:
            r, c = expected["raw"], expected["centred"]
            print(
                f"| ↳ closed form | {r.mean_norm:.4g} | {r.std_norm:.3g} | {r.cv:.3g} | {c.mean_norm:.4g} | {c.std_norm:.3g} | "
                f"{c.cv:.3g} | {r.var_sq_norm:.3g} → {c.var_sq_norm:.3g} | {r.along_mean_share:.3g} / {c.along_mean_share:.3g} | |"
            )
    print()
    for label, vectors, _ in synthetic_cases()[::3]:
        print(f"- {label[0]}: {stats_of_vectors(vectors, 'synthetic ' + label[0]).summary()}")
    # A LayerNorm's outputs lie exactly on the ellipsoid γ⊙ẑ + β, ‖ẑ‖ = √d: centre β, not the data mean.
    weight, bias = affine(768)
    undone = stats_of_vectors((synthetic_layernorm(N, 768, weight=weight, bias=bias) - bias) / weight, "F undone")
    print(f"- F with the LayerNorm's affine undone, (x − β)/γ: mean norm {undone.raw.mean_norm:.4g}, CV {undone.raw.cv:.3g}\n")


def tiny_captions(n: int = 1000, seed: int = 0) -> list[str]:
    """Captions from the tiny vocabulary; position 5 (the verb) varies, like `tok1` in the method's prompt."""
    rng = random.Random(seed)
    words = {
        "adj": "red blue green yellow black white orange purple small big".split(),
        "subject": "character person man woman girl boy cat dog robot creature".split(),
        "verb": "standing sitting running holding".split(),
        "place": "beach forest city snow".split(),
    }
    pick = lambda key: rng.choice(words[key])  # noqa: E731
    return [f"a {pick('adj')} {pick('adj')} {pick('subject')} {pick('verb')} in the {pick('place')}" for _ in range(n)]


def print_tiny() -> None:
    print("## Tiny model (random weights, 32 wide; 1000 generated captions, position 5 and EOS)\n")
    bundle = build_tiny_bundle()
    captions = tiny_captions()
    torch.manual_seed(0)
    from transformers import CLIPTextModelWithProjection

    with_projection = CLIPTextModelWithProjection(bundle.text_encoder.config).eval()
    with_projection.text_model.load_state_dict(bundle.text_encoder.state_dict())
    runs = [(space, 5, bundle.text_encoder) for space in ("hidden", "hidden_prenorm", "token_embedding")]
    runs += [("pooled", None, bundle.text_encoder), ("projected", None, with_projection)]
    print("| space | position | raw mean | raw CV | centred mean | centred CV | offset (radii) | along-mean share raw |")
    print("|---|---|---|---|---|---|---|---|")
    summaries = []
    for space, position, encoder in runs:
        s = compute_norm_stats(bundle.tokenizer, encoder, captions, NormStatsConfig(space=space, position=position), model_name="tiny")
        print(
            f"| {space} | {s.position} | {s.raw.mean_norm:.4g} | {s.raw.cv:.3g} | {s.centred.mean_norm:.4g} | "
            f"{s.centred.cv:.3g} | {s.offset:.3g} | {s.raw.along_mean_share:.3g} |"
        )
        summaries.append(f"- `{space}`: {s.summary()}")
    print("\n" + "\n".join(summaries) + "\n")
    print_tiny_endpoints(captions)


def placeholder_bundle():
    """The tiny model with `tok1` = the `character` row plus 0.05·N(0,1), standing in for a trained embedding."""
    bundle = build_tiny_bundle()
    token = add_placeholder(bundle.tokenizer, bundle.text_encoder, "tok1", "character")
    with torch.no_grad():
        noise = torch.randn(bundle.embedding_dim, generator=torch.Generator().manual_seed(1))
        bundle.text_encoder.get_input_embeddings().weight[token.token_ids[0]] += 0.05 * noise
    return bundle, token


def print_tiny_endpoints(captions: list[str]) -> None:
    bundle, token = placeholder_bundle()
    config = NormStatsConfig(space="hidden", template="an anime illustration of {}", class_word="character")
    s = compute_norm_stats(bundle.tokenizer, bundle.text_encoder, captions, config, placeholder=token, model_name="tiny")
    e = s.endpoints
    print("Endpoints 'an anime illustration of tok1' vs '… character' (`hidden`, tok1 = class row + 0.05·N(0,1)):\n")
    print(f"- angle per position 0..9, raw (deg): {', '.join(f'{a:.3g}' for a in e.angle_raw[:10])}")
    print(f"- angle per position 0..9, centred (deg): {', '.join(f'{a:.3g}' for a in e.angle_centred[:10])}")
    print(f"- max over t and positions of |slerp-lerp|/|lerp|: {e.max_gap[0]:.3%}; vslerp: {e.max_gap[1]:.3%}")
    print(f"- summary: {s.summary()}\n")


FINAL_NORMS = {  # final LayerNorm (gain γ, bias β) of the tiny model: its init, and two trained-looking ones
    "init: γ=1, β=0": None,
    "γ=1.5 (uniform), β=0.5·N": (lambda g: torch.full((32,), 1.5), lambda g: 0.5 * torch.randn(32, generator=g)),
    "γ=1+0.3·N, β=0.5·N": (lambda g: 1 + 0.3 * torch.randn(32, generator=g), lambda g: 0.5 * torch.randn(32, generator=g)),
}


def set_final_layernorm(bundle, name: str) -> None:
    """Give the tiny model's final LayerNorm the gain and bias of `FINAL_NORMS[name]` (seeded)."""
    if FINAL_NORMS[name] is None:
        return
    make_gain, make_bias = FINAL_NORMS[name]
    g = torch.Generator().manual_seed(5)
    norm = text_transformer(bundle.text_encoder).final_layer_norm
    with torch.no_grad():
        norm.weight.copy_(make_gain(g))
        norm.bias.copy_(make_bias(g))


def print_layernorm_bias() -> None:
    print("## Centre on the final LayerNorm's bias β (`centre=\"layernorm_bias\"`)\n")
    weight, bias = affine(768)
    print("| synthetic LayerNorm outputs, d=768 | CV ‖x−mean‖ | CV ‖x−β‖ | CV ‖(x−β)/γ‖ | mean ‖(x−β)/γ‖ |")
    print("|---|---|---|---|---|")
    for label, gain in (("F: gain 1+0.2N, bias 0.1N", weight), ("F': gain 1.5 (uniform), bias 0.1N", torch.full_like(weight, 1.5))):
        x = synthetic_layernorm(N, 768, weight=gain, bias=bias)
        around_mean, around_bias = stats_of_vectors(x), stats_of_vectors(x, layernorm_bias=bias)
        undone = shell_stats(((x - bias) / gain)[1::2], torch.zeros(768))
        print(f"| {label} | {around_mean.centred.cv:.3g} | {around_bias.centred.cv:.3g} | {undone.cv:.3g} | {undone.mean_norm:.4g} |")
    captions = tiny_captions()
    print("\n| tiny model, final LayerNorm | space | raw CV | CV ‖x−mean‖ | CV ‖x−β‖ | CV ‖(x−β)/γ‖ | ‖β‖ / mean ‖x−β‖ | max vslerp gap around mean / β |")
    print("|---|---|---|---|---|---|---|---|")
    summaries = []
    for name in FINAL_NORMS:
        bundle, token = placeholder_bundle()
        set_final_layernorm(bundle, name)
        norm = text_transformer(bundle.text_encoder).final_layer_norm
        gain, beta = norm.weight.detach().double(), norm.bias.detach().double()
        x = encode_prompts(bundle.tokenizer, bundle.text_encoder, captions)[:, 5].double()
        undone = shell_stats(((x - beta) / gain)[1::2], torch.zeros(32))
        for space in ("hidden", "pooled"):
            runs = {}
            for centre in ("mean", "layernorm_bias"):
                template = dict(template="an anime illustration of {}", class_word="character") if space == "hidden" else {}
                config = NormStatsConfig(space=space, position=5 if space == "hidden" else None, centre=centre, **template)
                runs[centre] = compute_norm_stats(bundle.tokenizer, bundle.text_encoder, captions, config, token if template else None)
            m, b = runs["mean"], runs["layernorm_bias"]
            gaps = f"{m.endpoints.max_gap[1]:.2%} / {b.endpoints.max_gap[1]:.2%}" if space == "hidden" else ""
            undone_cv = f"{undone.cv:.3g}" if space == "hidden" else ""
            print(f"| {name} | `{space}` {m.position} | {m.raw.cv:.3g} | {m.centred.cv:.3g} | {b.centred.cv:.3g} | {undone_cv} | {b.offset:.3g} | {gaps} |")
            summaries.append(f"- {name}, `{space}`, layernorm_bias: {b.summary()}")
    print("\n" + "\n".join(summaries) + "\n")


SDXL_RUNS = (  # (space, clip_skip, encoder, what it is)
    ("hidden", None, None, "the conditioning: penultimate layer, no final LayerNorm"),
    ("hidden_postnorm", None, None, "the penultimate layer through the final LayerNorm"),
    ("hidden_postnorm", 1, None, "the final hidden state (last layer through the final LayerNorm)"),
    ("hidden", 1, None, "the last layer without the final LayerNorm (CLIPSetLastLayer -1)"),
    ("pooled", None, None, "EOS of the final hidden state"),
    ("projected", None, "clip_g", "bigG's pooled conditioning (text_embeds)"),
    ("token_embedding", None, None, "input rows"),
)


def print_tiny_sdxl() -> None:
    print("## Tiny SDXL model (random weights, CLIP-L 32 wide, bigG 64 wide; the same 1000 captions, position 5 and EOS)\n")
    bundle = build_tiny_sdxl_bundle()
    captions = tiny_captions()
    print("| space | clip_skip | encoder | raw mean | raw CV | centred mean | centred CV | offset (radii) | what |")
    print("|---|---|---|---|---|---|---|---|---|")
    for space, clip_skip, encoder, what in SDXL_RUNS:
        position = 5 if space.startswith("hidden") or space == "token_embedding" else None
        config = NormStatsConfig(space=space, position=position, clip_skip=clip_skip, encoder=encoder)
        stats = measure_norm_stats(bundle.tokenizers, bundle.text_encoders, captions, config, family=bundle.family)
        for key, s in stats.encoders.items():
            print(f"| {space} | {s.clip_skip} | {key} | {s.raw.mean_norm:.4g} | {s.raw.cv:.3g} | {s.centred.mean_norm:.4g} | "
                  f"{s.centred.cv:.3g} | {s.offset:.3g} | {what} |")
    token = add_placeholders(bundle.tokenizers, bundle.text_encoders, "tok1", "character")[0]
    with torch.no_grad():
        for i, encoder in enumerate(bundle.text_encoders):  # tok1 = each encoder's class row + 0.05·N(0,1)
            weight = encoder.get_input_embeddings().weight
            row = bundle.tokenizers[i].convert_tokens_to_ids("tok1")
            weight[row] += 0.05 * torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(1 + i))
    config = NormStatsConfig(space="hidden", template="an anime illustration of {}", class_word="character")
    stats = measure_norm_stats(bundle.tokenizers, bundle.text_encoders, captions, config, token, family=bundle.family)
    print(f"\nvSLERP centres `centre_for_positions()` {list(stats.centre_for_positions().shape)}, "
          f"`pooled_centre()` {list(stats.pooled_centre().shape)} (norm {stats.pooled_centre().norm():.4g}).\n")
    print("Endpoints 'an anime illustration of tok1' vs '… character' (`hidden`, tok1 = each class row + 0.05·N(0,1)):\n")
    for key, s in stats.encoders.items():
        e = s.endpoints
        print(f"- {key}: angle at position 5 {e.angle_raw[5]:.3g}° raw, {e.angle_centred[5]:.3g}° centred; max gap "
              f"slerp {e.max_gap[0]:.3%}, vslerp {e.max_gap[1]:.3%}")
    print("\n" + "\n".join(f"- {line}" for line in stats.summary().splitlines()) + "\n")


if __name__ == "__main__":
    warnings.simplefilter("ignore", FutureWarning)
    torch.set_num_threads(1)
    print_synthetic()
    print_tiny()
    print_layernorm_bias()
    print_tiny_sdxl()
