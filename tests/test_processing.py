"""The processor: word/sub-word alignment, windows, images of every kind, save/load, collation."""

from __future__ import annotations

import io
import logging

import pytest
import torch
from PIL import Image
from tiny import tiny_config, tiny_processor
from transformers import AutoProcessor

from modeling_bga_mner import BgaMnerForTokenClassification
from processing_bga_mner import BgaMnerDataCollator, split_words
from twitter_mner import SPLIT_FILES, read_conll


@pytest.fixture
def processor(tmp_path):
    return tiny_processor(tmp_path / "tokenizer")


def test_every_word_of_the_real_corpora_gets_its_label_back(processor, shared_data):
    """All 15,076 tweets: labels sit on first sub-words, and decoding them returns each word's tag,
    also for words that tokenize to nothing (\\xa0, zero-width characters, soft hyphens: "O")."""
    empty_words = windowed = 0
    for corpus in ("twitter2015", "twitter2017"):
        for names in SPLIT_FILES.values():
            examples = list(read_conll(shared_data / corpus / names[0]))
            words = [e.tokens for e in examples]
            encoding = processor(words=words, labels=[e.labels for e in examples])
            decoded = processor.decode_predictions(encoding["labels"], encoding)
            windowed += len(encoding["input_ids"]) - len(examples)
            pieces = processor.tokenizer(words, is_split_into_words=True, add_special_tokens=False)
            for i, (example, tags) in enumerate(zip(examples, decoded, strict=True)):
                tokenized = set(pieces.word_ids(i))
                expected = [label if w in tokenized else "O" for w, label in enumerate(example.labels)]
                empty_words += len(example.tokens) - len(tokenized)
                assert tags == expected, example.tokens
            assert (encoding["attention_mask"].sum(1) <= processor.max_length).all()
    assert empty_words >= 5  # the corpora's \xa0, \u200b, \u200d and \xad tokens
    assert windowed > 0  # the letter-level tokenizer makes some tweets longer than 32 sub-words


def test_tricky_tokens_keep_the_labels_of_the_words_after_them(tmp_path):
    processor = tiny_processor(tmp_path, max_length=128)
    words = [
        "RT",
        "@JayKenMinaj",
        "\xa0",
        "Obama",
        "\u200b",
        "visits",
        "New",
        "York",
        "\xad",
        "😀",
        "#NYC",
        "http://t.co/x",
    ]
    labels = ["O", "B-PER", "O", "B-PER", "O", "O", "B-LOC", "I-LOC", "O", "O", "B-LOC", "O"]
    encoding = processor(words=words, labels=labels)
    starts = encoding["prediction_mask"][0]
    assert encoding["labels"][0][starts].tolist() == [0, 1, 1, 0, 3, 4, 0, 3, 0]
    assert processor.decode_predictions(encoding["labels"], encoding) == [labels]
    # Sub-words after the first and special tokens carry no label.
    assert (encoding["labels"][0][~starts] == -100).all()


def test_raw_text_is_split_at_white_space_with_character_spans(processor):
    words, spans = split_words("Obama\xa0visits  New York 😀")
    assert words == ["Obama", "visits", "New", "York", "😀"]
    assert spans == [(0, 5), (6, 12), (14, 17), (18, 22), (23, 24)]
    encoding = processor(text=["Obama visits New York", "hi"])
    assert encoding["num_words"].tolist() == [4, 1]


def test_long_text_is_split_into_windows_and_merged_without_losing_a_word(processor):
    words = [f"word{i}" for i in range(40)]  # 5 sub-words each with the letter tokenizer: 200 > 32
    labels = ["B-PER" if i % 3 == 0 else "O" for i in range(40)]
    encoding = processor(words=[words, ["short"]], labels=[labels, ["O"]])
    assert len(encoding["input_ids"]) > 2 and encoding["example_index"].tolist()[-1] == 1
    assert (encoding["attention_mask"].sum(1) <= 32).all()
    assert processor.decode_predictions(encoding["labels"], encoding) == [labels, ["O"]]


def test_a_single_word_longer_than_a_window_keeps_its_first_sub_word(processor):
    words = ["a" * 100, "york"]
    encoding = processor(words=words, labels=["B-LOC", "I-LOC"])
    assert processor.decode_predictions(encoding["labels"], encoding) == [["B-LOC", "I-LOC"]]


