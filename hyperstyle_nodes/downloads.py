"""Where model weights live, and fetching the released ones from the Hugging Face Hub.

`resolve(name_or_path)` turns what a user typed or picked into a local file:

1. an existing path is used as it is;
2. a file name found in the models folder(s) is used as it is;
3. a name from the registry (weights/registry.json) gives the copy in the models folder(s) if its size and hash
   check out, else a fresh download from the Hub (checked the same way).

The models folder is `<ComfyUI>/models/hyperstyle` (folder type "hyperstyle") inside ComfyUI, else
`$HYPERSTYLE_MODELS_DIR`, else a per-user cache folder.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

log = logging.getLogger("hyperstyle_nodes")

FOLDER_TYPE = "hyperstyle"
MODEL_EXTENSIONS = frozenset({".pt", ".pth", ".ckpt", ".safetensors", ".bin", ".pkl"})
KINDS = ("hyperstyle", "w_encoder", "e4e", "generator", "face_detector", "direction", "ganspace", "landmarks")
REPO_TYPES = ("model", "space")
REGISTRY_FIELDS = ("repo_id", "filename", "repo_type", "size", "sha256", "kind", "licence", "description")
# weights/registry.json in a checkout (ComfyUI custom_nodes, editable installs); a wheel ships the same file as
# package data (pyproject maps weights/ to hyperstyle_nodes/registry/).
_CHECKOUT_REGISTRY = Path(__file__).resolve().parents[1] / "weights" / "registry.json"
_PACKAGED_REGISTRY = Path(__file__).resolve().parent / "registry" / "registry.json"
DEFAULT_REGISTRY_PATH = _CHECKOUT_REGISTRY if _CHECKOUT_REGISTRY.is_file() else _PACKAGED_REGISTRY
# Remembers which files were already hashed, so multi-GB checkpoints are hashed once, not on every run.
VERIFIED_SIDECAR = ".hyperstyle_verified.json"
MAX_DOWNLOADS_PER_FILE = 2  # a bad download is fetched again once, then we give up with an error


class WeightsError(RuntimeError):
    """Any problem finding, downloading or checking model weights."""


class RegistryError(WeightsError):
    """weights/registry.json (or an override) is missing or malformed."""


class UnknownModelError(WeightsError):
    """Neither a file, nor a file in the models folder, nor a registry name."""


class KindMismatchError(WeightsError):
    """A registry name of one kind was given where another kind is needed."""


class WeightsUnavailableError(WeightsError):
    """The file is missing and cannot be downloaded (offline or no connection)."""


class DownloadError(WeightsError):
    """The Hub refused the download, or the downloaded file failed its checks."""


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    repo_id: str
    filename: str
    repo_type: str
    size: int | None
    sha256: str | None
    kind: str
    licence: str
    description: str

    @property
    def local_name(self) -> str:
        """Name of the file in the models folder: the last part of its path in the repo."""
        return PurePosixPath(self.filename).name

    @property
    def url(self) -> str:
        """Where to download the file by hand (the configured Hub endpoint; spaces get their /spaces/ prefix)."""
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, self.filename, repo_type=self.repo_type)


# ---------------------------------------------------------------- registry


def registry_path() -> Path:
    """The registry file: $HYPERSTYLE_REGISTRY if set, else weights/registry.json beside the package."""
    override = os.environ.get("HYPERSTYLE_REGISTRY")
    return Path(override).expanduser() if override else DEFAULT_REGISTRY_PATH


_registry_cache: dict[tuple[str, int], dict[str, RegistryEntry]] = {}


def load_registry(path: str | os.PathLike | None = None) -> dict[str, RegistryEntry]:
    """Read and check a registry file (default: `registry_path()`)."""
    path = Path(path) if path is not None else registry_path()
    try:
        stamp = (str(path), path.stat().st_mtime_ns)
    except OSError as exc:
        raise RegistryError(f"weights registry not found at {path}: {exc}. Reinstall hyperstyle-nodes or set "
                            "HYPERSTYLE_REGISTRY to a registry.json.") from exc
    if stamp not in _registry_cache:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RegistryError(f"cannot read the weights registry {path}: {exc}") from exc
        _registry_cache[stamp] = parse_registry(raw, source=str(path))
    return _registry_cache[stamp]


def parse_registry(raw: Mapping, source: str = "registry") -> dict[str, RegistryEntry]:
    """Check a {name: {field: value}} mapping and turn it into RegistryEntry objects."""
    if not isinstance(raw, Mapping):
        raise RegistryError(f"{source}: expected a JSON object mapping names to entries")
    entries: dict[str, RegistryEntry] = {}
    owner_of_local_name: dict[str, str] = {}
    for name, fields in raw.items():
        if isinstance(fields, RegistryEntry):
            entry = fields
        else:
            entry = _parse_entry(name, fields, source)
        other = owner_of_local_name.setdefault(entry.local_name, name)
        if other != name:
            raise RegistryError(f"{source}: entries '{other}' and '{name}' would both be saved as "
                                f"'{entry.local_name}' in the models folder")
        entries[name] = entry
    return entries


def _parse_entry(name: str, fields, source: str) -> RegistryEntry:
    where = f"{source}, entry '{name}'"
    if not isinstance(fields, Mapping):
        raise RegistryError(f"{where}: expected an object with the fields {', '.join(REGISTRY_FIELDS)}")
    missing = [f for f in REGISTRY_FIELDS if f not in fields]
    if missing:
        raise RegistryError(f"{where}: missing field(s) {', '.join(missing)}")
    for text_field in ("repo_id", "filename", "licence", "description"):
        if not isinstance(fields[text_field], str) or not fields[text_field]:
            raise RegistryError(f"{where}: '{text_field}' must be a non-empty string")
    if fields["repo_type"] not in REPO_TYPES:
        raise RegistryError(f"{where}: repo_type must be one of {REPO_TYPES}, not {fields['repo_type']!r}")
    if fields["kind"] not in KINDS:
        raise RegistryError(f"{where}: kind must be one of {KINDS}, not {fields['kind']!r}")
    size = fields["size"]
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise RegistryError(f"{where}: size must be a positive whole number of bytes or null, not {size!r}")
    sha256 = fields["sha256"]
    if sha256 is not None:
        sha256 = sha256.strip().lower()
        if not _is_digest_spec(sha256):
            raise RegistryError(f"{where}: sha256 must be 64 hex digits, 'prefix…suffix' in hex, or null; "
                                f"got {fields['sha256']!r}")
    return RegistryEntry(name=name, repo_id=fields["repo_id"], filename=fields["filename"],
                         repo_type=fields["repo_type"], size=size, sha256=sha256, kind=fields["kind"],
                         licence=fields["licence"], description=fields["description"])


def _as_registry(registry) -> dict[str, RegistryEntry]:
    if registry is None:
        return load_registry()
    if isinstance(registry, (str, os.PathLike)):
        return load_registry(registry)
    return parse_registry(registry, source="registry override")


# ---------------------------------------------------------------- hashes


def _split_digest_spec(spec: str) -> tuple[str, str]:
    """'9d4c6277…c364' -> ('9d4c6277', 'c364'); a full digest -> (digest, '')."""
    for ellipsis in ("…", "..."):
        if ellipsis in spec:
            prefix, _, suffix = spec.partition(ellipsis)
            return prefix, suffix
    return spec, ""


def _is_digest_spec(spec: str) -> bool:
    prefix, suffix = _split_digest_spec(spec)
    hex_digits = set("0123456789abcdef")
    if not set(prefix + suffix) <= hex_digits:
        return False
    if suffix == "" and spec == prefix:
        return len(prefix) == 64
    return 0 < len(prefix) + len(suffix) < 64


def digest_matches(digest: str, spec: str) -> bool:
    """Does a full sha256 hex digest match a registry spec (full digest or 'prefix…suffix')?"""
    digest, spec = digest.lower(), spec.lower()
    prefix, suffix = _split_digest_spec(spec)
    if spec == prefix:
        return digest == spec
    return digest.startswith(prefix) and digest.endswith(suffix)


def sha256_of_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(8 * 1024 * 1024), b""):
            sha.update(chunk)
    return sha.hexdigest()


class _VerifiedDigests:
    """Digests of files already hashed, valid while a file keeps its size and mtime.

    Kept in memory and in a small sidecar JSON next to the files, so a multi-GB checkpoint is hashed once per
    download, not once per run or per process.
    """

    def __init__(self):
        self._memory: dict[str, tuple[int, int, str]] = {}
        self._lock = threading.Lock()

    def clear_memory(self) -> None:
        with self._lock:
            self._memory.clear()

    def lookup(self, path: Path, stat: os.stat_result) -> str | None:
        with self._lock:
            remembered = self._memory.get(str(path))
        if remembered is None:
            record = self._read_sidecar(path.parent).get(path.name)
            if isinstance(record, dict):
                remembered = (record.get("size"), record.get("mtime_ns"), record.get("sha256"))
        if remembered and remembered[:2] == (stat.st_size, stat.st_mtime_ns) and isinstance(remembered[2], str):
            return remembered[2]
        return None

    def remember(self, path: Path, stat: os.stat_result, digest: str) -> None:
        with self._lock:
            self._memory[str(path)] = (stat.st_size, stat.st_mtime_ns, digest)
            sidecar = self._read_sidecar(path.parent)
            sidecar[path.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
            self._write_sidecar(path.parent, sidecar)

    @staticmethod
    def _read_sidecar(folder: Path) -> dict:
        try:
            data = json.loads((folder / VERIFIED_SIDECAR).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    @staticmethod
    def _write_sidecar(folder: Path, data: dict) -> None:
        target = folder / VERIFIED_SIDECAR
        temporary = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        try:
            temporary.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
            os.replace(temporary, target)
        except OSError as exc:  # a read-only folder only costs a re-hash in the next process
            log.debug("HyperStyle: cannot write %s: %s", target, exc)
            with contextlib.suppress(OSError):
                temporary.unlink()


_verified_digests = _VerifiedDigests()


def check_file(path: Path, entry: RegistryEntry) -> str | None:
    """None if `path` matches the entry's size and hash (where known), else what is wrong with it."""
    stat = path.stat()
    if entry.size is not None and stat.st_size != entry.size:
        return f"it has {stat.st_size:,} bytes instead of {entry.size:,} (truncated or incomplete download)"
    if stat.st_size == 0:
        return "it is empty"
    if entry.sha256 is None:
        return None
    digest = _verified_digests.lookup(path, stat)
    if digest is None:
        log.info("HyperStyle: checking the sha256 of %s", path)
        digest = sha256_of_file(path)
        _verified_digests.remember(path, stat, digest)
    if not digest_matches(digest, entry.sha256):
        return f"its sha256 {digest} does not match the expected {entry.sha256} (corrupt or a different file)"
    return None


