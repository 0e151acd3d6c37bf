"""The shipped workflows (workflows/*.json, UI format 0.4) against the nodes' INPUT_TYPES / RETURN_TYPES.

Checked as ComfyUI's frontend reads them: every node type exists, every link joins an output and an
input of the same type, every required socket is connected, and `widgets_values` has one entry per
widget in declaration order (plus the hidden control value after seed widgets) of the right kind.
Stock nodes are described by the table below, copied by hand from ComfyUI's nodes.py.
"""

import json

import pytest
from comfy_stubs import REPO_ROOT, comfy_env  # noqa: F401  (fixture)

WORKFLOWS = sorted((REPO_ROOT / "workflows").glob("*.json"))
WIDGET_KINDS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}

# Stock nodes: inputs in order as (name, type) and outputs; "seed" INT widgets get a control value.
STOCK_NODES = {
    "CheckpointLoaderSimple": ([("ckpt_name", "COMBO")], ["MODEL", "CLIP", "VAE"]),
    "CLIPTextEncode": ([("text", "STRING"), ("clip", "CLIP")], ["CONDITIONING"]),
    "KSampler": (
        [("model", "MODEL"), ("seed", "INT"), ("steps", "INT"), ("cfg", "FLOAT"), ("sampler_name", "COMBO"),
         ("scheduler", "COMBO"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
         ("latent_image", "LATENT"), ("denoise", "FLOAT")],
        ["LATENT"],
    ),  # fmt: skip
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], ["IMAGE"]),
    "SaveImage": ([("images", "IMAGE"), ("filename_prefix", "STRING")], []),
    "PreviewImage": ([("images", "IMAGE")], []),
    "PreviewAny": ([("source", "*")], []),
    "EmptyLatentImage": ([("width", "INT"), ("height", "INT"), ("batch_size", "INT")], ["LATENT"]),
    "LoraLoader": (
        [("model", "MODEL"), ("clip", "CLIP"), ("lora_name", "COMBO"), ("strength_model", "FLOAT"), ("strength_clip", "FLOAT")],
        ["MODEL", "CLIP"],
    ),
}
OUTPUT_NODES = {"SaveImage", "PreviewImage", "PreviewAny"}


def node_spec(node_type, mappings):
    """`(inputs, outputs)`: inputs as dicts (name, type, required, widget, control, options)."""
    if node_type in STOCK_NODES:
        inputs, outputs = STOCK_NODES[node_type]
        return [
            {"name": n, "type": t, "required": True, "widget": t in WIDGET_KINDS, "control": n == "seed", "options": {}}
            for n, t in inputs
        ], outputs
    cls = mappings[node_type]
    spec = cls.INPUT_TYPES()
    inputs = []
    for section in ("required", "optional"):
        for name, (kind, options) in spec.get(section, {}).items():
            kind_name = "COMBO" if isinstance(kind, list) else kind
            inputs.append({
                "name": name, "type": kind_name, "required": section == "required",
                "widget": kind_name in WIDGET_KINDS and not options.get("forceInput"),
                "control": bool(options.get("control_after_generate")), "options": options, "choices": kind,
            })  # fmt: skip
    return inputs, list(cls.RETURN_TYPES)


@pytest.fixture(scope="module")
def mappings(comfy_env):
    return comfy_env[0]


def load(path):
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def test_the_workflows_ship():
    assert {p.name for p in WORKFLOWS} == {
        "pivotal_tuning_sd15.json", "use_trained_lora_sd15.json", "norm_stats.json", "lr_sweep_sd15.json",
        "pivotal_tuning_sdxl.json", "use_trained_lora_sdxl.json",
    }  # fmt: skip


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_matches_the_nodes(path, mappings):
    workflow = load(path)
    assert workflow["version"] == 0.4
    nodes = {node["id"]: node for node in workflow["nodes"]}
    assert workflow["last_node_id"] >= max(nodes) and workflow["last_link_id"] >= max((link[0] for link in workflow["links"]), default=0)
    specs = {}
    for node in nodes.values():
        assert node["type"] in STOCK_NODES or node["type"] in mappings, f"unknown node type {node['type']}"
        specs[node["id"]] = node_spec(node["type"], mappings)
    for link_id, origin, origin_slot, target, target_slot, kind in workflow["links"]:
        outputs = specs[origin][1]
        assert outputs[origin_slot] == kind, f"link {link_id}: {nodes[origin]['type']} output {origin_slot} is {outputs[origin_slot]}, not {kind}"
        assert link_id in nodes[origin]["outputs"][origin_slot]["links"]
        socket = nodes[target]["inputs"][target_slot]
        assert socket["link"] == link_id
        spec = next(s for s in specs[target][0] if s["name"] == socket["name"])
        assert spec["type"] in (kind, "*"), f"link {link_id} carries {kind} into {nodes[target]['type']}.{socket['name']} ({spec['type']})"
    for node in nodes.values():
        check_node(node, specs[node["id"]][0])


