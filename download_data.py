"""Fetch the Twitter2015 / Twitter2017 text (the UMT release), and check an image folder you provide.

    python download_data.py text --output_dir data                      # data/twitter2015/*.txt, data/twitter2017/*.txt
    python download_data.py check-images --data_dir data/twitter2015 --image_dir data/twitter2015_images

The text files come from the UMT repository (Yu et al., ACL 2020) at a fixed commit, each checked against
its SHA-256. Downloads go to `<file>.part` and resume from there (HTTP Range) when a run is interrupted; a file
enters its place only with the right checksum. The images and object crops are behind download pages: the
command prints where to get them and where to put them, and `check-images` counts, per split, the tweets
whose image is present, missing, unreadable or too large.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import sys
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from configuration_bga_mner import MAX_IMAGE_PIXELS
from twitter_mner import SPLIT_FILES, CorpusFormatError, image_status, read_conll

UMT_TEXT = "https://raw.githubusercontent.com/jefferyYu/UMT/f2e9574abb8f557b1a364692e0bef059512c31de/data"
SHA256 = {  # of the UMT release's files, as published at that commit
    "twitter2015/train.txt": "a6246e37aa1c8acd738747fa8257e01775f2a1cc0d4f36f82f9d41d6246ad6fa",
    "twitter2015/valid.txt": "9dcc7f9df7331de3c9cdf67a3450e041c41c6254b5e43925c576e2dfaaabe2ad",
    "twitter2015/test.txt": "edb2665b89bfe58bca06a2c10b9b31cbfa95456135b6a4cbf55c872e48d9b8f9",
    "twitter2017/train.txt": "801e149e8635b19d66b4ec1212c329be340ada501b35c5fa55455fb6f53633be",
    "twitter2017/valid.txt": "41b5db90cb32059c14c2c3ccd50845fb77f1e3d3e4f7d0c210a61bc507d8a73e",
    "twitter2017/test.txt": "a7d9e172ae85bd3e35276eb2b01ce223321bdc92a47b234e24305d72e7a05243",
}
WHERE_IMAGES = """Images and object crops are not downloadable by script:
  images: the UMT release's archive (https://github.com/jefferyYu/UMT, "Data": a Google Drive link); unpack it
          as {root}/twitter2015_images/<id>.jpg and {root}/twitter2017_images/<id>.jpg
  crops:  HVPNeT's object crops (https://github.com/zjunlp/HVPNeT, "Data Download"), unpacked as
          {root}/twitter2015_aux_images/{{train,val,test}}/crops/, or made with prepare_crops.py
Then: python download_data.py check-images --data_dir {root}/twitter2015 --image_dir {root}/twitter2015_images"""


class DownloadError(Exception):
    """A download that failed; the message says what to do, in one line."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, target: Path, sha256: str) -> str:
    """Fetches `url` into `target` by way of `target.part` (resumed with a Range request when present); the file
    takes its place only if its SHA-256 is `sha256`. Returns "present" or "downloaded"; raises DownloadError."""
    if target.is_file() and sha256_of(target) == sha256:
        return "present"
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    start = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    expected = None
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            if start and response.status != 206:  # the server ignored the range: start again
                start = 0
            length = response.headers.get("Content-Length")
            expected = start + int(length) if length is not None else None
            with (
                open(part, "ab" if start else "wb") as handle,
                tqdm(total=expected, initial=start, unit="B", unit_scale=True, desc=target.name) as bar,
            ):
                while chunk := response.read(1 << 16):
                    handle.write(chunk)
                    bar.update(len(chunk))
    except http.client.IncompleteRead:
        pass  # the size check below reports it
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise DownloadError(f"cannot fetch {url} ({reason}): are you offline? Run again to resume.") from None
    size = part.stat().st_size
    if expected is not None and size < expected:
        raise DownloadError(f"{url}: the connection ended at {size} of {expected} bytes; run again to resume.")
    digest = sha256_of(part)
    if digest != sha256:
        part.unlink()
        raise DownloadError(f"{url}: SHA-256 {digest}, expected {sha256}; the download was removed, run again.")
    part.replace(target)
    return "downloaded"


def download_text(output_dir: Path, corpora: list[str], base_url: str = UMT_TEXT) -> dict[str, str]:
    """Each corpus's train / valid / test files into `output_dir/<corpus>/`; per file "present" or "downloaded"."""
    return {
        name: download(f"{base_url}/{name}", output_dir / name, sha256)
        for name, sha256 in SHA256.items()
        if name.split("/")[0] in corpora
    }


def check_images(data_dir: Path, image_dir: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> dict[str, Counter]:
    """Per split file, how many tweets' images are ok / missing / unreadable / too large (header check only)."""
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: no such image folder.")
    report = {}
    for split, names in SPLIT_FILES.items():
        path = next((data_dir / name for name in names if (data_dir / name).is_file()), None)
        if path is not None:
            ids = [e.image_id for e in read_conll(path) if e.image_id is not None]
            report[str(split)] = Counter(image_status(image_dir / f"{i}.jpg", max_pixels) for i in ids)
    if not report:
        raise FileNotFoundError(f"{data_dir}: no train.txt, valid.txt / dev.txt or test.txt.")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    text = commands.add_parser("text", help="Download the Twitter2015 / Twitter2017 text files.")
    text.add_argument("--output_dir", type=Path, default=Path("data"))
    text.add_argument(
        "--corpus", nargs="+", choices=("twitter2015", "twitter2017"), default=["twitter2015", "twitter2017"]
    )
    text.add_argument("--base_url", default=UMT_TEXT, help="A mirror holding <corpus>/<split>.txt.")
    images = commands.add_parser("check-images", help="Count present and missing images per split.")
    images.add_argument("--data_dir", type=Path, required=True)
    images.add_argument("--image_dir", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "text":
            for name, state in download_text(args.output_dir, args.corpus, args.base_url).items():
                print(f"{args.output_dir / name}: {state}")
            print(WHERE_IMAGES.format(root=args.output_dir))
        else:
            for split, counts in check_images(args.data_dir, args.image_dir).items():
                print(
                    f"{split}: {sum(counts.values())} tweets, "
                    + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
                )
    except (DownloadError, FileNotFoundError, CorpusFormatError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
