"""Start a real ComfyUI (COMFYUI_DIR) on loopback with this pack linked into custom_nodes, and talk to it."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def comfyui_dir() -> Path | None:
    value = os.environ.get("COMFYUI_DIR")
    return Path(value) if value else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """`python main.py --cpu` in a throw-away base directory (models/, input/, output/, custom_nodes/)."""

    def __init__(self, base: Path, startup_timeout: float = 180):
        self.base = base
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "comfyui.log"
        self.startup_timeout = startup_timeout
        for sub in ("custom_nodes", "models/hyperstyle", "input", "output", "user"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        link = base / "custom_nodes" / "hyperstyle-nodes"
        if not link.exists():
            link.symlink_to(REPO_ROOT, target_is_directory=True)

    def __enter__(self):
        self._log = open(self.log_path, "w")
        env = {k: v for k, v in os.environ.items() if k not in ("HYPERSTYLE_MODELS_DIR",)}
        env["HF_HUB_OFFLINE"] = "1"  # tests never reach the Hub; models are placed in models/hyperstyle/
        self.proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", str(self.base), "--disable-auto-launch"],
            cwd=comfyui_dir(), stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        self.__exit__(None, None, None)
        raise TimeoutError(f"ComfyUI did not start in {self.startup_timeout} s:\n{self.log()[-4000:]}")

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, count: int = 1, timeout: float = 60) -> list:
        """The first `count` matches of a regular expression in the server's log, once there are that many."""
        deadline = time.time() + timeout
        while True:
            found = re.findall(pattern, self.log())
            if len(found) >= count:
                return found
            if time.time() > deadline:
                raise TimeoutError(f"{pattern!r} did not appear {count} time(s) in {timeout} s:\n{self.log()[-4000:]}")
            time.sleep(0.2)

    def rss_bytes(self) -> int:
        """The server process's resident memory (Linux: VmRSS in /proc)."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read() or b"null")

    def post(self, path: str, payload: dict):
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                body = response.read()
                return json.loads(body) if body else None
        except urllib.error.HTTPError as err:
            raise RuntimeError(f"POST {path} -> {err.code}: {err.read().decode(errors='replace')}") from None

    def run_prompt(self, prompt: dict, timeout: float = 300) -> dict:
        """Queue an API-format workflow and wait for its history entry."""
        prompt_id = self.post("/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log()[-4000:]}")
