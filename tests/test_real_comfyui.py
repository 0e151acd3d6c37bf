"""The shipped workflows in a real ComfyUI server (CPU), against a tiny SD1.5-shaped checkpoint.

Runs only when `COMFYUI_DIR` points at a ComfyUI checkout whose requirements (and this pack's) are
installed in a Python the harness finds (`COMFYUI_DIR/../venv`, or `COMFYUI_PYTHON`); skipped
otherwise (CI has no ComfyUI). Uses the stdlib tools `comfy_harness.py` and `make_tiny_sd15.py`
from `PTI_COMFY_TOOLS` (default: `../shared/tools` beside the repository). Takes a few minutes:
the checkpoint is made in a temp folder (444 MiB), the server starts on 127.0.0.1, each workflow
is queued scaled down (few steps, 64 px) and its outputs, files and the server log are checked.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
TOOLS = Path(os.environ.get("PTI_COMFY_TOOLS", REPO_ROOT.parent / "shared" / "tools"))
HARNESS, MAKE_TINY = TOOLS / "comfy_harness.py", TOOLS / "make_tiny_sd15.py"
PACK = "comfyui-pivotal-tuning"

pytestmark = [
    pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set (no ComfyUI checkout to test against)"),
    pytest.mark.skipif(not (HARNESS.is_file() and MAKE_TINY.is_file()), reason=f"comfy_harness.py / make_tiny_sd15.py not in {TOOLS}"),
]

# The scaled-down runs: tiny checkpoint, 64 px, two steps everywhere.
SMALL = {
    "CheckpointLoaderSimple.ckpt_name": "tiny-sd15.safetensors",
    "EmptyLatentImage.width": 64,
    "EmptyLatentImage.height": 64,
    "KSampler.steps": 2,
}
TRAIN_SMALL = {
    **SMALL,
    "PivotalDatasetFromFolder.folder": "character",  # relative to the server's input folder
    "PivotalDatasetFromFolder.resolution": 64,
    "TokenInversion.steps": 2,
    "PivotalLoRATune.steps": 2,
}
# The learning-rate sweep: two lrs of two steps, evaluated at both steps, 2 seeds x 2 sampling steps at 64 px.
SWEEP_SMALL = {
    "CheckpointLoaderSimple.ckpt_name": "tiny-sd15.safetensors",
    "PivotalDatasetFromFolder.folder": "character",
    "PivotalDatasetFromFolder.resolution": 64,
    "PivotalSweep.learning_rates": "1e-3, 1e-2",
    "PivotalSweep.steps": 2,
    "PivotalSweep.eval_every": 1,
    "PivotalSweep.edit_prompts": "a photo of {} on the beach",
    "PivotalSweep.sample_seeds": "0,1",
    "PivotalSweep.sample_steps": 2,
    "PivotalSweep.resolution": 64,
}
# "lora key not loaded" and a missing embedding are only log lines in ComfyUI, never errors.
LOG_PROBLEMS = ("lora key not loaded", "NOT LOADED", "does not exist, ignoring", "Exception during processing")


class Server:
    """The harness-driven server: its folders and a `run` returning (exit code, result JSON, output text)."""

    def __init__(self, root: Path):
        self.root = root
        self.models = root / "models"
        self.input = root / "input"
        self.env = {**os.environ, "COMFY_HARNESS_STATE": str(root / "state")}
        self.port = _free_port()

    def harness(self, *args, timeout=900) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(HARNESS), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def run(self, workflow, overrides: dict, timeout=600) -> tuple[int, dict, str]:
        out_json = self.root / "result.json"
        out_json.unlink(missing_ok=True)
        sets = [item for key, value in overrides.items() for item in ("--set", f"{key}={value}")]
        done = self.harness("run", str(workflow), "--port", str(self.port), "--timeout", str(timeout), "--out-json", str(out_json), *sets,
                            timeout=timeout + 120)  # fmt: skip
        result = json.loads(out_json.read_text()) if out_json.is_file() else {}
        return done.returncode, result, done.stdout + done.stderr

    def log(self) -> str:
        return (self.root / "state" / "server.log").read_text(errors="replace")

    def output_files(self, prefix: str) -> list[Path]:
        return sorted((self.root / "state" / "output").glob(prefix + "*.png"))

    def object_info(self, class_type: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/object_info/{class_type}", timeout=60) as answer:
            return json.loads(answer.read())[class_type]

    def stock_inputs(self, class_type: str, **given) -> dict:
        """A stock node's API inputs: `given`, and every other required widget at its default (versions differ)."""
        inputs = dict(given)
        for name, spec in self.object_info(class_type)["input"]["required"].items():
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if name not in inputs and "default" in options:
                inputs[name] = options["default"]
            elif name not in inputs and isinstance(spec[0], list):
                inputs[name] = spec[0][0]
        return inputs

    def widget_index(self, class_type: str, name: str) -> int:
        """Where the frontend stores input `name` in a node's `widgets_values` (widgets in declaration order, the
        control value after a seed)."""
        info = self.object_info(class_type)["input"]
        index = 0
        for section in ("required", "optional"):
            for input_name, spec in info.get(section, {}).items():
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if not (isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")):
                    continue
                if input_name == name:
                    return index
                index += 2 if options.get("control_after_generate") else 1
        raise KeyError(f"{class_type} has no widget {name}")

    def output_index(self, class_type: str, kind: str) -> int:
        return self.object_info(class_type)["output"].index(kind)


def node_of(result: dict, class_type: str) -> tuple[str, dict]:
    """`(node id, report)` of the first node of a class in a harness result."""
    return next((nid, node) for nid, node in result["nodes"].items() if node["class_type"] == class_type)


def shown_text(result: dict, node_id: str) -> str:
    return "\n".join(result["outputs"].get(node_id, {}).get("text", []))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from example_images import write_example_images

    server = Server(tmp_path_factory.mktemp("real_comfyui"))
    for folder in ("checkpoints", "embeddings", "loras"):
        (server.models / folder).mkdir(parents=True)
    write_example_images(server.input / "character", count=4, size=64)
    (server.input / "single.png").write_bytes((server.input / "character" / "character_00.png").read_bytes())
    made = subprocess.run(
        [sys.executable, str(MAKE_TINY), str(server.models / "checkpoints" / "tiny-sd15.safetensors"), "--preset", "tiny"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr[-2000:]
    python = ["--python", os.environ["COMFYUI_PYTHON"]] if os.environ.get("COMFYUI_PYTHON") else []
    started = server.harness(
        "start", "--comfy", COMFYUI_DIR, "--nodes", str(REPO_ROOT), "--name", PACK, "--models", str(server.models),
        "--input", str(server.input), "--port", str(server.port), "--timeout", "300", *python,
        "--", "--use-pytorch-cross-attention",  # faster on a CPU (SDXL's bigG above all)
    )  # fmt: skip
    assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
    assert "import ok" in started.stdout, started.stdout
    yield server
    server.harness("stop")


def test_pack_imports_with_all_nodes(server):
    listed = server.harness("nodes", "--json", "--port", str(server.port))
    assert listed.returncode == 0, listed.stderr
    for node_id in ("PivotalDatasetFromFolder", "PivotalDatasetFromImages", "TokenInversion", "SlerpRegularizer",
                    "PivotalLoRATune", "EmbeddingNormStats", "PivotalPrompt", "PivotalEvaluate", "PivotalSweep",
                    "PivotalLoRALoader"):  # fmt: skip
        assert node_id in listed.stdout


def test_pivotal_tuning_workflow_trains_and_generates(server):
    code, result, text = server.run(REPO_ROOT / "workflows" / "pivotal_tuning_sd15.json", TRAIN_SMALL)
    assert code == 0, text[-4000:]
    assert (server.models / "embeddings" / "tok1.safetensors").is_file()
    assert (server.models / "loras" / "tok1_lora.safetensors").is_file()
    assert server.output_files("pivotal_tuning"), text
    log = server.log()
    assert not [problem for problem in LOG_PROBLEMS if problem in log], log[-4000:]


def test_use_trained_lora_workflow_loads_the_files_with_stock_nodes(server):
    if not (server.models / "loras" / "tok1_lora.safetensors").is_file():
        pytest.skip("needs the files of test_pivotal_tuning_workflow_trains_and_generates")
    code, _, text = server.run(REPO_ROOT / "workflows" / "use_trained_lora_sd15.json", SMALL)
    assert code == 0, text[-4000:]
    assert server.output_files("pivotal_character"), text
    log = server.log()
    assert not [problem for problem in LOG_PROBLEMS if problem in log], log[-4000:]


def test_training_workflow_queued_again_and_again_with_prompts_between(server, tmp_path):
    """Issue #16: after another prompt ComfyUI's cache no longer holds the training nodes; each run writes the
    next numbered file (the shipped overwrite = false, if_exists = increment) and its outputs name it."""
    workflow = REPO_ROOT / "workflows" / "pivotal_tuning_sd15.json"
    # The shipped workflow in API format, with the prompt text and the LoRA file name shown.
    converted = server.harness("convert", str(workflow), "--port", str(server.port))
    assert converted.returncode == 0, converted.stderr
    prompt = json.loads(converted.stdout)
    ids = {node["class_type"]: node_id for node_id, node in prompt.items()}
    prompt["900"] = {"class_type": "PreviewAny", "inputs": {"source": [ids["PivotalPrompt"], 0]}}
    prompt["901"] = {"class_type": "PreviewAny", "inputs": {"source": [ids["PivotalLoRATune"], 5]}}
    api = tmp_path / "shown.json"
    api.write_text(json.dumps(prompt))
    # The same workflow as saved before if_exists (and every widget added after it) existed: those values missing.
    saved = json.loads(workflow.read_text())
    for node in saved["nodes"]:
        if node["type"] in ("TokenInversion", "PivotalLoRATune"):
            first_newer = server.widget_index(node["type"], "if_exists")
            assert node["widgets_values"][first_newer] == "increment"
            del node["widgets_values"][first_newer:]
    old = tmp_path / "saved_before_if_exists.json"
    old.write_text(json.dumps(saved))
    overrides = {**TRAIN_SMALL, "TokenInversion.embedding_name": "requeue", "PivotalLoRATune.lora_name": "requeue_lora"}
    shown = []
    for path in (api, api, old):
        code, result, text = server.run(path, overrides)
        assert code == 0, text[-4000:]
        assert "ran" in node_of(result, "TokenInversion")[1]["status"], result["nodes"]
        shown.append((shown_text(result, "900"), shown_text(result, "901")))
        code, _, text = server.run(REPO_ROOT / "workflows" / "norm_stats.json", {"CheckpointLoaderSimple.ckpt_name": "tiny-sd15.safetensors"})
        assert code == 0, text[-4000:]
    assert "embedding:requeue " in shown[0][0] and shown[0][1] == "requeue_lora.safetensors", shown
    assert "embedding:requeue_00001 " in shown[1][0] and shown[1][1] == "requeue_lora_00001.safetensors", shown
    assert sorted(p.name for p in (server.models / "embeddings").glob("requeue*")) == [
        "requeue.safetensors", "requeue_00001.safetensors", "requeue_00002.safetensors"]
    assert sorted(p.name for p in (server.models / "loras").glob("requeue_lora*")) == [
        "requeue_lora.safetensors", "requeue_lora_00001.safetensors", "requeue_lora_00002.safetensors"]
    log = server.log()
    assert not [problem for problem in LOG_PROBLEMS if problem in log], log[-4000:]


def test_a_corrupt_image_is_reported_on_every_training_run(server):
    """on_bad_image = skip on a folder with a corrupt file, trained twice (the dataset node cached the second
    time): both runs warn in the log and on the training node."""
    folder = server.input / "with_corrupt"
    folder.mkdir(exist_ok=True)
    for image in (server.input / "character").glob("*.png"):
        (folder / image.name).write_bytes(image.read_bytes())
    (folder / "corrupt.png").write_bytes(b"not an image at all")
    before = server.log().count("the training images: skipped 1 unreadable image(s)")
    overrides = {**TRAIN_SMALL, "PivotalDatasetFromFolder.folder": "with_corrupt", "PivotalDatasetFromFolder.on_bad_image": "skip",
                 "TokenInversion.embedding_name": "warned", "PivotalLoRATune.lora_name": "warned_lora"}
    for seed in (1, 2):  # a new seed: the training nodes run again, the dataset node comes from the cache
        code, result, text = server.run(REPO_ROOT / "workflows" / "pivotal_tuning_sd15.json", {**overrides, "TokenInversion.seed": seed})
        assert code == 0, text[-4000:]
        inversion_id, _ = node_of(result, "TokenInversion")
        assert "corrupt.png" in shown_text(result, inversion_id), result["outputs"].get(inversion_id)
    assert "cached" in node_of(result, "PivotalDatasetFromFolder")[1]["status"]
    log = server.log()
    # TokenInversion and PivotalLoRATune, each run
    assert log.count("the training images: skipped 1 unreadable image(s)") - before == 4, log[-4000:]


def test_stock_train_lora_output_into_evaluation_and_as_a_starting_point(server):
    """Issue #16: the stock Train LoRA node's LORA_MODEL (ComfyUI's own keys, .diff/.diff_b) into PivotalEvaluate,
    and through stock LoraModelLoader under TokenInversion."""
    lora_slot = server.output_index("TrainLoraNode", "LORA_MODEL")
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a character", "clip": ["1", 1]}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "single.png"}},
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["3", 0], "vae": ["1", 2]}},
        "5": {"class_type": "TrainLoraNode", "inputs": server.stock_inputs(
            "TrainLoraNode", model=["1", 0], latents=["4", 0], positive=["2", 0], batch_size=1, grad_accumulation_steps=1,
            steps=1, learning_rate=0.001, rank=2, seed=0, training_dtype="fp32", lora_dtype="fp32", algorithm="LoRA",
            gradient_checkpointing=False, existing_lora="[None]")},
        "6": {"class_type": "PivotalEvaluate", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "lora": ["5", lora_slot], "prompts": "a photo of {}",
            "edit_prompts": "a photo of {} on the beach", "class_word": "character", "seeds": "0,1", "steps": 2, "cfg": 5.0,
            "sampler": "euler", "resolution": 64, "batch_size": 4, "lpips": "off", "clip_model_folder": "",
            "lora_strength": 1.0}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": ["6", 0]}},
        "8": {"class_type": "LoraModelLoader", "inputs": server.stock_inputs("LoraModelLoader", model=["1", 0], lora=["5", lora_slot],
                                                                           strength_model=1.0)},
        "9": {"class_type": "PivotalDatasetFromImages", "inputs": {"images": ["3", 0], "resolution": 64, "flip": False, "captions": ""}},
        "10": {"class_type": "TokenInversion", "inputs": {
            "model": ["8", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["9", 0], "placeholder": "tok4",
            "initializer": "character", "num_vectors": 1, "templates": "a photo of {}", "steps": 1, "learning_rate": 0.001,
            "batch_size": 1, "seed": 0, "norm_mode": "none", "embedding_name": "tok_on_stock_lora", "overwrite": False}},
        "11": {"class_type": "PreviewAny", "inputs": {"source": ["10", 2]}},
        "12": {"class_type": "PreviewImage", "inputs": {"images": ["6", 2]}},
    }  # fmt: skip
    path = server.root / "stock_lora.json"
    path.write_text(json.dumps(prompt))
    before = server.log()
    code, result, text = server.run(path, {})
    assert code == 0, text[-4000:]
    shown = shown_text(result, "7")
    lines = {line.split("|")[1].strip(): line for line in shown.splitlines() if line.startswith("| ") and "---" not in line}
    assert "no prompts without the placeholder" in lines["locality_eps_mse"], shown  # measured, LoRA applied
    assert result["outputs"].get("12", {}).get("images"), result["outputs"]  # every generation, in the grid
    assert (server.models / "embeddings" / "tok_on_stock_lora.safetensors").is_file(), text[-3000:]
    new_log = server.log()[len(before):]
    assert not [problem for problem in LOG_PROBLEMS if problem in new_log], new_log[-4000:]


def test_norm_stats_workflow(server):
    code, result, text = server.run(REPO_ROOT / "workflows" / "norm_stats.json", {"CheckpointLoaderSimple.ckpt_name": "tiny-sd15.safetensors"})
    assert code == 0, text[-4000:]
    shown = [line for output in result["outputs"].values() for line in output.get("text", [])]
    assert any("conclusion:" in line for line in shown), shown  # the summary, in PreviewAny
    assert any("images" in output for output in result["outputs"].values())  # the histograms


def test_outputs_chain_into_stock_training_nodes(server, tmp_path):
    """LORA_MODEL into stock LoraModelLoader + KSampler, LOSS_MAP into stock LossGraphNode, in API format."""
    converted = server.harness("convert", str(REPO_ROOT / "workflows" / "pivotal_tuning_sd15.json"), "--port", str(server.port))
    assert converted.returncode == 0, converted.stderr
    prompt = json.loads(converted.stdout)
    ids = {node["class_type"]: node_id for node_id, node in prompt.items()}
    checkpoint, tune, sampler = ids["CheckpointLoaderSimple"], ids["PivotalLoRATune"], ids["KSampler"]
    prompt[tune]["inputs"]["lora_name"] = "chained_lora"
    prompt["900"] = {"class_type": "LoraModelLoader",
                     "inputs": server.stock_inputs("LoraModelLoader", model=[checkpoint, 0], lora=[tune, 2], strength_model=1.0)}
    prompt[sampler]["inputs"]["model"] = ["900", 0]
    prompt["901"] = {"class_type": "LossGraphNode", "inputs": {"loss": [tune, 3], "filename_prefix": "pivotal_loss"}}
    path = tmp_path / "chained.json"
    path.write_text(json.dumps(prompt))
    overrides = {**TRAIN_SMALL, "TokenInversion.embedding_name": "tok1_chained"}
    code, _, text = server.run(path, overrides)
    assert code == 0, text[-4000:]
    assert (server.models / "loras" / "chained_lora.safetensors").is_file()
    assert "lora key not loaded" not in server.log()


def test_training_on_an_upstream_lora_clip_skip_and_loaded_images(server, tmp_path):
    """LoraLoader and CLIPSetLastLayer before TokenInversion; Load Image into the IMAGE dataset node."""
    if not (server.models / "loras" / "tok1_lora.safetensors").is_file():
        pytest.skip("needs the files of test_pivotal_tuning_workflow_trains_and_generates")
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": "tok1_lora.safetensors",
                                                     "strength_model": 0.5, "strength_clip": 0.5}},
        "3": {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["2", 1], "stop_at_clip_layer": -2}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "single.png"}},
        "5": {"class_type": "PivotalDatasetFromImages", "inputs": {"images": ["4", 0], "resolution": 64, "flip": True, "captions": ""}},
        "6": {"class_type": "TokenInversion", "inputs": {
            "model": ["2", 0], "clip": ["3", 0], "vae": ["1", 2], "dataset": ["5", 0], "placeholder": "tok2",
            "initializer": "character", "num_vectors": 2, "templates": "a photo of {}", "steps": 2, "learning_rate": 0.001,
            "batch_size": 1, "seed": 3, "norm_mode": "pull", "embedding_name": "tok_upstream", "overwrite": False}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 4]}},
        "8": {"class_type": "PivotalPrompt", "inputs": {"template": "a photo of {} at night", "trigger": ["6", 2]}},
        "9": {"class_type": "PreviewAny", "inputs": {"source": ["8", 0]}},
    }  # fmt: skip
    path = tmp_path / "upstream.json"
    path.write_text(json.dumps(prompt))
    code, result, text = server.run(path, {})
    assert code == 0, text[-4000:]
    assert (server.models / "embeddings" / "tok_upstream.safetensors").is_file()
    shown = [line for output in result["outputs"].values() for line in output.get("text", [])]
    assert "a photo of embedding:tok_upstream at night" in shown


