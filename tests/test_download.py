"""otlt data download against a local HTTP server: verified, resumable, nothing half-left."""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
import urllib.error
from pathlib import Path

import pytest

import otlt.data.download as download
from conftest import one_line_error
from otlt.cli import main
from otlt.data.download import download_dataset
from otlt.errors import OtltError

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, a stand-in for the tarball


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at any path, honouring ``Range: bytes=N-``; counts bytes sent."""

    sent = 0

    def do_GET(self):  # noqa: N802 (http.server's naming)
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].rstrip("-"))
            if start >= len(PAYLOAD):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
        else:
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        # Counted before the write: the client may have read the whole body, and the test
        # may read the count, before this server thread runs another line.
        type(self).sent += len(body)
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _RangeHandler.sent = 0
    yield f"http://127.0.0.1:{httpd.server_address[1]}/cifar-10-python.tar.gz"
    httpd.shutdown()


MD5 = hashlib.md5(PAYLOAD).hexdigest()


def test_download_verifies_and_names_the_file(server, tmp_path):
    path = download_dataset("cifar10", tmp_path, url=server, md5=MD5, progress=False)
    assert path == tmp_path / "cifar-10-python.tar.gz" and path.read_bytes() == PAYLOAD
    assert not list(tmp_path.glob("*.part"))
    sent = _RangeHandler.sent
    assert download_dataset("cifar10", tmp_path, url=server, md5=MD5, progress=False) == path
    assert _RangeHandler.sent == sent  # verified file: nothing fetched again


def test_an_interrupted_download_resumes(server, tmp_path):
    (tmp_path / "cifar-10-python.tar.gz.part").write_bytes(PAYLOAD[:300_000])
    path = download_dataset("cifar10", tmp_path, url=server, md5=MD5, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert _RangeHandler.sent == len(PAYLOAD) - 300_000  # only the rest was sent


class _ShortHandler(_RangeHandler):
    """Like _RangeHandler, but the first ``cuts`` responses close after ``CUT`` bytes of
    the body although their Content-Length promises all of it."""

    CUT = 200_000
    cuts = 1
    ranges: list = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        type(self).ranges.append(self.headers.get("Range"))
        if type(self).cuts <= 0:
            return super().do_GET()
        type(self).cuts -= 1
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if \
            self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(PAYLOAD) - start))
        self.end_headers()
        self.wfile.write(PAYLOAD[start:start + self.CUT])
        self.close_connection = True


@pytest.fixture
def short_server():
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _ShortHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _ShortHandler.ranges = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}/cifar-10-python.tar.gz"
    httpd.shutdown()


def test_a_connection_closed_early_is_resumed_with_a_range(short_server, tmp_path):
    _ShortHandler.cuts = 1
    path = download_dataset("cifar10", tmp_path, url=short_server, md5=MD5, progress=False,
                            backoff=0)
    assert path.read_bytes() == PAYLOAD
    assert _ShortHandler.ranges == [None, f"bytes={_ShortHandler.CUT}-"]


def test_a_server_that_keeps_closing_early_gives_one_line(short_server, tmp_path):
    _ShortHandler.cuts = 99
    with pytest.raises(OtltError, match="stopped short 3 times .*run the same command") as err:
        download_dataset("cifar10", tmp_path, url=short_server, md5=MD5, progress=False,
                         retries=2, backoff=0)
    assert "\n" not in str(err.value) and "mirror" not in str(err.value)
    assert len(_ShortHandler.ranges) == 3
    part = tmp_path / "cifar-10-python.tar.gz.part"
    assert part.read_bytes() == PAYLOAD[:3 * _ShortHandler.CUT]  # kept for the next run


class _Response:
    """A fake opener's response: PAYLOAD from ``start`` to ``stop`` with no Content-Length,
    ending there quietly (an end of body, as far as the client can tell) or with a reset."""

    def __init__(self, start: int, stop: int, reset: bool):
        self.status, self.headers = (206 if start else 200), {}
        self.body, self.reset = io.BytesIO(PAYLOAD[start:stop]), reset

    def read(self, n: int) -> bytes:
        block = self.body.read(n)
        if not block and self.reset:
            raise ConnectionResetError(104, "Connection reset by peer")
        return block

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def lengthless_server(monkeypatch, cuts: list[tuple[int, bool]], size: int = len(PAYLOAD)):
    """``urlopen`` serving a file of ``size`` bytes (PAYLOAD's first) without Content-Length:
    response i stops at ``cuts[i] = (byte, reset)``, later ones send the rest; a range past
    the end is HTTP 416. Returns the Range headers asked for."""
    ranges = []

    def urlopen(request, timeout):
        ranges.append(request.get_header("Range"))
        start = int(ranges[-1].split("=")[1].rstrip("-")) if ranges[-1] else 0
        if start >= size:
            raise urllib.error.HTTPError(request.full_url, 416, "Range Not Satisfiable", {}, None)
        stop, reset = cuts[len(ranges) - 1] if len(ranges) <= len(cuts) else (size, False)
        return _Response(start, min(stop, size), reset)

    monkeypatch.setattr(download.urllib.request, "urlopen", urlopen)
    return ranges


URL = "http://mirror.invalid/cifar-10-python.tar.gz"


def test_a_reset_without_content_length_is_resumed(tmp_path, monkeypatch):
    ranges = lengthless_server(monkeypatch, [(300_000, True)])
    path = download_dataset("cifar10", tmp_path, url=URL, md5=MD5, progress=False, backoff=0)
    assert path.read_bytes() == PAYLOAD and ranges == [None, "bytes=300000-"]


def test_a_quiet_close_before_the_known_size_is_resumed(tmp_path, monkeypatch):
    monkeypatch.setitem(download.DOWNLOADS, "cifar10", download.Download(URL, MD5, len(PAYLOAD)))
    ranges = lengthless_server(monkeypatch, [(300_000, False)])
    path = download_dataset("cifar10", tmp_path, progress=False, backoff=0)
    assert path.read_bytes() == PAYLOAD and ranges == [None, "bytes=300000-"]


def test_a_known_size_is_a_hint_the_checksum_decides(tmp_path, monkeypatch):
    """A file the server ends before the known size (a 416 for the rest) is hashed: it is
    kept when its MD5 is right, and a wrong one names the sizes, not a cut connection."""
    monkeypatch.setitem(download.DOWNLOADS, "cifar10",
                        download.Download(URL, MD5, len(PAYLOAD) + 10))
    ranges = lengthless_server(monkeypatch, [])
    assert download_dataset("cifar10", tmp_path, progress=False, backoff=0).read_bytes() == PAYLOAD
    assert ranges == [None, f"bytes={len(PAYLOAD)}-"]
    (tmp_path / "cifar-10-python.tar.gz").unlink()
    monkeypatch.setitem(download.DOWNLOADS, "cifar10",
                        download.Download(URL, "0" * 32, len(PAYLOAD) + 10))
    with pytest.raises(OtltError, match=f"the server's file has {len(PAYLOAD)} bytes, not the "
                                        f"official {len(PAYLOAD) + 10}: a changed file"):
        download_dataset("cifar10", tmp_path, progress=False, backoff=0)
    assert list(tmp_path.iterdir()) == []


def test_a_short_body_of_unknown_length_names_the_cut_too(tmp_path, monkeypatch):
    """No Content-Length, no known size (an own ``md5``) and a quiet close: the client cannot
    tell a cut, so the mismatch does not blame the mirror alone."""
    lengthless_server(monkeypatch, [(300_000, False)])
    with pytest.raises(OtltError) as err:
        download_dataset("cifar10", tmp_path, url=URL, md5=MD5, progress=False, backoff=0)
    message = str(err.value)
    assert "\n" not in message and "of its 300000 bytes is not the expected" in message
    assert "a connection closed early by a server that sent no length" in message
    assert list(tmp_path.iterdir()) == []


def test_a_checksum_mismatch_leaves_nothing(server, tmp_path):
    with pytest.raises(OtltError, match="MD5 .* is not the expected"):
        download_dataset("cifar10", tmp_path, url=server, md5="0" * 32, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_download_errors_are_one_line(tmp_path, capsys):
    assert main(["data", "download", "cifar10", "--root", str(tmp_path),
                 "--url", "http://127.0.0.1:9/none.tar.gz"]) == 2
    one_line_error(capsys, "otlt: error: cannot download")
    assert not list(Path(tmp_path).glob("*.tar.gz"))


def test_missing_data_names_the_download_command(tmp_path, monkeypatch):
    from otlt.data.sources import find_data

    monkeypatch.delenv("OTLT_DATA", raising=False)
    with pytest.raises(OtltError, match="otlt data download cifar10"):
        find_data("cifar10", search_dirs=[tmp_path])


def test_a_refused_write_fails_at_once_naming_the_file(server, tmp_path, monkeypatch):
    import errno
    import io

    import otlt.data.download as download

    class FullDisk(io.BytesIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    opened = Path.open
    monkeypatch.setattr(Path, "open", lambda self, mode="r", *a, **k: FullDisk()
                        if self.suffix == ".part" and "b" in mode and "r" not in mode
                        else opened(self, mode, *a, **k))
    monkeypatch.setattr(download.time, "sleep", lambda s: pytest.fail("a write was retried"))
    with pytest.raises(OtltError) as err:
        download_dataset("cifar10", tmp_path, url=server, md5=MD5, progress=False)
    message = str(err.value)
    assert "\n" not in message and "No space left on device" in message
    assert message.startswith(f"cannot write {tmp_path / 'cifar-10-python.tar.gz.part'}")
    assert _RangeHandler.sent == len(PAYLOAD)  # one request, no retry
