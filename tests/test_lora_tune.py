import gc

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from pti_ops.models import load_bundle
from pti_ops.dataset import dataset_from_tensor
from pti_ops.errors import InvalidInputError, TokenizerError
from pti_ops.files.lora_file import apply_kohya_lora
from pti_ops.training.adapters import adapters_disabled
from pti_ops.lora_tune import UNET_TARGETS, TuneConfig, lora_config, run_tuning
from pti_ops.placeholder import add_placeholder
from pti_ops.regularizer import RegularizerConfig
from pti_ops.training.text_conditioning import encode_prompts

PIVOT = torch.randn(1, 32, generator=torch.Generator().manual_seed(5)) * 0.5


def _setup(seed=0):
    bundle = load_bundle("tiny")
    images = torch.rand(4, 32, 32, 3, generator=torch.Generator().manual_seed(seed))
    token = add_placeholder(bundle.tokenizer, bundle.text_encoder, "tok1", "character", vectors=PIVOT)
    return bundle, dataset_from_tensor(images, 32), token


def _eps(bundle, prompt, seed=11, n=4):
    """ε-prediction on fixed noisy latents and timesteps for `prompt`."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, 16, 16, generator=g)
    timesteps = torch.randint(0, 1000, (n,), generator=g)
    conditioning = encode_prompts(bundle.tokenizer, bundle.text_encoder, [prompt] * n)
    with torch.no_grad():
        return bundle.unet(latents, timesteps, conditioning).sample


def _config(**overrides):
    settings = dict(steps=12, learning_rate=2e-3, batch_size=2, history_every=4, seed=0)
    settings.update(overrides)
    return TuneConfig(**settings)


def test_zero_initialised_lora_leaves_outputs_bit_identical():
    bundle, _, _ = _setup()
    before = _eps(bundle, "an anime illustration of tok1")
    inject_adapter_in_model(lora_config(4, 4.0, 0.0, UNET_TARGETS["attention"]), bundle.unet, adapter_name="x")
    assert torch.equal(_eps(bundle, "an anime illustration of tok1"), before)


def test_tuning_lowers_the_loss_and_disabled_adapters_give_the_original_unet():
    bundle, dataset, token = _setup()
    prompt = "an anime illustration of tok1"
    base = _eps(bundle, prompt)
    base_weights = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    result = run_tuning(bundle, dataset, token, _config(steps=30, history_every=10, learning_rate=5e-3))
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert not torch.equal(_eps(bundle, prompt), base)
    with adapters_disabled(bundle):
        assert torch.equal(_eps(bundle, prompt), base)
    # Only LoRA weights were added; every original weight is untouched.
    state = bundle.unet.state_dict()
    for key, value in base_weights.items():
        tuned_key = key if key in state else key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(state[tuned_key], value), key


def test_exported_lora_reproduces_the_tuned_unet_on_a_fresh_model():
    bundle, dataset, token = _setup()
    result = run_tuning(bundle, dataset, token, _config(steps=6))
    fresh, _, _ = _setup()
    assert apply_kohya_lora(fresh.unet, None, result.lora) == []
    assert torch.allclose(_eps(fresh, "a character"), _eps(bundle, "a character"), atol=1e-5)
    assert all(key.startswith("lora_unet_") for key in result.lora)
    meta = result.metadata(token, "tiny-sd15")
    assert meta["pivotal.placeholder"] == "tok1" and meta["pivotal.rank"] == "4" and meta["pivotal.regularizer"] == "none"


def _class_drift(mode, weight=1.0, lr=1e-2, steps=40):
    bundle, dataset, token = _setup()
    prompt = "an anime illustration of character"
    before = _eps(bundle, prompt)
    regularizer = None if mode == "none" else RegularizerConfig(mode=mode, weight=weight)
    run_tuning(bundle, dataset, token, _config(steps=steps, learning_rate=lr), regularizer)
    return (_eps(bundle, prompt) - before).pow(2).mean().item()


def test_the_regulariser_keeps_the_class_prompt_closer_to_the_original():
    drift = {mode: _class_drift(mode) for mode in ("none", "class", "path")}
    assert drift["none"] > 0
    assert drift["class"] < drift["none"]
    assert drift["path"] < drift["none"]


def test_regularised_run_records_its_loss_and_holds_one_unet():
    bundle, dataset, token = _setup()
    counts = []

    def count_unets(step, total, logs):
        counts.append(sum(isinstance(o, UNet2DConditionModel) for o in gc.get_objects()))

    result = run_tuning(bundle, dataset, token, _config(steps=4), RegularizerConfig(mode="path", every=2), on_step=count_unets)
    assert all("reg_loss" in record for record in result.history)
    assert set(counts) == {1}
    assert result.regularizer["mode"] == "path"


def test_same_seed_same_lora():
    runs = []
    for _ in range(2):
        bundle, dataset, token = _setup()
        runs.append(run_tuning(bundle, dataset, token, _config(steps=5), RegularizerConfig(mode="sphere")).lora)
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_joint_schedule_trains_the_token_then_freezes_it_without_rebuilding_the_optimiser():
    bundle, dataset, token = _setup()
    seen = {}

    def watch(step, total, logs):
        # During training the lookup is a SplicedEmbedding whose `vectors` are the trained token.
        seen[step] = bundle.text_encoder.get_input_embeddings().vectors().detach().clone()

    result = run_tuning(bundle, dataset, token, _config(steps=8, schedule="joint", ti_frac=0.5, ti_learning_rate=1e-2), on_step=watch)
    assert not torch.equal(seen[4], PIVOT)
    assert torch.equal(seen[4], seen[8])  # frozen from step 5 on (lr 0)
    assert torch.equal(result.vectors, seen[8])
    assert result.history[-1]["lr_token"] == 0.0 and result.history[0]["lr_token"] == 1e-2


def test_text_encoder_lora_is_exported_with_te_keys():
    bundle, dataset, token = _setup()
    result = run_tuning(bundle, dataset, token, _config(steps=3, train_text_encoder=True))
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in result.lora)


def test_cancel_removes_the_adapters():
    bundle, dataset, token = _setup()
    base = _eps(bundle, "a character")

    def stop(step, total, logs):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_tuning(bundle, dataset, token, _config(steps=10), on_step=stop)
    assert not any(isinstance(m, LoraLayer) and "pivotal" in m.lora_A for m in bundle.unet.modules())
    assert torch.equal(_eps(bundle, "a character"), base)


def test_token_missing_from_the_model_is_reported():
    bundle, dataset, token = _setup()
    other = load_bundle("tiny")
    with pytest.raises(TokenizerError, match="is not in this model's tokenizer"):
        run_tuning(other, dataset, token, _config())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(rank=0), "`rank` must be a positive integer"),
        (dict(learning_rate=-1.0), "`learning_rate` must be a positive finite number"),
        (dict(learning_rate=float("nan")), "`learning_rate` must be a positive finite number"),
        (dict(steps=0), "`steps` must be a positive integer"),
        (dict(schedule="both"), "`schedule` must be one of"),
        (dict(targets="everything"), "`targets` must be one of"),
        (dict(ti_frac=0.0), "`ti_frac` must be in"),
    ],
)
def test_bad_settings_are_refused(overrides, message):
    with pytest.raises(InvalidInputError, match=message):
        _config(**overrides)


def test_a_cancelled_run_resumes_to_the_same_result(tmp_path):
    regularizer = RegularizerConfig(mode="sphere", t_range=(0.3, 0.7))
    bundle, dataset, token = _setup()
    dataset.flip = True
    uninterrupted = run_tuning(bundle, dataset, token, _config(steps=10, history_every=3), regularizer)

    def cancel_at_4(step, total, logs):
        if step == 4:
            raise KeyboardInterrupt

    checkpoint = tmp_path / "run.ckpt"
    bundle, dataset, token = _setup()
    dataset.flip = True
    with pytest.raises(KeyboardInterrupt):
        run_tuning(bundle, dataset, token, _config(steps=10, history_every=3), regularizer, on_step=cancel_at_4, checkpoint=str(checkpoint))
    assert checkpoint.is_file()
    bundle, dataset, token = _setup()
    dataset.flip = True
    resumed = run_tuning(bundle, dataset, token, _config(steps=10, history_every=3), regularizer, resume_from=str(checkpoint))
    assert all(torch.equal(resumed.lora[k], uninterrupted.lora[k]) for k in uninterrupted.lora)
    assert resumed.history == uninterrupted.history


def test_resuming_with_other_settings_is_refused(tmp_path):
    bundle, dataset, token = _setup()
    with pytest.raises(KeyboardInterrupt):
        run_tuning(bundle, dataset, token, _config(steps=5), on_step=lambda s, t, l: (_ for _ in ()).throw(KeyboardInterrupt),
                   checkpoint=str(tmp_path / "c.ckpt"))
    bundle, dataset, token = _setup()
    with pytest.raises(InvalidInputError, match="other settings \\(learning_rate differ\\)"):
        run_tuning(bundle, dataset, token, _config(steps=5, learning_rate=1.0), resume_from=str(tmp_path / "c.ckpt"))


def test_divergence_stops_with_the_last_good_lora():
    from pti_ops.errors import TrainingStopped

    bundle, dataset, token = _setup()
    calls = []

    def poison_after_step_4(module, args, output):
        calls.append(1)
        if len(calls) > 4:  # one UNet call per step without the regulariser
            return type(output)(sample=output.sample * float("nan"))

    bundle.unet.register_forward_hook(poison_after_step_4)
    with pytest.raises(TrainingStopped, match="diverged. Lower the learning rate.*reset to its state at step 4") as info:
        run_tuning(bundle, dataset, token, _config(steps=10, history_every=2))
    partial = info.value.partial
    assert [r["step"] for r in partial.history] == [2, 4]
    bundle, dataset, token = _setup()
    clean = run_tuning(bundle, dataset, token, _config(steps=4, history_every=2))
    assert all(torch.equal(partial.lora[k], clean.lora[k]) for k in clean.lora)


def test_image_space_term_adds_lpips_and_l2_of_decoded_predictions():
    from pti_ops.metrics.lpips_model import load_lpips

    lpips_model = load_lpips(random_backbone=True)
    runs = {}
    for image_space in (False, True):
        bundle, dataset, token = _setup()
        reg = RegularizerConfig(mode="path", image_space=image_space, image_l2_weight=0.1)
        runs[image_space] = run_tuning(bundle, dataset, token, _config(steps=4, history_every=2), reg, lpips_model=lpips_model)
    # Step 1's update is identical (zero LoRA up weights: both terms start at 0); later the image term adds.
    assert runs[True].history[-1]["reg_loss"] > runs[False].history[-1]["reg_loss"] > 0


def test_predicted_x0_inverts_the_noising():
    from pti_ops.training.diffusion_loss import predicted_x0

    bundle = load_bundle("tiny")
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([10, 500, 990])
    noisy = bundle.noise_scheduler.add_noise(latents, noise, timesteps)
    assert torch.allclose(predicted_x0(bundle.noise_scheduler, noisy, timesteps, noise), latents, atol=1e-3)


def test_a_checkpoint_with_nan_is_refused_naming_the_tensor(tmp_path):
    bundle, dataset, token = _setup()
    with pytest.raises(KeyboardInterrupt):
        run_tuning(bundle, dataset, token, _config(steps=5), on_step=lambda s, t, l: (_ for _ in ()).throw(KeyboardInterrupt),
                   checkpoint=str(tmp_path / "c.ckpt"))
    state = torch.load(str(tmp_path / "c.ckpt"), weights_only=True)
    state["trained"][1][0] = float("inf")
    torch.save(state, str(tmp_path / "c.ckpt"))
    bundle, dataset, token = _setup()
    with pytest.raises(InvalidInputError, match=r"trained tensor 1 of checkpoint .*c\.ckpt holds \d+ NaN or infinite"):
        run_tuning(bundle, dataset, token, _config(steps=5), resume_from=str(tmp_path / "c.ckpt"))