def test_lr_sweep_workflow_writes_the_report_and_shows_it(server):
    """The shipped sweep, scaled down; no LPIPS weights on this machine: LPIPS is 'not computed', nothing fails."""
    code, result, text = server.run(REPO_ROOT / "workflows" / "lr_sweep_sd15.json", SWEEP_SMALL)
    assert code == 0, text[-4000:]
    folder = server.root / "state" / "output" / "pivotal_lr_sweep"
    for name in ("sweep.csv", "sweep.json", "sweep.md", "plots/inversion_curves.png", "plots/distance_fit.png",
                 "grids/reconstruction.png", "grids/editability.png"):  # fmt: skip
        assert (folder / name).is_file(), name
    rows = json.loads((folder / "sweep.json").read_text())["rows"]
    assert [(row["run"], row["step"]) for row in rows] == [("initial", 0), ("lr=0.001", 1), ("lr=0.001", 2), ("lr=0.01", 1), ("lr=0.01", 2)]
    assert all(row["reconstruction_l2"] is not None for row in rows)
    assert len(list((folder / "embeddings").glob("*.safetensors"))) == 4
    shown = "\n".join(line for output in result["outputs"].values() for line in output.get("text", []))
    assert "# Inversion learning-rate sweep" in shown and "reconstruction_lpips" in shown and "alexnet" in shown, shown[-3000:]
    assert sum(len(output.get("images", [])) for output in result["outputs"].values()) == 4  # 2 plots + 2 grids
    # Queued again unchanged: ComfyUI's cache answers (no "folder is not empty" error, nothing rewritten).
    code, _, text = server.run(REPO_ROOT / "workflows" / "lr_sweep_sd15.json", SWEEP_SMALL)
    assert code == 0, text[-4000:]
    # After another prompt the cache has dropped it: it runs again, into the next numbered folder.
    code, _, text = server.run(REPO_ROOT / "workflows" / "norm_stats.json", {"CheckpointLoaderSimple.ckpt_name": "tiny-sd15.safetensors"})
    assert code == 0, text[-4000:]
    code, _, text = server.run(REPO_ROOT / "workflows" / "lr_sweep_sd15.json", SWEEP_SMALL)
    assert code == 0, text[-4000:]
    assert (folder.parent / "pivotal_lr_sweep_00001" / "sweep.json").is_file()
    log = server.log()
    assert not [problem for problem in LOG_PROBLEMS if problem in log], log[-4000:]


