"""Output folders that scale and can be published: checkpoint retention (with exact resume, and a kill in the
middle of a deletion), permissions that follow the umask, a card without this machine's paths that says what
the training saw, the text-only export, licence and citation."""

from __future__ import annotations

import json
import re
import stat
import sys
from pathlib import Path

import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from test_run_mner import FIXTURES, ROOT, SMOKE, run
from transformers import AutoModelForTokenClassification, AutoProcessor

from model_card import CITATION, PLACEHOLDER_ID, build_model_card
from predict_mner import main as predict_main

# Runs run_mner.py with shutil.rmtree patched to die (SIGKILL) in the middle of deleting an old checkpoint:
# one file of the folder is gone when the process is killed.
KILL_DURING_DELETION = """
import os, pathlib, shutil, signal, sys
real_rmtree = shutil.rmtree
def rmtree(path, *args, **kwargs):
    if str(path).endswith(".deleting"):
        os.remove(sorted(p for p in pathlib.Path(path).rglob("*") if p.is_file())[0])
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rmtree(path, *args, **kwargs)
shutil.rmtree = rmtree
import run_mner
run_mner.main(sys.argv[2:])
"""
WITH_UMASK_027 = ("sh", "-c", 'umask 027 && exec "$0" "$@"', sys.executable)
COMMON = [
    str(SMOKE),
    "--num_train_epochs", "2", "--per_device_train_batch_size", "5",  # 5 steps per epoch, 10 in all
    "--checkpointing_steps", "1", "--save_total_limit", "2",
]  # fmt: skip


def checkpoint_names(output: Path) -> set[str]:
    return {p.name for p in (output / "checkpoints").iterdir()}


def test_retention_keeps_the_newest_checkpoints_and_a_kill_during_a_deletion_still_resumes_exactly(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(*COMMON, "--output_dir", str(straight), launcher=WITH_UMASK_027)
    assert checkpoint_names(straight) == {"best", "step_9", "step_10"}  # 10 checkpoints written, 2 kept

    # Files written through temporary names (safetensors, accelerate's state) follow the umask like the rest.
    for path in [straight, *straight.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o750 if path.is_dir() else 0o640), (path.relative_to(straight), oct(mode))

    killed = run(
        *COMMON, "--output_dir", str(resumed), launcher=(sys.executable, "-c", KILL_DURING_DELETION), check=False
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    # Killed at step 3 while deleting step_1: step_1 was renamed before any file went.
    assert checkpoint_names(resumed) == {"step_1.deleting", "step_2", "step_3"}

    again = run(*COMMON, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest")
    assert re.search(r"Resumed from \S+step_3 \(step 3, epoch 0\)", again.stderr)
    assert checkpoint_names(resumed) == {"best", "step_9", "step_10"}  # the half-deleted folder is gone too
    for name in ("model.safetensors", "checkpoints/step_10/model.safetensors"):
        expected, actual = load_file(straight / name), load_file(resumed / name)
        assert all(torch.equal(expected[key], actual[key]) for key in expected), name


def test_the_card_has_no_machine_paths_and_says_what_the_training_saw(tmp_path):
    output = tmp_path / "model"
    run(str(SMOKE), "--num_train_epochs", "1", "--output_dir", str(output))
    published = [p for p in output.iterdir() if p.suffix in (".json", ".md")]
    assert {"README.md", "config.json", "results.json", "training_args.json"} <= {p.name for p in published}
    for path in published:
        text = path.read_text(encoding="utf-8")
        for local in (str(tmp_path), str(ROOT), "site-packages", "tests/fixtures"):
            assert local not in text, (path.name, local)

    card = ModelCard.load(output / "README.md")
    assert card.data.base_model is None  # the towers were local folders, not Hub ids
    assert "built from local pretrained weights" in card.text and f'model="{PLACEHOLDER_ID}"' in card.text
    ids = [
        line[6:] for line in (FIXTURES / "tiny-corpus" / "train.txt").read_text().splitlines() if line[:6] == "IMGID:"
    ]
    with_image = sum((FIXTURES / "tiny-corpus" / "images" / f"{i}.jpg").is_file() for i in ids)
    assert 0 < with_image < len(ids)
    assert f"Of its {len(ids)} training tweets, {with_image} had an image" in card.text
    assert CITATION in card.text

    text_only_run = tmp_path / "no-images"
    run(str(SMOKE), "--num_train_epochs", "1", "--image_dir", "", "--crop_dir", "", "--output_dir", str(text_only_run))
    text = (text_only_run / "README.md").read_text()
    assert "No training tweet had an image" in text and "never active" in text


def test_card_metadata_keeps_hub_ids_and_drops_local_paths():
    settings = {"data_dir": "/home/me/data/twitter2015", "lr": 3e-5}
    card = build_model_card({}, settings, ["bert-base-uncased", "/opt/x/clip"], "twitter2015", model_id="me/bga-mner")
    assert card.data.base_model == ["bert-base-uncased"]
    assert "/opt/x/clip" not in str(card) and "/home/me" not in str(card)
    assert '"data_dir": "<local>/twitter2015"' in card.text and 'model="me/bga-mner"' in card.text


def test_text_only_export_is_one_step_and_carries_a_card(tmp_path):
    source = tmp_path / "model"
    run(str(SMOKE), "--num_train_epochs", "2", "--output_dir", str(source), "--export_text_only", str(tmp_path / "a"))
    predict_main(["--model", str(source), "--export_text_only", str(tmp_path / "b")])
    full = AutoModelForTokenClassification.from_pretrained(source, trust_remote_code=True).eval()
    for folder in (tmp_path / "a", tmp_path / "b"):
        model = AutoModelForTokenClassification.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        assert model.config.text_only and not hasattr(model, "vision_embeddings")
        parameters = sum(p.numel() for p in model.parameters())
        assert parameters == full.parameter_report()["inference"]
        card = ModelCard.load(folder / "README.md")
        assert "text-only inference checkpoint" in card.text and f"({parameters / 1e6:.1f}M parameters)" in card.text
        source_f1 = json.loads((source / "results.json").read_text())["test"]["overall"]["f1"]
        assert [
            r.metric_value for r in card.data.eval_results if r.metric_type == "f1" and r.dataset_split == "test"
        ] == [round(100 * source_f1, 2)]
        inputs = processor(text=["Obama visits New York with Apple CEO Tim Cook", "RT @nba : LeBron James"])
        keys = ("input_ids", "attention_mask", "token_type_ids", "prediction_mask")
        with torch.no_grad():
            assert torch.equal(
                model(**{k: inputs[k] for k in keys}).logits, full(**{k: inputs[k] for k in keys}).logits
            )


def test_licence_and_citation_are_in_the_repository():
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License\n                           Version 2.0")
    readme = (ROOT / "README.md").read_text()
    assert "license: apache-2.0" in readme and CITATION in readme
