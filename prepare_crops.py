"""Object crops for BGA-MNER: the objects in each tweet's image that its text talks about.

    python prepare_crops.py --data_dir data/twitter2015 --image_dir data/twitter2015_images \
        --output_dir data/twitter2015_aux_images

For every tweet with an image, a text-conditioned detector from transformers (OWLv2 / OWL-ViT, or
Grounding DINO; default `google/owlv2-base-patch16-ensemble`, any compatible checkpoint by name or path)
looks for the tweet's query phrases in the image; the `--top_k` boxes above `--score_threshold` are cut
out and written in HVPNeT's public layout, `<output_dir>/{train,val,test}/crops/<id>_pred_yolo_crop_<k>.png`
(k = 0 for the best box), which `twitter_mner.py` reads like the public crops.

Query phrases (**choice**): the tweet without URLs, @mentions and "RT", split into its candidate entity
phrases: runs of capitalised words and hashtags (without "#"). A tweet without any is queried whole.
The detector sees each phrase as one query and the boxes of all phrases compete for the top k.

Resumable: every processed image id is appended to `<split>/done.txt`, so a killed run skips what it
finished (also images where nothing was found). Missing or unreadable images are listed in
`<split>/missing_images.txt` and counted, never fatal.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

from twitter_mner import CROP_SPLIT_FOLDERS, SPLIT_FILES, CorpusFormatError, read_conll

logger = logging.getLogger("prepare_crops")
DEFAULT_DETECTOR = "google/owlv2-base-patch16-ensemble"
SAFE_ID = re.compile(r"[^/\\\x00-\x1f]+")  # no path separator, no control character
NOISE = re.compile(r"^(https?://\S*|@\S+|RT|:)$", re.IGNORECASE)


def query_phrases(tokens: list[str], max_words: int = 6) -> list[str]:
    """Candidate entity phrases of a tweet: runs of capitalised words and hashtags, URLs, @mentions and
    RT removed; the cleaned tweet itself when there is none (at most `max_words` words per phrase)."""
    words = [t for t in tokens if t.strip() and not NOISE.match(t)]
    phrases, current = [], []
    for word in words:
        if word.startswith("#") and len(word) > 1:
            word = word[1:]
        if word[:1].isupper() or word[:1].isdigit():
            current.append(word)
            continue
        if current:
            phrases.append(" ".join(current[:max_words]))
        current = []
    if current:
        phrases.append(" ".join(current[:max_words]))
    phrases = list(dict.fromkeys(phrases))  # unique, in order
    return phrases or [" ".join(words[:max_words]) or "object"]


class Detector:
    """A zero-shot object detector from transformers behind one call: images and their query phrases in,
    per image the (box, score) pairs in pixels of the image, best first."""

    def __init__(self, name_or_path: str, device: str):
        self.model = AutoModelForZeroShotObjectDetection.from_pretrained(name_or_path).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(name_or_path)
        self.device = device
        self.grounding_dino = self.model.config.model_type == "grounding-dino"

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], queries: list[list[str]], threshold: float) -> list[list[tuple]]:
        sizes = [(image.height, image.width) for image in images]
        if self.grounding_dino:  # one text per image, phrases separated by ". "
            text = [". ".join(q).lower() + "." for q in queries]
            inputs = self.processor(images=images, text=text, return_tensors="pt", padding=True).to(self.device)
            outputs = self.model(**inputs)
            results = self.processor.post_process_grounded_object_detection(
                outputs, inputs["input_ids"], threshold=threshold, text_threshold=threshold, target_sizes=sizes
            )
        else:  # OWL-ViT / OWLv2: a list of queries per image; OWLv2 predicts boxes on the image padded square
            inputs = self.processor(text=queries, images=images, return_tensors="pt", truncation=True).to(self.device)
            outputs = self.model(**inputs)
            for row, image_queries in enumerate(queries):  # the processor pads each image's queries with " "
                outputs.logits[row, :, len(image_queries) :] = torch.finfo(outputs.logits.dtype).min
            square = self.model.config.model_type == "owlv2"
            targets = [(max(h, w), max(h, w)) if square else (h, w) for h, w in sizes]
            results = self.processor.post_process_grounded_object_detection(
                outputs, threshold=threshold, target_sizes=targets
            )
        return [
            sorted(zip(result["boxes"].tolist(), result["scores"].tolist(), strict=True), key=lambda pair: -pair[1])
            for result in results
        ]


def clip_box(box: list[float], width: int, height: int) -> tuple[int, int, int, int] | None:
    """Rounds a box to pixels inside the image; None when nothing of it is left."""
    left, top = max(0, int(round(box[0]))), max(0, int(round(box[1])))
    right, bottom = min(width, int(round(box[2]))), min(height, int(round(box[3])))
    return (left, top, right, bottom) if right > left and bottom > top else None


def open_image(path: Path) -> Image.Image | None:
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def prepare_split(split_file: Path, split: str, args, detector: Detector) -> dict[str, int]:
    folder = Path(args.output_dir, CROP_SPLIT_FOLDERS[split])
    crops = folder / "crops"
    crops.mkdir(parents=True, exist_ok=True)
    done_file = folder / "done.txt"
    done = set(done_file.read_text(encoding="utf-8").split()) if done_file.exists() else set()
    examples = {e.image_id: e for e in read_conll(split_file) if e.image_id is not None}
    for image_id, example in examples.items():  # ids become file names: none may leave the output folder
        if not SAFE_ID.fullmatch(image_id) or image_id in (".", ".."):
            raise CorpusFormatError(
                f"{split_file}:{example.line}: image id {image_id!r} cannot be a file name (path separators, '..' "
                "or control characters)."
            )
    todo = [image_id for image_id in examples if image_id not in done]
    counts = {"tweets": len(examples), "skipped_done": len(examples) - len(todo), "missing": 0, "crops": 0}
    missing_file = folder / "missing_images.txt"
    listed = set(missing_file.read_text(encoding="utf-8").split()) if missing_file.exists() else set()
    progress = tqdm(total=len(todo), desc=f"crops {split}", unit="image")
    for start in range(0, len(todo), args.batch_size):
        batch_ids, images = [], []
        missing = []
        for image_id in todo[start : start + args.batch_size]:
            image = open_image(Path(args.image_dir, f"{image_id}.jpg"))
            if image is None:
                missing.append(image_id)
            else:
                batch_ids.append(image_id)
                images.append(image)
        if images:
            queries = [query_phrases(examples[i].tokens) for i in batch_ids]
            for image_id, image, found in zip(
                batch_ids, images, detector(images, queries, args.score_threshold), strict=True
            ):
                k = 0
                for box, _ in found:
                    pixels = clip_box(box, image.width, image.height)
                    if pixels is None:
                        continue
                    image.crop(pixels).save(crops / f"{image_id}_pred_yolo_crop_{k}.png")
                    k += 1
                    if k == args.top_k:
                        break
                counts["crops"] += k
        counts["missing"] += len(missing)
        # The batch's missing images, then the batch as done, after its crops: a killed run redoes the batch.
        unlisted = [i for i in missing if i not in listed]
        if unlisted:
            with open(missing_file, "a", encoding="utf-8") as handle:
                handle.write("".join(f"{i}\n" for i in unlisted))
        with open(done_file, "a", encoding="utf-8") as handle:
            handle.write("".join(f"{i}\n" for i in todo[start : start + args.batch_size]))
        progress.update(len(todo[start : start + args.batch_size]))
    progress.close()
    if counts["missing"]:
        logger.warning("%s: %d images missing or unreadable (listed in %s)", split, counts["missing"], missing_file)
    return counts


def main(argv: list[str] | None = None) -> dict[str, dict[str, int]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True, help="Folder with train.txt, valid.txt (or dev.txt), test.txt.")
    parser.add_argument("--image_dir", required=True, help="Folder of <image id>.jpg files.")
    parser.add_argument("--output_dir", required=True, help="Where the HVPNeT-layout crop folders go.")
    parser.add_argument("--detector", default=DEFAULT_DETECTOR, help="A zero-shot detector: Hub id or folder.")
    parser.add_argument("--top_k", type=int, default=3, help="Crops kept per image (BGA-MNER uses 3).")
    parser.add_argument("--score_threshold", type=float, default=0.1)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for name in ("data_dir", "image_dir"):
        if not Path(getattr(args, name)).is_dir():
            parser.error(f"--{name} {getattr(args, name)}: no such folder")
    splits = {}
    for split, names in SPLIT_FILES.items():
        path = next((Path(args.data_dir, n) for n in names if Path(args.data_dir, n).is_file()), None)
        if path is not None:
            splits[split] = path
    if not splits:
        parser.error(f"--data_dir {args.data_dir}: no train.txt, valid.txt / dev.txt or test.txt")
    try:
        detector = Detector(args.detector, args.device)
    except OSError as error:
        sys.exit(
            f"error: cannot load the detector {args.detector!r} ({str(error).splitlines()[0]}). Without the Hub, "
            "download it elsewhere (e.g. `hf download " + args.detector + " --local-dir owlv2`) and pass that "
            "folder with --detector."
        )
    try:
        report = {str(split): prepare_split(path, split, args, detector) for split, path in splits.items()}
    except CorpusFormatError as error:
        sys.exit(f"error: {error}")
    for split, counts in report.items():
        logger.info("%s: %s", split, counts)
    return report


if __name__ == "__main__":
    main()