def test_evaluate_a_trained_token_and_lora(server, tmp_path):
    """PivotalEvaluate on the base model + the embedding and LoRA trained in the same run (locality measured)."""
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
        "2": {"class_type": "PivotalDatasetFromFolder", "inputs": {"folder": "character", "resolution": 64, "flip": False,
                                                                   "caption_source": "template", "on_bad_image": "error"}},
        "3": {"class_type": "TokenInversion", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0], "placeholder": "tok3",
            "initializer": "character", "num_vectors": 1, "templates": "a photo of {}", "steps": 2, "learning_rate": 0.01,
            "batch_size": 1, "seed": 0, "norm_mode": "none", "embedding_name": "tok_evaluated", "overwrite": True}},
        "4": {"class_type": "PivotalLoRATune", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0], "embedding": ["3", 0], "rank": 2,
            "alpha": 0.0, "targets": "attention", "learning_rate": 0.01, "steps": 2, "batch_size": 1, "seed": 0,
            "schedule": "sequential", "train_text_encoder": False, "lora_name": "lora_evaluated", "overwrite": True}},
        "5": {"class_type": "PivotalEvaluate", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "embedding": ["3", 0], "lora": ["4", 2], "dataset": ["2", 0],
            "prompts": "a photo of {}", "edit_prompts": "a photo of {} on the beach", "class_word": "", "seeds": "0,1",
            "steps": 2, "cfg": 5.0, "sampler": "euler", "resolution": 64, "batch_size": 4, "lpips": "alex",
            "clip_model_folder": "", "lora_strength": 1.0}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["5", 2]}},
    }  # fmt: skip
    path = tmp_path / "evaluate.json"
    path.write_text(json.dumps(prompt))
    code, result, text = server.run(path, {})
    assert code == 0, text[-4000:]
    shown = "\n".join(line for output in result["outputs"].values() for line in output.get("text", []))
    lines = {line.split("|")[1].strip(): line for line in shown.splitlines() if line.startswith("| ") and "---" not in line}
    assert "not computed" not in lines["locality_eps_mse"] and "not computed" not in lines["embedding_distance"], shown
    assert "not computed" in lines["reconstruction_lpips"] and "alexnet" in lines["reconstruction_lpips"], shown
    assert "not computed: no CLIP model folder given" in lines["editability_clip"], shown
    assert any("images" in output for output in result["outputs"].values())
    log = server.log()
    assert not [problem for problem in LOG_PROBLEMS if problem in log], log[-4000:]


