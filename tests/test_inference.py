"""Text-only inference: CRF marginals, the token-classification pipeline, the text-only checkpoint,
the prediction command and the model card."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from tiny import tiny_config, tiny_processor
from transformers import AutoModelForTokenClassification, pipeline

from model_card import build_model_card, results_table
from modeling_bga_mner import BgaMnerForTokenClassification, LinearChainCrf
from predict_mner import main as predict_main
from predict_mner import prepare_for_inference
from processing_bga_mner import entities_from_tags, split_words
from run_mner import compute_metrics

ROOT = Path(__file__).resolve().parents[1]
TWEETS = [
    "RT @JayKenMinaj : Me outside of where George Zimmerman got shot at .",
    "Obama\xa0visits  New York with #Apple CEO Tim Cook 😀 http://t.co/lekmNMNppV",
    "Great day for baseball at Target Field \u200b with LeBron James !",
    "no entities here",
    "x",
]


def test_crf_marginals_equal_brute_force_enumeration():
    torch.manual_seed(0)
    crf = LinearChainCrf(3, batch_first=True)
    emissions = torch.randn(2, 4, 3)
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    marginals = crf.marginals(emissions, mask)
    for row, length in enumerate([4, 2]):
        expected = torch.zeros(length, 3)
        total = 0.0
        for path in itertools.product(range(3), repeat=length):
            tags = torch.tensor([path])
            weight = crf(emissions[row : row + 1, :length], tags).exp().item()  # p(path)
            total += weight
            for i, tag in enumerate(path):
                expected[i, tag] += weight
        assert total == pytest.approx(1.0, abs=1e-5)
        torch.testing.assert_close(marginals[row, :length], expected, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> tuple[Path, BgaMnerForTokenClassification, object]:
    folder = tmp_path_factory.mktemp("model")
    processor = tiny_processor(folder / "tokenizer", max_length=128)
    torch.manual_seed(3)
    text = {"vocab_size": len(processor.tokenizer), "max_position_embeddings": 256}
    model = BgaMnerForTokenClassification(tiny_config(text=text, max_text_length=128)).eval()  # = max_length
    with torch.no_grad():  # a CRF that likes entities, so that random weights still find some
        model.crf.transitions.zero_()
        model.classifier.bias.copy_(torch.tensor([-0.5, 1.0, 0.5, 1.0, 0.5, 1.0, 0.5, 1.0, 0.5]))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model, processor


def model_entities(model, processor, text: str) -> list[dict]:
    encoding = processor(text=[text])
    with torch.no_grad():
        outputs = model(**encoding, output_marginals=True)
    tags = processor.decode_predictions(outputs.predictions, encoding)[0]
    chosen = outputs.marginals.gather(-1, outputs.predictions.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    scores = processor.word_values(chosen, encoding)[0]
    return entities_from_tags(tags, split_words(text)[1], scores, text)


def test_pipeline_returns_the_models_viterbi_entities_for_every_aggregation_strategy(saved_model):
    folder, model, processor = saved_model
    ner = pipeline("token-classification", model=str(folder), trust_remote_code=True)
    assert type(ner).__name__ == "BgaMnerTokenClassificationPipeline"
    found = 0
    for text in TWEETS:
        expected = model_entities(model, processor, text)
        found += len(expected)
        for strategy in ("simple", "first", "average", "max"):
            entities = ner(text, aggregation_strategy=strategy)
            assert [(e["entity_group"], e["start"], e["end"], e["word"]) for e in entities] == [
                (e["type"], e["start"], e["end"], e["text"]) for e in expected
            ], (text, strategy)
            assert [float(e["score"]) for e in entities] == pytest.approx([e["score"] for e in expected], abs=1e-5)
            assert all(text[e["start"] : e["end"]] == e["word"] and 0 < e["score"] <= 1 for e in entities)
        words = ner(text, aggregation_strategy="none")
        assert all(e["word"] == text[e["start"] : e["end"]] and " " not in e["word"] for e in words)
        assert sum(len(split_words(e["text"])[0]) for e in expected) == len(words)
    assert found >= 5
    # "#Apple" and "@JayKenMinaj" are one word each: offsets cover the whole white-space piece.
    assert all(
        e["word"] != "#" and e["word"] != "@" for e in ner(TWEETS[1] + " " + TWEETS[0], aggregation_strategy="simple")
    )


def test_pipeline_batches_and_pre_split_words(saved_model):
    folder, model, processor = saved_model
    ner = pipeline("token-classification", model=str(folder), trust_remote_code=True, aggregation_strategy="simple")
    batched = ner(TWEETS, batch_size=2)
    assert batched == [ner(text) for text in TWEETS]
    words = ["Obama", "visits", "New", "York"]
    (split,) = ner([words], is_split_into_words=True)
    assert [(e["start"], e["end"]) for e in split] == [(e["start"], e["end"]) for e in ner(" ".join(words))]


def test_inference_runs_no_vision_module_and_the_text_only_checkpoint_predicts_the_same(saved_model, tmp_path):
    folder, model, processor = saved_model
    calls = []
    vision = [model.vision_embeddings, model.vision_first_layer, model.generator.image_to_text]
    for module in vision + [layer.visual_extractor for layer in model.bga_layers[:-1]]:
        module.register_forward_hook(lambda *_: calls.append(1))
    text_only = model.to_text_only()
    text_only.save_pretrained(tmp_path / "text-only")
    processor.save_pretrained(tmp_path / "text-only")
    weights = load_file(tmp_path / "text-only" / "model.safetensors")
    assert not any(("vision_" in key or "visual_" in key or "image_to_text" in key) for key in weights)
    loaded = AutoModelForTokenClassification.from_pretrained(tmp_path / "text-only", trust_remote_code=True).eval()
    assert (
        loaded.config.text_only and sum(p.numel() for p in loaded.parameters()) == model.parameter_report()["inference"]
    )
    encoding = processor(text=TWEETS)
    with torch.no_grad():
        full, small = model(**encoding, output_marginals=True), loaded(**encoding, output_marginals=True)
    assert torch.equal(full.predictions, small.predictions)
    torch.testing.assert_close(full.marginals, small.marginals)
    ner = pipeline("token-classification", model=str(tmp_path / "text-only"), trust_remote_code=True)
    assert ner(TWEETS[1]) == pipeline("token-classification", model=str(folder), trust_remote_code=True)(TWEETS[1])
    assert calls == []


def predict(*args: str) -> str | None:
    """Runs the prediction command in-process; returns its error message, or None on success."""
    try:
        predict_main(list(args))
    except SystemExit as exit_:
        return str(exit_.code)
    return None


def test_prediction_command_reads_text_jsonl_and_conll(saved_model, tmp_path, capsys):
    folder, model, processor = saved_model
    (tmp_path / "tweets.txt").write_text("\n".join(TWEETS[:3]) + "\n\n", encoding="utf-8")
    (tmp_path / "tweets.jsonl").write_text(
        json.dumps({"text": TWEETS[1]}) + "\n" + json.dumps({"tokens": ["Obama", "visits", "Paris"]}) + "\n"
    )
    conll = ROOT / "tests" / "fixtures" / "tiny-corpus" / "test.txt"
    for source, target in [("tweets.txt", "a.jsonl"), ("tweets.jsonl", "b.jsonl"), (conll, "c.conll")]:
        assert (
            predict("--model", str(folder), "--input", str(tmp_path / source), "--output", str(tmp_path / target))
            is None
        )
    records = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["text"] for r in records] == TWEETS[:3]
    for record, text in zip(records, TWEETS[:3], strict=True):
        expected = model_entities(model, processor, text)
        assert [{**e, "score": None} for e in record["entities"]] == [{**e, "score": None} for e in expected]
        assert [e["score"] for e in record["entities"]] == pytest.approx([e["score"] for e in expected], rel=1e-5)
        assert len(record["tags"]) == len(split_words(text)[0])
    second = json.loads((tmp_path / "b.jsonl").read_text().splitlines()[1])
    assert second["text"] == "Obama visits Paris" and len(second["tags"]) == 3
    # CoNLL in, CoNLL out: token, gold, and the model's own Viterbi tag for that word, example by example.
    written = [block.splitlines() for block in (tmp_path / "c.conll").read_text().strip().split("\n\n")]
    source = [block.splitlines() for block in conll.read_text().strip().split("\n\n")]
    assert len(written) == len(source)
    for lines, source_lines in zip(written, source, strict=True):
        assert lines[0] == source_lines[0] and lines[0].startswith("IMGID:")
        rows = [line.split("\t") for line in lines[1:]]
        gold = [line.split("\t") for line in source_lines[1:]]
        assert [row[:2] for row in rows] == [[token, label.replace("OTHER", "MISC")] for token, label in gold]
        assert [row[2] for row in rows] == model_tags(model, processor, [token for token, _ in gold])
    # ... and the scores of the written columns, as run_mner.py computes them, in the Table 2 layout.
    columns = [[line.split("\t") for line in lines[1:]] for lines in written]
    scores = compute_metrics([[r[1] for r in rows] for rows in columns], [[r[2] for r in rows] for rows in columns])
    assert results_table({"test.txt": scores}) in capsys.readouterr().out


def model_tags(model, processor, words: list[str]) -> list[str]:
    """The model's tags for one example that fits in one window."""
    encoding = processor(words=[words])
    assert len(encoding["input_ids"]) == 1
    with torch.no_grad():
        return processor.decode_predictions(model(**encoding).predictions, encoding)[0]


