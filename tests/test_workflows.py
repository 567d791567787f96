"""The UI-format example workflows describe the same graphs as their API-format twins (which the server tests run)."""
import json
from pathlib import Path

import pytest

import nodes as pack_nodes

WORKFLOWS = Path(__file__).resolve().parents[1] / "example_workflows"
BUILTIN = {"LoadImage", "SaveImage"}


@pytest.mark.parametrize("api_file", sorted(WORKFLOWS.glob("*_api.json")), ids=lambda p: p.name)
def test_ui_twin_matches_api_graph(api_file):
    api = json.loads(api_file.read_text())
    ui = json.loads((WORKFLOWS / api_file.name.replace("_api.json", ".json")).read_text())
    ui_nodes = {str(n["id"]): n for n in ui["nodes"]}
    assert {k: v["class_type"] for k, v in api.items()} == {k: n["type"] for k, n in ui_nodes.items()}
    for node in ui_nodes.values():
        assert node["type"] in pack_nodes.NODE_CLASS_MAPPINGS or node["type"] in BUILTIN, node["type"]

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


@pytest.mark.parametrize("api_file", sorted(WORKFLOWS.glob("*_api.json")), ids=lambda p: p.name)
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