# Run inside ComfyUI's Python: convert ComfyUI's MODEL/CLIP/VAE with the bridge and compare outputs.
BRIDGE_CHECK = """
import importlib.util, json, sys, torch
comfy_dir, pack_dir, checkpoint = sys.argv[1:4]
sys.argv = [sys.argv[0], "--cpu"]
sys.path.insert(0, comfy_dir)
import comfy.options
comfy.options.enable_args_parsing()
import comfy.sd
spec = importlib.util.spec_from_file_location("pack", pack_dir + "/__init__.py", submodule_search_locations=[pack_dir])
pack = importlib.util.module_from_spec(spec); sys.modules["pack"] = pack; spec.loader.exec_module(pack)
bridge = sys.modules["pack.nodes.bridge"]
model, clip, vae = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=True, output_clip=True)[:3]
bundle = bridge.bundle_from_comfy(model, clip, vae)
torch.manual_seed(0)
x, t, context = torch.randn(1, 4, 16, 16), torch.tensor([500.0]), torch.randn(1, 77, 768)
unet = model.model.diffusion_model
dtype = next(unet.parameters()).dtype
ids = bundle.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
image = torch.rand(1, 64, 64, 3)
with torch.no_grad():
    diffs = {
        "unet": (bundle.unet(x, t, context).sample - unet(x.to(dtype), t, context=context.to(dtype)).float()).abs().max().item(),
        "clip": (bundle.text_encoder(ids).last_hidden_state - clip.encode_from_tokens(clip.tokenize("a photo of a cat")).float()).abs().max().item(),
        "vae": (bundle.vae.encode(image.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mean - vae.encode(image).float()).abs().max().item(),
    }
print(json.dumps(diffs))
"""


