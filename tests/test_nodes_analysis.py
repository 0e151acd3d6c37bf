"""EmbeddingNormStats and PivotalPrompt."""

import pytest
import torch
from comfy_stubs import comfy_env, fake_models, nodes, run_node, run_node_with_ui  # noqa: F401  (fixtures)

CAPTIONS = "a photo of a cat\na drawing of a dog\nan anime illustration of a girl with a hat\na boy in the city"


def measure(nodes, clip, **overrides):
    inputs = dict(
        clip=clip, captions=CAPTIONS, captions_file="", space="hidden", position="",
        template="an anime illustration of {}", class_word="character",
    )  # fmt: skip
    inputs.update(overrides)
    return run_node(nodes["EmbeddingNormStats"], **inputs)


def test_norm_stats_outputs(nodes, fake_models):
    stats, summary, plot = measure(nodes, fake_models[1])
    assert stats.space == "hidden" and stats.position == 5 and stats.centres.shape == (77, 32)
    assert "conclusion:" in summary and "centred" in summary
    assert plot.ndim == 4 and plot.shape[0] == 1 and plot.shape[-1] == 3


def test_norm_stats_from_a_captions_file_and_eos(nodes, fake_models, comfy_env):
    (comfy_env[1].folders["input"] / "captions.txt").write_text(CAPTIONS + "\n")
    stats = measure(nodes, fake_models[1], captions="", captions_file="captions.txt", position="eos", template="")[0]
    assert stats.position == "eos" and stats.endpoints is None and stats.num_captions == 4
    node = nodes["EmbeddingNormStats"]
    assert node.IS_CHANGED(captions_file="captions.txt") != node.IS_CHANGED(captions_file="")


def test_norm_stats_compare_a_trained_embedding(nodes, fake_models):
    from comfy_stubs import PACK_NAME

    core = __import__(PACK_NAME + ".pti_ops", fromlist=["Pivot"])
    embedding = core.Pivot("tok1", "character", torch.randn(1, 32), "sd15")
    stats = measure(nodes, fake_models[1], embedding=embedding)[0]
    assert stats.endpoints.trained and "tok1" in stats.endpoints.placeholder_prompt


def test_norm_stats_warnings_end_the_summary_on_every_run(nodes, fake_models, comfy_env):
    """Captions that end before the position: said in the summary, on the node and in the log, every run."""
    for _ in range(2):
        (stats, summary, _), ui = run_node_with_ui(
            nodes["EmbeddingNormStats"], clip=fake_models[1], captions="a cat\na drawing of a dog on the beach at night",
            captions_file="", space="hidden", position="6", template="", class_word="character", unique_id="3",
        )  # fmt: skip
        assert "## Warnings" in summary and "1 caption(s) end before position 6" in summary.split("## Warnings")[1]
        assert "end before position 6" in ui["text"][0] and comfy_env[1].node_texts[-1][0] == "3"


def test_norm_stats_errors_name_the_input(nodes, fake_models):
    with pytest.raises(ValueError, match="`captions` needs at least 2 captions"):
        measure(nodes, fake_models[1], captions="only one")
    with pytest.raises(ValueError, match="`captions_file` 'missing.txt' does not exist"):
        measure(nodes, fake_models[1], captions_file="missing.txt")


@pytest.mark.parametrize(
    "template, prompt",
    [
        ("an anime illustration of {} on the beach", "an anime illustration of embedding:tok1 on the beach"),
        ("{}, smiling", "embedding:tok1, smiling"),
        ("a photo of {}.", "a photo of embedding:tok1 ."),
        ("{} and {}", "embedding:tok1 and embedding:tok1"),
    ],
)
def test_prompt_writes_the_trigger(nodes, template, prompt):
    assert run_node(nodes["PivotalPrompt"], template=template, trigger="embedding:tok1") == (prompt,)


def test_prompt_without_placeholder_is_refused(nodes):
    with pytest.raises(ValueError, match="has no \\{\\}"):
        run_node(nodes["PivotalPrompt"], template="a photo", trigger="embedding:tok1")
