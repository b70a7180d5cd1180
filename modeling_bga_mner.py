"""BGA-MNER: Bidirectional Generative Alignment for multimodal NER (Chen et al., ACM MM 2023).

Training reads tweets with their images: in each BGA layer, Stage-refined Context Samplers (Sec. 3.3)
pick the tokens of each modality worth generating from, a Multi-level Cross-modal Generator (Sec. 3.4)
generates each modality from the other, and the feature extractors (Sec. 3.5) read each modality beside
the generated other one. A CRF (Sec. 3.6) labels the text. The text branch never reads real visual
features, so inference runs on text alone: text sampler, text2image generator, text extractor, CRF.

Shapes: b = batch, n_t = sub-words, n_v = visual tokens ((1 + crops) * tokens per image),
d_t / d_v = text / vision hidden sizes, C = number of labels.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchcrf import CRF
from transformers import AutoConfig, AutoModel, CLIPVisionModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer
from transformers.models.clip.modeling_clip import CLIPEncoderLayer, CLIPVisionEmbeddings
from transformers.models.roberta.modeling_roberta import RobertaEmbeddings
from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaEmbeddings
from transformers.utils import ModelOutput
from transformers.utils import logging as hf_logging

try:  # as a package (tests, scripts) or as the Hub's dynamic module
    from .configuration_bga_mner import TEXT_MODEL_TYPES, BgaMnerConfig
    from .pipeline_bga_mner import BgaMnerTokenClassificationPipeline  # noqa: F401 (saved beside the model)
except ImportError:
    from configuration_bga_mner import TEXT_MODEL_TYPES, BgaMnerConfig

# The text tower's embeddings by family (RoBERTa's positions start after the padding index). The layers need no
# such table: transformers defines RoBERTa's and XLM-R's layer as BERT's (`class RobertaLayer(BertLayer)` in
# modular_roberta.py), so `TextualFeatureExtractor` is each family's layer.
TEXT_EMBEDDINGS = {"bert": BertEmbeddings, "roberta": RobertaEmbeddings, "xlm-roberta": XLMRobertaEmbeddings}
assert set(TEXT_EMBEDDINGS) == set(TEXT_MODEL_TYPES)

# Linear layers that `quantized_int8()` leaves in float32 (measured in BENCHMARKS.md): the text layers below the BGA
# layers (BERT layer 0: its feed-forward output has activation outliers that one int8 scale per batch loses; alone in
# int8 it costs 2 test F1 points) and the classifier, whose emissions the CRF reads.
INT8_KEEPS_FLOAT = ("text_plain_layers.", "classifier")


def hybrid_attention(
    queries: torch.Tensor,
    keys_values: torch.Tensor,
    key_mask: torch.Tensor,
    q_proj: Callable[[torch.Tensor], torch.Tensor],
    k_proj: Callable[[torch.Tensor], torch.Tensor],
    v_proj: Callable[[torch.Tensor], torch.Tensor],
    num_heads: int,
    dropout: float,
) -> torch.Tensor:
    """Multi-head attention of `queries` over `keys_values` with a layer's own projections, Eq. (8).

    queries (b, n_q, d); keys_values (b, n_k, d); key_mask (b, n_k) bool, True = attend. Every row of
    `key_mask` must keep at least one key. Returns the context (b, n_q, d), before the output projection.
    """
    b, n_q, d = queries.shape
    n_k = keys_values.shape[1]
    q = q_proj(queries).view(b, n_q, num_heads, -1).transpose(1, 2)
    k = k_proj(keys_values).view(b, n_k, num_heads, -1).transpose(1, 2)
    v = v_proj(keys_values).view(b, n_k, num_heads, -1).transpose(1, 2)
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :], dropout_p=dropout)
    return context.transpose(1, 2).reshape(b, n_q, -1)


def _concat_tokens(
    tokens: torch.Tensor, mask: torch.Tensor, extra: torch.Tensor | None, extra_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if extra is None:
        return tokens, mask
    return torch.cat([tokens, extra], dim=1), torch.cat([mask, extra_mask], dim=1)


class TextualFeatureExtractor(BertLayer):
    """Text layer l (BERT / RoBERTa family) with hybrid attention, Eq. (8): queries from the text T, keys and
    values from [T ; V_hat] through the same W_K, W_V; then the layer's feed-forward block. Its weights are the
    pretrained layer's, unchanged. Without extra tokens it is the plain layer (the layers below the BGA layers)."""

    def forward(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        visual: torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """text (b, n_t, d_t), text_mask (b, n_t) bool; visual (b, n_v, d_t), visual_mask (b, n_v) bool.
        Returns the next text states (b, n_t, d_t)."""
        keys_values, key_mask = _concat_tokens(text, text_mask, visual, visual_mask)
        attention = self.attention.self
        context = hybrid_attention(
            text,
            keys_values,
            key_mask,
            attention.query,
            attention.key,
            attention.value,
            attention.num_attention_heads,
            attention.dropout.p if self.training else 0.0,
        )
        hidden = self.attention.output(context, text)
        return self.output(self.intermediate(hidden), hidden)


class VisualFeatureExtractor(CLIPEncoderLayer):
    """CLIP ViT layer l with hybrid attention: queries from V, keys and values from [V ; T_hat].
    Pre-norm as in CLIP; weights are the pretrained ViT layer's. Without extra tokens it is layer 0."""

    def forward(
        self,
        visual: torch.Tensor,
        visual_mask: torch.Tensor,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """visual (b, n_v, d_v), visual_mask (b, n_v) bool; text (b, n_t, d_v), text_mask (b, n_t) bool.
        Returns the next visual states (b, n_v, d_v)."""
        keys_values, key_mask = _concat_tokens(visual, visual_mask, text, text_mask)
        keys_values = self.layer_norm1(keys_values)
        attention = self.self_attn
        context = hybrid_attention(
            keys_values[:, : visual.shape[1]],
            keys_values,
            key_mask,
            attention.q_proj,
            attention.k_proj,
            attention.v_proj,
            attention.num_heads,
            attention.dropout if self.training else 0.0,
        )
        hidden = visual + attention.out_proj(context)
        return hidden + self.mlp(self.layer_norm2(hidden))


class StageRefinedContextSampler(nn.Module):
    """Stage-refined Context Sampler (SCS), Sec. 3.3, after DynamicViT's predictor.

    z = MLP_phi(T) (local), g = GAP(MLP_psi(T) * m^{l-1}) (global content kept by the previous layer), Eq. (1);
    p = Softmax(MLP_Phi([z, g])) over {drop, keep}. Training samples m^l ~ GumbelSoftmax(p) with the
    straight-through estimator, so m^l is exactly 0 / 1 and still carries gradient. Inference decides
    without noise (`config.sampler_inference_rule`). Padding is never kept; position 0 ([CLS] / the global
    image's class token) is always kept, so no example is ever left with nothing to attend to.
    """

    def __init__(self, hidden_size: int, config: BgaMnerConfig):
        super().__init__()
        self.config = config
        self.norm = nn.LayerNorm(hidden_size)
        self.local_mlp = nn.Sequential(nn.Linear(hidden_size, hidden_size // 2), nn.GELU())  # MLP_phi
        self.global_mlp = nn.Sequential(nn.Linear(hidden_size, hidden_size // 2), nn.GELU())  # MLP_psi
        self.decision_mlp = nn.Sequential(  # MLP_Phi
            nn.Linear(hidden_size // 2 * 2, hidden_size // 2),
            nn.GELU(),
            nn.Linear(hidden_size // 2, hidden_size // 4),
            nn.GELU(),
            nn.Linear(hidden_size // 4, 2),
        )

    def keep_probability(self, hidden: torch.Tensor, previous_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. (1) and p: hidden (b, n, d), previous_mask (b, n) -> the {drop, keep} logits (b, n, 2) and p_keep
        (b, n), float32."""
        hidden = self.norm(hidden)
        kept = previous_mask.unsqueeze(-1).to(hidden.dtype)
        global_ = (self.global_mlp(hidden) * kept).sum(1) / kept.sum(1).clamp(min=1.0)  # g: GAP over kept tokens
        local = self.local_mlp(hidden)  # z
        logits = self.decision_mlp(torch.cat([local, global_.unsqueeze(1).expand_as(local)], dim=-1)).float()
        return logits, logits.softmax(-1)[..., 1]

    def forward(self, hidden: torch.Tensor, valid: torch.Tensor, previous_mask: torch.Tensor) -> torch.Tensor:
        """hidden (b, n, d); valid (b, n) bool; previous_mask (b, n) float, m^{l-1} (the valid tokens at the first
        BGA layer). Returns m^l (b, n) float in {0, 1}, differentiable in training."""
        logits, keep_probability = self.keep_probability(hidden, previous_mask)
        candidates = sampled_positions(valid)
        if self.config.cumulative_sampler_masks:
            candidates = candidates & (previous_mask > 0)
        if self.training:
            keep = F.gumbel_softmax(logits, tau=self.config.gumbel_temperature, hard=True)[..., 1]
        else:
            keep = self.decide(keep_probability, candidates)
        keep = torch.where(candidates, keep, 0.0)
        return torch.where(always_kept(valid), 1.0, keep)

    def decide(self, keep_probability: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """The inference mask (b, n) float from keep probabilities (b, n) over the candidate tokens (b, n) bool."""
        if self.config.sampler_inference_rule == "threshold":
            return (keep_probability > self.config.sampler_keep_threshold).float()
        # "expected_count": the k most probable tokens, k = the number that training keeps on average.
        count = torch.where(candidates, keep_probability, 0.0).sum(1, keepdim=True).round()
        ranking = torch.argsort(torch.where(candidates, keep_probability, -1.0), dim=1, descending=True, stable=True)
        rank = ranking.argsort(dim=1)
        return (rank < count).float()


def always_kept(valid: torch.Tensor) -> torch.Tensor:
    """(b, n) bool: position 0 of each example ([CLS] / the global image's class token), which every mask keeps."""
    first = torch.zeros_like(valid)
    first[:, 0] = True
    return first


def sampled_positions(valid: torch.Tensor) -> torch.Tensor:
    """(b, n) bool: the tokens a sampler decides on, the valid ones but position 0."""
    return valid & ~always_kept(valid)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """DynamicViT's attention masking: softmax of `scores` (..., n_k) over the keys that `mask` (..., n_k),
    broadcastable, in [0, 1]) keeps. The mask weights the exponentiated scores before normalisation, so the
    result equals the -inf-masked softmax for a 0 / 1 mask, and its gradient reaches the mask."""
    scores = scores.float()
    weights = (scores - scores.amax(-1, keepdim=True)).exp() * mask
    return weights / weights.sum(-1, keepdim=True).clamp(min=1e-30)


class GeneratorAttention(nn.Module):
    """Multi-head attention of a cross-modal generator, Eq. (3), with its own W_Q, W_K, W_V and output map."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.output = nn.Linear(hidden_size, hidden_size)

    def attend(
        self, queries: torch.Tensor, keys_values: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """queries (b or 1, n_q, d), already projected by `self.query`; keys_values (b, n_k, d); key_mask (b, n_k)
        float in [0, 1] or None (attend to all). Returns (b, n_q, d) after the output map.

        The paper's M (0 for kept, -inf for dropped) at inference; in training the mask weights the scores as in
        DynamicViT (`masked_softmax`), so every loss that reads the output trains the sampler behind the mask."""
        b, n_k = keys_values.shape[:2]
        n_q = queries.shape[1]
        q = queries.expand(b, -1, -1).reshape(b, n_q, self.num_heads, -1).transpose(1, 2)
        k = self.key(keys_values).view(b, n_k, self.num_heads, -1).transpose(1, 2)
        v = self.value(keys_values).view(b, n_k, self.num_heads, -1).transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        if key_mask is not None and self.training:
            scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
            weights = masked_softmax(scores, key_mask[:, None, None, :].float())
            context = F.dropout(weights, dropout, training=True).to(v.dtype) @ v
        else:
            attn_mask = None if key_mask is None else key_mask[:, None, None, :] > 0
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        return self.output(context.transpose(1, 2).reshape(b, n_q, -1))


class CrossModalGenerator(nn.Module):
    """One generator of the Multi-level Cross-modal Generator (Sec. 3.4): learnable modality queries Q (n_q, d)
    self-attend, cross-attend to the sampled content of the other modality, Eq. (2)-(4), then a feed-forward
    block; post-norm, as a Transformer decoder block (at d=768, ff=2048: the paper's 7.9M parameters)."""

    def __init__(self, hidden_size: int, num_queries: int, num_heads: int, config: BgaMnerConfig):
        super().__init__()
        dropout = config.generator_dropout
        self.queries = nn.Parameter(torch.zeros(num_queries, hidden_size))
        self.self_attention = GeneratorAttention(hidden_size, num_heads, dropout)
        self.self_attention_norm = nn.LayerNorm(hidden_size)
        self.cross_attention = GeneratorAttention(hidden_size, num_heads, dropout)
        self.cross_attention_norm = nn.LayerNorm(hidden_size)
        self.feed_forward = nn.Sequential(
            nn.Linear(hidden_size, config.generator_intermediate_size),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(config.generator_intermediate_size, hidden_size),
        )
        self.feed_forward_norm = nn.LayerNorm(hidden_size)
        self.dropout = nn.Dropout(dropout)

    def query_states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The queries after their self-attention block (1, n_q, d), and those states projected to cross-attention
        queries (1, n_q, d). Both are input-independent: a forward computes them once, over all queries, for
        every example and BGA layer (in training the dropout noise of this block is then shared too)."""
        queries = self.queries.unsqueeze(0)
        attention = self.self_attention
        states = self.self_attention_norm(queries + self.dropout(attention.attend(attention.query(queries), queries)))
        return states, self.cross_attention.query(states)

    def forward(
        self, source: torch.Tensor, source_mask: torch.Tensor, query_states: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """source (b, n_s, d), in this generator's width; source_mask (b, n_s) float, the sampler's mask (every
        row keeps a token); query_states from `query_states()`, possibly cut to the first n_q queries.
        Returns the generated tokens (b, n_q, d)."""
        states, queries = query_states
        generated = self.cross_attention_norm(
            states + self.dropout(self.cross_attention.attend(queries, source, source_mask))  # Eq. (3)
        )
        return self.feed_forward_norm(generated + self.dropout(self.feed_forward(generated)))


@dataclass
class GeneratorQueries:
    """The generators' input-independent query states for one forward: visual (G_t2v, all n_v queries) and
    textual (G_v2t, all max_text_length queries, or None when no image is read)."""

    visual: tuple[torch.Tensor, torch.Tensor]
    text: tuple[torch.Tensor, torch.Tensor] | None


class MultiLevelCrossModalGenerator(nn.Module):
    """Multi-level Cross-modal Generator (MCG), Sec. 3.4: the text2image generator G_t2v and the image2text
    generator G_v2t, shared by all BGA layers, with linear maps between the towers' widths when they differ
    (**choice**). A `text_only` model has no G_v2t."""

    def __init__(self, config: BgaMnerConfig):
        super().__init__()
        text_cfg, vision_cfg = config.text_config, config.vision_config
        same_width = text_cfg.hidden_size == vision_cfg.hidden_size
        self.text_to_visual = nn.Identity() if same_width else nn.Linear(text_cfg.hidden_size, vision_cfg.hidden_size)
        self.visual_to_text = nn.Identity() if same_width else nn.Linear(vision_cfg.hidden_size, text_cfg.hidden_size)
        self.text_to_image = CrossModalGenerator(
            vision_cfg.hidden_size, config.num_visual_tokens, vision_cfg.num_attention_heads, config
        )
        if not config.text_only:
            self.image_to_text = CrossModalGenerator(
                text_cfg.hidden_size, config.max_text_length, text_cfg.num_attention_heads, config
            )

    def query_states(self, with_text: bool) -> GeneratorQueries:
        return GeneratorQueries(
            self.text_to_image.query_states(), self.image_to_text.query_states() if with_text else None
        )

    def generate_visual(self, text: torch.Tensor, text_mask: torch.Tensor, queries: GeneratorQueries) -> torch.Tensor:
        """V_hat = G_t2v(T, Q_v, m_t), Eq. (2): text (b, n_t, d_t), text_mask (b, n_t) -> (b, n_v, d_v)."""
        return self.text_to_image(self.text_to_visual(text), text_mask, queries.visual)

    def generate_text(self, visual: torch.Tensor, visual_mask: torch.Tensor, queries: GeneratorQueries, length: int):
        """T_hat = G_v2t(V, Q_t, m_v), Eq. (4): visual (b, n_v, d_v), visual_mask (b, n_v) -> (b, length, d_t), from
        the first `length` of the max_text_length queries (so a text's T_hat does not depend on its batch)."""
        limit = queries.text[0].shape[1]
        if length > limit:
            raise ValueError(
                f"A text of {length} sub-words is longer than the image2text generator's {limit} text queries "
                f"(config.max_text_length): split texts into windows of at most {limit} sub-words (the processor's "
                f"max_length does this) or build the model with a larger max_text_length."
            )
        states, cross_queries = queries.text
        cut = (states[:, :length], cross_queries[:, :length])
        return self.image_to_text(self.visual_to_text(visual), visual_mask, cut)


@dataclass
class VisualTokens:
    """The visual branch inside the BGA stack, for the examples with an image.

    rows (b_v,): their indices in the batch; states (b_v, n_v, d_v); valid (b_v, n_v) bool (tokens of present
    image slots); mask (b_v, n_v) float: the visual sampler's mask of the previous layer."""

    rows: torch.Tensor
    states: torch.Tensor
    valid: torch.Tensor
    mask: torch.Tensor


@dataclass
class BgaLayerOutput:
    """text (b, n_t, d_t) and text_mask (b, n_t): the next text states and this layer's text sampler mask; visual:
    the next visual tokens (None without images and after the last layer); visual_mask, visual_valid (b_v, n_v):
    this layer's visual sampler mask and the valid visual tokens; reconstruction, cycle (b_v,): Eq. (5) and (7)
    per example with an image (None without images)."""

    text: torch.Tensor
    text_mask: torch.Tensor
    visual: VisualTokens | None = None
    visual_mask: torch.Tensor | None = None
    visual_valid: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None
    cycle: torch.Tensor | None = None


def token_kl(target: torch.Tensor, generated: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """sum_i KL(softmax(target_i) || softmax(generated_i)) * m_i over tokens (softmax over channels), per example,
    Eq. (5) / (7): (b, n, d) x 2, mask (b, n) -> (b,) float32. "mean" divides by the sampled tokens."""
    kl = F.kl_div(
        generated.float().log_softmax(-1), target.float().log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)
    total = (kl * mask).sum(1)
    return total / mask.sum(1).clamp(min=1.0) if reduction == "mean" else total


class BgaLayer(GradientCheckpointingLayer):
    """One bidirectional generative alignment layer (Fig. 2), l = 1..N.

    Text: SCS -> G_t2v generates V_hat from the sampled text -> the text extractor (BERT layer l) reads
    [T ; V_hat]. With images, symmetrically: SCS -> G_v2t generates T_hat from the sampled patches -> the visual
    extractor (ViT layer l; none in the last layer, whose visual output nothing reads) reads [V ; T_hat]; and the
    reconstruction and cycle losses compare generated with real features on the sampled tokens.
    """

    def __init__(self, config: BgaMnerConfig, visual_extractor: bool):
        super().__init__()
        self.config = config
        text_cfg, vision_cfg = config.text_config, config.vision_config
        self.text_extractor = TextualFeatureExtractor(text_cfg)
        with_sampler = config.use_generation and config.use_sampler
        with_visual = config.use_generation and not config.text_only
        if with_sampler:
            self.text_sampler = StageRefinedContextSampler(text_cfg.hidden_size, config)
        if with_sampler and with_visual:
            self.visual_sampler = StageRefinedContextSampler(vision_cfg.hidden_size, config)
        if with_visual and visual_extractor:
            self.visual_extractor = VisualFeatureExtractor(vision_cfg)

    def forward(
        self,
        text: torch.Tensor,
        text_valid: torch.Tensor,
        text_mask: torch.Tensor,
        visual: VisualTokens | None,
        generator: MultiLevelCrossModalGenerator,
        queries: GeneratorQueries,
    ) -> BgaLayerOutput:
        """text (b, n_t, d_t); text_valid (b, n_t) bool; text_mask (b, n_t) float: m_t^{l-1}; visual: the visual
        tokens of the examples with an image, or None (inference, or no image in the batch)."""
        config = self.config
        if hasattr(self, "text_sampler"):
            text_mask = self.text_sampler(text, text_valid, text_mask)  # Eq. (1)
        visual_hat = generator.generate_visual(text, text_mask, queries)  # Eq. (2)-(3)
        text_side_visual = generator.visual_to_text(visual_hat)
        text_side_mask = visual_hat.new_ones(visual_hat.shape[:2], dtype=torch.bool)
        out = BgaLayerOutput(text=text, text_mask=text_mask)

        if visual is not None:
            rows = visual.rows
            visual_mask = visual.mask
            if hasattr(self, "visual_sampler"):
                visual_mask = self.visual_sampler(visual.states, visual.valid, visual_mask)  # Eq. (1), visual side
            out.visual_mask, out.visual_valid = visual_mask, visual.valid
            text_hat = generator.generate_text(visual.states, visual_mask, queries, text.shape[1])  # Eq. (4)
            real_text, real_visual = text[rows], visual.states
            if config.detach_generation_targets:
                real_text, real_visual = real_text.detach(), real_visual.detach()
            text_mask_v, reduction = text_mask[rows], config.generation_loss_reduction
            out.reconstruction = token_kl(real_visual, visual_hat[rows], visual_mask, reduction) + token_kl(
                real_text, text_hat, text_mask_v, reduction
            )  # Eq. (5)
            if config.use_cycle:  # Eq. (6)-(7): generate back from the generated content, mask-agnostic
                text_cycle = generator.generate_text(
                    visual_hat[rows], torch.ones_like(visual_mask), queries, text.shape[1]
                )
                visual_cycle = generator.generate_visual(text_hat, text_valid[rows].float(), queries)
                out.cycle = token_kl(real_text, text_cycle, text_mask_v, reduction) + token_kl(
                    real_visual, visual_cycle, visual_mask, reduction
                )
            if config.inference_visual == "real" and not self.training:  # paper Table 4: read the real features
                text_side_visual = text_side_visual.index_copy(0, rows, generator.visual_to_text(visual.states))
                text_side_mask = text_side_mask.index_copy(0, rows, visual.valid)
            if hasattr(self, "visual_extractor"):
                states = self.visual_extractor(
                    visual.states, visual.valid, generator.text_to_visual(text_hat), text_valid[rows]
                )
                out.visual = VisualTokens(rows, states, visual.valid, visual_mask)
        out.text = self.text_extractor(text, text_valid, text_side_visual, text_side_mask)  # Eq. (8)
        return out


class LinearChainCrf(CRF):
    """pytorch-crf's CRF (negative log-likelihood, Eq. (9)-(10)) with Viterbi decoding vectorised over
    the batch, returning a tensor instead of Python lists."""

    def viterbi_tags(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """emissions (b, L, C); mask (b, L) bool, left-aligned with mask[:, 0] all True.
        Returns the best tag path (b, L) long; positions past a row's length hold 0."""
        batch, length, _ = emissions.shape
        score = self.start_transitions + emissions[:, 0]
        backpointers = []
        for i in range(1, length):
            candidates = score.unsqueeze(2) + self.transitions + emissions[:, i].unsqueeze(1)
            best_score, best_previous = candidates.max(dim=1)
            score = torch.where(mask[:, i : i + 1], best_score, score)
            backpointers.append(best_previous)
        current = (score + self.end_transitions).argmax(-1)
        lengths = mask.sum(1)
        tags = torch.zeros(batch, length, dtype=torch.long, device=emissions.device)
        for i in range(length - 1, 0, -1):
            inside = i < lengths
            tags[:, i] = torch.where(inside, current, 0)
            previous = backpointers[i - 1].gather(1, current.unsqueeze(1)).squeeze(1)
            current = torch.where(inside, previous, current)
        tags[:, 0] = current
        return tags

    def marginals(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Posterior probability of each tag at each position (forward-backward), (b, L, C); rows are
        left-aligned with mask[:, 0] all True, positions past a row's length hold garbage."""
        batch, length, _ = emissions.shape
        alphas = [self.start_transitions + emissions[:, 0]]
        for i in range(1, length):
            step = torch.logsumexp(alphas[-1].unsqueeze(2) + self.transitions, dim=1) + emissions[:, i]
            alphas.append(torch.where(mask[:, i : i + 1], step, alphas[-1]))
        betas = [self.end_transitions.expand(batch, -1)]
        for i in range(length - 2, -1, -1):
            step = torch.logsumexp(self.transitions + (emissions[:, i + 1] + betas[0]).unsqueeze(1), dim=2)
            betas.insert(0, torch.where(mask[:, i + 1 : i + 2], step, self.end_transitions.expand(batch, -1)))
        log_partition = torch.logsumexp(alphas[-1] + self.end_transitions, dim=1)  # (b,)
        return (torch.stack(alphas, 1) + torch.stack(betas, 1) - log_partition[:, None, None]).exp()


@dataclass
class BgaMnerTokenClassifierOutput(ModelOutput):
    """Outputs of [`BgaMnerForTokenClassification`].

    loss: CRF negative log-likelihood + alpha * generation_loss, Eq. (11), + keep_ratio_weight * keep_ratio_loss,
        when labels are given.
    crf_loss: the CRF's mean negative log-likelihood per sentence.
    reconstruction_loss, cycle_loss: (1/N) sum_l L_recon^l and (1/N) sum_l L_cycle^l, Eq. (5), (7), averaged over
        the examples with an image; exactly 0 when none has one (and whenever the visual branch does not run).
    generation_loss: reconstruction_loss + cycle_loss.
    keep_ratio_loss: DynamicViT's keep-ratio loss, mean over layers and examples of (kept share - target)^2.
    logits: the CRF's emission scores (b, n_t, C).
    predictions: Viterbi label ids (b, n_t), -100 where no label is predicted (sub-words after the first
        of a word, special tokens, padding).
    marginals: with `output_marginals=True`, the CRF's posterior probability of each label (b, n_t, C) at
        the predicted positions (0 elsewhere): the pipeline's scores.
    text_keep_ratio, visual_keep_ratio (N,): per BGA layer, the share of the sampled tokens (valid tokens but the
        always-kept first one) that the sampler kept, averaged over examples (visual: over those with an image;
        NaN where no visual branch ran). 0 means a sampler keeps nothing but the always-kept token.
    layer_reconstruction_loss, layer_cycle_loss (N,): L_recon^l and L_cycle^l per BGA layer (0 without images).
    text_sampler_masks, visual_sampler_masks: per BGA layer, the samplers' masks (b, n_t) / (b_v, n_v)
        (with `output_sampler_masks=True`; visual ones only for the examples whose visual branch ran).
    """

    loss: torch.Tensor | None = None
    crf_loss: torch.Tensor | None = None
    reconstruction_loss: torch.Tensor | None = None
    cycle_loss: torch.Tensor | None = None
    generation_loss: torch.Tensor | None = None
    keep_ratio_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    predictions: torch.Tensor | None = None
    marginals: torch.Tensor | None = None
    text_keep_ratio: torch.Tensor | None = None
    visual_keep_ratio: torch.Tensor | None = None
    layer_reconstruction_loss: torch.Tensor | None = None
    layer_cycle_loss: torch.Tensor | None = None
    text_sampler_masks: tuple[torch.Tensor, ...] | None = None
    visual_sampler_masks: tuple[torch.Tensor, ...] | None = None


def kept_share(mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per example, the share of the sampled tokens (valid but position 0) that `mask` keeps: (b, n) x 2 -> (b,)."""
    candidates = sampled_positions(valid).to(mask.dtype)
    return (mask * candidates).sum(1) / candidates.sum(1).clamp(min=1.0)


class BgaMnerPreTrainedModel(PreTrainedModel):
    config_class = BgaMnerConfig
    config: BgaMnerConfig
    base_model_prefix = "bga_mner"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _keep_in_fp32_modules_strict = ["crf"]  # `from_pretrained(..., dtype=torch.bfloat16)`: Viterbi scores in float32

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.text_config.initializer_range
        if isinstance(module, tuple(TEXT_EMBEDDINGS.values())):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
            init.zeros_(module.token_type_ids)
        elif isinstance(module, CLIPVisionEmbeddings):
            init.normal_(module.class_embedding, std=module.embed_dim**-0.5)
            init.copy_(module.position_ids, torch.arange(module.num_positions).expand((1, -1)))
        elif isinstance(module, CrossModalGenerator):
            init.normal_(module.queries, std=std)
        elif isinstance(module, CRF):
            for parameter in (module.start_transitions, module.end_transitions, module.transitions):
                init.uniform_(parameter, -0.1, 0.1)


class BgaMnerForTokenClassification(BgaMnerPreTrainedModel):
    """BGA-MNER (Fig. 2): embeddings, layer 0 of each tower, N BGA layers, and a CRF.

    The text layers below the BGA layers stay plain (BERT-base: layer 0) and ViT layer 0 is plain; BGA layer l
    (1..N) holds the samplers and the next pretrained text layer and ViT layer l as feature extractors; the
    Multi-level Cross-modal Generator is shared by all BGA layers. With `use_generation=False` only the text
    encoder + linear + CRF exists.
    """

    def __init__(self, config: BgaMnerConfig):
        super().__init__(config)
        text_cfg, vision_cfg = config.text_config, config.vision_config
        n = config.num_bga_layers

        self.text_embeddings = TEXT_EMBEDDINGS[text_cfg.model_type](text_cfg)
        self.text_plain_layers = nn.ModuleList(
            TextualFeatureExtractor(text_cfg) for _ in range(config.num_plain_text_layers)
        )
        if config.use_generation and not config.text_only:  # what runs only with images, in training
            self.vision_embeddings = CLIPVisionEmbeddings(vision_cfg)
            self.vision_pre_layernorm = nn.LayerNorm(vision_cfg.hidden_size, eps=vision_cfg.layer_norm_eps)
            self.vision_first_layer = VisualFeatureExtractor(vision_cfg)
        if config.use_generation:
            self.generator = MultiLevelCrossModalGenerator(config)
        # ViT layers 1..N-1: the last BGA layer's visual extractor would feed nothing.
        self.bga_layers = nn.ModuleList(BgaLayer(config, visual_extractor=i < n - 1) for i in range(n))
        self.dropout = nn.Dropout(text_cfg.hidden_dropout_prob)
        self.classifier = nn.Linear(text_cfg.hidden_size, config.num_labels)
        self.crf = LinearChainCrf(config.num_labels, batch_first=True)
        self.post_init()

    # ----------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_text_vision_pretrained(
        cls, text_name_or_path: str, vision_name_or_path: str | None = None, **config_kwargs
    ) -> BgaMnerForTokenClassification:
        """Builds BGA-MNER from a pretrained text model (BERT, RoBERTa, XLM-RoBERTa, BERTweet) and a pretrained
        CLIP (or CLIP-vision) model, by Hub id or local path. Every used text / ViT weight lands in its place; the
        samplers, generators, classifier and CRF are new. `config_kwargs` go to [`BgaMnerConfig`] (e.g.
        `id2label`). `vision_name_or_path` may be omitted only with `use_generation=False`."""
        model_type = AutoConfig.from_pretrained(text_name_or_path).model_type
        if model_type not in TEXT_MODEL_TYPES:
            raise ValueError(
                f"{text_name_or_path} is a {model_type!r} model; supported text models: BERT, RoBERTa, XLM-RoBERTa "
                f"and BERTweet (model_type {', '.join(TEXT_MODEL_TYPES)})."
            )
        text_model = _load_tower(AutoModel, text_name_or_path, add_pooling_layer=False)
        vision_model = None if vision_name_or_path is None else _load_tower(CLIPVisionModel, vision_name_or_path)
        if vision_model is None and config_kwargs.get("use_generation", True):
            raise ValueError("A vision model is needed unless use_generation=False.")
        config = BgaMnerConfig(
            text_config=_tower_config(text_model),
            vision_config=_tower_config(vision_model) if vision_model is not None else None,
            **config_kwargs,
        )
        model = cls(config)
        model.text_embeddings.load_state_dict(text_model.embeddings.state_dict())
        text_layers = [*model.text_plain_layers, *(layer.text_extractor for layer in model.bga_layers)]
        for ours, pretrained in zip(text_layers, text_model.encoder.layer, strict=True):
            ours.load_state_dict(pretrained.state_dict())
        if config.use_generation:
            vit = vision_model.vision_model if hasattr(vision_model, "vision_model") else vision_model
            model.vision_embeddings.load_state_dict(vit.embeddings.state_dict())
            model.vision_pre_layernorm.load_state_dict(vit.pre_layrnorm.state_dict())
            model.vision_first_layer.load_state_dict(vit.encoder.layers[0].state_dict())
            for index, layer in enumerate(model.bga_layers[:-1], start=1):
                layer.visual_extractor.load_state_dict(vit.encoder.layers[index].state_dict())
        return model

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_embeddings.word_embeddings

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func=checkpoint, every_n_layers=1
    ):
        """`activation_checkpointing_enable()` (or the older `gradient_checkpointing_enable()`): each BGA layer is
        checkpointed as a whole, both branches with their samplers and generators (its random numbers are replayed,
        so the recomputed masks are the sampled ones); the extractors inside it are not checkpointed again. The plain
        layers below (text layer 0, ViT layer 0) are checkpointed as transformers checkpoints any layer."""
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, every_n_layers)
        for layer in self.bga_layers:
            for extractor in (layer.text_extractor, getattr(layer, "visual_extractor", None)):
                if extractor is not None:
                    extractor.gradient_checkpointing = False

    def parameter_report(self) -> dict[str, int]:
        """Parameter counts by part. `inference` is what runs on text alone (the paper's 130.3M for
        BERT-base: text branch, text samplers, G_t2v, classifier and CRF)."""
        parts = {
            "text_branch": ("text_embeddings.", "text_plain_layers.", ".text_extractor."),
            "vision_branch": (
                "vision_embeddings.",
                "vision_pre_layernorm.",
                "vision_first_layer.",
                ".visual_extractor.",
            ),
            "text_sampler": (".text_sampler.",),
            "visual_sampler": (".visual_sampler.",),
            "text_to_image_generator": ("generator.text_to_image.",),
            "image_to_text_generator": ("generator.image_to_text.",),
            "modality_projections": ("generator.text_to_visual.", "generator.visual_to_text."),
            "classifier_and_crf": ("classifier.", "crf."),
        }
        names = [(f".{name}", p.numel()) for name, p in self.named_parameters()]
        report = {part: sum(n for name, n in names if any(k in name for k in keys)) for part, keys in parts.items()}
        report["total"] = sum(n for _, n in names)
        inference = ("text_branch", "text_sampler", "text_to_image_generator", "modality_projections")
        report["inference"] = sum(report[part] for part in inference) + report["classifier_and_crf"]
        return report

    def quantized_int8(self) -> BgaMnerForTokenClassification:
        """A copy for CPU inference whose linear layers compute in int8 (torch's dynamic quantization: int8 weights,
        int8 activations with one scale per batch), but those of `INT8_KEEPS_FLOAT`. Predicts from text alone; it
        cannot be trained or saved. `predict_mner.py --quantize int8`; speed and F1 in BENCHMARKS.md."""
        names = {
            name
            for name, module in self.named_modules()
            if isinstance(module, nn.Linear) and not name.startswith(INT8_KEEPS_FLOAT)
        }
        with warnings.catch_warnings():  # torch 2.10+ names torchao as the successor (slower on CPU, BENCHMARKS.md)
            warnings.simplefilter("ignore")
            return torch.ao.quantization.quantize_dynamic(self.eval(), names, dtype=torch.qint8)

    def to_text_only(self) -> BgaMnerForTokenClassification:
        """A copy holding only what runs on text (config `text_only=True`): no vision tower, visual
        samplers or image2text generator. It predicts exactly as this model does without images, and
        `save_pretrained` / `AutoModelForTokenClassification.from_pretrained` treat it like any model."""
        config = self.config.__class__.from_dict({**self.config.to_dict(), "text_only": True})
        model = self.__class__(config).to(self.device)
        missing, _ = model.load_state_dict(self.state_dict(), strict=False)
        assert not missing, missing
        return model.train(self.training)

    # ----------------------------------------------------------------------------------------------
    # forward

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        prediction_mask: torch.Tensor | None = None,
        output_sampler_masks: bool = False,
        output_marginals: bool = False,
        **kwargs,
    ) -> BgaMnerTokenClassifierOutput:
        r"""
        input_ids, attention_mask, token_type_ids (b, n_t): BERT's inputs.
        pixel_values (b, 1 + crops, 3, H, W): the global image and its object crops (optional).
        pixel_mask (b, 1 + crops) bool: which image slots are real; slot 0 is the global image, and an
            example without it has no image (no generation loss). All real if omitted.
        labels (b, n_t): label ids at the labelled positions, -100 elsewhere.
        prediction_mask (b, n_t) bool: the positions the CRF labels, one per word (the processor gives
            it). Defaults to `labels != -100`, else to every real token but [CLS] and the last ([SEP]).

        Other keyword arguments (such as the processor's word bookkeeping: `word_index`, `example_index`,
        `num_words`) are ignored, so `model(**processor(...))` works.

        The visual branch runs only when pixel values are given and either the model is training or
        `config.inference_visual == "real"`; otherwise no vision module is called.
        """
        config = self.config
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text_valid = attention_mask.bool()
        text = self._plain_text(input_ids, token_type_ids, text_valid)  # embeddings, layer 0
        visual = self._visual_tokens(pixel_values, pixel_mask)  # ViT layer 0, for the examples with an image

        layers = []
        if config.use_generation:
            queries = self.generator.query_states(with_text=visual is not None)  # once for all layers and examples
            text_mask = text_valid.float()  # m_t^0: all ones over the real tokens
            for bga_layer in self.bga_layers:  # BGA layers 1..N
                layers.append(bga_layer(text, text_valid, text_mask, visual, self.generator, queries))
                text, text_mask, visual = layers[-1].text, layers[-1].text_mask, layers[-1].visual
        else:  # "w/o SCS & w/o MCG": plain BERT layers
            for bga_layer in self.bga_layers:
                text = bga_layer.text_extractor(text, text_valid)

        logits = self.classifier(self.dropout(text))
        predictions, marginals, crf_loss = self._crf(logits, text_valid, labels, prediction_mask, output_marginals)
        generation = self._generation_outputs(layers, text_valid, output_sampler_masks) if layers else {}
        loss = None
        if labels is not None:
            loss = crf_loss
            if generation:  # Eq. (11), and DynamicViT's keep-ratio loss
                loss = loss + config.alpha * generation["generation_loss"]
                loss = loss + config.keep_ratio_weight * generation["keep_ratio_loss"]
        return BgaMnerTokenClassifierOutput(
            loss=loss, crf_loss=crf_loss, logits=logits, predictions=predictions, marginals=marginals, **generation
        )

    def generated_visual_tokens(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """V_hat of the first BGA layer, generated from the text alone (the paper's Fig. 3 compares it with real
        images): (b, n_t) inputs -> (b, n_v, d_v)."""
        valid = attention_mask.bool()
        text = self._plain_text(input_ids, token_type_ids, valid)
        text_mask = self.bga_layers[0].text_sampler(text, valid, valid.float())
        return self.generator.generate_visual(text, text_mask, self.generator.query_states(with_text=False))

    def _plain_text(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, text_valid: torch.Tensor
    ) -> torch.Tensor:
        """The text embeddings through the text layers below the BGA layers (BERT-base: layer 0): (b, n_t, d_t)."""
        text = self.text_embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        for layer in self.text_plain_layers:
            text = layer(text, text_valid)
        return text

    def _visual_tokens(self, pixel_values: torch.Tensor | None, pixel_mask: torch.Tensor | None) -> VisualTokens | None:
        """The visual sequence after ViT layer 0 for the examples with a global image, or None when the visual
        branch does not run (no images, inference in "generated" mode, a text-only model). All image slots form
        one sequence (choice): the crops' tokens attend to the global image's from layer 0 on; missing slots are
        masked, never fed as content."""
        config = self.config
        if config.text_only and pixel_values is not None and self.training:
            raise ValueError("A text_only model cannot train with images; train the full model.")
        runs = config.use_generation and not config.text_only and pixel_values is not None
        if not runs or not (self.training or config.inference_visual == "real"):
            return None
        if pixel_mask is None:
            pixel_mask = torch.ones(pixel_values.shape[:2], dtype=torch.bool, device=pixel_values.device)
        pixel_mask = pixel_mask.bool()
        rows = pixel_mask[:, 0].nonzero().squeeze(1)
        if rows.numel() == 0:
            return None
        pixel_values, pixel_mask = pixel_values[rows], pixel_mask[rows]
        b, slots = pixel_mask.shape
        embeddings = self.vision_embeddings(pixel_values.flatten(0, 1))  # (b_v * slots, tokens, d_v)
        states = self.vision_pre_layernorm(embeddings).reshape(b, -1, embeddings.shape[-1])
        valid = pixel_mask.repeat_interleave(config.tokens_per_image, dim=1)
        return VisualTokens(rows, self.vision_first_layer(states, valid), valid, valid.float())

    def _generation_outputs(self, layers: list[BgaLayerOutput], text_valid: torch.Tensor, masks: bool) -> dict:
        """The generation losses (Eq. 11's second term), the keep-ratio loss and the per-layer statistics, as
        fields of [`BgaMnerTokenClassifierOutput`]."""
        config = self.config
        zero = text_valid.new_zeros((), dtype=torch.float32)
        reconstruction = torch.stack([zero if x.reconstruction is None else x.reconstruction.mean() for x in layers])
        cycle = torch.stack([zero if x.cycle is None else x.cycle.mean() for x in layers])
        text_shares = torch.stack([kept_share(x.text_mask, text_valid) for x in layers])  # (N, b)
        visual_masks = [(x.visual_mask, x.visual_valid) for x in layers if x.visual_mask is not None]
        visual_shares = [kept_share(mask, valid) for mask, valid in visual_masks]  # N x (b_v,)
        shares = torch.cat([text_shares.flatten(), *visual_shares])
        no_visual = torch.full((len(layers),), float("nan"), device=text_valid.device)
        return {
            "reconstruction_loss": reconstruction.mean(),
            "cycle_loss": cycle.mean(),
            "generation_loss": reconstruction.mean() + cycle.mean(),
            "keep_ratio_loss": shares.sub(config.keep_ratio_target).square().mean() if config.use_sampler else zero,
            "text_keep_ratio": text_shares.mean(1).detach(),
            "visual_keep_ratio": torch.stack(visual_shares).mean(1).detach() if visual_shares else no_visual,
            "layer_reconstruction_loss": reconstruction.detach(),
            "layer_cycle_loss": cycle.detach(),
            "text_sampler_masks": tuple(x.text_mask for x in layers) if masks else None,
            "visual_sampler_masks": tuple(mask for mask, _ in visual_masks) if masks and visual_masks else None,
        }

    def _crf(
        self,
        logits: torch.Tensor,
        text_valid: torch.Tensor,
        labels: torch.Tensor | None,
        prediction_mask: torch.Tensor | None,
        output_marginals: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The CRF over the labelled positions (one per word), Sec. 3.6: Viterbi predictions (b, n_t), marginals
        (b, n_t, C) or None, and the mean negative log-likelihood per sentence, Eq. (10), or None."""
        if prediction_mask is None:
            prediction_mask = labels != -100 if labels is not None else _default_prediction_mask(text_valid)
        prediction_mask = prediction_mask.bool() & text_valid
        order, compact_mask = _compaction(prediction_mask)
        compact_logits = logits.float().gather(1, order.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        compact_tags = self.crf.viterbi_tags(compact_logits, compact_mask)
        predictions = torch.full(text_valid.shape, -100, dtype=torch.long, device=logits.device)
        predictions = predictions.scatter(1, order, torch.where(compact_mask, compact_tags, -100))
        # Rows with no word keep a dummy first position for pytorch-crf; their labels are dropped below.
        has_words = prediction_mask.any(1)
        predictions = torch.where(has_words.unsqueeze(1), predictions, -100)
        marginals = None
        if output_marginals:
            compact = self.crf.marginals(compact_logits, compact_mask) * compact_mask.unsqueeze(-1)
            marginals = torch.zeros_like(logits, dtype=compact.dtype)
            marginals = marginals.scatter(1, order.unsqueeze(-1).expand_as(compact), compact)
            marginals = marginals * (predictions >= 0).unsqueeze(-1)
        crf_loss = None
        if labels is not None:
            compact_labels = labels.gather(1, order).clamp(min=0)
            log_likelihood = self.crf(compact_logits, compact_labels, compact_mask, reduction="none")
            crf_loss = -torch.where(has_words, log_likelihood, 0.0).sum() / has_words.sum().clamp(min=1)
        return predictions, marginals, crf_loss


def _load_tower(model_class: type[PreTrainedModel], name_or_path: str, **kwargs) -> PreTrainedModel:
    """A pretrained tower, without transformers' load report: a checkpoint holding more than the tower (a full
    CLIP, a BERT with its pre-training heads) has unexpected keys by design. Missing weights are an error."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = model_class.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["missing_keys"] or info["mismatched_keys"]:
        problems = sorted(info["missing_keys"]) + [str(key) for key in info["mismatched_keys"]]
        raise ValueError(
            f"{name_or_path} is not a complete {type(model).__name__} checkpoint: weights missing ({problems[:3]})."
        )
    return model


def _tower_config(tower: PreTrainedModel) -> dict:
    """A tower's config as a dict, without `_name_or_path` when that is a folder of this machine (a saved model
    must not publish local paths; a Hub id is kept)."""
    config = tower.config.to_dict()
    name = config.get("_name_or_path", "")
    if os.path.isabs(name) or os.path.exists(name):
        config.pop("_name_or_path")
    return config


def _default_prediction_mask(text_valid: torch.Tensor) -> torch.Tensor:
    """Every real token but the first ([CLS]) and the last ([SEP]): (b, n_t) bool."""
    positions = torch.arange(text_valid.shape[1], device=text_valid.device)
    last = text_valid.sum(1, keepdim=True) - 1
    return text_valid & (positions > 0) & (positions < last)


def _compaction(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mask (b, n) bool -> (order (b, w) long, compact_mask (b, w) bool), w = the most masked positions
    in a row: gathering with `order` brings each row's masked positions to the front, in order, and
    compact_mask marks them. Its first column is always True, as pytorch-crf requires, so an empty row
    gets one dummy position."""
    width = max(int(mask.sum(1).max()), 1)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]
    compact_mask = torch.arange(width, device=mask.device) < mask.sum(1, keepdim=True)
    compact_mask[:, 0] = True
    return order, compact_mask


BgaMnerForTokenClassification.register_for_auto_class("AutoModelForTokenClassification")
