"""A `datasets` builder for Twitter2015 / Twitter2017 (the UMT release) and any corpus in the same form.

Text files: `train.txt`, `valid.txt` (or `dev.txt`), `test.txt` in one folder. Each example is an
optional `IMGID:<id>` line, then one `token<TAB>label` line per word, and examples are separated by a
blank line. Twitter2015's OTHER is read as MISC. Labels must be BIO: Twitter2015 / 2017 use the four MNER
types; any other corpus ("conll") gets BIO over the entity types its files hold (or `label_names`).
Images, when given, are `<image_dir>/<id>.jpg`; object crops are found by file name in HVPNeT's public
layout `<crop_dir>/{train,val,test}/crops/<id>_pred_yolo_crop_<k>.png` (HVPNeT's `*_dict.pth` pickles
are never read).

`datasets` no longer runs loading scripts: import this module and use `load_mner_dataset(...)`, or
instantiate `TwitterMner(config_name=..., data_dir=...)` directly. To share a corpus, export it as Parquet
with the images embedded (what the Hub serves, and what `datasets.load_dataset(DIR)` reads):

    python twitter_mner.py export --data_dir data/twitter2015 --name twitter2015 \
        --image_dir data/twitter2015_images --crop_dir data/twitter2015_aux_images --output twitter2015-mner
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
from PIL import Image, UnidentifiedImageError

from configuration_bga_mner import MAX_IMAGE_PIXELS, MNER_LABELS, bio_labels, entity_types

logger = logging.getLogger(__name__)

SPLIT_FILES = {  # split -> accepted file names, in order of preference
    datasets.Split.TRAIN: ("train.txt",),
    datasets.Split.VALIDATION: ("valid.txt", "dev.txt"),
    datasets.Split.TEST: ("test.txt",),
}
CROP_SPLIT_FOLDERS = {datasets.Split.TRAIN: "train", datasets.Split.VALIDATION: "val", datasets.Split.TEST: "test"}
LABEL_ALIASES = {"OTHER": "MISC"}
CROP_NAME = re.compile(r"^(?P<id>.+)_pred_yolo_crop_(?P<k>\d+)\.png$")


class CorpusFormatError(ValueError):
    """A corpus file is not in the expected form; the message names the file and line."""


@dataclass
class ConllExample:
    image_id: str | None
    tokens: list[str]
    labels: list[str]
    line: int  # where the example starts in its file (1-based)


def check_bio_label(label: str, path: str | os.PathLike, number: int) -> None:
    """Raises `CorpusFormatError` naming file and line unless `label` is O, B-<type> or I-<type>."""
    prefix, dash, kind = label.partition("-")
    if label == "O" or (prefix in ("B", "I") and dash and kind):
        return
    if prefix in ("S", "E", "L", "U") and dash and kind:
        raise CorpusFormatError(
            f"{path}:{number}: label {label!r} is BIOES / BILOU; only BIO is supported: convert S-X to B-X and "
            "E-X / L-X to I-X (U-X to B-X)."
        )
    raise CorpusFormatError(f"{path}:{number}: label {label!r} is not BIO: expected O, B-<type> or I-<type>.")


def corpus_labels(data_dir: str | os.PathLike) -> tuple[str, ...]:
    """The BIO label list over every entity type found in a corpus folder's split files."""
    labels: set[str] = set()
    for names in SPLIT_FILES.values():
        path = next((Path(data_dir, name) for name in names if Path(data_dir, name).is_file()), None)
        if path is not None:
            labels.update(label for example in read_conll(path) for label in example.labels)
    return bio_labels(entity_types(labels))


def normalise_label(label: str) -> str:
    """`B-OTHER` -> `B-MISC`; other labels unchanged."""
    prefix, _, kind = label.partition("-")
    return f"{prefix}-{LABEL_ALIASES.get(kind, kind)}" if kind else label


