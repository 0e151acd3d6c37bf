"""Errors in the words the user typed: a config check names its field (`` `t` ``), the CLI says the option
(`--reg-t`).

Every parser knows its options (`option_names`, stored on the parsed arguments by `build_parser`). A
config field is named by the option of the same dest (`num_vectors` → `--num-vectors`); where a command
fills a field from an option of another name, the code building the config says so with
`in_option_words(args, {"t": "reg_t"})`. What is left (a check inside training) is renamed in `main`, by
the command's `option_fields` (set with its handler) or the same-dest rule.
"""

import argparse
import contextlib
import re
from typing import Iterator

from ..errors import InvalidInputError

# A setting named in a message: `num_vectors`.
_SETTING = re.compile(r"`([a-z][a-z0-9_]*)`")


def option_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """`{dest: "--option"}` of a parser's options (the long spelling, as the help shows it)."""
    # argparse lists its actions only in `_actions`; it has been there since argparse began.
    names = {}
    for action in parser._actions:
        if action.option_strings:
            names[action.dest] = max(action.option_strings, key=len)
    return names


def name_option(err: Exception, args: argparse.Namespace, fields: dict[str, str] | None = None) -> Exception:
    """Rename `err`'s field, and any other setting its message names in backticks, to the options that fill them.

    Args:
        err (`Exception`): raised by a config check (an `InvalidInputError` with its `field`), or another of
            the package's errors (settings it names in backticks are renamed; the rest is left as it is).
        args (`argparse.Namespace`): the parsed arguments (their `option_names`).
        fields (`dict[str, str]`, *optional*): config field → dest where they differ, or → the text to say
            (starting with `-`, e.g. `--t-min/--t-max`).
    """
    names = getattr(args, "option_names", {})

    def option_of(field: str) -> str | None:
        target = (fields or {}).get(field, field)
        return target if target.startswith("-") else names.get(target)

    field = getattr(err, "field", None)
    if field and option_of(field):
        err.rename(option_of(field))
    if len(err.args) == 1 and isinstance(err.args[0], str):  # the other settings the message names ("set `num_vectors`")
        err.args = (_SETTING.sub(lambda m: option_of(m.group(1)) or m.group(0), err.args[0]),)
    return err


@contextlib.contextmanager
def in_option_words(args: argparse.Namespace, fields: dict[str, str]) -> Iterator[None]:
    """A block building a config from `args`: its check errors name the options (`fields`: see `name_option`)."""
    try:
        yield
    except InvalidInputError as err:
        name_option(err, args, fields)
        err.field = None  # named: `main` leaves it
        raise
