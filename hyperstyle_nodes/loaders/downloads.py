"""Where model weights live, and fetching the released ones from the Hugging Face Hub.

`resolve(name_or_path)` turns what a user typed or picked into a local file:

1. an existing path is used as it is;
2. a file name found in the models folder(s) is used as it is;
3. a name from the registry (weights/registry.json) gives the copy in the models folder(s) if its size and full
   sha256 check out, else a fresh download from the Hub (checked the same way).

Registry files are checked by size and full sha256: the registry's where it has one, else the sha256 the Hub keeps
for the file (its LFS hash), fetched before the download and remembered beside the files for later offline checks.
A download goes to a folder of its own inside the models folder, under a cross-process lock, and replaces nothing:
it is moved into place only once checked, and only where no file is. A file the pack did not write is never
deleted or overwritten; one that fails its check is named in an error that says what to do.

The models folder is `<ComfyUI>/models/hyperstyle` (folder type "hyperstyle") inside ComfyUI, else
`$HYPERSTYLE_MODELS_DIR`, else a per-user cache folder.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

log = logging.getLogger("hyperstyle_nodes")

FOLDER_TYPE = "hyperstyle"
MODEL_EXTENSIONS = frozenset({".pt", ".pth", ".ckpt", ".safetensors", ".bin", ".pkl"})
KINDS = ("hyperstyle", "w_encoder", "e4e", "generator", "face_detector", "direction", "ganspace", "landmarks",
         "sfe_editor", "sfe_inverter")
REPO_TYPES = ("model", "space")
REGISTRY_FIELDS = ("repo_id", "filename", "repo_type", "size", "sha256", "kind", "licence", "description")
# weights/registry.json in a checkout (ComfyUI custom_nodes, editable installs); a wheel ships the same file as
# package data (pyproject maps weights/ to hyperstyle_nodes/registry/).
_CHECKOUT_REGISTRY = Path(__file__).resolve().parents[2] / "weights" / "registry.json"
_PACKAGED_REGISTRY = Path(__file__).resolve().parents[1] / "registry" / "registry.json"
DEFAULT_REGISTRY_PATH = _CHECKOUT_REGISTRY if _CHECKOUT_REGISTRY.is_file() else _PACKAGED_REGISTRY
# Remembers which files were already hashed, so multi-GB checkpoints are hashed once, not on every run.
VERIFIED_SIDECAR = ".hyperstyle_verified.json"
# In each download folder: lock files and downloads in progress (hidden, so never listed as models).
DOWNLOAD_STATE_FOLDER = ".hyperstyle_downloads"
MAX_DOWNLOADS_PER_FILE = 2  # a bad download is fetched again once, then we give up with an error
# Connecting to the Hub before a download: without a network (or where packets are dropped) the error comes within
# this. HF_HUB_ETAG_TIMEOUT, when set (e.g. for a slow satellite link), replaces it.
HUB_CONNECT_TIMEOUT_S = 1.2
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_GIT_SHA1_HEX = re.compile(r"[0-9a-f]{40}")


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


class UnusableFileError(WeightsError):
    """A file is in the models folder under a registry file's name but is not that file (it is left untouched)."""


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
    def full_sha256(self) -> str | None:
        """The registry's sha256 if it is a full digest (not the 'prefix…suffix' form)."""
        return self.sha256 if self.sha256 is not None and _SHA256_HEX.fullmatch(self.sha256) else None

    @property
    def hub_key(self) -> str:
        """Names the file on the Hub, for remembering the Hub's sha256 of it."""
        return f"{self.repo_type}:{self.repo_id}:{self.filename}"

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


def git_blob_sha1_of_file(path: Path) -> str:
    """The file's git object id: the hash the Hub gives for files kept in git itself rather than in LFS."""
    sha = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(8 * 1024 * 1024), b""):
            sha.update(chunk)
    return sha.hexdigest()


