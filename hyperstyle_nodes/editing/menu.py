"""Named edits: StyleFeatureEditor's editing menu (its available_directions.txt) on the pack's direction inputs.

Each name says how to apply it: an InterFaceGAN or W+ boundary direction read from a registry file (codes + strength
* direction), a GANSpace principal component with its own style layers (the component and layers of SFE's
editings/latent_editor.py, from the GANSpace PCA file), or StyleSpace channels (no file: SFE's `stylespace_directions`,
(layer, channel) in the official StyleSpace numbering, which is the pack's generator-layer numbering; each moves by
3 * strength, as SFE's `get_stylespace_edits`). Strength ranges are the ones SFE's authors found to work
(available_directions.txt), in the pack's units: SFE applies InterFaceGAN directions at half its "power"
(w + power / 2 * direction), the pack at the full strength, so those ranges are half of SFE's; GANSpace targets,
W+ boundary steps and StyleSpace powers are the same numbers in both.
The edits work on any inversion of the FFHQ StyleGAN2 (HyperStyle or SFE). Not here: SFE's StyleCLIP *mapper* edits
(afro, bobcut, ...: each needs its own trained mapper network); its StyleCLIP *global* edits are the Text Edit node
and `--text` (SFE's power p is the pack's alpha p / 1.5). Standard library only: the CLI reads this before torch is
imported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class NamedEdit:
    file: str                      # registry name of the file the edit reads
    strength_range: tuple          # (low, high) in the pack's units
    effect: str                    # what a positive strength does (a negative one reverses it)
    component: int = 0             # GANSpace only: the principal component
    layers: Optional[tuple] = None  # GANSpace only: style layers start..end-1 it moves
    note: str = ""
    channels: Optional[tuple] = None  # StyleSpace only: ((generator layer, channel), ...) it moves (file is "")

    @property
    def is_ganspace(self) -> bool:
        return self.layers is not None

    @property
    def is_stylespace(self) -> bool:
        return self.channels is not None


STYLESPACE_STEP = 3.0  # SFE's get_stylespace_edits: each channel moves by 3 * power


def _stylespace(strength_range: tuple, effect: str, *channels: tuple, note: str = "") -> NamedEdit:
    return NamedEdit("", strength_range, effect, note=note, channels=tuple(channels))


GANSPACE_FILE = "ganspace_ffhq_pca"

NAMED_EDITS = {
    "interfacegan_age": NamedEdit("interfacegan_age", (-5, 5), "older"),
    "interfacegan_smile": NamedEdit("interfacegan_smile", (-2.5, 2.5), "smile",
                                    note="may cause hair artefacts; sfe_fs_smiling is cleaner"),
    "interfacegan_rotation": NamedEdit("interfacegan_rotation", (-3.5, 3.5), "turn the face to its right"),
    "ganspace_eye_openness": NamedEdit(GANSPACE_FILE, (-30, 45), "close the eyes", 54, (7, 8)),
    "ganspace_trimmed_beard": NamedEdit(GANSPACE_FILE, (-30, 30), "remove the beard", 58, (7, 9),
                                        note="works poorly on women"),
    "ganspace_lipstick": NamedEdit(GANSPACE_FILE, (-30, 30), "add lipstick", 34, (10, 11),
                                   note="works poorly on men"),
    "ganspace_face_roundness": NamedEdit(GANSPACE_FILE, (-20, 15), "rounder face", 37, (0, 5)),
    "ganspace_nose_length": NamedEdit(GANSPACE_FILE, (-30, 30), "shorter nose", 51, (4, 5),
                                      note="may open the mouth"),
    "ganspace_eyebrow_thickness": NamedEdit(GANSPACE_FILE, (-20, 20), "thinner eyebrows", 37, (8, 9)),
    "ganspace_displeased": NamedEdit(GANSPACE_FILE, (-10, 10), "sadder", 36, (4, 7)),
    "sfe_fs_glasses": NamedEdit("sfe_fs_glasses", (-20, 30), "add glasses", note="may open the mouth"),
    "sfe_fs_smiling": NamedEdit("sfe_fs_smiling", (-10, 10), "smile"),
    "sfe_fs_makeup": NamedEdit("sfe_fs_makeup", (-10, 15), "add make-up", note="works poorly on men"),
    "stylespace_black_hair": _stylespace((-7, 10), "darker hair", (12, 479)),
    "stylespace_blond_hair": _stylespace((-10, 7), "darker hair", (12, 479), (12, 266),
                                         note="yes, + darkens: - makes it blond"),
    "stylespace_grey_hair": _stylespace((-7, 7), "coloured hair", (11, 286), note="- makes it grey"),
    "stylespace_wavy_hair": _stylespace((-7, 7), "longer hair", (6, 500), (8, 128), (5, 92), (6, 394), (6, 323)),
    "stylespace_receding_hairline": _stylespace((-10, 10), "less bald", (5, 414), (6, 322), (6, 497), (6, 504)),
    "stylespace_smiling": _stylespace((-10, 10), "remove the smile", (6, 501), note="sfe_fs_smiling is better"),
    "stylespace_sideburns": _stylespace((-7, 7), "remove the sideburns", (12, 237), note="works poorly on women"),
    "stylespace_goatee": _stylespace((-7, 7), "remove the goatee", (9, 421), note="works poorly on women"),
    "stylespace_earrings": _stylespace((0, 15), "add earrings", (8, 81), note="works poorly on men"),
    "stylespace_glasses": _stylespace((-10, 10), "remove the glasses", (3, 288), (2, 175), (3, 120), (2, 97)),
    "stylespace_gender": _stylespace((-10, 7), "more feminine", (9, 6), note="a text edit may do better"),
}

# SFE's own names (available_directions.txt) and the pack's short ones, for the CLI's --edit NAME=STRENGTH
SHORT_NAMES = {"age": "interfacegan_age", "smile": "interfacegan_smile", "rotation": "interfacegan_rotation",
               **{name.removeprefix("ganspace_"): name for name in NAMED_EDITS if name.startswith("ganspace_")},
               **{name.removeprefix("sfe_"): name for name in NAMED_EDITS if name.startswith("sfe_fs_")},
               **{name: name for name in NAMED_EDITS if name.startswith("stylespace_")}}


def file_of(name: str) -> Optional[str]:
    """The registry name (or file) a direction choice reads: a GANSpace named edit reads the PCA file, a StyleSpace
    one none (None)."""
    edit = NAMED_EDITS.get(name)
    if edit is None:
        return name
    return None if edit.is_stylespace else edit.file


def describe(name: str) -> str:
    """'interfacegan_age: -5..5, + older' for a tooltip or --help."""
    edit = NAMED_EDITS[name]
    low, high = edit.strength_range
    note = f" ({edit.note})" if edit.note else ""
    return f"{name}: {low:g}..{high:g}, + {edit.effect}{note}"
