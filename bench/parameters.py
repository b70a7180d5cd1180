"""Parameter reports of BGA-MNER for pairs of text and vision towers, from configurations built offline
(the published sizes of each checkpoint; no weights are downloaded or allocated: the models are built on
the meta device).

    python bench/parameters.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import BertConfig, CLIPVisionConfig, RobertaConfig, XLMRobertaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configuration_bga_mner import BgaMnerConfig  # noqa: E402
from modeling_bga_mner import BgaMnerForTokenClassification  # noqa: E402

ROBERTA = dict(type_vocab_size=1, pad_token_id=1, max_position_embeddings=514)
TEXT_TOWERS = {  # the published config.json of each Hub checkpoint, in its essentials
    "bert-base-uncased": BertConfig(),
    "roberta-large": RobertaConfig(
        vocab_size=50265, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        **ROBERTA,
    ),
    "vinai/bertweet-base": RobertaConfig(vocab_size=64001, **{**ROBERTA, "max_position_embeddings": 130}),
    "xlm-roberta-large": XLMRobertaConfig(
        vocab_size=250002, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        **ROBERTA,
    ),
}  # fmt: skip
VISION = ("openai/clip-vit-base-patch32", CLIPVisionConfig(patch_size=32))


def main() -> None:
    print("| text tower | vision tower | N (plain text layers) | training | inference (text only) | generators |")
    print("|---|---|---|---|---|---|")
    for name, text_config in TEXT_TOWERS.items():
        config = BgaMnerConfig(text_config=text_config.to_dict(), vision_config=VISION[1].to_dict())
        with torch.device("meta"):
            report = BgaMnerForTokenClassification(config).parameter_report()
        generators = report["text_to_image_generator"] + report["image_to_text_generator"]
        print(
            f"| `{name}` | `{VISION[0]}` | {config.num_bga_layers} ({config.num_plain_text_layers}) | "
            f"{report['total'] / 1e6:.1f}M | {report['inference'] / 1e6:.1f}M | {generators / 1e6:.1f}M |"
        )


if __name__ == "__main__":
    main()
