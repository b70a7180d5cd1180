"""The BGA mechanism learns as the paper describes (issue: sampler gradients, no collapse, padding-independent
generation). Tiny random configurations, CPU, seconds."""

from __future__ import annotations

import pytest
import torch
from tiny import random_batch, tiny_config

from configuration_bga_mner import BgaMnerConfig
from modeling_bga_mner import (
    BgaMnerForTokenClassification,
    CrossModalGenerator,
    GeneratorAttention,
    StageRefinedContextSampler,
)


def samplers(model: BgaMnerForTokenClassification, side: str) -> list[StageRefinedContextSampler]:
    return [getattr(layer, f"{side}_sampler") for layer in model.bga_layers]


def gradient_size(module: torch.nn.Module) -> float:
    return sum(p.grad.abs().sum().item() for p in module.parameters() if p.grad is not None)


def test_the_crf_loss_alone_gives_every_text_sampler_a_gradient():
    torch.manual_seed(0)
    model = BgaMnerForTokenClassification(tiny_config()).train()
    for images in ([True, True, True], [False, False, False]):  # with images, and on text alone
        model.zero_grad()
        model(**random_batch(model.config, images=images)).crf_loss.backward()
        for layer, sampler in enumerate(samplers(model, "text")):
            assert gradient_size(sampler.decision_mlp) > 0, f"text sampler of BGA layer {layer + 1}"
            assert gradient_size(sampler.local_mlp) > 0 and gradient_size(sampler.global_mlp) > 0
    # The visual samplers are trained by the generation losses (the text branch never reads real patches).
    model.zero_grad()
    model(**random_batch(model.config)).generation_loss.backward()
    assert all(gradient_size(sampler) > 0 for sampler in samplers(model, "visual"))


def test_soft_attention_masking_equals_the_hard_mask_and_passes_gradient_to_the_mask():
    torch.manual_seed(0)
    attention = GeneratorAttention(16, 4, dropout=0.0)
    queries, source = torch.randn(1, 5, 16), torch.randn(3, 7, 16)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0, 1], [1, 1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0, 0]], dtype=torch.float)
    mask.requires_grad_(True)
    soft = attention.train().attend(attention.query(queries), source, mask)
    with torch.no_grad():
        hard = attention.eval().attend(attention.query(queries), source, mask)
        # The paper's M: 0 for kept, -inf for dropped, added to the scores (Eq. 3), computed by hand.
        q = attention.query(queries).view(1, 5, 4, 4).transpose(1, 2)
        k = attention.key(source).view(3, 7, 4, 4).transpose(1, 2)
        v = attention.value(source).view(3, 7, 4, 4).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / 2.0 + torch.where(mask > 0, 0.0, float("-inf"))[:, None, None, :]
        by_hand = attention.output((scores.softmax(-1) @ v).transpose(1, 2).reshape(3, 5, 16))
    torch.testing.assert_close(soft, hard, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(hard, by_hand, atol=1e-6, rtol=1e-5)
    soft.square().sum().backward()
    assert (mask.grad[0, [1, 4, 5]] != 0).all(), "dropped tokens get a gradient: keeping them would change the output"
    assert (mask.grad != 0).sum() > 10


def test_generator_equals_a_torch_decoder_block_and_has_the_papers_size():
    """Our decoder block against torch's own nn.TransformerDecoderLayer (post-norm, GELU), weights copied."""
    torch.manual_seed(0)
    config = tiny_config(generator_intermediate_size=40)
    generator = CrossModalGenerator(32, 10, 4, config).eval()
    torch.nn.init.normal_(generator.queries)
    reference = torch.nn.TransformerDecoderLayer(32, 4, 40, dropout=0.0, activation="gelu", batch_first=True).eval()
    for theirs, ours in (
        (reference.self_attn, generator.self_attention),
        (reference.multihead_attn, generator.cross_attention),
    ):
        theirs.in_proj_weight.data = torch.cat([ours.query.weight, ours.key.weight, ours.value.weight]).detach()
        theirs.in_proj_bias.data = torch.cat([ours.query.bias, ours.key.bias, ours.value.bias]).detach()
        theirs.out_proj.load_state_dict(ours.output.state_dict())
    reference.linear1.load_state_dict(generator.feed_forward[0].state_dict())
    reference.linear2.load_state_dict(generator.feed_forward[3].state_dict())
    for name, norm in (
        ("norm1", "self_attention_norm"),
        ("norm2", "cross_attention_norm"),
        ("norm3", "feed_forward_norm"),
    ):
        getattr(reference, name).load_state_dict(getattr(generator, norm).state_dict())
    source, keep = torch.randn(3, 7, 32), torch.rand(3, 7) > 0.4
    keep[:, 0] = True
    with torch.no_grad():
        ours = generator(source, keep.float(), generator.query_states())
        theirs = reference(generator.queries.expand(3, -1, -1), source, memory_key_padding_mask=~keep)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)

    full = CrossModalGenerator(768, 200, 12, BgaMnerConfig())
    torch_block = torch.nn.TransformerDecoderLayer(768, 12, 2048, batch_first=True)
    assert sum(p.numel() for p in full.parameters()) == 7_877_888 + 200 * 768
    assert sum(p.numel() for p in torch_block.parameters()) == 7_877_888


