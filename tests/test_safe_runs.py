"""Runs never report or ship the wrong model, and mistakes get one clear line (issue: safe runs and a clean
first hour). Each test fails on the code before the fix."""

from __future__ import annotations

import fcntl
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_run_mner import FIXTURES, SMOKE, run
from tiny import tiny_config, tiny_processor
from transformers import pipeline

from modeling_bga_mner import BgaMnerForTokenClassification
from predict_mner import main as predict_main
from twitter_mner import CorpusFormatError, image_status, load_mner_dataset, read_conll

ONE_EPOCH = (str(SMOKE), "--num_train_epochs", "1")


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------------------------------------
# never the wrong model


def test_a_used_output_folder_is_refused_and_overwrite_starts_clean(tmp_path):
    output = tmp_path / "model"
    run(str(SMOKE), "--num_train_epochs", "3", "--output_dir", str(output))
    first = load_file(output / "model.safetensors")

    again = run(*ONE_EPOCH, "--output_dir", str(output), check=False)
    assert again.returncode == 2 and error_lines(again) == [
        f"error: {output} holds an earlier run: pass --overwrite_output_dir to start clean, --resume_from_checkpoint "
        "latest to continue it, or another --output_dir."
    ]
    assert torch.equal(load_file(output / "model.safetensors")["classifier.weight"], first["classifier.weight"])

    # A 1-epoch run with learning rate 0 into the folder: its results and weights are its own.
    run(*ONE_EPOCH, "--learning_rate", "0", "--crf_learning_rate", "0", "--output_dir", str(output),
        "--overwrite_output_dir")  # fmt: skip
    results = json.loads((output / "results.json").read_text())
    assert results["best_step"] == 3  # 24 tweets / 8 = 3 steps: not the earlier run's best step
    assert not torch.equal(load_file(output / "model.safetensors")["classifier.weight"], first["classifier.weight"])


def test_a_folder_in_use_stops_a_second_run_at_once_and_a_stale_lock_does_not(tmp_path):
    output = tmp_path / "model"
    output.mkdir()
    with open(output / ".run.lock", "a+") as held:  # another live run holds the folder
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242")
        held.flush()
        second = run(*ONE_EPOCH, "--output_dir", str(output), check=False)
    assert second.returncode == 2
    assert error_lines(second) == [f"error: {output} is in use by another run (process 4242); wait for it to end."]
    assert not (output / "checkpoints").exists()
    # The holder is gone (a killed run leaves the file, not the lock): the next run goes ahead.
    run(*ONE_EPOCH, "--output_dir", str(output))
    assert (output / "model.safetensors").exists()


def test_a_diverged_run_stops_with_an_error_and_saves_nothing(tmp_path):
    output = tmp_path / "model"
    diverged = run(*ONE_EPOCH, "--learning_rate", "1e3", "--crf_learning_rate", "1e3", "--max_grad_norm", "0",
                   "--output_dir", str(output), check=False)  # fmt: skip
    assert diverged.returncode != 0 and "training diverged" in diverged.stderr
    assert not (output / "model.safetensors").exists() and not (output / "README.md").exists()
    for saved in output.rglob("model.safetensors"):  # no best model with a non-finite weight either
        assert all(torch.isfinite(t).all() for t in load_file(saved).values())


def test_resuming_without_the_random_states_warns_and_records_an_inexact_resume(tmp_path):
    output = tmp_path / "model"
    run(str(SMOKE), "--num_train_epochs", "2", "--max_steps_per_run", "2", "--output_dir", str(output))
    (output / "checkpoints" / "step_2" / "random_states_0.pkl").unlink()
    resumed = run(
        str(SMOKE), "--num_train_epochs", "2", "--resume_from_checkpoint", "latest", "--output_dir", str(output)
    )
    assert "WARNING" in resumed.stderr and "no loadable random states for process 0" in resumed.stderr
    results = json.loads((output / "results.json").read_text())
    assert results["resumed_from_step"] == 2 and results["resume_exact"] is False


def test_resume_latest_on_an_empty_folder_starts_fresh(tmp_path):
    output = tmp_path / "model"
    fresh = run(*ONE_EPOCH, "--resume_from_checkpoint", "latest", "--output_dir", str(output))
    assert "no checkpoint in" in fresh.stderr and "starting a new run" in fresh.stderr
    assert "resumed_from_step" not in json.loads((output / "results.json").read_text())


def test_an_unwritable_output_folder_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("x")
    result = run(*ONE_EPOCH, "--output_dir", str(tmp_path / "file" / "model"), check=False)
    assert result.returncode == 2 and "training" not in result.stderr
    assert error_lines(result) == [
        f"error: cannot write to the output folder {tmp_path / 'file' / 'model'}: Not a directory."
    ]


