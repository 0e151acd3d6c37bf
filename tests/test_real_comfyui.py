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
    # The same workflow as saved before if_exists (and bundle_embedding) existed: those widget values missing.
    saved = json.loads(workflow.read_text())
    for node in saved["nodes"]:
        newer = {"TokenInversion": ["increment"], "PivotalLoRATune": ["increment", False]}.get(node["type"], [])
        if newer:
            assert node["widgets_values"][-len(newer):] == newer
            del node["widgets_values"][-len(newer):]
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
    Last in this file: it makes ComfyUI log a missing embedding on purpose."""
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