def test_bridge_reproduces_comfyuis_own_models(tmp_path):
    """A two-level UNet (attention at one level only): the converted models compute what ComfyUI's compute."""
    python = os.environ.get("COMFYUI_PYTHON") or str(Path(COMFYUI_DIR).parent / "venv" / "bin" / "python")
    if not Path(python).is_file():
        pytest.skip("set COMFYUI_PYTHON to the Python that runs ComfyUI")
    checkpoint = tmp_path / "fast-sd15.safetensors"
    made = subprocess.run([sys.executable, str(MAKE_TINY), str(checkpoint), "--preset", "fast"], capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr[-2000:]
    script = tmp_path / "bridge_check.py"
    script.write_text(BRIDGE_CHECK)
    done = subprocess.run([python, str(script), COMFYUI_DIR, str(REPO_ROOT), str(checkpoint)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    diffs = json.loads(done.stdout.strip().splitlines()[-1])
    assert diffs["unet"] < 1e-4 and diffs["clip"] < 1e-4 and diffs["vae"] < 1e-4, diffs


def test_cancel_leaves_no_file(server):
    overrides = {**TRAIN_SMALL, "TokenInversion.steps": 100000, "TokenInversion.embedding_name": "cancelled"}
    code, _, text = server.run(REPO_ROOT / "workflows" / "pivotal_tuning_sd15.json", overrides, timeout=45)
    assert code == 124, text[-3000:]  # the harness sent /interrupt
    for _ in range(120):  # the server stops the run within a training step
        if "Processing interrupted" in server.log():
            break
        time.sleep(1)
    assert "Processing interrupted" in server.log()
    assert not list((server.models / "embeddings").glob("cancelled*"))


def test_one_file_per_character_with_the_loader_and_stock_nodes(server, tmp_path):
    """bundle_embedding: one LoRA file holding the embedding (bundle_emb.tokb.clip_l). Pivotal LoRA Loader makes
    the trigger work through its CLIP only; stock LoraLoader loads every LoRA key (only the bundle key is left,
    as ComfyUI logs it); in the embeddings folder ComfyUI reads the bundled embedding as embedding:FILE.
    Last of the SD1.5 tests: it makes ComfyUI log a missing embedding on purpose (the SDXL tests after it read only
    the log their own prompts wrote)."""
    train = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
        "2": {"class_type": "PivotalDatasetFromFolder", "inputs": {"folder": "character", "resolution": 64, "flip": False,
                                                                   "caption_source": "template", "on_bad_image": "error"}},
        "3": {"class_type": "TokenInversion", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0], "placeholder": "tokb",
            "initializer": "character", "num_vectors": 1, "templates": "a photo of {}", "steps": 2, "learning_rate": 0.01,
            "batch_size": 1, "seed": 0, "norm_mode": "none", "embedding_name": "tokb_file", "overwrite": False}},
        "4": {"class_type": "PivotalLoRATune", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0], "embedding": ["3", 0], "rank": 2,
            "alpha": 0.0, "targets": "attention", "learning_rate": 0.01, "steps": 2, "batch_size": 1, "seed": 0,
            "schedule": "sequential", "train_text_encoder": True, "lora_name": "character_bundle", "overwrite": False,
            "bundle_embedding": True}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 4]}},
    }  # fmt: skip

    def generate(clip: list, model: list, text, extra: dict | None = None) -> dict:
        return {
            "10": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
            **(extra or {}),
            "12": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": clip}},
            "13": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": clip}},
            "14": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "15": {"class_type": "KSampler", "inputs": {"model": model, "seed": 0, "steps": 2, "cfg": 5.0, "sampler_name": "euler",
                                                        "scheduler": "normal", "positive": ["12", 0], "negative": ["13", 0],
                                                        "latent_image": ["14", 0], "denoise": 1.0}},
            "16": {"class_type": "VAEDecode", "inputs": {"samples": ["15", 0], "vae": ["10", 2]}},
            "17": {"class_type": "SaveImage", "inputs": {"images": ["16", 0], "filename_prefix": "bundled"}},
        }  # fmt: skip

    def run(prompt: dict, name: str) -> tuple[dict, str]:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(prompt))
        before = len(server.log())
        code, result, text = server.run(path, {})
        assert code == 0, text[-4000:]
        return result, server.log()[before:]

    run(train, "train")
    bundled = server.models / "loras" / "character_bundle.safetensors"
    assert bundled.is_file()
    # 1. Pivotal LoRA Loader: the trigger through its CLIP (PivotalPrompt writes it into the text).
    loader = {"11": {"class_type": "PivotalLoRALoader", "inputs": {"model": ["10", 0], "clip": ["10", 1],
                                                                    "lora_name": "character_bundle.safetensors",
                                                                    "strength_model": 1.0, "strength_clip": 1.0}},
              "18": {"class_type": "PivotalPrompt", "inputs": {"template": "a photo of {} on the beach", "trigger": ["11", 2]}},
              "19": {"class_type": "PreviewAny", "inputs": {"source": ["18", 0]}}}  # fmt: skip
    result, log = run(generate(["11", 1], ["11", 0], ["18", 0], loader), "loader")
    assert shown_text(result, "19") == "a photo of embedding:tokb on the beach"
    assert not [problem for problem in LOG_PROBLEMS if problem in log], log[-4000:]
    # 2. The same text through the checkpoint's own CLIP: it does not know the trigger (the loader's CLIP only).
    _, log = run(generate(["10", 1], ["10", 0], "a photo of embedding:tokb on the beach"), "plain")
    missing = [line for line in log.splitlines() if "warning, embedding:tokb" in line and "does not exist, ignoring" in line]
    assert missing, log[-4000:]
    # 3. Stock LoraLoader on the same file: every LoRA key loads; ComfyUI names the bundle key alone.
    stock = {"11": {"class_type": "LoraLoader", "inputs": {"model": ["10", 0], "clip": ["10", 1], "lora_name": bundled.name,
                                                            "strength_model": 1.0, "strength_clip": 1.0}}}
    (server.models / "embeddings" / bundled.name).write_bytes(bundled.read_bytes())
    _, log = run(generate(["11", 1], ["11", 0], "a photo of embedding:character_bundle", stock), "stock")
    not_loaded = [line.split("lora key not loaded: ")[1].strip() for line in log.splitlines() if "lora key not loaded" in line]
    assert not_loaded == ["bundle_emb.tokb.clip_l"], log[-4000:]
    # ComfyUI read the bundled embedding from the embeddings folder (embedding:FILE): nothing is missing.
    assert "does not exist, ignoring" not in log and "NOT LOADED" not in log, log[-4000:]


