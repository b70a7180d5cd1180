"""visualize_samplers.py (the paper's Fig. 4): the words and patches it reports are the model's own sampler masks."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from tiny import tiny_config, tiny_processor

from modeling_bga_mner import BgaMnerForTokenClassification
from processing_bga_mner import split_words
from visualize_samplers import main, render_text

IMAGE = Path(__file__).resolve().parent / "fixtures" / "tiny-corpus" / "images" / "1.jpg"
TWEETS = ["Obama visits New York with Apple CEO Tim Cook", "RT @nba : LeBron James wins the game in Miami"]


def test_the_drawn_masks_are_the_models_inference_masks(tmp_path):
    processor = tiny_processor(tmp_path / "tokenizer")
    torch.manual_seed(0)
    model = BgaMnerForTokenClassification(tiny_config(text={"vocab_size": len(processor.tokenizer)})).eval()
    for layer in model.bga_layers:  # samplers with confident, varied decisions
        for sampler in (layer.text_sampler, layer.visual_sampler):
            for linear in (sampler.local_mlp[0], sampler.decision_mlp[0], sampler.decision_mlp[2]):
                torch.nn.init.normal_(linear.weight, std=0.3)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")

    records = main(
        [
            "--model",
            str(tmp_path / "model"),
            "--text",
            *TWEETS,
            "--image",
            str(IMAGE),
            "-",
            "--output",
            str(tmp_path / "fig4.png"),
        ]
    )

    encoding = processor(text=TWEETS, images=[str(IMAGE), None])
    inputs = {k: encoding[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        text_masks = model(**inputs, output_sampler_masks=True).text_sampler_masks
        model.config.inference_visual = "real"
        visual_masks = model(
            **inputs,
            pixel_values=encoding["pixel_values"],
            pixel_mask=encoding["pixel_mask"],
            output_sampler_masks=True,
        ).visual_sampler_masks
    first = encoding["word_index"] >= 0  # the first sub-word of each word
    for row, record in enumerate(records):
        assert record["words"] == split_words(TWEETS[row])[0]
        for layer, mask in enumerate(text_masks):
            assert record["text_kept"][layer] == mask[row][first[row]].bool().tolist()
    assert any(not all(kept) for kept in records[0]["text_kept"]) and any(any(k) for k in records[0]["text_kept"])
    # Tweet 0 has the image: its 2 x 2 patch grid per layer is the visual mask after the class token.
    for layer, mask in enumerate(visual_masks):
        assert records[0]["patches_kept"][layer] == mask[0, 1:5].view(2, 2).bool().tolist()
    assert records[1]["patches_kept"] is None
    assert "·" in render_text(records[0]) and "patches kept" in render_text(records[0])

    with Image.open(tmp_path / "fig4.png") as png:
        assert png.format == "PNG" and png.width > 300 and png.height > 200