def read_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number, line without its end) for each line of a UTF-8 file, a byte-order mark dropped. Raises
    `CorpusFormatError` naming file and line for bytes that are not UTF-8."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as error:
                raise CorpusFormatError(
                    f"{path}:{number}: not UTF-8 (byte {raw[error.start]:#04x} at column {error.start + 1}); "
                    "convert the file to UTF-8."
                ) from None
            yield number, line.removeprefix("\ufeff") if number == 1 else line


def read_conll(
    path: str | os.PathLike, labelled: bool = True, label_names: Sequence[str] | None = None
) -> Iterator[ConllExample]:
    """Reads examples from a CoNLL file in the UMT form. With `labelled=False`, lines may hold only
    the token (labels then come back as "O"). Labels must be BIO (OTHER is read as MISC), and in
    `label_names` when given. Raises `CorpusFormatError` naming file and line for a malformed line, a
    label that is not BIO or not in `label_names`, an `IMGID:` line inside an example, or a file with no
    example."""
    path = Path(path)
    image_id, tokens, labels, start = None, [], [], None
    found = False
    for number, line in read_lines(path):
        if line.strip() == "":
            if tokens:
                found = True
                yield ConllExample(image_id, tokens, labels, start)
            elif image_id is not None:
                raise CorpusFormatError(f"{path}:{start}: IMGID line without any token line after it.")
            image_id, tokens, labels, start = None, [], [], None
            continue
        if line.startswith("IMGID:") and "\t" not in line:
            if tokens or image_id is not None:
                raise CorpusFormatError(f"{path}:{number}: IMGID line inside an example (missing blank line?).")
            image_id, start = line[len("IMGID:") :].strip(), number
            continue
        start = start or number
        columns = line.split("\t")
        if not labelled and len(columns) == 1:
            columns = [line, "O"]
        if len(columns) != 2:
            raise CorpusFormatError(
                f"{path}:{number}: expected 'token<TAB>label' (2 columns), got {len(columns)} column(s): {line!r}."
            )
        if columns[0] == "":
            raise CorpusFormatError(f"{path}:{number}: expected 'token<TAB>label', got an empty token: {line!r}.")
        token, label = columns
        label = normalise_label(label.strip())
        check_bio_label(label, path, number)
        if label_names is not None and label not in label_names:
            raise CorpusFormatError(
                f"{path}:{number}: unknown label {label!r}; expected one of {', '.join(label_names)} "
                "(OTHER is read as MISC)."
            )
        tokens.append(token)
        labels.append(label)
    if tokens:
        found = True
        yield ConllExample(image_id, tokens, labels, start)
    elif image_id is not None:
        raise CorpusFormatError(f"{path}:{start}: IMGID line without any token line after it.")
    if not found:
        raise CorpusFormatError(f"{path}: no example in the file (empty file?).")


def count_orphan_inside_tags(labels: list[str]) -> int:
    """`I-X` tags that follow neither `B-X` nor `I-X`: conlleval and seqeval count each as an entity."""
    orphans, previous = 0, "O"
    for label in labels:
        if label.startswith("I-") and previous[2:] != label[2:]:
            orphans += 1
        previous = label
    return orphans


def find_crops(crop_dir: str | os.PathLike | None, split: str) -> dict[str, list[str]]:
    """Image id -> its crop files in HVPNeT's layout, in crop order (empty without `crop_dir`)."""
    crops = defaultdict(list)
    folder = Path(crop_dir, CROP_SPLIT_FOLDERS[split], "crops") if crop_dir else None
    if folder is None or not folder.is_dir():
        if crop_dir:
            logger.warning("No crop folder %s: the %s split has no object crops.", folder, split)
        return {}
    for entry in os.scandir(folder):
        match = CROP_NAME.match(entry.name)
        if match:
            crops[match["id"]].append((int(match["k"]), entry.path))
    return {image_id: [path for _, path in sorted(found)] for image_id, found in crops.items()}


