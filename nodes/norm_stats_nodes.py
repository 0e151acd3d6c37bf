"""EmbeddingNormStats: the norm statistics of the text encoder's vectors (shell, offset, vSLERP centres)."""

from ..pti_ops.errors import InvalidInputError
from ..pti_ops.inversion import InversionConfig
from ..pti_ops.norm_stats import ENCODERS, EOS, PER_TOKEN_SPACES, SPACES, NormStatsConfig, measure_norm_stats
from ..pti_ops.placeholder import DEFAULT_TEMPLATES, add_placeholders
from . import bridge
from .common import core_run, node_result, node_warnings, split_lines, with_warnings
from .inputs import NODE_ID, combo, default_of, link, string_input

ALL_ENCODERS = "all"

DEFAULT_CLASS_WORD = default_of(InversionConfig, "initializer")

DEFAULT_CAPTIONS = "\n".join(
    (
        "an anime illustration of a girl with a sword",
        "an anime illustration of a boy in a forest",
        "a photo of a dog on the beach",
        "a painting of a city at night",
        "a drawing of a robot holding a flower",
        "a portrait of a woman with a red hat",
        "an anime illustration of a cat sitting on a chair",
        "a sketch of a man running in the snow",
    )
)


class EmbeddingNormStats:
    """Norm statistics of one text-encoder space over a caption set → `PIVOTAL_NORM_STATS`."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": link("CLIP", "The CLIP text encoder to measure (CLIPSetLastLayer is honoured for the hidden spaces)."),
                "captions": string_input(DEFAULT_CAPTIONS, "Captions, one per line (at least 2; half fit the centre, half "
                    "are measured). Use prompts like the ones you generate with. Ignored when captions_file is given.",
                    multiline=True),
                "captions_file": string_input("", "Optional text file with one caption per line (under ComfyUI's input "
                    "folder, or an absolute path); used instead of the captions box."),
                "space": combo(SPACES, default_of(NormStatsConfig, "space"), "hidden: the per-token conditioning the UNet "
                    "reads (the regulariser's space; its centres feed vSLERP; SDXL: the penultimate layer, without the "
                    "final LayerNorm). hidden_prenorm / hidden_postnorm: the same layer before / through the final "
                    "LayerNorm. pooled / projected: the end-of-text vector (projected: SDXL's pooled conditioning, "
                    "clip_g only). token_embedding: the input rows textual inversion moves."),
                "position": string_input("", "Token position to summarise: an index (0 = start token), `eos`, or a word "
                    "found in each caption. Empty: the template's placeholder position, or eos without a template."),
                # The core's defaults are None (no endpoints); the node starts with the training prompt and class word.
                "template": string_input(DEFAULT_TEMPLATES[0], "Prompt with {} for the SLERP endpoints: the placeholder's "
                    "prompt vs the class word's. Empty: no endpoint measurements."),
                "class_word": string_input(DEFAULT_CLASS_WORD, "The word the placeholder is compared with in the template."),
            },
            "optional": {
                "embedding": link("PIVOTAL_EMBEDDING", "A trained token (TokenInversion): the endpoints compare it with the "
                    "class word. Not connected: the class word is compared with itself."),
                "encoder": combo((ALL_ENCODERS, *ENCODERS), ALL_ENCODERS, "Which text encoder to measure (SDXL: clip_l "
                    "or clip_g); all: every encoder of the model, each reported on its own. SlerpRegularizer's vslerp "
                    "needs all (on SDXL they also give the pooled conditioning's centre)."),
            },
            "hidden": NODE_ID,
        }  # fmt: skip

    RETURN_TYPES = ("PIVOTAL_NORM_STATS", "STRING", "IMAGE")
    RETURN_NAMES = ("norm_stats", "summary", "plot")
    OUTPUT_TOOLTIPS = (
        "The statistics and per-position centres (for SlerpRegularizer's vslerp).",
        "The numbers (raw vs centred norm spread, centre offset, endpoint angles) and the conclusion.",
        "Histograms of the raw and centred norms.",
    )
    FUNCTION = "measure"
    CATEGORY = "pivotal_tuning/analysis"
    DESCRIPTION = (
        "Measures whether the text encoder's vectors lie on a thin shell, whether its centre is offset from the "
        "origin (then vSLERP around the centre differs from SLERP), and the per-position centres vSLERP uses."
    )

    def measure(self, clip, captions, captions_file, space, position, template, class_word, embedding=None,
                encoder=ALL_ENCODERS, unique_id=None):  # fmt: skip
        source = _captions(captions, captions_file)
        template = template.strip() or None
        with node_warnings() as warned, core_run(train=False):  # the encoder gains the placeholder's rows in place
            config = NormStatsConfig(
                space=space, position=_parse_position(position), template=template,
                clip_skip=bridge.clip_skip(clip) if space in PER_TOKEN_SPACES else None,
                class_word=(class_word.strip() or None) if template else None,
                encoder=None if encoder == ALL_ENCODERS else encoder,
            )  # fmt: skip
            stats = _measure(*bridge.text_encoders_from_comfy(clip), source, config, embedding if template else None)
        outputs = (stats, with_warnings(stats.report(), warned), bridge.image_from_array(stats.plot_image()))
        return node_result(outputs, warned, unique_id)

    @classmethod
    def IS_CHANGED(cls, captions_file="", **_):
        if captions_file and captions_file.strip():
            path = bridge.resolve_input_path(captions_file)
            return bridge.hash_files([path]) if path.is_file() else f"missing:{path}"
        return ""


def _parse_position(text: str) -> int | str | None:
    text = (text or "").strip()
    if not text:
        return None
    if text.lower() == EOS:
        return EOS
    return int(text) if text.isdigit() else text


def _measure(family, tokenizers, encoders, captions, config: NormStatsConfig, embedding):
    """The statistics of `captions` (`NormStats`, or per encoder), with the trained token (when given) as the
    endpoints' placeholder in every encoder."""
    placeholder = None
    if embedding is not None:
        if embedding.family != family.name:
            raise InvalidInputError(f"`embedding` was trained for a {embedding.family} model but the CLIP is {family.display_name}: "
                                    "connect an embedding trained on this model.")  # fmt: skip
        vectors = [embedding.vectors_by_key[key] for key in family.embedding_keys]
        placeholder = add_placeholders(tokenizers, encoders, embedding.placeholder, embedding.initializer, vectors=vectors)[0]
    return measure_norm_stats(tokenizers, encoders, captions, config, placeholder, family=family, model_name="comfyui")


def _captions(captions: str, captions_file: str):
    """The caption file's path (when given) or the box's lines (at least 2)."""
    if captions_file.strip():
        path = bridge.resolve_input_path(captions_file)
        if not path.is_file():
            raise InvalidInputError(f"`captions_file` {captions_file!r} does not exist ({path}).")
        return path
    lines = split_lines(captions)
    if len(lines) < 2:
        raise InvalidInputError("`captions` needs at least 2 captions, one per line (or give `captions_file`).")
    return lines


NODE_CLASS_MAPPINGS = {"EmbeddingNormStats": EmbeddingNormStats}
NODE_DISPLAY_NAME_MAPPINGS = {"EmbeddingNormStats": "Embedding Norm Stats"}
