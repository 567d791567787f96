"""The pack in a real ComfyUI server (runs when COMFYUI_DIR points at a ComfyUI checkout, e.g. v0.3.64).

    COMFYUI_DIR=/path/to/ComfyUI python -m pytest tests/test_comfyui_server.py -v -s

Starts `python main.py --cpu` on 127.0.0.1 with the pack linked into custom_nodes and tiny checkpoints in
models/hyperstyle/, then drives it through its HTTP API like a user queuing prompts.
"""
import json
import re
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_server import REPO_ROOT, ComfyServer, comfyui_dir
from conftest import _assets_root
from hyperstyle_nodes.tiny import make_tiny_sfe, write_tiny_checkpoints

ASSETS = _assets_root()

pytestmark = pytest.mark.skipif(comfyui_dir() is None, reason="set COMFYUI_DIR to a ComfyUI checkout to run the "
                                                               "real-server tests")
WORKFLOWS = REPO_ROOT / "example_workflows_api"  # API format, for POST /prompt
UI_WORKFLOWS = REPO_ROOT / "example_workflows"  # UI format, listed in the template browser
NODE_IDS = ["HyperStyleLoader", "HyperStyleEncode", "HyperStyleRefine", "HyperStyleDecode", "HyperStyleAlignFace",
            "HyperStylePasteBack", "HyperStyleApplyEdit", "HyperStyleEditSweep", "HyperStyleLoadGenerator",
            "HyperStyleSaveInversion", "HyperStyleLoadInversion", "HyperStyleTextEdit", "HyperStyleTextEditSweep",
            "HyperStyleOptimize"]
TINY = {"hyperstyle_ffhq": "tiny_hyperstyle.pt", "faces_w_encoder": "tiny_w_encoder.pt",
        "e4e_ffhq_encode": "tiny_e4e.pt", "stylegan2-ffhq-config-f": "tiny_generator.pt",
        "retinaface_resnet50": "retinaface_mobilenet0.25.pth",
        "interfacegan_age": "directions/tiny_age.pt"}  # tiny models have 64-d codes: a 64-d direction
# the SFE workflow: tiny SFE files (their own narrower e4e and generator) and a flattened W+ boundary as SFE's fs_ files
TINY_SFE = {**TINY, "sfe_editor_light": "sfe/sfe_editor.pt", "e4e_ffhq_encode": "sfe/e4e.pt",
            "stylegan2-ffhq-config-f": "sfe/generator.pt", "sfe_fs_smiling": "directions/tiny_fs_smiling.npy"}


def load_workflow(name: str, tiny: dict = TINY) -> dict:
    """An API-format example workflow with the registry model names swapped for the tiny test files."""
    prompt = json.loads((WORKFLOWS / name).read_text())
    for node in prompt.values():
        for key, value in node["inputs"].items():
            if isinstance(value, str) and value in tiny:
                node["inputs"][key] = tiny[value]
    return prompt


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_ckpts):
    base = tmp_path_factory.mktemp("comfy_base")
    srv = ComfyServer(base)
    for name, path in tiny_ckpts.items():
        shutil.copy(path, base / "models" / "hyperstyle" / f"tiny_{name}.pt")
    Image.new("RGB", (256, 256), (180, 140, 120)).save(base / "input" / "aligned_face.png")
    models = base / "models" / "hyperstyle"
    (models / "directions").mkdir()
    torch.save(torch.randn(1, 64, generator=torch.Generator().manual_seed(0)), models / "directions" / "tiny_age.pt")
    # full-width channels: a model big enough (~150 MiB) that freeing it shows in the server's memory
    write_tiny_checkpoints(models / "wide", size=128, narrow=1.0)
    _add_text_edit_files(models, tiny_ckpts["generator"])
    make_tiny_sfe(models / "sfe")  # 128 px: 12 codes of 64
    np.save(models / "directions" / "tiny_fs_smiling.npy", np.random.default_rng(0).standard_normal((1, 12 * 64)))
    if ASSETS.is_dir():  # the full edit workflow needs a real photo and real detector weights
        shutil.copy(ASSETS / "models/retinaface/retinaface_mobilenet0.25.pth", models)
        shutil.copy(ASSETS / "testdata/faces/portrait_b.jpg", base / "input" / "photo.png")
    with srv:
        yield srv


