"""Does image loading keep up with training? Tweets per second of the data pipeline that `run_mner.py` uses
(`BgaMnerDataCollator`: pad the text, decode and resize the global image and three crops per tweet, CLIP's PIL
image processor to 224 x 224) at each `--dataloader_num_workers`, beside one training step's rate at batch 16.

    python bench/loading.py                        # 0, 1, 2 workers; step rates from bench/results/speed_*.json
    python bench/loading.py --workers 0 2 4 8 --batches 40

Images: synthetic, written once into a temporary folder: a 1024 x 768 JPEG (quality 90) per tweet, as Twitter
serves them, and three 256 x 256 PNG crops (what prepare_crops.py writes). Texts: the Twitter2015 training
tweets (synthetic words when ../shared is absent). Prints numbers only; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from speed import tokenizer_for  # noqa: E402  (the BERT-base-sized vocabulary built from the texts)

from processing_bga_mner import BgaMnerDataCollator, BgaMnerProcessor  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "twitter2015" / "train.txt"


def texts(count: int) -> list[list[str]]:
    if DATA.is_file():
        from twitter_mner import read_conll

        return [example.tokens for example in read_conll(DATA)][:count]
    return [[f"word{i}" for i in range(5 + n % 30)] for n in range(count)]


def write_images(folder: Path, count: int) -> list[tuple[str, list[str]]]:
    """`count` distinct (global JPEG, three PNG crops) sets of photo-like noise over gradients."""
    rng = np.random.default_rng(0)
    sets = []
    for i in range(count):
        y, x = np.mgrid[0:768, 0:1024]
        base = np.stack([x / 4 + 40 * i, y / 3, (x + y) / 7], -1) % 256
        pixels = (base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
        image = folder / f"{i}.jpg"
        Image.fromarray(pixels).save(image, quality=90)
        crops = []
        for j in range(3):
            crop = folder / f"{i}_crop{j}.png"
            Image.fromarray(pixels[200 * j : 200 * j + 256, 300 * j : 300 * j + 256]).save(crop)
            crops.append(str(crop))
        sets.append((str(image), crops))
    return sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=20, help="Batches of 16 tweets timed per worker count.")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()
    from transformers import CLIPImageProcessorPil

    words = texts(16 * args.batches)
    processor = BgaMnerProcessor(CLIPImageProcessorPil(), tokenizer_for(words), max_length=128, num_object_crops=3)
    results = {"torch_threads": torch.get_num_threads(), "tweets_per_second": {}}
    with tempfile.TemporaryDirectory() as folder:
        images = write_images(Path(folder), 64)
        rows = processor.encode_words(words)
        for i, row in enumerate(rows):
            row["image"], row["crops"] = images[i % len(images)]
        for workers in args.workers:
            loader = DataLoader(rows, batch_size=16, collate_fn=BgaMnerDataCollator(processor), num_workers=workers)
            start = time.perf_counter()
            count = 0
            for batch in loader:
                count += int(batch["pixel_mask"][:, 0].sum())
            rate = count / (time.perf_counter() - start)  # worker start-up included, as in an epoch
            results["tweets_per_second"][workers] = rate
            print(f"{workers} workers: {rate:.1f} tweets/s (4 images each)", flush=True)
    for path in sorted((ROOT / "bench" / "results").glob("speed_*.json")):  # the training step rates measured
        for row in json.loads(path.read_text())["results"]:
            if row.get("case") == "bga_train":
                step = row["seconds_per_step_batch16"]
                print(
                    f"{path.name} ({row['precision']}): BGA-MNER training consumes {16 / step:.1f} tweets/s "
                    f"({step:.2f} s per step of 16)"
                )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
