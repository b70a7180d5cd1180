"""Entity-level precision, recall and F1 for BIO-tagged NER, per type and overall, as BGA-MNER reports them
(the paper's Table 2): seqeval's default mode, which counts entities as conlleval does (an `I-X` after `O`
or after another type opens an entity). An `evaluate` metric loaded by path, so it works offline:

    import evaluate
    metric = evaluate.load("metrics/mner_f1")
    metric.compute(predictions=[["B-PER", "O"]], references=[["B-PER", "O"]])
    # {"PER": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}, "overall": {...}}
"""

import datasets
import evaluate
from seqeval.metrics import classification_report

_CITATION = """@inproceedings{seqeval, title={seqeval: A Python framework for sequence labeling evaluation},
author={Hiroki Nakayama}, year={2018}, url={https://github.com/chakki-works/seqeval}}"""

_KWARGS = """
Args:
    predictions: per sentence, the predicted BIO tags (strings).
    references: per sentence, the gold BIO tags (strings), as many as predicted.
Returns:
    per entity type: precision, recall, f1 (fractions) and support (gold entities); "overall": the micro
    averages precision, recall and f1. A type with no prediction has precision 0 (no division error).
"""


@evaluate.utils.file_utils.add_start_docstrings(__doc__, _KWARGS)
class MnerF1(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__,
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("string")),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions, references) -> dict:
        for number, (predicted, gold) in enumerate(zip(predictions, references, strict=True)):
            if len(predicted) != len(gold):
                raise ValueError(f"Sentence {number}: {len(predicted)} predicted tags for {len(gold)} gold tags.")
        report = classification_report(references, predictions, output_dict=True, zero_division=0)
        metrics = {
            kind: {
                "precision": float(v["precision"]),
                "recall": float(v["recall"]),
                "f1": float(v["f1-score"]),
                "support": int(v["support"]),
            }
            for kind, v in report.items()
            if kind not in ("micro avg", "macro avg", "weighted avg")
        }
        micro = report["micro avg"]
        metrics["overall"] = {
            "precision": float(micro["precision"]),
            "recall": float(micro["recall"]),
            "f1": float(micro["f1-score"]),
        }
        return metrics
