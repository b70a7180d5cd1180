"""Reproduce the paper's tables and figures, one command each, with our numbers beside the paper's.

    python reproduce.py table2                    # BGA-MNER on Twitter2015 / 2017, 3 seeds
    python reproduce.py table3 table4 --seeds 1   # several experiments; runs they share are run once
    python reproduce.py all --dry_run             # the runs it would start, and their estimated cost
    python reproduce.py all --launcher "accelerate launch --num_processes 4"

Experiments: table2 (main results), table3 (ablations), table4 (real vs generated visual features at
inference), table5 (parameters, no training), table6 (cross-domain), table7 (test images removed), fig3
(generated visual features against the paired image and other images), fig4 (what the samplers keep),
fig5 (data efficiency, BGA vs BERT-CRF). Every run goes through `run_mner.py` into its own folder under
`<work_dir>/runs/`; a run with a `results.json` is finished and skipped, an interrupted one resumes from its
latest checkpoint, and a failed one is reported (its log kept in `<work_dir>/logs/`) without stopping the
others. `<work_dir>/REPORT.md` holds our numbers beside the paper's (from `paper_results.yaml`) with the
difference, the plots, and the exact command behind every number.

The real experiments need a GPU, the data (`download_data.py`, README "Data") and the Hub towers
(bert-base-uncased, openai/clip-vit-base-patch32); `--config NAME=FILE` points a corpus at another
configuration (the tests use the smoke corpus and tiny models, offline).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent
CORPORA = ("twitter2015", "twitter2017")
EXPERIMENTS = ("table2", "table3", "table4", "table5", "table6", "table7", "fig3", "fig4", "fig5")
ABLATIONS = {  # Table 3 rows -> run_mner.py flags
    "without_sampler": ["--use_sampler", "false"],
    "without_cycle": ["--use_cycle", "false"],
    "without_sampler_and_cycle": ["--use_sampler", "false", "--use_cycle", "false"],
    "bert_crf": ["--use_generation", "false"],
}


@dataclass
class Run:
    """One run_mner.py call; `name` is its folder under <work_dir>/runs (runs with equal names are one run)."""

    name: str
    corpus: str
    args: list[str]
    epochs_x_tweets: float = 0.0  # the training work, for the --dry_run estimate
    needs: list[str] = field(default_factory=list)  # runs that must finish first (a trained model to evaluate)


@dataclass
class Plan:
    work_dir: Path
    configs: dict[str, Path]
    seeds: list[int]
    fig5_sizes: list[int]
    extra: list[str]

    def config(self, corpus: str) -> dict:
        return yaml.safe_load(self.configs[corpus].read_text(encoding="utf-8"))

    def folder(self, name: str) -> Path:
        return self.work_dir / "runs" / name

    def train(self, corpus: str, variant: str, seed: int, flags: list[str], tweets: int | None = None) -> Run:
        name = f"{corpus}-{variant}-seed{seed}"
        config = self.config(corpus)
        size = tweets or _count_tweets(Path(config["data_dir"]) / "train.txt")
        args = [str(self.configs[corpus]), "--seed", str(seed), *flags, *self.extra]
        return Run(name, corpus, args, config.get("num_train_epochs", 30) * size)

    def evaluate(self, corpus: str, source: Run, name: str, flags: list[str]) -> Run:
        args = [
            str(self.configs[corpus]),
            "--model_name_or_path",
            str(self.folder(source.name)),
            "--do_train",
            "false",
            *flags,
        ]
        return Run(name, corpus, args, needs=[source.name])

    def runs(self, experiment: str) -> list[Run]:
        full = {(c, s): self.train(c, "full", s, []) for c in CORPORA for s in self.seeds}
        if experiment == "table2":
            return list(full.values())
        if experiment == "table3":
            ablations = [self.train(c, v, s, f) for c in CORPORA for v, f in ABLATIONS.items() for s in self.seeds]
            return [*full.values(), *ablations]
        evaluations = {  # the full models evaluated again: reading real visual features / without test images
            "table4": ("real", ["--inference_visual", "real"]),
            "table7": ("no-images", ["--eval_without_images", "true"]),
        }
        if experiment in evaluations:
            variant, flags = evaluations[experiment]
            again = [self.evaluate(c, full[c, s], f"{c}-{variant}-seed{s}", flags) for c in CORPORA for s in self.seeds]
            return [*full.values(), *again]
        if experiment == "table6":  # trained on one corpus, tested on the other
            runs = []
            for source, target in (("twitter2017", "twitter2015"), ("twitter2015", "twitter2017")):
                other = self.config(target)
                flags = ["--test_data_dir", other["data_dir"]]
                flags += [
                    f for key in ("image_dir", "crop_dir") if other.get(key) for f in (f"--test_{key}", other[key])
                ]
                runs += [self.train(source, f"to-{target}", s, flags) for s in self.seeds]
            return runs
        if experiment == "fig5":
            return [
                self.train(c, f"{v}-{n}", s, [*f, "--max_train_samples", str(n)], tweets=n)
                for c in CORPORA
                for n in self.fig5_sizes
                for v, f in (("bga", []), ("bert_crf", ABLATIONS["bert_crf"]))
                for s in self.seeds
            ]
        if experiment in ("fig3", "fig4"):
            return [full[CORPORA[0], self.seeds[0]]]
        return []  # table5: no training

    def results(self, run: Run) -> dict | None:
        path = self.folder(run.name) / "results.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _count_tweets(path: Path) -> int:
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text(encoding="utf-8").split("\n\n") if line.strip())


def command(plan: Plan, run: Run, launcher: list[str]) -> list[str]:
    return [*launcher, str(ROOT / "run_mner.py"), *run.args, "--output_dir", str(plan.folder(run.name))]


def execute(plan: Plan, runs: list[Run], launcher: list[str]) -> dict[str, str]:
    """Runs what is not finished (skipping runs whose prerequisite failed); returns name -> state."""
    states: dict[str, str] = {}
    (plan.work_dir / "logs").mkdir(parents=True, exist_ok=True)
    for run in runs:
        if run.name in states:
            continue
        if plan.results(run) is not None:
            states[run.name] = "done"
            continue
        if any(states.get(need) in ("failed", "skipped") for need in run.needs):
            states[run.name] = "skipped"
            continue
        data_dir = plan.config(run.corpus).get("data_dir")
        if data_dir and not Path(data_dir).is_dir():  # fails at once, without starting a process
            print(f"    {run.name}: no data folder {data_dir} (see download_data.py)", flush=True)
            states[run.name] = "failed"
            continue
        call = command(plan, run, launcher)
        if plan.folder(run.name).exists():  # interrupted earlier: continue from its newest checkpoint
            call += ["--resume_from_checkpoint", "latest"]
        print(f"[{len(states) + 1}/{len({r.name for r in runs})}] {run.name}: {shlex.join(call)}", flush=True)
        log = plan.work_dir / "logs" / f"{run.name}.log"
        with open(log, "w", encoding="utf-8") as handle:
            code = subprocess.run(call, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT).returncode
        states[run.name] = "done" if code == 0 and plan.results(run) is not None else "failed"
        if states[run.name] == "failed":
            print(f"    failed (exit {code}); see {log}", flush=True)
    return states


# ------------------------------------------------------------------------------------------------
# reports


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2f}{spread}"


def versus(ours: list[float], paper: float | None) -> tuple[str, str, str]:
    """(ours as mean ± std, the paper's, the difference of the means)."""
    if not ours:
        return "-", f"{paper:.2f}" if paper is not None else "-", "-"
    difference = f"{statistics.mean(ours) - paper:+.2f}" if paper is not None else "-"
    return mean_std(ours), f"{paper:.2f}" if paper is not None else "-", difference


def percent(results: list[dict], split: str, *keys: str) -> list[float]:
    values = []
    for result in results:
        value = result.get(split, {})
        for key in keys:
            value = value.get(key, {}) if isinstance(value, dict) else {}
        if isinstance(value, (int, float)):
            values.append(100 * value)
    return values


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def report(plan: Plan, experiment: str, paper: dict, states: dict[str, str]) -> str:
    runs = plan.runs(experiment)

    def results(predicate) -> list[dict]:
        return [r for r in (plan.results(run) for run in runs if predicate(run.name)) if r is not None]

    def seeds(corpus: str, variant: str) -> list[dict]:
        return results(lambda name: name.startswith(f"{corpus}-{variant}-seed"))

    if experiment == "table2":
        rows = []
        for corpus in CORPORA:
            for key in ("PER", "LOC", "ORG", "MISC", "precision", "recall", "f1"):
                ours = percent(seeds(corpus, "full"), "test", *((key, "f1") if key.isupper() else ("overall", key)))
                rows.append(
                    [corpus, key if key.isupper() else f"overall {key}", *versus(ours, paper["table2"][corpus][key])]
                )
        return table(["corpus", "score (test)", "ours", "paper", "difference"], rows)
    if experiment == "table3":
        rows = []
        for corpus in CORPORA:
            full = percent(seeds(corpus, "full"), "test", "overall", "f1")
            for variant in ("full", *ABLATIONS):
                ours = percent(seeds(corpus, variant), "test", "overall", "f1")
                drop = f"{statistics.mean(ours) - statistics.mean(full):+.2f}" if ours and full else "-"
                paper_drop = paper["table3"][variant][corpus] - paper["table3"]["full"][corpus]
                rows.append(
                    [corpus, variant, *versus(ours, paper["table3"][variant][corpus]), drop, f"{paper_drop:+.2f}"]
                )
        return table(["corpus", "setting", "F1 ours", "F1 paper", "difference", "drop ours", "drop paper"], rows)
    if experiment == "table4":
        rows = [
            [
                corpus,
                features,
                *versus(percent(seeds(corpus, variant), "test", "overall", "f1"), paper["table4"][features][corpus]),
            ]
            for corpus in CORPORA
            for features, variant in (("real", "real"), ("generated", "full"))
        ]
        return table(["corpus", "visual features at inference", "F1 ours", "F1 paper", "difference"], rows)
    if experiment == "table5":
        parts = parameter_report(plan)
        rows = [
            [
                "network used at inference",
                f"{parts['inference'] / 1e6:.1f}M",
                f"{paper['table5']['inference_parameters_m']}M",
            ],
            [
                "text2image generator",
                f"{parts['text_to_image_generator'] / 1e6:.1f}M",
                f"{paper['table5']['text_to_image_generator_m']}M",
            ],
            ["text samplers", f"{parts['text_sampler'] / 1e6:.1f}M", f"{paper['table5']['text_samplers_m']}M"],
            ["whole training network", f"{parts['total'] / 1e6:.1f}M", "-"],
        ]
        return table(["part", "ours", "paper"], rows)
    if experiment == "table6":
        rows = []
        for source, target in (("twitter2017", "twitter2015"), ("twitter2015", "twitter2017")):
            done = seeds(source, f"to-{target}")
            for key in ("precision", "recall", "f1"):
                ours = percent(done, "test", "overall", key)
                rows.append(
                    [f"{source} -> {target}", key, *versus(ours, paper["table6"][f"{source}_to_{target}"][key])]
                )
        return table(["trained -> tested", "score", "ours", "paper", "difference"], rows)
    if experiment == "table7":
        rows = [
            [
                corpus,
                *versus(percent(seeds(corpus, "no-images"), "test", "overall", "f1"), paper["table7"][corpus]),
                mean_std(percent(seeds(corpus, "full"), "test", "overall", "f1")),
            ]
            for corpus in CORPORA
        ]
        return table(["corpus", "F1 without test images", "paper", "difference", "F1 with them"], rows)
    if experiment == "fig5":
        return figure5(plan, seeds)
    if experiment == "fig3":
        return figure3(plan, runs[0], states)
    if experiment == "fig4":
        return figure4(plan, runs[0], states)
    raise ValueError(experiment)


def parameter_report(plan: Plan) -> dict[str, int]:
    """The paper's sizes for the towers of the first corpus's configuration (built on the meta device: nothing is
    allocated; the configs come from the towers' names or folders)."""
    from transformers import AutoConfig, CLIPVisionConfig

    from configuration_bga_mner import BgaMnerConfig
    from modeling_bga_mner import BgaMnerForTokenClassification

    config = plan.config(CORPORA[0])
    text = AutoConfig.from_pretrained(config.get("text_model", "bert-base-uncased"))
    vision = CLIPVisionConfig.from_pretrained(config.get("vision_model", "openai/clip-vit-base-patch32"))
    bga = BgaMnerConfig(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        num_object_crops=config.get("num_object_crops", 3),
        max_text_length=config.get("max_length", 128),
    )
    with torch.device("meta"):
        return BgaMnerForTokenClassification(bga).parameter_report()


def figure5(plan: Plan, seeds) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(CORPORA), figsize=(5 * len(CORPORA), 3.5))
    rows = []
    for axis, corpus in zip(axes, CORPORA, strict=True):
        for variant, label in (("bga", "BGA-MNER"), ("bert_crf", "TEXT (BERT-CRF)")):
            points = []
            for size in plan.fig5_sizes:
                scores = percent(seeds(corpus, f"{variant}-{size}"), "test", "overall", "f1")
                rows.append([corpus, str(size), label, mean_std(scores)])
                if scores:
                    points.append((size, statistics.mean(scores)))
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", label=label)
        axis.set(title=corpus, xlabel="training tweets", ylabel="test F1 (%)", xscale="log")
        if axis.lines:
            axis.legend()
    figure.tight_layout()
    figure.savefig(plan.work_dir / "fig5.png", dpi=120)
    plt.close(figure)
    note = "The paper gives Fig. 5 as a plot only (no numbers to compare with).\n\n![fig5](fig5.png)\n\n"
    return note + table(["corpus", "training tweets", "model", "test F1 (mean ± std)"], rows)


