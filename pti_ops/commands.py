"""The registry of command-line commands (see cli.py)."""

from .cli_invert import add_invert_command
from .cli_demo import add_demo_command

COMMANDS = [add_invert_command, add_demo_command]
