"""Training memory and step time with and without gradient checkpointing, at BERT-base + CLIP ViT-B/32 sizes
(random weights, configurations built offline), one training step of a batch of tweets with four images each
(the global image and three crops). Each setting runs in a fresh process, so that its peak memory (CPU: resident,
ru_maxrss; GPU: torch's max allocated) is its own.

    python bench/checkpointing.py --batch 16 --length 40
    python bench/checkpointing.py --device cuda --bf16      # bench/gpu.sh
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configuration_bga_mner import BgaMnerConfig  # noqa: E402
from modeling_bga_mner import BgaMnerForTokenClassification  # noqa: E402


def one_step(batch: int, length: int, checkpointing: bool, steps: int, device: str, bf16: bool) -> dict:
    torch.manual_seed(0)
    config = BgaMnerConfig(vision_config={"patch_size": 32})  # bert-base-uncased + CLIP ViT-B/32 sizes
    model = BgaMnerForTokenClassification(config).to(device).train()
    if checkpointing:
        model.activation_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    inputs = {
        "input_ids": torch.randint(1000, 20000, (batch, length)),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
        "labels": torch.randint(0, config.num_labels, (batch, length)),
        "pixel_values": torch.randn(batch, config.num_image_slots, 3, 224, 224),
    }
    inputs = {key: value.to(device) for key, value in inputs.items()}
    times = []
    for _ in range(steps + 1):  # the first step warms up (allocations, AdamW state)
        start = time.perf_counter()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"checkpointing": checkpointing, "bf16": bf16, "peak_gib": round(peak, 2),
            "step_s": [round(t, 3) for t in times[1:]]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=40, help="Sub-words per tweet.")
    parser.add_argument("--steps", type=int, default=2, help="Timed steps after one warm-up step.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast, as --mixed_precision bf16.")
    parser.add_argument("--one", choices=("on", "off"), help=argparse.SUPPRESS)  # a child process's setting
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_step(args.batch, args.length, args.one == "on", args.steps, args.device, args.bf16)))
        return
    print(f"batch {args.batch} x {args.length} sub-words, 4 images each, {args.device}, bf16 {args.bf16}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    for setting in ("off", "on"):
        child = subprocess.run(
            [sys.executable, __file__, "--batch", str(args.batch), "--length", str(args.length), "--steps",
             str(args.steps), "--device", args.device, *(["--bf16"] if args.bf16 else []), "--one", setting],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        print(child.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
