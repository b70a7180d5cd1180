"""The token-classification pipeline of BGA-MNER: entities from the CRF's Viterbi path, scored by the
CRF's marginal probabilities.

`pipeline("token-classification", model=<folder or Hub id>, trust_remote_code=True)` picks this class up
from the model's config (`custom_pipelines`). Words are the white-space separated pieces of the input (as
in training); the CRF labels each word at its first sub-word, so the sub-word aggregation strategies
("first", "average", "max") have nothing to merge and all equal "simple", and "none" returns one entry
per word of an entity. Every `score` is the CRF's posterior probability of the word's Viterbi label
(for a grouped entity, the mean over its words). Only tokenizer outputs reach the model: no image.
"""

from __future__ import annotations

from bisect import bisect_right

import numpy as np
import torch
from transformers import TokenClassificationPipeline
from transformers.pipelines.token_classification import AggregationStrategy

try:  # as a package (tests, scripts) or as the Hub's dynamic module
    from .processing_bga_mner import entities_from_tags, join_words, split_words
except ImportError:
    from processing_bga_mner import entities_from_tags, join_words, split_words

BOOKKEEPING = ("special_tokens_mask", "offset_mapping", "sentence", "is_last", "word_ids", "word_to_chars_map")


class BgaMnerTokenClassificationPipeline(TokenClassificationPipeline):
    """`TokenClassificationPipeline` with CRF decoding (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A tokenizer without a model_max_length would let a long text overflow the position embeddings:
        # truncate at the model's own limit instead (give `stride` to read long texts in windows).
        limit = self.model.config.text_config.max_position_embeddings
        if self.tokenizer.model_max_length > limit:
            self.tokenizer.model_max_length = limit

    def preprocess(self, sentence, offset_mapping=None, **preprocess_params):
        if isinstance(sentence, str):
            spans = split_words(sentence)[1]
        else:  # is_split_into_words=True: the words as given, joined by the delimiter
            spans = join_words(sentence, preprocess_params["delimiter"])[1]
        for model_inputs in super().preprocess(sentence, offset_mapping, **preprocess_params):
            token_words = self._token_words(model_inputs, spans)
            model_inputs["word_spans"] = spans
            model_inputs["token_words"] = token_words
            model_inputs["prediction_mask"] = torch.tensor([[word >= 0 for word in token_words]])
            yield model_inputs

    @staticmethod
    def _token_words(model_inputs: dict, spans: list[tuple[int, int]]) -> list[int]:
        """Per token, the index of the word it starts (its first sub-word), else -1."""
        special = model_inputs["special_tokens_mask"][0].tolist()
        if "word_ids" in model_inputs:
            owners = model_inputs["word_ids"]
        else:
            starts = [start for start, _ in spans]
            owners = []
            for (start, end), is_special in zip(model_inputs["offset_mapping"][0].tolist(), special, strict=True):
                word = bisect_right(starts, start) - 1
                owners.append(word if not is_special and end > start and word >= 0 and start < spans[word][1] else None)
        seen, token_words = set(), []
        for owner, is_special in zip(owners, special, strict=True):
            first = owner is not None and not is_special and owner not in seen
            seen.add(owner)
            token_words.append(owner if first else -1)
        return token_words

    def _forward(self, model_inputs):
        kept = {
            key: model_inputs.pop(key) for key in (*BOOKKEEPING, "word_spans", "token_words") if key in model_inputs
        }
        output = self.model(**model_inputs, output_marginals=True)
        return {"predictions": output.predictions, "marginals": output.marginals, **kept, **model_inputs}

    def postprocess(self, all_outputs, aggregation_strategy=AggregationStrategy.NONE, ignore_labels=None):
        ignore_labels = ["O"] if ignore_labels is None else ignore_labels
        sentence, spans = all_outputs[0]["sentence"], all_outputs[0]["word_spans"]
        id2label = self.model.config.id2label
        tags, scores, first_tokens = ["O"] * len(spans), [None] * len(spans), [None] * len(spans)
        for outputs in all_outputs:  # chunks of a long input: the first chunk that sees a word labels it
            predictions, marginals = outputs["predictions"][0], outputs["marginals"][0].float()
            for position, word in enumerate(outputs["token_words"]):
                if word >= 0 and first_tokens[word] is None:
                    label = int(predictions[position])
                    tags[word], scores[word], first_tokens[word] = (
                        id2label[label],
                        float(marginals[position, label]),
                        position,
                    )
        if aggregation_strategy == AggregationStrategy.NONE:
            return [
                {
                    "entity": tag,
                    "score": np.float32(score),
                    "index": index,
                    "word": sentence[start:end],
                    "start": start,
                    "end": end,
                }
                for tag, score, index, (start, end) in zip(tags, scores, first_tokens, spans, strict=True)
                if tag not in ignore_labels
            ]
        return [
            {
                "entity_group": entity["type"],
                "score": np.float32(entity["score"]),
                "word": entity["text"],
                "start": entity["start"],
                "end": entity["end"],
            }
            for entity in entities_from_tags(tags, spans, scores, sentence)
            if entity["type"] not in ignore_labels
        ]
