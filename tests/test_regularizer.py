"""The locality regulariser: config checks, each mode's conditionings, caching, the loss."""

import pytest
import torch

from pti_ops.errors import InvalidInputError, TokenizerError
from pti_ops.interpolation import angle_between, slerp
from pti_ops.placeholder import add_placeholder
from pti_ops.regularizer import REGULARIZER_MODES, LocalityRegularizer, RegularizerConfig, locality_loss
from pti_ops.training.text_conditioning import encode_prompts
from pti_ops.models.tiny_model import build_tiny_bundle
from helpers import warns_user

TEMPLATE = "an anime illustration of {}"
START = 5  # BOS=0 an anime illustration of tok1=5


@pytest.fixture(scope="module")
def setup():
    """Tiny bundle with `tok1` whose row is moved away from `character`'s (so the endpoints differ)."""
    bundle = build_tiny_bundle()
    token = add_placeholder(bundle.tokenizer, bundle.text_encoder, "tok1", "character")
    with torch.no_grad():
        weight = bundle.text_encoder.get_input_embeddings().weight
        weight[list(token.token_ids)] += 0.5 * torch.randn(1, weight.shape[1], generator=torch.Generator().manual_seed(0))
    return bundle, token


def encode(bundle, prompts):
    return encode_prompts(bundle.tokenizer, bundle.text_encoder, prompts)


def make(setup, **settings):
    bundle, token = setup
    return LocalityRegularizer(bundle, token, RegularizerConfig(**settings))


# -- config -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "settings, message",
    [
        ({"mode": "random"}, "`mode` must be one of none, empty, class, path, sphere; got 'random'"),
        ({"interpolation": "nlerp"}, "`interpolation` must be one of slerp, vslerp; got 'nlerp'"),
        ({"anchor": " "}, "`anchor` must be a class word"),
        ({"templates": ["a photo of tok1"]}, r"must contain \{\} where the placeholder goes"),
        ({"templates": []}, "`templates` must be a non-empty list"),
        ({"t": 1.5}, "`t` must be between 0.0 and 1.0, got 1.5"),
        ({"t_range": (0.8, 0.2)}, r"`t_range` must be \(min, max\) with min <= max"),
        ({"t_range": (0.2,)}, "`t_range` must be a pair"),
        ({"weight": -1}, "`weight` must be at least 0.0, got -1"),
        ({"every": 0}, "`every` must be a positive integer, got 0"),
        ({"samples": True}, "`samples` must be a positive integer"),
        ({"image_l2_weight": float("nan")}, "`image_l2_weight` must be a finite number"),
        ({"timestep_range": (10.5, 20)}, "`timestep_range` must hold whole numbers"),
        ({"centre": torch.zeros(2, 3, 4), "interpolation": "vslerp"}, r"`centre` must be a finite \[tokens, dim\]"),
    ],
)
def test_config_rejects_bad_settings(settings, message):
    with pytest.raises(InvalidInputError, match=message):
        RegularizerConfig(**settings)


def test_config_warns_about_ignored_settings():
    with warns_user("`t`=0.3 is ignored because `t_range`"):
        RegularizerConfig(t=0.3, t_range=(0.2, 0.6))
    with warns_user("`centre` is ignored because `interpolation` is not `vslerp`"):
        RegularizerConfig(centre=torch.zeros(32))


def test_config_from_dict_and_to_dict():
    config = RegularizerConfig.from_dict(
        {"mode": "sphere", "templates": "a drawing of {}", "t_range": [0.2, 0.7], "timestep_range": [0, 500]}
    )
    assert config.templates == ["a drawing of {}"] and config.t_range == (0.2, 0.7)
    assert config.timestep_range == (0, 500)
    data = config.to_dict()
    assert data["centre_shape"] is None and data["t_range"] == [0.2, 0.7]
    assert RegularizerConfig.from_dict(data) == config
    assert set(REGULARIZER_MODES) == {"none", "empty", "class", "path", "sphere"}
    with pytest.raises(InvalidInputError, match="unknown regulariser setting\\(s\\) 'wieght'; valid settings are"):
        RegularizerConfig.from_dict({"wieght": 0.1})


# -- building -----------------------------------------------------------------------------------

def test_vslerp_without_a_centre_fails_at_build_time(setup):
    with pytest.raises(InvalidInputError, match="`interpolation` is `vslerp` but no centre was given"):
        make(setup, interpolation="vslerp")
    bundle, token = setup
    with pytest.raises(InvalidInputError, match=r"centre of shape \(16,\) does not fit .* \[77, 32\]"):
        LocalityRegularizer(bundle, token, RegularizerConfig(interpolation="vslerp", centre=torch.zeros(16)))


def test_anchor_of_another_length_than_the_placeholder_is_refused(setup):
    # "zebra" is not in the tiny vocabulary, so it is several BPE pieces; tok1 is one vector.
    with pytest.raises(TokenizerError, match=r"class word `anchor` 'zebra' is 5 tokens .* but the placeholder 'tok1' is 1"):
        make(setup, anchor="zebra")
    make(setup, anchor="zebra", mode="class")  # the class prompt alone has no positions to align


def test_two_vector_placeholder_needs_a_two_token_anchor():
    bundle = build_tiny_bundle()
    token = add_placeholder(bundle.tokenizer, bundle.text_encoder, "tok2", "character", num_vectors=2)
    with pytest.raises(TokenizerError, match="or set `num_vectors` to 1"):
        LocalityRegularizer(bundle, token, RegularizerConfig(anchor="character"))
    reg = LocalityRegularizer(bundle, token, RegularizerConfig(anchor="red cat", t=0.0))
    assert torch.equal(reg.conditionings(0).hidden[0], encode(bundle, [token.expand(TEMPLATE.format("tok2"))])[0])