def test_examples(plan: Plan, corpus: str):
    from twitter_mner import load_mner_dataset, without_decoding

    config = plan.config(corpus)
    data = load_mner_dataset(
        config["data_dir"],
        config.get("dataset_name", "conll"),
        config.get("image_dir"),
        config.get("crop_dir"),
        config.get("num_object_crops", 3),
    )
    return without_decoding(data)["test"]


@torch.no_grad()
def paired_image_ranks(model, processor, split, candidates: int = 4, tweets: int = 300, seed: int = 0) -> list[int]:
    """Fig. 3: for tweets with an image, the rank (0 = closest) of the paired image among `candidates` images by
    how close the first BGA layer's generated visual tokens V_hat (from the text alone) are to each image's real
    visual tokens (summed token KL, Eq. 5)."""
    from modeling_bga_mner import token_kl

    model.config.inference_visual = "real"  # the visual branch runs at inference: real visual tokens per image
    rng = random.Random(seed)
    with_image = [i for i, status in enumerate(split["image_status"]) if status == "ok"][:tweets]
    ranks = []
    for i in with_image:
        encoding = processor(words=[split[i]["tokens"]])
        visual_hat = model.generated_visual_tokens(
            encoding["input_ids"], encoding["attention_mask"], encoding["token_type_ids"]
        )
        others = rng.sample([j for j in with_image if j != i], min(candidates - 1, len(with_image) - 1))
        pixel_values, pixel_mask = processor.load_images([split[j]["image"] for j in [i, *others]])
        real = model._visual_tokens(pixel_values, pixel_mask)
        kl = token_kl(real.states, visual_hat.expand(len(others) + 1, -1, -1), real.valid.float(), "sum")
        ranks.append(int((kl < kl[0]).sum().item()))
    return ranks