# ---------------------------------------------------------------------------------------------
# SDXL: a tiny SDXL-family checkpoint (KOALA_700M layout, full-size text encoders: ~1.8 GiB each)
# ---------------------------------------------------------------------------------------------

MAKE_TINY_SDXL = TOOLS / "make_tiny_sdxl.py"
# Where the two SDXL checkpoints are kept between runs (made there when missing, ~30 s and 4 GB of memory
# each); a temporary folder when not set.
SDXL_DIR = os.environ.get("PTI_TINY_SDXL_DIR")
SDXL_CHECKPOINTS = {"tiny-sdxl.safetensors": [], "tiny-sdxl-vpred.safetensors": ["--vpred"]}
SDXL_SMALL = {
    "CheckpointLoaderSimple.ckpt_name": "tiny-sdxl.safetensors",
    "EmptyLatentImage.width": 64,
    "EmptyLatentImage.height": 64,
    "KSampler.steps": 2,
}
SDXL_TRAIN_SMALL = {
    **SDXL_SMALL,
    "PivotalDatasetFromFolder.folder": "character",
    "PivotalDatasetFromFolder.resolution": 64,
    "TokenInversion.steps": 2,
    "PivotalLoRATune.steps": 2,
}
# ComfyUI's SDXL second encoder, given an embedding file without `clip_g`, takes the file's first tensor and
# drops it with this warning (comfy/sd1_clip.py): the prompt silently loses the token there.
SHAPE_MISMATCH = "shape mismatch when trying to apply embedding, embedding will be ignored"


@pytest.fixture(scope="module")
def sdxl_checkpoints(tmp_path_factory) -> Path:
    if not MAKE_TINY_SDXL.is_file():
        pytest.skip(f"make_tiny_sdxl.py not in {TOOLS}")
    folder = Path(SDXL_DIR) if SDXL_DIR else tmp_path_factory.mktemp("sdxl_checkpoints")
    folder.mkdir(parents=True, exist_ok=True)
    for name, flags in SDXL_CHECKPOINTS.items():
        if not (folder / name).is_file():
            made = subprocess.run([sys.executable, str(MAKE_TINY_SDXL), str(folder / name), *flags],
                                  capture_output=True, text=True, timeout=900)  # fmt: skip
            assert made.returncode == 0, made.stderr[-2000:]
    return folder


@pytest.fixture(scope="module")
def sdxl_server(server, sdxl_checkpoints):
    """The same server, with the SDXL checkpoints in its checkpoints folder (ComfyUI lists them on the next prompt)."""
    for name in SDXL_CHECKPOINTS:
        link = server.models / "checkpoints" / name
        if not link.exists():
            link.symlink_to(sdxl_checkpoints / name)
    return server


def run_prompt(server, tmp_path, name: str, prompt: dict, timeout=900) -> tuple[dict, str]:
    """Queue an API-format prompt; `(result, the server log it wrote)`, after checking it ran."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(prompt))
    before = len(server.log())
    code, result, text = server.run(path, {}, timeout=timeout)
    assert code == 0, text[-4000:]
    return result, server.log()[before:]


def embedding_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def image_array(path: Path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


# Run inside ComfyUI's Python, in float32: the bridge's SDXL bundle against ComfyUI's own SDXL models.
SDXL_BRIDGE_CHECK = """
import importlib, importlib.util, json, sys, torch
comfy_dir, pack_dir, checkpoint = sys.argv[1:4]
sys.argv = [sys.argv[0], "--cpu", "--force-fp32"]
sys.path.insert(0, comfy_dir)
import comfy.options
comfy.options.enable_args_parsing()
import comfy.sd
spec = importlib.util.spec_from_file_location("pack", pack_dir + "/__init__.py", submodule_search_locations=[pack_dir])
pack = importlib.util.module_from_spec(spec); sys.modules["pack"] = pack; spec.loader.exec_module(pack)
bridge = sys.modules["pack.nodes.bridge"]
encode_conditioning = importlib.import_module("pack.pti_ops.training.text_conditioning").encode_conditioning
model, clip, vae = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=True, output_clip=True)[:3]
bundle = bridge.bundle_from_comfy(model, clip, vae)
torch.manual_seed(0)
prompt = "a photo of a cat"
x, t = torch.randn(1, 4, 16, 16), torch.tensor([500.0])
unet = model.model.diffusion_model
image = torch.rand(1, 64, 64, 3)

def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()

