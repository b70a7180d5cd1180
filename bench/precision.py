"""F1 of a trained model in each inference precision that `predict_mner.py` offers (float32, `--quantize int8`,
`--dtype bfloat16`), on the real Twitter test and dev text.

    pip install -r bench/requirements.txt
    python bench/precision.py --corpus twitter2017                       # trains as bench/accuracy.py, then scores
    python bench/precision.py --corpus twitter2017 --model outputs/bga   # scores a trained folder

Without `--model`, BGA-MNER is trained exactly as `bench/accuracy.py` trains it (all-MiniLM-L6-v2, 3 epochs,
best epoch by dev F1) into `--work_dir`. Each precision predicts through `predict_mner.predict` (batch 32, the
CRF's Viterbi path) and is scored with `run_mner.compute_metrics`. Prints numbers only; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from accuracy import DATA, train_bga  # noqa: E402

from predict_mner import Example, load_model, predict, prepare_for_inference  # noqa: E402
from processing_bga_mner import join_words  # noqa: E402
from run_mner import compute_metrics  # noqa: E402
from twitter_mner import load_mner_dataset  # noqa: E402

PRECISIONS = {"float32": ("float32", "none"), "int8": ("float32", "int8"), "bfloat16": ("bfloat16", "none")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="twitter2017", choices=["twitter2015", "twitter2017"])
    parser.add_argument("--model", type=Path, help="A trained folder; without it, one is trained into --work_dir.")
    parser.add_argument("--work_dir", type=Path, default=Path("precision-work"))
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "precision.json")
    args = parser.parse_args()
    if args.model is None:
        args.model = args.work_dir / f"bga-{args.corpus}"
        if not (args.model / "model.safetensors").is_file():
            settings = argparse.Namespace(epochs=3, lr=5e-5, crf_lr=5e-3)
            print(json.dumps({"trained": train_bga(args.corpus, settings, args.work_dir)["test"]["overall"]}))
    data = load_mner_dataset(DATA / args.corpus, args.corpus)
    results = {"model": str(args.model), "corpus": args.corpus, "torch_threads": torch.get_num_threads()}
    for name in args.precisions:
        model, processor = load_model(str(args.model), "cpu")
        model = prepare_for_inference(model, *PRECISIONS[name])
        row = {}
        for split in ("validation", "test"):
            names = data[split].features["ner_tags"].feature.names
            gold = [[names[t] for t in tags] for tags in data[split]["ner_tags"]]
            examples = [Example(words, *join_words(words)) for words in data[split]["tokens"]]
            start = time.perf_counter()
            tags, _ = predict(model, processor, examples, batch_size=32)
            row[split] = {"seconds": time.perf_counter() - start, **compute_metrics(gold, tags)["overall"]}
        results[name] = row
        print(json.dumps({name: row}), flush=True)
    print("\n| precision | dev F1 | test F1 | test F1 change | test P | test R | test set time (batch 32) |")
    print("|---|---|---|---|---|---|---|")
    base = results.get("float32", {}).get("test", {}).get("f1")
    for name in args.precisions:
        dev, test = results[name]["validation"], results[name]["test"]
        change = f"{100 * (test['f1'] - base):+.2f}" if base is not None else "-"
        print(
            f"| {name} | {100 * dev['f1']:.2f} | {100 * test['f1']:.2f} | {change} | {100 * test['precision']:.2f} "
            f"| {100 * test['recall']:.2f} | {test['seconds']:.1f} s |"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
