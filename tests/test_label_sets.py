"""Corpora with their own entity types: the label set comes from the training split (or --label_list) and
reaches the builder, the model, the CRF, the metrics, the card and the pipeline; evaluation across label sets
maps or refuses what the other side cannot know."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from test_run_mner import SMOKE, run
from transformers import pipeline

from configuration_bga_mner import bio_labels

ENTITIES = {  # type -> surface forms (lower case: the tiny tokenizer knows some as whole words)
    "person": ["obama", "alice"],
    "location": ["new york", "paris"],
    "corporation": ["apple", "google"],
    "product": ["iphone", "pixel"],
    "creative-work": ["hamlet", "dune"],
    "group": ["beatles", "abba"],
    "event": ["olympics"],
}
FILLER = ["the", "in", "at", "with", "visits", "game", "rt"]
WNUT_TYPES = ["corporation", "creative-work", "group", "location", "person", "product"]  # alphabetical


def write_corpus(folder: Path, types: list[str], sizes=(60, 20, 20), seed: int = 0) -> dict[str, list]:
    """Random tweets of filler words and one or two entities of `types`, as train / valid / test files."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, size in zip(("train", "valid", "test"), sizes, strict=True):
        examples = []
        for _ in range(size):
            words = [(w, "O") for w in rng.sample(FILLER, 3)]
            for kind in rng.sample(types, min(2, len(types))):
                entity = rng.choice(ENTITIES[kind]).split()
                tagged = [(w, ("B-" if i == 0 else "I-") + kind) for i, w in enumerate(entity)]
                position = rng.randrange(len(words) + 1)
                words[position:position] = tagged
            examples.append(words)
        text = "\n\n".join("\n".join(f"{w}\t{t}" for w, t in example) for example in examples)
        (folder / f"{name}.txt").write_text(text + "\n", encoding="utf-8")
        written[name] = examples
    return written


def train_args(corpus: Path, output: Path, *extra: str) -> list[str]:
    return [str(SMOKE), "--data_dir", str(corpus), "--dataset_name", "conll", "--output_dir", str(output),
            "--num_train_epochs", "12", "--use_generation", "false", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def six_type_model(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("wnut")
    examples = write_corpus(root / "corpus", WNUT_TYPES)
    run(*train_args(root / "corpus", root / "model"))
    return root / "model", examples


def test_a_corpus_with_six_types_trains_with_its_own_labels_end_to_end(six_type_model):
    folder, examples = six_type_model
    config = json.loads((folder / "config.json").read_text())
    labels = list(bio_labels(WNUT_TYPES))  # 13 labels, types in alphabetical order
    assert [config["id2label"][str(i)] for i in range(len(labels))] == labels
    assert load_file(folder / "model.safetensors")["crf.transitions"].shape == (13, 13)
    assert json.loads((folder / "processor_config.json").read_text())["label_names"] == labels

    results = json.loads((folder / "results.json").read_text())
    gold_counts = {kind: sum(t == f"B-{kind}" for ex in examples["test"] for _, t in ex) for kind in WNUT_TYPES}
    assert {kind: results["test"][kind]["support"] for kind in WNUT_TYPES} == gold_counts
    assert results["test"]["overall"]["f1"] > 0.5  # the types were learned, not only carried along
    predicted = {line.split("\t")[2] for line in (folder / "test_predictions.conll").read_text().splitlines() if line}
    assert predicted <= set(labels) and len(predicted) > 5

    card = ModelCard.load(folder / "README.md")
    assert (
        "| split | corporation F1 | creative-work F1 | group F1 | location F1 | person F1 | product F1 |" in card.text
    )
    assert "(corporation, creative-work, group, location, person, product)" in card.text
    ner = pipeline("token-classification", model=str(folder), trust_remote_code=True, aggregation_strategy="simple")
    found = ner("obama visits new york with the iphone and dune")
    assert {e["entity_group"] for e in found} <= set(WNUT_TYPES) and {"person", "location"} <= {
        e["entity_group"] for e in found
    }


def test_a_three_type_test_corpus_scores_the_models_other_types_as_o_with_a_warning(six_type_model, tmp_path):
    folder, _ = six_type_model
    three = ["corporation", "location", "person"]
    write_corpus(tmp_path / "three", three, seed=1)
    with open(tmp_path / "three" / "test.txt", "a", encoding="utf-8") as handle:  # products, not annotated here
        handle.write("\nthe\tO\niphone\tO\nand\tO\npixel\tO\n")
    result = run(*train_args(tmp_path / "three", tmp_path / "eval"), "--model_name_or_path", str(folder),
                 "--do_train", "false")  # fmt: skip
    warned = re.search(r"Predicted types (.+) are not labels of this corpus: scored as O", result.stderr)
    assert warned and set(warned.group(1).split(", ")) <= {"creative-work", "group", "product"}
    predicted = {line.split("\t")[2] for line in (tmp_path / "eval" / "test_predictions.conll").read_text().split("\n")
                 if line}  # fmt: skip
    assert predicted <= set(bio_labels(three))
    assert set(json.loads((tmp_path / "eval" / "results.json").read_text())["test"]) == {*three, "overall"}


def test_a_test_corpus_with_a_type_the_model_cannot_produce_is_refused_unless_ignored(six_type_model, tmp_path):
    folder, _ = six_type_model
    examples = write_corpus(tmp_path / "events", ["person", "event"], seed=2)
    args = [*train_args(tmp_path / "events", tmp_path / "eval"), "--model_name_or_path", str(folder), "--do_train",
            "false"]  # fmt: skip
    refused = run(*args, check=False)
    assert refused.returncode == 2
    assert "error: The validation split has entity types event that the model cannot produce" in refused.stderr
    assert "--ignore_unknown_types true" in refused.stderr and not (tmp_path / "eval" / "results.json").exists()

    run(*args, "--ignore_unknown_types", "true")
    test = json.loads((tmp_path / "eval" / "results.json").read_text())["test"]
    assert "event" not in test  # the event entities are left out of the scores, not counted as misses
    persons = sum(t == "B-person" for example in examples["test"] for _, t in example)
    assert test["person"]["support"] == persons and "person" in test


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--label_list", "B-person,O"], "--label_list 'B-person,O': give entity types, e.g. PER,LOC,ORG."),
        (["--label_list", "person"], "The train split has entity types location that the model cannot produce"),
    ],
)
def test_label_list_mistakes_stop_before_training(tmp_path, flags, message):
    write_corpus(tmp_path / "corpus", ["person", "location"])
    result = run(*train_args(tmp_path / "corpus", tmp_path / "out"), *flags, check=False)
    assert result.returncode == 2 and message in result.stderr


def test_a_label_list_adds_types_the_training_split_lacks(tmp_path):
    write_corpus(tmp_path / "corpus", ["person", "location"])
    run(*train_args(tmp_path / "corpus", tmp_path / "out"), "--label_list", "person,location,group",
        "--num_train_epochs", "1")  # fmt: skip
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    labels = list(bio_labels(["person", "location", "group"]))
    assert [config["id2label"][str(i)] for i in range(len(labels))] == labels
