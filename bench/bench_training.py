"""Training-step cost of our loops against bare loops that do only the unavoidable work.

Run from the repository root:

    python bench/bench_training.py --model tiny [--device cpu] [--batch 2] [--steps 30] [--repeats 3] [--write bench/RESULTS.md]
    python bench/bench_training.py --model tiny-sdxl ...   (any family: SDXL adds the pooled embedding and time ids)

Every number is a ratio of medians measured in this one run, variants interleaved repeat by
repeat, on the same model, batch and resolution. Measure on a quiet machine (check `uptime`).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pti_ops.models import load_bundle  # noqa: E402
from pti_ops.dataset import dataset_from_tensor  # noqa: E402
from pti_ops.inversion import InversionConfig, run_inversion  # noqa: E402
from pti_ops.lora_tune import UNET_TARGETS, TuneConfig, lora_config, run_tuning  # noqa: E402
from pti_ops.models.conditioning import add_time_ids  # noqa: E402
from pti_ops.placeholder import add_placeholders  # noqa: E402
from pti_ops.regularizer import RegularizerConfig  # noqa: E402
from pti_ops.training.text_conditioning import encode_ids, tokenize_per_encoder  # noqa: E402

PROMPT = "an anime illustration of tok1"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def setup(args):
    bundle = load_bundle(args.model, device=args.device)
    resolution = args.resolution or bundle.unet.config.sample_size * bundle.vae_scale_factor
    images = torch.rand(max(4, args.batch), resolution, resolution, 3, generator=torch.Generator().manual_seed(0))
    tokens = add_placeholders(bundle.tokenizers, bundle.text_encoders, "tok1", "character")
    return bundle, dataset_from_tensor(images, resolution), tokens


def timed_steps(run, steps, warmup, device):
    """Per-step wall times of `run(on_step)` after `warmup` steps, from the progress callback."""
    stamps = []

    def on_step(step, total, logs):
        sync(device)
        stamps.append(time.perf_counter())

    run(on_step)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return statistics.median(gaps[warmup:])


def bare_loop(step_fn, steps, warmup, device):
    """Median step time of a plain Python loop around `step_fn()`."""
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        step_fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


def fixed_batch(bundle, batch, resolution):
    g = torch.Generator().manual_seed(1)
    side = resolution // bundle.vae_scale_factor
    latents = torch.randn(batch, bundle.unet.config.in_channels, side, side, generator=g).to(bundle.device)
    timesteps = torch.randint(0, 1000, (batch,), generator=g).to(bundle.device)
    ids = tokenize_per_encoder(bundle, [PROMPT] * batch)
    time_ids = add_time_ids((resolution, resolution), batch_size=batch).to(bundle.device)
    return latents, timesteps, ids, time_ids


def unet_prediction(bundle, latents, timesteps, conditioning, time_ids):
    """The UNet on `conditioning` (with SDXL's time ids when it has a pooled embedding)."""
    return bundle.unet(latents, timesteps, **conditioning.unet_kwargs(None if conditioning.pooled is None else time_ids)).sample


def measure_lora(args, with_regularizer=False, cached=True):
    bundle, dataset, tokens = setup(args)
    config = TuneConfig(steps=args.steps, batch_size=args.batch, learning_rate=1e-4, history_every=10**6)
    reg = RegularizerConfig(mode="path", every=1, samples=1) if with_regularizer else None
    return timed_steps(lambda cb: run_tuning(bundle, dataset, tokens[0], config, reg, on_step=cb), args.steps, args.warmup, bundle.device)


def measure_preview_share(args, every=10):
    """Share of a LoRA run's wall time spent on previews every `every` steps (1 prompt, 1 seed, 20 sampling steps)."""
    from pti_ops.metrics import PreviewConfig, Previews, SamplingConfig

    def wall(previews):
        bundle, dataset, tokens = setup(args)
        config = TuneConfig(steps=args.steps, batch_size=args.batch, learning_rate=1e-4, history_every=10**6)
        sync(bundle.device)
        start = time.perf_counter()
        run_tuning(bundle, dataset, tokens[0], config, previews=previews)
        sync(bundle.device)
        return time.perf_counter() - start

    sampling = SamplingConfig(steps=20, resolution=args.resolution)
    with_previews = wall(Previews(PreviewConfig(every, ["an anime illustration of {}"], [0], sampling)))
    return (with_previews - wall(None)) / with_previews


def measure_bare_lora(args, extra_work=None):
    """UNet forward + backward + AdamW on the LoRA weights; `extra_work` adds uncached encoders."""
    from peft import inject_adapter_in_model

    bundle, dataset, _ = setup(args)
    inject_adapter_in_model(lora_config(4, 4.0, 0.0, UNET_TARGETS["attention"]), bundle.unet)
    params = [p for n, p in bundle.unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    latents, timesteps, ids, time_ids = fixed_batch(bundle, args.batch, dataset.resolution)
    with torch.no_grad():
        conditioning = encode_ids(bundle, ids)
    pixels = dataset.pixels(list(range(args.batch))).to(bundle.device)

    def step():
        nonlocal latents, conditioning
        if extra_work == "uncached":  # what the reference scripts redo every step
            with torch.no_grad():
                latents = bundle.vae.encode(pixels).latent_dist.sample() * bundle.vae.config.scaling_factor
                conditioning = encode_ids(bundle, ids)
        optimizer.zero_grad(set_to_none=True)
        prediction = unet_prediction(bundle, latents, timesteps, conditioning, time_ids)
        F.mse_loss(prediction, torch.zeros_like(prediction)).backward()
        optimizer.step()

    return bare_loop(step, args.steps, args.warmup, bundle.device)


def measure_inversion(args):
    bundle = load_bundle(args.model, device=args.device)
    _, dataset, _ = setup(args)
    config = InversionConfig(steps=args.steps, batch_size=args.batch, learning_rate=1e-4, history_every=10**6)
    return timed_steps(lambda cb: run_inversion(bundle, dataset, config, on_step=cb), args.steps, args.warmup, bundle.device)


def measure_bare_unet(args, forward_only=False, batch=None):
    """UNet forward+backward with the gradient flowing to the conditioning only (what inversion needs)."""
    bundle, dataset, _ = setup(args)
    latents, timesteps, ids, time_ids = fixed_batch(bundle, batch or args.batch, dataset.resolution)
    with torch.no_grad():
        conditioning = encode_ids(bundle, ids)
    conditioning.hidden.requires_grad_(not forward_only)

    def step():
        if forward_only:
            with torch.no_grad():
                unet_prediction(bundle, latents, timesteps, conditioning, time_ids)
            return
        prediction = unet_prediction(bundle, latents, timesteps, conditioning, time_ids)
        F.mse_loss(prediction, torch.zeros_like(prediction)).backward()
        conditioning.hidden.grad = None

    return bare_loop(step, args.steps, args.warmup, bundle.device)


def measure_bare_inversion(args):
    """Text encoders + UNet forward/backward with the gradient reaching the embedding rows, AdamW on one row per encoder."""
    bundle, dataset, tokens = setup(args)
    latents, timesteps, ids, time_ids = fixed_batch(bundle, args.batch, dataset.resolution)
    weights = [encoder.get_input_embeddings().weight for encoder in bundle.text_encoders]
    for weight in weights:
        weight.requires_grad_(True)
    rows = [torch.nn.Parameter(w[t.token_ids[0]].detach().clone()) for w, t in zip(weights, tokens)]
    optimizer = torch.optim.AdamW(rows, lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        prediction = unet_prediction(bundle, latents, timesteps, encode_ids(bundle, ids), time_ids)
        F.mse_loss(prediction, torch.zeros_like(prediction)).backward()
        for row, weight, token in zip(rows, weights, tokens):
            row.grad = weight.grad[token.token_ids[0]]
            weight.grad = None
        optimizer.step()

    return bare_loop(step, args.steps, args.warmup, bundle.device)


def peak_memory(args, with_regularizer):
    """Peak memory of a fresh process that runs the LoRA loop (RSS on CPU, max allocated on CUDA)."""
    code = (
        "import sys, resource, torch; sys.argv=['x']; sys.path.insert(0, '.');"
        "from bench.bench_training import measure_lora, parse;"
        f"a = parse(['--model', {args.model!r}, '--device', {args.device!r}, '--batch', '{args.batch}', '--steps', '{max(6, args.warmup + 2)}', '--warmup', '1']);"
        f"measure_lora(a, with_regularizer={with_regularizer});"
        "print(torch.cuda.max_memory_allocated() if a.device.startswith('cuda') else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return int(out.stdout.strip().splitlines()[-1])


def demo_wall_time():
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pti_ops", "demo", "--out", str(Path(tmp) / "demo")], check=True,
                       capture_output=True, cwd=Path(__file__).resolve().parents[1])
        return time.perf_counter() - start


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny, tiny-sdxl, toy, a diffusers folder or a checkpoint.")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--steps", type=int, default=30, help="steps per measured run.")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of each median.")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions; the median is reported.")
    p.add_argument("--skip-demo", action="store_true", help="do not time the demo.")
    p.add_argument("--write", default=None, help="append the table to this Markdown file.")
    return p.parse_args(argv)


def main():
    args = parse()
    torch.manual_seed(0)
    variants = {
        "bare_lora": lambda: measure_bare_lora(args),
        "lora": lambda: measure_lora(args),
        "lora_reg": lambda: measure_lora(args, with_regularizer=True),
        "uncached_lora": lambda: measure_bare_lora(args, extra_work="uncached"),
        "bare_unet": lambda: measure_bare_unet(args),
        "bare_unet_b+1": lambda: measure_bare_unet(args, batch=args.batch + 1),
        "unet_forward_1": lambda: measure_bare_unet(args, forward_only=True, batch=1),
        "inversion": lambda: measure_inversion(args),
        "bare_inversion": lambda: measure_bare_inversion(args),
        "preview_share": lambda: measure_preview_share(args),
    }
    results = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            results[name].append(run())
    t = {name: statistics.median(values) for name, values in results.items()}
    memory = {"plain": peak_memory(args, False), "reg": peak_memory(args, True)}
    demo = None if args.skip_demo else demo_wall_time()
    expected_reg = (t["bare_unet_b+1"] + t["unet_forward_1"]) / t["bare_unet"]
    rows = [
        ("inversion step ÷ bare text encoder + UNet fwd+bwd", t["inversion"] / t["bare_inversion"], "≤ 1.05"),
        ("inversion step ÷ bare UNet fwd+bwd alone", t["inversion"] / t["bare_unet"], "the text encoder's share"),
        ("LoRA step ÷ bare LoRA loop", t["lora"] / t["bare_lora"], "≤ 1.05"),
        ("regularised LoRA step ÷ LoRA step", t["lora_reg"] / t["lora"], f"{expected_reg:.2f} measured from parts; FLOPs: {(args.batch + 1) / args.batch + 1 / (3 * args.batch):.2f}"),
        ("peak memory with ÷ without regulariser", memory["reg"] / memory["plain"], "≤ 1.10"),
        ("uncached (VAE + text encoder every step) ÷ our LoRA step", t["uncached_lora"] / t["lora"], "> 1: what the caches save"),
        ("share of a LoRA run spent on previews every 10 steps (1 image, 20 sampling steps)", t["preview_share"],
         "a preview is 20 sampling steps × 2 UNet forwards (guidance) + a VAE decode, per 10 training steps"),
    ]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = (f"model `{args.model}`, device `{args.device}`, batch {args.batch}, {args.steps} steps × {args.repeats} repeats "
              f"(median), torch {torch.__version__}, {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, load {load:.2f} at the end")
    lines = [f"### {header}", "", "| measure | ratio | goal / expectation |", "|---|---|---|"]
    lines += [f"| {name} | {value:.3f} | {goal} |" for name, value, goal in rows]
    lines += ["", "Step times (s): " + ", ".join(f"{k} {v:.4f}" for k, v in t.items() if k != "preview_share"),
              f"Peak memory (MiB): plain {memory['plain'] / 2**20:.0f}, regularised {memory['reg'] / 2**20:.0f}."]
    if demo is not None:
        lines.append(f"Demo wall time: {demo:.1f} s.")
    text = "\n".join(lines) + "\n"
    print(text)
    print(json.dumps({"times": t, "memory": memory, "demo_s": demo}))
    if args.write:
        with open(args.write, "a", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