with torch.no_grad():
    ours = encode_conditioning(bundle, [prompt], None)
    cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
    y = model.model.encode_adm(pooled_output=pooled, width=128, height=96, crop_w=8, crop_h=4, target_width=128, target_height=96)
    time_ids = torch.tensor([[96.0, 128.0, 4.0, 8.0, 96.0, 128.0]])  # (original h, w), (crop top, left), (target h, w)
    theirs = unet(x, t, context=cond, y=y).float()
    mine = bundle.unet(x, t, **ours.unet_kwargs(time_ids)).sample
    last = clip.clone()
    last.clip_layer(-1)
    cond_last = last.encode_from_tokens(last.tokenize(prompt))
    alphas = bundle.noise_scheduler.alphas_cumprod
    diffs = {
        "hidden": rel(ours.hidden, cond), "pooled": rel(ours.pooled, pooled), "unet": rel(mine, theirs),
        "hidden_last_layer": rel(encode_conditioning(bundle, [prompt], bridge.clip_skip(last)).hidden, cond_last),
        "vae": rel(bundle.vae.encode(image.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mean, vae.encode(image)),
        # the training schedule is ComfyUI's (zsnr: both pin the last step near pure noise, differently)
        "sigmas": rel(((1 - alphas) / alphas).sqrt()[:-1], model.get_model_object("model_sampling").sigmas[:-1]),
        "family": str(bundle.family), "prediction": bundle.noise_scheduler.config.prediction_type,
        "zsnr": bool(bundle.noise_scheduler.config.get("rescale_betas_zero_snr", False)),
        "encoders": [type(e).__name__ for e in bundle.text_encoders],
    }
print(json.dumps(diffs))
"""


def test_sdxl_bridge_reproduces_comfyuis_own_models(tmp_path, sdxl_checkpoints):
    """The v-prediction + zsnr SDXL checkpoint: both encoders (penultimate and last layer), the pooled output, the
    UNet with its added conditioning, the VAE and the noise schedule compute what ComfyUI's do."""
    python = os.environ.get("COMFYUI_PYTHON") or str(Path(COMFYUI_DIR).parent / "venv" / "bin" / "python")
    if not Path(python).is_file():
        pytest.skip("set COMFYUI_PYTHON to the Python that runs ComfyUI")
    script = tmp_path / "sdxl_bridge_check.py"
    script.write_text(SDXL_BRIDGE_CHECK)
    checkpoint = sdxl_checkpoints / "tiny-sdxl-vpred.safetensors"
    done = subprocess.run([python, str(script), COMFYUI_DIR, str(REPO_ROOT), str(checkpoint)], capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    diffs = json.loads(done.stdout.strip().splitlines()[-1])
    assert diffs["family"] == "sdxl" and diffs["encoders"] == ["CLIPTextModel", "CLIPTextModelWithProjection"], diffs
    assert diffs["prediction"] == "v_prediction" and diffs["zsnr"], diffs
    assert all(diffs[key] < 1e-4 for key in ("hidden", "pooled", "unet", "hidden_last_layer", "vae", "sigmas")), diffs


def test_sdxl_workflows_train_and_generate_with_stock_nodes(sdxl_server, tmp_path):
    """pivotal_tuning_sdxl.json scaled down (its bf16, gradient checkpointing and offloaded text encoders on), then
    use_trained_lora_sdxl.json (stock nodes only) on the files it wrote."""
    server = sdxl_server
    before = len(server.log())
    overrides = {**SDXL_TRAIN_SMALL, "TokenInversion.embedding_name": "xlwf", "PivotalLoRATune.lora_name": "xlwf_lora"}
    code, result, text = server.run(REPO_ROOT / "workflows" / "pivotal_tuning_sdxl.json", overrides, timeout=1500)
    assert code == 0, text[-4000:]
    tensors = embedding_tensors(server.models / "embeddings" / "xlwf.safetensors")
    assert {key: list(value.shape) for key, value in tensors.items()} == {"clip_l": [1, 768], "clip_g": [1, 1280]}
    lora = embedding_tensors(server.models / "loras" / "xlwf_lora.safetensors")
    assert any(key.startswith("lora_unet_input_blocks_") for key in lora), sorted(lora)[:5]
    assert server.output_files("pivotal_tuning_sdxl"), text
    log = server.log()[before:]
    assert not [problem for problem in (*LOG_PROBLEMS, SHAPE_MISMATCH) if problem in log], log[-4000:]

    before = len(server.log())
    use = {**SDXL_SMALL, "2.lora_name": "xlwf_lora.safetensors", "3.text": "an anime illustration of embedding:xlwf standing on the beach"}
    code, _, text = server.run(REPO_ROOT / "workflows" / "use_trained_lora_sdxl.json", use)
    assert code == 0, text[-4000:]
    assert server.output_files("pivotal_character_sdxl"), text
    log = server.log()[before:]
    assert not [problem for problem in (*LOG_PROBLEMS, SHAPE_MISMATCH) if problem in log], log[-4000:]


def stock_sdxl_graph(branches: dict[str, tuple[str, bool]]) -> dict:
    """A stock SDXL text-to-image prompt with one branch per `prefix: (text, with the LoRA)`, 64 px, 2 steps."""
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sdxl.safetensors"}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": "xlchain_lora.safetensors",
                                                    "strength_model": 1.0, "strength_clip": 1.0}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }  # fmt: skip
    for index, (prefix, (text, with_lora)) in enumerate(branches.items()):
        source, n = ("2" if with_lora else "1"), 10 * (index + 1)
        prompt.update({
            f"{n}": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": [source, 1]}},
            f"{n + 1}": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": [source, 1]}},
            f"{n + 2}": {"class_type": "KSampler", "inputs": {
                "model": [source, 0], "seed": 0, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
                "positive": [f"{n}", 0], "negative": [f"{n + 1}", 0], "latent_image": ["3", 0], "denoise": 1.0}},
            f"{n + 3}": {"class_type": "VAEDecode", "inputs": {"samples": [f"{n + 2}", 0], "vae": ["1", 2]}},
            f"{n + 4}": {"class_type": "SaveImage", "inputs": {"images": [f"{n + 3}", 0], "filename_prefix": prefix}},
        })  # fmt: skip
    return prompt


