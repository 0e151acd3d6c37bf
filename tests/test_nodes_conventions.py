"""Conventions every node keeps (DESIGN.md "Node conventions"), and the pack's entry point."""

import logging
import runpy

import pytest
from comfy_stubs import REPO_ROOT, comfy_env, comfy_pack  # noqa: F401  (fixtures)

TRAINER_OPTIONS = ("optimizer", "lr_schedule", "warmup_steps", "snr_gamma", "noise_offset", "save_every", "preview_every",
                   "preview_prompts")

# Types ComfyUI itself defines; ours are prefixed PIVOTAL_.
STOCK_TYPES = {"MODEL", "CLIP", "VAE", "IMAGE", "MASK", "LATENT", "CONDITIONING", "STRING", "INT", "FLOAT", "BOOLEAN", "LORA_MODEL", "LOSS_MAP"}
EXPECTED = {
    "PivotalDatasetFromFolder", "PivotalDatasetFromImages", "TokenInversion", "SlerpRegularizer",
    "PivotalLoRATune", "EmbeddingNormStats", "PivotalPrompt", "PivotalEvaluate", "PivotalSweep", "PivotalLoRALoader",
}  # fmt: skip


@pytest.fixture(scope="module")
def mappings(comfy_env):
    return comfy_env[0]


def all_inputs(cls):
    spec = cls.INPUT_TYPES()
    return [(section, name, value) for section in ("required", "optional") for name, value in spec.get(section, {}).items()]


def test_the_pack_registers_its_nodes_by_class_name(mappings):
    assert set(mappings) == EXPECTED
    assert all(cls.__name__ == node_id for node_id, cls in mappings.items())


def test_every_node_declares_and_documents(mappings):
    for node_id, cls in mappings.items():
        assert cls.CATEGORY.startswith("pivotal_tuning/"), node_id
        assert cls.DESCRIPTION.strip(), node_id
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES), node_id
        assert callable(getattr(cls, cls.FUNCTION)), node_id
        for section, name, (kind, options) in all_inputs(cls):
            assert options.get("tooltip", "").strip(), f"{node_id}.{name} has no tooltip"
            if isinstance(kind, str):
                assert kind in STOCK_TYPES or kind.startswith("PIVOTAL_"), f"{node_id}.{name}: {kind}"
        for kind in cls.RETURN_TYPES:
            assert kind in STOCK_TYPES or kind.startswith("PIVOTAL_"), f"{node_id} returns {kind}"


def test_display_names_are_human_readable(comfy_env):
    from comfy_stubs import PACK_NAME

    import sys

    names = sys.modules[PACK_NAME].NODE_DISPLAY_NAME_MAPPINGS
    assert set(names) == EXPECTED and all(" " in name for name in names.values())


def test_seeds_have_the_control_widget(mappings):
    for node_id in ("TokenInversion", "PivotalLoRATune", "PivotalSweep"):
        assert mappings[node_id].INPUT_TYPES()["required"]["seed"][1]["control_after_generate"] is True


def test_training_nodes_never_replace_a_file_by_default(mappings):
    """`overwrite` (kept for saved workflows) is off; the optional `if_exists` defaults to a new numbered file."""
    for node_id in ("TokenInversion", "PivotalLoRATune", "PivotalSweep"):
        spec = mappings[node_id].INPUT_TYPES()
        assert spec["required"]["overwrite"][1]["default"] is False
        choices, options = spec["optional"]["if_exists"]
        assert choices == ["increment", "overwrite", "error"] and options["default"] == "increment"
        # After the older widgets: saved workflows' widget positions are unchanged (newer ones come after).
        older = [name for name in spec["optional"] if name not in TRAINER_OPTIONS and name != "offload_text_encoders"]
        assert older[-2:] == (["if_exists", "bundle_embedding"] if node_id == "PivotalLoRATune" else older[-2:-1] + ["if_exists"])
        newer = list(spec["optional"])[len(older):]
        assert newer == ([] if node_id == "PivotalSweep" else
                         (["offload_text_encoders"] if node_id == "PivotalLoRATune" else []) + list(TRAINER_OPTIONS))


def test_imported_as_a_plain_module_it_registers_nothing():
    namespace = runpy.run_path(str(REPO_ROOT / "__init__.py"))
    assert namespace["NODE_CLASS_MAPPINGS"] == {} and namespace["NODE_DISPLAY_NAME_MAPPINGS"] == {}


def test_a_missing_requirement_is_named_with_the_install_command(tmp_path, caplog):
    with caplog.at_level(logging.ERROR), comfy_pack(tmp_path, name="pack_without_peft", extra_modules={"peft": None}) as (pack, _):
        assert pack.NODE_CLASS_MAPPINGS == {}
    assert "'peft' is not installed" in caplog.text and "pip install -r" in caplog.text