def figure3(plan: Plan, run: Run, states: dict) -> str:
    from transformers import AutoModelForTokenClassification, AutoProcessor

    folder = plan.folder(run.name)
    if plan.results(run) is None:
        return f"(not available: the run {run.name} is {states.get(run.name, 'not finished')})"
    model = AutoModelForTokenClassification.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    ranks = paired_image_ranks(model, processor, test_examples(plan, CORPORA[0]))
    if not ranks:
        return "(no test tweet with an image)"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.5, 3))
    counts = [ranks.count(r) for r in range(max(ranks) + 1)]
    axis.bar(range(len(counts)), counts)
    axis.set(
        xlabel="rank of the paired image (0 = closest)", ylabel="test tweets", title=f"{CORPORA[0]}: V_hat vs images"
    )
    figure.tight_layout()
    figure.savefig(plan.work_dir / "fig3.png", dpi=120)
    plt.close(figure)
    top = sum(rank == 0 for rank in ranks) / len(ranks)
    return (
        f"Over {len(ranks)} test tweets with an image, the paired image is the closest of 4 (chance 25%) for "
        f"{100 * top:.1f}%; mean rank {statistics.mean(ranks):.2f} (chance 1.50). The paper shows two examples "
        f"(no numbers).\n\n![fig3](fig3.png)"
    )


