"""`python -m pti_ops demo`: the whole job on a small example, in about a minute on a CPU.

Draws example images of a character, learns a token for it on the tiny model and writes the
embedding and the run's history into a report folder.
"""

import argparse
import logging
from pathlib import Path

from .bundle import load_bundle
from .cli import TerminalProgress, write_json
from .dataset import DatasetConfig, load_image_folder
from .embedding_file import save_embedding
from .errors import OutputExistsError
from .example_images import write_example_images
from .inversion import InversionConfig, config_to_dict, run_inversion

logger = logging.getLogger(__name__)


def add_demo_command(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the method end to end on a small example and write a report folder.",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="report folder (default: demo_out); must not exist unless --overwrite.")
    p.add_argument("--steps", type=int, default=200, help="inversion steps (default: 200).")
    p.add_argument("--lr", type=float, default=5e-3, help="inversion learning rate (default: 5e-3).")
    p.add_argument("--overwrite", action="store_true", help="write into an existing report folder, replacing its files.")
    p.set_defaults(handler=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise OutputExistsError(f"report folder {out} exists and is not empty: choose another --out or pass --overwrite.")
    images = out / "images"
    write_example_images(images, count=6, size=64)
    bundle = load_bundle("tiny")
    resolution = bundle.unet.config.sample_size * bundle.vae_scale_factor
    dataset = load_image_folder(images, DatasetConfig(resolution=resolution, flip=True))
    config = InversionConfig(placeholder="tok1", initializer="character", steps=args.steps, learning_rate=args.lr,
                             batch_size=2, history_every=max(1, args.steps // 20))
    progress = TerminalProgress(config.steps, "demo: invert tok1")
    try:
        result = run_inversion(bundle, dataset, config, on_step=progress)
    finally:
        progress.close()
    embedding = save_embedding(out / "tok1.safetensors", result.vectors, bundle.family, result.metadata(bundle.name), overwrite=True)
    history = write_json(out / "history.json", {"config": config_to_dict(config), "vocabulary_norm": result.vocabulary_norm,
                                                 "history": result.history})
    first, last = result.history[0], result.history[-1]
    print(f"demo report in {out.resolve()}")
    print(f"  images:    {images} ({len(dataset)} drawn examples)")
    print(f"  embedding: {embedding}  (use as embedding:tok1 in ComfyUI)")
    print(f"  history:   {history}")
    print(f"  loss {first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f} (step {last['step']}); "
          f"distance from 'character' {last['distance']:.4f}, norm {last['norm']:.4f}, cos {last['cosine']:.3f}")
    return 0
