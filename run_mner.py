"""Train, evaluate and test BGA-MNER with Accelerate, from one CPU to many GPUs.

    python run_mner.py configs/twitter2015.yaml                      # the paper's setup
    accelerate launch run_mner.py configs/twitter2015.yaml --seed 7  # any flag overrides the file
    python run_mner.py configs/smoke.yaml                            # offline check of an install

Every epoch (or every `--eval_steps` optimizer steps) the model is evaluated on the dev split; the best
by dev F1 is kept and finally evaluated on the test split. The output folder is a loadable model
repository (weights, config with `auto_map`, code, processor, model card), with `results.json` and the
test predictions in CoNLL form (`token gold pred`). Checkpoints go to `<output_dir>/checkpoints` and
`--resume_from_checkpoint latest` continues a run exactly where it stopped. The data is a corpus folder
(`--data_dir`, any BIO label set) or an exported dataset (`--dataset`, see `twitter_mner.py export`).
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import datasets
import torch
import yaml
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from evaluate import EvaluationModule
from evaluate import load as load_evaluation_module
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import CLIPImageProcessorPil, HfArgumentParser, get_linear_schedule_with_warmup

from configuration_bga_mner import MAX_IMAGE_PIXELS, MNER_LABELS, bio_labels, entity_types
from model_card import apply_umask, export_text_only, public_settings, results_table, write_model_card
from modeling_bga_mner import BgaMnerForTokenClassification
from processing_bga_mner import BgaMnerDataCollator, BgaMnerProcessor, load_text_tokenizer
from twitter_mner import CorpusFormatError, load_mner_dataset, without_decoding

logger = logging.getLogger("run_mner")
# The per-BGA-layer statistics of the mechanism that training logs (fields of the model's output, shape (N,)).
MECHANISM_STATISTICS = ("text_keep_ratio", "visual_keep_ratio", "layer_reconstruction_loss", "layer_cycle_loss")
SAMPLER_CHOICES = (
    "cumulative_sampler_masks",
    "keep_ratio_weight",
    "keep_ratio_target",
    "sampler_inference_rule",
    "generation_loss_reduction",
)
MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "labels",
    "prediction_mask",
    "pixel_values",
    "pixel_mask",
)


@dataclass
class ModelArguments:
    text_model: str = field(
        default="bert-base-uncased", metadata={"help": "BERT, RoBERTa, XLM-R or BERTweet: Hub id or folder."}
    )
    vision_model: str = field(default="openai/clip-vit-base-patch32", metadata={"help": "CLIP model: id or folder."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A trained BGA-MNER folder to start from (instead of the two towers)."}
    )
    alpha: float = field(default=0.001, metadata={"help": "Weight of the generation losses, Eq. (11)."})
    use_sampler: bool = field(default=True, metadata={"help": "False: the paper's 'w/o SCS' ablation."})
    use_cycle: bool = field(default=True, metadata={"help": "False: the paper's 'w/o cycle' ablation."})
    use_generation: bool = field(default=True, metadata={"help": "False: 'w/o SCS & MCG', i.e. BERT-CRF."})
    inference_visual: str = field(default="generated", metadata={"help": "'generated' (paper) or 'real' (Table 4)."})
    num_object_crops: int = field(default=3, metadata={"help": "Object crops per image besides the image."})
    num_bga_layers: int | None = field(
        default=None, metadata={"help": "BGA layers N (text layers 0..N are used); default: all text layers but 0."}
    )
    # Sampler choices; None keeps BgaMnerConfig's default (see its docstring and the README's table of choices).
    cumulative_sampler_masks: bool | None = field(default=None, metadata={"help": "Masks cumulative over layers."})
    keep_ratio_weight: float | None = field(default=None, metadata={"help": "Weight of the keep-ratio loss."})
    keep_ratio_target: float | None = field(default=None, metadata={"help": "Target kept share of each sampler."})
    sampler_inference_rule: str | None = field(default=None, metadata={"help": "'expected_count' or 'threshold'."})
    generation_loss_reduction: str | None = field(default=None, metadata={"help": "KL over tokens: 'sum' or 'mean'."})


@dataclass
class DataArguments:
    data_dir: str = field(default=None, metadata={"help": "Folder with train.txt, valid.txt (or dev.txt), test.txt."})
    dataset: str | None = field(
        default=None,
        metadata={"help": "A dataset from `twitter_mner.py export` (folder or Hub id); used instead of --data_dir."},
    )
    dataset_name: str = field(default="conll", metadata={"help": "twitter2015, twitter2017 or conll (any corpus)."})
    label_list: str | None = field(
        default=None,
        metadata={"help": "Entity types of a new model, comma-separated (default: the training split's; Twitter: 4)."},
    )
    ignore_unknown_types: bool = field(
        default=False,
        metadata={"help": "Evaluate dev / test entities of types the model cannot produce as if unannotated."},
    )
    image_dir: str | None = field(default=None, metadata={"help": "Folder of <image id>.jpg files."})
    crop_dir: str | None = field(default=None, metadata={"help": "HVPNeT object-crop folder."})
    test_data_dir: str | None = field(default=None, metadata={"help": "Test on this corpus instead (cross-domain)."})
    test_image_dir: str | None = field(default=None, metadata={"help": "Images of the --test_data_dir corpus."})
    test_crop_dir: str | None = field(default=None, metadata={"help": "Crops of the --test_data_dir corpus."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on this many random tweets."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N dev/test tweets."})
    eval_without_images: bool = field(default=False, metadata={"help": "Drop all images at evaluation."})
    max_length: int = field(default=128, metadata={"help": "Sub-words per window, special tokens included."})
    max_image_pixels: int = field(
        default=MAX_IMAGE_PIXELS, metadata={"help": "Larger images (by their header) are treated as missing."}
    )
    label_all_subwords: bool = field(default=False, metadata={"help": "Label every sub-word, not only the first."})


@dataclass
class TrainingArguments:
    output_dir: str = field(default="outputs/bga-mner", metadata={"help": "Where the trained model goes."})
    do_train: bool = True
    do_eval: bool = True
    do_predict: bool = field(default=True, metadata={"help": "Evaluate the best model on the test split."})
    per_device_train_batch_size: int = 16
    per_device_eval_batch_size: int = 32
    learning_rate: float = 3e-5
    crf_learning_rate: float | None = field(default=None, metadata={"help": "Learning rate of the CRF (default: lr)."})
    weight_decay: float = 0.01
    num_train_epochs: int = 30
    warmup_ratio: float = 0.01
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = field(default="no", metadata={"help": "no, fp16 or bf16 (or set by accelerate config)."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute each BGA layer in the backward pass: less memory, more time."}
    )
    seed: int = 42
    eval_steps: int | None = field(default=None, metadata={"help": "Evaluate every N steps (default: each epoch)."})
    checkpointing_steps: str = field(default="epoch", metadata={"help": "'epoch', a step count, or 'no'."})
    save_total_limit: int | None = field(
        default=2,
        metadata={"help": "Keep the newest K step checkpoints (the best model is kept apart); 0 or less: keep all."},
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "A checkpoint folder, or 'latest' (the newest in output_dir; a fresh start if there is none)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start clean in an output folder that holds an earlier run (deletes it)."}
    )
    max_steps_per_run: int | None = field(
        default=None, metadata={"help": "Stop after N optimizer steps of this run, checkpointed (time-boxed jobs)."}
    )
    logging_steps: int = 20
    report_to: str | None = field(default=None, metadata={"help": "Accelerate trackers: tensorboard, wandb, all."})
    dataloader_num_workers: int = field(
        default=0,
        metadata={
            "help": "Processes that decode and resize the images while the model trains (0: in the training "
            "process). Batches, their order and an exact resume are the same for any number."
        },
    )
    push_to_hub: bool = False
    hub_model_id: str | None = None
    export_text_only: str | None = field(
        default=None, metadata={"help": "Also write the text-only inference checkpoint of the result to this folder."}
    )


class UsageError(Exception):
    """A mistake in how the script was called (configuration, flags, paths): one line, exit code 2."""


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Flags, or a YAML / JSON file first and flags after it that override the file's values. Raises
    `UsageError` naming the file and key (or flag) for anything it cannot use."""
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments), allow_abbrev=False)
    known = {f.name for kind in (ModelArguments, DataArguments, TrainingArguments) for f in fields(kind)}
    argv = [a for a in argv if a != "--debug"]
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        path = Path(argv[0])
        try:
            settings = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise UsageError(f"{path}: no such configuration file.") from None
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            where = getattr(error, "problem_mark", None)
            line = f":{where.line + 1}" if where is not None else ""
            raise UsageError(f"{path}{line}: not valid YAML / JSON ({getattr(error, 'problem', error)}).") from None
        if not isinstance(settings, dict):
            raise UsageError(f"{path}: expected a mapping of option: value, got {type(settings).__name__}.")
        unknown = sorted(set(settings) - known)
        if unknown:
            raise UsageError(f"{path}: unknown key {unknown[0]!r} (run with --help for the options).")
        from_file = [f"--{key}={value}" for key, value in settings.items() if value is not None]
        argv = from_file + argv[1:]
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # HfArgumentParser's "Some specified arguments are not used ..."
        raise UsageError(f"unknown option: {str(error).split(':', 1)[-1].strip()}") from None
    if data_args.data_dir is None and data_args.dataset is None:
        raise UsageError("Give --data_dir (a corpus folder) or --dataset (an exported dataset).")
    return model_args, data_args, training_args