def test_prediction_command_splits_a_long_text_into_windows_and_tags_every_word(saved_model, tmp_path):
    folder, model, processor = saved_model
    words = " ".join(TWEETS[:3] * 4).split()
    encoding = processor(words=[words])
    windows = [row[row >= 0] for row in encoding["word_index"]]  # the words each window holds
    assert len(windows) >= 3
    (tmp_path / "long.jsonl").write_text(json.dumps({"tokens": words}) + "\n")
    assert predict("--model", str(folder), "--input", str(tmp_path / "long.jsonl"),
                   "--output", str(tmp_path / "long.conll")) is None  # fmt: skip
    rows = [line.split("\t") for line in (tmp_path / "long.conll").read_text().splitlines() if line]
    assert [row[0] for row in rows] == words  # every word, once, in order
    tags = [row[1] for row in rows]
    bounds = [(window[0].item(), window[-1].item() + 1) for window in windows]
    assert all(end <= start for (_, end), (start, _) in zip(bounds[:-1], bounds[1:], strict=True))  # in order
    for start, end in bounds:  # each window's words tagged as the model tags them alone
        assert tags[start:end] == model_tags(model, processor, words[start:end])


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "", "empty.txt: no text in the file"),
        ("bad.jsonl", '{"text": "fine"}\n{oops\n', "bad.jsonl:2: not a JSON object"),
        ("bad.jsonl", '{"text": "fine"}\n[1, 2]\n', "bad.jsonl:2: expected an object with a 'text' string"),
        ("bad.conll", "Obama\tB-PER\nParis\tTOWN\n", "bad.conll:2: label 'TOWN' is not BIO"),
    ],
)
def test_prediction_command_rejects_bad_input_with_file_and_line(saved_model, tmp_path, name, content, message):
    (tmp_path / name).write_text(content, encoding="utf-8")
    error = predict("--model", str(saved_model[0]), "--input", str(tmp_path / name), "--output", str(tmp_path / "o"))
    assert message in error


