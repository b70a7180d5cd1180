"""download_data.py against a real HTTP server on this machine (Python's http.server in a thread): resuming a
truncated download with a Range request, refusing a wrong checksum, a clear error when nothing answers, and
the image check."""

from __future__ import annotations

import hashlib
import http.server
import threading

import pytest
from PIL import Image

from download_data import SHA256, DownloadError, check_images, download, download_text
from download_data import main as download_main


class Server:
    """Serves `files` (path -> bytes). The first `truncate` responses of a path send their full Content-Length
    but only half the bytes, then close; Range requests are honoured. Requests are recorded."""

    def __init__(self, files: dict[str, bytes], truncate: int = 0):
        self.files, self.truncate, self.requests = files, {path: truncate for path in files}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if server.truncate[self.path] > 0:
                    server.truncate[self.path] -= 1
                    self.wfile.write(body[start : start + (len(body) - start) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def payload() -> bytes:
    return "".join(f"IMGID:{i}\nParis\tB-LOC\nis\tO\nnice\tO\n\n" for i in range(5000)).encode()


def test_a_truncated_download_resumes_with_a_range_request_and_lands_only_when_its_checksum_matches(tmp_path, payload):
    server = Server({"/c/train.txt": payload}, truncate=1)
    target = tmp_path / "train.txt"
    checksum = hashlib.sha256(payload).hexdigest()
    try:
        with pytest.raises(DownloadError, match=r"the connection ended at 89445 of 178890 bytes; run again to resume"):
            download(f"{server.url}/c/train.txt", target, checksum)
        part = tmp_path / "train.txt.part"
        assert not target.exists() and part.read_bytes() == payload[: len(payload) // 2]
        assert download(f"{server.url}/c/train.txt", target, checksum) == "downloaded"
        assert server.requests[-1] == ("/c/train.txt", f"bytes={len(payload) // 2}-")  # resumed, not restarted
        assert target.read_bytes() == payload and not part.exists()
        assert download(f"{server.url}/c/train.txt", target, checksum) == "present"
        assert len(server.requests) == 2  # a present file with the right checksum is not fetched again
    finally:
        server.close()


def test_a_wrong_checksum_keeps_nothing_and_says_so(tmp_path, payload):
    server = Server({"/c/train.txt": payload})
    try:
        with pytest.raises(DownloadError, match=r"SHA-256 [0-9a-f]{64}, expected 0{64}; the download was removed"):
            download(f"{server.url}/c/train.txt", tmp_path / "train.txt", "0" * 64)
        assert list(tmp_path.iterdir()) == []
    finally:
        server.close()


def test_the_text_command_fetches_the_umt_files_with_their_published_checksums(tmp_path, shared_data, capsys):
    files = {f"/umt/{name}": (shared_data / name).read_bytes() for name in SHA256}
    server = Server(files)
    try:
        download_main(["text", "--output_dir", str(tmp_path / "data"), "--base_url", f"{server.url}/umt"])
        for name in SHA256:
            assert (tmp_path / "data" / name).read_bytes() == (shared_data / name).read_bytes()
        assert "twitter2015_images/<id>.jpg" in capsys.readouterr().out  # where the images go
        assert set(download_text(tmp_path / "data", ["twitter2017"], f"{server.url}/umt").values()) == {"present"}
    finally:
        server.close()


def test_offline_the_command_fails_in_one_line(tmp_path, capsys):
    server = Server({})
    url = server.url
    server.close()  # nothing listens there any more
    with pytest.raises(SystemExit) as exit_:
        download_main(["text", "--output_dir", str(tmp_path), "--corpus", "twitter2017", "--base_url", url])
    message = str(exit_.value.code)
    assert message.startswith("error: cannot fetch http://127.0.0.1") and "are you offline?" in message
    assert "\n" not in message


def test_check_images_counts_present_and_missing_images_per_split(tmp_path, capsys):
    corpus, images = tmp_path / "corpus", tmp_path / "images"
    corpus.mkdir(), images.mkdir()
    (corpus / "train.txt").write_text("IMGID:1\nParis\tB-LOC\n\nIMGID:2\nRome\tB-LOC\n\nIMGID:3\nOslo\tB-LOC\n")
    (corpus / "valid.txt").write_text("IMGID:4\nParis\tB-LOC\n")
    Image.new("RGB", (8, 8)).save(images / "1.jpg")
    (images / "2.jpg").write_bytes(b"not an image")
    Image.new("RGB", (8, 8)).save(images / "4.jpg")
    report = check_images(corpus, images)
    assert report == {"train": {"ok": 1, "unreadable": 1, "missing": 1}, "validation": {"ok": 1}}
    download_main(["check-images", "--data_dir", str(corpus), "--image_dir", str(images)])
    assert "train: 3 tweets, 1 missing, 1 ok, 1 unreadable" in capsys.readouterr().out