@contextlib.contextmanager
def _file_lock(path: Path, waiting_message: str | None = None):
    """A lock shared by every process and thread on this machine (the filelock package, as huggingface_hub uses).
    `waiting_message` is logged when another holder makes us wait."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if waiting_message:
            log.info("HyperStyle: %s", waiting_message)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


class _VerifiedDigests:
    """What was already hashed or learnt from the Hub, remembered beside the files.

    - the sha256 of each file, valid while the file keeps its size and mtime, so a multi-GB checkpoint is hashed
      once per download, not once per run or per process;
    - the Hub's sha256 of registry files the registry has no full hash for, so later checks, offline too, are
      full-hash checks.

    Kept in memory and in a small sidecar JSON in each models folder, written under a cross-process lock.
    """

    def __init__(self):
        self._memory: dict[str, tuple[int, int, str]] = {}
        self._hub_memory: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def clear_memory(self) -> None:
        with self._lock:
            self._memory.clear()
            self._hub_memory.clear()

    def lookup(self, path: Path, stat: os.stat_result) -> str | None:
        with self._lock:
            remembered = self._memory.get(str(path))
        if remembered is None:
            record = self._read_sidecar(path.parent)["files"].get(path.name)
            if isinstance(record, dict):
                remembered = (record.get("size"), record.get("mtime_ns"), record.get("sha256"))
        if remembered and remembered[:2] == (stat.st_size, stat.st_mtime_ns) and isinstance(remembered[2], str):
            return remembered[2]
        return None

    def remember(self, path: Path, stat: os.stat_result, digest: str) -> None:
        with self._lock:
            self._memory[str(path)] = (stat.st_size, stat.st_mtime_ns, digest)
        record = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        self._update_sidecar(path.parent, lambda sidecar: sidecar["files"].__setitem__(path.name, record))

    def hub_sha256(self, folder: Path, entry: RegistryEntry) -> str | None:
        """The Hub's sha256 of the entry's file, as learnt earlier for the copy in `folder`."""
        with self._lock:
            digest = self._hub_memory.get((str(folder), entry.hub_key))
        if digest is None:
            digest = self._read_sidecar(folder)["hub_sha256"].get(entry.hub_key)
        return digest if isinstance(digest, str) and _SHA256_HEX.fullmatch(digest) else None

    def remember_hub_sha256(self, folder: Path, entry: RegistryEntry, digest: str) -> None:
        with self._lock:
            self._hub_memory[(str(folder), entry.hub_key)] = digest
        self._update_sidecar(folder, lambda sidecar: sidecar["hub_sha256"].__setitem__(entry.hub_key, digest))

    @staticmethod
    def _read_sidecar(folder: Path) -> dict:
        try:
            data = json.loads((folder / VERIFIED_SIDECAR).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        data = data if isinstance(data, dict) else {}
        files = data.get("files")
        if not isinstance(files, dict):  # the first format: {file name: record} at the top level
            files = {name: record for name, record in data.items() if isinstance(record, dict)}
        hub = data.get("hub_sha256")
        return {"files": files, "hub_sha256": hub if isinstance(hub, dict) else {}}

    def _update_sidecar(self, folder: Path, change) -> None:
        target = folder / VERIFIED_SIDECAR
        temporary = target.with_name(f"{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            lock_folder = folder / DOWNLOAD_STATE_FOLDER
            lock_folder.mkdir(exist_ok=True)
            with _file_lock(lock_folder / "verified.lock"):  # read-change-write, so no process loses another's
                sidecar = self._read_sidecar(folder)
                change(sidecar)
                temporary.write_text(json.dumps(sidecar, indent=1, sort_keys=True), encoding="utf-8")
                os.replace(temporary, target)
        except OSError as exc:  # a read-only folder only costs a re-hash (or a Hub query) in the next process
            log.debug("HyperStyle: cannot write %s: %s", target, exc)
            with contextlib.suppress(OSError):
                temporary.unlink()


_verified_digests = _VerifiedDigests()


@dataclass(frozen=True)
class _Reference:
    """What a registry file must be, beyond the registry's own size and (partial) hash."""
    sha256: str | None  # full sha256: the registry's, or the Hub's (fetched now or remembered)
    source: str  # where the sha256 comes from, for messages
    git_sha1: str | None = None  # the Hub's git object id, for a file kept in git rather than LFS (no sha256 then)
    size: int | None = None  # the Hub's size, for entries whose registry size is unknown


def _known_reference(entry: RegistryEntry, folder: Path) -> _Reference | None:
    """The full sha256 known without asking the Hub: the registry's, else the Hub's remembered for `folder`."""
    if entry.full_sha256 is not None:
        return _Reference(entry.full_sha256, "the registry's")
    remembered = _verified_digests.hub_sha256(folder, entry)
    return _Reference(remembered, "the Hub's (remembered from an earlier check)") if remembered else None


