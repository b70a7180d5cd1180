"""Speed, FLOPs and memory of BGA-MNER against BERT-CRF and plain BERT, same text encoder (BERT-base sizes,
random weights: speed does not depend on them), in each inference precision that `predict_mner.py` offers.

    python bench/speed.py                                    # CPU: float32, int8, bfloat16; training steps
    python bench/speed.py --cases bga_infer bert_crf_infer --sentences 150 --precisions float32 int8
    python bench/speed.py --device cuda --precisions float32 bfloat16 --train_dtype bfloat16   # bench/gpu.sh

Texts: a fixed random sample of the Twitter2015 test tweets from ../shared/data (synthetic text of the same
length range when absent), tokenized with a BERT-base-sized WordPiece vocabulary built from the corpus (no
download). Batch-1 latency is timed per tweet (the median of `--repeats` runs); tweets are then grouped by
sub-word length (shortest, middle and longest third) and each row's per-tweet time is divided by float32
BERT-CRF's on the same tweet: the table gives the median ratio and its 10th-90th percentile spread. FLOPs are
counted (torch.utils.flop_counter, matrix products and attention) on the float32 model; int8 and bfloat16 rows
do the same arithmetic in another number format (counted after the timing, so not in the peak memory). Each
(case, precision) runs in its own process, so that its peak memory (max RSS on CPU, max allocated on GPU) is
its own. Prints numbers only; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configuration_bga_mner import BgaMnerConfig  # noqa: E402
from modeling_bga_mner import BgaMnerForTokenClassification  # noqa: E402
from predict_mner import prepare_for_inference  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "twitter2015" / "test.txt"
CASES = {
    "bga_infer": "BGA-MNER, image-free inference (N_v = 200)",
    "bga_n50_infer": "BGA-MNER with num_object_crops=0 (N_v = 50), inference",
    "bert_crf_infer": "BERT-CRF (BGA-MNER with use_generation=False), inference",
    "bert_infer": "transformers BertForTokenClassification (no CRF), inference",
    "bga_train": "BGA-MNER, one optimizer step, 4 images per tweet (global + 3 crops)",
    "bert_crf_train": "BERT-CRF, one optimizer step, text only",
}
PRECISIONS = ("float32", "int8", "bfloat16")
BASELINE = ("bert_crf_infer", "float32")
GROUPS = ("short", "middle", "long")


def tweets(count: int) -> list[list[str]]:
    """Word lists: a fixed random sample of the Twitter2015 test tweets, or synthetic ones of 5-35 words."""
    if DATA.is_file():
        from twitter_mner import read_conll

        texts = [example.tokens for example in read_conll(DATA)]
        return random.Random(0).sample(texts, min(count, len(texts)))
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 35, (count,), generator=generator).tolist()
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


def build(case: str):
    config = BgaMnerConfig(
        num_object_crops=0 if case == "bga_n50_infer" else 3,
        use_generation=not case.startswith("bert_crf"),
    )
    if case == "bert_infer":
        from transformers import BertConfig, BertForTokenClassification

        return BertForTokenClassification(BertConfig(num_labels=9)), config
    return BgaMnerForTokenClassification(config), config


def count_flops(model, inputs: dict) -> int:
    with FlopCounterMode(display=False) as counter:  # with autograd on: its module hooks need it
        model(**inputs)
    return counter.get_total_flops()


def run_case(case: str, precision: str, args) -> dict:
    torch.manual_seed(0)
    device = torch.device(args.device)
    texts = tweets(max(args.sentences, 32 * args.batches))
    tokenizer = tokenizer_for(texts)
    model, config = build(case)
    model.to(device)

    def encode(batch: list[list[str]]):
        encoding = tokenizer(batch, is_split_into_words=True, padding=True, return_tensors="pt")
        return {k: v.to(device) for k, v in encoding.items()}

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    result = {"case": case, "what": CASES[case]}
    if case.endswith("_infer"):
        result["precision"] = precision
        singles = [encode([text]) for text in texts[: args.sentences]]
        batches = [encode(texts[i * 32 : (i + 1) * 32]) for i in range(args.batches)]
        model.eval()
        result["subwords"] = [int(inputs["input_ids"].shape[1]) for inputs in singles]
        float_model = model if precision == "float32" else None  # (int8 makes a copy: the original is freed)
        with torch.inference_mode():
            model = prepare_for_inference(model, *(("float32", "int8") if precision == "int8" else (precision, "none")))
            for inputs in singles[:5]:  # warm-up
                model(**inputs)
            latencies = []
            for inputs in singles:
                runs = []
                for _ in range(args.repeats):
                    synchronize()
                    start = time.perf_counter()
                    model(**inputs)
                    synchronize()
                    runs.append(time.perf_counter() - start)
                latencies.append(statistics.median(runs))
            synchronize()
            start = time.perf_counter()
            for inputs in batches:
                model(**inputs)
            synchronize()
            elapsed = time.perf_counter() - start
        result.update(latencies_s=latencies, batch32_s=elapsed, batch32_sentences=32 * args.batches)
        result.update(peak_memory(device))
        if precision == "float32":  # the arithmetic (after the peak memory: counting keeps autograd's graph)
            result["flops"] = [count_flops(float_model, inputs) for inputs in singles]
            result["batch32_flops"] = sum(count_flops(float_model, inputs) for inputs in batches)
    else:
        autocast = torch.autocast(device.type, dtype=getattr(torch, args.train_dtype))
        autocast = autocast if args.train_dtype != "float32" else torch.autocast(device.type, enabled=False)
        result["precision"] = f"{args.train_dtype} autocast" if args.train_dtype != "float32" else "float32"
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        inputs = encode(texts[:16])
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
        result.update(peak_memory(device))
    return result


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20}
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[round(q * (len(ordered) - 1))]


def report(results: dict[tuple[str, str], dict]) -> None:
    """The tables: one row per inference (case, precision), then the ratios by tweet length."""
    if not any("latencies_s" in r for r in results.values()):
        return
    flops = {case: r["flops"] for (case, _), r in results.items() if "flops" in r}
    batch_flops = {case: r["batch32_flops"] for (case, _), r in results.items() if "batch32_flops" in r}
    base = results.get(BASELINE)
    print(
        "\n| case | precision | batch-1 median | p90 | GFLOP / tweet | GFLOP/s (batch 1) | batch-32 sent/s "
        "| GFLOP/s (batch 32) | x BERT-CRF fp32 (batch 1, median per tweet) | x (batch 32) | peak memory |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (case, precision), r in results.items():
        if "latencies_s" not in r:
            continue
        latencies, tweet_flops = r["latencies_s"], flops.get(case)
        ratio = batch_ratio = "-"
        if base is not None:
            per_tweet = [a / b for a, b in zip(latencies, base["latencies_s"], strict=True)]
            ratio = f"{statistics.median(per_tweet):.2f}x"
            batch_ratio = f"{r['batch32_s'] / base['batch32_s']:.2f}x"
        gflop = f"{statistics.mean(tweet_flops) / 1e9:.2f}" if tweet_flops else "-"
        rate = f"{sum(tweet_flops) / sum(latencies) / 1e9:.1f}" if tweet_flops else "-"
        batch_rate = f"{batch_flops[case] / r['batch32_s'] / 1e9:.1f}" if case in batch_flops else "-"
        memory = r.get("peak_rss_mib", r.get("peak_memory_mib"))
        print(
            f"| {case} | {precision} | {1000 * statistics.median(latencies):.1f} ms "
            f"| {1000 * percentile(latencies, 0.9):.1f} ms | {gflop} | {rate} "
            f"| {r['batch32_sentences'] / r['batch32_s']:.2f} | {batch_rate} | {ratio} | {batch_ratio} "
            f"| {memory:.0f} MiB |"
        )
    if base is None:
        return
    subwords = base["subwords"]
    order = sorted(range(len(subwords)), key=lambda i: subwords[i])
    thirds = [order[: len(order) // 3], order[len(order) // 3 : 2 * len(order) // 3], order[2 * len(order) // 3 :]]
    print(
        "\nBy tweet length (batch 1): per-tweet time / float32 BERT-CRF's on the same tweet, median [p10-p90]; "
        "FLOP ratio likewise"
    )
    header = " | ".join(
        f"{name} ({min(subwords[i] for i in g)}-{max(subwords[i] for i in g)} sub-words, {len(g)} tweets)"
        for name, g in zip(GROUPS, thirds, strict=True)
    )
    print(f"| case | precision | {header} |")
    print("|---|---|" + "---|" * len(GROUPS))
    for (case, precision), r in results.items():
        if "latencies_s" not in r:
            continue
        cells = []
        for group in thirds:
            ratios = [r["latencies_s"][i] / base["latencies_s"][i] for i in group]
            cell = (
                f"{statistics.median(ratios):.2f}x [{percentile(ratios, 0.1):.2f}-{percentile(ratios, 0.9):.2f}], "
                f"{1000 * statistics.median(r['latencies_s'][i] for i in group):.0f} ms"
            )
            if case in flops and BASELINE[0] in flops:
                cell += f", FLOPs {statistics.median(flops[case][i] / flops[BASELINE[0]][i] for i in group):.2f}x"
            cells.append(cell)
        print(f"| {case} | {precision} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=list(PRECISIONS),
        choices=PRECISIONS,
        help="Inference precisions (predict_mner.py's --quantize int8 / --dtype); int8 on CPU only.",
    )
    parser.add_argument(
        "--train_dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="Autocast dtype of the training steps.",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sentences", type=int, default=150, help="Batch-1 latency over this many tweets.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs per tweet at batch 1 (the median is kept).")
    parser.add_argument("--batches", type=int, default=3, help="Batch-32 throughput over this many batches.")
    parser.add_argument("--train_steps", type=int, default=1)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: run one case in this process
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_case(*args.one, args)))
        return
    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    if args.device == "cuda":
        machine = torch.cuda.get_device_name() + ", " + machine
    texts = "Twitter2015 test sample" if DATA.is_file() else "synthetic"
    print(f"# {machine}; device {args.device}; texts: {texts}")
    precisions = ["float32", *(p for p in args.precisions if p != "float32")]  # float32 first: FLOPs and ratios
    if args.device != "cpu" and "int8" in precisions:
        print("# int8 (torch's dynamic quantization) runs on the CPU only: skipped")
        precisions.remove("int8")
    runs = [(case, p) for case in args.cases if case.endswith("_infer") for p in precisions]
    runs = [(case, p) for case, p in runs if case != "bert_infer" or p == "float32"]  # the reference: float32 only
    runs += [(case, args.train_dtype) for case in args.cases if case.endswith("_train")]
    results = {}
    for case, precision in runs:
        command = [sys.executable, __file__, "--one", case, precision, *sys.argv[1:]]
        process = subprocess.run(command, capture_output=True, text=True)
        if process.returncode != 0:
            sys.exit(f"{case} / {precision} failed:\n{process.stderr[-3000:]}")
        results[case, precision] = json.loads(process.stdout.strip().splitlines()[-1])
        r = results[case, precision]
        summary = {k: v for k, v in r.items() if not isinstance(v, list)}
        if "latencies_s" in r:
            summary["batch1_median_ms"] = round(1000 * statistics.median(r["latencies_s"]), 1)
        print(json.dumps(summary), flush=True)
    report(results)
    if args.json:
        rows = [{"case": case, "precision": p, **r} for (case, p), r in results.items()]
        args.json.write_text(json.dumps({"machine": machine, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
