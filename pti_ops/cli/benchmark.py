"""`python -m pti_ops benchmark toyworld`: the notes' studies on the toy world, written to docs/."""

import argparse
from pathlib import Path


def add_benchmark_command(subparsers) -> None:
    p = subparsers.add_parser(
        "benchmark", help="run the notes' studies on the toy world (inversion lr, LoRA lr, regulariser modes).",
        description="Runs, on several held-out toy-world characters and seeds: the inversion learning-rate study "
        "(reconstruction and editability against the measured distance, distance vs lr x steps, the knee), the LoRA "
        "learning-rate study (onset of position learning) and every regulariser mode against none. Writes a Markdown "
        "report and the raw rows as JSON beside it.")
    p.add_argument("world", choices=["toyworld"], help="the benchmark to run (the toy world).")
    p.add_argument("--quick", action="store_true", help="one character, one seed, a few steps: checks the pipeline (numbers meaningless).")
    p.add_argument("--model", default="toy", help="toy (the shipped model) or a folder of another toy-world model.")
    p.add_argument("--out", default="docs/toyworld-results.md", help="Markdown report (default: docs/toyworld-results.md); raw JSON beside it.")
    p.set_defaults(handler=run_benchmark_command)


def run_benchmark_command(args: argparse.Namespace) -> int:
    from ..toyworld import BenchmarkConfig, run_benchmark, write_results

    config = BenchmarkConfig.quick(args.model) if args.quick else BenchmarkConfig(model=args.model)
    report = run_benchmark(config)
    path = write_results(report, Path(args.out))
    print(f"wrote {path} and {path.with_suffix('.json')} ({report['seconds']} s)")
    return 0