@dataclass
class TwitterMnerConfig(datasets.BuilderConfig):
    """`data_dir`: the folder of the text files. `image_dir`: the folder of `<id>.jpg` images (optional).
    `crop_dir`: the HVPNeT object-crop folder (optional). `num_crops`: crops kept per image. `max_image_pixels`:
    larger images (by their header, read without decoding) are treated as missing."""

    image_dir: str | None = None
    crop_dir: str | None = None
    num_crops: int = 3
    max_image_pixels: int = MAX_IMAGE_PIXELS
    label_names: tuple[str, ...] | None = None

    def labels(self) -> tuple[str, ...]:
        """Twitter2015 / 2017: the four MNER types. Any other corpus: `label_names`, or BIO over the types its
        files hold."""
        if self.name in ("twitter2015", "twitter2017"):
            return MNER_LABELS
        if self.label_names is not None:
            return tuple(self.label_names)
        if not self.data_dir:
            raise ValueError("Give data_dir: the folder holding train.txt, valid.txt (or dev.txt) and test.txt.")
        return corpus_labels(self.data_dir)


class TwitterMner(datasets.GeneratorBasedBuilder):
    """Twitter2015 / Twitter2017 multimodal NER, and any corpus in the same CoNLL form."""

    BUILDER_CONFIG_CLASS = TwitterMnerConfig
    BUILDER_CONFIGS = [
        TwitterMnerConfig(name="twitter2015", description="Twitter2015 (Zhang et al., 2018), UMT release."),
        TwitterMnerConfig(name="twitter2017", description="Twitter2017 (Lu et al., 2018), UMT release."),
        TwitterMnerConfig(name="conll", description="Any corpus in the same CoNLL form, with or without images."),
    ]
    DEFAULT_CONFIG_NAME = "conll"

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description=self.config.description,
            features=datasets.Features(
                {
                    "id": datasets.Value("string"),
                    "image_id": datasets.Value("string"),
                    "tokens": datasets.Sequence(datasets.Value("string")),
                    "ner_tags": datasets.Sequence(datasets.ClassLabel(names=list(self.config.labels()))),
                    "image": datasets.Image(),  # decoded lazily; None when there is no usable image file
                    # "ok", or why `image` is None: "missing", "unreadable", "too large"; None without image_dir
                    "image_status": datasets.Value("string"),
                    "crops": datasets.List(datasets.Image()),
                }
            ),
        )

    def _split_generators(self, dl_manager) -> list[datasets.SplitGenerator]:
        if not self.config.data_dir:
            raise ValueError("Give data_dir: the folder holding train.txt, valid.txt (or dev.txt) and test.txt.")
        data_dir = Path(self.config.data_dir)
        if not data_dir.is_dir():
            raise FileNotFoundError(f"{data_dir}: no such data folder.")
        for kind, folder in (("image", self.config.image_dir), ("crop", self.config.crop_dir)):
            if folder and not Path(folder).is_dir():
                raise FileNotFoundError(f"{folder}: no such {kind} folder.")
        generators = []
        for split, names in SPLIT_FILES.items():
            path = next((data_dir / name for name in names if (data_dir / name).is_file()), None)
            if path is None:
                found = ", ".join(sorted(p.name for p in data_dir.iterdir())) or "nothing"
                raise FileNotFoundError(
                    f"{data_dir / names[0]}: split file missing; the folder must hold {' or '.join(names)} "
                    f"(found: {found})."
                )
            generators.append(datasets.SplitGenerator(name=split, gen_kwargs={"path": path, "split": split}))
        return generators

    def _generate_examples(self, path: Path, split: str):
        config = self.config
        crops = find_crops(config.crop_dir, split)
        orphans = 0
        statuses: Counter[str] = Counter()
        label_names = self.info.features["ner_tags"].feature.names
        for index, example in enumerate(read_conll(path, label_names=label_names)):
            image, status = None, None
            if config.image_dir and example.image_id is not None:
                candidate = Path(config.image_dir, f"{example.image_id}.jpg")
                status = image_status(candidate, config.max_image_pixels)
                image = str(candidate) if status == "ok" else None
                statuses[status] += 1
            orphans += count_orphan_inside_tags(example.labels)
            yield (
                f"{split}-{index}",
                {
                    "id": str(index),
                    "image_id": example.image_id,
                    "tokens": example.tokens,
                    "ner_tags": example.labels,
                    "image": image,
                    "image_status": status,
                    "crops": crops.get(example.image_id, [])[: config.num_crops] if image else [],
                },
            )
        if orphans:
            logger.warning(
                "%s: %d orphan I- tags (an I- tag without B- before it); kept as they are: the evaluation "
                "counts each as an entity, as conlleval does.",
                path,
                orphans,
            )
        if config.image_dir:
            problems = ", ".join(f"{count} {status}" for status, count in sorted(statuses.items()) if status != "ok")
            logger.log(
                logging.WARNING if problems else logging.INFO,
                "%s split: %d of %d images usable in %s%s.",
                split,
                statuses["ok"],
                sum(statuses.values()),
                config.image_dir,
                f" ({problems}; those examples train without an image)" if problems else "",
            )