def figure4(plan: Plan, run: Run, states: dict) -> str:
    import visualize_samplers

    folder = plan.folder(run.name)
    if plan.results(run) is None:
        return f"(not available: the run {run.name} is {states.get(run.name, 'not finished')})"
    split = test_examples(plan, CORPORA[0])
    chosen = [i for i, status in enumerate(split["image_status"]) if status == "ok"][:3] or [0, 1, 2]
    outputs = []
    for n, i in enumerate(chosen):
        image = split[i]["image"]
        args = [
            "--model",
            str(folder),
            "--text",
            " ".join(split[i]["tokens"]),
            "--output",
            str(plan.work_dir / f"fig4-{n}.png"),
        ]
        if image and image.get("path"):
            args += ["--image", image["path"]]
        visualize_samplers.main(args)
        outputs.append(f"![fig4-{n}](fig4-{n}.png)")
    return "\n\n".join(outputs)


def estimate(plan: Plan, runs: list[Run], seconds_per_tweet_epoch: float) -> str:
    todo = [run for run in {r.name: r for r in runs}.values() if plan.results(run) is None]
    work = sum(run.epochs_x_tweets for run in todo)
    hours = work * seconds_per_tweet_epoch / 3600
    lines = [f"  {run.name}: {run.epochs_x_tweets:,.0f} tweet-epochs" for run in todo]
    return "\n".join(
        [
            *lines,
            f"{len(todo)} runs to start, {work:,.0f} tweet-epochs, about {hours:.1f} GPU-hours at "
            f"{seconds_per_tweet_epoch} s per tweet-epoch (--seconds_per_tweet_epoch)",
        ]
    )


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiments", nargs="+", choices=(*EXPERIMENTS, "all"))
    parser.add_argument("--work_dir", type=Path, default=Path("reproduction"))
    parser.add_argument("--seeds", type=int, default=3, help="Seeds per trained setting (42, 43, ...).")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="CORPUS=FILE",
        help="A run_mner.py configuration per corpus (default: configs/<corpus>.yaml).",
    )
    parser.add_argument("--fig5_sizes", type=int, nargs="+", default=[50, 100, 200, 400])
    parser.add_argument("--launcher", default=sys.executable, help='e.g. "accelerate launch --num_processes 4".')
    parser.add_argument("--extra", default="", help="More run_mner.py flags for every training run, one string.")
    parser.add_argument("--dry_run", action="store_true", help="Print the runs that would start and their cost.")
    parser.add_argument(
        "--seconds_per_tweet_epoch",
        type=float,
        default=0.01,
        help="For --dry_run: an assumed GPU time per training tweet and epoch (not measured here).",
    )
    args = parser.parse_args(argv)
    configs = {corpus: ROOT / "configs" / f"{corpus}.yaml" for corpus in CORPORA}
    for item in args.config:
        corpus, _, path = item.partition("=")
        if corpus not in CORPORA or not path:
            parser.error(f"--config {item!r}: expected twitter2015=FILE or twitter2017=FILE")
        configs[corpus] = Path(path).resolve()
    missing = [str(path) for path in configs.values() if not path.is_file()]
    if missing:
        parser.error(f"no such configuration file: {', '.join(missing)}")
    experiments = list(EXPERIMENTS) if "all" in args.experiments else list(dict.fromkeys(args.experiments))
    plan = Plan(
        args.work_dir.resolve(), configs, [42 + i for i in range(args.seeds)], args.fig5_sizes, shlex.split(args.extra)
    )
    runs = [run for experiment in experiments for run in plan.runs(experiment)]
    if args.dry_run:
        print(estimate(plan, runs, args.seconds_per_tweet_epoch))
        return {}
    states = execute(plan, runs, shlex.split(args.launcher))
    paper = yaml.safe_load((ROOT / "paper_results.yaml").read_text(encoding="utf-8"))
    sections = ["# Reproduction of BGA-MNER (Chen et al., ACM MM 2023)", ""]
    for experiment in experiments:
        sections += [f"## {experiment}", "", report(plan, experiment, paper, states), ""]
    failed = sorted(name for name, state in states.items() if state != "done")
    sections += ["## Runs", "", *(f"- `{name}`: {states[name]}" for name in sorted(states)), ""]
    sections += ["## Commands", "", "```bash"]
    sections += [
        shlex.join(command(plan, run, shlex.split(args.launcher))) for run in {r.name: r for r in runs}.values()
    ]
    sections += ["```", ""]
    (plan.work_dir / "REPORT.md").write_text("\n".join(sections), encoding="utf-8")
    print(f"Report: {plan.work_dir / 'REPORT.md'}" + (f"; failed or skipped: {', '.join(failed)}" if failed else ""))
    return states


if __name__ == "__main__":
    main()