def test_model_card_metadata_is_what_the_hub_reads(tmp_path):
    metrics = {"overall": {"precision": 0.78, "recall": 0.74, "f1": 0.7631}, "PER": {"f1": 0.868}}
    card = build_model_card({"test": metrics}, {"learning_rate": 3e-5}, ["bert-base-uncased"], "twitter2015")
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.pipeline_tag == "token-classification" and loaded.data.library_name == "transformers"
    assert loaded.data.widget and all("text" in example for example in loaded.data.widget)
    (result,) = [r for r in loaded.data.eval_results if r.metric_type == "f1"]
    assert (result.task_type, result.dataset_name, result.dataset_split, result.metric_value) == (
        "token-classification",
        "twitter2015",
        "test",
        76.31,
    )
    assert "| test | 86.80 | 0.00 | 0.00 | 0.00 | 78.00 | 74.00 | 76.31 |" in loaded.text


def test_pipeline_entities_are_the_crf_viterbi_path_not_the_emission_arg_max(tmp_path):
    """Emissions that prefer B-LOC for every word, transitions that make B-PER I-PER I-PER the best path: the
    pipeline must return the multi-word PER entity, with scores equal to marginals by brute-force enumeration."""
    processor = tiny_processor(tmp_path / "tokenizer")
    torch.manual_seed(0)
    model = BgaMnerForTokenClassification(tiny_config(text={"vocab_size": len(processor.tokenizer)})).eval()
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 0.5, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]))  # arg-max: B-LOC
        model.crf.transitions.fill_(-2.0)
        model.crf.transitions[labels.index("B-PER"), labels.index("I-PER")] = 3.0
        model.crf.transitions[labels.index("I-PER"), labels.index("I-PER")] = 3.0
        model.crf.start_transitions.zero_()
        model.crf.end_transitions.zero_()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    text = "Barack Hussein Obama"
    emissions = model.classifier.bias.detach()
    assert labels[int(emissions.argmax())] == "B-LOC"

    # Brute force over all 9^3 label paths: the best path and each word's marginal probability of a label.
    crf = model.crf
    scores = {}
    for path in itertools.product(range(len(labels)), repeat=3):
        score = crf.start_transitions[path[0]] + crf.end_transitions[path[-1]] + sum(emissions[y] for y in path)
        scores[path] = float(score + sum(crf.transitions[a, b] for a, b in zip(path[:-1], path[1:], strict=True)))
    best = max(scores, key=scores.get)
    assert [labels[y] for y in best] == ["B-PER", "I-PER", "I-PER"]
    total = sum(math.exp(s) for s in scores.values())
    marginal = [sum(math.exp(s) for p, s in scores.items() if p[i] == best[i]) / total for i in range(3)]

    ner = pipeline("token-classification", model=str(tmp_path / "model"), trust_remote_code=True)
    (entity,) = ner(text, aggregation_strategy="simple")
    assert (entity["entity_group"], entity["word"], entity["start"], entity["end"]) == ("PER", text, 0, len(text))
    assert entity["score"] == pytest.approx(sum(marginal) / 3, abs=1e-5)
    words = ner(text, aggregation_strategy="none")
    assert [w["entity"] for w in words] == ["B-PER", "I-PER", "I-PER"]
    assert [w["score"] for w in words] == pytest.approx(marginal, abs=1e-5)


