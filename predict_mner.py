"""Predict entities with a trained BGA-MNER model, from text alone.

    python predict_mner.py --model outputs/bga-mner-twitter2015 --input tweets.txt --output entities.jsonl
    python predict_mner.py --model you/bga-mner --input test.txt --input_format conll --output pred.conll
    python predict_mner.py --model you/bga-mner --dataset you/twitter2015-mner --split test --output pred.conll
    python predict_mner.py --model outputs/bga-mner-twitter2015 --export_text_only bga-mner-text-only

Inputs: a text file with one text per line (`text`; blank lines are skipped), JSON lines with a `text`
string or a `tokens` list per line (`jsonl`), or a CoNLL file (`conll`: `token` or `token<TAB>label`
lines, `IMGID:` lines allowed, blank lines between examples). The format follows the file's ending
(.jsonl, .conll) unless `--input_format` says; a .txt file is CoNLL if its first line has a tab or is an
IMGID line. Outputs: JSON lines (`jsonl`: the text, its words' tags and its entities with text, type,
start, end, score) or CoNLL (`conll`: `token<TAB>prediction`, or `token<TAB>gold<TAB>prediction` when the
input had labels; the scores are then printed, as run_mner.py computes them). Long texts are split into
windows as the processor does; no word is dropped.

Faster inference: `--quantize int8` (CPU: the linear layers of the BGA layers and the generator in int8 with
dynamic activation scales, torch's dynamic quantization) or `--dtype bfloat16` (weights and activations in
bfloat16, the CRF in float32; for GPUs and CPUs with AMX). BENCHMARKS.md gives their speed and F1 change.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForTokenClassification, AutoProcessor

from model_card import export_text_only, results_table
from processing_bga_mner import entities_from_tags, join_words, split_words
from run_mner import compute_metrics
from twitter_mner import CorpusFormatError, read_conll, read_lines

FORMATS = ("text", "jsonl", "conll")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Example:
    words: list[str]
    spans: list[tuple[int, int]]  # character spans of the words in `text`
    text: str
    gold: list[str] | None = None
    image_id: str | None = None


def guess_format(path: Path) -> str:
    if path.suffix == ".jsonl":
        return "jsonl"
    if path.suffix == ".conll":
        return "conll"
    first = next((line for _, line in read_lines(path)), "")
    return "conll" if "\t" in first or first.startswith("IMGID:") else "text"


def read_examples(path: Path, input_format: str) -> list[Example]:
    """Reads the input; raises `CorpusFormatError` naming file and line for malformed or empty input."""
    examples = []
    if input_format == "conll":
        labelled = _conll_has_labels(path)
        for example in read_conll(path, labelled=False):
            text, spans = join_words(example.tokens)
            gold = example.labels if labelled else None
            examples.append(Example(example.tokens, spans, text, gold, example.image_id))
        return examples
    for number, line in read_lines(path):
        if not line.strip():
            continue
        if input_format == "text":
            words, spans = split_words(line)
            examples.append(Example(words, spans, line))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise CorpusFormatError(f"{path}:{number}: not a JSON object ({error.msg}).") from None
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            words, spans = split_words(record["text"])
            examples.append(Example(words, spans, record["text"]))
        elif isinstance(record, dict) and isinstance(record.get("tokens"), list):
            text, spans = join_words([str(token) for token in record["tokens"]])
            examples.append(Example([str(token) for token in record["tokens"]], spans, text))
        else:
            raise CorpusFormatError(f"{path}:{number}: expected an object with a 'text' string or a 'tokens' list.")
    if not examples:
        raise CorpusFormatError(f"{path}: no text in the file (empty file?).")
    return examples


def dataset_examples(name: str, split: str) -> list[Example]:
    """The examples of one split of an exported dataset (folder or Hub id), with their gold tags."""
    import datasets

    try:
        data = datasets.load_dataset(name, split=split)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as error:
        raise CorpusFormatError(f"--dataset {name} --split {split}: {str(error).splitlines()[0]}") from None
    names = data.features["ner_tags"].feature.names
    examples = []
    for tokens, tags, image_id in zip(data["tokens"], data["ner_tags"], data["image_id"], strict=True):
        text, spans = join_words(tokens)
        examples.append(Example(tokens, spans, text, [names[t] for t in tags], image_id))
    return examples


def _conll_has_labels(path: Path) -> bool:
    """Whether the token lines of a CoNLL file carry a label: all or none of them must (the error names the
    first line that breaks the rule)."""
    labelled = unlabelled = None  # the first line number of each kind
    for number, line in read_lines(path):
        if line.strip() and not line.startswith("IMGID:"):
            if "\t" in line:
                labelled = labelled or number
            else:
                unlabelled = unlabelled or number
            if labelled and unlabelled:
                late_missing = unlabelled > labelled
                raise CorpusFormatError(
                    f"{path}:{max(labelled, unlabelled)}: {'no label' if late_missing else 'a label'} on this token "
                    f"line, but line {min(labelled, unlabelled)} {'has one' if late_missing else 'has none'}: "
                    "give a label on every token line, or on none."
                )
    return labelled is not None


@torch.no_grad()
def predict(model, processor, examples: list[Example], batch_size: int) -> tuple[list[list[str]], list[list]]:
    """Tags and scores (CRF marginals) per word of each example, in batches with a progress bar."""
    tags, scores = [], []
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(examples), batch_size), desc="predicting", unit="batch"):
        chunk = examples[start : start + batch_size]
        encoding = processor(words=[example.words for example in chunk])
        inputs = {key: value.to(device) for key, value in encoding.items()}
        outputs = model(**inputs, output_marginals=True)
        predictions = outputs.predictions.cpu()
        chosen = outputs.marginals.cpu().gather(-1, predictions.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        tags += processor.decode_predictions(predictions, encoding)
        scores += processor.word_values(chosen, encoding)
    return tags, scores


def write_output(path: Path, output_format: str, examples: list[Example], tags, scores) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for example, example_tags, example_scores in zip(examples, tags, scores, strict=True):
            if output_format == "jsonl":
                entities = entities_from_tags(example_tags, example.spans, example_scores, example.text)
                record = {"text": example.text, "tags": example_tags, "entities": entities}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                continue
            if example.image_id is not None:
                handle.write(f"IMGID:{example.image_id}\n")
            gold = example.gold or [None] * len(example.words)
            for word, label, tag in zip(example.words, gold, example_tags, strict=True):
                handle.write("\t".join([word, *([label] if label else []), tag]) + "\n")
            handle.write("\n")


def load_model(name: str, device: str):
    """The model and processor of a trained folder or Hub id; exits with one line when neither is found."""
    try:
        model = AutoModelForTokenClassification.from_pretrained(name, trust_remote_code=True).to(device).eval()
        return model, AutoProcessor.from_pretrained(name, trust_remote_code=True)
    except (OSError, ValueError) as error:
        where = "a folder without a trained model" if Path(name).is_dir() else "no such folder, and no Hub model"
        sys.exit(f"error: --model {name}: {where} ({str(error).splitlines()[0]})")


def prepare_for_inference(model: nn.Module, dtype: str = "float32", quantize: str = "none") -> nn.Module:
    """The model in the numeric precision to predict with (in eval mode; int8 returns a quantized copy).

    dtype: "float32", or "bfloat16" / "float16" for weights and activations, with the CRF kept in float32 (its
    Viterbi and marginals run in float32 either way). quantize "int8" (CPU, float32): `model.quantized_int8()`."""
    model.eval()
    if quantize == "int8":
        if dtype != "float32" or next(model.parameters()).device.type != "cpu":
            raise ValueError("--quantize int8 runs on the CPU in float32 (torch's dynamic quantization).")
        return model.quantized_int8()
    if quantize != "none":
        raise ValueError(f"quantize must be 'none' or 'int8', not {quantize!r}")
    if dtype != "float32":
        model.to(getattr(torch, dtype))
        if hasattr(model, "crf"):
            model.crf.float()
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="A trained BGA-MNER folder or Hub id.")
    parser.add_argument("--input", type=Path, help="Required unless --export_text_only or --dataset is given.")
    parser.add_argument("--dataset", help="Instead of --input: a dataset from `twitter_mner.py export` (folder or id).")
    parser.add_argument("--split", default="test", help="The split of --dataset to predict (default: test).")
    parser.add_argument("--output", type=Path, help="Required with --input.")
    parser.add_argument(
        "--export_text_only", type=Path, metavar="DIR", help="Write the text-only inference checkpoint of --model."
    )
    parser.add_argument("--input_format", choices=FORMATS, help="Default: from the file (see above).")
    parser.add_argument("--output_format", choices=("jsonl", "conll"), help="Default: from --output's ending.")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="Precision of weights and activations.")
    parser.add_argument(
        "--quantize", choices=("none", "int8"), default="none", help="int8: dynamic quantization (CPU)."
    )
    args = parser.parse_args(argv)
    if args.quantize == "int8" and (args.dtype != "float32" or args.device != "cpu"):
        parser.error("--quantize int8 runs on the CPU in float32: give --device cpu and no --dtype")
    if args.export_text_only is not None:
        load_model(args.model, "cpu")  # a clear error for a wrong --model
        print(f"Text-only inference checkpoint -> {export_text_only(args.model, args.export_text_only)}")
        if args.input is None and args.dataset is None:
            return
    if (args.input is None) == (args.dataset is None) or args.output is None:
        parser.error("give --input or --dataset, and --output (or only --export_text_only)")
    if args.input is not None and not args.input.is_file():
        parser.error(f"{args.input}: no such file")
    if args.output.is_dir():
        parser.error(f"--output {args.output} is a folder: give a file name, e.g. {args.output / 'predictions.jsonl'}")
    output_format = args.output_format or ("conll" if args.output.suffix == ".conll" else "jsonl")
    try:
        if args.dataset is not None:
            examples = dataset_examples(args.dataset, args.split)
        else:
            examples = read_examples(args.input, args.input_format or guess_format(args.input))
    except CorpusFormatError as error:
        sys.exit(f"error: {error}")
    model, processor = load_model(args.model, args.device)
    model = prepare_for_inference(model, args.dtype, args.quantize)
    tags, scores = predict(model, processor, examples, args.batch_size)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_output(args.output, output_format, examples, tags, scores)
    print(f"{len(examples)} examples -> {args.output}")
    if all(example.gold is not None for example in examples):  # a labelled CoNLL file: score it as run_mner does
        gold = [example.gold for example in examples]
        print(results_table({args.split if args.dataset else args.input.name: compute_metrics(gold, tags)}))


if __name__ == "__main__":
    main()