def widget_layout(inputs):
    """`(spec, is_control)` per `widgets_values` entry, as the frontend writes them."""
    layout = []
    for spec in inputs:
        if spec["widget"]:
            layout.append((spec, False))
            if spec["control"]:
                layout.append((spec, True))
    return layout


def named_widgets(node, mappings):
    """The node's widget values by input name (control values left out)."""
    layout = widget_layout(node_spec(node["type"], mappings)[0])
    return {spec["name"]: value for (spec, is_control), value in zip(layout, node["widgets_values"]) if not is_control}


def check_node(node, inputs):
    where = f"{node['type']} (node {node['id']})"
    linked = {socket["name"] for socket in node.get("inputs", []) if socket.get("link") is not None}
    for spec in inputs:
        if spec["required"] and not spec["widget"]:
            assert spec["name"] in linked, f"{where}: required input {spec['name']} is not connected"
    values = list(node.get("widgets_values", []))
    layout = widget_layout(inputs)
    assert len(values) == len(layout), f"{where}: {len(values)} widgets_values, the node has {len(layout)} widgets"
    for (spec, is_control), value in zip(layout, values):
        if is_control:
            assert value in CONTROL_VALUES, f"{where}: control value after {spec['name']} is {value!r}"
        else:
            check_value(where, spec, value)


def check_value(where, spec, value):
    kind, options, name = spec["type"], spec["options"], spec["name"]
    if kind == "COMBO":
        assert isinstance(value, str), f"{where}.{name}: {value!r}"
        if "choices" in spec:
            assert value in spec["choices"], f"{where}.{name}: {value!r} not in {spec['choices']}"
    elif kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}.{name}: {value!r}"
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}.{name}: {value!r}"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), f"{where}.{name}: {value!r}"
    elif kind == "STRING":
        assert isinstance(value, str), f"{where}.{name}: {value!r}"
    if kind in ("INT", "FLOAT"):
        assert options.get("min", value) <= value <= options.get("max", value), f"{where}.{name}: {value} out of range"


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_pivotal_workflow_trains_and_generates_in_one_run(mappings, family):
    workflow = load(REPO_ROOT / "workflows" / f"pivotal_tuning_{family}.json")
    types = {node["id"]: node["type"] for node in workflow["nodes"]}
    edges = {(types[origin], types[target]) for _, origin, _, target, _, _ in workflow["links"]}
    for edge in [
        ("CheckpointLoaderSimple", "TokenInversion"), ("PivotalDatasetFromFolder", "TokenInversion"),
        ("EmbeddingNormStats", "SlerpRegularizer"), ("TokenInversion", "PivotalLoRATune"),
        ("SlerpRegularizer", "PivotalLoRATune"), ("PivotalLoRATune", "PivotalPrompt"),
        ("PivotalPrompt", "CLIPTextEncode"), ("PivotalLoRATune", "CLIPTextEncode"), ("PivotalLoRATune", "KSampler"),
        ("KSampler", "VAEDecode"), ("VAEDecode", "SaveImage"), ("TokenInversion", "PreviewImage"),
        ("PivotalLoRATune", "PreviewImage"),
    ]:  # fmt: skip
        assert edge in edges, edge


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_use_trained_lora_workflow_names_the_files_the_training_writes(mappings, family):
    trained = {n["type"]: named_widgets(n, mappings) for n in load(REPO_ROOT / "workflows" / f"pivotal_tuning_{family}.json")["nodes"]}
    use = load(REPO_ROOT / "workflows" / f"use_trained_lora_{family}.json")
    assert {node["type"] for node in use["nodes"]} <= set(STOCK_NODES)  # stock ComfyUI only: runs without the pack
    loader = next(named_widgets(n, mappings) for n in use["nodes"] if n["type"] == "LoraLoader")
    assert loader["lora_name"] == trained["PivotalLoRATune"]["lora_name"] + ".safetensors"
    prompts = [named_widgets(n, mappings)["text"] for n in use["nodes"] if n["type"] == "CLIPTextEncode"]
    assert any(f"embedding:{trained['TokenInversion']['embedding_name']} " in prompt for prompt in prompts)


