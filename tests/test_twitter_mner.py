"""The datasets builder: real corpus counts, clear errors with file and line, images and crops."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
from PIL import Image
from seqeval.metrics.sequence_labeling import get_entities

from twitter_mner import CorpusFormatError, load_mner_dataset, read_conll, without_decoding


def entity_counts(dataset) -> dict[str, int]:
    names = dataset.features["ner_tags"].feature.names
    return dict(Counter(kind for tags in dataset["ner_tags"] for kind, _, _ in get_entities([names[t] for t in tags])))


def first_tag_counts(dataset) -> dict[str, int]:
    names = dataset.features["ner_tags"].feature.names
    return dict(Counter(names[t][2:] for tags in dataset["ner_tags"] for t in tags if names[t].startswith("B-")))


def test_twitter2017_matches_the_papers_table_1(shared_data, tmp_path):
    data = load_mner_dataset(shared_data / "twitter2017", "twitter2017", cache_dir=tmp_path)
    assert {split: len(data[split]) for split in data} == {"train": 3373, "validation": 723, "test": 723}
    assert entity_counts(data["train"]) == {"PER": 2943, "LOC": 731, "ORG": 1674, "MISC": 701}
    assert entity_counts(data["validation"]) == {"PER": 626, "LOC": 173, "ORG": 375, "MISC": 150}
    assert entity_counts(data["test"]) == {"PER": 621, "LOC": 178, "ORG": 395, "MISC": 157}


def test_twitter2015_counts_and_orphan_inside_tags(shared_data, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        data = load_mner_dataset(shared_data / "twitter2015", "twitter2015", cache_dir=tmp_path)
    assert {split: len(data[split]) for split in data} == {"train": 4000, "validation": 1000, "test": 3257}
    # B- tags; the paper's Table 1 has the same PER / LOC and slightly more ORG / MISC (928/940, 247/225, 839/726).
    assert first_tag_counts(data["train"]) == {"PER": 2217, "LOC": 2091, "ORG": 927, "MISC": 931}
    assert first_tag_counts(data["validation"]) == {"PER": 552, "LOC": 522, "ORG": 247, "MISC": 220}
    assert first_tag_counts(data["test"]) == {"PER": 1816, "LOC": 1697, "ORG": 839, "MISC": 720}
    # Orphan I- tags are kept, warned about, and count as entities the way conlleval / seqeval count them.
    assert [m for r in caplog.records for m in [r.getMessage()] if "orphan" in m] == [
        f"{shared_data / 'twitter2015' / f}: {n} orphan I- tags (an I- tag without B- before it); kept as they are: "
        "the evaluation counts each as an entity, as conlleval does."
        for f, n in [("train.txt", 186), ("valid.txt", 53), ("test.txt", 135)]
    ]
    assert sum(entity_counts(data["train"]).values()) == 6352
    assert data["train"][0]["image_id"] == "1015799" and data["train"][0]["image"] is None


def write_corpus(folder, train="IMGID:1\nObama\tB-PER\nspeaks\tO\n\nIMGID:2\nParis\tB-LOC\n", valid=None, test=None):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in [("train.txt", train), ("valid.txt", valid), ("test.txt", test)]:
        text = train if text is None else text
        if text is not False:
            (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.mark.parametrize(
    ("train", "message"),
    [
        (
            "IMGID:1\nObama B-PER\n",
            r"train.txt:2: expected 'token<TAB>label' \(2 columns\), got 1 column\(s\): 'Obama B-PER'",
        ),
        ("Obama\tB-PER\nParis\tPERSON\n", r"train.txt:2: label 'PERSON' is not BIO: expected O, B-<type> or I-<t"),
        ("Obama\tS-PER\n", r"train.txt:1: label 'S-PER' is BIOES / BILOU; only BIO is supported: convert S-X to B-X"),
        ("Obama\tB-PER\nCook\tE-PER\n", r"train.txt:2: label 'E-PER' is BIOES / BILOU"),
        ("", r"train.txt: no example in the file"),
        ("\n\n", r"train.txt: no example in the file"),
        ("a\tO\nIMGID:3\nb\tO\n", r"train.txt:2: IMGID line inside an example"),
        ("\tO\n", r"train.txt:1: expected 'token<TAB>label', got an empty token"),
    ],
)
def test_malformed_files_are_reported_with_file_and_line(tmp_path, train, message):
    folder = write_corpus(tmp_path / "corpus", train=train, valid="a\tO\n", test="a\tO\n")
    with pytest.raises(CorpusFormatError, match=message):
        load_mner_dataset(folder, cache_dir=tmp_path / "cache")


def test_twitter_corpora_keep_their_four_types_and_refuse_others(tmp_path):
    folder = write_corpus(tmp_path / "corpus", train="Obama\tB-PER\nParis\tB-CITY\n", valid="a\tO\n", test="a\tO\n")
    with pytest.raises(CorpusFormatError, match=r"train.txt:2: unknown label 'B-CITY'; expected one of O, B-PER"):
        load_mner_dataset(folder, "twitter2015", cache_dir=tmp_path / "cache")
    names = load_mner_dataset(folder, cache_dir=tmp_path / "cache")["train"].features["ner_tags"].feature.names
    assert names == ["O", "B-PER", "I-PER", "B-CITY", "I-CITY"]  # any other corpus: its own types


def test_missing_split_file_and_folder_are_named(tmp_path):
    folder = write_corpus(tmp_path / "corpus", test=False)
    with pytest.raises(FileNotFoundError, match=r"test.txt: split file missing; .*found: train.txt, valid.txt"):
        load_mner_dataset(folder, cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="no such data folder"):
        load_mner_dataset(tmp_path / "nowhere", cache_dir=tmp_path / "cache")


def test_other_is_read_as_misc_and_crlf_and_nbsp_tokens_survive(tmp_path):
    folder = write_corpus(
        tmp_path / "corpus", train="IMGID:7\r\nThe\tO\r\n\xa0\tO\r\nOscars\tB-OTHER\r\nshow\tI-OTHER\r\n"
    )
    train = load_mner_dataset(folder, cache_dir=tmp_path / "cache")["train"]
    example, names = train[0], train.features["ner_tags"].feature.names
    assert example["tokens"] == ["The", "\xa0", "Oscars", "show"]
    assert [names[t] for t in example["ner_tags"]] == ["O", "O", "B-MISC", "I-MISC"]


def test_images_and_hvpnet_crops_are_found_and_missing_images_counted(tmp_path, caplog):
    folder = write_corpus(tmp_path / "corpus")
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "1.jpg")  # image 2 is missing
    for split in ("train", "val", "test"):
        crops = tmp_path / "aux" / split / "crops"
        crops.mkdir(parents=True)
        for k in (2, 0, 1, 3, 10):
            Image.new("RGB", (4, 4)).save(crops / f"1_pred_yolo_crop_{k}.png")
    with caplog.at_level(logging.WARNING):
        data = load_mner_dataset(
            folder, image_dir=images, crop_dir=tmp_path / "aux", num_crops=3, cache_dir=tmp_path / "c"
        )
    first, second = without_decoding(data)["validation"][0], data["validation"][1]
    assert first["image"]["path"] == str(images / "1.jpg")
    assert [c["path"].rsplit("/", 3)[1:] for c in first["crops"]] == [
        ["val", "crops", f"1_pred_yolo_crop_{k}.png"] for k in (0, 1, 2)
    ]
    assert second["image"] is None and second["crops"] == []
    assert any(
        "train split: 1 of 2 images usable" in r.getMessage() and "1 missing" in r.getMessage() for r in caplog.records
    )


def test_read_conll_reads_unlabelled_files(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text("Obama\nvisits\n\nParis\n", encoding="utf-8")
    examples = list(read_conll(path, labelled=False))
    assert [(e.tokens, e.labels, e.line) for e in examples] == [
        (["Obama", "visits"], ["O", "O"], 1),
        (["Paris"], ["O"], 4),
    ]
