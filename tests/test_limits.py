"""The documented limits: the CLI refuses above them before anything loads (unless --no-limits), the nodes'
widgets stop at them, and running out of memory anyway is a sentence, not a traceback."""

import pytest
from comfy_stubs import comfy_env, nodes  # noqa: F401

from pti_ops import limits
from pti_ops.cli import main
from pti_ops.cli.options import LIMITED_OPTIONS


def invert(tmp_path, images, *extra):
    return ["invert", "--model", "tiny", "--images", str(images), "--out", str(tmp_path / "out" / "e.safetensors"), *extra]


@pytest.mark.parametrize("extra, message", [
    (["--steps", str(10**12)], f"--steps 1000000000000 is above its limit of {limits.MAX_STEPS}"),
    (["--resolution", "100000"], f"--resolution 100000 is above its limit of {limits.MAX_RESOLUTION}"),
    (["--batch-size", "1000000"], f"--batch-size 1000000 is above its limit of {limits.MAX_BATCH_SIZE}"),
    (["--grad-accum", "1000000"], f"--grad-accum 1000000 is above its limit of {limits.MAX_GRADIENT_ACCUMULATION}"),
])  # fmt: skip
def test_a_value_above_its_limit_is_refused_before_loading(tmp_path, image_folder, capsys, monkeypatch, extra, message):
    monkeypatch.setattr("pti_ops.cli.invert.load_bundle", lambda *a, **k: pytest.fail("loaded a model"))
    assert main(invert(tmp_path, image_folder, *extra)) == 2
    error = capsys.readouterr().err
    assert message in error and "pass --no-limits to go past it deliberately" in error
    assert "Traceback" not in error and not (tmp_path / "out").exists()


def test_other_commands_have_their_limits_too(tmp_path, image_folder, capsys):
    run = ["run", "--model", "tiny", "--images", str(image_folder), "--out-embedding", str(tmp_path / "e.safetensors"),
           "--out-lora", str(tmp_path / "l.safetensors")]
    assert main([*run, "--ti-steps", "100001"]) == 2 and "--ti-steps 100001 is above" in capsys.readouterr().err
    assert main([*run, "--rank", "257"]) == 2 and "--rank 257 is above its limit of 256" in capsys.readouterr().err
    evaluate = ["evaluate", "--model", "tiny", "--out", str(tmp_path / "report")]
    assert main([*evaluate, "--steps", "1001"]) == 2 and "--steps 1001 is above its limit of 1000" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_no_limits_lets_a_deliberate_value_through(tmp_path, image_folder, monkeypatch):
    monkeypatch.setitem(LIMITED_OPTIONS, "steps", 2)
    assert main(invert(tmp_path, image_folder, "--steps", "3")) == 2
    assert main(invert(tmp_path, image_folder, "--steps", "3", "--no-limits")) == 0
    assert (tmp_path / "out" / "e.safetensors").is_file()


def test_running_out_of_memory_is_a_sentence(tmp_path, image_folder, capsys, monkeypatch):
    def allocate(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried "
                           "to allocate 60000000000 bytes.")

    monkeypatch.setattr("pti_ops.cli.invert.load_image_folder", allocate)
    assert main(invert(tmp_path, image_folder, "--steps", "1")) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: out of memory") and "Lower --resolution, --batch-size" in error
    assert not (tmp_path / "out").exists()


def test_other_runtime_errors_are_not_taken_for_memory(tmp_path, image_folder, monkeypatch):
    monkeypatch.setattr("pti_ops.cli.invert.load_image_folder", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        main(invert(tmp_path, image_folder, "--steps", "1"))


def test_node_widgets_stop_at_the_limits(nodes):
    def widget(node, name):
        inputs = nodes[node].INPUT_TYPES()
        return {**inputs["required"], **inputs.get("optional", {})}[name][1]

    assert widget("TokenInversion", "steps")["max"] == widget("PivotalLoRATune", "steps")["max"] == limits.MAX_STEPS
    assert widget("PivotalSweep", "steps")["max"] == limits.MAX_STEPS
    assert widget("PivotalDatasetFromFolder", "resolution")["max"] == limits.MAX_RESOLUTION
    assert widget("PivotalEvaluate", "steps")["max"] == limits.MAX_SAMPLE_STEPS
    assert widget("PivotalLoRATune", "rank")["max"] == widget("PivotalSweep", "lora_rank")["max"] == limits.MAX_RANK
    assert widget("PivotalLoRATune", "batch_size")["max"] == limits.MAX_BATCH_SIZE