def test_sdxl_workflows_default_to_1024_px_with_the_memory_options_on(mappings):
    train = {n["type"]: named_widgets(n, mappings) for n in load(REPO_ROOT / "workflows" / "pivotal_tuning_sdxl.json")["nodes"]}
    use = {n["type"]: named_widgets(n, mappings) for n in load(REPO_ROOT / "workflows" / "use_trained_lora_sdxl.json")["nodes"]}
    assert train["PivotalDatasetFromFolder"]["resolution"] == 1024
    for widgets in (train["EmptyLatentImage"], use["EmptyLatentImage"]):
        assert (widgets["width"], widgets["height"]) == (1024, 1024)
    for node in ("TokenInversion", "PivotalLoRATune"):
        assert train[node]["mixed_precision"] == "bf16" and train[node]["gradient_checkpointing"] is True, node
    assert train["PivotalLoRATune"]["offload_text_encoders"] is True  # allowed: sequential, text encoders frozen
    assert train["PivotalLoRATune"]["schedule"] == "sequential" and train["PivotalLoRATune"]["train_text_encoder"] is False
    # vSLERP around both encoders' centres (and the pooled one): the norm statistics measure every encoder
    assert train["SlerpRegularizer"]["interpolation"] == "vslerp" and train["EmbeddingNormStats"].get("encoder", "all") == "all"
    assert train["CheckpointLoaderSimple"]["ckpt_name"] == use["CheckpointLoaderSimple"]["ckpt_name"]


def test_every_workflow_has_an_output_node():
    for path in WORKFLOWS:
        assert any(node["type"] in OUTPUT_NODES for node in load(path)["nodes"]), path.name


def test_lr_sweep_workflow_runs_the_inversion_sweep_and_shows_table_plots_grids(mappings):
    workflow = load(REPO_ROOT / "workflows" / "lr_sweep_sd15.json")
    nodes = {node["id"]: node for node in workflow["nodes"]}
    types = {node_id: node["type"] for node_id, node in nodes.items()}
    edges = {(types[origin], slot, types[target]) for _, origin, slot, target, _, _ in workflow["links"]}
    for edge in [
        ("CheckpointLoaderSimple", 0, "PivotalSweep"), ("CheckpointLoaderSimple", 1, "PivotalSweep"),
        ("CheckpointLoaderSimple", 2, "PivotalSweep"), ("PivotalDatasetFromFolder", 0, "PivotalSweep"),
        ("PivotalSweep", 0, "PreviewAny"), ("PivotalSweep", 1, "PreviewImage"), ("PivotalSweep", 2, "PreviewImage"),
    ]:  # fmt: skip
        assert edge in edges, edge
    sweep_node = next(node for node in nodes.values() if node["type"] == "PivotalSweep")
    widgets = named_widgets(sweep_node, mappings)
    assert widgets["kind"] == "inversion" and widgets["overwrite"] is False
    assert widgets["eval_every"] and widgets["steps"] % widgets["eval_every"] == 0
    cls = mappings["PivotalSweep"]
    assert cls.VALIDATE_INPUTS(learning_rates=widgets["learning_rates"], sample_seeds=widgets["sample_seeds"],
                               output_folder=widgets["output_folder"]) is True  # fmt: skip
    layout = widget_layout(node_spec("PivotalSweep", mappings)[0])
    control = next(i for i, (spec, is_control) in enumerate(layout) if is_control and spec["name"] == "seed")
    assert sweep_node["widgets_values"][control] == "fixed"  # a sweep is repeated with the same training seed
