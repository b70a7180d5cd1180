"""The model card (`README.md`) written into every trained BGA-MNER folder: Hub metadata (pipeline tag,
model-index with the measured metrics, widget examples), the results table, the training configuration
and copy-paste usage."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

ENTITY_TYPES = ("PER", "LOC", "ORG", "MISC")
WIDGET_TEXTS = [
    "RT @nbcnews : Obama visits New York with Apple CEO Tim Cook",
    "Great day for baseball at Target Field with LeBron James #MLB",
]


def results_table(results: dict[str, dict]) -> str:
    """A Markdown table in the paper's Table 2 layout: F1 per type, then overall P / R / F1, one row per
    evaluated split. `results` maps a split name to seqeval-style metrics (see `run_mner.compute_metrics`)."""
    header = "| split | " + " | ".join(f"{t} F1" for t in ENTITY_TYPES) + " | P | R | F1 |"
    rows = [header, "|" + "---|" * (len(ENTITY_TYPES) + 4)]
    for split, metrics in results.items():
        per_type = [f"{100 * metrics.get(t, {}).get('f1', 0.0):.2f}" for t in ENTITY_TYPES]
        overall = metrics["overall"]
        rows.append(
            f"| {split} | " + " | ".join(per_type) + f" | {100 * overall['precision']:.2f} | "
            f"{100 * overall['recall']:.2f} | {100 * overall['f1']:.2f} |"
        )
    return "\n".join(rows)


def build_model_card(
    results: dict[str, dict],
    settings: dict,
    base_models: list[str],
    dataset_name: str,
    model_id: str = "path/to/this/folder",
) -> ModelCard:
    """A model card for a trained folder. `results`: split -> metrics (fractions); `settings`: the
    training configuration as shown; `base_models`: the pretrained towers it was built from."""
    eval_results = [
        EvalResult(
            task_type="token-classification",
            task_name="Named Entity Recognition",
            dataset_type=dataset_name,
            dataset_name=dataset_name,
            dataset_split=split,
            metric_type=metric,
            metric_name=metric.capitalize(),
            metric_value=round(100 * metrics["overall"][metric], 2),
        )
        for split, metrics in results.items()
        for metric in ("f1", "precision", "recall")
    ]
    data = ModelCardData(
        language="en",
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="token-classification",
        tags=["named-entity-recognition", "multimodal", "bga-mner", "twitter", "custom_code"],
        datasets=[dataset_name],
        base_model=base_models or None,
        model_name=f"BGA-MNER ({dataset_name})",
        eval_results=eval_results or None,
        widget=[{"text": text} for text in WIDGET_TEXTS],
    )
    content = f"""---
{data.to_yaml()}
---

# BGA-MNER trained on {dataset_name}

A multimodal named-entity recogniser for tweets (PER, LOC, ORG, MISC) after Chen et al., *Learning
Implicit Entity-object Relations by Bidirectional Generative Alignment for Multimodal NER* (ACM MM 2023).
It was trained on text paired with images, and recognises entities **from text alone**: the text branch
reads visual features that it generates itself.

## Results

Entity-level scores (seqeval, conlleval mode), in %:

{results_table(results) if results else "(not evaluated)"}

## Use

```python
from transformers import pipeline

ner = pipeline("token-classification", model="{model_id}", trust_remote_code=True, aggregation_strategy="simple")
ner("Obama visits New York with Apple CEO Tim Cook")
```

or, with the model's own word-level decoding:

```python
from transformers import AutoModelForTokenClassification, AutoProcessor

model = AutoModelForTokenClassification.from_pretrained("{model_id}", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("{model_id}", trust_remote_code=True)
inputs = processor(text=["Obama visits New York"])
predictions = model(**inputs).predictions
print(processor.decode_predictions(predictions, inputs))  # [['B-PER', 'O', 'B-LOC', 'I-LOC']]
```

## Training configuration

```json
{json.dumps(settings, indent=2, sort_keys=True, default=str)}
```
"""
    return ModelCard(content)


def write_model_card(output_dir: str | Path, *args, **kwargs) -> ModelCard:
    """Builds the card (see `build_model_card`) and saves it as `output_dir/README.md`."""
    card = build_model_card(*args, **kwargs)
    card.save(Path(output_dir) / "README.md")
    return card
