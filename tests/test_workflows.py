"""The example workflows: example_workflows/ (listed in ComfyUI's template browser) holds only UI-format graphs whose
nodes exist; example_workflows_api/ holds the same graphs in API format (for POST /prompt; the server tests run them).
"""
import json
from pathlib import Path

import pytest

import nodes as pack_nodes

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO_ROOT / "example_workflows"
API_WORKFLOWS = REPO_ROOT / "example_workflows_api"
BUILTIN = {"LoadImage", "SaveImage"}
THUMBNAIL_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def test_template_folder_holds_only_ui_workflows():
    # ComfyUI lists every example_workflows/*.json in its template browser; the frontend loads only the UI format
    # (an API-format file shows "Workflow does not contain a valid version" and an empty canvas)
    files = sorted(WORKFLOWS.iterdir())
    workflows = [f for f in files if f.suffix == ".json"]
    assert workflows
    for path in files:
        assert path.is_file(), f"{path.name}: the template browser does not look into folders"
        if path.suffix in THUMBNAIL_SUFFIXES:
            assert path.with_suffix(".json").is_file(), f"{path.name} is the thumbnail of no workflow"
            continue
        assert path.suffix == ".json", f"{path.name}: only workflows (and their thumbnails) belong here"
        graph = json.loads(path.read_text())
        assert isinstance(graph.get("version"), (int, float)), f"{path.name} is not a UI-format workflow"
        assert isinstance(graph.get("nodes"), list) and isinstance(graph.get("links"), list), path.name


@pytest.mark.parametrize("ui_file", sorted(WORKFLOWS.glob("*.json")), ids=lambda p: p.name)
def test_ui_workflow_nodes_exist(ui_file):
    types = {node["type"] for node in json.loads(ui_file.read_text())["nodes"]}
    missing = types - BUILTIN - set(pack_nodes.NODE_CLASS_MAPPINGS)
    assert not missing, f"{ui_file.name} uses node types that do not exist: {missing}"


def test_every_ui_workflow_has_an_api_twin():
    ui = sorted(p.stem + "_api" for p in WORKFLOWS.glob("*.json"))
    assert ui == sorted(p.stem for p in API_WORKFLOWS.glob("*.json"))


@pytest.mark.parametrize("api_file", sorted(API_WORKFLOWS.glob("*_api.json")), ids=lambda p: p.name)
def test_ui_twin_matches_api_graph(api_file):
    api = json.loads(api_file.read_text())
    ui = json.loads((WORKFLOWS / api_file.name.replace("_api.json", ".json")).read_text())
    ui_nodes = {str(n["id"]): n for n in ui["nodes"]}
    assert {k: v["class_type"] for k, v in api.items()} == {k: n["type"] for k, n in ui_nodes.items()}

    api_links = {(v[0], v[1], nid, name) for nid, spec in api.items()
                 for name, v in spec["inputs"].items() if isinstance(v, list)}
    ui_links = set()
    for _, src, src_slot, dst, dst_slot, _type in ui["links"]:
        name = ui_nodes[str(dst)]["inputs"][dst_slot]["name"]
        ui_links.add((str(src), src_slot, str(dst), name))
    assert ui_links == api_links

    for nid, spec in api.items():  # every widget value of the API graph is set in the UI graph
        widgets = ui_nodes[nid]["widgets_values"]
        for name, value in spec["inputs"].items():
            if not isinstance(value, list):
                assert value in widgets, (nid, name, value, widgets)


@pytest.mark.parametrize("api_file", sorted(API_WORKFLOWS.glob("*_api.json")), ids=lambda p: p.name)
def test_api_inputs_exist_on_the_nodes(api_file):
    for nid, spec in json.loads(api_file.read_text()).items():
        cls = pack_nodes.NODE_CLASS_MAPPINGS.get(spec["class_type"])
        if cls is None:
            continue
        declared = {}
        for section in cls.INPUT_TYPES().values():
            declared.update(section)
        assert set(spec["inputs"]) <= set(declared), (nid, set(spec["inputs"]) - set(declared))
        required = set(cls.INPUT_TYPES()["required"])
        assert required <= set(spec["inputs"]), (nid, required - set(spec["inputs"]))
