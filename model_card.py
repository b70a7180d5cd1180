"""What a published BGA-MNER folder holds beside its weights: the model card (`README.md`: Hub metadata with
the measured metrics, what the training saw, results, usage, citation), file permissions that follow the
umask, and the text-only inference export."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from configuration_bga_mner import MNER_TYPES, entity_types

PLACEHOLDER_ID = "path/to/this-model"  # the usage examples' model id when no --hub_model_id is given
# The one copy of the citations (the README's Citation section is checked against it by a test).
CITATION = """```bibtex
@inproceedings{chen2023bgamner,
  title     = {Learning Implicit Entity-object Relations by Bidirectional Generative Alignment for Multimodal NER},
  author    = {Chen, Feng and Liu, Jiajia and Ji, Kaixiang and Ren, Wang and Wang, Jian and Chen, Jingdong},
  booktitle = {Proceedings of the 31st ACM International Conference on Multimedia (MM '23)},
  year      = {2023}
}
@inproceedings{zhang2018adaptive,
  title     = {Adaptive Co-attention Network for Named Entity Recognition in Tweets},
  author    = {Zhang, Qi and Fu, Jinlan and Liu, Xiaoyu and Huang, Xuanjing},
  booktitle = {Proceedings of the AAAI Conference on Artificial Intelligence},
  year      = {2018}
}
@inproceedings{lu2018visual,
  title     = {Visual Attention Model for Name Tagging in Multimodal Social Media},
  author    = {Lu, Di and Neves, Leonardo and Carvalho, Vitor and Zhang, Ning and Ji, Heng},
  booktitle = {Proceedings of the 56th Annual Meeting of the Association for Computational Linguistics (ACL)},
  year      = {2018}
}
@inproceedings{yu2020umt,
  title     = {Improving Multimodal Named Entity Recognition via Entity Span Detection with
               Unified Multimodal Transformer},
  author    = {Yu, Jianfei and Jiang, Jing and Yang, Li and Xia, Rui},
  booktitle = {Proceedings of the 58th Annual Meeting of the Association for Computational Linguistics (ACL)},
  year      = {2020}
}
```

Twitter2015 comes from Zhang et al. (2018), Twitter2017 from Lu et al. (2018); the copies used here are
the UMT release's (Yu et al., 2020). The corpora are shared by their authors for research; the tweets
and images remain subject to Twitter's (X's) terms of service: check the source release's terms before
redistributing them."""
WIDGET_TEXTS = [
    "RT @nbcnews : Obama visits New York with Apple CEO Tim Cook",
    "Great day for baseball at Target Field with LeBron James #MLB",
]


def results_table(results: dict[str, dict], types: Sequence[str] | None = None) -> str:
    """A Markdown table in the paper's Table 2 layout: F1 per type, then overall P / R / F1, one row per
    evaluated split. `results` maps a split name to seqeval-style metrics (see `run_mner.compute_metrics`);
    `types`: the columns (default: the types the metrics hold)."""
    if types is None:
        types = entity_types(f"B-{kind}" for metrics in results.values() for kind in metrics if kind != "overall")
    header = "| split | " + " | ".join(f"{t} F1" for t in types) + " | P | R | F1 |"
    rows = [header, "|" + "---|" * (len(types) + 4)]
    for split, metrics in results.items():
        per_type = [f"{100 * metrics.get(t, {}).get('f1', 0.0):.2f}" for t in types]
        overall = metrics["overall"]
        rows.append(
            f"| {split} | " + " | ".join(per_type) + f" | {100 * overall['precision']:.2f} | "
            f"{100 * overall['recall']:.2f} | {100 * overall['f1']:.2f} |"
        )
    return "\n".join(rows)


def is_hub_id(name: str) -> bool:
    """A Hub model id (`name` or `owner/name`) rather than a folder of this machine."""
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name)) and not Path(name).exists()


def public_settings(settings: dict) -> dict:
    """The training configuration without this machine's paths: a value naming an existing or absolute path
    becomes `<local>/<its last part>`."""

    def public(value):
        if isinstance(value, str) and value and (os.path.isabs(value) or Path(value).exists()):
            return f"<local>/{Path(value).name}"
        return value

    return {key: public(value) for key, value in settings.items()}


def training_data_statement(images: dict | None) -> str:
    """What the training saw, from `{"tweets": n, "with_image": a, "with_crops": c}`."""
    if images is None:
        return ""
    if images["with_image"] == 0:
        return (
            f"**No training tweet had an image** ({images['tweets']} tweets, text only). The generation losses "
            "(reconstruction and cycle) were never active, so the generators never learned to generate visual "
            "features: this model is, in effect, a text-only BERT-CRF whose samplers and text2image generator "
            "were shaped by the NER loss alone."
        )
    return (
        f"Of its {images['tweets']} training tweets, {images['with_image']} had an image and "
        f"{images['with_crops']} also had object crops; the generation losses were active on those."
    )


def build_model_card(
    results: dict[str, dict],
    settings: dict,
    base_models: list[str],
    dataset_name: str,
    model_id: str | None = None,
    training_images: dict | None = None,
    text_only_parameters: int | None = None,
    types: Sequence[str] = MNER_TYPES,
) -> ModelCard:
    """A model card for a trained folder. `results`: split -> metrics (fractions); `settings`: the training
    configuration (local paths are shown as `<local>/name`); `base_models`: the pretrained towers it was built
    from (only Hub ids enter the metadata); `model_id`: the Hub id for the usage examples (a placeholder if
    None); `training_images`: how many training tweets had images and crops; `text_only_parameters`: set for
    the text-only inference checkpoint (its parameter count); `types`: the entity types the model recognises."""
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
    hub_models = [name for name in base_models if is_hub_id(name)]
    model_id = model_id or PLACEHOLDER_ID
    data = ModelCardData(
        language="en",
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="token-classification",
        tags=["named-entity-recognition", "multimodal", "bga-mner", "twitter", "custom_code"],
        datasets=[dataset_name],
        base_model=hub_models or None,
        model_name=f"BGA-MNER ({dataset_name})",
        eval_results=eval_results or None,
        widget=[{"text": text} for text in WIDGET_TEXTS],
    )
    origin = (
        f"It was built from {', '.join(f'`{name}`' for name in hub_models)}."
        if hub_models
        else "It was built from local pretrained weights, not from Hub models."
    )
    if len(hub_models) < len(base_models) and hub_models:
        origin += " Other parts came from local weights."
    variant = ""
    if text_only_parameters is not None:
        variant = (
            f"\n**This is the text-only inference checkpoint** ({text_only_parameters / 1e6:.1f}M parameters): the "
            "vision tower, the visual samplers and the image2text generator were dropped. It predicts exactly as "
            "the full model does without images, and cannot be trained with images. The scores below are the "
            "source model's.\n"
        )
    content = f"""---
{data.to_yaml()}
---

