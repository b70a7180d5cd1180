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

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torchcrf import CRF
from transformers import BertModel, CLIPVisionModel, PreTrainedModel
from transformers import initialization as init
from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer
from transformers.models.clip.modeling_clip import CLIPEncoderLayer, CLIPVisionEmbeddings
from transformers.utils import ModelOutput

try:  # as a package (tests, scripts) or as the Hub's dynamic module
    from .configuration_bga_mner import BgaMnerConfig
    from .pipeline_bga_mner import BgaMnerTokenClassificationPipeline  # noqa: F401 (saved beside the model)
except ImportError:
    from configuration_bga_mner import BgaMnerConfig


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
    """BERT layer l with hybrid attention, Eq. (8): queries from the text T, keys and values from
    [T ; V_hat] through the same W_K, W_V; then BERT's feed-forward block. Its weights are the
    pretrained BERT layer's, unchanged. Without extra tokens it is the plain BERT layer (layer 0)."""

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

    z = MLP_phi(T) (local), g = GAP(MLP_psi(T) * m^{l-1}) (global content kept so far), Eq. (1);
    p = Softmax(MLP_Phi([z, g])) over {drop, keep}; m^l ~ GumbelSoftmax(p) with the straight-through
    estimator in training, p_keep > threshold at inference. Masks are cumulative (m^l <= m^{l-1}), padding
    is never kept and position 0 ([CLS] / the global image's class token) is always kept.
    """

    def __init__(self, hidden_size: int, config: BgaMnerConfig):
        super().__init__()
        self.temperature = config.gumbel_temperature
        self.keep_threshold = config.sampler_keep_threshold
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

    def forward(self, hidden: torch.Tensor, previous_mask: torch.Tensor) -> torch.Tensor:
        """hidden (b, n, d); previous_mask (b, n) float in {0, 1}, m^{l-1} (the valid tokens at the
        first BGA layer). Returns m^l (b, n) float in {0, 1}, differentiable in training."""
        hidden = self.norm(hidden)
        local = self.local_mlp(hidden)
        kept = previous_mask.unsqueeze(-1).to(hidden.dtype)
        global_ = (self.global_mlp(hidden) * kept).sum(1) / kept.sum(1).clamp(min=1.0)  # GAP over kept tokens
        logits = self.decision_mlp(torch.cat([local, global_.unsqueeze(1).expand_as(local)], dim=-1)).float()
        if self.training:
            keep = F.gumbel_softmax(logits, tau=self.temperature, hard=True)[..., 1]
        else:
            keep = (logits.softmax(-1)[..., 1] > self.keep_threshold).float()
        mask = keep * previous_mask
        always_kept = torch.zeros_like(mask, dtype=torch.bool)
        always_kept[:, 0] = True
        return torch.where(always_kept, torch.ones_like(mask), mask)


class CrossModalGenerator(nn.Module):
    """One generator of the Multi-level Cross-modal Generator (Sec. 3.4), shared by all BGA layers:
    learnable modality queries Q (n_q, d) cross-attend to the sampled content of the other modality,
    Eq. (2)-(4). The attention mask is 0 for kept and -inf for dropped tokens (the paper's M)."""

    def __init__(self, hidden_size: int, num_queries: int, num_heads: int, config: BgaMnerConfig):
        super().__init__()
        self.queries = nn.Parameter(torch.zeros(num_queries, hidden_size))
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(
                hidden_size,
                num_heads,
                dim_feedforward=config.generator_intermediate_size,
                dropout=config.generator_dropout,
                activation="gelu",
                batch_first=True,
            )
            for _ in range(config.generator_num_layers)
        )

    def initial_states(self, num_queries: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """What the first decoder layer computes from the first `num_queries` queries alone (all by
        default): its self-attention block's output (1, n_q, d) and that output projected to
        cross-attention queries (1, n_q, d). Neither depends on the input, so a forward computes them
        once and shares them across examples and BGA layers (in training the dropout noise of the
        self-attention block is then shared too)."""
        first = self.layers[0]
        queries = self.queries[:num_queries].unsqueeze(0)
        states = first.norm1(queries + first._sa_block(queries, None, None))
        weight, bias = first.multihead_attn.in_proj_weight, first.multihead_attn.in_proj_bias
        return states, F.linear(states, weight.chunk(3)[0], bias.chunk(3)[0])

    def forward(
        self, source: torch.Tensor, source_mask: torch.Tensor, initial: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """source (b, n_s, d), already in this generator's width; source_mask (b, n_s), nonzero = kept
        (every row keeps at least one token); initial: from `initial_states()`. Returns the generated
        tokens (b, n_q, d): the decoder layers, the first one from its cross-attention on, Eq. (3)."""
        states, attention_queries = initial
        batch = source.shape[0]
        first = self.layers[0]
        attention = first.multihead_attn
        _, key_weight, value_weight = attention.in_proj_weight.chunk(3)
        _, key_bias, value_bias = attention.in_proj_bias.chunk(3)
        context = hybrid_attention(
            attention_queries.expand(batch, -1, -1),
            source,
            source_mask > 0,
            nn.Identity(),  # the queries are projected already
            partial(F.linear, weight=key_weight, bias=key_bias),
            partial(F.linear, weight=value_weight, bias=value_bias),
            attention.num_heads,
            attention.dropout if self.training else 0.0,
        )
        generated = first.norm2(states + first.dropout2(attention.out_proj(context)))
        generated = first.norm3(generated + first._ff_block(generated))
        for layer in self.layers[1:]:
            generated = layer(generated, source, memory_key_padding_mask=source_mask <= 0)
        return generated


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


def kl_to_target(target: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """KL(softmax(target) || softmax(generated)) over channels, per token: (b, n, d) x 2 -> (b, n), float32."""
    return F.kl_div(
        generated.float().log_softmax(-1), target.float().log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)


def masked_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` (b, n) over the tokens of `mask` (b, n), per row: (b,)."""
    return (values * mask).sum(1) / mask.sum(1).clamp(min=1.0)


@dataclass
class BgaMnerTokenClassifierOutput(ModelOutput):
    """Outputs of [`BgaMnerForTokenClassification`].

    loss: CRF negative log-likelihood + alpha * generation_loss, Eq. (11), when labels are given.
    crf_loss: the CRF's mean negative log-likelihood per sentence.
    reconstruction_loss, cycle_loss: (1/N) sum_l L_recon^l and (1/N) sum_l L_cycle^l, Eq. (5), (7);
        exactly 0 when no example of the batch has an image (or outside training).
    generation_loss: reconstruction_loss + cycle_loss.
    logits: the CRF's emission scores (b, n_t, C).
    predictions: Viterbi label ids (b, n_t), -100 where no label is predicted (sub-words after the first
        of a word, special tokens, padding).
    marginals: with `output_marginals=True`, the CRF's posterior probability of each label (b, n_t, C) at
        the predicted positions (0 elsewhere): the pipeline's scores.
    text_sampler_masks, visual_sampler_masks: per BGA layer, the samplers' masks (b, n_t) / (b, n_v)
        (with `output_sampler_masks=True`; visual ones only where the visual branch ran).
    """

    loss: torch.Tensor | None = None
    crf_loss: torch.Tensor | None = None
    reconstruction_loss: torch.Tensor | None = None
    cycle_loss: torch.Tensor | None = None
    generation_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    predictions: torch.Tensor | None = None
    marginals: torch.Tensor | None = None
    text_sampler_masks: tuple[torch.Tensor, ...] | None = None
    visual_sampler_masks: tuple[torch.Tensor, ...] | None = None


class BgaMnerPreTrainedModel(PreTrainedModel):
    config_class = BgaMnerConfig
    config: BgaMnerConfig
    base_model_prefix = "bga_mner"
    main_input_name = "input_ids"

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.text_config.initializer_range
        if isinstance(module, BertEmbeddings):
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
    """BGA-MNER: a BERT text branch and a CLIP-ViT visual branch joined by N BGA layers, and a CRF.

    Layer 0 of each branch is the plain pretrained layer; BGA layer l (1..N) holds a textual and a
    visual sampler and the pretrained text / ViT layer l as feature extractors (but the last BGA layer,
    whose visual output nothing reads, has no visual extractor); the two generators are shared by all
    BGA layers. With `use_generation=False` only the BERT + linear + CRF part exists.
    """

    def __init__(self, config: BgaMnerConfig):
        super().__init__(config)
        text_cfg, vision_cfg = config.text_config, config.vision_config
        depth = config.num_bga_layers + 1

        self.text_embeddings = BertEmbeddings(text_cfg)
        self.text_extractors = nn.ModuleList(TextualFeatureExtractor(text_cfg) for _ in range(depth))
        self.dropout = nn.Dropout(text_cfg.hidden_dropout_prob)
        self.classifier = nn.Linear(text_cfg.hidden_size, config.num_labels)
        self.crf = LinearChainCrf(config.num_labels, batch_first=True)

        if config.use_generation:
            # What runs on text: text samplers and the text2image generator (G_t2v, queries Q_v).
            if config.use_sampler:
                self.text_samplers = nn.ModuleList(
                    StageRefinedContextSampler(text_cfg.hidden_size, config) for _ in range(config.num_bga_layers)
                )
            # A common width is needed only when the towers differ (choice): linear maps between them.
            same_width = text_cfg.hidden_size == vision_cfg.hidden_size
            self.text_to_visual = (
                nn.Identity() if same_width else nn.Linear(text_cfg.hidden_size, vision_cfg.hidden_size)
            )
            self.visual_to_text = (
                nn.Identity() if same_width else nn.Linear(vision_cfg.hidden_size, text_cfg.hidden_size)
            )
            self.text_to_image_generator = CrossModalGenerator(
                vision_cfg.hidden_size, config.num_visual_tokens, vision_cfg.num_attention_heads, config
            )
        if config.use_generation and not config.text_only:
            # What runs only with images, in training: the visual branch and G_v2t (queries Q_t).
            self.vision_embeddings = CLIPVisionEmbeddings(vision_cfg)
            self.vision_pre_layernorm = nn.LayerNorm(vision_cfg.hidden_size, eps=vision_cfg.layer_norm_eps)
            # ViT layers 0..N-1: the last BGA layer's visual extractor would feed nothing.
            self.vision_extractors = nn.ModuleList(
                VisualFeatureExtractor(vision_cfg) for _ in range(config.num_bga_layers)
            )
            if config.use_sampler:
                self.visual_samplers = nn.ModuleList(
                    StageRefinedContextSampler(vision_cfg.hidden_size, config) for _ in range(config.num_bga_layers)
                )
            self.image_to_text_generator = CrossModalGenerator(
                text_cfg.hidden_size, config.max_text_length, text_cfg.num_attention_heads, config
            )
        self.post_init()

    # ----------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_text_vision_pretrained(
        cls, text_name_or_path: str, vision_name_or_path: str | None = None, **config_kwargs
    ) -> BgaMnerForTokenClassification:
        """Builds BGA-MNER from a pretrained BERT-family model and a pretrained CLIP (or CLIP-vision)
        model, by Hub id or local path. Every used BERT / ViT weight lands in its place; the samplers,
        generators, classifier and CRF are new. `config_kwargs` go to [`BgaMnerConfig`] (e.g. `id2label`).
        `vision_name_or_path` may be omitted only with `use_generation=False`."""
        text_model = BertModel.from_pretrained(text_name_or_path, add_pooling_layer=False)
        vision_model = None if vision_name_or_path is None else CLIPVisionModel.from_pretrained(vision_name_or_path)
        if vision_model is None and config_kwargs.get("use_generation", True):
            raise ValueError("A vision model is needed unless use_generation=False.")
        config = BgaMnerConfig(
            text_config=text_model.config.to_dict(),
            vision_config=vision_model.config.to_dict() if vision_model is not None else None,
            **config_kwargs,
        )
        model = cls(config)
        model.text_embeddings.load_state_dict(text_model.embeddings.state_dict())
        for i, extractor in enumerate(model.text_extractors):
            extractor.load_state_dict(text_model.encoder.layer[i].state_dict())
        if config.use_generation:
            model.vision_embeddings.load_state_dict(vision_model.embeddings.state_dict())
            model.vision_pre_layernorm.load_state_dict(vision_model.pre_layrnorm.state_dict())
            for i, extractor in enumerate(model.vision_extractors):
                extractor.load_state_dict(vision_model.encoder.layers[i].state_dict())
        return model

    def parameter_report(self) -> dict[str, int]:
        """Parameter counts by part. `inference` is what runs on text alone (the paper's 130.3M for
        BERT-base: text branch, text samplers, G_t2v, classifier and CRF)."""

        def count(*names: str) -> int:
            modules = [getattr(self, name) for name in names if hasattr(self, name)]
            return sum(p.numel() for module in modules for p in module.parameters())

        report = {
            "text_branch": count("text_embeddings", "text_extractors"),
            "vision_branch": count("vision_embeddings", "vision_pre_layernorm", "vision_extractors"),
            "text_sampler": count("text_samplers"),
            "visual_sampler": count("visual_samplers"),
            "text_to_image_generator": count("text_to_image_generator"),
            "image_to_text_generator": count("image_to_text_generator"),
            "modality_projections": count("text_to_visual", "visual_to_text"),
            "classifier_and_crf": count("classifier", "crf"),
            "total": sum(p.numel() for p in self.parameters()),
        }
        report["inference"] = (
            report["text_branch"]
            + report["text_sampler"]
            + report["text_to_image_generator"]
            + report["modality_projections"]
            + report["classifier_and_crf"]
        )
        return report

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
        text = self.text_embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        text = self.text_extractors[0](text, text_valid)

        image_rows = None  # indices of the examples whose visual branch runs
        if config.text_only and pixel_values is not None and self.training:
            raise ValueError("A text_only model cannot train with images; train the full model.")
        visual_branch = config.use_generation and not config.text_only
        if visual_branch and pixel_values is not None and (self.training or config.inference_visual == "real"):
            if pixel_mask is None:
                pixel_mask = torch.ones(pixel_values.shape[:2], dtype=torch.bool, device=pixel_values.device)
            image_rows = pixel_mask[:, 0].nonzero().squeeze(1)
            if image_rows.numel() == 0:
                image_rows = None
        if image_rows is not None:
            visual, visual_valid = self._embed_images(pixel_values[image_rows], pixel_mask[image_rows])

        zero = text.new_zeros((), dtype=torch.float32)
        reconstruction, cycle = zero, zero
        text_masks, visual_masks = [], []
        if config.use_generation:
            text_mask = text_valid.float()  # m_t^0: all ones (over real tokens)
            visual_mask = visual_valid.float() if image_rows is not None else None
            all_visual = text.new_ones((text.shape[0], config.num_visual_tokens), dtype=torch.bool)
            visual_queries = self.text_to_image_generator.initial_states()  # once for all layers and examples
            if image_rows is not None:
                text_queries = self.image_to_text_generator.initial_states(text.shape[1])
            for layer in range(config.num_bga_layers):
                if config.use_sampler:
                    text_mask = self.text_samplers[layer](text, text_mask)
                    if image_rows is not None:
                        visual_mask = self.visual_samplers[layer](visual, visual_mask)
                text_masks.append(text_mask)
                visual_hat = self.text_to_image_generator(
                    self.text_to_visual(text), text_mask, visual_queries
                )  # Eq. (2)
                text_side_visual, text_side_mask = self.visual_to_text(visual_hat), all_visual

                if image_rows is not None:
                    visual_masks.append(visual_mask)
                    text_i, text_mask_i, text_valid_i = text[image_rows], text_mask[image_rows], text_valid[image_rows]
                    text_hat = self.image_to_text_generator(
                        self.visual_to_text(visual), visual_mask, text_queries
                    )  # Eq. (4)
                    target_text, target_visual = text_i, visual
                    if config.detach_generation_targets:
                        target_text, target_visual = text_i.detach(), visual.detach()
                    # Eq. (5): KL between real and generated features on the sampled tokens.
                    reconstruction = (
                        reconstruction
                        + (
                            masked_token_mean(kl_to_target(target_visual, visual_hat[image_rows]), visual_mask)
                            + masked_token_mean(kl_to_target(target_text, text_hat), text_mask_i)
                        ).mean()
                    )
                    if config.use_cycle:  # Eq. (6)-(7): generate back from the generated, mask-agnostic
                        text_cycle = self.image_to_text_generator(
                            self.visual_to_text(visual_hat[image_rows]), all_visual[image_rows], text_queries
                        )
                        visual_cycle = self.text_to_image_generator(
                            self.text_to_visual(text_hat), text_valid_i, visual_queries
                        )
                        cycle = (
                            cycle
                            + (
                                masked_token_mean(kl_to_target(target_text, text_cycle), text_mask_i)
                                + masked_token_mean(kl_to_target(target_visual, visual_cycle), visual_mask)
                            ).mean()
                        )
                    if config.inference_visual == "real" and not self.training:  # paper Table 4
                        text_side_visual = text_side_visual.index_copy(0, image_rows, self.visual_to_text(visual))
                        text_side_mask = text_side_mask.index_copy(0, image_rows, visual_valid)
                    if layer + 1 < config.num_bga_layers:
                        visual = self.vision_extractors[layer + 1](
                            visual, visual_valid, self.text_to_visual(text_hat), text_valid_i
                        )
                text = self.text_extractors[layer + 1](text, text_valid, text_side_visual, text_side_mask)  # Eq. (8)

            reconstruction = reconstruction / config.num_bga_layers
            cycle = cycle / config.num_bga_layers
        else:  # "w/o SCS & w/o MCG": plain BERT layers
            for extractor in self.text_extractors[1:]:
                text = extractor(text, text_valid)

        logits = self.classifier(self.dropout(text))
        if prediction_mask is None:
            prediction_mask = labels != -100 if labels is not None else _default_prediction_mask(text_valid)
        prediction_mask = prediction_mask.bool() & text_valid
        order, compact_mask = _compaction(prediction_mask)
        compact_logits = logits.float().gather(1, order.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        compact_tags = self.crf.viterbi_tags(compact_logits, compact_mask)
        predictions = torch.full_like(input_ids, -100).scatter(1, order, torch.where(compact_mask, compact_tags, -100))
        # Rows with no word keep a dummy first position for pytorch-crf; their labels are dropped below.
        has_words = prediction_mask.any(1)
        predictions = torch.where(has_words.unsqueeze(1), predictions, -100)
        marginals = None
        if output_marginals:
            compact = self.crf.marginals(compact_logits, compact_mask) * compact_mask.unsqueeze(-1)
            marginals = torch.zeros_like(logits, dtype=compact.dtype)
            marginals = marginals.scatter(1, order.unsqueeze(-1).expand_as(compact), compact)
            marginals = marginals * (predictions >= 0).unsqueeze(-1)

        loss = crf_loss = generation = None
        if labels is not None:
            compact_labels = labels.gather(1, order).clamp(min=0)
            log_likelihood = self.crf(compact_logits, compact_labels, compact_mask, reduction="none")
            crf_loss = -torch.where(has_words, log_likelihood, 0.0).sum() / has_words.sum().clamp(min=1)
            generation = reconstruction + cycle
            loss = crf_loss + config.alpha * generation
        elif config.use_generation:
            generation = reconstruction + cycle

        return BgaMnerTokenClassifierOutput(
            loss=loss,
            crf_loss=crf_loss,
            reconstruction_loss=reconstruction if config.use_generation else None,
            cycle_loss=cycle if config.use_generation else None,
            generation_loss=generation,
            logits=logits,
            predictions=predictions,
            marginals=marginals,
            text_sampler_masks=tuple(text_masks) if output_sampler_masks else None,
            visual_sampler_masks=tuple(visual_masks) if output_sampler_masks else None,
        )

    def _embed_images(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values (b, slots, 3, H, W), pixel_mask (b, slots) bool -> the visual sequence after ViT layer 0
        (b, n_v, d_v) and its validity (b, n_v) bool. All image slots form one sequence (choice): the crops'
        tokens attend to the global image's from layer 0 on; missing slots are masked, never fed as content."""
        b, slots = pixel_mask.shape
        embeddings = self.vision_embeddings(pixel_values.flatten(0, 1))  # (b * slots, tokens, d_v)
        visual = self.vision_pre_layernorm(embeddings).reshape(b, -1, embeddings.shape[-1])
        valid = pixel_mask.repeat_interleave(self.config.tokens_per_image, dim=1)
        return self.vision_extractors[0](visual, valid), valid


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