def image_status(path: Path, max_pixels: int) -> str:
    """ "ok", "missing", "unreadable" or "too large" (more than `max_pixels` by the header; nothing is decoded)."""
    if not path.is_file():
        return "missing"
    try:
        with warnings.catch_warnings(), Image.open(path) as image:  # PIL warns on opening a huge header
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            width, height = image.size
    except Image.DecompressionBombError:  # PIL's own limit, far above ours
        return "too large"
    except (OSError, UnidentifiedImageError, ValueError):
        return "unreadable"
    return "too large" if width * height > max_pixels else "ok"


def load_mner_dataset(
    data_dir: str | os.PathLike,
    name: str = "conll",
    image_dir: str | os.PathLike | None = None,
    crop_dir: str | os.PathLike | None = None,
    num_crops: int = 3,
    cache_dir: str | os.PathLike | None = None,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    label_names: Sequence[str] | None = None,
) -> datasets.DatasetDict:
    """Builds the train / validation / test splits of a corpus (always re-read from its files). `label_names`:
    the BIO label list of a "conll" corpus (default: over the entity types its files hold); Twitter2015 / 2017
    always use `MNER_LABELS`."""
    if name == "conll" and label_names is None and Path(data_dir).is_dir():
        label_names = corpus_labels(data_dir)  # part of the builder's config, so of its cache's name
    builder = TwitterMner(
        config_name=name,
        data_dir=str(data_dir),
        image_dir=str(image_dir) if image_dir else None,
        crop_dir=str(crop_dir) if crop_dir else None,
        num_crops=num_crops,
        max_image_pixels=max_image_pixels,
        cache_dir=str(cache_dir) if cache_dir else None,
        label_names=tuple(label_names) if label_names is not None and name == "conll" else None,
    )
    try:
        builder.download_and_prepare(download_mode=datasets.DownloadMode.FORCE_REDOWNLOAD)
    except datasets.exceptions.DatasetGenerationError as error:
        if isinstance(error.__cause__, CorpusFormatError):
            raise error.__cause__ from None  # the file-and-line message, not datasets' generic wrapper
        raise
    return builder.as_dataset()


def without_decoding(corpus: datasets.DatasetDict) -> datasets.DatasetDict:
    """The corpus with `image` and `crops` left undecoded (`{"bytes", "path"}` dicts, which the processor reads),
    so that mapping over a split or reading a column does not decode every image."""
    return corpus.cast_column("image", datasets.Image(decode=False)).cast_column(
        "crops", datasets.List(datasets.Image(decode=False))
    )


SOURCES = {  # the corpora's papers, for the card of an exported dataset
    "twitter2015": "Zhang et al., Adaptive Co-attention Network for Named Entity Recognition in Tweets (AAAI 2018)",
    "twitter2017": "Lu et al., Visual Attention Model for Name Tagging in Multimodal Social Media (ACL 2018)",
}


