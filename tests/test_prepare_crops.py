"""prepare_crops.py with a tiny random OWLv2 detector built here (no download)."""

from __future__ import annotations

import os
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
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


KILL_AT_FIFTH_SAVE = """
import os, sys
from PIL import Image
saves, save = [], Image.Image.save
def save_or_die(self, path, *args, **kwargs):
    saves.append(path)
    if len(saves) == 5:  # killed while writing the fifth crop: half a file is left behind
        with open(path, "wb") as handle:
            handle.write(b"\\x89PNG\\r\\n")
        os._exit(137)
    return save(self, path, *args, **kwargs)
Image.Image.save = save_or_die
sys.path.insert(0, {root!r})
import prepare_crops
prepare_crops.main(sys.argv[1:])
"""


def test_a_run_killed_in_the_middle_of_a_split_resumes_to_the_same_crops_of_non_square_images(detector, tmp_path):
    # Wide and tall images. OWLv2 sees them padded to a square; the tiny detector's boxes are its prior boxes: on a
    # 4 x 4 grid over the square, a quarter of its side, centred on the grid's corners (k + 1) / 4. So every crop
    # must be one of those 16 x 16 cells of the 64-pixel square, cut at the image's border.
    rng = np.random.default_rng(0)
    corpus, images = tmp_path / "corpus", tmp_path / "images"
    corpus.mkdir(), images.mkdir()
    sizes = {"1": (64, 32), "2": None, "3": (32, 64), "4": (64, 32), "5": (32, 64)}  # "2": no image
    for image_id, size in sizes.items():
        if size is not None:
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(images / f"{image_id}.jpg", format="PNG")  # lossless noise
    (corpus / "train.txt").write_text("".join(f"IMGID:{i}\nParis\tB-LOC\nHilton\tB-PER\n\n" for i in sizes))

    def args(output: Path) -> list[str]:
        paths = ["--data_dir", str(corpus), "--image_dir", str(images), "--output_dir", str(output)]
        return [*paths, "--detector", str(detector), "--top_k", "2", "--score_threshold", "-1", "--batch_size", "2"]

    main(args(tmp_path / "straight"))
    script = tmp_path / "kill.py"
    script.write_text(KILL_AT_FIFTH_SAVE.format(root=str(CORPUS.parents[2])))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, str(script), *args(tmp_path / "resumed")], env=env, capture_output=True)
    assert killed.returncode == 137, killed.stderr[-2000:]
    folder = tmp_path / "resumed" / "train"
    assert (folder / "done.txt").read_text().split() == ["1", "2"]  # the first batch; the second was cut short
    assert (folder / "crops" / "3_pred_yolo_crop_0.png").exists()  # ... after its first crops were written
    resumed = main(args(tmp_path / "resumed"))
    assert resumed["train"]["skipped_done"] == 2 and resumed["train"]["crops"] == 6

    straight = tmp_path / "straight" / "train"
    names = sorted(p.name for p in (straight / "crops").iterdir())
    assert names == sorted(f"{i}_pred_yolo_crop_{k}.png" for i in ("1", "3", "4", "5") for k in (0, 1))
    assert sorted(p.name for p in (folder / "crops").iterdir()) == names
    for name in names:  # the resumed run's crops are the straight run's, byte for byte
        assert (folder / "crops" / name).read_bytes() == (straight / "crops" / name).read_bytes(), name
    assert (folder / "missing_images.txt").read_text() == (straight / "missing_images.txt").read_text() == "2\n"
    assert sorted((folder / "done.txt").read_text().split()) == sorted(sizes)

    for name in names:
        image = np.asarray(Image.open(images / f"{name.split('_')[0]}.jpg"))
        crop = np.asarray(Image.open(straight / "crops" / name))
        cells = [image[y : y + 16, x : x + 16] for y in range(8, 64, 16) for x in range(8, 64, 16)]
        assert any(np.array_equal(crop, cell) for cell in cells if cell.size), name
