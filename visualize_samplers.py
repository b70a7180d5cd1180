"""What the Stage-refined Context Samplers keep, per BGA layer (the paper's Fig. 4), as text and as a PNG.

    python visualize_samplers.py --model outputs/bga-mner --text "RT @nba : LeBron James wins MVP" \
        --image photo.jpg --output fig4.png

For each tweet: the words each BGA layer's text sampler keeps for generation (a word counts as kept when its
first sub-word is), and, with an image, the patches of the global image its visual sampler keeps. The masks are
the inference masks (`config.sampler_inference_rule`); the text masks are those of text-only inference.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from modeling_bga_mner import BgaMnerForTokenClassification
from processing_bga_mner import BgaMnerProcessor, split_words


@torch.no_grad()
def sampler_keep(
    model: BgaMnerForTokenClassification,
    processor: BgaMnerProcessor,
    texts: Sequence[str],
    images: Sequence[str | Image.Image | None] | None = None,
) -> list[dict]:
    """Per tweet: `words`, `text_kept` (per BGA layer, a bool per word) and, for a tweet with an image,
    `patches_kept` (per BGA layer, a (side, side) bool grid over the global image's patches), else None."""
    config = model.config
    if not config.use_generation or not config.use_sampler:
        raise ValueError("This model has no samplers (use_generation=False or use_sampler=False).")
    model.eval()
    encoding = processor(text=list(texts))
    inputs = {k: encoding[k].to(model.device) for k in ("input_ids", "attention_mask", "token_type_ids")}
    text_masks = model(**inputs, output_sampler_masks=True).text_sampler_masks
    records = [
        {"words": split_words(text)[0], "text_kept": [[] for _ in text_masks], "patches_kept": None} for text in texts
    ]
    for layer, mask in enumerate(text_masks):
        for record, kept in zip(records, processor.word_values(mask.cpu(), encoding, missing=0.0), strict=True):
            record["text_kept"][layer] = [bool(k) for k in kept]

    if images is not None and any(image is not None for image in images) and not config.text_only:
        pixel_values, pixel_mask = processor.load_images(images)
        rows = [encoding["example_index"].tolist().index(i) for i in range(len(texts))]  # first window of each
        visual_inputs = {k: v[rows] for k, v in inputs.items()}
        previous, config.inference_visual = config.inference_visual, "real"  # the visual branch runs at inference
        try:
            out = model(
                **visual_inputs,
                pixel_values=pixel_values.to(model.device),
                pixel_mask=pixel_mask.to(model.device),
                output_sampler_masks=True,
            )
        finally:
            config.inference_visual = previous
        side = config.vision_config.image_size // config.vision_config.patch_size
        with_image = pixel_mask[:, 0].nonzero().squeeze(1).tolist()
        for position, example in enumerate(with_image):
            records[example]["patches_kept"] = [
                mask[position, 1 : 1 + side * side].view(side, side).bool().cpu().tolist()
                for mask in out.visual_sampler_masks
            ]
    return records


def render_text(record: dict) -> str:
    """One line per BGA layer: kept words as they are, dropped ones as '·'."""
    lines = []
    for layer, kept in enumerate(record["text_kept"], start=1):
        words = [word if keep else "·" * len(word) for word, keep in zip(record["words"], kept, strict=True)]
        line = f"layer {layer:2d}  text: {' '.join(words)}"
        if record["patches_kept"] is not None:
            grid = record["patches_kept"][layer - 1]
            kept_patches = sum(map(sum, grid))
            line += f"   | patches kept: {kept_patches}/{len(grid) ** 2}"
        lines.append(line)
    return "\n".join(lines)


def draw(records: list[dict], images: Sequence[str | Image.Image | None] | None, path: str | Path) -> None:
    """A PNG: per tweet, a layers x words grid (dark = kept) and, with an image, one panel per BGA layer with
    the dropped patches greyed out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = len(records[0]["text_kept"])
    image_panels = max((layers if r["patches_kept"] is not None else 0) for r in records)
    columns = 1 + image_panels
    figure, axes = plt.subplots(
        len(records),
        columns,
        figsize=(max(6.0, 0.6 * max(len(r["words"]) for r in records)) + 1.6 * image_panels, 0.4 * layers + 1.8),
        squeeze=False,
        gridspec_kw={"width_ratios": [max(4, len(records[0]["words"]) // 2)] + [1] * image_panels},
    )
    for row, record in enumerate(records):
        ax = axes[row][0]
        kept = np.array(record["text_kept"], dtype=float)
        ax.imshow(kept, cmap="Blues", vmin=0, vmax=1.3, aspect="auto")
        ax.set_xticks(range(len(record["words"])), record["words"], rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(layers), [f"layer {i}" for i in range(1, layers + 1)], fontsize=8)
        ax.set_title("text: kept words (dark)", fontsize=9)
        for column in range(1, columns):
            axes[row][column].axis("off")
        if record["patches_kept"] is None:
            continue
        image = images[row]
        image = (image if isinstance(image, Image.Image) else Image.open(image)).convert("RGB").resize((224, 224))
        pixels = np.asarray(image, dtype=float) / 255.0
        for layer, grid in enumerate(record["patches_kept"]):
            cells = np.kron(np.array(grid, dtype=float), np.ones((224 // len(grid), 224 // len(grid))))
            cells = np.pad(cells, ((0, 224 - cells.shape[0]), (0, 224 - cells.shape[1])), mode="edge")
            shaded = pixels * (0.25 + 0.75 * cells[..., None])
            axes[row][1 + layer].imshow(shaded)
            axes[row][1 + layer].set_title(f"layer {layer + 1}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--model", required=True, help="A trained BGA-MNER folder (or Hub id).")
    parser.add_argument("--text", nargs="+", required=True, help="One or more tweets.")
    parser.add_argument("--image", nargs="*", default=None, help="An image per tweet ('-' for none).")
    parser.add_argument("--output", type=Path, default=None, help="Where to write the PNG.")
    args = parser.parse_args(argv)
    images = None
    if args.image is not None:
        if len(args.image) != len(args.text):
            parser.error(f"--image: one per tweet ('-' for none): {len(args.text)} tweets, {len(args.image)} images")
        images = [None if image == "-" else image for image in args.image]
        for image in images:
            if image is not None and not Path(image).is_file():
                parser.error(f"--image: no such file: {image}")
    try:
        model = BgaMnerForTokenClassification.from_pretrained(args.model)
        processor = BgaMnerProcessor.from_pretrained(args.model, trust_remote_code=True)
    except OSError as error:
        sys.exit(f"Cannot load the model {args.model!r}: {error}")
    records = sampler_keep(model, processor, args.text, images)
    for text, record in zip(args.text, records, strict=True):
        print(text)
        print(render_text(record))
        print()
    if args.output is not None:
        draw(records, images, args.output)
        print(f"Wrote {args.output}")
    return records


if __name__ == "__main__":
    main()
