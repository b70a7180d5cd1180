"""Speed and memory of BGA-MNER against BERT-CRF and plain BERT, same text encoder (BERT-base sizes,
random weights: speed does not depend on them).

    python bench/speed.py                     # CPU, float32, everything
    python bench/speed.py --device cuda --dtype bfloat16
    python bench/speed.py --cases bga_infer bert_crf_infer --sentences 64

Texts: the Twitter2015 test tweets from ../shared/data (same-length synthetic text when absent),
tokenized with a BERT-base-sized WordPiece vocabulary built from the corpus itself (no download).
Each case runs in its own process, so that its peak memory (max RSS on CPU, max allocated on GPU) is
its own. Prints numbers only; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configuration_bga_mner import BgaMnerConfig  # noqa: E402
from modeling_bga_mner import BgaMnerForTokenClassification  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "twitter2015" / "test.txt"
CASES = {
    "bga_infer": "BGA-MNER, image-free inference",
    "bga_n50_infer": "BGA-MNER with num_object_crops=0 (N_v = 50), inference",
    "bert_crf_infer": "BERT-CRF (BGA-MNER with use_generation=False), inference",
    "bert_infer": "transformers BertForTokenClassification (no CRF), inference",
    "bga_train": "BGA-MNER, one optimizer step, 4 images per tweet (global + 3 crops)",
    "bert_crf_train": "BERT-CRF, one optimizer step, text only",
}


def tweets(limit: int) -> list[list[str]]:
    """Word lists: the Twitter2015 test tweets, or synthetic ones of the same length distribution."""
    if DATA.is_file():
        from twitter_mner import read_conll

        return [example.tokens for example in read_conll(DATA)][:limit]
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 35, (limit,), generator=generator).tolist()
    return [[f"word{i % 97}" for i in range(n)] for n in lengths]


def tokenizer_for(texts: list[list[str]]):
    """A WordPiece tokenizer whose vocabulary covers the texts' words and characters (30,522 entries,
    as BERT-base), so that sequence lengths are realistic without a download."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted({w.lower() for text in texts for w in text})
    characters = sorted({c for w in words for c in w})
    vocab += characters + ["##" + c for c in characters] + words[:25000]
    vocab += [f"[unused{i}]" for i in range(30522 - len(vocab))]
    return BertTokenizerFast(vocab={piece: i for i, piece in enumerate(vocab)})


def build(case: str, dtype: torch.dtype):
    config = BgaMnerConfig(
        num_object_crops=0 if case == "bga_n50_infer" else 3,
        use_generation=not case.startswith("bert_crf"),
    )
    if case == "bert_infer":
        from transformers import BertConfig, BertForTokenClassification

        return BertForTokenClassification(BertConfig(num_labels=9)), config
    return BgaMnerForTokenClassification(config), config


def run_case(case: str, args) -> dict:
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    texts = tweets(max(args.sentences, 32 * args.batches))
    tokenizer = tokenizer_for(texts)
    model, config = build(case, dtype)
    model.to(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def encode(batch: list[list[str]]):
        encoding = tokenizer(batch, is_split_into_words=True, padding=True, return_tensors="pt")
        return {k: v.to(device) for k, v in encoding.items()}

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    result = {"case": case, "what": CASES[case]}
    if case.endswith("_infer"):
        model.eval()
        with torch.inference_mode(), autocast:
            for text in texts[:5]:  # warm-up
                model(**encode([text]))
            latencies = []
            for text in texts[: args.sentences]:
                inputs = encode([text])
                synchronize()
                start = time.perf_counter()
                model(**inputs)
                synchronize()
                latencies.append(time.perf_counter() - start)
            batches = [encode(texts[i * 32 : (i + 1) * 32]) for i in range(args.batches)]
            synchronize()
            start = time.perf_counter()
            for inputs in batches:
                model(**inputs)
            synchronize()
            elapsed = time.perf_counter() - start
            latencies.sort()
            result.update(
                batch1_median_ms=1000 * statistics.median(latencies),
                batch1_p90_ms=1000 * latencies[int(0.9 * (len(latencies) - 1))],
                batch32_sentences_per_s=32 * args.batches / elapsed,
            )
            if hasattr(model, "crf"):  # the CRF's share: Viterbi on the batch's emissions vs the whole forward
                shares = []
                for inputs in batches:
                    logits = model(**inputs).logits.float()
                    mask = inputs["attention_mask"].bool()
                    start = time.perf_counter()
                    model.crf.viterbi_tags(logits, mask)
                    synchronize()
                    shares.append(time.perf_counter() - start)
                result["crf_share_of_batch32"] = sum(shares) / elapsed
    else:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        batch = texts[:16]
        inputs = encode(batch)
        inputs["labels"] = torch.where(inputs["attention_mask"].bool(), 0, -100)
        inputs["labels"][:, 0] = -100
        if case == "bga_train":
            size = config.vision_config.image_size
            inputs["pixel_values"] = torch.randn(16, config.num_image_slots, 3, size, size, device=device)
        times = []
        for _ in range(args.train_steps + 1):  # the first step warms up
            synchronize()
            start = time.perf_counter()
            with autocast:
                loss = model(**inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            synchronize()
            times.append(time.perf_counter() - start)
        result["seconds_per_step_batch16"] = statistics.median(times[1:])
    if device.type == "cuda":
        result["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--sentences", type=int, default=100, help="Batch-1 latency over this many tweets.")
    parser.add_argument("--batches", type=int, default=5, help="Batch-32 throughput over this many batches.")
    parser.add_argument("--train_steps", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case in this process
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_case(args.one, args)))
        return
    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    if args.device == "cuda":
        machine = torch.cuda.get_device_name() + ", " + machine
    texts = "Twitter2015 test" if DATA.is_file() else "synthetic"
    print(f"# {machine}; device {args.device}, {args.dtype}; texts: {texts}")
    results = {}
    for case in args.cases:
        command = [sys.executable, __file__, "--one", case, *sys.argv[1:]]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[case] = json.loads(output.strip().splitlines()[-1])
        print(json.dumps(results[case]), flush=True)
    infer = {k: v for k, v in results.items() if k.endswith("_infer")}
    for name in ("bert_crf_infer", "bert_infer"):
        if "bga_infer" in infer and name in infer:
            bga, other = infer["bga_infer"], infer[name]
            print(
                f"BGA / {name[:-6]}: batch-1 median {bga['batch1_median_ms'] / other['batch1_median_ms']:.2f}x, "
                f"batch-32 time {other['batch32_sentences_per_s'] / bga['batch32_sentences_per_s']:.2f}x"
            )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2))


if __name__ == "__main__":
    main()
