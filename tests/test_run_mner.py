"""run_mner.py end to end on the tiny fixtures: outputs, exact resume, exact distributed evaluation,
and the errors raised before any training starts."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForTokenClassification, AutoProcessor

from run_mner import compute_metrics, parse_arguments

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
FIXTURES = ROOT / "tests" / "fixtures"


# `accelerate launch --cpu --num_processes 2` starts ONE process; this starts two CPU processes (torchrun).
TWO_CPU_PROCESSES = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                     "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")  # fmt: skip


def run(
    *args: str, launcher: tuple[str, ...] = (sys.executable,), check: bool = True, script: str = "run_mner.py"
) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(
        [*launcher, str(ROOT / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    if check and result.returncode != 0:
        raise AssertionError(result.stdout[-3000:] + result.stderr[-5000:])
    return result


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("smoke") / "model"
    result = run(str(SMOKE), "--output_dir", str(output))
    (output.parent / "training.log").write_text(result.stderr)
    return output


def test_smoke_configuration_trains_and_leaves_a_loadable_model_repository(smoke_run):
    results = json.loads((smoke_run / "results.json").read_text())
    assert set(results) == {"best_step", "validation", "test", "mechanism", "training_images", "images", "world_size"}
    assert results["world_size"] == 1
    assert results["images"]["train"] == {"missing": 4, "ok": 20}  # the fixture lacks 4 train images
    # The saved model is the best one by dev F1: evaluating it again gives the best dev F1 seen in training.
    best = json.loads((smoke_run / "checkpoints" / "best" / "best.json").read_text())
    assert best["step"] == results["best_step"] and best["f1"] == results["validation"]["overall"]["f1"]
    # ... and it is the first evaluation with the highest dev F1 of the run, which is not the last one here.
    logged = re.findall(r"step (\d+): dev F1 (\d+\.\d+)", (smoke_run.parent / "training.log").read_text())
    scores = {int(step): float(f1) for step, f1 in logged}
    assert len(scores) == 15 and max(scores.values()) > 0
    assert results["best_step"] == min(s for s in scores if scores[s] == max(scores.values()))
    assert round(100 * best["f1"], 2) == max(scores.values())
    # The mechanism at the end of training, per BGA layer (the smoke model has 2): no sampler has collapsed
    # onto the always-kept token, and the generation losses were active (the smoke corpus has images).
    mechanism = results["mechanism"]
    assert set(mechanism) == {"text_keep_ratio", "visual_keep_ratio", "layer_reconstruction_loss", "layer_cycle_loss"}
    assert all(len(values) == 2 for values in mechanism.values())
    assert all(0.2 < r < 0.9 for r in mechanism["text_keep_ratio"] + mechanism["visual_keep_ratio"]), mechanism
    assert all(loss > 0 for loss in mechanism["layer_reconstruction_loss"] + mechanism["layer_cycle_loss"])
    assert {"PER", "LOC", "ORG", "MISC"} <= set(results["test"])

    model = AutoModelForTokenClassification.from_pretrained(smoke_run, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(smoke_run, trust_remote_code=True)
    inputs = processor(words=[["Obama", "visits", "Paris"]])
    keys = ("input_ids", "attention_mask", "token_type_ids", "prediction_mask")
    tags = processor.decode_predictions(model(**{k: inputs[k] for k in keys}).predictions, inputs)
    assert len(tags[0]) == 3

    lines = [line.split("\t") for line in (smoke_run / "test_predictions.conll").read_text().splitlines()]
    rows = [line for line in lines if len(line) == 3]
    gold = [line.split("\t") for line in (FIXTURES / "tiny-corpus" / "test.txt").read_text().splitlines()]
    assert [r[:2] for r in rows] == [[t, g.replace("OTHER", "MISC")] for t, g in (x for x in gold if len(x) == 2)]

    card = ModelCard.load(smoke_run / "README.md")
    assert card.data.pipeline_tag == "token-classification" and card.data.library_name == "transformers"
    f1 = [r.metric_value for r in card.data.eval_results if r.metric_type == "f1" and r.dataset_split == "test"]
    assert f1 == [round(100 * results["test"]["overall"]["f1"], 2)]


def test_an_interrupted_run_resumed_with_loader_workers_ends_with_the_same_weights(tmp_path):
    """The straight run loads batches in the training process; the interrupted one in two worker processes, in both
    legs: the same weights prove the same batches in the same order, and an exact resume with workers."""
    common = [
        str(SMOKE),
        "--num_train_epochs",
        "2",
        "--per_device_train_batch_size",
        "5",
        "--checkpointing_steps",
        "epoch",
    ]
    run(*common, "--output_dir", str(tmp_path / "straight"))
    workers = ("--dataloader_num_workers", "2", "--output_dir", str(tmp_path / "resumed"))
    stopped = run(*common, *workers, "--max_steps_per_run", "3")
    assert "Stopped after 3 steps" in stopped.stderr
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    assert (tmp_path / "resumed" / "checkpoints" / "step_3").is_dir()  # mid-epoch: 5 steps per epoch
    resumed = run(*common, *workers, "--resume_from_checkpoint", "latest")
    assert re.search(r"Resumed from \S+step_3 \(step 3, epoch 0\)", resumed.stderr)
    assert json.loads((tmp_path / "resumed" / "results.json").read_text())["resumed_from_step"] == 3
    for name in ("checkpoints/step_10/model.safetensors", "model.safetensors"):
        straight, resumed = load_file(tmp_path / "straight" / name), load_file(tmp_path / "resumed" / name)
        assert straight.keys() == resumed.keys()
        for key in straight:
            assert torch.equal(straight[key], resumed[key]), (name, key)
    straight_results = json.loads((tmp_path / "straight" / "results.json").read_text())
    resumed_results = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert resumed_results.pop("resumed_from_step") == 3 and resumed_results.pop("resume_exact") is True
    assert straight_results == resumed_results
    assert not list((tmp_path / "resumed" / "checkpoints").glob("*.tmp"))


def test_two_process_evaluation_equals_one_process(smoke_run, tmp_path):
    evaluate = [str(SMOKE), "--model_name_or_path", str(smoke_run), "--do_train", "false",
                "--per_device_eval_batch_size", "4"]  # fmt: skip
    run(*evaluate, "--output_dir", str(tmp_path / "one"))
    two_processes = run(*evaluate, "--output_dir", str(tmp_path / "two"), launcher=TWO_CPU_PROCESSES)
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert (one.pop("world_size"), two.pop("world_size")) == (1, 2), two_processes.stderr[-2000:]
    assert one == two and one["validation"]["overall"]["f1"] > 0
    # 11 distinct test tweets over 2 processes x 4: the samples repeated to fill the last batch were dropped
    # (a plain `gather` would keep them, and run_mner.py then stops: more predicted rows than rows).
    assert (tmp_path / "one" / "test_predictions.conll").read_text() == (
        tmp_path / "two" / "test_predictions.conll"
    ).read_text()


def test_two_process_training_resumed_in_two_legs_equals_a_straight_two_process_run(tmp_path):
    common = [
        str(SMOKE),
        "--num_train_epochs",
        "2",
        "--per_device_train_batch_size",
        "3",
        "--checkpointing_steps",
        "epoch",
    ]  # fmt: skip  (24 tweets / (2 x 3) = 4 steps per epoch)
    run(*common, "--output_dir", str(tmp_path / "straight"), launcher=TWO_CPU_PROCESSES)
    run(*common, "--output_dir", str(tmp_path / "legs"), "--max_steps_per_run", "3", launcher=TWO_CPU_PROCESSES)
    run(*common, "--output_dir", str(tmp_path / "legs"), "--resume_from_checkpoint", "latest",
        launcher=TWO_CPU_PROCESSES)  # fmt: skip
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())
    legs = json.loads((tmp_path / "legs" / "results.json").read_text())
    assert straight["world_size"] == legs["world_size"] == 2 and legs["resumed_from_step"] == 3
    expected, actual = (
        load_file(tmp_path / "straight" / "model.safetensors"),
        load_file(tmp_path / "legs" / "model.safetensors"),
    )
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    assert straight["test"] == legs["test"]


def test_errors_come_before_any_training(tmp_path, smoke_run):
    missing = run(str(SMOKE), "--data_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "o"), check=False)
    assert missing.returncode != 0 and "no such data folder" in missing.stderr

    unresolvable = run(
        str(SMOKE), "--text_model", "no-such-org/no-such-model", "--output_dir", str(tmp_path / "o"), check=False
    )
    assert unresolvable.returncode != 0 and "Cannot load a model" in unresolvable.stderr

    relabelled = tmp_path / "relabelled"
    shutil.copytree(smoke_run, relabelled)
    config = json.loads((relabelled / "config.json").read_text())
    config["id2label"] = {str(i): label.replace("MISC", "OTHER") for i, label in config["id2label"].items()}
    config["label2id"] = {label: int(i) for i, label in config["id2label"].items()}
    (relabelled / "config.json").write_text(json.dumps(config))
    inconsistent = run(
        str(SMOKE), "--model_name_or_path", str(relabelled), "--output_dir", str(tmp_path / "o"), check=False
    )
    assert inconsistent.returncode != 0 and "the processor's label_names" in inconsistent.stderr
    processor_config = json.loads((relabelled / "processor_config.json").read_text())
    processor_config["label_names"] = [label.replace("MISC", "OTHER") for label in processor_config["label_names"]]
    (relabelled / "processor_config.json").write_text(json.dumps(processor_config))
    mismatch = run(
        str(SMOKE), "--model_name_or_path", str(relabelled), "--output_dir", str(tmp_path / "o"), check=False
    )
    assert mismatch.returncode == 2 and "The train split has entity types MISC that the model cannot" in mismatch.stderr
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_configuration_files_are_overridden_by_flags():
    model_args, data_args, args = parse_arguments([str(SMOKE), "--seed", "7", "--use_cycle", "false"])
    assert (args.seed, model_args.use_cycle, args.num_train_epochs) == (7, False, 15)
    assert data_args.data_dir == "tests/fixtures/tiny-corpus"
    paper, _, paper_args = parse_arguments([str(ROOT / "configs" / "twitter2017.yaml")])
    assert (paper.text_model, paper_args.learning_rate, paper_args.per_device_train_batch_size) == (
        "bert-base-uncased",
        3e-5,
        16,
    )


def test_bert_crf_ablation_needs_no_vision_model(tmp_path):
    run(str(SMOKE), "--use_generation", "false", "--vision_model", "no-such/vision-model", "--num_train_epochs", "1",
        "--output_dir", str(tmp_path / "bert-crf"))  # fmt: skip
    model = AutoModelForTokenClassification.from_pretrained(tmp_path / "bert-crf", trust_remote_code=True)
    assert not model.config.use_generation and not hasattr(model, "vision_embeddings")


def test_the_mechanism_log_averages_per_layer_and_warns_when_a_sampler_keeps_only_the_first_token(caplog):
    from types import SimpleNamespace

    from run_mner import MechanismLog

    log = MechanismLog()
    nan = float("nan")
    for text, visual in (([0.5, 0.0], [0.4, nan]), ([0.3, 0.0], [nan, nan])):  # the second batch has no image
        log.add(
            SimpleNamespace(
                text_keep_ratio=torch.tensor(text),
                visual_keep_ratio=torch.tensor(visual),
                layer_reconstruction_loss=torch.tensor([2.0, 4.0]),
                layer_cycle_loss=torch.tensor([1.0, 1.0]),
            )
        )
    with caplog.at_level("WARNING", logger="run_mner"):
        tracked = log.close_window()
    assert tracked["text_keep_ratio/layer_1"] == pytest.approx(0.4) and tracked[
        "visual_keep_ratio/layer_1"
    ] == pytest.approx(0.4)
    assert "visual_keep_ratio/layer_2" not in tracked  # never seen: not logged as NaN
    assert log.last["visual_keep_ratio"] == [pytest.approx(0.4), None]  # JSON-safe in results.json
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "BGA layer 2: the text sampler keeps nothing but" in warnings[0]
    assert log.summary() == {"keep_t": "0.40/0.00", "keep_v": "0.40/-"}


def test_metrics_are_conlleval_entity_scores_with_orphan_inside_tags_starting_entities():
    gold = [
        ["B-PER", "I-PER", "O", "B-LOC"],  # PER(0-1) LOC(3)
        ["I-ORG", "I-ORG", "O", "B-MISC"],  # an orphan I- starts an entity: ORG(0-1), MISC(3)
        ["B-PER", "O", "B-ORG", "I-ORG"],  # PER(0) ORG(2-3)
        ["B-LOC", "I-PER"],  # a type change starts an entity: LOC(0) PER(1)
    ]
    predicted = [
        ["B-PER", "I-PER", "O", "I-LOC"],  # PER(0-1) right, orphan LOC(3) right
        ["B-ORG", "I-ORG", "O", "O"],  # ORG(0-1) right, MISC missed
        ["B-PER", "B-PER", "B-ORG", "O"],  # PER(0) right, PER(1) wrong, ORG(2) wrong boundary
        ["B-LOC", "I-LOC"],  # LOC(0-1) wrong
    ]
    # By hand: gold PER 3, LOC 2, ORG 2, MISC 1; predicted PER 3, LOC 2, ORG 2; right PER 2, LOC 1, ORG 1.
    metrics = compute_metrics(gold, predicted)
    expected = {
        "PER": (2 / 3, 2 / 3, 2 / 3, 3),
        "LOC": (1 / 2, 1 / 2, 1 / 2, 2),
        "ORG": (1 / 2, 1 / 2, 1 / 2, 2),
        "MISC": (0.0, 0.0, 0.0, 1),
    }
    for kind, (precision, recall, f1, support) in expected.items():
        assert metrics[kind] == pytest.approx({"precision": precision, "recall": recall, "f1": f1, "support": support})
    assert metrics["overall"] == pytest.approx({"precision": 4 / 7, "recall": 4 / 8, "f1": 8 / 15})
