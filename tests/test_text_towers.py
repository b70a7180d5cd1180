"""Text towers beyond BERT: RoBERTa, XLM-RoBERTa and BERTweet (tiny random models and tokenizers of each
family, built here), and towers of different depths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_run_mner import SMOKE, run
from tiny import (
    save_tiny_bertweet_tokenizer,
    save_tiny_roberta_tokenizer,
    save_tiny_tokenizer,
    save_tiny_xlm_roberta_tokenizer,
    tiny_processor,
    tiny_text_config,
    tiny_vision_config,
)
from transformers import (
    AutoModel,
    AutoProcessor,
    AutoTokenizer,
    BertConfig,
    CLIPImageProcessorPil,
    CLIPVisionModel,
    GPT2Config,
    GPT2Model,
    RobertaConfig,
    XLMRobertaConfig,
    pipeline,
)

from configuration_bga_mner import BgaMnerConfig
from modeling_bga_mner import BgaMnerForTokenClassification
from processing_bga_mner import BgaMnerProcessor, split_words

FAMILIES = {  # name -> (config class, tokenizer builder)
    "bert": (BertConfig, save_tiny_tokenizer),
    "roberta": (RobertaConfig, save_tiny_roberta_tokenizer),
    "xlm-roberta": (XLMRobertaConfig, save_tiny_xlm_roberta_tokenizer),
    "bertweet": (RobertaConfig, save_tiny_bertweet_tokenizer),  # a RoBERTa model with a Python BPE tokenizer
}
TEXT = "RT @JayKenMinaj : Obama\xa0visits  New York 😀 with #Apple CEO Tim Cook http://t.co/x"


def save_tower(folder: Path, family: str, layers: int = 3) -> Path:
    """A tiny random text model of the family with its tokenizer, saved as a Hub checkpoint would be."""
    config_class, save_tokenizer = FAMILIES[family]
    tokenizer = save_tokenizer(folder)
    settings = tiny_text_config(num_hidden_layers=layers).to_dict()
    settings.pop("model_type", None)
    settings.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    if config_class is not BertConfig:  # RoBERTa's positions start after the padding index; one token type
        settings.update(max_position_embeddings=64 + tokenizer.pad_token_id + 1, type_vocab_size=1)
    torch.manual_seed(0)
    AutoModel.from_config(config_class(**settings), add_pooling_layer=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vision(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vision")
    torch.manual_seed(1)
    CLIPVisionModel(tiny_vision_config()).save_pretrained(folder)
    return folder


def family_processor(folder: Path) -> BgaMnerProcessor:
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return BgaMnerProcessor(image_processor, AutoTokenizer.from_pretrained(folder), num_object_crops=2, max_length=64)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_text_family_loads_every_weight_and_computes_what_its_own_model_computes(family, tmp_path):
    tower_folder = save_tower(tmp_path / "tower", family)
    model = BgaMnerForTokenClassification.from_text_vision_pretrained(str(tower_folder), use_generation=False).eval()
    tower = AutoModel.from_pretrained(tower_folder, add_pooling_layer=False).eval()
    ours = {f"embeddings.{k}": v for k, v in model.text_embeddings.state_dict().items()}
    layers = [*model.text_plain_layers, *(layer.text_extractor for layer in model.bga_layers)]
    for i, layer in enumerate(layers):
        ours.update({f"encoder.layer.{i}.{k}": v for k, v in layer.state_dict().items()})
    theirs = tower.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)

    processor = family_processor(tower_folder)
    encoding = processor(text=["Obama visits New York 😀 Paris", "Paris"])  # padded second row: RoBERTa's positions
    assert len(encoding["input_ids"]) == 2 and encoding["input_ids"][1, -1] == processor.tokenizer.pad_token_id
    with torch.no_grad():
        logits = model(**encoding).logits
        hidden = tower(input_ids=encoding["input_ids"], attention_mask=encoding["attention_mask"]).last_hidden_state
    real = encoding["attention_mask"].bool()
    torch.testing.assert_close(logits[real], model.classifier(hidden)[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_pipeline_gives_word_offsets_and_the_models_tags_with_each_familys_tokenizer(family, tmp_path, vision):
    tower_folder = save_tower(tmp_path / "tower", family)
    model = BgaMnerForTokenClassification.from_text_vision_pretrained(
        str(tower_folder), str(vision), num_object_crops=2, max_text_length=64
    ).eval()
    with torch.no_grad():  # a CRF that likes entities, so that random weights still find some
        model.crf.transitions.zero_()
        model.classifier.bias.copy_(torch.tensor([-0.5, 1.0, 0.5, 1.0, 0.5, 1.0, 0.5, 1.0, 0.5]))
    processor = family_processor(tower_folder)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    assert type(AutoProcessor.from_pretrained(tmp_path / "model", trust_remote_code=True).tokenizer) is type(
        processor.tokenizer
    )

    ner = pipeline("token-classification", model=str(tmp_path / "model"), trust_remote_code=True)
    words, spans = split_words(TEXT)
    encoding = processor(text=[TEXT])
    with torch.no_grad():
        tags = processor.decode_predictions(model(**encoding).predictions, encoding)[0]
    found = ner(TEXT, aggregation_strategy="none", ignore_labels=[])
    assert [(w["word"], w["start"], w["end"]) for w in found] == [
        (word, start, end) for word, (start, end) in zip(words, spans, strict=True)
    ]
    assert [w["entity"] for w in found] == tags
    entities = ner(TEXT, aggregation_strategy="first")  # a Python tokenizer too: words are grouped, not sub-words
    assert entities and all(TEXT[e["start"] : e["end"]] == e["word"] for e in entities)


def test_a_text_tower_deeper_than_the_vision_tower_puts_the_bga_layers_on_its_top_layers(tmp_path):
    tower_folder = save_tower(tmp_path / "tower", "bert", layers=5)
    torch.manual_seed(1)
    vision = CLIPVisionModel(tiny_vision_config(num_hidden_layers=3))
    vision.save_pretrained(tmp_path / "vision")
    model = BgaMnerForTokenClassification.from_text_vision_pretrained(str(tower_folder), str(tmp_path / "vision"))
    assert (model.config.num_bga_layers, model.config.num_plain_text_layers) == (3, 2)  # the most both allow
    tower = AutoModel.from_pretrained(tower_folder)
    text_layers = [*model.text_plain_layers, *(layer.text_extractor for layer in model.bga_layers)]
    for ours, theirs in zip(text_layers, tower.encoder.layer, strict=True):  # plain: 0, 1; BGA: 2, 3, 4
        assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())
    visual_layers = [model.vision_first_layer, *(layer.visual_extractor for layer in model.bga_layers[:-1])]
    for ours, theirs in zip(visual_layers, getattr(vision, "vision_model", vision).encoder.layers, strict=True):
        assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())
    assert len(visual_layers) == 3

    # The other way round: a 3-layer text tower with a 5-layer ViT uses ViT layers 0..1 under 2 BGA layers.
    shallow = BgaMnerConfig(text_config=tiny_text_config().to_dict(), vision_config=tiny_vision_config(
        num_hidden_layers=5).to_dict())  # fmt: skip
    assert (shallow.num_bga_layers, shallow.num_plain_text_layers) == (2, 1)
    with pytest.raises(ValueError, match="text tower has 5 and the vision tower 3 layers, so N is between 1 and 3"):
        BgaMnerConfig(text_config=tower.config.to_dict(), vision_config=vision.config.to_dict(), num_bga_layers=4)


def test_an_unsupported_text_model_is_named_with_the_supported_ones(tmp_path):
    GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"'gpt2' model; supported text models: BERT, RoBERTa, XLM-RoBERTa and BERT"):
        BgaMnerForTokenClassification.from_text_vision_pretrained(str(tmp_path / "gpt2"), use_generation=False)
    with pytest.raises(ValueError, match="Text models of type 'gpt2' are not supported"):
        BgaMnerConfig(text_config=GPT2Config().to_dict())
    bertweet = RobertaConfig(vocab_size=64001, max_position_embeddings=130, pad_token_id=1).to_dict()
    with pytest.raises(ValueError, match="max_text_length=256 .* exceeds the text tower's 128 positions"):
        BgaMnerConfig(text_config=bertweet, max_text_length=256)  # windows longer than BERTweet reads


def test_a_byte_level_tokenizer_without_prefix_spaces_is_refused(tmp_path):
    save_tiny_roberta_tokenizer(tmp_path / "tokenizer")
    plain = AutoTokenizer.from_pretrained(tmp_path / "tokenizer", add_prefix_space=False)
    with pytest.raises(ValueError, match="add_prefix_space=True"):
        BgaMnerProcessor(tiny_processor(tmp_path / "bert").image_processor, plain)


def test_run_mner_trains_a_roberta_text_tower_end_to_end(tmp_path):
    tower_folder = save_tower(tmp_path / "roberta", "roberta")
    # The tokenizer as a Hub RoBERTa ships it: without add_prefix_space; run_mner.py sets it for word input.
    config = json.loads((tower_folder / "tokenizer_config.json").read_text())
    config["add_prefix_space"] = False
    (tower_folder / "tokenizer_config.json").write_text(json.dumps(config))
    output = tmp_path / "run"
    run(str(SMOKE), "--text_model", str(tower_folder), "--num_train_epochs", "2", "--output_dir", str(output))
    results = json.loads((output / "results.json").read_text())
    assert results["world_size"] == 1 and results["mechanism"]["text_keep_ratio"]
    processor = AutoProcessor.from_pretrained(output, trust_remote_code=True)
    assert processor.tokenizer.add_prefix_space is True
    model = BgaMnerForTokenClassification.from_pretrained(output)
    assert model.config.text_config.model_type == "roberta"
    ner = pipeline("token-classification", model=str(output), trust_remote_code=True)
    assert [w["word"] for w in ner("Obama visits Paris", aggregation_strategy="none", ignore_labels=[])] == [
        "Obama",
        "visits",
        "Paris",
    ]