# ---------------------------------------------------------------- models folders


def _comfy_folder_paths():
    """ComfyUI's folder_paths module, or None outside ComfyUI (it is importable only there)."""
    try:
        import folder_paths
    except ImportError:
        return None
    needed = ("folder_names_and_paths", "add_model_folder_path", "get_folder_paths", "models_dir")
    return folder_paths if all(hasattr(folder_paths, name) for name in needed) else None


def _register_comfy_folder(folder_paths) -> None:
    """Add the "hyperstyle" model folder type, keeping folders the user added in extra_model_paths.yaml."""
    default_folder = os.path.join(folder_paths.models_dir, FOLDER_TYPE)
    known = folder_paths.folder_names_and_paths.get(FOLDER_TYPE)
    if known is None or default_folder not in known[0]:
        folder_paths.add_model_folder_path(FOLDER_TYPE, default_folder)  # appended after the user's folders
    folders, extensions = folder_paths.folder_names_and_paths[FOLDER_TYPE]
    if not MODEL_EXTENSIONS <= set(extensions):
        # A yaml-made entry has an empty extension set (any file); list only weight files in the dropdowns.
        folder_paths.folder_names_and_paths[FOLDER_TYPE] = (folders, set(extensions) | MODEL_EXTENSIONS)


def _user_cache_dir() -> Path:
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def model_folders() -> list[Path]:
    """Every folder searched for weights; downloads go to the first."""
    folder_paths = _comfy_folder_paths()
    if folder_paths is not None:
        _register_comfy_folder(folder_paths)
        return [Path(folder) for folder in folder_paths.get_folder_paths(FOLDER_TYPE)]
    override = os.environ.get("HYPERSTYLE_MODELS_DIR")
    if override:
        return [Path(override).expanduser()]
    return [_user_cache_dir() / "hyperstyle_nodes"]