def _sha256_remembered(path: Path, stat: os.stat_result) -> str:
    digest = _verified_digests.lookup(path, stat)
    if digest is None:
        log.info("HyperStyle: checking the sha256 of %s", path)
        digest = sha256_of_file(path)
        _verified_digests.remember(path, stat, digest)
    return digest


def _problem(path: Path, entry: RegistryEntry, reference: _Reference | None, sha256: str | None = None) -> str | None:
    """What is wrong with `path` as the entry's file, or None: size, emptiness, the registry's hash (full or
    'prefix…suffix') and the reference's full hash. `sha256` is the file's, when already computed."""
    stat = path.stat()
    size = entry.size if entry.size is not None else reference.size if reference is not None else None
    if size is not None and stat.st_size != size:
        return f"it has {stat.st_size:,} bytes instead of {size:,} (truncated, or a different file)"
    if stat.st_size == 0:
        return "it is empty"
    if entry.sha256 is None and reference is None:
        return None
    digest = sha256 or _sha256_remembered(path, stat)
    if entry.sha256 is not None and not digest_matches(digest, entry.sha256):
        return f"its sha256 {digest} does not match the registry's {entry.sha256} (corrupt, or a different file)"
    if reference is not None and reference.sha256 is not None and digest != reference.sha256:
        return (f"its sha256 {digest} differs from {reference.source} {reference.sha256} "
                "(corrupt, or a different file)")
    if reference is not None and reference.git_sha1 is not None:
        blob = git_blob_sha1_of_file(path)
        if blob != reference.git_sha1:
            return (f"its git object id {blob} differs from {reference.source} {reference.git_sha1} "
                    "(corrupt, or a different file)")
    return None


def check_file(path: Path, entry: RegistryEntry) -> str | None:
    """None if `path` is the entry's file by size and full sha256, else what is wrong with it (or that no full
    sha256 is known yet: the registry has none and the Hub's was never fetched for this folder). No network."""
    reference = _known_reference(entry, path.parent)
    problem = _problem(path, entry, reference)
    if problem is None and reference is None:
        return ("no full sha256 is known for it yet (the registry has none; the Hub's is fetched when it can be "
                "reached)")
    return problem


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
    """The entry's file from the models folder(s) if it checks out, else downloaded (and checked).

    A copy that fails its check is never deleted or replaced: the error names it and says what to do.
    """
    unusable: list[tuple[Path, str]] = []
    unchecked: list[Path] = []  # right size (and partial hash), but no full sha256 known yet
    for folder in folders:
        copy = folder / entry.local_name
        if not copy.is_file():
            continue
        reference = _known_reference(entry, folder)
        problem = _problem(copy, entry, reference)
        if problem is not None:
            unusable.append((copy, problem))
        elif reference is not None:
            return copy
        else:
            unchecked.append(copy)
    if unchecked:
        try:
            hub = _hub_file(entry, folders[0])
        except _HubUnreachable as exc:
            raise WeightsUnavailableError(
                f"'{entry.name}' has a copy at {unchecked[0]} of the right size, but its full sha256 cannot be "
                f"checked: the registry has none, and the Hub's cannot be fetched now ({exc}). Connect to the "
                "Internet once (only the hash is fetched, not the file), or, to use the file unchecked, rename it "
                f"(e.g. to '{_own_name_example(entry)}') and select that name.") from None
        for copy in unchecked:
            problem = _problem(copy, entry, hub.reference)
            if problem is None:
                _remember_hub_sha256(copy, entry, hub.reference)
                return copy
            unusable.append((copy, problem))
    if unusable:
        raise _unusable_error(entry, unusable)
    return _download_checked(entry, folders[0], progress)


def _own_name_example(entry: RegistryEntry) -> str:
    return f"my_{entry.local_name}"


def _use_the_hubs_file_anyway(entry: RegistryEntry) -> str:
    return (f"To use the Hub's file anyway, download {entry.url} by hand, save it under another name (e.g. "
            f"'{_own_name_example(entry)}') and select that name")


def _unusable_error(entry: RegistryEntry, unusable: list[tuple[Path, str]]) -> UnusableFileError:
    copies = "; ".join(f"{path}: {problem}" for path, problem in unusable)
    kept = "The file was" if len(unusable) == 1 else "The files were"
    return UnusableFileError(
        f"'{entry.name}' cannot use the file under its name ({copies}). {kept} left untouched. If it is a damaged "
        "copy, delete or move it and run again to download the checked file; if it is a model of your own, rename "
        f"it (e.g. to '{_own_name_example(entry)}') and select that name.")


