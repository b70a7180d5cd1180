"""Processor of BGA-MNER: words to sub-word tensors (with labels aligned to the first sub-word of each
word), images and object crops to CLIP pixel tensors, and predictions back to one tag per word.

Every word gets exactly one prediction back, also the words the tokenizer turns into nothing (a lone
non-breaking space, zero-width characters, soft hyphens: they get "O"); no word is ever dropped: a text
longer than `max_length` sub-words is split at word boundaries into windows whose predictions are
merged back.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from transformers import AutoTokenizer, BatchFeature, ProcessorMixin

try:  # as a package (tests, scripts) or as the Hub's dynamic module
    from .configuration_bga_mner import MAX_IMAGE_PIXELS, MNER_LABELS
except ImportError:
    from configuration_bga_mner import MAX_IMAGE_PIXELS, MNER_LABELS

logger = logging.getLogger(__name__)

ImageInput = Image.Image | str | Path | dict | None  # dict: a `datasets.Image(decode=False)` value
TEXT_FIELDS = {  # padded field -> padding value
    "input_ids": None,  # the tokenizer's pad id
    "attention_mask": 0,
    "token_type_ids": 0,
    "labels": -100,
    "prediction_mask": 0,
    "word_index": -1,
}
WINDOW_FIELDS = ("example_index", "num_words")


def split_words(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Splits raw text at white space: the words and their character spans [start, end)."""
    matches = list(re.finditer(r"\S+", text))
    return [m.group() for m in matches], [m.span() for m in matches]


def join_words(words: Sequence[str], delimiter: str = " ") -> tuple[str, list[tuple[int, int]]]:
    """Joins pre-split words with `delimiter`: the text and each word's character span [start, end) in it."""
    spans, position = [], 0
    for word in words:
        spans.append((position, position + len(word)))
        position += len(word) + len(delimiter)
    return delimiter.join(words), spans


def _per_example(examples: list[int], num_words: list[int]) -> list[int]:
    """Word counts per example, from the per-window `example_index` and `num_words`."""
    counts = [0] * (max(examples) + 1 if examples else 0)
    for example, n in zip(examples, num_words, strict=True):
        counts[example] = n
    return counts


def entities_from_tags(
    tags: Sequence[str], spans: Sequence[tuple[int, int]], scores: Sequence[float | None], text: str
) -> list[dict]:
    """Groups word tags into entities as conlleval does (an I-X after O or another type opens an entity).
    Returns dicts with `text`, `type`, `start`, `end` (character offsets into `text`) and `score` (mean of
    the words' scores)."""
    entities, current = [], None
    for tag, (start, end), score in zip(tags, spans, scores, strict=True):
        prefix, _, kind = tag.partition("-")
        if current is not None and prefix == "I" and kind == current["type"]:
            current["end"] = end
            current["scores"].append(score)
            continue
        current = None
        if prefix in ("B", "I"):
            current = {"type": kind, "start": start, "end": end, "scores": [score]}
            entities.append(current)
    for entity in entities:
        scores = [s for s in entity.pop("scores") if s is not None]
        entity["score"] = sum(scores) / len(scores) if scores else None
        entity["text"] = text[entity["start"] : entity["end"]]
    return [{key: e[key] for key in ("text", "type", "start", "end", "score")} for e in entities]


@dataclass
class Window:
    """The sub-words of consecutive words of one example, special tokens included. `word_ids`: per token,
    the word (counted from `start`) it belongs to, None for special tokens."""

    example: int
    start: int
    input_ids: list[int]
    word_ids: list[int | None]

    def first_subwords(self) -> list[bool]:
        """Per token, whether it is the first sub-word of its word."""
        ids = self.word_ids
        return [w is not None and (i == 0 or ids[i - 1] != w) for i, w in enumerate(ids)]

    def word_index(self) -> list[int]:
        """Per token, the word of the example that starts there, else -1."""
        return [self.start + w if f else -1 for w, f in zip(self.word_ids, self.first_subwords(), strict=True)]