# ------------------------------------------------------------------------------------------------
# data


def load_corpora(data_args: DataArguments, num_crops: int) -> datasets.DatasetDict:
    """train / validation / test splits, with images left undecoded; the test split comes from --test_data_dir
    when given."""
    limit = {"max_image_pixels": data_args.max_image_pixels}
    if data_args.dataset:
        corpus = load_exported(data_args.dataset)
    else:
        corpus = load_mner_dataset(
            data_args.data_dir, data_args.dataset_name, data_args.image_dir, data_args.crop_dir, num_crops, **limit
        )
    if data_args.test_data_dir:
        other = load_mner_dataset(
            data_args.test_data_dir, "conll", data_args.test_image_dir, data_args.test_crop_dir, num_crops, **limit
        )
        corpus["test"] = other["test"]
    corpus = without_decoding(corpus)  # from here on, nothing decodes an image
    if data_args.dataset:  # at most the model's crops per example
        corpus = corpus.map(lambda crops: {"crops": crops[:num_crops]}, input_columns="crops")
    if data_args.max_train_samples is not None:
        corpus["train"] = (
            corpus["train"].shuffle(seed=0).select(range(min(data_args.max_train_samples, len(corpus["train"]))))
        )
    if data_args.max_eval_samples is not None:
        for split in ("validation", "test"):
            corpus[split] = corpus[split].select(range(min(data_args.max_eval_samples, len(corpus[split]))))
    if data_args.eval_without_images:
        for split in ("validation", "test"):
            corpus[split] = corpus[split].map(lambda _: {"image": None, "image_status": None, "crops": []})
    return corpus