def test_sdxl_embedding_and_lora_chain_into_a_stock_sdxl_graph(sdxl_server, tmp_path):
    """Our SDXL files in a second prompt of stock nodes: LoraLoader maps every key (UNet, lora_te1_, lora_te2_), the
    embedding reaches both text encoders (its clip_g vectors change the image; a file without clip_g is dropped by
    the second encoder), and the LoRA changes the image."""
    server = sdxl_server
    train = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sdxl.safetensors"}},
        "2": {"class_type": "PivotalDatasetFromFolder", "inputs": {"folder": "character", "resolution": 64, "flip": False,
                                                                   "caption_source": "template", "on_bad_image": "error"}},
        "3": {"class_type": "TokenInversion", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0], "placeholder": "xlchain",
            "initializer": "character", "num_vectors": 1, "templates": "a photo of {}", "steps": 2, "learning_rate": 0.05,
            "batch_size": 1, "seed": 0, "norm_mode": "none", "embedding_name": "xlchain", "overwrite": False}},
        "4": {"class_type": "PivotalLoRATune", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0], "embedding": ["3", 0], "rank": 2,
            "alpha": 0.0, "targets": "attention", "learning_rate": 0.01, "steps": 2, "batch_size": 1, "seed": 0,
            "schedule": "sequential", "train_text_encoder": True, "lora_name": "xlchain_lora", "overwrite": False}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 4]}},
        # PivotalEvaluate on the SDXL base + the token and LoRA just trained (sampling SDXL in the real server)
        "6": {"class_type": "PivotalEvaluate", "inputs": server.stock_inputs(
            "PivotalEvaluate", model=["1", 0], clip=["1", 1], vae=["1", 2], embedding=["3", 0], lora=["4", 2],
            prompts="a photo of {}", edit_prompts="a photo of {} on the beach", class_word="", seeds="0", steps=2, cfg=5.0,
            sampler="euler", resolution=64, batch_size=2, lpips="off", clip_model_folder="", lora_strength=1.0)},
        "7": {"class_type": "PreviewAny", "inputs": {"source": ["6", 0]}},
    }  # fmt: skip
    result, _ = run_prompt(server, tmp_path, "train", train, timeout=1500)
    shown = shown_text(result, "7")
    lines = {line.split("|")[1].strip(): line for line in shown.splitlines() if line.startswith("| ") and "---" not in line}
    assert "not computed" not in lines["locality_eps_mse"] and "not computed" not in lines["embedding_distance"], shown
    lora = embedding_tensors(server.models / "loras" / "xlchain_lora.safetensors")
    assert {prefix for prefix in ("lora_unet_", "lora_te1_", "lora_te2_") if any(k.startswith(prefix) for k in lora)} == {
        "lora_unet_", "lora_te1_", "lora_te2_"}, sorted(lora)[:5]
    ours = embedding_tensors(server.models / "embeddings" / "xlchain.safetensors")
    from safetensors.torch import save_file

    # The same clip_l with another clip_g; and clip_l alone (what an SD1.5-style file gives SDXL).
    save_file({"clip_l": ours["clip_l"], "clip_g": ours["clip_g"] + 0.5}, str(server.models / "embeddings" / "xlchain_g2.safetensors"))
    save_file({"clip_l": ours["clip_l"]}, str(server.models / "embeddings" / "xlchain_lonly.safetensors"))

    text = "a photo of embedding:xlchain on the beach"
    result, log = run_prompt(server, tmp_path, "chained", stock_sdxl_graph({
        "xl_ours": (text, True), "xl_no_lora": (text, False),
        "xl_other_g": ("a photo of embedding:xlchain_g2 on the beach", True)}))  # fmt: skip
    assert not [problem for problem in (*LOG_PROBLEMS, SHAPE_MISMATCH) if problem in log], log[-4000:]
    _, log_l = run_prompt(server, tmp_path, "clip_l_only", stock_sdxl_graph({"xl_l_only": ("a photo of embedding:xlchain_lonly on the beach", True)}))
    dropped = [line for line in log_l.splitlines() if SHAPE_MISMATCH in line]
    assert dropped and all("768 != 1280" in line for line in dropped), log_l[-3000:]

    images = {prefix: image_array(server.output_files(prefix)[-1]) for prefix in ("xl_ours", "xl_no_lora", "xl_other_g", "xl_l_only")}
    for other in ("xl_no_lora", "xl_other_g", "xl_l_only"):
        assert (images["xl_ours"] != images[other]).any(), f"the image with our files equals {other}'s"


def test_sdxl_model_sampling_discrete_is_honoured(sdxl_server, tmp_path):
    """ModelSamplingDiscrete(v_prediction, zsnr) before TokenInversion trains what the v-pred checkpoint's own
    markers train (the two files hold the same weights): the same embedding, bit for bit; without it, another.
    SD1.5 alike: v_prediction changes the embedding."""
    server = sdxl_server

    def inversion(node: str, checkpoint: str, name: str, v_prediction: bool = False) -> dict:
        loader, model = f"{node}0", [f"{node}0", 0]
        graph = {loader: {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}}}
        if v_prediction:
            graph[f"{node}3"] = {"class_type": "ModelSamplingDiscrete", "inputs": server.stock_inputs(
                "ModelSamplingDiscrete", model=model, sampling="v_prediction", zsnr=True)}  # fmt: skip
            model = [f"{node}3", 0]
        graph[f"{node}1"] = {"class_type": "TokenInversion", "inputs": {
            "model": model, "clip": [loader, 1], "vae": [loader, 2], "dataset": ["1", 0], "placeholder": "xlms",
            "initializer": "character", "num_vectors": 1, "templates": "a photo of {}", "steps": 2, "learning_rate": 0.01,
            "batch_size": 1, "seed": 0, "norm_mode": "none", "embedding_name": name, "overwrite": True}}  # fmt: skip
        graph[f"{node}2"] = {"class_type": "PreviewAny", "inputs": {"source": [f"{node}1", 2]}}
        return graph

    prompt = {
        "1": {"class_type": "PivotalDatasetFromFolder", "inputs": {"folder": "character", "resolution": 64, "flip": False,
                                                                   "caption_source": "template", "on_bad_image": "error"}},
        **inversion("10", "tiny-sdxl.safetensors", "ms_xl_eps"),
        **inversion("20", "tiny-sdxl.safetensors", "ms_xl_node", v_prediction=True),
        **inversion("30", "tiny-sdxl-vpred.safetensors", "ms_xl_markers"),
        **inversion("40", "tiny-sd15.safetensors", "ms_sd15_eps"),
        **inversion("50", "tiny-sd15.safetensors", "ms_sd15_v", v_prediction=True),
    }  # fmt: skip
    _, log = run_prompt(server, tmp_path, "model_sampling", prompt, timeout=1500)
    assert not [problem for problem in LOG_PROBLEMS if problem in log], log[-4000:]
    files = {name: embedding_tensors(server.models / "embeddings" / f"{name}.safetensors")
             for name in ("ms_xl_eps", "ms_xl_node", "ms_xl_markers", "ms_sd15_eps", "ms_sd15_v")}  # fmt: skip
    for key in ("clip_l", "clip_g"):
        assert torch_equal(files["ms_xl_node"][key], files["ms_xl_markers"][key]), key
        assert not torch_equal(files["ms_xl_eps"][key], files["ms_xl_node"][key]), key
    assert not torch_equal(files["ms_sd15_eps"]["clip_l"], files["ms_sd15_v"]["clip_l"])


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))
