"""The training options the README documents, each shown to change what happens: gradient accumulation,
numeric checkpointing and evaluation steps, a subset of the training tweets, a cross-domain test corpus,
bf16 mixed precision and evaluation without images."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from test_run_mner import FIXTURES, SMOKE, run

from run_mner import load_corpora, parse_arguments

TINY_CORPUS = FIXTURES / "tiny-corpus"


def without_dropout(tmp_path: Path) -> Path:
    """The tiny BERT with dropout off, so that training is a deterministic function of the batches."""
    folder = tmp_path / "tiny-bert-no-dropout"
    shutil.copytree(FIXTURES / "tiny-bert", folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_two_accumulated_half_batches_train_like_one_full_batch(tmp_path):
    # BERT-CRF (no sampler noise) without dropout: 20 tweets in 2 optimizer steps either way. The CRF loss is a
    # mean over sentences, so two accumulated halves of 5 give the gradient of one batch of 10.
    common = [str(SMOKE), "--text_model", str(without_dropout(tmp_path)), "--use_generation", "false",
              "--max_train_samples", "20", "--num_train_epochs", "1", "--do_eval", "false", "--do_predict", "false",
              "--warmup_ratio", "0", "--learning_rate", "0.001", "--max_grad_norm", "0"]  # fmt: skip
    run(*common, "--per_device_train_batch_size", "10", "--output_dir", str(tmp_path / "full"))
    run(*common, "--per_device_train_batch_size", "5", "--gradient_accumulation_steps", "2",
        "--output_dir", str(tmp_path / "accumulated"))  # fmt: skip
    run(*common, "--per_device_train_batch_size", "5", "--output_dir", str(tmp_path / "four_steps"))
    steps = {name: json.loads((tmp_path / name / "results.json").read_text())["best_step"]
             for name in ("full", "accumulated", "four_steps")}  # fmt: skip
    assert steps == {"full": 2, "accumulated": 2, "four_steps": 4}
    full, accumulated, four_steps = (load_file(tmp_path / name / "model.safetensors") for name in steps)
    initial = load_file(FIXTURES / "tiny-bert" / "model.safetensors")
    moved = 0
    for key in full:
        torch.testing.assert_close(accumulated[key], full[key], atol=2e-6, rtol=1e-5, msg=key)
        moved += not torch.allclose(four_steps[key], full[key], atol=1e-4)
    assert moved > 10  # four steps of 5 train differently: the comparison above can tell
    assert not torch.equal(full["text_embeddings.word_embeddings.weight"], initial["embeddings.word_embeddings.weight"])


def test_numeric_evaluation_and_checkpointing_steps_on_a_subset_of_the_training_tweets(tmp_path):
    # 12 of the 24 training tweets, batch 4: 3 steps per epoch, 6 in 2 epochs. Evaluating every 2 steps is
    # not at epoch ends (3, 6); checkpointing every 5 steps saves step 5 only.
    result = run(str(SMOKE), "--max_train_samples", "12", "--per_device_train_batch_size", "4",
                 "--num_train_epochs", "2", "--eval_steps", "2", "--checkpointing_steps", "5",
                 "--save_total_limit", "0", "--output_dir", str(tmp_path / "run"))  # fmt: skip
    evaluated = [int(step) for step in re.findall(r"step (\d+): dev F1", result.stderr)]
    assert evaluated == [2, 4, 6]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["best", "step_5"]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["training_images"]["tweets"] == 12 and results["best_step"] in (2, 4, 6)


def test_a_cross_domain_test_corpus_replaces_the_test_split(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for name in ("train.txt", "valid.txt"):
        shutil.copy(TINY_CORPUS / name, other / name)
    tweets = [[("Angela", "B-PER"), ("Merkel", "I-PER"), ("in", "O"), ("Berlin", "B-LOC")],
              [("Google", "B-ORG"), ("and", "O"), ("Apple", "B-ORG")],
              [("no", "O"), ("entity", "O")]]  # fmt: skip
    (other / "test.txt").write_text("\n\n".join("\n".join(f"{w}\t{t}" for w, t in tweet) for tweet in tweets) + "\n")
    output = tmp_path / "cross"
    run(str(SMOKE), "--num_train_epochs", "1", "--test_data_dir", str(other), "--output_dir", str(output))
    rows = [line.split("\t") for line in (output / "test_predictions.conll").read_text().splitlines() if line]
    assert [row[:2] for row in rows] == [[w, t] for tweet in tweets for w, t in tweet]
    test = json.loads((output / "results.json").read_text())["test"]
    assert {kind: test[kind]["support"] for kind in ("PER", "LOC", "ORG")} == {"PER": 1, "LOC": 1, "ORG": 2}
    assert "MISC" not in test  # the smoke corpus's own test split (with MISC entities) was not used


RECORD_DTYPES = """
import json, sys
import torch
import torch.nn.functional as F

seen, linear = set(), F.linear
def recording_linear(*args, **kwargs):  # the dtype every nn.Linear computes in while gradients are on
    output = linear(*args, **kwargs)
    if torch.is_grad_enabled():
        seen.add(str(output.dtype))
    return output
F.linear = recording_linear
sys.path.insert(0, {root!r})
import run_mner
run_mner.main(sys.argv[1:])
print("LINEAR_DTYPES", json.dumps(sorted(seen)))
"""


def test_bf16_mixed_precision_trains_in_bfloat16_and_saves_float32_weights(tmp_path):
    script = tmp_path / "record_dtypes.py"
    script.write_text(RECORD_DTYPES.format(root=str(SMOKE.parents[1])))
    dtypes = {}
    for precision in ("bf16", "no"):
        result = run(str(SMOKE), "--num_train_epochs", "2", "--mixed_precision", precision,
                     "--output_dir", str(tmp_path / precision), script=str(script))  # fmt: skip
        dtypes[precision] = json.loads(result.stdout.split("LINEAR_DTYPES", 1)[1])
    assert dtypes == {"bf16": ["torch.bfloat16"], "no": ["torch.float32"]}
    weights = load_file(tmp_path / "bf16" / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert json.loads((tmp_path / "bf16" / "results.json").read_text())["test"]["overall"]["f1"] >= 0


def test_evaluation_without_images_drops_them_from_dev_and_test_only():
    (model_args, data_args, _) = parse_arguments([str(SMOKE), "--eval_without_images", "true"])
    corpus = load_corpora(data_args, model_args.num_object_crops)
    plain = load_corpora(parse_arguments([str(SMOKE)])[1], model_args.num_object_crops)
    for split in ("validation", "test"):
        assert sum(image is not None for image in plain[split]["image"]) > 0
        assert set(corpus[split]["image"]) == {None} and all(crops == [] for crops in corpus[split]["crops"])
        assert corpus[split]["tokens"] == plain[split]["tokens"]
    assert corpus["train"]["image"] == plain["train"]["image"] and corpus["train"]["crops"] == plain["train"]["crops"]


def test_gradient_checkpointing_trains_to_the_same_weights(tmp_path):
    common = [str(SMOKE), "--num_train_epochs", "2", "--do_eval", "false", "--do_predict", "false"]
    run(*common, "--output_dir", str(tmp_path / "plain"))
    result = run(*common, "--gradient_checkpointing", "true", "--output_dir", str(tmp_path / "checkpointed"))
    assert "Gradient checkpointing: 4 layers recomputed" in result.stderr  # 2 BGA layers, text and ViT layer 0
    plain, checkpointed = (load_file(tmp_path / name / "model.safetensors") for name in ("plain", "checkpointed"))
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], atol=1e-6, rtol=1e-5, msg=key)