def load_exported(name: str) -> datasets.DatasetDict:
    """A dataset written by `twitter_mner.py export` (a folder, or a Hub id once pushed), checked for the splits
    and columns training reads."""
    try:
        corpus = datasets.load_dataset(name)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as error:
        raise UsageError(f"--dataset {name}: cannot load it ({str(error).splitlines()[0]}).") from None
    missing = {"train", "validation", "test"} - set(corpus)
    columns = {"tokens", "ner_tags", "image", "image_status", "crops", "image_id"}
    lacking = {split: sorted(columns - set(data.column_names)) for split, data in corpus.items()}
    if missing or any(lacking.values()):
        raise UsageError(
            f"--dataset {name}: not an exported BGA-MNER dataset (missing splits {sorted(missing)}, columns "
            f"{ {k: v for k, v in lacking.items() if v} }); make one with `python twitter_mner.py export`."
        )
    return corpus


def image_report(corpus: datasets.DatasetDict) -> dict[str, dict[str, int]]:
    """Per split, how many examples' images are usable ("ok") or why not ("missing", "unreadable", "too large");
    found by the builder from the files' headers. Logged once and written to results.json."""
    report = {}
    for split, data in corpus.items():
        counts = collections.Counter(status for status in data["image_status"] if status is not None)
        if counts:
            report[split] = dict(sorted(counts.items()))
    if report:
        logger.info("Images per split: %s", report)
    return report


def check_trackers(report_to: str | None) -> None:
    """A tracker that is asked for must be installed (Accelerate would silently log nowhere)."""
    packages = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}
    for name in (report_to or "").replace(",", " ").split():
        if name == "all":
            continue
        if name in packages and not any(importlib.util.find_spec(p) for p in packages[name]):
            raise UsageError(
                f"--report_to {name}: the {packages[name][0]} package is not installed "
                "(pip install -r requirements-trackers.txt)."
            )


def split_types(split: datasets.Dataset) -> list[str]:
    """The entity types annotated in a split."""
    names = split.features["ner_tags"].feature.names
    return entity_types({names[t] for tags in split["ner_tags"] for t in tags})


def new_model_labels(corpus: datasets.DatasetDict, data_args: DataArguments) -> list[str]:
    """The label list of a model built here: BIO over --label_list, the four Twitter types, or the training
    split's types."""
    if data_args.label_list:
        types = [kind.strip() for kind in data_args.label_list.split(",") if kind.strip()]
        if not types or any(kind.startswith(("B-", "I-")) or kind == "O" for kind in types):
            raise UsageError(f"--label_list {data_args.label_list!r}: give entity types, e.g. PER,LOC,ORG.")
        return list(bio_labels(types))
    if data_args.dataset_name in ("twitter2015", "twitter2017"):
        return list(MNER_LABELS)
    return list(bio_labels(split_types(corpus["train"])))


def check_label_sets(corpus: datasets.DatasetDict, model_labels: list[str], args, data_args: DataArguments) -> None:
    """Before any training: the model must be able to produce every type it trains on, and every type of the
    dev / test splits it is scored on (unless --ignore_unknown_types)."""
    model_types = set(entity_types(model_labels))
    splits = (["train"] if args.do_train else []) + (["validation"] if args.do_eval else [])
    splits += ["test"] if args.do_predict else []
    for split in splits:
        unknown = [kind for kind in split_types(corpus[split]) if kind not in model_types]
        if not unknown:
            continue
        message = (
            f"The {split} split has entity types {', '.join(unknown)} that the model cannot produce (its labels: "
            f"{', '.join(model_labels)})"
        )
        if split == "train":
            raise UsageError(f"{message}: give them in --label_list, or train a new model.")
        if not data_args.ignore_unknown_types:
            raise UsageError(f"{message}: pass --ignore_unknown_types true to score without those entities.")
        logger.warning("%s: scored as if those entities were not annotated (--ignore_unknown_types).", message)


