"""prepare_crops.py with a tiny random OWLv2 detector built here (no download)."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2Processor
from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil

from prepare_crops import clip_box, main, query_phrases
from twitter_mner import load_mner_dataset

CORPUS = Path(__file__).resolve().parent / "fixtures" / "tiny-corpus"


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("owlv2")
    vocab = {"<|endoftext|>": 0, "<|startoftext|>": 1}  # OWL treats a query whose first id is 0 as padding
    for piece in string.ascii_lowercase + string.digits:
        vocab[piece], vocab[piece + "</w>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16, bos_token="<|startoftext|>")
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=16,
        bos_token_id=1,
        eos_token_id=0,
        pad_token_id=0,
    )
    vision = dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=32, patch_size=8
    )
    torch.manual_seed(0)
    model = Owlv2ForObjectDetection(Owlv2Config(text_config=text, vision_config=vision, projection_dim=32))
    with torch.no_grad():  # boxes = the patch grid's prior boxes, so that random weights still give real boxes
        model.box_head.dense2.weight.zero_()
        model.box_head.dense2.bias.zero_()
    model.save_pretrained(folder)
    Owlv2Processor(Owlv2ImageProcessorPil(size={"height": 32, "width": 32}), tokenizer).save_pretrained(folder)
    return folder


def test_query_phrases_are_the_candidate_entity_phrases():
    tokens = ["RT", "@news", ":", "Obama", "visits", "New", "York", "#NYC", "http://t.co/x"]
    assert query_phrases(tokens) == ["Obama", "New York NYC"]
    assert query_phrases(["great", "day", "@x"]) == ["great day"]


def test_boxes_are_clipped_to_the_image():
    assert clip_box([-5.2, 3.6, 70.0, 20.4], 60, 40) == (0, 4, 60, 20)
    assert clip_box([70.0, 3.0, 90.0, 20.0], 60, 40) is None


def test_crops_are_written_for_every_tweet_with_an_image_and_a_rerun_skips_them(detector, tmp_path):
    output = tmp_path / "crops"
    args = ["--data_dir", str(CORPUS), "--image_dir", str(CORPUS / "images"), "--output_dir", str(output),
            "--detector", str(detector), "--top_k", "2", "--score_threshold", "-1", "--batch_size", "4"]  # fmt: skip
    report = main(args)
    for split, folder, text in [
        ("train", "train", "train.txt"),
        ("validation", "val", "valid.txt"),
        ("test", "test", "test.txt"),
    ]:
        ids = [line[6:] for line in (CORPUS / text).read_text().splitlines() if line.startswith("IMGID:")]
        with_image = [i for i in ids if (CORPUS / "images" / f"{i}.jpg").exists()]
        written = sorted(p.name for p in (output / folder / "crops").iterdir())
        assert written == sorted(f"{i}_pred_yolo_crop_{k}.png" for i in with_image for k in range(2))
        assert report[split]["crops"] == 2 * len(with_image) and report[split]["missing"] == len(ids) - len(with_image)
        missing = (output / folder / "missing_images.txt").read_text().split()
        assert missing == [i for i in ids if i not in with_image]
        for name in written:
            crop = Image.open(output / folder / "crops" / name)
            assert crop.width <= 32 and crop.height <= 32 and crop.width * crop.height > 0

    before = {p: p.stat().st_mtime_ns for p in output.rglob("*.png")}
    again = main(args)
    assert all(counts["crops"] == 0 and counts["skipped_done"] == counts["tweets"] for counts in again.values())
    assert {p: p.stat().st_mtime_ns for p in output.rglob("*.png")} == before

    data = load_mner_dataset(
        CORPUS, image_dir=CORPUS / "images", crop_dir=output, num_crops=3, cache_dir=tmp_path / "c"
    )
    with_crops = [example for example in data["train"] if example["image"]]
    assert with_crops and all(len(example["crops"]) == 2 for example in with_crops)


def test_image_ids_that_would_leave_the_output_folder_are_refused(detector, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text("IMGID:1\nParis\tB-LOC\n\nIMGID:../../escaped\nObama\tB-PER\n")
    images = tmp_path / "images"
    images.mkdir()
    for name in ("1", "escaped"):
        Image.new("RGB", (40, 30), "red").save(images / f"{name}.jpg")
    output = tmp_path / "a" / "b" / "out"
    with pytest.raises(SystemExit, match=r"train.txt:4: image id '../../escaped' cannot be a file name"):
        main(["--data_dir", str(corpus), "--image_dir", str(images), "--output_dir", str(output),
              "--detector", str(detector)])  # fmt: skip
    assert not [p for p in tmp_path.rglob("*escaped*") if p.parent != images]
