"""Command line: `python -m pti_ops <command> …` (also installed as `pti-ops`).

Each command is a pair of functions in its own module — `add_<name>_command(subparsers)` declares
its options, the function it sets as `handler` runs it — and `COMMANDS` lists them.
"""

import argparse
import logging
import sys

from ..errors import PivotalError
from ..user_warnings import collect_warnings
from .benchmark import add_benchmark_command
from .demo import add_demo_command
from .evaluate import add_evaluate_command
from .invert import add_invert_command
from .norm_stats import add_norm_stats_command
from .option_words import name_option, option_names
from .options import LIMITED_OPTIONS, add_limits_option, check_limits
from .sweep import add_sweep_command
from .tune import add_run_command, add_tune_command

logger = logging.getLogger("pti_ops")

COMMANDS = [add_demo_command, add_invert_command, add_tune_command, add_run_command, add_norm_stats_command,
            add_evaluate_command, add_benchmark_command, add_sweep_command]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pti_ops",
        description="Pivotal tuning for Stable Diffusion: textual inversion, LoRA around the frozen token, measurements.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(subparsers)
    for command in subparsers.choices.values():
        if LIMITED_OPTIONS.keys() & option_names(command).keys():
            add_limits_option(command)
        command.set_defaults(option_names=option_names(command))  # errors name the options (`option_words.py`)
    return parser


class _Formatter(logging.Formatter):
    """Messages as they are; warnings and errors start with their level, as the CLI's own errors do."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"{record.levelname.lower()}: {text}" if record.levelno >= logging.WARNING else text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(_Formatter("%(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])
    try:
        with collect_warnings() as warned:
            check_limits(args)
            code = int(args.handler(args) or 0)
        _repeat_warnings(warned)
        return code
    except PivotalError as err:
        # Errors a user can fix: one clear sentence, no traceback, naming the option the user typed.
        name_option(err, args, getattr(args, "option_fields", None))
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as err:
        if not _out_of_memory(err):
            raise
        print(f"error: out of memory ({_first_line(err)}). Nothing was written. Lower --resolution, --batch-size or "
              "--rank, or use --mixed-precision bf16 and --gradient-checkpointing.", file=sys.stderr)  # fmt: skip
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written.", file=sys.stderr)
        return 130


def _out_of_memory(err: BaseException) -> bool:
    """Python's, torch's CPU allocator's and CUDA's out-of-memory errors (torch raises the latter as RuntimeError)."""
    text = str(err)
    return isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or "can't allocate memory" in text \
        or "out of memory" in text.lower()


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__


def _repeat_warnings(warned: list[str]) -> None:
    """The run's warnings once more at the end, where they are not lost above the training's progress."""
    unique = list(dict.fromkeys(warned))
    if unique:
        lines = "\n".join(f"  - {message}" for message in unique)
        print(f"{len(unique)} warning(s) during this run:\n{lines}", file=sys.stderr)