def encode_windows(tokenizer, words: list[list[str]], max_length: int) -> list[Window]:
    """Tokenizes pre-split words, splitting each example at word boundaries into windows of at most
    `max_length` tokens (special tokens included); a word longer than a window keeps its first sub-words.

    Fast tokenizers encode the words with `is_split_into_words` (byte-level BPE ones, RoBERTa's, need
    `add_prefix_space=True`, so that every word is read as if a space came before it, as inside a sentence).
    Python tokenizers, which have no word ids (BERTweet's), encode word by word, and their special tokens
    are added around each window."""
    budget = max_length - tokenizer.num_special_tokens_to_add()
    if tokenizer.is_fast:
        counts = tokenizer(words, is_split_into_words=True, add_special_tokens=False)
        per_word = [Counter(i for i in counts.word_ids(e) if i is not None) for e in range(len(words))]
        lengths = [[per_word[e][i] for i in range(len(example))] for e, example in enumerate(words)]
    else:
        pieces = [tokenizer(example, add_special_tokens=False)["input_ids"] if example else [] for example in words]
        lengths = [[len(p) for p in example] for example in pieces]
    spans = []  # (example, first word, end word)
    for example, example_lengths in enumerate(lengths):
        start, used = 0, 0
        for i, n in enumerate(example_lengths):
            if used + n > budget and i > start:
                spans.append((example, start, i))
                start, used = i, 0
            used += n
        spans.append((example, start, len(example_lengths)))
    if tokenizer.is_fast:
        encoded = tokenizer(
            [words[e][s:t] for e, s, t in spans], is_split_into_words=True, truncation=True, max_length=max_length
        )
        return [Window(e, s, encoded["input_ids"][row], encoded.word_ids(row)) for row, (e, s, _) in enumerate(spans)]
    windows = []
    for e, s, t in spans:
        ids = [i for piece in pieces[e][s:t] for i in piece][:budget]
        owners = [w for w, piece in enumerate(pieces[e][s:t]) for _ in piece][:budget]
        special = tokenizer.get_special_tokens_mask(ids)
        iterator = iter(owners)
        word_ids = [None if is_special else next(iterator) for is_special in special]
        windows.append(Window(e, s, tokenizer.build_inputs_with_special_tokens(ids), word_ids))
    return windows


def reads_words_as_in_text(tokenizer) -> bool:
    """Whether the tokenizer encodes a pre-split word as it encodes that word inside a sentence. Byte-level BPE
    tokenizers (RoBERTa's) do so only with `add_prefix_space=True`; without it every word would lose the space
    before it. Python tokenizers encode word by word (`encode_windows`) and pass."""
    if not tokenizer.is_fast:
        return True
    as_words = tokenizer(["x", "Paris"], is_split_into_words=True, add_special_tokens=False)
    in_text = tokenizer("x Paris", add_special_tokens=False)

    def second_word(encoding) -> list[int]:
        return [i for i, w in zip(encoding["input_ids"], encoding.word_ids(), strict=True) if w == 1]

    return second_word(as_words) == second_word(in_text)