def test_generated_text_features_do_not_depend_on_the_batch_length():
    """G_v2t's queries self-attend over all max_text_length queries, then are cut to the batch's length: the
    first 6 generated text tokens are the same whether the batch is 6 or 14 sub-words long."""
    torch.manual_seed(0)
    model = BgaMnerForTokenClassification(tiny_config()).eval()
    generator = model.generator
    torch.nn.init.normal_(generator.image_to_text.queries)  # distinct queries, as after training
    visual, mask = torch.randn(2, model.config.num_visual_tokens, 32), torch.ones(2, model.config.num_visual_tokens)
    with torch.no_grad():
        queries = generator.query_states(with_text=True)
        short = generator.generate_text(visual, mask, queries, 6)
        long = generator.generate_text(visual, mask, queries, 14)
        # What the self-attention over the batch's first 6 queries alone would give instead (the old behaviour):
        first_six = generator.image_to_text.queries[:6].unsqueeze(0)
        attention = generator.image_to_text.self_attention
        states = generator.image_to_text.self_attention_norm(
            first_six + attention.attend(attention.query(first_six), first_six)
        )
        cut = generator.image_to_text(visual, mask, (states, generator.image_to_text.cross_attention.query(states)))
    torch.testing.assert_close(long[:, :6], short, atol=1e-6, rtol=1e-6)
    assert (cut - short).abs().max() > 1e-3


def test_a_tweet_predicts_the_same_alone_and_padded_in_a_longer_batch():
    torch.manual_seed(0)
    config = tiny_config(inference_visual="real", num_bga_layers=2)  # "real": the text reads the visual branch
    model = BgaMnerForTokenClassification(config).eval()
    padded = random_batch(config, batch=3, length=14, seed=3)
    short = {k: v[:1] for k, v in random_batch(config, batch=2, length=6, seed=4).items()}  # row 0: no padding
    padded["input_ids"][0] = 0
    padded["input_ids"][0, :6] = short["input_ids"][0]
    padded["attention_mask"][0] = 0
    padded["attention_mask"][0, :6] = 1
    padded["pixel_values"][0] = short["pixel_values"][0]
    padded["pixel_mask"][0] = short["pixel_mask"][0]
    with torch.no_grad():
        alone = model(**{k: v for k, v in short.items() if k != "labels"}, output_sampler_masks=True)
        in_batch = model(**{k: v for k, v in padded.items() if k != "labels"}, output_sampler_masks=True)
    torch.testing.assert_close(in_batch.logits[0, :6], alone.logits[0], atol=1e-6, rtol=1e-6)
    for a, b in zip(alone.text_sampler_masks, in_batch.text_sampler_masks, strict=True):
        assert torch.equal(a[0], b[0, :6])


