"""`python -m pti_ops norm-stats`: norm statistics of a text encoder's vectors over a caption file.

Example (the method's regularisation prompt; position 5 is `tok1`):

    python -m pti_ops norm-stats --model tiny --captions captions.txt --space hidden --position 5 \
        --template "an anime illustration of {}" --class-word character --embedding tok1.safetensors \
        --out stats.json --plot stats.png

Add `--centre layernorm_bias` (spaces read right after the final LayerNorm) to centre on its bias β
rather than on the captions' mean. On SDXL every text encoder is measured (`--encoder` picks one), and
the `hidden` statistics also hold the pooled conditioning's centre: both centres `tune --norm-stats`
reads.
"""

import argparse
import logging

from ..models import load_bundle
from .options import add_model_options
from .outputs import check_output_files, check_output_space, norm_stats_bytes
from ..errors import InvalidInputError
from ..norm_stats import CENTRES, ENCODERS, EOS, SPACES, NormStatsConfig, measure_norm_stats
from ..pivot import Pivot

logger = logging.getLogger(__name__)


def add_norm_stats_command(subparsers) -> None:
    """Declare `norm-stats` and its options on `subparsers`.

    Args:
        subparsers (`argparse._SubParsersAction`): from `parser.add_subparsers()`.
    """
    p = subparsers.add_parser(
        "norm-stats",
        help="check the shell structure of text-encoder vectors (raw vs centred norms) and measure the vSLERP centres.",
        description="Encode every caption, take the vectors of one space at one token position, and report the "
        "spread of their norms raw and centred (centre fitted on half of the captions, spread measured on the "
        "other half), the SLERP/LERP gap between a placeholder prompt and its class prompt, and the per-position "
        "centres vSLERP needs. See docs/norm-stats.md.",
    )
    add_model_options(p)
    p.add_argument("--captions", required=True, help="UTF-8 text file, one caption per line (blank lines skipped).")
    p.add_argument("--space", choices=SPACES, default="hidden",
                   help="hidden: per-token UNet conditioning (SD1.5: after the final LayerNorm; SDXL: the penultimate "
                   "layer without it); hidden_prenorm / hidden_postnorm: the same layer before / through the final "
                   "LayerNorm (--clip-skip 1 --space hidden_postnorm: the final hidden state); pooled: EOS vector; "
                   "projected: EOS through the text projection (the paper's space, SDXL's pooled conditioning; needs "
                   "an encoder that has one: SDXL's clip_g); token_embedding: input rows (default: hidden).")
    p.add_argument("--encoder", choices=("all", *ENCODERS), default="all",
                   help="text encoder to measure, by its embedding key (SDXL: clip_l or clip_g); all: every encoder "
                   "of the model, each reported on its own (the regulariser's vSLERP needs all; default: all).")
    p.add_argument("--position", default=None,
                   help="token index (5 = tok1 in 'an anime illustration of tok1'), 'eos', or a word located in each "
                   "caption (default: the --template placeholder's index, else eos).")
    p.add_argument("--clip-skip", type=int, default=None,
                   help="1 = last text-encoder layer, 2 = penultimate (hidden spaces; default: the model family's "
                   "conditioning layer, 1 for SD1.5, 2 for SDXL).")
    p.add_argument("--template", default=None, help="prompt with {} for the SLERP endpoints, e.g. 'an anime illustration of {}'.")
    p.add_argument("--class-word", default=None, help="class word of the class prompt, e.g. character (needed with --template).")
    p.add_argument("--embedding", default=None,
                   help="trained placeholder embedding (.safetensors) for the placeholder prompt; without it the "
                   "placeholder equals its class word and the endpoints coincide.")
    p.add_argument("--placeholder", default="tok1", help="placeholder word the --embedding is loaded as (default: tok1).")
    p.add_argument("--centre", choices=CENTRES, default="mean",
                   help="centre of the centred statistics and of the vSLERP centres written to --out. mean: the "
                   "captions' mean vector per position; layernorm_bias: the final LayerNorm's bias, the exact centre "
                   "of the shell that hidden and pooled vectors lie on (a sphere only when the LayerNorm's gain is "
                   "uniform; only for --space hidden or pooled). Default: mean.")
    # Its own dest: captions per text-encoder pass are cheap, not the limited image batches of the training commands.
    p.add_argument("--batch-size", dest="caption_batch_size", type=int, default=128, help="captions per forward pass (default: 128).")
    p.add_argument("--out", required=True, help="output statistics file (.json), read by the regulariser for vSLERP centres.")
    p.add_argument("--plot", default=None, help="also write histograms of raw vs centred norms here (.png).")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files.")
    p.set_defaults(handler=run_norm_stats_command, option_fields={"batch_size": "caption_batch_size"})


def parse_position(text: str | None) -> int | str | None:
    """`--position` as the config takes it: an int index, `eos`, a word, or None."""
    if text is None:
        return None
    text = text.strip()
    if text.lower() == EOS:
        return EOS
    try:
        return int(text)
    except ValueError:
        return text


def run_norm_stats_command(args: argparse.Namespace) -> int:
    """Run `norm-stats`: measure, write the JSON (and plot), print the report.

    Args:
        args (`argparse.Namespace`): the parsed options of `add_norm_stats_command`.
    """
    # 1. Check options and outputs before loading anything.
    outputs = check_output_files({"--out": args.out, "--plot": args.plot}, args.overwrite)
    if args.embedding and not args.template:
        raise InvalidInputError("--embedding is only used for the SLERP endpoints: give --template and --class-word too.")
    config = NormStatsConfig(
        space=args.space, position=parse_position(args.position), clip_skip=args.clip_skip,
        template=args.template, class_word=args.class_word, batch_size=args.caption_batch_size, centre=args.centre,
        encoder=None if args.encoder == "all" else args.encoder,
    )
    # 2. Load the model; this command owns it, so adding the placeholder to it is safe.
    bundle = load_bundle(args.model, device=args.device, tokenizer_dir=args.tokenizer_dir)
    config.check_family(bundle.family)
    check_output_space({path: norm_stats_bytes(bundle) for path in outputs.values()})
    placeholder = None
    if args.embedding:  # every encoder's vectors (SDXL: clip_l and clip_g)
        placeholder = Pivot.load(args.embedding, bundle, placeholder=args.placeholder, initializer=args.class_word).apply(bundle)
    # 3. Measure and write.
    stats = measure_norm_stats(bundle.tokenizers, bundle.text_encoders, args.captions, config, placeholder,
                               family=bundle.family, model_name=bundle.name)  # fmt: skip
    stats.save_json(args.out, overwrite=args.overwrite)
    if args.plot:
        stats.save_plot(args.plot, overwrite=args.overwrite)
    print(stats.report())
    logger.info("wrote %s%s", args.out, f" and {args.plot}" if args.plot else "")
    return 0