def float_words(model, processor, texts: list[str]):
    """(logits over the predicted positions, the words' tags) of `model` on `texts`, in float32."""
    encoding = processor(text=texts)
    with torch.inference_mode():
        outputs = model(**encoding)
    chosen = outputs.predictions >= 0
    return outputs.logits.float()[chosen], processor.decode_predictions(outputs.predictions, encoding)


def test_int8_quantizes_the_bga_layers_keeps_layer_0_and_the_classifier_and_predicts_in_the_same_format(
    saved_model, tmp_path
):
    folder, model, processor = saved_model
    loaded = AutoModelForTokenClassification.from_pretrained(folder, trust_remote_code=True)
    linear = {name for name, m in loaded.named_modules() if type(m) is torch.nn.Linear}
    quantized = prepare_for_inference(loaded, quantize="int8")
    kinds = {name: m._get_name() for name, m in quantized.named_modules() if name in linear}  # the class, as printed
    kept = {name for name in linear if name.startswith(("text_plain_layers.", "classifier"))}
    assert len(linear) > 40 and len(kept) == 7  # BERT layer 0's six linear layers and the classifier
    assert {kinds[name] for name in kept} == {"Linear"}
    assert {kinds[name] for name in linear - kept} == {"DynamicQuantizedLinear"}
    # The arithmetic really is int8: the emissions move, by little, and the words keep their tags.
    reference, tags = float_words(model, processor, TWEETS)
    logits, int8_tags = float_words(quantized, processor, TWEETS)
    error, spread = (logits - reference).abs().max().item(), (reference - reference.mean(0)).std().item()
    assert 0 < error < 0.05 * spread, (error, spread)  # not float32, and small against the input-dependent part
    agree = [a == b for x, y in zip(tags, int8_tags, strict=True) for a, b in zip(x, y, strict=True)]
    assert sum(agree) / len(agree) >= 0.9
    # The pipeline recipe of the README: same keys, types and offsets as the float32 pipeline.
    ner = pipeline("token-classification", model=str(folder), trust_remote_code=True, aggregation_strategy="simple")
    expected = [ner(text) for text in TWEETS]
    ner.model = ner.model.quantized_int8()
    for text, float_entities in zip(TWEETS, expected, strict=True):
        entities = ner(text)
        assert all(e.keys() == {"entity_group", "score", "word", "start", "end"} for e in entities)
        assert all(text[e["start"] : e["end"]] == e["word"] and 0 < e["score"] <= 1 for e in entities)
        assert all(isinstance(e["score"], type(f["score"])) for e in entities for f in float_entities)
    # The prediction command: the same output lines as float32, most words with the same tag.
    (tmp_path / "tweets.txt").write_text("\n".join(TWEETS) + "\n", encoding="utf-8")
    for flags, name in [((), "float.jsonl"), (("--quantize", "int8"), "int8.jsonl")]:
        assert predict("--model", str(folder), "--input", str(tmp_path / "tweets.txt"), "--output",
                       str(tmp_path / name), "--device", "cpu", *flags) is None  # fmt: skip
    lines = [[json.loads(x) for x in (tmp_path / n).read_text().splitlines()] for n in ("float.jsonl", "int8.jsonl")]
    assert [r.keys() for r in lines[0]] == [r.keys() for r in lines[1]]
    assert [r["text"] for r in lines[1]] == TWEETS and [r["tags"] for r in lines[1]] == int8_tags


