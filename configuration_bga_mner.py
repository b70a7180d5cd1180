"""Configuration of BGA-MNER (Chen et al., "Learning Implicit Entity-object Relations by Bidirectional
Generative Alignment for Multimodal NER", ACM MM 2023).

The model is a text branch (BERT, RoBERTa, XLM-R or BERTweet) and a CLIP-ViT visual branch, bridged by BGA layers. The
choices that the paper leaves open are fields here, each with its documented default.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

from transformers import AutoConfig, CLIPVisionConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

# The label list of Twitter2015 / Twitter2017 (and the default): BIO over the four MNER types (Twitter2015's
# OTHER is read as MISC). Other corpora bring their own types (`bio_labels`).
MNER_TYPES: tuple[str, ...] = ("PER", "LOC", "ORG", "MISC")
# Text towers by `model_type`: BERT and the RoBERTa family (BERTweet's config is a RoBERTa one).
TEXT_MODEL_TYPES: tuple[str, ...] = ("bert", "roberta", "xlm-roberta")


def bio_labels(types: Sequence[str]) -> tuple[str, ...]:
    """The BIO label list over entity types, in their order: ("O", "B-T1", "I-T1", "B-T2", ...)."""
    return ("O", *(f"{prefix}-{kind}" for kind in types for prefix in ("B", "I")))


def entity_types(labels: Iterable[str]) -> list[str]:
    """The entity types of BIO labels, in Twitter's order (PER, LOC, ORG, MISC) first, then alphabetically."""
    kinds = {label[2:] for label in labels if label != "O"}
    return [kind for kind in MNER_TYPES if kind in kinds] + sorted(kinds - set(MNER_TYPES))


MNER_LABELS: tuple[str, ...] = bio_labels(MNER_TYPES)

# Images with more pixels than this (by their header) are treated as missing: a tiny file can claim 11000 x 11000
# pixels and cost seconds and gigabytes to decode. The largest Twitter images are 4096 x 4096 (16.8M).
MAX_IMAGE_PIXELS = 36_000_000

CUSTOM_PIPELINE = {
    "impl": "pipeline_bga_mner.BgaMnerTokenClassificationPipeline",
    "pt": ["AutoModelForTokenClassification"],
    "tf": [],
    "type": "text",
}