def tokenize(corpus: datasets.DatasetDict, processor: BgaMnerProcessor, train: bool) -> datasets.DatasetDict:
    """One row per window of sub-words; `example_index` points back into the split. Only the training split
    carries labels, when training (evaluation reads the gold tags from the corpus)."""

    def encoder(names: list[str] | None):
        def encode(batch: dict, indices: list[int]) -> dict:
            labels = None if names is None else [[names[t] for t in tags] for tags in batch["ner_tags"]]
            rows = processor.encode_words(batch["tokens"], labels)
            for row in rows:
                local = row["example_index"]
                row["image"], row["crops"] = batch["image"][local], batch["crops"][local]
                row["example_index"] = indices[local]
            return {key: [row[key] for row in rows] for key in rows[0]}

        return encode

    return datasets.DatasetDict(
        {
            split: data.map(
                encoder(data.features["ner_tags"].feature.names if split == "train" and train else None),
                batched=True,
                with_indices=True,
                remove_columns=data.column_names,
            )
            for split, data in corpus.items()
        }
    )


# ------------------------------------------------------------------------------------------------
# model


def load_model_and_processor(model_args: ModelArguments, data_args: DataArguments, label_names: list[str]):
    """Builds BGA-MNER from the two towers with the labels `label_names`, or loads a trained folder (with its own
    labels); fails early with a clear message when a name cannot be resolved."""
    overrides = {
        "alpha": model_args.alpha,
        "use_sampler": model_args.use_sampler,
        "use_cycle": model_args.use_cycle,
        "use_generation": model_args.use_generation,
        "inference_visual": model_args.inference_visual,
    }
    for name in SAMPLER_CHOICES:
        if getattr(model_args, name) is not None:
            overrides[name] = getattr(model_args, name)
    try:
        if model_args.model_name_or_path:
            model = BgaMnerForTokenClassification.from_pretrained(model_args.model_name_or_path, **overrides)
            processor = BgaMnerProcessor.from_pretrained(model_args.model_name_or_path, trust_remote_code=True)
            processor.max_image_pixels = data_args.max_image_pixels
            model_labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
            if processor.label_names != model_labels:
                raise ValueError(
                    f"{model_args.model_name_or_path}: the processor's label_names ({processor.label_names}) differ "
                    f"from the model's id2label ({model_labels})."
                )
            return model, processor
        model = BgaMnerForTokenClassification.from_text_vision_pretrained(
            model_args.text_model,
            model_args.vision_model if model_args.use_generation else None,
            id2label=dict(enumerate(label_names)),
            label2id={label: i for i, label in enumerate(label_names)},
            num_object_crops=model_args.num_object_crops,
            num_bga_layers=model_args.num_bga_layers,
            max_text_length=data_args.max_length,
            **overrides,
        )
        tokenizer = load_text_tokenizer(model_args.text_model)
        # BERT-CRF (use_generation=False) reads no image: it needs no vision model at all.
        image_processor = (
            CLIPImageProcessorPil.from_pretrained(model_args.vision_model)
            if model_args.use_generation
            else CLIPImageProcessorPil()
        )
    except (OSError, ValueError) as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        raise SystemExit(
            f"Cannot load a model: {error}\nA name must be a local folder or a Hub id"
            + (" (HF_HUB_OFFLINE is set: only local folders and cached ids work)." if offline else ".")
        ) from None
    processor = BgaMnerProcessor(
        image_processor,
        tokenizer,
        num_object_crops=model_args.num_object_crops,
        max_length=data_args.max_length,
        label_all_subwords=data_args.label_all_subwords,
        label_names=label_names,
        max_image_pixels=data_args.max_image_pixels,
    )
    return model, processor


# ------------------------------------------------------------------------------------------------
# evaluation


@functools.cache
def entity_metric() -> EvaluationModule:
    """The repository's `evaluate` metric (metrics/mner_f1: seqeval's conlleval mode), loaded by path: offline."""
    return load_evaluation_module(str(Path(__file__).resolve().parent / "metrics" / "mner_f1"))


def compute_metrics(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, dict[str, float]]:
    """Entity-level precision / recall / F1 with seqeval's default (conlleval) mode, per type and overall."""
    return entity_metric().compute(predictions=predicted, references=gold)


def pad_to(tensor: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)


@torch.no_grad()
def predict(
    model, dataloader, processor: BgaMnerProcessor, accelerator: Accelerator, num_examples: int
) -> list[list[str]]:
    """One tag per word for every example of the split, gathered exactly across processes (the samples
    that a distributed sampler repeats to fill the last batch are dropped by `gather_for_metrics`)."""
    model.eval()
    gathered = {"predictions": [], "word_index": [], "example_index": [], "num_words": []}
    for batch in tqdm(dataloader, desc="evaluating", disable=not accelerator.is_local_main_process, leave=False):
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch and k != "labels"}
        predictions = model(**inputs).predictions
        padded = {
            "predictions": accelerator.pad_across_processes(predictions, dim=1, pad_index=-100),
            "word_index": accelerator.pad_across_processes(batch["word_index"], dim=1, pad_index=-1),
            "example_index": batch["example_index"],
            "num_words": batch["num_words"],
        }
        for key, value in accelerator.gather_for_metrics(padded).items():
            gathered[key].append(value.cpu())
    width = max(t.shape[1] for t in gathered["predictions"])
    encoding = {
        "predictions": torch.cat([pad_to(t, width, -100) for t in gathered["predictions"]]),
        "word_index": torch.cat([pad_to(t, width, -1) for t in gathered["word_index"]]),
        "example_index": torch.cat(gathered["example_index"]),
        "num_words": torch.cat(gathered["num_words"]),
    }
    rows = len(dataloader.dataset)
    if len(encoding["example_index"]) != rows:  # rows repeated to fill the last batch, or lost
        raise RuntimeError(f"Gathered {len(encoding['example_index'])} predicted rows for {rows} rows of data.")
    tags = processor.decode_predictions(encoding["predictions"], encoding)
    assert len(tags) == num_examples, (len(tags), num_examples)
    return tags


