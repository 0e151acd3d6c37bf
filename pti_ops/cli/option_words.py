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
from typing import Iterator

from ..errors import InvalidInputError


def option_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """`{dest: "--option"}` of a parser's options (the long spelling, as the help shows it)."""
    # argparse lists its actions only in `_actions`; it has been there since argparse began.
    names = {}
    for action in parser._actions:
        if action.option_strings:
            names[action.dest] = max(action.option_strings, key=len)
    return names


def name_option(err: InvalidInputError, args: argparse.Namespace, fields: dict[str, str] | None = None) -> InvalidInputError:
    """Rename `err`'s field to the option that filled it.

    Args:
        err (`InvalidInputError`): raised by a config check (its `field` set), or anything else (left as it is).
        args (`argparse.Namespace`): the parsed arguments (their `option_names`).
        fields (`dict[str, str]`, *optional*): config field → dest where they differ, or → the text to say
            (starting with `-`, e.g. `--t-min/--t-max`).
    """
    if err.field is None:
        return err
    target = (fields or {}).get(err.field, err.field)
    option = target if target.startswith("-") else getattr(args, "option_names", {}).get(target)
    return err.rename(option) if option else err


@contextlib.contextmanager
def in_option_words(args: argparse.Namespace, fields: dict[str, str]) -> Iterator[None]:
    """A block building a config from `args`: its check errors name the options (`fields`: see `name_option`)."""
    try:
        yield
    except InvalidInputError as err:
        name_option(err, args, fields)
        raise