def _add_text_edit_files(models, generator_file):
    """A tiny CLIP under the default CLIP's folder name and synthetic StyleCLIP files for the tiny generator."""
    try:
        from hyperstyle_nodes.engines.hyperstyle.model import load_generator
        from hyperstyle_nodes.tiny import write_tiny_clip, write_tiny_styleclip_files

        write_tiny_clip(models / "clip-vit-base-patch32")
    except ImportError:  # no transformers: the text edit test skips
        return
    write_tiny_styleclip_files(models / "styleclip", load_generator(generator_file))


def disk_loads(server) -> int:
    return len(re.findall(r"HyperStyle: loading .* from disk", server.log()))


def error_of(entry) -> dict:
    for kind, data in entry["status"]["messages"]:
        if kind == "execution_error":
            return data
    raise AssertionError(f"no execution_error in {entry['status']}")


def test_pack_imports_and_lists_its_nodes(server):
    log = server.log()
    # ComfyUI's "Import times for custom nodes" table: our line must not say IMPORT FAILED
    line = next((ln for ln in log.splitlines() if ln.rstrip().endswith("custom_nodes/hyperstyle-nodes")), None)
    assert line is not None, f"the pack was not loaded:\n{log[-3000:]}"
    assert "IMPORT FAILED" not in line, log[-3000:]
    assert "Cannot import" not in "".join(ln for ln in log.splitlines() if "hyperstyle" in ln)
    info = server.get("/object_info")
    for node_id in NODE_IDS:
        assert node_id in info, f"{node_id} missing from /object_info"
        assert info[node_id]["category"] == "HyperStyle"
    assert info["HyperStyleLoader"]["output"] == ["HYPERSTYLE_MODEL"]
    assert info["HyperStyleEncode"]["output"] == ["HYPERSTYLE_LATENT", "IMAGE"]
    assert info["HyperStyleRefine"]["output"] == ["HYPERSTYLE_DELTAS", "IMAGE"]
    assert info["HyperStyleRefine"]["input"]["optional"]["deltas"][0] == "HYPERSTYLE_DELTAS"
    assert info["HyperStyleDecode"]["output"] == ["IMAGE"]
    assert "tiny_hyperstyle.pt" in info["HyperStyleLoader"]["input"]["required"]["checkpoint"][0]


def test_template_browser_lists_only_ui_workflows_and_they_use_existing_nodes(server):
    templates = server.get("/workflow_templates")
    ui_names = sorted(p.stem for p in UI_WORKFLOWS.glob("*.json"))
    assert sorted(templates.get("hyperstyle-nodes", [])) == ui_names, templates
    info = server.get("/object_info")
    for name in ui_names:
        served = server.get(f"/api/workflow_templates/hyperstyle-nodes/{name}.json")  # what the browser loads
        assert isinstance(served.get("version"), (int, float)) and served["nodes"], name
        missing = {node["type"] for node in served["nodes"]} - set(info)
        assert not missing, f"{name}.json uses node types the server does not have: {missing}"