# ------------------------------------------------------------------------------------------------
# the first hour: one line, exit 2


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda d: (d / "c.yaml").write_text("data_dir: x\nlearning_rat: 3\n"), "c.yaml: unknown key 'learning_rat'"),
        (lambda d: (d / "c.yaml").write_text("data_dir: [x\n"), "c.yaml:2: not valid YAML / JSON"),
        (lambda d: None, "c.yaml: no such configuration file."),
        (lambda d: (d / "c.yaml").write_text(f"data_dir: {d / 'nowhere'}\n"), "nowhere: no such data folder."),
        (
            lambda d: (d / "c.yaml").write_text(f"data_dir: {FIXTURES / 'tiny-corpus'}\nimage_dir: {d / 'imgs'}\n"),
            "imgs: no such image folder.",
        ),  # fmt: skip
    ],
)
def test_configuration_mistakes_print_one_line_and_exit_2(tmp_path, setup, expected):
    setup(tmp_path)
    result = run(str(tmp_path / "c.yaml"), "--output_dir", str(tmp_path / "o"), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-1500:]
    assert len(error_lines(result)) == 1 and expected in error_lines(result)[0]
    debug = run(str(tmp_path / "c.yaml"), "--output_dir", str(tmp_path / "o"), "--debug", check=False)
    assert "Traceback" in debug.stderr


def test_option_prefixes_are_not_accepted(tmp_path):
    result = run(str(SMOKE), "--learning_rat", "1e-3", "--output_dir", str(tmp_path / "o"), check=False)
    assert result.returncode == 2 and error_lines(result) == ["error: unknown option: ['--learning_rat', '1e-3']"]


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed here")
def test_a_requested_tracker_that_is_not_installed_is_an_error(tmp_path):
    result = run(*ONE_EPOCH, "--report_to", "tensorboard", "--output_dir", str(tmp_path / "o"), check=False)
    assert result.returncode == 2 and "requirements-trackers.txt" in error_lines(result)[0]


def test_a_normal_run_prints_no_load_report_and_never_prompts(
    tmp_path,
):
    first = run(*ONE_EPOCH, "--output_dir", str(tmp_path / "a"))
    assert "UNEXPECTED" not in first.stderr + first.stdout and "LOAD REPORT" not in first.stderr
    again = run(*ONE_EPOCH, "--model_name_or_path", str(tmp_path / "a"), "--output_dir", str(tmp_path / "b"))
    assert "Do you wish to run the custom code" not in again.stdout + again.stderr


# ------------------------------------------------------------------------------------------------
# data and images


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_the_reader_names_file_and_line_for_bad_columns_encoding_and_a_trailing_imgid(tmp_path):
    three = write(tmp_path / "a.txt", b"IMGID:1\nObama\tB-PER\nvisits\tNNP\tO\n")
    with pytest.raises(
        CorpusFormatError, match=r"a.txt:3: expected 'token<TAB>label' \(2 columns\), got 3 column\(s\)"
    ):
        list(read_conll(three))
    latin1 = write(tmp_path / "b.txt", "IMGID:1\nCaf\u00e9\tO\n".encode("latin-1"))
    with pytest.raises(CorpusFormatError, match=r"b.txt:2: not UTF-8 \(byte 0xe9 at column 4\)"):
        list(read_conll(latin1))
    trailing = write(tmp_path / "c.txt", b"IMGID:1\nObama\tB-PER\n\nIMGID:2\n")
    with pytest.raises(CorpusFormatError, match=r"c.txt:4: IMGID line without any token line after it"):
        list(read_conll(trailing))
    bom = write(tmp_path / "d.txt", "\ufeffObama\tB-PER\nvisits\tO\n".encode())
    assert [e.tokens for e in read_conll(bom)] == [["Obama", "visits"]]


def header_only_bomb(path: Path) -> Path:
    """A file of a few hundred bytes whose header says 11000 x 11000 pixels (a 1-bit PNG, named .jpg)."""
    Image.new("1", (11000, 11000)).save(path, format="PNG")
    return path


