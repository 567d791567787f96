"""The pack in a real ComfyUI server (runs when COMFYUI_DIR points at a ComfyUI checkout, e.g. v0.3.64).

    COMFYUI_DIR=/path/to/ComfyUI python -m pytest tests/test_comfyui_server.py -v -s

Starts `python main.py --cpu` on 127.0.0.1 with the pack linked into custom_nodes and tiny checkpoints in
models/hyperstyle/, then drives it through its HTTP API like a user queuing prompts.
"""
import json
import re
import shutil

import pytest
import torch
from PIL import Image

from comfy_server import REPO_ROOT, ComfyServer, comfyui_dir
from conftest import _assets_root

ASSETS = _assets_root()

pytestmark = pytest.mark.skipif(comfyui_dir() is None, reason="set COMFYUI_DIR to a ComfyUI checkout to run the "
                                                               "real-server tests")
WORKFLOWS = REPO_ROOT / "example_workflows_api"  # API format, for POST /prompt
UI_WORKFLOWS = REPO_ROOT / "example_workflows"  # UI format, listed in the template browser
NODE_IDS = ["HyperStyleLoader", "HyperStyleEncode", "HyperStyleRefine", "HyperStyleDecode", "HyperStyleAlignFace",
            "HyperStylePasteBack", "HyperStyleApplyEdit", "HyperStyleEditSweep", "HyperStyleLoadGenerator",
            "HyperStyleSaveInversion", "HyperStyleLoadInversion"]
TINY = {"hyperstyle_ffhq": "tiny_hyperstyle.pt", "faces_w_encoder": "tiny_w_encoder.pt",
        "e4e_ffhq_encode": "tiny_e4e.pt", "stylegan2-ffhq-config-f": "tiny_generator.pt",
        "retinaface_resnet50": "retinaface_mobilenet0.25.pth",
        "interfacegan_age": "directions/tiny_age.pt"}  # tiny models have 64-d codes: a 64-d direction


def load_workflow(name: str) -> dict:
    """An API-format example workflow with the registry model names swapped for the tiny test files."""
    prompt = json.loads((WORKFLOWS / name).read_text())
    for node in prompt.values():
        for key, value in node["inputs"].items():
            if isinstance(value, str) and value in TINY:
                node["inputs"][key] = TINY[value]
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
    if ASSETS.is_dir():  # the full edit workflow needs a real photo and real detector weights
        shutil.copy(ASSETS / "models/retinaface/retinaface_mobilenet0.25.pth", models)
        shutil.copy(ASSETS / "testdata/faces/portrait_b.jpg", base / "input" / "photo.png")
    with srv:
        yield srv


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


def test_model_stays_resident_and_unload_releases_it(server):
    before = disk_loads(server)
    server.run_prompt(load_workflow("invert_reconstruct_api.json"))  # make sure it is loaded
    loads_after_first = disk_loads(server)
    assert loads_after_first - before <= 1

    def decode_only(size):  # a different graph on the same checkpoint: encode -> decode (no refine) -> save
        prompt = load_workflow("invert_reconstruct_api.json")
        del prompt["4"], prompt["7"]
        prompt["5"]["inputs"].pop("deltas")
        prompt["5"]["inputs"]["output_size"] = size
        return prompt

    entry = server.run_prompt(decode_only("256"))
    assert entry["status"]["status_str"] == "success" and entry["outputs"]["6"]["images"]
    # the same graph again after dropping ComfyUI's output cache (free_memory also unloads models)
    server.post("/free", {"free_memory": True})
    assert server.run_prompt(load_workflow("invert_reconstruct_api.json"))["status"]["status_str"] == "success"
    assert disk_loads(server) == loads_after_first, "the checkpoint was read from disk again while resident"
    # unload models: ComfyUI moves it off its device; the next prompt loads it again (from memory, not disk)
    requested = server.log().count("Requested to load HyperStyleModel")
    server.post("/free", {"unload_models": True})
    assert server.run_prompt(decode_only("512"))["status"]["status_str"] == "success"
    assert server.log().count("Requested to load HyperStyleModel") == requested + 1
    assert disk_loads(server) == loads_after_first
    print(f"disk loads: {disk_loads(server)}; 'Requested to load HyperStyleModel': "
          f"{server.log().count('Requested to load HyperStyleModel')}")


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