def _remember_hub_sha256(path: Path, entry: RegistryEntry, reference: _Reference) -> None:
    """After `path` passed the Hub's check, keep its full sha256 so later checks (offline too) are full checks."""
    if entry.full_sha256 is None:
        digest = reference.sha256 or _sha256_remembered(path, path.stat())  # git-kept files: the checked bytes'
        _verified_digests.remember_hub_sha256(path.parent, entry, digest)


def _manual_download_hint(entry: RegistryEntry, folder: Path) -> str:
    hint = (f"To install it by hand, download {entry.url} (file '{entry.filename}' of the Hugging Face "
            f"{entry.repo_type} repo '{entry.repo_id}') and save it as {folder / entry.local_name}")
    if entry.full_sha256 is None:
        hint += (" (its full sha256 is then checked against the Hub's once the Hub can be reached; to use it "
                 f"offline right away, save it under another name, e.g. '{_own_name_example(entry)}', and select "
                 "that name)")
    return hint


def _offline_reason() -> str | None:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return "HF_HUB_OFFLINE is set"
    from huggingface_hub import constants

    if getattr(constants, "HF_HUB_OFFLINE", False):
        return "Hugging Face Hub offline mode is on"
    return None


class _HubUnreachable(Exception):
    """Offline mode, or no answer from the Hub; the text says which."""


@dataclass(frozen=True)
class _HubFile:
    commit: str | None  # the revision the hash belongs to; the download asks for exactly that one
    reference: _Reference


def _hub_file(entry: RegistryEntry, folder: Path) -> _HubFile:
    """The Hub's size and full hash of the entry's file (one HEAD request, no retries: offline fails at once).

    Refuses a file the Hub gives no hash for, and one that is not the file the registry describes.
    """
    offline = _offline_reason()
    if offline:
        raise _HubUnreachable(offline)
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import HfHubHTTPError

    url = hf_hub_url(entry.repo_id, entry.filename, repo_type=entry.repo_type)
    try:
        # get_hf_file_metadata does not retry (huggingface_hub's own downloads retry for ~25 s when offline)
        metadata = get_hf_file_metadata(url, timeout=_hub_probe_timeout())
    except _network_error_types() as exc:
        raise _HubUnreachable(f"the Hub could not be reached: {exc.__class__.__name__}: {exc}") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:  # 404/401/5xx
        raise DownloadError(f"the Hub refused '{entry.name}' ({exc.__class__.__name__}: {exc}). "
                            + _manual_download_hint(entry, folder) + ".") from exc
    etag = (metadata.etag or "").lower()
    # The Hub's ETag of a file is its sha256 when the file is in LFS (or Xet), its git object id when in git.
    sha256 = etag if _SHA256_HEX.fullmatch(etag) else None
    git_sha1 = etag if sha256 is None and _GIT_SHA1_HEX.fullmatch(etag) else None
    where = f"the Hub's '{entry.filename}' in the {entry.repo_type} repo '{entry.repo_id}'"
    if sha256 is None and git_sha1 is None:
        etag_text = f"ETag {metadata.etag!r}" if metadata.etag else "no ETag"
        raise DownloadError(f"{where} comes without a hash ({etag_text}), so it cannot be checked; '{entry.name}' "
                            f"was not downloaded. {_use_the_hubs_file_anyway(entry)}.")
    if entry.size is not None and metadata.size is not None and metadata.size != entry.size:
        mismatch = f"it has {metadata.size:,} bytes, the registry says {entry.size:,}"
    elif sha256 is not None and entry.sha256 is not None and not digest_matches(sha256, entry.sha256):
        mismatch = f"its sha256 is {sha256}, the registry says {entry.sha256}"
    else:
        mismatch = None
    if mismatch:
        raise DownloadError(f"{where} is not the file the registry describes ({mismatch}); the repo may have "
                            f"changed. '{entry.name}' was not downloaded. Update hyperstyle-nodes. "
                            f"{_use_the_hubs_file_anyway(entry)}.")
    if entry.full_sha256 is not None:
        reference = _Reference(entry.full_sha256, "the registry's", git_sha1=git_sha1, size=metadata.size)
    else:
        reference = _Reference(sha256, "the Hub's", git_sha1=git_sha1, size=metadata.size)
    return _HubFile(metadata.commit_hash, reference)