class BgaMnerConfig(PretrainedConfig):
    r"""Configuration for [`BgaMnerForTokenClassification`].

    Args:
        text_config (`PretrainedConfig` or `dict`): the text encoder, a BERT (BERT-base uncased in the paper),
            RoBERTa, XLM-RoBERTa or BERTweet (`model_type` "bert", "roberta" or "xlm-roberta").
        vision_config (`CLIPVisionConfig` or `dict`): the CLIP vision tower (ViT-B/32 in the paper).
        num_bga_layers (`int`, *optional*): number N of BGA layers. They are the top N text layers; the text
            layers below them stay plain Transformer layers (only layer 0 for BERT-base, as in the paper). The
            visual branch uses ViT layers 0..N-1: layer 0 plain, layers 1..N-1 as the visual extractors of BGA
            layers 1..N-1 (the last BGA layer's is left out, as nothing reads its output). Defaults to the most
            both towers allow: min(text layers - 1, ViT layers), 11 for BERT-base with ViT-B/32.
        num_object_crops (`int`, defaults to 3): object crops per image besides the global image, so the
            visual sequence has `(1 + num_object_crops) * tokens_per_image` tokens (200 for ViT-B/32).
        max_text_length (`int`, defaults to 128, or the text tower's positions if fewer): the longest text (in
            sub-words, special tokens included: the processor's `max_length`), and so the number of
            learnable textual queries Q_t of the image2text generator.
        generator_intermediate_size (`int`, defaults to 2048): feed-forward width of the generators. Each
            generator is one Transformer decoder block; at d=768 it has the paper's 7.9M parameters (G_t2v).
        generator_dropout (`float`, defaults to 0.1): dropout inside the generators.
        gumbel_temperature (`float`, defaults to 1.0): temperature of the samplers' Gumbel-Softmax (training).
        cumulative_sampler_masks (`bool`, defaults to `False`): `False` is the paper's Eq. (1): each BGA layer's
            sampler decides afresh and m^{l-1} enters only its global context g. `True` makes masks cumulative
            (m^l <= m^{l-1}, a dropped token stays dropped), as DynamicViT does; see the README for the measurement.
        sampler_inference_rule (`"expected_count"` or `"threshold"`, defaults to `"expected_count"`): how a sampler
            decides without noise at inference. "expected_count" keeps, per example, the k sampled tokens with the
            highest keep probability, k = round(sum of keep probabilities): as many as training keeps on average.
            "threshold" keeps a token when its keep probability exceeds `sampler_keep_threshold`.
        sampler_keep_threshold (`float`, defaults to 0.5): the threshold of the "threshold" rule.
        keep_ratio_target (`float`, defaults to 0.5) and keep_ratio_weight (`float`, defaults to 2.0): DynamicViT's
            keep-ratio loss, keep_ratio_weight * mean over layers and examples of (kept share - target)^2, added
            to Eq. (11); weight 0 turns it off.
        generation_loss_reduction (`"sum"` or `"mean"`, defaults to `"sum"`): Eq. (5) and (7) sum the KL over the
            sampled tokens (alpha = 0.001 is calibrated for that); "mean" divides each sum by the sampled tokens.
        alpha (`float`, defaults to 0.001): weight of the generation losses, Eq. (11).
        detach_generation_targets (`bool`, defaults to `True`): the real features that the reconstruction
            and cycle losses compare against are treated as constants, so a branch cannot lower the loss by
            collapsing its own features (**choice**; the paper is silent).
        use_sampler (`bool`): `False` is the paper's "w/o SCS" ablation: every valid token is kept.
        use_cycle (`bool`): `False` is the paper's "w/o cycle" ablation.
        use_generation (`bool`): `False` is "w/o SCS & w/o MCG": no visual branch, sampler or generator;
            the model is BERT + linear + CRF.
        inference_visual (`"generated"` or `"real"`): visual tokens the text extractor reads at inference.
            "generated" (paper default) runs on text alone; "real" reads the visual branch's features when
            an image is given (paper Table 4) and falls back to generated features otherwise.
        text_only (`bool`, defaults to `False`): the model holds only what runs on text (no vision tower,
            visual samplers or image2text generator): an inference checkpoint, made by
            `BgaMnerForTokenClassification.text_only()`. It predicts exactly as the full model in
            "generated" mode, and cannot train with images.
    """

    model_type = "bga_mner"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),  # the family from `model_type`
        "vision_config": CLIPVisionConfig,
    }

    text_config: PretrainedConfig | dict | None = None
    vision_config: CLIPVisionConfig | dict | None = None
    num_bga_layers: int | None = None
    num_object_crops: int = 3
    max_text_length: int | None = None
    generator_intermediate_size: int = 2048
    generator_dropout: float = 0.1
    gumbel_temperature: float = 1.0
    cumulative_sampler_masks: bool = False
    sampler_inference_rule: Literal["expected_count", "threshold"] = "expected_count"
    sampler_keep_threshold: float = 0.5
    keep_ratio_target: float = 0.5
    keep_ratio_weight: float = 2.0
    generation_loss_reduction: Literal["sum", "mean"] = "sum"
    alpha: float = 0.001
    detach_generation_targets: bool = True
    use_sampler: bool = True
    use_cycle: bool = True
    use_generation: bool = True
    inference_visual: Literal["generated", "real"] = "generated"
    text_only: bool = False

    def __post_init__(self, **kwargs):
        # `pipeline("token-classification", model=..., trust_remote_code=True)` uses the CRF-decoding pipeline.
        kwargs.setdefault("custom_pipelines", {"token-classification": CUSTOM_PIPELINE})
        if self.id2label is None and "num_labels" not in kwargs:
            self.id2label = dict(enumerate(MNER_LABELS))
            self.label2id = {label: i for i, label in enumerate(MNER_LABELS)}
        super().__post_init__(**kwargs)
        if self.text_config.model_type not in TEXT_MODEL_TYPES:
            raise ValueError(
                f"Text models of type {self.text_config.model_type!r} are not supported; supported: BERT, RoBERTa, "
                f"XLM-RoBERTa and BERTweet (model_type {', '.join(TEXT_MODEL_TYPES)})."
            )
        # BGA layers on the top N text layers, over at least one plain text layer; the visual branch uses ViT
        # layers 0..N-1 (the last BGA layer's visual extractor would feed nothing).
        text_layers, vision_layers = self.text_config.num_hidden_layers, self.vision_config.num_hidden_layers
        max_layers = min(text_layers - 1, vision_layers)
        if self.num_bga_layers is None:
            self.num_bga_layers = max_layers
        if not 1 <= self.num_bga_layers <= max_layers:
            raise ValueError(
                f"num_bga_layers={self.num_bga_layers} needs N + 1 text layers and N ViT layers; the text tower "
                f"has {text_layers} and the vision tower {vision_layers} layers, so N is between 1 and {max_layers}."
            )
        for name, allowed in (
            ("inference_visual", ("generated", "real")),
            ("sampler_inference_rule", ("expected_count", "threshold")),
            ("generation_loss_reduction", ("sum", "mean")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        if not 0.0 <= self.keep_ratio_target <= 1.0 or self.keep_ratio_weight < 0:
            raise ValueError(
                f"keep_ratio_target must be in [0, 1] and keep_ratio_weight >= 0, got {self.keep_ratio_target} "
                f"and {self.keep_ratio_weight}."
            )
        if self.max_text_length is None:
            self.max_text_length = min(128, self.text_positions)
        if self.max_text_length > self.text_positions:
            raise ValueError(
                f"max_text_length={self.max_text_length} (the processor's max_length) exceeds the text tower's "
                f"{self.text_positions} positions: use at most {self.text_positions}."
            )
        if self.text_only and self.inference_visual == "real":
            raise ValueError("A text_only model has no visual branch: inference_visual must be 'generated'.")
        if self.num_object_crops < 0:
            raise ValueError(f"num_object_crops must be >= 0, got {self.num_object_crops}.")

    @property
    def text_positions(self) -> int:
        """The longest text the text tower can read, special tokens included (RoBERTa's first position is
        pad_token_id + 1: 512 of its 514 position embeddings)."""
        offset = self.text_config.pad_token_id + 1 if self.text_config.model_type != "bert" else 0
        return self.text_config.max_position_embeddings - offset

    @property
    def num_plain_text_layers(self) -> int:
        """The text layers below the BGA layers (1 for BERT-base with N = 11: layer 0)."""
        return self.text_config.num_hidden_layers - self.num_bga_layers

    @property
    def tokens_per_image(self) -> int:
        """Visual tokens per image: CLIP's patches plus its class token (50 for ViT-B/32 at 224 px)."""
        return (self.vision_config.image_size // self.vision_config.patch_size) ** 2 + 1

    @property
    def num_image_slots(self) -> int:
        """The global image plus the object crops."""
        return 1 + self.num_object_crops

    @property
    def num_visual_tokens(self) -> int:
        """N_v: the length of the visual sequence, and the number of visual queries Q_v."""
        return self.num_image_slots * self.tokens_per_image


BgaMnerConfig.register_for_auto_class()
