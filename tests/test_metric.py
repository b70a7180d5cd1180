"""The repository's `evaluate` metric (metrics/mner_f1), loaded by path offline, against seqeval itself on the
real Twitter test sets with perturbed predictions."""

from __future__ import annotations

import random

import pytest
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

from configuration_bga_mner import MNER_LABELS
from run_mner import entity_metric
from twitter_mner import read_conll


def perturbed(gold: list[list[str]], seed: int) -> list[list[str]]:
    """Gold tags with about one tag in six replaced, B- and I- swapped, or a type changed."""
    rng = random.Random(seed)
    predicted = []
    for tags in gold:
        tags = list(tags)
        for i, tag in enumerate(tags):
            roll = rng.random()
            if roll < 0.06:
                tags[i] = rng.choice(MNER_LABELS)
            elif roll < 0.12 and tag != "O":
                tags[i] = ("I-" if tag.startswith("B-") else "B-") + tag[2:]
            elif roll < 0.17 and tag != "O":
                tags[i] = tag[:2] + rng.choice(["PER", "LOC", "ORG", "MISC"])
        predicted.append(tags)
    return predicted


@pytest.mark.parametrize("corpus", ["twitter2015", "twitter2017"])
def test_the_metric_module_equals_seqeval_on_the_real_test_sets(shared_data, corpus):
    gold = [example.labels for example in read_conll(shared_data / corpus / "test.txt")]
    for seed in range(3):
        predicted = perturbed(gold, seed)
        ours = entity_metric().compute(predictions=predicted, references=gold)
        assert ours["overall"] == pytest.approx(
            {
                "precision": precision_score(gold, predicted),
                "recall": recall_score(gold, predicted),
                "f1": f1_score(gold, predicted),
            },
            abs=1e-12,
        )
        assert 0.5 < ours["overall"]["f1"] < 0.99  # perturbed, not copied
        report = classification_report(gold, predicted, output_dict=True)
        for kind in ("PER", "LOC", "ORG", "MISC"):
            expected = report[kind]
            assert ours[kind]["support"] == expected["support"]
            assert ours[kind]["f1"] == pytest.approx(expected["f1-score"], abs=1e-12)
            assert ours[kind]["precision"] == pytest.approx(expected["precision"], abs=1e-12)
