"""Registry, models folder and Hub downloads, against a loopback HTTP server standing in for the Hub."""
import hashlib
import json
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub.constants as hf_constants
import pytest

from hyperstyle_nodes import downloads
from hyperstyle_nodes.downloads import (DownloadError, KindMismatchError, RegistryError, UnknownModelError,
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
    """Serves HEAD/GET /[spaces/]{repo_id}/resolve/main/{filename} like the Hub, counting requests."""

    def __init__(self):
        self.files = {
            "/test-org/tiny-weights/resolve/main/nested/dir/tiny_generator.pt": GENERATOR_BYTES,
            "/spaces/test-org/tiny-space/resolve/main/tiny_direction.pt": DIRECTION_BYTES,
        }
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10

            def _answer(self, with_body: bool):
                hub.requests.append((self.command, self.path))
                data = hub.files.get(self.path)
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{_sha(data)}"')
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if with_body:
                    self.wfile.write(data)

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


def test_first_download_lands_flat_in_the_models_folder(hub, models):
    path = resolve("tiny_generator", kind="generator", progress=False, registry=TEST_REGISTRY)

    assert path == models / "tiny_generator.pt"
    assert path.read_bytes() == GENERATOR_BYTES
    assert hub.gets() == ["/test-org/tiny-weights/resolve/main/nested/dir/tiny_generator.pt"]
    assert not (models / "nested").exists(), "the repo's sub-folders are not kept in the models folder"


def test_space_download_uses_the_spaces_url(hub, models):
    path = resolve("tiny_direction", progress=False, registry=TEST_REGISTRY)

    assert path.read_bytes() == DIRECTION_BYTES
    assert hub.gets() == ["/spaces/test-org/tiny-space/resolve/main/tiny_direction.pt"]


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


def test_truncated_file_is_fetched_again(hub, models):
    models.mkdir(parents=True)
    (models / "tiny_generator.pt").write_bytes(GENERATOR_BYTES[:-100])

    path = resolve("tiny_generator", progress=False, registry=TEST_REGISTRY)

    assert path.read_bytes() == GENERATOR_BYTES
    assert len(hub.gets()) == 1


def test_corrupt_file_of_the_right_size_is_fetched_again(hub, models):
    models.mkdir(parents=True)
    (models / "tiny_direction.pt").write_bytes(b"x" * len(DIRECTION_BYTES))

    path = resolve("tiny_direction", progress=False, registry=TEST_REGISTRY)

    assert path.read_bytes() == DIRECTION_BYTES
    assert len(hub.gets()) == 1


def test_a_download_corrupted_later_is_fetched_again(hub, models):
    """huggingface_hub keeps download metadata; a damaged file must still be fetched, not reused."""
    path = resolve("tiny_direction", progress=False, registry=TEST_REGISTRY)
    path.write_bytes(b"z" * len(DIRECTION_BYTES))

    assert resolve("tiny_direction", progress=False, registry=TEST_REGISTRY).read_bytes() == DIRECTION_BYTES
    assert len(hub.gets()) == 2


def test_offline_with_a_corrupt_copy_keeps_it_and_says_so(hub, models, monkeypatch):
    models.mkdir(parents=True)
    (models / "tiny_generator.pt").write_bytes(GENERATOR_BYTES[:10])
    _set_offline(monkeypatch, True)

    with pytest.raises(WeightsUnavailableError, match="unusable copy") as error:
        resolve("tiny_generator", progress=False, registry=TEST_REGISTRY)
    assert "truncated" in str(error.value)
    assert (models / "tiny_generator.pt").exists()


def test_download_that_stays_corrupt_fails_clearly_after_two_tries(hub, models):
    for url_path in hub.files:
        if url_path.endswith("tiny_direction.pt"):
            hub.files[url_path] = b"y" * len(DIRECTION_BYTES)

    with pytest.raises(DownloadError) as error:
        resolve("tiny_direction", progress=False, registry=TEST_REGISTRY)

    message = str(error.value)
    assert "sha256" in message and "tiny_direction" in message
    assert "/spaces/test-org/tiny-space/resolve/main/tiny_direction.pt" in message
    assert len(hub.gets()) == downloads.MAX_DOWNLOADS_PER_FILE == 2
    assert not (models / "tiny_direction.pt").exists(), "a bad file is not left behind"


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


def test_unreachable_hub_is_reported_like_offline(models, monkeypatch):
    import huggingface_hub.utils._http as hf_http

    closed = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = closed.server_address[1]
    closed.server_close()  # nothing listens on this port any more: connections are refused
    _point_hub_at(monkeypatch, f"http://127.0.0.1:{port}")
    monkeypatch.setattr(hf_http.time, "sleep", lambda seconds: None)  # skip huggingface_hub's retry back-off

    with pytest.raises(WeightsUnavailableError) as error:
        resolve("tiny_generator", progress=False, registry=TEST_REGISTRY)

    message = str(error.value)
    assert "could not be reached" in message
    assert "tiny_generator.pt" in message and str(models) in message


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
        "interfacegan_age", "interfacegan_smile", "interfacegan_pose", "ganspace_ffhq_pca", "dlib_shape_predictor_68"}
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