def models_dir() -> Path:
    """The folder downloads go to (created if missing)."""
    folder = model_folders()[0]
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _weight_files(folder: Path) -> list[str]:
    """Weight files under `folder` as relative POSIX paths, skipping hidden folders (download metadata)."""
    found = []
    for root, subfolders, files in os.walk(folder, followlinks=True):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in files:
            if Path(name).suffix.lower() in MODEL_EXTENSIONS:
                found.append(Path(root, name).relative_to(folder).as_posix())
    return found


def _check_kind(kind: str | None) -> None:
    if kind is not None and kind not in KINDS:
        raise WeightsError(f"unknown model kind {kind!r}; expected one of {', '.join(KINDS)}")


def list_local_models(kind: str | None = None, registry=None) -> list[str]:
    """Choices for a node dropdown: registry names (of `kind`, if given), then the user's own weight files.

    Files that are downloaded registry entries are shown only under their registry name. The kind of a user's
    own file cannot be known, so those are listed for every kind.
    """
    _check_kind(kind)
    entries = _as_registry(registry)
    names = [name for name, entry in entries.items() if kind is None or entry.kind == kind]
    registry_files = {entry.local_name for entry in entries.values()}
    user_files = {path for folder in model_folders() for path in _weight_files(folder)} - registry_files
    return names + sorted(user_files)