def test_invert_and_reconstruct_workflow(server):
    entry = server.run_prompt(load_workflow("invert_reconstruct_api.json"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = entry["outputs"]["6"]["images"][0]
    path = server.base / "output" / saved["subfolder"] / saved["filename"]
    assert path.is_file() and Image.open(path).size == (128, 128)
    print(f"saved {path}")


def test_full_edit_workflow(server, assets_dir):
    """load image -> align -> encode -> refine -> edit -> decode -> paste back -> save, through /prompt."""
    entry = server.run_prompt(load_workflow("edit_photo_api.json"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = entry["outputs"]["9"]["images"][0]
    path = server.base / "output" / saved["subfolder"] / saved["filename"]
    original = Image.open(server.base / "input" / "photo.png")
    assert path.is_file() and Image.open(path).size == original.size
    print(f"edited photo: {path}")


def test_sfe_edit_workflow(server, assets_dir):
    """The SFE twin: load image -> align -> SFE encode -> SFE's fs_smiling edit -> decode through the feature editor
    -> paste back -> save; the same Load HyperStyle node loads the SFE file."""
    info = server.get("/object_info")
    choices = info["HyperStyleLoader"]["input"]["required"]["checkpoint"][0]
    assert {"sfe_editor_light", "sfe_inverter_light", "sfe/sfe_editor.pt"} <= set(choices)
    assert "sfe_fs_smiling" in info["HyperStyleApplyEdit"]["input"]["required"]["direction"][0]
    prompt = load_workflow("edit_photo_sfe_api.json", TINY_SFE)
    entry = server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = entry["outputs"]["8"]["images"][0]
    path = server.base / "output" / saved["subfolder"] / saved["filename"]
    original = Image.open(server.base / "input" / "photo.png")
    assert path.is_file() and Image.open(path).size == original.size
    assert re.search(r"HyperStyle: loading .*sfe_editor.pt.* from disk", server.log()), server.log()[-2000:]
    # SFE has no Refine: the node says what to connect instead
    prompt["9"] = {"class_type": "HyperStyleRefine",
                   "inputs": {"model": ["3", 0], "image": ["2", 0], "latent": ["4", 0], "iterations": 1}}
    prompt["10"] = {"class_type": "HyperStyleDecode",
                    "inputs": {"model": ["3", 0], "latent": ["4", 0], "deltas": ["9", 0], "output_size": "native"}}
    prompt["7"]["inputs"]["face"] = ["10", 0]
    err = error_of(server.run_prompt(prompt))
    assert "HyperStyle Refine works with HyperStyle models" in err["exception_message"]
    assert "straight to Apply Edit Direction / Decode" in err["exception_message"]
    print(f"SFE-edited photo: {path}")


def encode_decode_only(size="native", checkpoint=None, encoder=None):
    """Encode -> decode (no refine) -> save: another graph on the same loader."""
    prompt = load_workflow("invert_reconstruct_api.json")
    del prompt["4"], prompt["7"]
    prompt["5"]["inputs"].pop("deltas")
    prompt["5"]["inputs"]["output_size"] = size
    if checkpoint:
        prompt["2"]["inputs"].update(checkpoint=checkpoint, initial_encoder=encoder)
    return prompt


def test_text_edit_workflow(server, assets_dir):
    """load image -> align -> encode -> refine -> Text Edit (StyleCLIP) -> paste back -> save; then bad prompts."""
    pytest.importorskip("transformers")
    entry = server.run_prompt(load_workflow("text_edit_photo_api.json"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = entry["outputs"]["8"]["images"][0]
    path = server.base / "output" / saved["subfolder"] / saved["filename"]
    assert path.is_file() and Image.open(path).size == Image.open(server.base / "input" / "photo.png").size
    for inputs, message in (({"neutral_text": ""}, "the neutral text is empty"),
                            ({"target_text": "curly " * 20}, "too long for CLIP"),
                            ({"beta": 0.3, "target_text": "x"}, "no channel passes β=0.3")):
        prompt = load_workflow("text_edit_photo_api.json")
        prompt["6"]["inputs"].update(inputs)
        error = error_of(server.run_prompt(prompt))
        assert message in error["exception_message"], error["exception_message"]


def test_model_stays_resident_between_prompts(server):
    before = disk_loads(server)
    server.run_prompt(load_workflow("invert_reconstruct_api.json"))  # make sure it is loaded
    loads_after_first = disk_loads(server)
    assert loads_after_first - before <= 1
    entry = server.run_prompt(encode_decode_only("256"))
    assert entry["status"]["status_str"] == "success" and entry["outputs"]["6"]["images"]
    assert disk_loads(server) == loads_after_first, "the checkpoint was read from disk again while resident"


UNLOADED = r"HyperStyle: unloaded \d+ model\(s\), ([\d.]+) MiB"


def free_models(server, count: int) -> list:
    """POST /free {"unload_models": true}; the amounts released that the log reports, once there are `count`.

    ComfyUI's worker misses a /free that arrives while it finishes a prompt (the flag's notify comes before its next
    wait, which then lasts up to 1000 s), so the request is repeated if nothing happens.
    """
    for attempt in range(3):
        server.post("/free", {"unload_models": True})
        try:
            return server.wait_for_log(UNLOADED, count=count, timeout=10)
        except TimeoutError:
            if attempt == 2:
                raise


def test_unload_frees_the_models_memory_and_the_next_prompt_reloads_it(server):
    """POST /free {"unload_models": true}: on the CPU ComfyUI's own unload moves nothing, so the pack drops the
    weights; the server's resident memory falls by at least the model's size, and the next prompt reads it again."""
    prompt = encode_decode_only(checkpoint="wide/hyperstyle.pt", encoder="wide/w_encoder.pt")
    assert server.run_prompt(prompt)["status"]["status_str"] == "success"
    loads = disk_loads(server)
    requested = server.log().count("Requested to load")
    unloads = len(re.findall(UNLOADED, server.log()))
    loaded_rss = server.rss_bytes()

    released_mib = float(free_models(server, count=unloads + 1)[-1])
    time.sleep(1)  # ComfyUI's own clean-up after the flag (gc) runs right after ours
    freed = loaded_rss - server.rss_bytes()
    print(f"unload: the pack released {released_mib:.1f} MiB; the server's RSS fell by {freed / 2**20:.1f} MiB "
          f"({loaded_rss / 2**20:.0f} -> {(loaded_rss - freed) / 2**20:.0f} MiB)")
    assert released_mib >= 150, "the wide model (and whatever else was cached) should have been released"
    assert freed >= released_mib * 2**20, "the process kept the memory of the released models"

    # the next prompt (ComfyUI reuses its cached loader and encoder outputs; Decode runs) reads the checkpoint again
    prompt["5"]["inputs"]["output_size"] = "256"
    assert server.run_prompt(prompt)["status"]["status_str"] == "success"
    assert disk_loads(server) == loads + 1
    assert server.log().count("Requested to load") > requested
    assert server.rss_bytes() - (loaded_rss - freed) >= 0.5 * released_mib * 2**20, "the model is back in memory"


def test_save_inversion_refuses_paths_outside_the_output_folder(server):
    outside = [server.base / "escaped", server.base / "escaped_abs"]
    for prefix in ("../escaped/inversion", str(outside[1] / "inversion"), "hyperstyle/../../escaped/x"):
        prompt = encode_decode_only()
        del prompt["5"], prompt["6"]
        prompt["8"] = {"class_type": "HyperStyleSaveInversion",
                       "inputs": {"latent": ["3", 0], "filename_prefix": prefix}}
        err = error_of(server.run_prompt(prompt))
        assert err["node_type"] == "HyperStyleSaveInversion" and err["exception_type"].endswith("UnsafePathError")
        assert f"filename_prefix {prefix!r} is refused: it points outside the output folder" in err["exception_message"]
    assert not any(folder.exists() for folder in outside), "a folder was created outside output/"
    assert not list(server.base.rglob("x.safetensors")) and not list(server.base.rglob("inversion*.safetensors"))

    prompt["8"]["inputs"]["filename_prefix"] = "hyperstyle/inside"
    entry = server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "success"
    assert (server.base / "output" / "hyperstyle" / "inside.safetensors").is_file()

    # Load Inversion: a name outside the list of saved inversions is refused before anything runs
    load = {"1": {"class_type": "HyperStyleLoadInversion", "inputs": {"inversion": "../../user/comfy.settings.json"}},
            "2": {"class_type": "HyperStyleSaveInversion", "inputs": {"latent": ["1", 0], "filename_prefix": "again"}}}
    with pytest.raises(RuntimeError, match="value_not_in_list"):
        server.run_prompt(load)


def test_wrong_checkpoint_kind_is_a_clear_execution_error(server):
    prompt = load_workflow("invert_reconstruct_api.json")
    prompt["2"]["inputs"]["checkpoint"] = "tiny_generator.pt"
    entry = server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "error"
    err = error_of(entry)
    assert err["exception_type"].endswith("CheckpointError")
    assert "tiny_generator.pt is a StyleGAN2 generator" in err["exception_message"]


def test_mismatched_batches_and_rgba_images(server):
    prompt = load_workflow("invert_reconstruct_api.json")
    prompt["10"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 3}}
    prompt["11"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 2}}
    prompt["3"]["inputs"]["image"] = ["11", 0]  # latent batch 2
    prompt["4"]["inputs"]["image"] = ["10", 0]  # images batch 3
    err = error_of(server.run_prompt(prompt))
    assert err["exception_type"].endswith("ValueError") and "batch sizes do not match" in err["exception_message"]

    rgba = load_workflow("invert_reconstruct_api.json")
    rgba["12"] = {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["1", 0], "alpha": ["1", 1]}}
    rgba["3"]["inputs"]["image"] = ["12", 0]
    rgba["4"]["inputs"]["image"] = ["12", 0]
    assert server.run_prompt(rgba)["status"]["status_str"] == "success"


def test_no_face_is_a_clear_execution_error(server, assets_dir):
    prompt = load_workflow("edit_photo_api.json")
    prompt["1"]["inputs"]["image"] = "aligned_face.png"  # a flat colour: no face
    err = error_of(server.run_prompt(prompt))
    assert err["node_type"] == "HyperStyleAlignFace"
    assert err["exception_type"].endswith("NoFaceError")
    assert "no face found in batch image 0" in err["exception_message"] and "center_crop" in err["exception_message"]
    prompt["2"]["inputs"]["on_no_face"] = "center_crop"
    assert server.run_prompt(prompt)["status"]["status_str"] == "success"


def optimize_workflow(steps: int) -> dict:
    """invert_reconstruct with HyperStyle Optimize between Refine and Decode."""
    prompt = load_workflow("invert_reconstruct_api.json")
    prompt["8"] = {"class_type": "HyperStyleOptimize", "inputs": {
        "model": ["2", 0], "image": ["1", 0], "latent": ["3", 0], "deltas": ["4", 0], "steps": steps,
        "learning_rate": 0.01, "mse": 1.0, "lpips": 0.0, "identity": 0.0, "optimize": "codes"}}
    prompt["5"]["inputs"].update(latent=["8", 0], deltas=["8", 1])
    del prompt["7"]
    return prompt


def test_optimize_shows_progress_with_previews_and_can_be_cancelled(server):
    """Over ComfyUI's websocket: progress messages and preview images from the Optimize node, then POST /interrupt
    stops it mid-run; a short run afterwards completes."""
    import asyncio
    import uuid

    import aiohttp

    async def drive():
        client_id = str(uuid.uuid4())
        progress, previews, events = [], 0, []
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{server.url}/ws?clientId={client_id}") as ws:
                async with session.post(f"{server.url}/prompt",
                                        json={"prompt": optimize_workflow(5000), "client_id": client_id}) as r:
                    assert r.status == 200, await r.text()
                interrupted_sent = False
                while True:
                    msg = await asyncio.wait_for(ws.receive(), timeout=300)
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        previews += int.from_bytes(msg.data[:4], "big") == 1  # PREVIEW_IMAGE: a JPEG follows
                        continue
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        raise AssertionError(f"websocket closed: {msg}")
                    data = json.loads(msg.data)
                    events.append(data["type"])
                    if data["type"] == "progress" and data["data"]["node"] == "8":
                        progress.append((data["data"]["value"], data["data"]["max"]))
                        if len(progress) >= 3 and previews and not interrupted_sent:
                            async with session.post(f"{server.url}/interrupt", json={}) as r:
                                assert r.status == 200
                            interrupted_sent = True
                    if data["type"] in ("execution_interrupted", "execution_success", "execution_error"):
                        return progress, previews, data["type"]

    progress, previews, end = asyncio.run(drive())
    assert end == "execution_interrupted", server.log()[-3000:]
    assert [v for v, _ in progress[:3]] == [1, 2, 3] and all(m == 5000 for _, m in progress)
    assert previews >= 1
    assert progress[-1][0] < 100, "the run went on long after the interrupt"
    entry = server.run_prompt(optimize_workflow(3))
    assert entry["status"]["status_str"] == "success", entry["status"]
    print(f"progress updates before the interrupt took effect: {len(progress)}, previews: {previews}")
