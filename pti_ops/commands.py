"""The registry of command-line commands (see cli.py)."""

from .cli_benchmark import add_benchmark_command
from .cli_demo import add_demo_command
from .cli_evaluate import add_evaluate_command
from .cli_invert import add_invert_command
from .cli_norm_stats import add_norm_stats_command
from .cli_sweep import add_sweep_command
from .cli_tune import add_run_command, add_tune_command

COMMANDS = [add_demo_command, add_invert_command, add_tune_command, add_run_command, add_norm_stats_command, add_evaluate_command, add_benchmark_command,
            add_sweep_command]