# ---------------------------------------------------------------- resolve


def resolve(name_or_path: str | os.PathLike, kind: str | None = None, progress: bool = True,
            registry=None) -> Path:
    """A local weights file for a path, a file name in the models folder(s), or a registry name.

    `kind` (one of KINDS) rejects a registry name of another kind. `registry` overrides the registry (a mapping
    or a path to a JSON file), mainly for tests. Raises a WeightsError subclass with what to do when it fails.
    """
    _check_kind(kind)
    if not isinstance(name_or_path, (str, os.PathLike)) or not os.fspath(name_or_path).strip():
        raise WeightsError(f"expected a weights file path or model name, got {name_or_path!r}")
    text = os.fspath(name_or_path).strip()

    given_path = Path(text).expanduser()
    if given_path.is_file():
        return given_path.resolve()
    if given_path.is_dir():
        raise WeightsError(f"{given_path} is a folder; give a weights file inside it or a model name")

    folders = model_folders()
    for folder in folders:
        candidate = folder / text
        if candidate.is_file():
            return candidate

    entries = _as_registry(registry)
    entry = entries.get(text) or next((e for e in entries.values() if e.local_name == text), None)
    if entry is None:
        raise UnknownModelError(
            f"'{text}' is not a file, not in the models folder ({', '.join(map(str, folders))}), and not a known "
            f"model name. Known names: {', '.join(sorted(entries))}.")
    if kind is not None and entry.kind != kind:
        expected = [name for name, e in entries.items() if e.kind == kind]
        raise KindMismatchError(
            f"'{entry.name}' is a {entry.kind} model, but a {kind} model is needed here. "
            f"{kind} models: {', '.join(expected) or 'none in the registry'}.")
    return _fetch_checked(entry, folders, progress)