def evaluate(model, dataloader, split: datasets.Dataset, processor, accelerator) -> tuple[dict, list[list[str]]]:
    """Scores and predicted tags of a split. Where the model's label set and the corpus's differ, gold entities
    of types the model lacks (allowed by `check_label_sets`) and predicted types the corpus lacks count as O."""
    names = split.features["ner_tags"].feature.names
    model_types = set(entity_types(processor.label_names))
    gold = [[names[t] if names[t][2:] in model_types else "O" for t in tags] for tags in split["ner_tags"]]
    predicted = predict(model, dataloader, processor, accelerator, len(split))
    corpus_types = set(entity_types(names))
    unknown = {tag[2:] for tags in predicted for tag in tags if tag != "O" and tag[2:] not in corpus_types}
    if unknown:
        logger.warning("Predicted types %s are not labels of this corpus: scored as O.", ", ".join(sorted(unknown)))
        predicted = [[tag if tag == "O" or tag[2:] in corpus_types else "O" for tag in tags] for tags in predicted]
    return compute_metrics(gold, predicted), predicted


def write_conll(path: Path, split: datasets.Dataset, predicted: list[list[str]]) -> None:
    names = split.features["ner_tags"].feature.names
    with open(path, "w", encoding="utf-8") as handle:
        for example, tags in zip(split, predicted, strict=True):
            if example["image_id"] is not None:
                handle.write(f"IMGID:{example['image_id']}\n")
            for token, gold, tag in zip(example["tokens"], example["ner_tags"], tags, strict=True):
                handle.write(f"{token}\t{names[gold]}\t{tag}\n")
            handle.write("\n")


# ------------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(accelerator: Accelerator, folder: Path, keep: int | None = None) -> None:
    """Saves the full training state atomically: written under a temporary name, then renamed, so a
    crash during the save never leaves a folder that looks complete. Then keeps only the newest `keep`
    step checkpoints (all if None or < 1): the newest, which a resume needs, is never deleted."""
    temporary = folder.with_name(folder.name + ".tmp")
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        apply_umask(temporary)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(temporary, folder)
        if keep is not None and keep > 0:
            for old in step_checkpoints(folder.parent)[:-keep]:
                delete_checkpoint(old)
    accelerator.wait_for_everyone()