def load_text_tokenizer(name_or_path: str):
    """The text model's tokenizer, set up for word input (`add_prefix_space=True` where it matters)."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if not reads_words_as_in_text(tokenizer) and getattr(tokenizer, "add_prefix_space", None) is False:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, add_prefix_space=True)
    return tokenizer


class BgaMnerProcessor(ProcessorMixin):
    r"""Tokenizer (BERT, RoBERTa, XLM-R or BERTweet) + CLIP image processor (the Pillow one) for BGA-MNER.

    Args:
        image_processor: a `CLIPImageProcessorPil` (no torchvision needed).
        tokenizer: the text model's tokenizer, fast or Python (BERTweet's); a byte-level BPE one needs
            `add_prefix_space=True` (`load_text_tokenizer` sets it).
        num_object_crops (`int`, defaults to 3): object crops per image; must equal the model's.
        max_length (`int`, defaults to 128): sub-words per window, special tokens included.
        label_all_subwords (`bool`, defaults to `False`): label every sub-word of a word (continuations
            of a `B-X` word get `I-X`) instead of only the first; predictions are still read from the
            first sub-word.
        label_names (`list[str]`): the label list; defaults to the project's BIO list over PER/LOC/ORG/MISC.
        max_image_pixels (`int`, defaults to 36M): an image with more pixels (by its header, before decoding) is
            treated as missing and counted as "too large".
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_object_crops: int = 3,
        max_length: int = 128,
        label_all_subwords: bool = False,
        label_names: Sequence[str] = MNER_LABELS,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        **kwargs,
    ):
        self.num_object_crops = num_object_crops
        self.max_length = max_length
        self.label_all_subwords = label_all_subwords
        self.label_names = list(label_names)
        self.max_image_pixels = max_image_pixels
        self.image_problems: Counter[str] = Counter()  # reason -> count of images read as missing
        if tokenizer is not None and not reads_words_as_in_text(tokenizer):
            raise ValueError(
                f"{type(tokenizer).__name__} encodes a pre-split word unlike the same word inside a sentence (a "
                "byte-level BPE tokenizer without add_prefix_space): load it with "
                "AutoTokenizer.from_pretrained(name, add_prefix_space=True), or with load_text_tokenizer(name)."
            )
        super().__init__(image_processor, tokenizer, **kwargs)

    # ----------------------------------------------------------------------------------------------
    # text

    def __call__(
        self,
        words: Sequence[Sequence[str]] | Sequence[str] | None = None,
        text: str | Sequence[str] | None = None,
        labels: Sequence[Sequence[str | int]] | None = None,
        images: Sequence[ImageInput] | None = None,
        crops: Sequence[Sequence[ImageInput]] | None = None,
        return_tensors: str | None = "pt",
    ) -> BatchFeature:
        """Encodes a batch. Give `words` (pre-split, one list per example, or one example as a list of
        str) or `text` (raw strings, split at white space). `labels`: per word, names or ids.
        `images`: per example a path, a PIL image, a `datasets.Image(decode=False)` dict or None; `crops`: per
        example a list of those.

        Returns one row per window (a single window unless a text exceeds `max_length`): input_ids,
        attention_mask, token_type_ids, prediction_mask (the first sub-word of each word), word_index
        (which word of its example starts there, else -1), example_index, num_words, labels (if
        given), and pixel_values (rows, 1 + crops, 3, H, W) with pixel_mask (rows, 1 + crops) if images
        are given. Tensors are padded when `return_tensors="pt"`, plain lists otherwise.
        """
        if (words is None) == (text is None):
            raise ValueError("Give either `words` (pre-split) or `text` (raw strings), not both or neither.")
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            words = [split_words(t)[0] for t in texts]
        elif words and isinstance(words[0], str):
            words = [words]
        if not words:
            raise ValueError("No text given: `text` / `words` is empty.")
        if images is not None and len(images) != len(words):
            raise ValueError(f"Got {len(words)} texts but {len(images)} images: give one image (or None) per text.")
        if crops is not None and len(crops) != len(words):
            raise ValueError(
                f"Got {len(words)} texts but {len(crops)} crop lists: give one list (maybe empty) per text."
            )
        if labels is not None and labels and labels[0] is not None and not isinstance(labels[0], (list, tuple)):
            labels = [labels]
        rows = self.encode_words(words, labels)
        if images is not None:
            pixel_values, pixel_mask = self.load_images(images, crops)
            examples = [row["example_index"] for row in rows]
            for row, values, mask in zip(rows, pixel_values[examples], pixel_mask[examples], strict=True):
                row["pixel_values"], row["pixel_mask"] = values, mask
        if return_tensors == "pt":
            return BatchFeature(self.pad(rows))
        if return_tensors is not None:
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}.")
        return BatchFeature({key: [row[key] for row in rows] for key in rows[0]} if rows else {})

    def encode_words(
        self, words: Sequence[Sequence[str]], labels: Sequence[Sequence[str | int]] | None = None
    ) -> list[dict[str, list[int] | int]]:
        """Unpadded encoding, one dict per window (see `__call__`); used by `datasets.map`."""
        if labels is not None and len(labels) != len(words):
            raise ValueError(f"Got {len(words)} examples but {len(labels)} label sequences.")
        words = [list(w) for w in words]
        label_ids = None
        if labels is not None:
            label_ids = [self._label_ids(i, w, tags) for i, (w, tags) in enumerate(zip(words, labels, strict=True))]
        rows = []
        for window in encode_windows(self.tokenizer, words, self.max_length):
            first = window.first_subwords()
            predicted = [
                w is not None and (self.label_all_subwords or f) for w, f in zip(window.word_ids, first, strict=True)
            ]
            item = {
                "input_ids": window.input_ids,
                "attention_mask": [1] * len(window.input_ids),
                "token_type_ids": [0] * len(window.input_ids),  # one segment
                "prediction_mask": [int(p) for p in predicted],
                "word_index": window.word_index(),
                "example_index": window.example,
                "num_words": len(words[window.example]),
            }
            if label_ids is not None:
                example_labels = label_ids[window.example]
                item["labels"] = [
                    -100 if not p else self._continuation(example_labels[window.start + w], first=f)
                    for w, p, f in zip(window.word_ids, predicted, first, strict=True)
                ]
            rows.append(item)
        return rows

    def _label_ids(self, example: int, words: list[str], labels: Sequence[str | int]) -> list[int]:
        if len(labels) != len(words):
            raise ValueError(f"Example {example}: {len(words)} words but {len(labels)} labels.")
        ids = []
        for label in labels:
            if isinstance(label, str):
                if label not in self.label_names:
                    raise ValueError(f"Example {example}: unknown label {label!r}; known: {self.label_names}.")
                label = self.label_names.index(label)
            ids.append(int(label))
        return ids

    def _continuation(self, label: int, first: bool) -> int:
        """The label of a sub-word: the word's own on its first sub-word, else B-X turned into I-X."""
        name = self.label_names[label]
        if first or not name.startswith("B-"):
            return label
        return self.label_names.index("I-" + name[2:])

    def decode_predictions(self, predictions: torch.Tensor, encoding: BatchFeature) -> list[list[str]]:
        """Maps predicted label ids (rows, L) back to one tag per input word, per example, merging the
        windows of long texts. Words without any sub-word get "O"."""
        ids = self.word_values(predictions, encoding, missing=-100)
        return [[self.label_names[i] if i >= 0 else "O" for i in example] for example in ids]

    def word_values(self, values: torch.Tensor, encoding: BatchFeature, missing=None) -> list[list]:
        """Per example, the value (rows, L) at the first sub-word of each word, windows merged; `missing`
        for words without any sub-word."""
        examples = encoding["example_index"].tolist()
        words = [[missing] * n for n in _per_example(examples, encoding["num_words"].tolist())]
        starts = encoding["word_index"] >= 0
        for row, example in enumerate(examples):
            word_ids, row_values = encoding["word_index"][row][starts[row]], values[row][starts[row]]
            for word, value in zip(word_ids.tolist(), row_values.tolist(), strict=True):
                words[example][word] = value
        return words

    # ----------------------------------------------------------------------------------------------
    # images

    def load_images(
        self, images: Sequence[ImageInput], crops: Sequence[Sequence[ImageInput]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per example the global image and up to `num_object_crops` crops (paths, PIL images or None).
        Returns pixel_values (b, 1 + crops, 3, H, W) and pixel_mask (b, 1 + crops) bool. A missing,
        unreadable or truncated file is a missing slot (counted in `image_problems`, warned about once);
        crops count only beside a real global image. Any colour mode is converted to RGB."""
        slots = 1 + self.num_object_crops
        crops = crops if crops is not None else [[] for _ in images]
        opened, mask = [], torch.zeros(len(images), slots, dtype=torch.bool)
        for example, (image, example_crops) in enumerate(zip(images, crops, strict=True)):
            candidates = [image, *list(example_crops or [])[: self.num_object_crops]]
            for slot, candidate in enumerate(candidates):
                rgb = self._open_rgb(candidate)
                if rgb is None or (slot > 0 and not mask[example, 0]):
                    continue
                mask[example, slot] = True
                opened.append(rgb)
        size = self.image_processor.crop_size
        pixel_values = torch.zeros(len(images), slots, 3, size["height"], size["width"])
        if opened:
            pixel_values[mask] = self.image_processor(images=opened, return_tensors="pt")["pixel_values"]
        return pixel_values, mask

    def _open_rgb(self, image: ImageInput) -> Image.Image | None:
        if isinstance(image, dict):  # {"bytes": ..., "path": ...} from a datasets.Image(decode=False) column
            image = io.BytesIO(image["bytes"]) if image.get("bytes") else image.get("path")
        if image is None:
            return None
        try:
            if isinstance(image, Image.Image):
                image.load()
                return image.convert("RGB")
            with warnings.catch_warnings(), Image.open(image) as opened:  # PIL warns on opening a huge header
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                if opened.width * opened.height > self.max_image_pixels:  # by the header, before decoding
                    return self._problem(image, "too large", f"{opened.width} x {opened.height} pixels")
                opened.load()  # decode now: truncated files fail here, not later
                return opened.convert("RGB")
        except Image.DecompressionBombError as error:
            return self._problem(image, "too large", error)
        except (OSError, UnidentifiedImageError, ValueError) as error:
            return self._problem(image, "missing" if isinstance(error, FileNotFoundError) else "unreadable", error)

    def _problem(self, image: ImageInput, reason: str, detail) -> None:
        """Counts an image read as missing (in `image_problems`), warning about the first one."""
        if not self.image_problems:
            logger.warning(
                "Image %s: %s (%s); its example is treated as having no image. Further problems are only "
                "counted, in processor.image_problems.",
                image,
                reason,
                detail,
            )
        self.image_problems[reason] += 1

    # ----------------------------------------------------------------------------------------------
    # batching

    def pad(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Pads unpadded rows (from `encode_words`, with optional pixel tensors) into a batch."""
        width = max(len(row["input_ids"]) for row in rows)
        batch = {}
        for key, value in TEXT_FIELDS.items():
            if key not in rows[0]:
                continue
            value = self.tokenizer.pad_token_id if value is None else value
            batch[key] = torch.tensor([list(row[key]) + [value] * (width - len(row[key])) for row in rows])
        for key in WINDOW_FIELDS:
            if key in rows[0]:
                batch[key] = torch.tensor([row[key] for row in rows])
        batch["prediction_mask"] = batch["prediction_mask"].bool()
        if "pixel_values" in rows[0]:
            batch["pixel_values"] = torch.stack([row["pixel_values"] for row in rows])
            batch["pixel_mask"] = torch.stack([row["pixel_mask"] for row in rows])
        return batch


class BgaMnerDataCollator:
    """Pads tokenised rows (from `BgaMnerProcessor.encode_words`, e.g. after `datasets.map`) and loads
    their images: rows with an `image` path (and optional `crops` paths) get pixel_values and pixel_mask;
    when no row of the batch has an image, no pixel tensors are made (text-only training)."""

    def __init__(self, processor: BgaMnerProcessor):
        self.processor = processor

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        batch = self.processor.pad(rows)
        images = [row.get("image") for row in rows]
        if any(image is not None for image in images):
            crops = [row.get("crops") or [] for row in rows]
            batch["pixel_values"], batch["pixel_mask"] = self.processor.load_images(images, crops)
        return batch


BgaMnerProcessor.register_for_auto_class()
