"""`python -m pti_ops demo`: the whole method on the toy world, measured, in a few minutes on a CPU.

Eight images of a toy-world character the shipped toy model never saw, all in one corner: textual
inversion of `tok1`, the norm statistics at the token's position, LoRA tuning without and with the
`path` regulariser, and the oracle's measurements (reconstruction, editability, locality,
position learning), written as a report folder: image grids, loss and distance plots, the
metrics as JSON and Markdown, and the embedding and LoRA files.
"""

import argparse
import logging

from ..files import check_output_folder

logger = logging.getLogger(__name__)


def add_demo_command(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the method end to end on the toy world and write a report folder.",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="report folder (default: demo_out); must be empty or new unless --overwrite.")
    p.add_argument("--quick", action="store_true", help="a few steps of everything: checks the pipeline in seconds (numbers meaningless).")
    p.add_argument("--model", default="toy", help="toy (the shipped toy-world model) or a folder of another toy-world model.")
    p.add_argument("--overwrite", action="store_true", help="write into an existing report folder, replacing its files.")
    p.set_defaults(handler=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    from ..toyworld import DemoConfig, run_demo

    out = check_output_folder(args.out, args.overwrite, what="--out", hint="pass --overwrite")
    config = DemoConfig.quick(args.model) if args.quick else DemoConfig(model=args.model)
    run_demo(out, config)
    print(f"demo report in {out.resolve()}: metrics.md, grid_reconstruction.png, grid_edits.png, inversion.png, lora_*.png")
    return 0