def test_bfloat16_computes_in_bfloat16_with_a_float32_crf(saved_model, tmp_path, capsys):
    folder, model, processor = saved_model
    for half in (
        prepare_for_inference(
            AutoModelForTokenClassification.from_pretrained(folder, trust_remote_code=True), "bfloat16"
        ),
        AutoModelForTokenClassification.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16),
    ):
        dtypes = {name: p.dtype for name, p in half.named_parameters()}
        assert {d for name, d in dtypes.items() if not name.startswith("crf.")} == {torch.bfloat16}
        assert {d for name, d in dtypes.items() if name.startswith("crf.")} == {torch.float32}
        with torch.inference_mode():
            assert half(**processor(text=TWEETS[:2])).logits.dtype == torch.bfloat16
        reference, tags = float_words(model, processor, TWEETS)
        logits, half_tags = float_words(half, processor, TWEETS)
        error, spread = (logits - reference).abs().max().item(), (reference - reference.mean(0)).std().item()
        assert 0 < error < 0.05 * spread, (error, spread)
        agree = [a == b for x, y in zip(tags, half_tags, strict=True) for a, b in zip(x, y, strict=True)]
        assert sum(agree) / len(agree) >= 0.9
    ner = pipeline("token-classification", model=str(folder), trust_remote_code=True, dtype=torch.bfloat16)
    assert ner.model.crf.transitions.dtype == torch.float32 and ner.model.classifier.weight.dtype == torch.bfloat16
    assert all(TWEETS[1][e["start"] : e["end"]] == e["word"] for e in ner(TWEETS[1]))
    assert predict("--model", str(folder), "--input", str(tmp_path / "x.txt"), "--output", str(tmp_path / "y.jsonl"),
                   "--quantize", "int8", "--dtype", "bfloat16") == "2"  # fmt: skip
    assert "--quantize int8 runs on the CPU in float32" in capsys.readouterr().err