def test_timestep_range_past_the_schedule_is_refused(setup):
    with pytest.raises(InvalidInputError, match=r"`timestep_range` \(0, 1000\) goes past the model's last timestep 999"):
        make(setup, timestep_range=(0, 1000))


# -- modes --------------------------------------------------------------------------------------

def test_empty_and_class_modes_encode_their_prompts(setup):
    bundle, _ = setup
    empty = make(setup, mode="empty", samples=2).conditionings(0).hidden
    assert empty.shape == (2, 77, 32)
    assert torch.equal(empty[1], encode(bundle, [""])[0])
    assert torch.equal(make(setup, mode="class").conditionings(0).hidden[0], encode(bundle, [TEMPLATE.format("character")])[0])


def test_none_mode_and_interval(setup):
    assert make(setup, mode="none").conditionings(0) is None
    assert make(setup, weight=0.0).conditionings(0) is None
    reg = make(setup, every=3)
    assert [reg.is_active(s) for s in range(5)] == [True, False, False, True, False]
    assert reg.conditionings(1) is None and reg.conditionings(3) is not None


def test_path_mode_endpoints_and_untouched_prefix(setup):
    bundle, _ = setup
    with_placeholder, with_anchor = encode(bundle, [TEMPLATE.format("tok1"), TEMPLATE.format("character")])
    at_0, at_1, mid = (make(setup, t=t).conditionings(0).hidden[0] for t in (0.0, 1.0, 0.5))
    assert torch.equal(at_0, with_placeholder)
    assert torch.equal(at_1[START:], with_anchor[START:])
    assert torch.allclose(at_1, with_anchor, atol=1e-6)  # the causal mask: same prefix either way
    assert torch.equal(mid[:START], with_placeholder[:START])  # exactly, before the placeholder
    assert torch.allclose(mid[START:], slerp(with_placeholder[START:], with_anchor[START:], 0.5), atol=1e-6)
    assert (mid[START:] - with_placeholder[START:]).norm(dim=-1).min() > 1e-3  # the endpoints do differ


def test_vslerp_path_with_zero_centre_equals_slerp_path(setup):
    bundle, token = setup
    config = RegularizerConfig(interpolation="vslerp", t=0.3, centre=torch.zeros(77, 32))
    by_vslerp = LocalityRegularizer(bundle, token, config).conditionings(0).hidden
    assert torch.allclose(by_vslerp, make(setup, t=0.3).conditionings(0).hidden, atol=1e-6)


def test_sphere_points_keep_the_path_angle_and_follow_the_seed(setup):
    bundle, _ = setup
    with_placeholder, with_anchor = encode(bundle, [TEMPLATE.format("tok1"), TEMPLATE.format("character")])
    reg = make(setup, mode="sphere", samples=2)
    first = reg.conditionings(0, torch.Generator().manual_seed(0)).hidden
    again = reg.conditionings(0, torch.Generator().manual_seed(0)).hidden
    other = reg.conditionings(0, torch.Generator().manual_seed(1)).hidden
    path = slerp(with_placeholder, with_anchor, 0.5)
    for sample in first:
        assert torch.equal(sample[:START], with_placeholder[:START])
        assert torch.allclose(angle_between(with_placeholder, sample)[START:], angle_between(with_placeholder, path)[START:], atol=1e-4)
        assert torch.allclose(sample.norm(dim=-1), path.norm(dim=-1), atol=1e-4)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other) and not torch.allclose(first[0], first[1])


def test_several_templates_and_sampled_t(setup):
    reg = make(setup, templates=[TEMPLATE, "a drawing of {} in the city"], samples=2, t_range=(0.2, 0.8))
    generator = torch.Generator().manual_seed(0)
    a, b = reg.conditionings(0, generator).hidden, reg.conditionings(1, generator).hidden
    assert a.shape == (2, 77, 32)
    assert torch.equal(a[1][:3], b[1][:3])  # "a drawing of" comes before the placeholder: never moved
    assert not torch.allclose(a, b)  # t is drawn again


def test_endpoints_are_encoded_once(setup):
    bundle, _ = setup
    calls = []
    handle = bundle.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        fixed = make(setup, t=0.5, samples=2)
        results = [fixed.conditionings(step).hidden for step in range(3)]
        assert len(calls) == 1 and all(torch.equal(r, results[0]) for r in results)
        sampled = make(setup, t_range=(0.0, 1.0))
        generator = torch.Generator().manual_seed(0)
        for step in range(3):
            sampled.conditionings(step, generator)
        assert len(calls) == 2
        sampled.refresh()
        sampled.conditionings(0, generator)
        assert len(calls) == 3
    finally:
        handle.remove()


# -- loss ---------------------------------------------------------------------------------------

def test_locality_loss_is_mse_towards_the_detached_base():
    tuned = torch.tensor([[1.0, 2.0]], requires_grad=True)
    base = torch.tensor([[0.0, 0.0]], requires_grad=True)
    loss = locality_loss(tuned, base)
    assert loss.item() == pytest.approx(2.5)
    loss.backward()
    assert tuned.grad is not None and base.grad is None
    with pytest.raises(ValueError, match="prediction shapes differ"):
        locality_loss(torch.zeros(2), torch.zeros(3))