def step_checkpoints(folder: Path) -> list[Path]:
    """The complete `step_N` checkpoints in `folder`, oldest first; also finishes deletions a kill interrupted."""
    for leftover in folder.glob("step_*.deleting"):
        shutil.rmtree(leftover, ignore_errors=True)
    found = [p for p in folder.glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def delete_checkpoint(folder: Path) -> None:
    """Renamed first (atomic), then removed: a kill during the removal leaves `step_N.deleting`, which no resume
    mistakes for a checkpoint and the next save removes."""
    doomed = folder.with_name(folder.name + ".deleting")
    os.replace(folder, doomed)
    shutil.rmtree(doomed)


def find_checkpoint(output_dir: Path, name: str) -> Path | None:
    """'latest' -> the newest complete `step_N` checkpoint, or None when there is none yet (a time-boxed job's
    first leg starts fresh); otherwise the folder given."""
    if name != "latest":
        if not Path(name).is_dir():
            raise UsageError(f"--resume_from_checkpoint {name}: no such checkpoint folder.")
        return Path(name)
    folders = step_checkpoints(output_dir / "checkpoints") if (output_dir / "checkpoints").is_dir() else []
    if not folders:
        logger.info("--resume_from_checkpoint latest: no checkpoint in %s yet; starting a new run.", output_dir)
        return None
    return folders[-1]


def random_states_loadable(checkpoint: Path, process_index: int) -> bool:
    """Whether `accelerator.load_state` will restore this process's random states (it only logs when it can't)."""
    try:
        torch.load(checkpoint / f"random_states_{process_index}.pkl", weights_only=False)
        return True
    except Exception:  # missing, truncated, or from another version
        return False


RUN_FILES = ("results.json", "checkpoints", "model.safetensors")  # what makes a folder hold a run


def claim_output_dir(output_dir: Path, args: TrainingArguments):
    """Before anything is written: refuses a folder that holds a run (unless resuming, or told to start clean),
    checks that it can be written, and locks it for this run. The lock (`flock`) goes with the process, so
    a killed run never blocks the next. Returns the open lock file, to keep for the run's lifetime."""
    holds_run = any((output_dir / name).exists() for name in RUN_FILES)
    if holds_run and args.do_train and not (args.overwrite_output_dir or args.resume_from_checkpoint):
        raise UsageError(
            f"{output_dir} holds an earlier run: pass --overwrite_output_dir to start clean, "
            "--resume_from_checkpoint latest to continue it, or another --output_dir."
        )
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        lock = open(output_dir / ".run.lock", "a+")
    except OSError as error:
        raise UsageError(f"cannot write to the output folder {output_dir}: {error.strerror or error}.") from None
    try:
        import fcntl

        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # no flock (Windows): no lock
        pass
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        raise UsageError(f"{output_dir} is in use by another run (process {holder}); wait for it to end.") from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    if holds_run and args.do_train and args.overwrite_output_dir and not args.resume_from_checkpoint:
        logger.info("--overwrite_output_dir: removing the earlier run in %s", output_dir)
        for path in output_dir.iterdir():
            if path.name != ".run.lock":
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    return lock


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, args = parse_arguments(sys.argv[1:] if argv is None else argv)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # Batches without any image skip the visual branch: its parameters then get no gradient.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        logging.getLogger().setLevel(logging.WARNING)
        datasets.utils.logging.disable_progress_bar()
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    check_trackers(args.report_to)
    lock = claim_output_dir(output_dir, args) if accelerator.is_main_process else None  # noqa: F841 (held)
    accelerator.wait_for_everyone()
    logger.info("%d process(es), %s", accelerator.num_processes, accelerator.distributed_type)

    # Data first: a missing folder or a malformed file fails before any model is loaded.
    with accelerator.main_process_first():
        corpus = load_corpora(data_args, model_args.num_object_crops)
    model, processor = load_model_and_processor(model_args, data_args, new_model_labels(corpus, data_args))
    check_label_sets(corpus, processor.label_names, args, data_args)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
        checkpointed = sum(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        logger.info("Gradient checkpointing: %d layers recomputed in the backward pass.", checkpointed)
    with accelerator.main_process_first():
        encoded = tokenize(corpus, processor, train=args.do_train)

    collator = BgaMnerDataCollator(processor)

    def loader(split: str, **kwargs) -> DataLoader:
        # Own generators: building an iterator draws no number from the global RNG, which a resumed run
        # restores from its checkpoint (dropout and the samplers' Gumbel noise must continue identically).
        generator = torch.Generator().manual_seed(args.seed)
        return DataLoader(
            encoded[split], collate_fn=collator, num_workers=args.dataloader_num_workers, generator=generator, **kwargs
        )

    train_loader = loader("train", shuffle=True, batch_size=args.per_device_train_batch_size)
    eval_loaders = {
        split: loader(split, batch_size=args.per_device_eval_batch_size) for split in ("validation", "test")
    }

    no_decay = ("bias", "LayerNorm.weight", "layer_norm1.weight", "layer_norm2.weight", "norm.weight")
    groups = [
        {"params": [], "weight_decay": args.weight_decay},
        {"params": [], "weight_decay": 0.0},
        {
            "params": list(model.crf.parameters()),
            "weight_decay": 0.0,
            "lr": args.crf_learning_rate or args.learning_rate,
        },
    ]
    for name, parameter in model.named_parameters():
        if not name.startswith("crf."):
            groups[1 if name.endswith(no_decay) else 0]["params"].append(parameter)
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate)
    model, optimizer, train_loader, *loaders = accelerator.prepare(
        model, optimizer, train_loader, *eval_loaders.values()
    )
    eval_loaders = dict(zip(eval_loaders, loaders, strict=True))
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    total_steps = steps_per_epoch * args.num_train_epochs
    # Accelerate's scheduler steps once per process for each optimizer step.
    scheduler = accelerator.prepare(
        get_linear_schedule_with_warmup(
            optimizer,
            int(args.warmup_ratio * total_steps) * accelerator.num_processes,
            total_steps * accelerator.num_processes,
        )
    )
    settings = {**asdict(model_args), **asdict(data_args), **asdict(args)}
    if args.report_to:
        accelerator.init_trackers("bga-mner", config={k: v for k, v in settings.items() if v is not None})

    results: dict = {"world_size": accelerator.num_processes, "images": image_report(corpus)}
    best_dir = output_dir / "checkpoints" / "best"
    if args.do_train:
        completed_steps, start_epoch, skip_batches = 0, 0, 0
        best = {"f1": -1.0}
        checkpoint = find_checkpoint(output_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
        if checkpoint is not None:
            exact = random_states_loadable(checkpoint, accelerator.process_index)
            accelerator.load_state(str(checkpoint))
            completed_steps = int(checkpoint.name.split("_")[1])
            start_epoch = completed_steps // steps_per_epoch
            skip_batches = (completed_steps % steps_per_epoch) * args.gradient_accumulation_steps
            if best_dir.exists():
                best = json.loads((best_dir / "best.json").read_text())
            logger.info("Resumed from %s (step %d, epoch %d)", checkpoint, completed_steps, start_epoch)
            if not exact:
                logger.warning(
                    "%s has no loadable random states for process %d: the resumed run goes on, but its dropout and "
                    "sampler noise differ from the uninterrupted run's (recorded as resume_exact: false).",
                    checkpoint,
                    accelerator.process_index,
                )
            results["resumed_from_step"], results["resume_exact"] = completed_steps, exact
        stop_at = completed_steps + args.max_steps_per_run if args.max_steps_per_run else None

        def evaluate_and_checkpoint(epoch_end: bool) -> None:
            # Evaluation first: the checkpoint then holds the state after it, and a resumed run continues
            # exactly as an uninterrupted one.
            nonlocal best
            due = epoch_end if args.eval_steps is None else completed_steps % args.eval_steps == 0
            if args.do_eval and due:
                metrics, _ = evaluate(model, eval_loaders["validation"], corpus["validation"], processor, accelerator)
                model.train()
                f1 = metrics["overall"]["f1"]
                logger.info("step %d: dev F1 %.2f (best %.2f)", completed_steps, 100 * f1, 100 * max(best["f1"], 0))
                accelerator.log({"dev/f1": f1, "dev/precision": metrics["overall"]["precision"]}, step=completed_steps)
                if f1 > best["f1"]:
                    best = {"f1": f1, "step": completed_steps, "dev": metrics}
                    save_best(accelerator, model, processor, best_dir, best)
            every = args.checkpointing_steps
            if (every == "epoch" and epoch_end) or (every.isdigit() and completed_steps % int(every) == 0):
                save_checkpoint(
                    accelerator, output_dir / "checkpoints" / f"step_{completed_steps}", args.save_total_limit
                )

        progress = tqdm(
            total=total_steps, initial=completed_steps, desc="training", disable=not accelerator.is_local_main_process
        )
        running = {"loss": 0.0, "crf": 0.0, "reconstruction": 0.0, "cycle": 0.0, "keep_ratio": 0.0}
        mechanism = MechanismLog()
        model.train()
        for epoch in range(start_epoch, args.num_train_epochs):
            train_loader.set_epoch(epoch)
            batches = train_loader
            if skip_batches:
                batches = accelerator.skip_first_batches(train_loader, skip_batches)
                skip_batches = 0
            for batch in batches:
                with accelerator.accumulate(model):
                    outputs = model(**{k: batch[k] for k in MODEL_INPUTS if k in batch})
                    if not torch.isfinite(outputs.loss):
                        raise SystemExit(
                            f"error: training diverged: the loss is {outputs.loss.item()} at step "
                            f"{completed_steps + 1} (epoch {epoch + 1}); nothing of this step is saved. "
                            f"Lower --learning_rate (now {args.learning_rate:g}) or keep --max_grad_norm on."
                        )
                    accelerator.backward(outputs.loss)
                    if accelerator.sync_gradients and args.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                for key, value in (
                    ("loss", outputs.loss),
                    ("crf", outputs.crf_loss),
                    ("reconstruction", outputs.reconstruction_loss),
                    ("cycle", outputs.cycle_loss),
                    ("keep_ratio", outputs.keep_ratio_loss),
                ):
                    running[key] += 0.0 if value is None else value.item() / args.gradient_accumulation_steps
                mechanism.add(outputs)
                if not accelerator.sync_gradients:
                    continue
                completed_steps += 1
                progress.update(1)
                if completed_steps % args.logging_steps == 0:
                    averages = {k: v / args.logging_steps for k, v in running.items()}
                    layers = mechanism.close_window()
                    postfix = {k: f"{v:.4f}" for k, v in averages.items()}
                    progress.set_postfix({**postfix, **mechanism.summary()})
                    accelerator.log({f"train/{k}": v for k, v in {**averages, **layers}.items()}, step=completed_steps)
                    running = dict.fromkeys(running, 0.0)
                epoch_end = completed_steps % steps_per_epoch == 0
                evaluate_and_checkpoint(epoch_end)
                if stop_at is not None and completed_steps >= stop_at:
                    save_checkpoint(
                        accelerator, output_dir / "checkpoints" / f"step_{completed_steps}", args.save_total_limit
                    )
                    logger.info("Stopped after %d steps (--max_steps_per_run); resume with latest.", completed_steps)
                    accelerator.end_training()
                    return {"stopped_at_step": completed_steps}
        progress.close()
        if not args.do_eval:  # nothing chose a best model: keep the last one
            save_best(accelerator, model, processor, best_dir, {"f1": None, "step": completed_steps})
        results["best_step"] = json.loads((best_dir / "best.json").read_text())["step"]
        if mechanism.last:  # the samplers' keep ratios and the generation losses per BGA layer, last logging window
            results["mechanism"] = mechanism.last

    # The output folder becomes the model repository: the best model, its processor and code.
    unwrapped = accelerator.unwrap_model(model)
    if args.do_train:
        unwrapped.load_state_dict(load_file(best_dir / "model.safetensors"))
    if args.do_eval:
        results["validation"], _ = evaluate(
            model, eval_loaders["validation"], corpus["validation"], processor, accelerator
        )
    if args.do_predict:
        results["test"], predicted = evaluate(model, eval_loaders["test"], corpus["test"], processor, accelerator)
        if accelerator.is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
            write_conll(output_dir / "test_predictions.conll", corpus["test"], predicted)
    check_finite(unwrapped)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        unwrapped.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
        train_split = corpus["train"]
        results["training_images"] = {  # what the training saw, for the card
            "tweets": len(train_split),
            "with_image": results["images"].get("train", {}).get("ok", 0),  # counted by image_report
            "with_crops": sum(len(crops) > 0 for crops in train_split["crops"]),
        }
        if processor.image_problems:  # files that passed the header check but failed to decode (truncated ...)
            results["images_failed_to_decode"] = dict(processor.image_problems)
        (output_dir / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
        (output_dir / "training_args.json").write_text(
            json.dumps(public_settings(settings), indent=2), encoding="utf-8"
        )
        scores = {split: results[split] for split in ("validation", "test") if split in results}
        towers = [model_args.text_model] + ([model_args.vision_model] if model_args.use_generation else [])
        write_model_card(
            output_dir,
            scores,
            settings,
            towers if not model_args.model_name_or_path else [model_args.model_name_or_path],
            data_args.dataset_name,
            model_id=args.hub_model_id,
            training_images=results["training_images"] if args.do_train else None,
            types=entity_types(processor.label_names),
        )
        apply_umask(output_dir)
        if args.export_text_only:
            logger.info("Text-only inference checkpoint -> %s", export_text_only(output_dir, args.export_text_only))
        if scores:
            print(results_table(scores))
        if args.push_to_hub:
            from huggingface_hub import HfApi

            api = HfApi()
            repo = api.create_repo(args.hub_model_id or output_dir.name, exist_ok=True).repo_id
            api.upload_folder(repo_id=repo, folder_path=output_dir, ignore_patterns=["checkpoints/*", "logs/*"])
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


class MechanismLog:
    """Averages the model's per-BGA-layer statistics (`MECHANISM_STATISTICS`) over a logging window, and warns
    when a sampler keeps nothing but the always-kept first token ([CLS] / the image's class token)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.last: dict[str, list[float]] = {}

    def add(self, outputs) -> None:
        for name in MECHANISM_STATISTICS:
            value = getattr(outputs, name, None)
            if value is None:
                continue
            value = value.detach().float().cpu()
            seen = ~value.isnan()  # the visual ratios are NaN for a batch without images
            self.sums[name] = self.sums.get(name, 0) + torch.where(seen, value, 0.0)
            self.counts[name] = self.counts.get(name, 0) + seen

    def close_window(self) -> dict[str, float]:
        """The window's averages as tracker values, `{"text_keep_ratio/layer_1": ...}`; starts a new window."""
        averages = {name: (self.sums[name] / self.counts[name]).tolist() for name in self.sums}
        self.sums, self.counts = {}, {}
        if not averages:
            return {}
        self.last = {name: [None if math.isnan(v) else v for v in values] for name, values in averages.items()}
        for side in ("text", "visual"):
            for layer, ratio in enumerate(averages[f"{side}_keep_ratio"], start=1):
                if ratio == 0.0:
                    logger.warning(
                        "BGA layer %d: the %s sampler keeps nothing but the always-kept first token (keep ratio 0): "
                        "its generator reads one token. Consider a keep-ratio loss (keep_ratio_weight).",
                        layer,
                        side,
                    )
        return {
            f"{name}/layer_{layer}": value
            for name, values in averages.items()
            for layer, value in enumerate(values, start=1)
            if not math.isnan(value)
        }

    def summary(self) -> dict[str, str]:
        """Keep ratios per layer for the progress bar, e.g. {"keep_t": "0.52/0.48", "keep_v": "0.50/0.47"}."""
        if not self.last:
            return {}
        return {
            f"keep_{side[0]}": "/".join("-" if r is None else f"{r:.2f}" for r in self.last[f"{side}_keep_ratio"])
            for side in ("text", "visual")
        }


def check_finite(model) -> None:
    """Refuses to save a model with a non-finite weight (a diverged run)."""
    bad = [name for name, parameter in model.named_parameters() if not torch.isfinite(parameter).all()]
    if bad:
        raise SystemExit(f"error: training diverged: {len(bad)} tensors hold NaN or inf (first: {bad[0]}); not saved.")


def save_best(accelerator: Accelerator, model, processor: BgaMnerProcessor, folder: Path, best: dict) -> None:
    """Saves the best model so far as a loadable folder, atomically (temporary folder, then rename)."""
    check_finite(accelerator.unwrap_model(model))
    if accelerator.is_main_process:
        temporary = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(temporary, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(temporary)
        processor.save_pretrained(temporary)
        (temporary / "best.json").write_text(json.dumps(best, indent=2), encoding="utf-8")
        apply_umask(temporary)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(temporary, folder)
    accelerator.wait_for_everyone()


def cli() -> None:
    """`python run_mner.py ...`: mistakes in the call print one line and exit 2 (with --debug or
    BGA_MNER_DEBUG=1, the traceback)."""
    try:
        main()
    except (UsageError, CorpusFormatError, FileNotFoundError) as error:
        if "--debug" in sys.argv or os.environ.get("BGA_MNER_DEBUG", "0") not in ("", "0"):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