def _fetch_checked(entry: RegistryEntry, folders: list[Path], progress: bool) -> Path:
    """The entry's file from the models folder(s) if it checks out, else downloaded (and checked)."""
    situation = "is not downloaded yet"
    for folder in folders:
        candidate = folder / entry.local_name
        if candidate.is_file():
            problem = check_file(candidate, entry)
            if problem is None:
                return candidate
            situation = f"has an unusable copy at {candidate} ({problem})"
            log.warning("HyperStyle: %s is unusable: %s", candidate, problem)

    target_folder = folders[0]
    offline = _offline_reason()
    if offline:  # checked before anything is deleted
        raise WeightsUnavailableError(f"'{entry.name}' {situation} and cannot be downloaded: {offline}. "
                                      + _manual_download_hint(entry, target_folder) + ".")
    target = target_folder / entry.local_name
    problem = None
    for _ in range(MAX_DOWNLOADS_PER_FILE):
        with contextlib.suppress(FileNotFoundError):
            target.unlink()  # a truncated or corrupt copy; downloading over it could resume a bad file
        _download(entry, target_folder, target, progress, situation)
        problem = check_file(target, entry)
        if problem is None:
            return target
        log.warning("HyperStyle: the download of %s is unusable: %s", entry.local_name, problem)
    with contextlib.suppress(FileNotFoundError):
        target.unlink()
    raise DownloadError(
        f"'{entry.name}' failed its check after {MAX_DOWNLOADS_PER_FILE} downloads: {problem}. "
        + _manual_download_hint(entry, target_folder) + ".")


def _manual_download_hint(entry: RegistryEntry, folder: Path) -> str:
    return (f"To install it by hand, download {entry.url} (file '{entry.filename}' of the Hugging Face "
            f"{entry.repo_type} repo '{entry.repo_id}') and save it as {folder / entry.local_name}")


def _offline_reason() -> str | None:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return "HF_HUB_OFFLINE is set"
    from huggingface_hub import constants

    if getattr(constants, "HF_HUB_OFFLINE", False):
        return "Hugging Face Hub offline mode is on"
    return None


def _network_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions meaning 'could not reach the Hub', for whichever HTTP client this huggingface_hub uses."""
    from huggingface_hub.utils import LocalEntryNotFoundError

    types: list[type[BaseException]] = [ConnectionError, TimeoutError, LocalEntryNotFoundError]
    for module_name, class_name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                                    ("requests", "ConnectionError"), ("requests", "Timeout")):
        module = sys.modules.get(module_name)  # only clients already in use; importing others is pointless
        if module is not None and isinstance(getattr(module, class_name, None), type):
            types.append(getattr(module, class_name))
    return tuple(types)


@contextlib.contextmanager
def _hub_progress_bars(enabled: bool):
    if enabled:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    were_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not were_disabled:
            enable_progress_bars()


def _download(entry: RegistryEntry, folder: Path, target: Path, progress: bool, situation: str) -> None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import HfHubHTTPError

    folder.mkdir(parents=True, exist_ok=True)
    log.info("HyperStyle: downloading %s from %s (%s repo %s) into %s",
             entry.local_name, entry.url, entry.repo_type, entry.repo_id, folder)
    try:
        with _hub_progress_bars(progress):
            fetched = Path(hf_hub_download(repo_id=entry.repo_id, filename=entry.filename,
                                           repo_type=entry.repo_type, local_dir=folder))
    except _network_error_types() as exc:
        raise WeightsUnavailableError(f"'{entry.name}' {situation} and the Hub could not be reached "
                                      f"({exc.__class__.__name__}: {exc}). "
                                      + _manual_download_hint(entry, folder) + ".") from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:  # 404/401/5xx, size mismatch mid-transfer, disk full
        raise DownloadError(f"downloading '{entry.name}' failed ({exc.__class__.__name__}: {exc}). "
                            + _manual_download_hint(entry, folder) + ".") from exc
    if fetched.resolve() != target.resolve():
        # hf_hub_download mirrors the repo's sub-folders; keep one flat folder so manual installs match.
        os.replace(fetched, target)
        _remove_empty_folders(fetched.parent, stop_at=folder)


def _remove_empty_folders(folder: Path, stop_at: Path) -> None:
    stop_at = stop_at.resolve()
    folder = folder.resolve()
    while folder != stop_at and stop_at in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent
