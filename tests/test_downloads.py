"""Registry, models folder and Hub downloads, against a loopback HTTP server standing in for the Hub."""
import contextlib
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub.constants as hf_constants
import pytest

from hyperstyle_nodes.loaders import downloads
from hyperstyle_nodes.loaders.downloads import (DownloadError, KindMismatchError, RegistryError, UnknownModelError,
                                        WeightsError, WeightsUnavailableError, list_local_models, resolve)

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SERVER_LIFETIME_S = 60  # the server stops by itself even if a test never reaches its teardown

GENERATOR_BYTES = bytes(range(256)) * 40 + b"tiny generator"
DIRECTION_BYTES = b"tiny direction weights" * 50


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _entry(repo_id, filename, repo_type, data, kind, sha256):
    return {"repo_id": repo_id, "filename": filename, "repo_type": repo_type, "size": len(data), "sha256": sha256,
            "kind": kind, "licence": "test data", "description": "test entry"}


TEST_REGISTRY = {
    # partial hash, file in a repo sub-folder: checks the prefix…suffix form and the flat models folder
    "tiny_generator": _entry("test-org/tiny-weights", "nested/dir/tiny_generator.pt", "model", GENERATOR_BYTES,
                             "generator", f"{_sha(GENERATOR_BYTES)[:8]}…{_sha(GENERATOR_BYTES)[-4:]}"),
    # a Space, full hash, file at the repo's top level
    "tiny_direction": _entry("test-org/tiny-space", "tiny_direction.pt", "space", DIRECTION_BYTES,
                             "direction", _sha(DIRECTION_BYTES)),
}


class FakeHub:
    """Serves HEAD/GET /[spaces/]{repo_id}/resolve/{revision}/{filename} like the Hub, counting requests.

    `files` holds what the Hub has (its ETag is the sha256, as for LFS files); `bodies` overrides what a GET sends
    (bytes damaged on the way), `etags` what the ETag says (a git object id, or nothing).
    """

    def __init__(self):
        self.files = {
            "/test-org/tiny-weights/resolve/main/nested/dir/tiny_generator.pt": GENERATOR_BYTES,
            "/spaces/test-org/tiny-space/resolve/main/tiny_direction.pt": DIRECTION_BYTES,
        }
        self.bodies: dict[str, bytes] = {}
        self.etags: dict[str, str | None] = {}
        self.body_seconds = 0.0  # > 0: a GET sends its body in 10 slices over this long
        self.during_get = None  # called half-way through each GET's body
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10

            def _answer(self, with_body: bool):
                hub.requests.append((self.command, self.path))
                path = re.sub(r"/resolve/[^/]+/", "/resolve/main/", self.path, count=1)
                data = hub.files.get(path)
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = hub.bodies.get(path, data)
                etag = hub.etags.get(path, _sha(data))
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                if etag is not None:
                    self.send_header("ETag", f'"{etag}"')
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if with_body:
                    slices = [body[i * len(body) // 10:(i + 1) * len(body) // 10] for i in range(10)]
                    for index, piece in enumerate(slices):
                        if index == 5 and hub.during_get is not None:
                            hub.during_get()
                        self.wfile.write(piece)
                        self.wfile.flush()
                        time.sleep(hub.body_seconds / 10)

            def do_HEAD(self):
                self._answer(with_body=False)

            def do_GET(self):
                self._answer(with_body=True)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._watchdog = threading.Timer(SERVER_LIFETIME_S, self.server.shutdown)
        self._watchdog.daemon = True

    def start(self):
        self._thread.start()
        self._watchdog.start()

    def stop(self):
        self._watchdog.cancel()
        self.server.shutdown()
        self.server.server_close()

    def gets(self):
        """File downloads (huggingface_hub also asks /api/agent-harnesses now and then; that is not counted)."""
        return [path for method, path in self.requests if method == "GET" and "/resolve/" in path]


def _point_hub_at(monkeypatch, endpoint: str):
    """huggingface_hub reads HF_ENDPOINT at import time, so patch its constants as well as the environment."""
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(hf_constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")


def _set_offline(monkeypatch, offline: bool):
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", offline)


@pytest.fixture
def models(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "models"
    monkeypatch.setenv("HYPERSTYLE_MODELS_DIR", str(folder))
    monkeypatch.delitem(sys.modules, "folder_paths", raising=False)
    # Never send a developer's real token anywhere, not even to loopback.
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(hf_constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"), raising=False)
    _set_offline(monkeypatch, False)
    downloads._verified_digests.clear_memory()
    yield folder
    downloads._verified_digests.clear_memory()


@pytest.fixture
def hub(models, monkeypatch):
    fake = FakeHub()
    fake.start()
    _point_hub_at(monkeypatch, fake.endpoint)
    yield fake
    fake.stop()


GENERATOR_URL = f"/test-org/tiny-weights/resolve/{COMMIT}/nested/dir/tiny_generator.pt"
DIRECTION_URL = f"/spaces/test-org/tiny-space/resolve/{COMMIT}/tiny_direction.pt"


def _closed_port_endpoint() -> str:
    """A loopback address nothing listens on: connections are refused at once, as on a machine without network."""
    closed = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = closed.server_address[1]
    closed.server_close()
    return f"http://127.0.0.1:{port}"


def _visible_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def test_first_download_lands_flat_in_the_models_folder(hub, models):
    path = resolve("tiny_generator", kind="generator", progress=False, registry=TEST_REGISTRY)

    assert path == models / "tiny_generator.pt"
    assert path.read_bytes() == GENERATOR_BYTES
    assert hub.gets() == [GENERATOR_URL], "the download asks for the commit whose hash was checked"
    assert _visible_files(models) == ["tiny_generator.pt"], "no repo sub-folders, no leftovers"
    assert not list((models / downloads.DOWNLOAD_STATE_FOLDER).glob("*.partial")), "the staging folder is removed"


def test_space_download_uses_the_spaces_url(hub, models):
    path = resolve("tiny_direction", progress=False, registry=TEST_REGISTRY)

    assert path.read_bytes() == DIRECTION_BYTES
    assert hub.gets() == [DIRECTION_URL]


def test_cached_file_is_used_without_any_request_and_hashed_once(hub, models, monkeypatch):
    resolve("tiny_generator", progress=False, registry=TEST_REGISTRY)
    hub.requests.clear()
    hashed = []
    real_sha = downloads.sha256_of_file
    monkeypatch.setattr(downloads, "sha256_of_file", lambda p: hashed.append(p) or real_sha(p))

    for _ in range(3):
        assert resolve("tiny_generator", progress=False, registry=TEST_REGISTRY) == models / "tiny_generator.pt"
    downloads._verified_digests.clear_memory()  # as in a new process: the sidecar file remembers the hash
    resolve("tiny_generator", progress=False, registry=TEST_REGISTRY)

    assert hub.requests == []
    assert hashed == []
    assert (models / downloads.VERIFIED_SIDECAR).is_file()


def test_a_sidecar_in_the_first_format_still_spares_the_hashing(models, monkeypatch):
    """Files checked by an earlier version are not hashed again after an update ({file name: record} sidecar)."""
    _set_offline(monkeypatch, True)
    models.mkdir(parents=True)
    local = models / "tiny_direction.pt"
    local.write_bytes(DIRECTION_BYTES)
    stat = local.stat()
    (models / downloads.VERIFIED_SIDECAR).write_text(json.dumps(
        {"tiny_direction.pt": {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": _sha(DIRECTION_BYTES)}}))
    monkeypatch.setattr(downloads, "sha256_of_file", lambda p: pytest.fail(f"{p} was hashed again"))

    assert resolve("tiny_direction", progress=False, registry=TEST_REGISTRY) == local


@pytest.mark.parametrize("name, content, complaint", [
    ("tiny_generator", GENERATOR_BYTES[:-100], "bytes instead of"),  # truncated
    ("tiny_direction", b"x" * len(DIRECTION_BYTES), "does not match the registry's"),  # right size, other bytes
])
def test_a_wrong_file_under_a_registry_name_is_left_untouched_and_named(hub, models, name, content, complaint):
    local = models / TEST_REGISTRY[name]["filename"].rsplit("/", 1)[-1]
    models.mkdir(parents=True)
    local.write_bytes(content)

    with pytest.raises(downloads.UnusableFileError) as error:
        resolve(name, progress=False, registry=TEST_REGISTRY)

    message = str(error.value)
    assert str(local) in message and complaint in message
    assert "left untouched" in message and "delete or move it" in message and f"my_{local.name}" in message
    assert local.read_bytes() == content, "the file is neither deleted nor overwritten"
    assert hub.gets() == []

    local.unlink()  # what the message says to do for a damaged copy
    assert resolve(name, progress=False, registry=TEST_REGISTRY) == local
    assert local.stat().st_size == TEST_REGISTRY[name]["size"]


def test_a_download_changed_later_is_not_replaced(hub, models):
    path = resolve("tiny_direction", progress=False, registry=TEST_REGISTRY)
    path.write_bytes(b"z" * len(DIRECTION_BYTES))  # the user's edit, or damage: no longer what the pack wrote

    with pytest.raises(downloads.UnusableFileError, match="left untouched"):
        resolve("tiny_direction", progress=False, registry=TEST_REGISTRY)
    assert path.read_bytes() == b"z" * len(DIRECTION_BYTES)
    assert len(hub.gets()) == 1


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "no network"])
def test_offline_a_users_file_under_a_registry_name_is_kept(models, monkeypatch, how):
    """The issue's case: a user's own RetinaFace file saved under the registry's name was deleted, and the error
    still said the unusable copy was "at" the deleted path."""
    _point_hub_at(monkeypatch, _closed_port_endpoint())
    if how == "HF_HUB_OFFLINE":
        _set_offline(monkeypatch, True)
    users_file = models / "detection_mobilenet0.25_Final.pth"
    models.mkdir(parents=True)
    users_file.write_bytes(b"the user's own RetinaFace weights" * 1000)

    with pytest.raises(downloads.UnusableFileError) as error:
        resolve("retinaface_mobilenet0.25", kind="face_detector", progress=False)

    message = str(error.value)
    assert f"{users_file}: its sha256" in message and "does not match the registry's 2979b33f…5220" in message
    assert "left untouched" in message
    assert users_file.read_bytes() == b"the user's own RetinaFace weights" * 1000


def test_offline_the_real_retinaface_file_under_the_registry_name_is_kept(models, monkeypatch, assets_dir):
    """The shared RetinaFace file is the same network as the registry's but another file (see shared/README.md)."""
    original = assets_dir / "models" / "retinaface" / "retinaface_mobilenet0.25.pth"
    _point_hub_at(monkeypatch, _closed_port_endpoint())
    users_copy = models / "detection_mobilenet0.25_Final.pth"
    models.mkdir(parents=True)
    users_copy.write_bytes(original.read_bytes())

    shared_sha256 = "38ec7bb3c9cbfe2f40edabc05fab970a6d648747cbc534092be85d5eb9b37ed0"  # from shared/README.md
    with pytest.raises(downloads.UnusableFileError, match=shared_sha256):
        resolve("retinaface_mobilenet0.25", kind="face_detector", progress=False)
    assert users_copy.read_bytes() == original.read_bytes()


def test_download_damaged_on_the_way_fails_clearly_after_two_tries(hub, models):
    hub.bodies["/spaces/test-org/tiny-space/resolve/main/tiny_direction.pt"] = b"y" * len(DIRECTION_BYTES)

    with pytest.raises(DownloadError) as error:
        resolve("tiny_direction", progress=False, registry=TEST_REGISTRY)

    message = str(error.value)
    assert "sha256" in message and "tiny_direction" in message
    assert "/spaces/test-org/tiny-space/resolve/main/tiny_direction.pt" in message
    assert len(hub.gets()) == downloads.MAX_DOWNLOADS_PER_FILE == 2
    assert _visible_files(models) == [], "a bad file is not left behind"
    assert not list((models / downloads.DOWNLOAD_STATE_FOLDER).glob("*.partial"))


def test_the_final_name_never_shows_a_partial_download(hub, models):
    seen = []
    hub.during_get = lambda: seen.append((models / "tiny_generator.pt").exists())

    resolve("tiny_generator", progress=False, registry=TEST_REGISTRY)

    assert seen == [False]


def test_a_hub_file_that_is_not_the_registrys_is_refused_before_downloading(hub, models):
    hub.files["/spaces/test-org/tiny-space/resolve/main/tiny_direction.pt"] = b"w" * len(DIRECTION_BYTES)

    with pytest.raises(DownloadError, match="is not the file the registry describes") as error:
        resolve("tiny_direction", progress=False, registry=TEST_REGISTRY)
    assert _sha(b"w" * len(DIRECTION_BYTES)) in str(error.value)
    assert hub.gets() == []


def _registry_without_hash(size=None):
    """Like the StyleGAN-NADA entries (no size, no hash) or InterFaceGAN's (size only)."""
    return {"tiny_generator": {**TEST_REGISTRY["tiny_generator"], "size": size, "sha256": None}}


@pytest.mark.parametrize("size", [None, len(GENERATOR_BYTES)])
def test_an_entry_without_a_hash_is_checked_against_the_hubs_sha256(hub, models, size):
    registry = _registry_without_hash(size)
    hub.bodies["/test-org/tiny-weights/resolve/main/nested/dir/tiny_generator.pt"] = b"v" * len(GENERATOR_BYTES)

    with pytest.raises(DownloadError, match="differs from the Hub's"):
        resolve("tiny_generator", progress=False, registry=registry)
    assert _visible_files(models) == []

    hub.bodies.clear()
    assert resolve("tiny_generator", progress=False, registry=registry).read_bytes() == GENERATOR_BYTES


def test_the_hubs_sha256_is_remembered_for_full_checks_offline(hub, models, monkeypatch):
    registry = _registry_without_hash()
    path = resolve("tiny_generator", progress=False, registry=registry)
    _set_offline(monkeypatch, True)
    downloads._verified_digests.clear_memory()  # a new process
    hub.requests.clear()

    assert resolve("tiny_generator", progress=False, registry=registry) == path
    path.write_bytes(GENERATOR_BYTES[:-1] + b"!")  # same size, other bytes
    with pytest.raises(downloads.UnusableFileError, match="differs from the Hub's"):
        resolve("tiny_generator", progress=False, registry=registry)
    assert hub.requests == []


def _bytes_matching_a_partial_hash(spec_prefix: str, size: int) -> bytes:
    """Other bytes whose sha256 starts with `spec_prefix` (one hex digit: a few dozen tries)."""
    for counter in range(100_000):
        candidate = counter.to_bytes(8, "little") * (size // 8) + b"\0" * (size % 8)
        if _sha(candidate).startswith(spec_prefix) and candidate != GENERATOR_BYTES:
            return candidate
    raise AssertionError("no candidate found")


def test_a_partial_registry_hash_is_not_enough(hub, models, monkeypatch):
    """A 'prefix…suffix' hash checks a few bits; the Hub's full sha256 decides (a 1-digit prefix stands in for the
    registry's 48 bits, so that another file matching it can be made)."""
    prefix = _sha(GENERATOR_BYTES)[0]
    registry = {"tiny_generator": {**TEST_REGISTRY["tiny_generator"], "sha256": f"{prefix}…"}}
    impostor = _bytes_matching_a_partial_hash(prefix, len(GENERATOR_BYTES))
    models.mkdir(parents=True)
    local = models / "tiny_generator.pt"
    local.write_bytes(impostor)

    with pytest.raises(downloads.UnusableFileError, match="differs from the Hub's"):
        resolve("tiny_generator", progress=False, registry=registry)
    assert local.read_bytes() == impostor

    local.write_bytes(GENERATOR_BYTES)  # installed by hand: checked against the Hub's sha256, not downloaded
    assert resolve("tiny_generator", progress=False, registry=registry) == local
    assert hub.gets() == []
    _set_offline(monkeypatch, True)
    downloads._verified_digests.clear_memory()
    assert resolve("tiny_generator", progress=False, registry=registry) == local, "remembered for offline use"


def test_offline_a_file_without_a_full_hash_known_is_not_used_unchecked(models, monkeypatch):
    _set_offline(monkeypatch, True)
    models.mkdir(parents=True)
    local = models / "tiny_generator.pt"
    local.write_bytes(GENERATOR_BYTES)  # right size and partial hash, but the full sha256 was never learnt

    with pytest.raises(WeightsUnavailableError) as error:
        resolve("tiny_generator", progress=False, registry=TEST_REGISTRY)

    message = str(error.value)
    assert f"has a copy at {local} of the right size" in message and "full sha256 cannot be checked" in message
    assert "HF_HUB_OFFLINE" in message and "my_tiny_generator.pt" in message
    assert local.read_bytes() == GENERATOR_BYTES


def test_a_file_kept_in_git_is_checked_by_its_git_object_id(hub, models):
    url_path = "/spaces/test-org/tiny-space/resolve/main/tiny_direction.pt"
    blob_id = hashlib.sha1(f"blob {len(DIRECTION_BYTES)}\0".encode() + DIRECTION_BYTES).hexdigest()
    hub.etags[url_path] = blob_id  # the Hub's ETag of a non-LFS file
    registry = {"tiny_direction": {**TEST_REGISTRY["tiny_direction"], "sha256": None}}
    hub.bodies[url_path] = b"u" * len(DIRECTION_BYTES)

    with pytest.raises(DownloadError, match=f"differs from the Hub's {blob_id}"):
        resolve("tiny_direction", progress=False, registry=registry)

    hub.bodies.clear()
    assert resolve("tiny_direction", progress=False, registry=registry).read_bytes() == DIRECTION_BYTES


def test_a_hub_file_without_a_hash_is_not_downloaded(hub, models):
    hub.etags["/spaces/test-org/tiny-space/resolve/main/tiny_direction.pt"] = None

    registry = {"tiny_direction": {**TEST_REGISTRY["tiny_direction"], "sha256": None}}

    with pytest.raises(DownloadError, match="comes without a hash"):
        resolve("tiny_direction", progress=False, registry=registry)
    assert hub.gets() == []


def test_offline_with_a_corrupt_copy_keeps_it_and_says_so(hub, models, monkeypatch):
    models.mkdir(parents=True)
    (models / "tiny_generator.pt").write_bytes(GENERATOR_BYTES[:10])
    _set_offline(monkeypatch, True)

    with pytest.raises(downloads.UnusableFileError, match="left untouched") as error:
        resolve("tiny_generator", progress=False, registry=TEST_REGISTRY)
    assert "truncated" in str(error.value)
    assert (models / "tiny_generator.pt").read_bytes() == GENERATOR_BYTES[:10]


def test_offline_and_missing_says_what_to_download_and_where(hub, models, monkeypatch):
    _set_offline(monkeypatch, True)

    with pytest.raises(WeightsUnavailableError) as error:
        resolve("tiny_generator", progress=False, registry=TEST_REGISTRY)

    message = str(error.value)
    assert isinstance(error.value, WeightsError)
    assert "tiny_generator.pt" in message
    assert "test-org/tiny-weights" in message and "model repo" in message
    assert f"{hub.endpoint}/test-org/tiny-weights/resolve/main/nested/dir/tiny_generator.pt" in message
    assert str(models / "tiny_generator.pt") in message
    assert "HF_HUB_OFFLINE" in message
    assert hub.requests == []


def test_offline_message_for_a_real_space_entry_gives_the_public_url(models, monkeypatch):
    _point_hub_at(monkeypatch, "https://huggingface.co")
    _set_offline(monkeypatch, True)

    with pytest.raises(WeightsUnavailableError) as error:
        resolve("interfacegan_pose", kind="direction")

    message = str(error.value)
    assert ("https://huggingface.co/spaces/akhaliq/JoJoGAN/resolve/main/"
            "e4e/editings/interfacegan_directions/pose.pt") in message
    assert "space repo 'akhaliq/JoJoGAN'" in message
    assert str(models / "pose.pt") in message


def _dropping_endpoint(stack: contextlib.ExitStack) -> str:
    """A loopback address that never answers a connection: its listening queue is full and nobody accepts, so new
    connection attempts are dropped, as on a network that drops packets (Linux)."""
    listener = stack.enter_context(socket.socket())
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    for _ in range(4):
        filler = stack.enter_context(socket.socket())
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
    return f"http://127.0.0.1:{listener.getsockname()[1]}"


@pytest.mark.parametrize("network", ["refused", "dropped"])
def test_without_network_the_error_for_a_registry_file_arrives_within_2_s(models, monkeypatch, network):
    """The issue asks for this bound (it was about 25 s of retries). No network is simulated on loopback, with
    HF_HUB_OFFLINE unset; the real registry's largest file, nothing cached.

    Where packets are dropped, huggingface_hub itself (2.x, telemetry on) first spends up to 3 s once per process
    fetching its agent-harness list for the user agent; telemetry is off here so the bound measures this pack's
    probe (HUB_CONNECT_TIMEOUT_S). Refused connections fail at once either way."""
    monkeypatch.delenv("HF_HUB_ETAG_TIMEOUT", raising=False)
    if network == "dropped":
        monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_TELEMETRY", True)
    with contextlib.ExitStack() as stack:
        _point_hub_at(monkeypatch, _closed_port_endpoint() if network == "refused" else _dropping_endpoint(stack))

        started = time.monotonic()
        with pytest.raises(WeightsUnavailableError) as error:
            resolve("hyperstyle_ffhq", kind="hyperstyle", progress=False)
        elapsed = time.monotonic() - started

    message = str(error.value)
    assert "could not be reached" in message
    assert "hyperstyle_ffhq.pt" in message and str(models) in message
    assert elapsed <= 2.0, f"the error took {elapsed:.1f} s"


def test_three_threads_fetching_one_file_share_one_download(hub, models):
    """A ComfyUI server runs prompts and API calls in several threads of one process."""
    from concurrent.futures import ThreadPoolExecutor

    hub.body_seconds = 0.5
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: resolve("tiny_generator", progress=False, registry=TEST_REGISTRY), range(3)))

    assert paths == [models / "tiny_generator.pt"] * 3
    assert hub.gets() == [GENERATOR_URL]


_FETCH_IN_A_PROCESS = """
import importlib.util, json, os, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("hs_downloads", sys.argv[1])  # without the package (and torch)
downloads = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = downloads
spec.loader.exec_module(downloads)
barrier, count = Path(sys.argv[2]), int(sys.argv[3])
(barrier / f"{os.getpid()}.ready").touch()
deadline = time.monotonic() + 30
while len(list(barrier.glob("*.ready"))) < count and time.monotonic() < deadline:
    time.sleep(0.01)
print(downloads.resolve("tiny_generator", progress=False, registry=json.loads(sys.argv[4])))
"""


def test_three_processes_fetching_one_file_all_succeed_with_one_download(hub, models, tmp_path):
    hub.body_seconds = 1.5  # a download long enough for the three processes to overlap
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE")}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf_home"), HYPERSTYLE_MODELS_DIR=str(models),
               HF_HUB_DISABLE_TELEMETRY="1")
    command = [sys.executable, "-c", _FETCH_IN_A_PROCESS, str(Path(downloads.__file__)), str(barrier), "3",
               json.dumps(TEST_REGISTRY)]
    processes = [subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(3)]
    results = [process.communicate(timeout=SERVER_LIFETIME_S) for process in processes]

    for process, (out, err) in zip(processes, results):
        assert process.returncode == 0, err
        assert out.strip() == str(models / "tiny_generator.pt")
    assert hub.gets() == [GENERATOR_URL], "exactly one download"
    assert (models / "tiny_generator.pt").read_bytes() == GENERATOR_BYTES
    assert _visible_files(models) == ["tiny_generator.pt"]


def test_unknown_name_lists_the_known_names(models):
    with pytest.raises(UnknownModelError) as error:
        resolve("no_such_model", registry=TEST_REGISTRY)

    assert "no_such_model" in str(error.value)
    assert "tiny_direction" in str(error.value) and "tiny_generator" in str(error.value)


def test_kind_mismatch_is_refused_before_any_download(hub):
    with pytest.raises(KindMismatchError) as error:
        resolve("tiny_direction", kind="generator", registry=TEST_REGISTRY)

    assert "direction" in str(error.value) and "generator" in str(error.value)
    assert "tiny_generator" in str(error.value), "the message lists models of the kind that is needed"
    assert hub.requests == []


def test_unknown_kind_is_refused(models):
    with pytest.raises(WeightsError, match="unknown model kind"):
        resolve("tiny_generator", kind="stylegan", registry=TEST_REGISTRY)


def test_paths_and_user_files_are_used_as_they_are(hub, models, tmp_path):
    elsewhere = tmp_path / "elsewhere.pt"
    elsewhere.write_bytes(b"mine")
    models.mkdir(parents=True)
    (models / "my_generator.pt").write_bytes(b"also mine")

    assert resolve(str(elsewhere), kind="generator", registry=TEST_REGISTRY) == elsewhere.resolve()
    assert resolve("my_generator.pt", kind="generator", registry=TEST_REGISTRY) == models / "my_generator.pt"
    assert hub.requests == []
    with pytest.raises(WeightsError, match="is a folder"):
        resolve(str(tmp_path), registry=TEST_REGISTRY)
    with pytest.raises(WeightsError, match="expected a weights file path or model name"):
        resolve("  ", registry=TEST_REGISTRY)


def test_list_local_models_offers_registry_names_then_user_files(hub, models):
    resolve("tiny_generator", progress=False, registry=TEST_REGISTRY)  # a downloaded registry file
    (models / "sub").mkdir()
    (models / "sub" / "my_generator.safetensors").write_bytes(b"mine")
    (models / "notes.txt").write_text("not weights")

    assert list_local_models("generator", registry=TEST_REGISTRY) == ["tiny_generator", "sub/my_generator.safetensors"]
    assert list_local_models(registry=TEST_REGISTRY) == ["tiny_generator", "tiny_direction",
                                                         "sub/my_generator.safetensors"]


def test_real_registry_has_the_released_weights():
    registry = downloads.load_registry(REPO_ROOT / "weights" / "registry.json")

    assert set(registry) == {
        "hyperstyle_ffhq", "faces_w_encoder", "e4e_ffhq_encode", "stylegan2-ffhq-config-f", "retinaface_resnet50",
        "retinaface_mobilenet0.25", "stylegan_nada_pixar", "stylegan_nada_sketch", "stylegan_nada_disney_princess",
        "interfacegan_age", "interfacegan_smile", "interfacegan_pose", "ganspace_ffhq_pca", "dlib_shape_predictor_68",
        "sfe_editor_light", "sfe_inverter_light", "interfacegan_rotation", "sfe_fs_glasses", "sfe_fs_smiling",
        "sfe_fs_makeup"}
    hyperstyle = registry["hyperstyle_ffhq"]
    assert (hyperstyle.repo_id, hyperstyle.filename, hyperstyle.repo_type, hyperstyle.size, hyperstyle.kind) == (
        "trysem/DualStyleGANplus", "models/hyperstyle/hyperstyle_ffhq.pt", "model", 1_440_969_951, "hyperstyle")
    assert downloads.digest_matches("9d4c6277" + "0" * 52 + "c364", hyperstyle.sha256)
    assert not downloads.digest_matches("9d4c6277" + "0" * 52 + "c365", hyperstyle.sha256)
    pca = registry["ganspace_ffhq_pca"]
    assert (pca.repo_id, pca.filename, pca.repo_type, pca.size) == (
        "akhaliq/JoJoGAN", "e4e/editings/ganspace_pca/ffhq_pca.pt", "space", 167_562)
    assert registry["retinaface_resnet50"].repo_id == "camenduru/facexlib"
    assert registry["retinaface_mobilenet0.25"].repo_id == "leonelhs/facexlib"
    editor = registry["sfe_editor_light"]  # the authors' model repo, its Git LFS pointers' size and sha256
    assert (editor.repo_id, editor.filename, editor.repo_type, editor.kind, editor.size) == (
        "AIRI-Institute/StyleFeatureEditor", "pretrained_models/sfe_editor_light.pt", "model", "sfe_editor", 649_325_957)
    assert editor.sha256.startswith("ced3e798") and editor.sha256.endswith("11ea")
    inverter = registry["sfe_inverter_light"]
    assert (inverter.kind, inverter.size) == ("sfe_inverter", 552_658_429)
    assert inverter.sha256.startswith("ebaeeef8") and inverter.sha256.endswith("517a")
    glasses = registry["sfe_fs_glasses"]  # the official repository's file: its size and sha256
    assert (glasses.filename, glasses.size, glasses.kind) == ("editings/bound/Eyeglasses_boundary.npy", 36_992,
                                                              "direction")
    assert glasses.sha256.startswith("227c8eda") and registry["interfacegan_rotation"].size == 2_808


@pytest.mark.parametrize("field, value, complaint", [
    ("kind", "decoder", "kind must be one of"),
    ("repo_type", "dataset", "repo_type must be one of"),
    ("sha256", "not-hex", "sha256 must be"),
    ("size", -3, "size must be"),
])
def test_malformed_registry_entries_are_named(tmp_path, field, value, complaint):
    broken = json.loads(json.dumps(TEST_REGISTRY))
    broken["tiny_generator"][field] = value
    registry_file = tmp_path / "registry.json"
    registry_file.write_text(json.dumps(broken))

    with pytest.raises(RegistryError, match=complaint) as error:
        downloads.load_registry(registry_file)
    assert "tiny_generator" in str(error.value)


def test_inside_comfyui_the_model_folder_type_is_registered_keeping_user_folders(tmp_path, monkeypatch):
    """A stand-in for ComfyUI's folder_paths (v0.3.64 API) with a folder the user added in extra_model_paths.yaml."""
    user_folder = str(tmp_path / "shared_models" / "hyperstyle")
    fake = types.ModuleType("folder_paths")
    fake.models_dir = str(tmp_path / "ComfyUI" / "models")
    fake.folder_names_and_paths = {"hyperstyle": ([user_folder], set())}

    def add_model_folder_path(folder_name, full_folder_path, is_default=False):
        paths, _ = fake.folder_names_and_paths.setdefault(folder_name, ([], set()))
        if full_folder_path not in paths:
            paths.insert(0, full_folder_path) if is_default else paths.append(full_folder_path)

    fake.add_model_folder_path = add_model_folder_path
    fake.get_folder_paths = lambda name: fake.folder_names_and_paths[name][0][:]
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    monkeypatch.setenv("HYPERSTYLE_MODELS_DIR", str(tmp_path / "ignored inside ComfyUI"))

    assert downloads.models_dir() == Path(user_folder)
    downloads.models_dir()  # registering twice changes nothing
    paths, extensions = fake.folder_names_and_paths["hyperstyle"]
    assert paths == [user_folder, str(tmp_path / "ComfyUI" / "models" / "hyperstyle")]
    assert {".pt", ".pth", ".safetensors"} <= extensions