def test_label_all_subwords_gives_continuations_inside_tags(tmp_path):
    processor = tiny_processor(tmp_path, label_all_subwords=True)
    encoding = processor(words=["xyz", "ab"], labels=["B-PER", "O"])  # x ##y ##z a ##b
    assert encoding["labels"][0].tolist() == [-100, 1, 2, 2, 0, 0, -100]
    assert encoding["prediction_mask"][0].tolist() == [False, True, True, True, True, True, False]
    assert processor.decode_predictions(encoding["labels"], encoding) == [["B-PER", "O"]]


def test_bad_labels_are_reported_with_the_example(processor):
    with pytest.raises(ValueError, match="Example 1: unknown label 'B-FOO'"):
        processor(words=[["a"], ["b"]], labels=[["O"], ["B-FOO"]])
    with pytest.raises(ValueError, match="Example 0: 2 words but 1 labels"):
        processor(words=[["a", "b"]], labels=[["O"]])


def _image_bytes(mode: str, size=(40, 30), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format=fmt)
    return buffer.getvalue()


def test_images_of_every_mode_load_and_broken_files_count_as_missing(processor, tmp_path, caplog):
    paths = {}
    for mode in ["RGB", "L", "1", "P", "RGBA", "LA", "I", "F", "CMYK"]:
        fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode in ("I", "F") else "PNG")
        paths[mode] = tmp_path / f"{mode}.{fmt.lower()}"
        paths[mode].write_bytes(_image_bytes(mode, fmt=fmt))
    good = list(paths.values())
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(_image_bytes("RGB", (200, 200), "JPEG")[:300])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    missing = tmp_path / "missing.jpg"
    images = [*good, Image.new("RGB", (10, 50)), truncated, garbage, missing, None]
    crops = [[good[0], good[1], good[2]]] + [[]] * (len(images) - 2) + [[good[0]]]
    with caplog.at_level(logging.WARNING):
        pixel_values, pixel_mask = processor.load_images(images, crops)
    assert pixel_values.shape == (len(images), 3, 3, 32, 32)
    assert pixel_mask[:, 0].tolist() == [True] * (len(good) + 1) + [False] * 4
    assert pixel_mask[0].tolist() == [True, True, True]  # 2 crops kept of 3
    assert not pixel_mask[-1].any()  # a crop without its global image does not count
    assert (pixel_values[~pixel_mask] == 0).all() and pixel_values[pixel_mask].abs().sum() > 0
    assert processor.image_problems == {"unreadable": 2, "missing": 1}
    assert sum("treated as having no image" in r.message for r in caplog.records) == 1


def test_processor_saves_and_loads_through_auto_processor_without_a_prompt(processor, tmp_path):
    processor.save_pretrained(tmp_path / "saved")
    loaded = AutoProcessor.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    assert type(loaded).__name__ == "BgaMnerProcessor"
    assert (loaded.num_object_crops, loaded.max_length, loaded.label_names) == (2, 32, processor.label_names)
    words = [["Obama", "visits", "New", "York"]]
    for key, value in processor(words=words).items():
        assert torch.equal(value, loaded(words=words)[key]), key


def test_collator_pads_mapped_rows_and_loads_their_images(processor, tmp_path):
    image = tmp_path / "1.jpg"
    image.write_bytes(_image_bytes("RGB", fmt="JPEG"))
    rows = processor.encode_words(
        [["Obama", "visits"], ["New", "York", "today"]], [["B-PER", "O"], ["B-LOC", "I-LOC", "O"]]
    )
    rows[0]["image"], rows[0]["crops"] = str(image), [str(image)]
    rows[1]["image"], rows[1]["crops"] = None, []
    batch = BgaMnerDataCollator(processor)(rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["prediction_mask"].shape
    assert batch["pixel_mask"].tolist() == [[True, True, False], [False, False, False]]
    text_only = BgaMnerDataCollator(processor)([{**r, "image": None} for r in rows])
    assert "pixel_values" not in text_only

    model = BgaMnerForTokenClassification(tiny_config(text={"vocab_size": len(processor.tokenizer)})).train()
    model_inputs = {k: v for k, v in batch.items() if k not in ("word_index", "example_index", "num_words")}
    out = model(**model_inputs)
    assert torch.isfinite(out.loss) and out.reconstruction_loss > 0
