"""Corpora the `datasets` way: images as `Image()` features, a Parquet export with embedded images that
`datasets.load_dataset` reads back, and training and prediction from such a dataset."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image
from test_run_mner import FIXTURES, SMOKE, run

from predict_mner import main as predict_main
from twitter_mner import export, load_mner_dataset, without_decoding
from twitter_mner import main as twitter_main


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """The smoke corpus copied here, exported, and its images then deleted: only the embedded bytes remain."""
    root = tmp_path_factory.mktemp("export")
    shutil.copytree(FIXTURES / "tiny-corpus", root / "corpus")
    reference = root / "reference"
    shutil.copytree(root / "corpus" / "images", reference)
    corpus = root / "corpus"
    folders = ["--data_dir", str(corpus), "--image_dir", str(corpus / "images"), "--crop_dir", str(corpus / "crops")]
    twitter_main(["export", *folders, "--name", "twitter2015", "--num_crops", "2", "--output", str(root / "dataset")])
    shutil.rmtree(corpus / "images")
    shutil.rmtree(corpus / "crops")
    return root / "dataset", reference


def test_images_are_image_features_decoded_lazily(tmp_path):
    corpus = FIXTURES / "tiny-corpus"
    data = load_mner_dataset(corpus, "twitter2015", corpus / "images", corpus / "crops", 2, cache_dir=tmp_path)
    assert isinstance(data["train"].features["image"], datasets.Image)
    first = next(example for example in data["train"] if example["image"] is not None)
    assert isinstance(first["image"], Image.Image) and all(isinstance(c, Image.Image) for c in first["crops"])
    raw = without_decoding(data)["train"][0]
    assert set(raw["image"]) == {"bytes", "path"} and Path(raw["image"]["path"]).is_file()


def test_the_export_loads_back_with_the_same_rows_features_and_pixels_without_the_image_files(exported):
    folder, reference = exported
    assert sorted(p.name for p in (folder / "data").iterdir()) == [
        "test-00000-of-00001.parquet",
        "train-00000-of-00001.parquet",
        "validation-00000-of-00001.parquet",
    ]
    loaded = datasets.load_dataset(str(folder))
    corpus = FIXTURES / "tiny-corpus"
    original = load_mner_dataset(corpus, "twitter2015")  # the text, from the shipped fixture
    for split in ("train", "validation", "test"):
        assert loaded[split].features["ner_tags"] == original[split].features["ner_tags"]
        for key in ("id", "image_id", "tokens", "ner_tags"):
            assert loaded[split][key] == original[split][key], (split, key)
        for example in loaded[split]:
            if example["image_status"] == "ok":
                expected = np.asarray(Image.open(reference / f"{example['image_id']}.jpg").convert("RGB"))
                assert np.array_equal(np.asarray(example["image"].convert("RGB")), expected)
                assert len(example["crops"]) <= 2
            else:
                assert example["image"] is None and example["crops"] == []
    assert Counter(loaded["train"]["image_status"]) == {"ok": 20, "missing": 4}
    card = (folder / "README.md").read_text()
    assert "license: other" in card and "O, B-PER, I-PER, B-LOC, I-LOC, B-ORG, I-ORG, B-MISC, I-MISC" in card
    assert "train 24, validation" in card and "Zhang et al." in card


def test_training_from_the_exported_dataset_equals_training_from_the_folders(exported, tmp_path):
    folder, _ = exported
    common = [str(SMOKE), "--num_train_epochs", "3"]
    run(*common, "--output_dir", str(tmp_path / "folders"))
    run(*common, "--dataset", str(folder), "--output_dir", str(tmp_path / "dataset"))  # over the YAML's data_dir
    from_folders = json.loads((tmp_path / "folders" / "results.json").read_text())
    from_dataset = json.loads((tmp_path / "dataset" / "results.json").read_text())
    assert from_dataset == from_folders and from_dataset["training_images"]["with_image"] == 20
    predictions = (tmp_path / "dataset" / "test_predictions.conll").read_text()
    assert predictions == (tmp_path / "folders" / "test_predictions.conll").read_text()

    predict_main(["--model", str(tmp_path / "dataset"), "--dataset", str(folder), "--split", "test",
                  "--output", str(tmp_path / "predicted.conll")])  # fmt: skip
    assert (tmp_path / "predicted.conll").read_text() == predictions


def test_the_real_corpora_export_with_their_known_sizes_and_round_trip_exactly(shared_data, tmp_path):
    sizes = {"twitter2015": (4000, 1000, 3257), "twitter2017": (3373, 723, 723)}
    for name, expected in sizes.items():
        corpus = load_mner_dataset(shared_data / name, name, cache_dir=tmp_path / "cache")
        loaded = datasets.load_dataset(str(export(corpus, tmp_path / name, name)))
        assert tuple(len(loaded[split]) for split in ("train", "validation", "test")) == expected
        for split in ("train", "validation", "test"):
            assert loaded[split].features == corpus[split].features
            for key in ("id", "image_id", "tokens", "ner_tags"):
                assert loaded[split][key] == corpus[split][key], (name, split, key)
    per_type = Counter(
        loaded["train"].features["ner_tags"].feature.names[t][2:]
        for tags in loaded["train"]["ner_tags"]
        for t in tags
        if loaded["train"].features["ner_tags"].feature.names[t].startswith("B-")
    )
    assert per_type == {"PER": 2943, "LOC": 731, "ORG": 1674, "MISC": 701}  # Twitter2017 train, the paper's Table 1