def _hub_probe_timeout():
    """HUB_CONNECT_TIMEOUT_S to connect, huggingface_hub's HF_HUB_ETAG_TIMEOUT for the answer, in the form of the
    HTTP client this huggingface_hub uses (httpx2/httpx Timeout, requests' (connect, read)); else one number."""
    from huggingface_hub import constants

    answer = float(constants.HF_HUB_ETAG_TIMEOUT)
    connect = answer if os.environ.get("HF_HUB_ETAG_TIMEOUT") else min(HUB_CONNECT_TIMEOUT_S, answer)
    hub_http = sys.modules.get("huggingface_hub.utils._http")
    for client_name in ("httpx2", "httpx"):
        timeout_class = getattr(getattr(hub_http, client_name, None), "Timeout", None)
        if isinstance(timeout_class, type):
            return timeout_class(answer, connect=connect)
    if hub_http is not None and getattr(hub_http, "requests", None) is not None:
        return (connect, answer)
    return answer


def _download_checked(entry: RegistryEntry, folder: Path, progress: bool) -> Path:
    """Download into a folder of the pack's own, check, and move into place where no file is.

    One process at a time per file: the others wait for the lock, then find the checked file.
    """
    try:
        hub = _hub_file(entry, folder)
    except _HubUnreachable as exc:
        raise WeightsUnavailableError(f"'{entry.name}' is not downloaded yet and cannot be downloaded: {exc}. "
                                      + _manual_download_hint(entry, folder) + ".") from None
    target = folder / entry.local_name
    state = folder / DOWNLOAD_STATE_FOLDER
    try:
        state.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot download '{entry.name}' into {folder} ({exc}). Make that folder writable, or "
                            "use another models folder (extra_model_paths.yaml in ComfyUI, HYPERSTYLE_MODELS_DIR "
                            "outside it).") from exc
    waiting = f"another process is downloading {entry.local_name} into {folder}; waiting for it"
    with _file_lock(state / f"{entry.local_name}.lock", waiting):
        if target.is_file():  # finished by another process while we waited, or put there meanwhile
            problem = _problem(target, entry, hub.reference)
            if problem is not None:
                raise _unusable_error(entry, [(target, problem)])
            _remember_hub_sha256(target, entry, hub.reference)
            return target
        staging = state / f"{entry.local_name}.partial"  # the pack's own; a broken transfer resumes from it
        problem = None
        for attempt in range(MAX_DOWNLOADS_PER_FILE):
            fetched = _download(entry, folder, staging, hub.commit, progress, force=attempt > 0)
            digest = sha256_of_file(fetched)
            problem = _problem(fetched, entry, hub.reference, sha256=digest)
            if problem is None:
                os.replace(fetched, target)  # same folder tree, so atomic: the name never shows a partial file
                _verified_digests.remember(target, target.stat(), digest)
                _remember_hub_sha256(target, entry, hub.reference)
                shutil.rmtree(staging, ignore_errors=True)
                return target
            log.warning("HyperStyle: the download of %s is unusable: %s", entry.local_name, problem)
            shutil.rmtree(staging, ignore_errors=True)  # the pack's own bad download: fetch it afresh
    raise DownloadError(
        f"'{entry.name}' failed its check after {MAX_DOWNLOADS_PER_FILE} downloads: {problem}. "
        + _manual_download_hint(entry, folder) + ".")


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


def _download(entry: RegistryEntry, folder: Path, staging: Path, revision: str | None, progress: bool,
              force: bool) -> Path:
    """huggingface_hub's download of the entry's file into `staging` (mirroring the repo's sub-folders)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import HfHubHTTPError

    log.info("HyperStyle: downloading %s from %s (%s repo %s) into %s",
             entry.local_name, entry.url, entry.repo_type, entry.repo_id, folder)
    try:
        with _hub_progress_bars(progress):
            return Path(hf_hub_download(repo_id=entry.repo_id, filename=entry.filename, repo_type=entry.repo_type,
                                        revision=revision, local_dir=staging, force_download=force))
    except _network_error_types() as exc:
        raise WeightsUnavailableError(f"downloading '{entry.name}' was cut off: the Hub could not be reached "
                                      f"({exc.__class__.__name__}: {exc}). Run again to resume it. "
                                      + _manual_download_hint(entry, folder) + ".") from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:  # 404/401/5xx, size mismatch mid-transfer, disk full
        raise DownloadError(f"downloading '{entry.name}' failed ({exc.__class__.__name__}: {exc}). "
                            + _manual_download_hint(entry, folder) + ".") from exc