def test_a_text_longer_than_the_text_queries_is_a_clear_error():
    torch.manual_seed(0)
    model = BgaMnerForTokenClassification(tiny_config(max_text_length=8)).train()
    with pytest.raises(ValueError, match="12 sub-words is longer than the image2text generator's 8 text queries"):
        model(**random_batch(model.config, length=12))
    model.eval()  # inference reads no image: no limit but the position embeddings'
    assert model(input_ids=random_batch(model.config, length=12)["input_ids"]).predictions.shape == (3, 12)


@pytest.mark.parametrize("rule", ["expected_count", "threshold"])
def test_inference_masks_equal_an_independently_computed_mask(rule):
    torch.manual_seed(0)
    model = BgaMnerForTokenClassification(tiny_config(sampler_inference_rule=rule, sampler_keep_threshold=0.5)).eval()
    sampler = samplers(model, "text")[0]
    for linear in (sampler.local_mlp[0], sampler.decision_mlp[0], sampler.decision_mlp[2], sampler.decision_mlp[4]):
        torch.nn.init.normal_(linear.weight, std=0.3)  # spread the keep probabilities
    hidden = torch.randn(3, 9, 32)
    valid = torch.ones(3, 9, dtype=torch.bool)
    valid[2, 6:] = False
    with torch.no_grad():
        _, probability = sampler.keep_probability(hidden, valid.float())
        mask = sampler(hidden, valid, valid.float())
    differ = False
    for row in range(3):
        tokens = [i for i in range(1, 9) if valid[row, i]]  # position 0 is always kept, padding never
        p = {i: probability[row, i].item() for i in tokens}
        by_threshold = {i for i in tokens if p[i] > 0.5}
        by_count = set(sorted(tokens, key=lambda i: -p[i])[: round(sum(p.values()))])  # the round(sum p) most probable
        kept = by_threshold if rule == "threshold" else by_count
        assert mask[row].tolist() == [1.0 if i == 0 or i in kept else 0.0 for i in range(9)], row
        differ |= by_threshold != by_count
    assert differ, "the two rules must disagree somewhere for this test to tell them apart"
    # The probabilities the rules read are those of keeping: training's Gumbel samples keep each token that often.
    with torch.no_grad():
        frequency = sampler.train()(hidden.repeat(2000, 1, 1), valid.repeat(2000, 1), valid.float().repeat(2000, 1))
    frequency = frequency.view(2000, 3, 9).mean(0)
    candidates = valid.clone()
    candidates[:, 0] = False
    torch.testing.assert_close(frequency[candidates], probability[candidates], atol=0.04, rtol=0.0)


def test_training_masks_are_hard_and_keep_the_first_token_and_no_padding():
    torch.manual_seed(0)
    model = BgaMnerForTokenClassification(tiny_config()).train()
    batch = random_batch(model.config, length=12)
    out = model(**batch, output_sampler_masks=True)
    for mask in out.text_sampler_masks:
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert (mask[:, 0] == 1).all() and (mask[batch["attention_mask"] == 0] == 0).all()
        assert 0 < mask[:, 1:].sum() < batch["attention_mask"][:, 1:].sum()


@pytest.mark.parametrize("cumulative", [False, True])
def test_samplers_keep_more_than_the_first_token_after_a_short_training_run(cumulative):
    """200 steps on a fixed batch of 4 tweets with images (lr 1e-3): before the fix both samplers kept only
    [CLS] (keep ratio 0) by step 200; now every layer keeps near the target share in training and at inference."""
    torch.manual_seed(0)
    model = BgaMnerForTokenClassification(tiny_config(cumulative_sampler_masks=cumulative)).train()
    batch = random_batch(model.config, batch=4, length=12, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(200):
        out = model(**batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.crf_loss.item())
    assert losses[-1] < 0.1 * losses[0]  # the task is learned meanwhile
    assert out.text_keep_ratio.min() > 0.25 and out.visual_keep_ratio.min() > 0.25, (
        out.text_keep_ratio,
        out.visual_keep_ratio,
    )
    model.eval()
    with torch.no_grad():
        evaluated = model(**{k: v for k, v in batch.items() if not k.startswith("pixel")})
    assert evaluated.text_keep_ratio.min() > 0.25 and evaluated.text_keep_ratio.max() < 0.9