def test_an_image_too_large_by_its_header_is_never_decoded_and_is_counted(tmp_path):
    bomb = header_only_bomb(tmp_path / "1.jpg")
    assert bomb.stat().st_size < 100_000
    assert image_status(bomb, max_pixels=36_000_000) == "too large"
    assert image_status(bomb, max_pixels=200_000_000) == "ok"
    processor = tiny_processor(tmp_path / "tokenizer")
    pixel_values, pixel_mask = processor.load_images([str(bomb), str(FIXTURES / "tiny-corpus" / "images" / "1.jpg")])
    assert pixel_mask[:, 0].tolist() == [False, True] and processor.image_problems == {"too large": 1}

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split in ("train", "valid", "test"):
        (corpus / f"{split}.txt").write_text("IMGID:1\nObama\tB-PER\n\nIMGID:2\nParis\tB-LOC\n\nIMGID:3\nx\tO\n")
    images = tmp_path / "images"
    images.mkdir()
    header_only_bomb(images / "1.jpg")
    (images / "2.jpg").write_bytes(b"not an image")
    data = load_mner_dataset(corpus, image_dir=images)
    assert data["train"]["image_status"] == ["too large", "unreadable", "missing"]
    assert data["train"]["image"] == [None, None, None]


# ------------------------------------------------------------------------------------------------
# inference and prediction


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    processor = tiny_processor(folder, max_length=32)
    processor.tokenizer.model_max_length = int(1e30)  # a tokenizer that states no limit, as some Hub ones
    torch.manual_seed(0)
    model = BgaMnerForTokenClassification(tiny_config(text={"vocab_size": len(processor.tokenizer)}))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_the_pipeline_reads_a_long_text_in_windows_and_tags_every_word(saved):
    ner = pipeline("token-classification", model=str(saved), trust_remote_code=True)
    assert ner.max_length == 32  # the processor's windows (config.max_text_length), not the tokenizer's "no limit"
    text = "Obama visits Paris " * 300  # 2,900+ sub-words
    words = ner(text, aggregation_strategy="none", ignore_labels=[])
    assert [w["word"] for w in words] == text.split()
    assert [w["start"] for w in words] == [
        i for i in range(len(text)) if text[i] != " " and (i == 0 or text[i - 1] == " ")
    ]


def test_prediction_mistakes_get_one_line(saved, tmp_path, capsys):
    mixed = write(tmp_path / "m.conll", b"Obama\tB-PER\nvisits\nParis\tB-LOC\n")
    with pytest.raises(SystemExit, match=r"m.conll:2: no label on this token line, but line 1 has one"):
        predict_main(["--model", str(saved), "--input", str(mixed), "--output", str(tmp_path / "o.conll")])
    with pytest.raises(SystemExit) as exit_:
        predict_main(["--model", str(saved), "--input", str(mixed), "--output", str(tmp_path)])
    assert exit_.value.code == 2 and f"--output {tmp_path} is a folder: give a file name" in capsys.readouterr().err
    latin1 = write(tmp_path / "l.txt", "Caf\u00e9 in Paris\n".encode("latin-1"))
    with pytest.raises(SystemExit, match=r"l.txt:1: not UTF-8"):
        predict_main(["--model", str(saved), "--input", str(latin1), "--output", str(tmp_path / "o.jsonl")])
    text = write(tmp_path / "t.txt", b"Obama visits Paris\n")
    with pytest.raises(SystemExit, match=r"^error: --model .*nowhere: no such folder, and no Hub model"):
        predict_main(
            ["--model", str(tmp_path / "nowhere"), "--input", str(text), "--output", str(tmp_path / "o.jsonl")]
        )


def test_processor_and_model_inputs_are_checked(tmp_path):
    processor = tiny_processor(tmp_path)
    with pytest.raises(ValueError, match="No text given"):
        processor(text=[])
    with pytest.raises(ValueError, match="Got 2 texts but 1 images"):
        processor(text=["Obama visits Paris", "x"], images=[None])
    torch.manual_seed(0)
    model = BgaMnerForTokenClassification(tiny_config(text={"vocab_size": len(processor.tokenizer)})).train()
    batch = processor(
        text=["Obama visits Paris", "x"], images=[str(FIXTURES / "tiny-corpus" / "images" / "1.jpg"), None]
    )
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "pixel_values")}
    losses = []
    for mask in (batch["pixel_mask"], batch["pixel_mask"].long(), batch["pixel_mask"].int()):  # bool or 0/1 ints
        torch.manual_seed(1)
        losses.append(
            model(**inputs, pixel_mask=mask, labels=torch.where(batch["prediction_mask"].bool(), 0, -100)).loss
        )
    assert losses[0] == losses[1] == losses[2] and torch.isfinite(losses[0])


def test_prepare_crops_without_its_detector_offline_says_how_to_provide_it(tmp_path, monkeypatch):
    from prepare_crops import main as crops_main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text("IMGID:1\nObama\tB-PER\n")
    (tmp_path / "images").mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match=r"cannot load the detector 'no-such/detector'.*--detector"):
        crops_main(["--data_dir", str(corpus), "--image_dir", str(tmp_path / "images"), "--output_dir",
                    str(tmp_path / "out"), "--detector", "no-such/detector"])  # fmt: skip
