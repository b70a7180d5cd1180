"""Behaviour of the BGA-MNER model (issue: core model). Tiny random configurations, CPU, seconds."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import random_batch, tiny_config, tiny_text_config, tiny_vision_config
from torchcrf import CRF
from transformers import AutoModelForTokenClassification, BertModel, CLIPConfig, CLIPModel, CLIPVisionModel

from configuration_bga_mner import BgaMnerConfig
from modeling_bga_mner import (
    BgaMnerForTokenClassification,
    LinearChainCrf,
    StageRefinedContextSampler,
    token_kl,
)


def text_only(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if not k.startswith("pixel")}


def vision_modules(model: BgaMnerForTokenClassification) -> list[torch.nn.Module]:
    layers = model.bga_layers
    return [
        model.vision_embeddings,
        model.vision_pre_layernorm,
        model.vision_first_layer,
        *(layer.visual_extractor for layer in layers[:-1]),
        *(layer.visual_sampler for layer in layers),
        model.generator.image_to_text,
    ]


def test_image_free_inference_calls_no_vision_module_and_matches_predictions_with_images():
    torch.manual_seed(0)
    model = BgaMnerForTokenClassification(tiny_config()).eval()
    batch = random_batch(model.config)
    calls = []
    for module in vision_modules(model):
        module.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        text_alone = model(**text_only(batch))
        with_images = model(**batch)
    assert calls == []
    assert torch.equal(text_alone.predictions, with_images.predictions)
    assert torch.equal(text_alone.logits, with_images.logits)
    assert (text_alone.predictions[batch["labels"] != -100] >= 0).all()

    # "real" visual features (paper Table 4) do run the visual branch and change the text features.
    model.config.inference_visual = "real"
    with torch.no_grad():
        real = model(**batch)
    assert calls and not torch.allclose(real.logits, with_images.logits)


def test_training_step_with_mixed_images_reaches_every_part_of_the_model():
    torch.manual_seed(0)
    model = BgaMnerForTokenClassification(tiny_config()).train()
    batch = random_batch(model.config, images=[True, False, True])
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.reconstruction_loss > 0 and out.cycle_loss > 0
    expected = out.crf_loss + 0.001 * (out.reconstruction_loss + out.cycle_loss) + 2.0 * out.keep_ratio_loss
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    layers = model.bga_layers
    parts = {
        "text_samplers": torch.nn.ModuleList(layer.text_sampler for layer in layers),
        "visual_samplers": torch.nn.ModuleList(layer.visual_sampler for layer in layers),
        "text_to_image_generator": model.generator.text_to_image,
        "image_to_text_generator": model.generator.image_to_text,
        "text_embeddings": model.text_embeddings,
        "text_extractors": torch.nn.ModuleList([*model.text_plain_layers, *(layer.text_extractor for layer in layers)]),
        "vision_embeddings": model.vision_embeddings,
        "vision_extractors": torch.nn.ModuleList(
            [model.vision_first_layer, *(layer.visual_extractor for layer in layers[:-1])]
        ),
        "crf": model.crf,
    }
    for name, part in parts.items():
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        assert grads, f"{name} got no gradient"
        assert all(torch.isfinite(g).all() for g in grads), name
        assert sum(g.abs().sum() for g in grads) > 0, f"{name} got a zero gradient"


def test_pairs_without_an_image_add_no_generation_loss():
    config = tiny_config(
        use_sampler=False, generator_dropout=0.0, text={"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    )
    torch.manual_seed(0)
    model = BgaMnerForTokenClassification(config).train()
    batch = random_batch(config, images=[True, False, True])
    mixed = model(**batch)
    image_rows = {k: v[[0, 2]] for k, v in batch.items()}
    only_images = model(**image_rows)
    torch.testing.assert_close(mixed.reconstruction_loss, only_images.reconstruction_loss)
    torch.testing.assert_close(mixed.cycle_loss, only_images.cycle_loss)

    no_image = model(**random_batch(config, images=[False, False, False]))
    assert no_image.generation_loss.item() == 0.0 and torch.isfinite(no_image.loss)
    assert model(**text_only(batch)).generation_loss.item() == 0.0


def test_token_kl_is_the_kl_of_the_generated_from_the_real_features_summed_or_averaged_over_sampled_tokens():
    torch.manual_seed(0)
    real, generated = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    p, q = real.softmax(-1), generated.softmax(-1)  # over channels, per token
    by_hand = (p * (p.log() - q.log())).sum(-1)  # KL(p_real || q_generated), (2, 3)
    expected_sum = torch.stack([by_hand[0, 0] + by_hand[0, 2], by_hand[1].sum()])
    torch.testing.assert_close(token_kl(real, generated, mask, "sum"), expected_sum)
    torch.testing.assert_close(token_kl(real, generated, mask, "mean"), expected_sum / torch.tensor([2.0, 3.0]))
    reverse = (q * (q.log() - p.log())).sum(-1)
    assert not torch.allclose(token_kl(real, generated, mask, "sum"), (reverse * mask).sum(1))  # KL is one-way


def test_the_loss_is_crf_plus_alpha_times_generation_plus_the_keep_ratio_term():
    config = tiny_config(alpha=0.3, keep_ratio_weight=0.7)
    torch.manual_seed(0)
    out = BgaMnerForTokenClassification(config).train()(**random_batch(config, images=[True, False, True]))
    assert out.reconstruction_loss > 0 and out.cycle_loss > 0 and out.keep_ratio_loss > 0  # Eq. (5), (7)
    torch.testing.assert_close(out.generation_loss, out.reconstruction_loss + out.cycle_loss)
    torch.testing.assert_close(out.loss, out.crf_loss + 0.3 * out.generation_loss + 0.7 * out.keep_ratio_loss)


@pytest.mark.parametrize("detach", [True, False])
def test_detached_targets_let_the_generation_losses_train_only_the_generators(detach):
    # The generators' cross-attention values are zeroed, so generated tokens do not depend on their source:
    # the only way from the generation losses back into the towers is then through the real features they
    # are compared with, which detaching cuts. Without samplers no mask carries gradient either.
    config = tiny_config(use_sampler=False, detach_generation_targets=detach)
    torch.manual_seed(0)
    model = BgaMnerForTokenClassification(config).train()
    with torch.no_grad():
        for generator in (model.generator.text_to_image, model.generator.image_to_text):
            generator.cross_attention.value.weight.zero_()
            generator.cross_attention.value.bias.zero_()
    out = model(**random_batch(config))
    assert out.generation_loss > 0
    out.generation_loss.backward()
    towers = [model.text_embeddings, model.text_plain_layers, model.vision_embeddings, model.vision_first_layer]
    tower_gradient = sum(p.grad.abs().sum().item() for m in towers for p in m.parameters() if p.grad is not None)
    generator_gradient = sum(p.grad.abs().sum().item() for p in model.generator.parameters() if p.grad is not None)
    assert generator_gradient > 0
    assert (tower_gradient == 0.0) if detach else (tower_gradient > 0.0)


def test_without_cycle_the_cycle_loss_is_zero_and_without_samplers_every_token_is_kept():
    config = tiny_config(use_cycle=False)
    torch.manual_seed(0)
    out = BgaMnerForTokenClassification(config).train()(**random_batch(config))
    assert out.cycle_loss.item() == 0.0 and out.layer_cycle_loss.tolist() == [0.0, 0.0]
    assert out.reconstruction_loss > 0 and out.generation_loss == out.reconstruction_loss

    config = tiny_config(use_sampler=False)
    batch = random_batch(config, images=[True, False, True])
    for mode in ("train", "eval"):
        torch.manual_seed(0)
        model = getattr(BgaMnerForTokenClassification(config), mode)()
        out = model(**batch, output_sampler_masks=True)
        for mask in out.text_sampler_masks:
            assert torch.equal(mask, batch["attention_mask"].float())
        if mode == "train":
            slots = batch["pixel_mask"][[0, 2]].repeat_interleave(config.tokens_per_image, dim=1)
            assert all(torch.equal(mask, slots.float()) for mask in out.visual_sampler_masks)
            assert out.keep_ratio_loss.item() == 0.0


def test_real_visual_features_at_inference_fall_back_to_generated_ones_for_a_tweet_without_an_image():
    config = tiny_config(inference_visual="generated")
    torch.manual_seed(0)
    model = BgaMnerForTokenClassification(config).eval()
    batch = random_batch(config, batch=2, images=[True, False])
    with torch.no_grad():
        generated = model(**batch).logits
        model.config.inference_visual = "real"  # Table 4's setting, on the same weights
        real = model(**batch).logits
    torch.testing.assert_close(real[1], generated[1], atol=0.0, rtol=0.0)  # no image: the generated features
    assert (real[0] - generated[0]).abs().max() > 1e-5  # with an image: the image's own features are read


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_nan_when_the_samplers_would_drop_every_token(dtype):
    torch.manual_seed(0)
    model = BgaMnerForTokenClassification(tiny_config()).train()
    with torch.no_grad():
        for sampler in [m for m in model.modules() if isinstance(m, StageRefinedContextSampler)]:
            sampler.decision_mlp[-1].bias.copy_(torch.tensor([50.0, -50.0]))  # always "drop"
    batch = random_batch(model.config, images=[True, False, True])
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        out = model(**batch, output_sampler_masks=True)
    # Only [CLS] / the global image's class token survive, and nothing is NaN.
    for mask in out.text_sampler_masks:
        assert mask.sum().item() == batch["input_ids"].shape[0]
    for mask in out.visual_sampler_masks:
        assert mask.sum().item() == 2
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_without_generation_the_model_is_bert_linear_crf():
    torch.manual_seed(0)
    config = tiny_config(use_generation=False)
    model = BgaMnerForTokenClassification(config).eval()
    assert not hasattr(model, "vision_embeddings") and not hasattr(model, "generator")
    assert not any(isinstance(m, StageRefinedContextSampler) for m in model.modules())
    bert = BertModel(config.text_config, add_pooling_layer=False).eval()
    bert.embeddings.load_state_dict(model.text_embeddings.state_dict())
    extractors = [*model.text_plain_layers, *(layer.text_extractor for layer in model.bga_layers)]
    for bert_layer, extractor in zip(bert.encoder.layer, extractors, strict=True):
        bert_layer.load_state_dict(extractor.state_dict())
    crf = CRF(config.num_labels, batch_first=True)
    crf.load_state_dict(model.crf.state_dict())

    batch = random_batch(config)
    with torch.no_grad():
        out = model(**batch)
        hidden = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = model.classifier(hidden)
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=1e-5)
    # The CRF runs over the labelled positions (one per word): compare with pytorch-crf on them.
    words = batch["labels"] != -100
    for row in range(len(words)):
        emissions = logits[row, words[row]].unsqueeze(0)
        tags = batch["labels"][row, words[row]].unsqueeze(0)
        assert crf.decode(emissions)[0] == out.predictions[row, words[row]].tolist()
        assert (out.predictions[row, ~words[row]] == -100).all()
    nll = -torch.stack(
        [crf(logits[r, words[r]].unsqueeze(0), batch["labels"][r, words[r]].unsqueeze(0)) for r in range(len(words))]
    ).mean()
    torch.testing.assert_close(out.loss, nll, atol=1e-4, rtol=1e-5)
    del tags


def test_vectorised_viterbi_equals_pytorch_crf_decode():
    torch.manual_seed(0)
    crf = LinearChainCrf(5, batch_first=True)
    emissions = torch.randn(6, 9, 5)
    lengths = torch.tensor([9, 1, 4, 7, 2, 9])
    mask = torch.arange(9) < lengths[:, None]
    tags = crf.viterbi_tags(emissions, mask)
    expected = crf.decode(emissions, mask)
    for row, length in enumerate(lengths.tolist()):
        assert tags[row, :length].tolist() == expected[row]


def test_full_size_parameter_counts_match_the_paper():
    report = BgaMnerForTokenClassification(BgaMnerConfig()).parameter_report()
    print({k: f"{v / 1e6:.2f}M" for k, v in report.items()})
    assert abs(report["inference"] - 130.3e6) / 130.3e6 < 0.03  # paper Table 5: 130.3M
    assert abs(report["text_to_image_generator"] - 7.9e6) / 7.9e6 < 0.03  # paper Sec. 4.5: 7.9M
    # Paper: 11.5M for all textual samplers; 11 DynamicViT-style samplers at d=768 give 10.58M (12 would give 11.54M).
    assert report["text_sampler"] == 11 * 961_730
    # The exact counts the README states (226.4M to train, 127.5M at inference).
    assert (report["total"], report["inference"], report["text_to_image_generator"]) == (
        226_431_000,
        127_509_186,
        8_031_488,
    )


def test_save_and_auto_load_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = BgaMnerForTokenClassification(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert {"configuration_bga_mner.py", "modeling_bga_mner.py"} <= {p.name for p in tmp_path.iterdir()}
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForTokenClassification"] == "modeling_bga_mner.BgaMnerForTokenClassification"
    loaded = AutoModelForTokenClassification.from_pretrained(tmp_path, trust_remote_code=True).eval()
    batch = random_batch(model.config)
    with torch.no_grad():
        expected, actual = model(**batch), loaded(**batch)
    assert torch.equal(expected.logits, actual.logits)
    assert torch.equal(expected.predictions, actual.predictions)
    assert torch.equal(expected.loss, actual.loss)


@pytest.mark.parametrize("vision_checkpoint", ["clip", "clip_vision"])
def test_from_text_vision_pretrained_puts_every_branch_weight_in_place(tmp_path, vision_checkpoint):
    torch.manual_seed(0)
    bert = BertModel(tiny_text_config())
    bert.save_pretrained(tmp_path / "bert")
    if vision_checkpoint == "clip":
        clip_config = CLIPConfig(
            text_config=dict(
                vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
            ),
            vision_config=tiny_vision_config().to_dict(),
            projection_dim=16,
        )
        clip = CLIPModel(clip_config)
        clip.save_pretrained(tmp_path / "vision")
        vision = clip.vision_model
    else:
        vision = CLIPVisionModel(tiny_vision_config())
        vision.save_pretrained(tmp_path / "vision")
    model = BgaMnerForTokenClassification.from_text_vision_pretrained(
        str(tmp_path / "bert"), str(tmp_path / "vision"), num_object_crops=1
    )
    vision = getattr(vision, "vision_model", vision)

    def same(ours: torch.nn.Module, theirs: torch.nn.Module):
        theirs_state = theirs.state_dict()
        for name, tensor in ours.state_dict().items():
            assert torch.equal(tensor, theirs_state[name]), name

    same(model.text_embeddings, bert.embeddings)
    for i, extractor in enumerate([*model.text_plain_layers, *(layer.text_extractor for layer in model.bga_layers)]):
        same(extractor, bert.encoder.layer[i])
    same(model.vision_embeddings, vision.embeddings)
    same(model.vision_pre_layernorm, vision.pre_layrnorm)
    visual_extractors = [model.vision_first_layer, *(layer.visual_extractor for layer in model.bga_layers[:-1])]
    for i, extractor in enumerate(visual_extractors):
        same(extractor, vision.encoder.layers[i])
    assert model.config.num_bga_layers == 2 and model.config.num_object_crops == 1


def test_model_overfits_a_handful_of_sentences():
    torch.manual_seed(0)
    config = tiny_config()
    model = BgaMnerForTokenClassification(config).train()
    batch = random_batch(config, batch=4, length=8, seed=1, images=[True, True, False, True])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(120):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        predictions = model(**text_only(batch)).predictions
    assert losses[-1] < 0.1 * losses[0]
    assert torch.equal(predictions, batch["labels"])


def test_towers_of_different_widths_are_bridged_by_projections():
    torch.manual_seed(0)
    model = BgaMnerForTokenClassification(tiny_config(vision={"hidden_size": 24, "num_attention_heads": 4})).train()
    out = model(**random_batch(model.config))
    assert torch.isfinite(out.loss) and out.reconstruction_loss > 0
    assert model.parameter_report()["modality_projections"] == 2 * 32 * 24 + 32 + 24


def test_gradient_checkpointing_recomputes_each_bga_layer_once_with_equal_losses_and_gradients():
    config = tiny_config(text={"num_hidden_layers": 4}, vision={"num_hidden_layers": 4})
    torch.manual_seed(0)
    model = BgaMnerForTokenClassification(config).train()
    batch = random_batch(config, images=[True, False, True])
    calls = []
    for layer in model.bga_layers:
        layer.text_extractor.register_forward_hook(lambda *_: calls.append(1))

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        calls.clear()
        torch.manual_seed(1)  # the samplers' Gumbel noise and dropout
        out = model(**batch)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = step()
    assert len(calls) == 3  # one forward of each of the 3 BGA layers' text extractor
    model.activation_checkpointing_enable()
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):  # recompute whole layers, to count them
        full_recompute = step()
    assert len(calls) == 6  # each BGA layer recomputed once in the backward pass, its extractors not again
    for checkpointed_loss, checkpointed_grads in (full_recompute, step()):  # and with torch's default early stop
        assert torch.equal(checkpointed_loss, plain_loss)  # the same random numbers: the same sampled masks
        assert checkpointed_grads.keys() == plain_grads.keys()
        for name, grad in plain_grads.items():
            torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
