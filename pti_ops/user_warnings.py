"""Warnings for the user, given on every run that triggers them.

Python's `warnings.warn` shows a message once per place and process (its default filter). ComfyUI
runs every queued workflow in one process, so a second run on the same folder with an unreadable
image said nothing and silently trained on fewer images. Here a warning is

- logged every time, at WARNING, by the package's logger (ComfyUI's server log, the CLI's stderr);
- added to every `collect_warnings()` block open around it, so the caller can show it where the user
  looks (a node's text output, a report);
- kept by the object it concerns when that object outlives the run: a dataset's `warnings`, which a
  training node reports again each time it trains, also when ComfyUI served the dataset from its cache.

```python
with collect_warnings() as collected:
    dataset = load_image_folder(folder, DatasetConfig(on_bad_image="skip"))
collected  # ["skipped 1 unreadable image(s) in …: broken.png (…)"], and the same in the log
```
"""

import contextlib
import contextvars
import logging
from typing import Iterator

# The package's own logger ("pti_ops", or "<pack folder>.pti_ops" inside ComfyUI).
logger = logging.getLogger(__name__.rpartition(".")[0] or __name__)

# The lists of the `collect_warnings` blocks open in this context (innermost last).
_COLLECTORS: contextvars.ContextVar[tuple[list[str], ...]] = contextvars.ContextVar("pti_ops_collectors", default=())


def warn_user(message: str) -> str:
    """Log `message` as a warning (every call: nothing is deduplicated) and add it to the open collectors.

    Args:
        message (`str`): one sentence for the user: what happened, to which input, what it means.
    """
    logger.warning(message)
    for collected in _COLLECTORS.get():
        collected.append(message)
    return message


@contextlib.contextmanager
def collect_warnings() -> Iterator[list[str]]:
    """A list that receives every `warn_user` message given inside the block (they are logged as well)."""
    collected: list[str] = []
    token = _COLLECTORS.set(_COLLECTORS.get() + (collected,))
    try:
        yield collected
    finally:
        _COLLECTORS.reset(token)


def warnings_section(messages: list[str], title: str = "## Warnings") -> str:
    """A Markdown section listing `messages` (empty text when there are none), for reports and node outputs."""
    if not messages:
        return ""
    return "\n".join([title, "", *(f"- {message}" for message in dict.fromkeys(messages))]) + "\n"