# BGA-MNER trained on {dataset_name}

A multimodal named-entity recogniser for tweets ({", ".join(types)}) after Chen et al., *Learning
Implicit Entity-object Relations by Bidirectional Generative Alignment for Multimodal NER* (ACM MM 2023).
It learns from tweets paired with images and recognises entities **from text alone**: the text branch
reads visual features that it generates itself. {origin}
{variant}
## Training data

{training_data_statement(training_images) or f"Trained on {dataset_name}."}

## Results

Entity-level scores (seqeval, conlleval mode), in %:

{results_table(results, types) if results else "(not evaluated)"}

## Use

{f"Replace `{PLACEHOLDER_ID}` with this model's Hub id or folder." if model_id == PLACEHOLDER_ID else ""}

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
{json.dumps(public_settings(settings), indent=2, sort_keys=True, default=str)}
```

## Citation

{CITATION}
"""
    return ModelCard(content)


def write_model_card(output_dir: str | Path, *args, **kwargs) -> ModelCard:
    """Builds the card (see `build_model_card`) and saves it as `output_dir/README.md`."""
    card = build_model_card(*args, **kwargs)
    card.save(Path(output_dir) / "README.md")
    return card


def apply_umask(folder: str | Path) -> None:
    """Gives every file and folder under `folder` (itself included) the permissions a plain write would: files
    written through temporary names (safetensors, for one) are created 0600, which hides a model from
    colleagues on a shared machine."""
    umask = os.umask(0)
    os.umask(umask)
    folder = Path(folder)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def export_text_only(source: str | Path, target: str | Path) -> Path:
    """Writes the text-only inference checkpoint of the trained folder `source` (or a Hub id) to `target`:
    weights without the vision tower, visual samplers and image2text generator, config, code, processor and a
    card that says what it is, with its parameter count and the source model's scores (from `results.json`)."""
    from modeling_bga_mner import BgaMnerForTokenClassification
    from processing_bga_mner import BgaMnerProcessor

    source, target = str(source), Path(target)
    model = BgaMnerForTokenClassification.from_pretrained(source).to_text_only()
    processor = BgaMnerProcessor.from_pretrained(source, trust_remote_code=True)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    processor.save_pretrained(target)

    def read(name: str) -> dict:
        path = Path(source) / name
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    results, settings = read("results.json"), read("training_args.json")
    write_model_card(
        target,
        {split: results[split] for split in ("validation", "test") if split in results},
        settings,
        [],
        settings.get("dataset_name", "twitter"),
        model_id=None,
        training_images=results.get("training_images"),
        text_only_parameters=sum(p.numel() for p in model.parameters()),
        types=entity_types(model.config.id2label.values()),
    )
    apply_umask(target)
    return target
