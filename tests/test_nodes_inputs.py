"""The widget helpers (nodes/inputs.py) and the rule they serve: a widget's default is its core config's default."""

import ast
import importlib
import inspect
import textwrap

import pytest
from comfy_stubs import PACK_NAME, comfy_env  # noqa: F401  (fixture)

from pti_ops.dataset import DatasetConfig
from pti_ops.inversion import InversionConfig
from pti_ops.lora_tune import TuneConfig
from pti_ops.metrics import EvaluationConfig, SamplingConfig
from pti_ops.regularizer import RegularizerConfig
from pti_ops.sweeps import SweepConfig

# (node, input, config class, field): the widget fills that field, so it starts at its default.
DEFAULTS = [
    ("TokenInversion", "placeholder", InversionConfig, "placeholder"),
    ("TokenInversion", "num_vectors", InversionConfig, "num_vectors"),
    ("TokenInversion", "steps", InversionConfig, "steps"),
    ("TokenInversion", "learning_rate", InversionConfig, "learning_rate"),
    ("TokenInversion", "norm_mode", InversionConfig, "norm_mode"),
    ("TokenInversion", "mixed_precision", InversionConfig, "mixed_precision"),
    ("PivotalLoRATune", "rank", TuneConfig, "rank"),
    ("PivotalLoRATune", "learning_rate", TuneConfig, "learning_rate"),
    ("PivotalLoRATune", "steps", TuneConfig, "steps"),
    ("PivotalLoRATune", "schedule", TuneConfig, "schedule"),
    ("PivotalLoRATune", "mixed_precision", TuneConfig, "mixed_precision"),
    ("SlerpRegularizer", "mode", RegularizerConfig, "mode"),
    ("SlerpRegularizer", "t", RegularizerConfig, "t"),
    ("SlerpRegularizer", "weight", RegularizerConfig, "weight"),
    ("SlerpRegularizer", "image_l2_weight", RegularizerConfig, "image_l2_weight"),
    ("PivotalEvaluate", "steps", SamplingConfig, "steps"),
    ("PivotalEvaluate", "cfg", SamplingConfig, "cfg_scale"),
    ("PivotalEvaluate", "batch_size", SamplingConfig, "batch_size"),
    ("PivotalSweep", "sample_steps", SamplingConfig, "steps"),
    ("PivotalSweep", "sampler", SamplingConfig, "sampler"),
    ("PivotalSweep", "kind", SweepConfig, "kind"),
    ("PivotalSweep", "steps", SweepConfig, "steps"),
    ("PivotalSweep", "lora_rank", SweepConfig, "rank"),
    ("PivotalDatasetFromFolder", "resolution", DatasetConfig, "resolution"),
    ("PivotalDatasetFromFolder", "caption_source", DatasetConfig, "caption_source"),
    *[(node, name, DatasetConfig, name) for node in ("PivotalDatasetFromFolder", "PivotalDatasetFromImages")
      for name in ("buckets", "mask_floor", "shuffle_tags", "keep_tokens", "caption_dropout")],
    ("PivotalDatasetFromFolder", "mask_from", DatasetConfig, "mask_from"),
]


@pytest.fixture(scope="module")
def inputs(comfy_env):
    return importlib.import_module(PACK_NAME + ".nodes.inputs")


@pytest.fixture(scope="module")
def mappings(comfy_env):
    return comfy_env[0]


def widget_default(mappings, node_id, name):
    spec = mappings[node_id].INPUT_TYPES()
    return {**spec["required"], **spec.get("optional", {})}[name][1]["default"]


@pytest.mark.parametrize("node_id, name, config, field", DEFAULTS, ids=[f"{n}.{i}" for n, i, *_ in DEFAULTS])
def test_widget_defaults_are_the_core_defaults(mappings, inputs, node_id, name, config, field):
    assert widget_default(mappings, node_id, name) == inputs.default_of(config, field)


def test_list_defaults_read_back_as_the_core_defaults(mappings, inputs):
    common = importlib.import_module(PACK_NAME + ".nodes.common")
    sweep = SweepConfig()
    assert common.parse_floats(widget_default(mappings, "PivotalSweep", "learning_rates"), "x") == sweep.learning_rates
    assert common.parse_ints(widget_default(mappings, "PivotalSweep", "sample_seeds"), "x") == sweep.sample_seeds
    assert common.split_lines(widget_default(mappings, "PivotalSweep", "edit_prompts")) == sweep.edit_prompts
    assert common.split_lines(widget_default(mappings, "TokenInversion", "templates")) == InversionConfig().templates
    assert common.split_lines(widget_default(mappings, "PivotalEvaluate", "prompts")) == EvaluationConfig().prompts
    assert widget_default(mappings, "PivotalEvaluate", "resolution") == 0 and SamplingConfig().resolution is None


def test_default_of(inputs):
    assert inputs.default_of(TuneConfig, "steps") == 1000
    first, second = inputs.default_of(TuneConfig, "templates"), inputs.default_of(TuneConfig, "templates")
    assert first == second and first is not second  # a fresh list each time
    with pytest.raises(KeyError, match="TuneConfig has no field 'stepz'"):
        inputs.default_of(TuneConfig, "stepz")


def test_format_numbers(inputs):
    assert inputs.format_numbers([1e-4, 5e-4, 2e-3, 5e-3]) == "1e-4, 5e-4, 2e-3, 5e-3"
    assert inputs.format_numbers([0.5, 1.0, 12.5, 2.5e-5, 1e4]) == "0.5, 1, 12.5, 2.5e-5, 1e4"


def test_widget_helpers_build_comfyui_specs(inputs):
    assert inputs.int_input(4, 1, 256, "rank") == ("INT", {"default": 4, "min": 1, "max": 256, "tooltip": "rank"})
    assert inputs.float_input(0.5, 0.0, 1.0, 0.01, "t", round=False)[1] == {
        "default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01, "round": False, "tooltip": "t"}  # fmt: skip
    assert inputs.lines_input(["a {}", "b {}"], "tip") == ("STRING", {"default": "a {}\nb {}", "multiline": True, "tooltip": "tip"})
    assert inputs.combo(("x", "y"), "y", "tip") == (["x", "y"], {"default": "y", "tooltip": "tip"})
    assert inputs.retooltip(inputs.OVERWRITE, "new")[1] == {**inputs.OVERWRITE[1], "tooltip": "new"}
    assert list(inputs.TRAINING_INPUTS) == ["model", "clip", "vae", "dataset"]


def test_node_functions_declare_and_delegate(mappings):
    """Each node's FUNCTION builds a config, converts, makes one core call and returns: it stays short."""
    lengths = {}
    for node_id, cls in mappings.items():
        source = textwrap.dedent(inspect.getsource(getattr(cls, cls.FUNCTION)))
        function = ast.parse(source).body[0]
        lengths[node_id] = function.end_lineno - function.lineno + 1
    assert max(lengths.values()) <= 25, lengths
