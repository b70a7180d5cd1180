"""The token-classification pipeline of BGA-MNER: entities from the CRF's Viterbi path, scored by the
CRF's marginal probabilities.

`pipeline("token-classification", model=<folder or Hub id>, trust_remote_code=True)` picks this class up
from the model's config (`custom_pipelines`). Words are the white-space separated pieces of the input (as
in training); the CRF labels each word at its first sub-word, so the sub-word aggregation strategies
("first", "average", "max") have nothing to merge and all equal "simple", and "none" returns one entry
per word of an entity. Every `score` is the CRF's posterior probability of the word's Viterbi label
(for a grouped entity, the mean over its words). Only tokenizer outputs reach the model: no image.
Words are encoded as the processor encodes them (`encode_windows`): long texts in windows of whole words,
character offsets from the words (so Python tokenizers without offsets, BERTweet's, work too).
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import TokenClassificationPipeline
from transformers.pipelines.token_classification import AggregationStrategy

try:  # as a package (tests, scripts) or as the Hub's dynamic module
    from .processing_bga_mner import encode_windows, entities_from_tags, join_words, split_words
except ImportError:
    from processing_bga_mner import encode_windows, entities_from_tags, join_words, split_words

BOOKKEEPING = ("sentence", "is_last", "word_spans", "token_words")
SUBWORD_STRATEGIES = {AggregationStrategy.FIRST, AggregationStrategy.AVERAGE, AggregationStrategy.MAX}


class BgaMnerTokenClassificationPipeline(TokenClassificationPipeline):
    """`TokenClassificationPipeline` with CRF decoding (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Windows as in training (the processor's max_length, saved as max_text_length; within the positions).
        self.max_length = self.model.config.max_text_length

    def _sanitize_parameters(self, aggregation_strategy=None, stride=None, **kwargs):
        # Words are labelled at their first sub-word, so the sub-word strategies all equal "simple" (also with a
        # Python tokenizer, which the parent refuses them for). Long texts are always read in windows at word
        # boundaries: `stride` is accepted and not needed.
        if isinstance(aggregation_strategy, str):
            aggregation_strategy = AggregationStrategy[aggregation_strategy.upper()]
        if aggregation_strategy in SUBWORD_STRATEGIES:
            aggregation_strategy = AggregationStrategy.SIMPLE
        return super()._sanitize_parameters(aggregation_strategy=aggregation_strategy, **kwargs)

    def preprocess(self, sentence, offset_mapping=None, **preprocess_params):
        """The white-space words of `sentence` (or the given words, joined by the delimiter), encoded as the
        processor does: windows of whole words, the CRF reading each word's first sub-word. Character spans come
        from the words, so no tokenizer offsets are needed (BERTweet's Python tokenizer has none)."""
        if preprocess_params.get("is_split_into_words"):
            if not isinstance(sentence, (list, tuple)):
                raise ValueError("When `is_split_into_words=True`, `sentence` must be a list of words.")
            words = [str(word) for word in sentence]
            sentence, spans = join_words(words, preprocess_params["delimiter"])
        else:
            if not isinstance(sentence, str):
                raise ValueError("When `is_split_into_words=False`, `sentence` must be a string.")
            words, spans = split_words(sentence)
        windows = encode_windows(self.tokenizer, [words], self.max_length)
        for i, window in enumerate(windows):
            input_ids = torch.tensor([window.input_ids])
            token_words = window.word_index()
            yield {
                "input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids),
                "prediction_mask": torch.tensor([[word >= 0 for word in token_words]]),
                "token_words": token_words,
                "word_spans": spans,
                "sentence": sentence,
                "is_last": i == len(windows) - 1,
            }

    def _forward(self, model_inputs):
        kept = {key: model_inputs.pop(key) for key in BOOKKEEPING if key in model_inputs}
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
