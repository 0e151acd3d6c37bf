"""ComfyUI entry point of comfyui-pivotal-tuning (V1 API): NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS.

ComfyUI imports this folder as a package. The nodes need diffusers, peft and matplotlib besides
what ComfyUI installs; if one is missing, the error names it and the command that installs the
requirements, and the pack registers no nodes instead of failing inside an import.
Imported as a plain module (no parent package, e.g. by a tool collecting the repository), it
registers nothing.
"""

import importlib.util
import logging
import sys
from pathlib import Path

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
WEB_DIRECTORY = None

def _inside_comfyui() -> bool:
    """Whether this runs inside ComfyUI (pytest collecting this folder does not).

    ComfyUI has imported `comfy` before it loads custom nodes; otherwise its top-level module
    `folder_paths` must be importable. A bare `comfy` folder somewhere on the path is not enough
    (a folder of that name beside the checkout made every test fail to collect).
    """
    if "comfy" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("folder_paths") is not None
    except (ImportError, ValueError):
        return False


if __package__ and _inside_comfyui():
    try:
        from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811
    except ModuleNotFoundError as err:
        # Our own modules and ComfyUI's are not installable requirements: those errors are bugs.
        if err.name is None or err.name.startswith(__package__) or err.name.split(".")[0] in ("comfy", "folder_paths"):
            raise
        requirements = Path(__file__).with_name("requirements.txt")
        logging.getLogger(__name__).error(
            "comfyui-pivotal-tuning: its nodes are not available because the Python package %r is not installed "
            "in the Python that runs ComfyUI. Install the requirements with:\n    %s -m pip install -r %s\n"
            "and restart ComfyUI.",
            err.name.split(".")[0],
            sys.executable,
            requirements,
        )

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
