"""The real-ComfyUI test job in one command: `python tests/run_real_comfyui.py --comfy /path/to/ComfyUI`.

Runs tests/test_real_comfyui.py (which pytest skips without `COMFYUI_DIR`) with the environment it needs.
Those tests make a tiny SD1.5-shaped checkpoint in a temporary folder, start a ComfyUI server on 127.0.0.1
with `--cpu` (this checkout linked into its custom_nodes/), queue every shipped workflow scaled down —
the training workflow three times with other prompts between, the norm-stats and learning-rate-sweep
workflows, and the stock generation graph on the files written (LoraLoader + `embedding:NAME`) — plus the
stock Train LoRA node's output into PivotalEvaluate, check the outputs, the files and the server log
("lora key not loaded", missing embeddings, exceptions), and stop the server. The SDXL tests add two tiny
SDXL-family checkpoints (random weights, full-size text encoders, ~1.8 GiB each, made by make_tiny_sdxl.py in
`--sdxl-dir`, kept there for the next run): the bridge against ComfyUI's own SDXL models, both SDXL workflows,
our files in a stock SDXL graph, and an upstream ModelSamplingDiscrete.

It neither downloads nor installs anything: ComfyUI and its requirements (and this pack's, in the Python
that runs ComfyUI) must be there already. The drivers `comfy_harness.py`, `make_tiny_sd15.py` and `make_tiny_sdxl.py` come from
`--tools` (default: `../shared/tools` beside the checkout). Do not run two at the same time against one
ComfyUI folder: the server's custom_nodes/ link is shared.

    python tests/run_real_comfyui.py --comfy ~/ComfyUI [--python ~/ComfyUI/venv/bin/python] [--sdxl-dir DIR] [-- -k sdxl]
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def comfy_python(comfy: Path, given: str | None) -> str | None:
    """The Python that runs ComfyUI: given, or a venv inside or beside the ComfyUI folder."""
    if given:
        return given
    for candidate in (comfy / "venv", comfy / ".venv", comfy.parent / "venv", comfy.parent / ".venv"):
        python = candidate / "bin" / "python"
        if python.is_file():
            return str(python)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfy", required=True, type=Path, help="the ComfyUI checkout (the folder with main.py)")
    parser.add_argument("--python", help="the Python that runs ComfyUI (default: a venv in or beside --comfy)")
    parser.add_argument("--tools", type=Path, help="folder with comfy_harness.py, make_tiny_sd15.py and make_tiny_sdxl.py")
    parser.add_argument("--sdxl-dir", type=Path, help="folder to keep the tiny SDXL checkpoints in between runs (made "
                        "there when missing; default: a temporary folder, made anew each run)")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments, after --")
    args = parser.parse_args(argv)
    comfy = args.comfy.expanduser().resolve()
    if not (comfy / "main.py").is_file():
        parser.error(f"--comfy {comfy} is not a ComfyUI checkout (no main.py)")
    env = {**os.environ, "COMFYUI_DIR": str(comfy), "PYTHONDONTWRITEBYTECODE": "1"}
    python = comfy_python(comfy, args.python)
    if python is None:
        parser.error(f"no Python found in or beside {comfy} (venv/, .venv/): give --python")
    env["COMFYUI_PYTHON"] = python
    tools = (args.tools or REPO_ROOT.parent / "shared" / "tools").expanduser().resolve()
    missing = [name for name in ("comfy_harness.py", "make_tiny_sd15.py", "make_tiny_sdxl.py") if not (tools / name).is_file()]
    if missing:  # the tests would be skipped, and a skipped job must not read as a pass
        parser.error(f"{', '.join(missing)} not found in {tools}: give --tools")
    env["PTI_COMFY_TOOLS"] = str(tools)
    if args.sdxl_dir:
        env["PTI_TINY_SDXL_DIR"] = str(args.sdxl_dir.expanduser().resolve())
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", "-x",
               str(REPO_ROOT / "tests" / "test_real_comfyui.py"), *args.pytest_args]
    print(f"ComfyUI {comfy}, its Python {python}", flush=True)
    return subprocess.call(command, cwd=REPO_ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
