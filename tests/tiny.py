"""Tiny random BERT / CLIP configurations, tokenizers and batches for fast tests (no download)."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from transformers import BertConfig, BertTokenizerFast, CLIPVisionConfig

from configuration_bga_mner import BgaMnerConfig

WORDS = ["obama", "visits", "new", "york", "with", "apple", "ceo", "rt", "the", "in", "at", "game", "http", "co"]


def tiny_text_config(**overrides) -> BertConfig:
    settings = dict(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    return BertConfig(**{**settings, **overrides})


def tiny_vision_config(**overrides) -> CLIPVisionConfig:
    settings = dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=48,
        image_size=32,
        patch_size=16,
    )
    return CLIPVisionConfig(**{**settings, **overrides})


def tiny_config(text: dict | None = None, vision: dict | None = None, **overrides) -> BgaMnerConfig:
    settings = dict(generator_intermediate_size=40, max_text_length=32, num_object_crops=2)
    return BgaMnerConfig(
        text_config=tiny_text_config(**(text or {})).to_dict(),
        vision_config=tiny_vision_config(**(vision or {})).to_dict(),
        **{**settings, **overrides},
    )


def save_tiny_tokenizer(directory: Path, model_max_length: int | None = 64) -> BertTokenizerFast:
    """A WordPiece tokenizer whose vocabulary spells any ASCII word letter by letter (`model_max_length` None:
    the tokenizer states no limit, as some Hub tokenizers)."""
    directory.mkdir(parents=True, exist_ok=True)
    pieces = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *pieces, *("##" + p for p in pieces)]
    limit = {} if model_max_length is None else {"model_max_length": model_max_length}
    tokenizer = BertTokenizerFast(vocab={piece: i for i, piece in enumerate(vocab)}, do_lower_case=True, **limit)
    tokenizer.save_pretrained(directory)
    return tokenizer


def random_batch(
    config: BgaMnerConfig, batch: int = 3, length: int = 10, seed: int = 0, images: list[bool] | None = None
):
    """Token ids with [CLS]=2 / [SEP]=3, padding on the last row, labels on every word position,
    and pixel values for the rows that `images` marks (all by default)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, config.text_config.vocab_size, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[-1, length - 3 :] = 0
    input_ids[:, 0] = 2
    lengths = attention_mask.sum(1)
    input_ids[torch.arange(batch), lengths - 1] = 3
    input_ids[attention_mask == 0] = 0
    labels = torch.randint(0, config.num_labels, (batch, length), generator=generator)
    labels[:, 0] = -100
    labels[torch.arange(batch), lengths - 1] = -100
    labels[attention_mask == 0] = -100
    vision = config.vision_config
    pixel_values = torch.randn(
        batch, config.num_image_slots, 3, vision.image_size, vision.image_size, generator=generator
    )
    pixel_mask = torch.ones(batch, config.num_image_slots, dtype=torch.bool)
    pixel_mask[:, -1] = False  # the last crop slot is missing everywhere
    if images is not None:
        pixel_mask[~torch.tensor(images)] = False
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        token_type_ids=torch.zeros_like(input_ids),
        labels=labels,
        pixel_values=pixel_values,
        pixel_mask=pixel_mask,
    )


def tiny_processor(directory: Path, **overrides):
    """A processor with the tiny tokenizer and a 32-pixel CLIP image processor (matches tiny_config)."""
    from transformers import CLIPImageProcessorPil

    from processing_bga_mner import BgaMnerProcessor

    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    settings = dict(num_object_crops=2, max_length=32)
    return BgaMnerProcessor(image_processor, save_tiny_tokenizer(directory), **{**settings, **overrides})


def save_tiny_roberta_tokenizer(directory: Path):
    """A byte-level BPE tokenizer (RoBERTa's kind) over single bytes plus a few merges, with
    `add_prefix_space=True` as word-level input needs."""
    from transformers import RobertaTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    merges = [("Ġ", "o"), ("Ġo", "b"), ("Ġob", "a"), ("Ġoba", "m"), ("Ġobam", "a"), ("Ġ", "P"), ("ĠP", "a")]
    pieces = [*specials, *bytes_to_unicode().values(), *("".join(pair) for pair in merges)]
    tokenizer = RobertaTokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, add_prefix_space=True)
    tokenizer.model_max_length = 64
    tokenizer.save_pretrained(directory)
    return tokenizer


def save_tiny_xlm_roberta_tokenizer(directory: Path):
    """A SentencePiece-unigram tokenizer (XLM-R's kind): "▁" + letter pieces and single characters."""
    from transformers import XLMRobertaTokenizer

    specials = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    characters = string.ascii_letters + string.digits + string.punctuation
    pieces = [*specials, ("▁", -1.0), *(("▁" + c, -2.0) for c in characters), *((c, -3.0) for c in characters)]
    tokenizer = XLMRobertaTokenizer(vocab=[*pieces, ("<mask>", 0.0)], model_max_length=64)
    tokenizer.save_pretrained(directory)
    return tokenizer


def save_tiny_bertweet_tokenizer(directory: Path):
    """BERTweet's tokenizer (a Python one: no offsets, no word ids) with a letter-level BPE vocabulary."""
    from transformers import BertweetTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    letters = string.ascii_letters + string.digits + string.punctuation
    (directory / "vocab.txt").write_text("".join(f"{p} 1\n" for p in [*letters, *(c + "@@" for c in letters)]))
    (directory / "bpe.codes").write_text("o b 1\n")
    tokenizer = BertweetTokenizer(
        vocab_file=str(directory / "vocab.txt"), merges_file=str(directory / "bpe.codes"), model_max_length=64
    )
    tokenizer.save_pretrained(directory)
    return tokenizer