def export(corpus: datasets.DatasetDict, output: str | os.PathLike, name: str) -> Path:
    """Writes `corpus` as a Parquet dataset with the images and crops embedded (`data/<split>-00000-of-00001.parquet`,
    the Hub's layout, features kept in the files' metadata) and a dataset card (`README.md`)."""
    from datasets.table import embed_table_storage
    from huggingface_hub import DatasetCard

    output = Path(output)
    (output / "data").mkdir(parents=True, exist_ok=True)
    for split, data in corpus.items():
        embedded = data.with_format("arrow").map(embed_table_storage, batched=True, desc=f"embedding {split} images")
        embedded.with_format(None).to_parquet(output / "data" / f"{split}-00000-of-00001.parquet")
    train = corpus["train"]
    labels = train.features["ner_tags"].feature.names
    sizes = ", ".join(f"{split} {len(data)}" for split, data in corpus.items())
    images = ", ".join(
        f"{split} {sum(status == 'ok' for status in data['image_status'])}" for split, data in corpus.items()
    )
    source = SOURCES.get(name, "its own authors (see the corpus's release)")
    configs = [{"split": split, "path": f"data/{split}-*"} for split in corpus]
    card = f"""---
license: other
task_categories:
- token-classification
tags:
- multimodal
- named-entity-recognition
- twitter
pretty_name: {name} (multimodal NER, BGA-MNER export)
configs:
- config_name: default
  data_files:
{"".join(f"  - split: {c['split']}{chr(10)}    path: {c['path']}{chr(10)}" for c in configs)}---

# {name}: multimodal named-entity recognition in tweets

Tweets with word-level BIO tags and, where available, the tweet's image and object crops, exported by
`twitter_mner.py export` (BGA-MNER) from the corpus of {source}, in the UMT release's text.

- **Splits (tweets)**: {sizes}; with a usable image: {images}.
- **Labels** (`ner_tags`, a `ClassLabel`): {", ".join(labels)}.
- **Features**: `id`, `image_id`, `tokens`, `ner_tags`, `image` (an `Image`, or None), `image_status` ("ok", or
  why there is no image: "missing", "unreadable", "too large"), `crops` (a list of `Image`: object crops).

```python
from datasets import load_dataset

corpus = load_dataset("path/to/this/folder-or-hub-id")
```

## Licence

The tweets, images and annotations remain subject to Twitter's (X's) terms of service and to the terms of the
corpus's release: check them before redistributing. The export adds no rights.

## Citation

{SOURCES.get(name, "Cite the corpus's authors.")}; the text as released by Yu et al., Improving Multimodal
Named Entity Recognition via Entity Span Detection with Unified Multimodal Transformer (ACL 2020).
"""
    DatasetCard(card).save(output / "README.md")
    return output


def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Export a corpus as a Parquet dataset with embedded images.")
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("export", help="Write DIR/data/*.parquet and DIR/README.md.")
    command.add_argument("--data_dir", required=True, help="Folder with train.txt, valid.txt (or dev.txt), test.txt.")
    command.add_argument("--name", default="conll", help="twitter2015, twitter2017 or conll (any corpus).")
    command.add_argument("--image_dir", help="Folder of <id>.jpg images.")
    command.add_argument("--crop_dir", help="HVPNeT-layout crop folder.")
    command.add_argument("--num_crops", type=int, default=3)
    command.add_argument("--output", required=True, help="The dataset folder to write.")
    command.add_argument("--push_to_hub", metavar="REPO", help="Also upload the folder to this Hub dataset repo.")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        corpus = load_mner_dataset(args.data_dir, args.name, args.image_dir, args.crop_dir, args.num_crops)
    except (CorpusFormatError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    folder = export(corpus, args.output, args.name)
    print(f"{args.name} -> {folder} (load it with datasets.load_dataset({str(folder)!r}))")
    if args.push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        repo = api.create_repo(args.push_to_hub, repo_type="dataset", exist_ok=True).repo_id
        api.upload_folder(repo_id=repo, repo_type="dataset", folder_path=folder)
        print(f"pushed to https://huggingface.co/datasets/{repo}")


if __name__ == "__main__":
    main()
