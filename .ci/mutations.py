"""Mutation check: each mutation below breaks one promise of the code on purpose, in a scratch copy of the
repository, and the tests named for it must then fail. A mutation that survives means that a test no longer
proves what its name claims.

    python .ci/mutations.py            # all mutations (a few minutes on 2 CPU cores)
    python .ci/mutations.py --list
    python .ci/mutations.py sampler_keeps_the_dropped_side

Exit status 1 if a mutation survives, or if a mutation no longer applies (its code changed: update it here).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str  # must occur exactly once in `file`
    new: str
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation(
        "distributed_evaluation_keeps_padding_rows",
        "run_mner.py",
        "accelerator.gather_for_metrics(padded)",
        "accelerator.gather(padded)",
        ("tests/test_run_mner.py::test_two_process_evaluation_equals_one_process",),
    ),
    Mutation(
        "resume_starts_from_scratch",
        "run_mner.py",
        "checkpoint = find_checkpoint(output_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint "
        "else None",
        "checkpoint = None",
        ("tests/test_run_mner.py::test_an_interrupted_run_resumed_with_loader_workers_ends_with_the_same_weights",),
    ),
    Mutation(
        "best_model_is_the_last_one",
        "run_mner.py",
        'if f1 > best["f1"]:',
        "if True:",
        ("tests/test_run_mner.py::test_smoke_configuration_trains_and_leaves_a_loadable_model_repository",),
    ),
    Mutation(
        "metrics_drop_orphan_inside_tags",
        "metrics/mner_f1/mner_f1.py",
        "classification_report(references, predictions, output_dict=True, zero_division=0)",
        'classification_report(references, predictions, output_dict=True, zero_division=0, mode="strict", '
        'scheme=__import__("seqeval.scheme").scheme.IOB2)',
        ("tests/test_run_mner.py::test_metrics_are_conlleval_entity_scores_with_orphan_inside_tags_starting_entities",),
    ),
    Mutation(
        "gradient_accumulation_ignored",
        "run_mner.py",
        "gradient_accumulation_steps=args.gradient_accumulation_steps,",
        "gradient_accumulation_steps=1,",
        ("tests/test_training_options.py::test_two_accumulated_half_batches_train_like_one_full_batch",),
    ),
    Mutation(
        "evaluation_only_at_epoch_ends",
        "run_mner.py",
        "due = epoch_end if args.eval_steps is None else completed_steps % args.eval_steps == 0",
        "due = epoch_end",
        (
            "tests/test_training_options.py::"
            "test_numeric_evaluation_and_checkpointing_steps_on_a_subset_of_the_training_tweets",
        ),
    ),
    Mutation(
        "mixed_precision_ignored",
        "run_mner.py",
        "mixed_precision=args.mixed_precision,",
        'mixed_precision="no",',
        ("tests/test_training_options.py::test_bf16_mixed_precision_trains_in_bfloat16_and_saves_float32_weights",),
    ),
    Mutation(
        "sampler_keeps_the_dropped_side",
        "modeling_bga_mner.py",
        "return logits, logits.softmax(-1)[..., 1]",
        "return logits, logits.softmax(-1)[..., 0]",
        ("tests/test_mechanism.py::test_inference_masks_equal_an_independently_computed_mask",),
    ),
    Mutation(
        "kl_in_the_other_direction",
        "modeling_bga_mner.py",
        "generated.float().log_softmax(-1), target.float().log_softmax(-1), log_target=True",
        "target.float().log_softmax(-1), generated.float().log_softmax(-1), log_target=True",
        (
            "tests/test_modeling.py::"
            "test_token_kl_is_the_kl_of_the_generated_from_the_real_features_summed_or_averaged_over_sampled_tokens",
        ),
    ),
    Mutation(
        "generation_targets_not_detached",
        "modeling_bga_mner.py",
        "if config.detach_generation_targets:",
        "if False:",
        ("tests/test_modeling.py::test_detached_targets_let_the_generation_losses_train_only_the_generators",),
    ),
    Mutation(
        "samplers_run_in_the_without_scs_ablation",
        "modeling_bga_mner.py",
        "with_sampler = config.use_generation and config.use_sampler",
        "with_sampler = config.use_generation",
        ("tests/test_modeling.py::test_without_cycle_the_cycle_loss_is_zero_and_without_samplers_every_token_is_kept",),
    ),
    Mutation(
        "real_visual_features_never_read",
        "modeling_bga_mner.py",
        'if config.inference_visual == "real" and not self.training:',
        "if False:",
        (
            "tests/test_modeling.py::"
            "test_real_visual_features_at_inference_fall_back_to_generated_ones_for_a_tweet_without_an_image",
        ),
    ),
    Mutation(
        "pipeline_uses_the_emission_arg_max",
        "pipeline_bga_mner.py",
        '"predictions": output.predictions,',
        '"predictions": output.logits.argmax(-1),',
        ("tests/test_inference.py::test_pipeline_entities_are_the_crf_viterbi_path_not_the_emission_arg_max",),
    ),
    Mutation(
        "int8_quantizes_layer_0_and_the_classifier_too",
        "modeling_bga_mner.py",
        "if isinstance(module, nn.Linear) and not name.startswith(INT8_KEEPS_FLOAT)",
        "if isinstance(module, nn.Linear)",
        (
            "tests/test_inference.py::"
            "test_int8_quantizes_the_bga_layers_keeps_layer_0_and_the_classifier_and_predicts_in_the_same_format",
        ),
    ),
    Mutation(
        "bfloat16_crf",
        "predict_mner.py",
        "            model.crf.float()",
        "            pass",
        ("tests/test_inference.py::test_bfloat16_computes_in_bfloat16_with_a_float32_crf",),
    ),
    Mutation(
        "prediction_column_holds_the_gold_label",
        "predict_mner.py",
        '"\\t".join([word, *([label] if label else []), tag])',
        '"\\t".join([word, *([label] if label else []), label or tag])',
        ("tests/test_inference.py::test_prediction_command_reads_text_jsonl_and_conll",),
    ),
    Mutation(
        "crops_clipped_with_width_and_height_swapped",
        "prepare_crops.py",
        "pixels = clip_box(box, image.width, image.height)",
        "pixels = clip_box(box, image.height, image.width)",
        (
            "tests/test_prepare_crops.py::"
            "test_a_run_killed_in_the_middle_of_a_split_resumes_to_the_same_crops_of_non_square_images",
        ),
    ),
]


def scratch_copy(destination: Path) -> None:
    """The repository's tracked and untracked-but-not-ignored files (what a clone plus the work tree holds)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        text=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def check(mutation: Mutation, copy: Path) -> str:
    """'killed' (a named test failed), 'SURVIVED' (all passed) or 'STALE: ...' (the mutation does not apply)."""
    path = copy / mutation.file
    original = path.read_text(encoding="utf-8")
    if original.count(mutation.old) != 1:
        return f"STALE: {mutation.old!r} occurs {original.count(mutation.old)} times in {mutation.file}"
    path.write_text(original.replace(mutation.old, mutation.new), encoding="utf-8")
    try:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutation.tests]
        result = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True)
    finally:
        path.write_text(original, encoding="utf-8")
    if result.returncode == 1:  # pytest: tests ran and some failed
        return "killed"
    if result.returncode == 0:
        return "SURVIVED"
    return f"STALE: pytest exit {result.returncode} (no such test?): {result.stdout[-500:]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="Only these mutations (default: all).")
    parser.add_argument("--list", action="store_true", help="List the mutations and their tests.")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutation(s): {', '.join(sorted(unknown))}")
    if args.list:
        for mutation in chosen:
            print(f"{mutation.name}: {mutation.file}\n    " + "\n    ".join(mutation.tests))
        return 0
    failures = 0
    with tempfile.TemporaryDirectory(prefix="bga-mner-mutations-") as scratch:
        copy = Path(scratch)
        scratch_copy(copy)
        for mutation in chosen:
            start = time.perf_counter()
            outcome = check(mutation, copy)
            failures += outcome != "killed"
            print(f"{outcome:>8}  {mutation.name}  ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"{len(chosen) - failures} of {len(chosen)} mutations killed by their tests.")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
