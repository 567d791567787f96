"""Headless photo editing: align -> encode -> refine -> edit -> decode -> paste back, with the nodes' code.

    python -m hyperstyle_nodes edit photo.jpg --edit age=+2 --edit smile=-1 --out edited/
    python -m hyperstyle_nodes edit photos/ --edit pose=3 --out edited/ --save-aligned --save-inversion
    python -m hyperstyle_nodes edit photo.jpg --engine sfe --edit age=+3 --out edited/   # StyleFeatureEditor

Default weights download on first use (from the Hugging Face Hub into $HYPERSTYLE_MODELS_DIR or the user cache).
Results get new names: an existing file (a photo, an earlier run's result) is never replaced.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .editing import menu

# Only the standard library at import time: `--help` and argument errors must not wait for torch.
EXIT_OK, EXIT_USAGE, EXIT_NO_FACE, EXIT_WEIGHTS, EXIT_PARTIAL = 0, 2, 3, 4, 5
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
EDIT_ALIASES = {"pose": "interfacegan_pose", **menu.SHORT_NAMES}
# --engine: the checkpoint's registry kinds and the default checkpoint and encoder
ENGINES = {"hyperstyle": (("hyperstyle",), "hyperstyle_ffhq", "faces_w_encoder"),
           "sfe": (("sfe_editor", "sfe_inverter"), "sfe_editor_light", "e4e_ffhq_encode")}
MAX_NAME_TRIES = 10_000  # free-name search bound: `<stem>_1`, `<stem>_2`, ...


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hyperstyle_nodes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    edit = commands.add_parser("edit", help="edit the faces in photos and paste them back",
                               description="Align every face, invert it with HyperStyle, apply the edits, decode "
                                           "and paste the result back into the photo (same size as the input). "
                                           "Exit codes: 0 all photos edited, 2 bad arguments, 3 no face in any "
                                           "photo, 4 weights missing or unusable, 5 some photos failed.")
    edit.add_argument("input", type=Path, help="a photo, or a folder of photos (jpg/png/webp/bmp/tif)")
    edit.add_argument("--out", type=Path, required=True,
                      help="folder for the results (created if missing); existing files there are never replaced")
    edit.add_argument("--edit", action="append", default=[], metavar="NAME=STRENGTH",
                      help="an edit, repeatable: age, smile, pose or rotation (InterFaceGAN), SFE's named edits, a "
                           "registry name, or a direction file (.pt/.npy/.safetensors); STRENGTH may be negative, "
                           "e.g. --edit age=-2. With no --edit the photos are only reconstructed. Named edits and "
                           "their working strengths: "
                           + "; ".join(f"{short} ({menu.describe(name)})" if short != name else menu.describe(name)
                                       for short, name in menu.SHORT_NAMES.items()))
    edit.add_argument("--text", default=None, metavar="'NEUTRAL -> TARGET'",
                      help="a text edit (StyleCLIP global direction), e.g. --text 'face with hair -> face with curly "
                           "hair'; needs fs3.npy, S_mean_std and templates.txt in <models dir>/styleclip/")
    edit.add_argument("--alpha", type=float, default=4.0, help="strength of --text (default 4; negative reverses)")
    edit.add_argument("--beta", type=float, default=0.13,
                      help="disentanglement of --text: channels with relevance below it stay (default 0.13)")
    edit.add_argument("--layers", default=None, metavar="START:END",
                      help="edit only style layers START..END-1 (default: all)")
    edit.add_argument("--engine", choices=sorted(ENGINES), default="hyperstyle",
                      help="hyperstyle (HyperStyle: codes + weight offsets) or sfe (StyleFeatureEditor: codes + "
                           "F-space features, edited by its feature editor; no --iterations or --optimize-steps). "
                           "Picks the default --checkpoint and --encoder (default hyperstyle)")
    edit.add_argument("--iterations", type=int, default=None,
                      help="HyperStyle refinement passes, 0 or more (default 5)")
    edit.add_argument("--optimize-steps", type=int, default=0, metavar="N",
                      help="then refine the codes by N steps of gradient descent against the face (the iterator; "
                           "sharper, slower: about N generator passes forward and back per face; default 0: off)")
    edit.add_argument("--optimize-lr", type=float, default=0.01, help="the iterator's learning rate (default 0.01)")
    edit.add_argument("--optimize-lpips", type=float, default=0.0,
                      help="the iterator's LPIPS weight (0.8 in the paper; needs the lpips package and "
                           "alexnet-owt-7be5be79.pth in the models folder; default 0: pixel L2 only)")
    edit.add_argument("--checkpoint", default=None,
                      help="HyperStyle or SFE checkpoint: registry name or file (default hyperstyle_ffhq, with "
                           "--engine sfe sfe_editor_light)")
    edit.add_argument("--encoder", default=None,
                      help="initial encoder: faces_w_encoder (W), e4e_ffhq_encode (W+) or a file (default "
                           "faces_w_encoder, with --engine sfe e4e_ffhq_encode, which SFE needs)")
    edit.add_argument("--generator", default="stylegan2-ffhq-config-f",
                      help="--engine sfe: the StyleGAN2 generator SFE decodes with, registry name or file (default "
                           "stylegan2-ffhq-config-f)")
    edit.add_argument("--detector", default="retinaface_resnet50",
                      help="face detector: retinaface_resnet50, retinaface_mobilenet0.25 or a file")
    edit.add_argument("--faces", choices=["largest", "all"], default="largest",
                      help="edit the largest face of each photo, or every face (default largest)")
    edit.add_argument("--all-faces", dest="faces", action="store_const", const="all",
                      help="edit every face of each photo (same as --faces all)")
    edit.add_argument("--threshold", type=float, default=0.9,
                      help="face detection confidence, between 0 and 1 (default 0.9)")
    edit.add_argument("--align-size", type=int, choices=[256, 512, 1024], default=1024,
                      help="size of the aligned face crops (default 1024)")
    edit.add_argument("--feather", type=float, default=32.0, help="paste-back mask softness in pixels (default 32)")
    edit.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    edit.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                      help="auto: fp32 on CPU, half precision on GPUs that support it; fp16 on the CPU runs fp32 "
                           "(with a warning: it is many times slower there)")
    edit.add_argument("--models-dir", type=Path, default=None,
                      help="where weights are looked up and downloaded (default $HYPERSTYLE_MODELS_DIR or the user "
                           "cache)")
    edit.add_argument("--offline", action="store_true",
                      help="never download; use only files already present (a missing one is listed with its URL "
                           "and where to save it)")
    edit.add_argument("--save-aligned", action="store_true", help="also write the aligned face crops")
    edit.add_argument("--save-inversion", action="store_true",
                      help="also write each inversion (codes + offsets) as .safetensors, to edit again later")
    return parser


def parse_edits(items: list) -> list:
    edits = []
    for item in items:
        name, sep, strength = item.rpartition("=")
        if not sep or not name:
            raise ValueError(f"--edit {item!r}: expected NAME=STRENGTH, e.g. age=+2")
        try:
            value = float(strength)
        except ValueError:
            raise ValueError(f"--edit {item!r}: strength {strength!r} is not a number") from None
        edits.append((EDIT_ALIASES.get(name, name), value))
    return edits


def parse_text_edit(text):
    """'NEUTRAL -> TARGET' -> (neutral, target), or None."""
    if text is None:
        return None
    neutral, sep, target = text.partition("->")
    if not sep or not neutral.strip() or not target.strip():
        raise ValueError(f"--text {text!r}: expected 'NEUTRAL -> TARGET', e.g. 'face with hair -> face with curly "
                         f"hair'")
    return neutral.strip(), target.strip()


def parse_layers(text):
    if text is None:
        return 0, -1
    start, sep, end = text.partition(":")
    if not sep:
        raise ValueError(f"--layers {text!r}: expected START:END, e.g. 4:8")
    try:
        return int(start or 0), int(end) if end else -1
    except ValueError:
        raise ValueError(f"--layers {text!r}: START and END must be whole numbers, e.g. 4:8") from None


def apply_engine_defaults(args) -> None:
    """--engine picks the default checkpoint and encoder, and refuses the HyperStyle-only steps for SFE."""
    _, checkpoint, encoder = ENGINES[args.engine]
    if args.engine == "sfe":
        given = ["--iterations"] if args.iterations is not None else []
        given += ["--optimize-steps"] if args.optimize_steps else []
        if given:
            raise ValueError(f"{' and '.join(given)}: HyperStyle only; --engine sfe inverts in one pass (its F-space "
                             f"features keep the detail) and edits with --edit and --text")
    args.checkpoint = args.checkpoint if args.checkpoint is not None else checkpoint
    args.encoder = args.encoder if args.encoder is not None else encoder
    args.iterations = args.iterations if args.iterations is not None else 5


def check_numbers(args) -> None:
    """Values argparse accepts but the run cannot use: refused before anything loads."""
    if args.iterations < 0:
        raise ValueError(f"--iterations {args.iterations}: must be 0 or more (0 = the initial encoder only)")
    if not 0.0 < args.threshold < 1.0:
        raise ValueError(f"--threshold {args.threshold}: must be between 0 and 1 (exclusive), e.g. 0.9")
    if not args.feather >= 0:
        raise ValueError(f"--feather {args.feather}: must be 0 or more pixels")
    if args.optimize_steps < 0 or not args.optimize_lr > 0 or not args.optimize_lpips >= 0:
        raise ValueError("--optimize-steps must be 0 or more, --optimize-lr above 0 and --optimize-lpips 0 or more")


def find_photos(path: Path) -> list:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file())
    raise FileNotFoundError(f"{path} does not exist")


def prepare_out_folder(folder: Path) -> None:
    """Create --out and make sure a file can be created in it, before any model loads or photo is processed."""
    import tempfile

    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {folder} is a file, not a folder; give a folder for the results")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):  # a probe: permissions, read-only mounts, quotas
            pass
    except OSError as err:
        raise ValueError(f"--out {folder}: cannot write there ({err.strerror or err}); choose a folder you can "
                         "write to") from None


def output_stems(photos: list) -> dict:
    """One result name per photo: its stem, plus its extension where photos share a stem (same.jpg, same.png)."""
    counts = Counter(p.stem.casefold() for p in photos)
    return {p: p.stem if counts[p.stem.casefold()] == 1 else f"{p.stem}_{p.suffix[1:]}" for p in photos}


def write_new_file(folder: Path, stem: str, suffix: str, write) -> Path:
    """`write(handle)` into `<stem><suffix>`, or the first free `<stem>_N<suffix>`: never replaces a file.

    Exclusive creation (not a separate existence check) also refuses a file or link that appears meanwhile.
    """
    for n in range(MAX_NAME_TRIES):
        path = folder / (f"{stem}{suffix}" if n == 0 else f"{stem}_{n}{suffix}")
        try:
            handle = open(path, "xb")
        except FileExistsError:
            continue
        try:
            with handle:
                write(handle)
        except BaseException:
            path.unlink()  # our own half-written file
            raise
        return path
    raise FileExistsError(f"no free name for {stem}{suffix} in {folder} after {MAX_NAME_TRIES} tries")


# ---------------------------------------------------------------------------------------------------------------
# Weights a run needs, checked together up front


@dataclass(frozen=True)
class NeededFile:
    option: str   # what the user typed to ask for it, e.g. "--edit age=2"
    name: str     # registry name or file
    kinds: tuple  # registry kinds that fit this place


@dataclass(frozen=True)
class MissingFile:
    need: NeededFile
    entry: object   # downloads.RegistryEntry
    target: Path    # where a download (or a manual copy) goes
    problem: str    # "" when absent, else why the copy there is unusable


def needed_files(args, edits: list) -> list:
    needs = [NeededFile(f"--detector {args.detector}", args.detector, ("face_detector",)),
             NeededFile(f"--checkpoint {args.checkpoint}", args.checkpoint, ENGINES[args.engine][0])]
    if args.encoder and args.encoder != "none":
        needs.append(NeededFile(f"--encoder {args.encoder}", args.encoder, ("w_encoder", "e4e")))
    if args.engine == "sfe":
        needs.append(NeededFile(f"--generator {args.generator}", args.generator, ("generator",)))
    for item, (name, _) in zip(args.edit, edits):
        if menu.file_of(name) is not None:  # StyleSpace edits read no file
            needs.append(NeededFile(f"--edit {item}", menu.file_of(name), ("direction", "ganspace")))
    return needs


def check_needed_files(needs: list, offline: bool) -> tuple:
    """(usage errors, missing registry files) for every file the run needs, without downloading anything.

    A name that is neither a file nor a registry name of the right kind is a usage error (listing the known names).
    A registry file with no copy in the models folder is missing; offline, so is one whose copy fails its check.
    """
    from .loaders import downloads

    folders = downloads.model_folders()
    registry = downloads.load_registry()
    errors, missing = [], []
    for need in needs:
        text = need.name.strip()
        if text and (Path(text).expanduser().is_file() or any((folder / text).is_file() for folder in folders)):
            continue  # the user's own file: whether it loads is checked when it loads
        entry = registry.get(text) or next((e for e in registry.values() if e.local_name == text), None)
        if entry is None or entry.kind not in need.kinds:
            known = [alias for alias, name in EDIT_ALIASES.items() if "direction" in need.kinds and name in registry]
            known += [name for name, e in registry.items() if e.kind in need.kinds]
            what = (f"is a {entry.kind} model, which does not fit here" if entry is not None else
                    f"is no file, not in the models folder ({', '.join(map(str, folders))}), and no known name")
            errors.append(f"{need.option}: '{text}' {what}. Known names: {', '.join(known)}; or give a file.")
            continue
        copies = [folder / entry.local_name for folder in folders if (folder / entry.local_name).is_file()]
        if any(item.entry == entry for item in missing):
            continue  # asked for twice (--edit age=1 --edit age=-1): listed once
        if copies and not offline:
            continue  # resolve() checks it, and downloads it again if it is unusable
        problems = [downloads.check_file(copy, entry) for copy in copies]
        if copies and None in problems:
            continue
        problem = f"the copy at {copies[0]} is unusable: {problems[0]}" if copies else ""
        missing.append(MissingFile(need, entry, folders[0] / entry.local_name, problem))
    return errors, missing


def describe_missing(missing: list) -> str:
    lines = []
    for item in missing:
        note = f" ({item.problem})" if item.problem else ""
        lines.append(f"  {item.need.option}: {item.entry.url}{note}\n      save as {item.target}")
    return "\n".join(lines)


def offline_reason(args) -> str:
    """Why nothing can be downloaded, in the user's own terms ('' when downloads are allowed)."""
    if args.offline:
        return "--offline was given"
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return "the HF_HUB_OFFLINE environment variable is set"
    return ""


# ---------------------------------------------------------------------------------------------------------------
# The run


def run_edit(args) -> int:
    try:
        edits, layers, text_edit = parse_edits(args.edit), parse_layers(args.layers), parse_text_edit(args.text)
        apply_engine_defaults(args)
        check_numbers(args)
        photos = find_photos(args.input)
        if not photos:
            raise ValueError(f"no photos ({', '.join(sorted(PHOTO_SUFFIXES))}) in {args.input}")
        prepare_out_folder(args.out)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE

    if args.models_dir is not None:
        os.environ["HYPERSTYLE_MODELS_DIR"] = str(args.models_dir)
    offline = offline_reason(args)
    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    from .loaders.downloads import WeightsError
    try:
        errors, missing = check_needed_files(needed_files(args, edits), offline=bool(offline))
    except WeightsError as err:  # the registry itself is unreadable
        print(f"error: {err}", file=sys.stderr)
        return EXIT_WEIGHTS
    if errors:
        print("\n".join(f"error: {e}" for e in errors), file=sys.stderr)
        return EXIT_USAGE
    if missing and offline:
        print(f"error: {len(missing)} weight file(s) this run needs are missing or unusable, and {offline}, so "
              f"nothing is downloaded. Download each by hand and save it as shown, or run without offline mode to "
              f"download them automatically:\n{describe_missing(missing)}", file=sys.stderr)
        return EXIT_WEIGHTS
    return _edit_photos(args, edits, layers, text_edit, photos, missing)


def _edit_photos(args, edits, layers, text_edit, photos, missing) -> int:
    import warnings

    import numpy as np
    import torch
    from PIL import Image, ImageOps
    from tqdm import tqdm

    from . import image_checks, ops
    from .faces import alignment
    from .stylegan2 import warmup
    from .loaders.downloads import WeightsUnavailableError
    from .loaders.manager import get_manager

    try:
        device = get_manager().get_device(args.device)
    except ValueError as err:
        print(f"error: --device {args.device}: {err}", file=sys.stderr)
        return EXIT_USAGE
    precision = args.precision
    if precision == "fp16" and device.type == "cpu":
        # PyTorch's CPU fp16 kernels are slow (8x fp32 for one refinement pass of the tiny test model).
        print("warning: --precision fp16 on the CPU runs fp32 instead: fp16 is many times slower there. Use a GPU "
              "for fp16, or --precision bf16 to halve the memory on the CPU.", file=sys.stderr)
        precision = "fp32"

    from .editing.styleclip import StyleClipError

    option = f"--detector {args.detector}"
    try:
        detector = ops.load_detector(args.detector, args.device)
        option = f"--checkpoint {args.checkpoint} / --encoder {args.encoder}"
        model = ops.load_model(args.checkpoint, args.encoder, precision, args.device, args.generator)
        if model.engine != args.engine:
            print(f"error: --checkpoint {args.checkpoint} is a {model.engine} checkpoint, but --engine is "
                  f"{args.engine}; give --engine {model.engine} or a {args.engine} checkpoint", file=sys.stderr)
            return EXIT_USAGE
        for item, (name, _) in zip(args.edit, edits):  # fail early on a bad direction, before any photo
            option = f"--edit {item}"
            ops.load_edit(name, model.n_styles, model.use().generator.style_dim)
        if text_edit is not None:  # likewise for the text edit's files, CLIP and prompts
            option = f"--text {args.text}"
            ops.text_direction(model, *text_edit, args.beta)
        if args.optimize_steps > 0:  # and the iterator's loss networks
            from .engines.hyperstyle.optimize import image_losses
            option = f"--optimize-lpips {args.optimize_lpips}"
            image_losses(1.0, args.optimize_lpips)
    except StyleClipError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except WeightsUnavailableError as err:  # a download failed (no network): name every file still missing
        others = [m for m in missing if f"'{m.entry.name}'" not in str(err)]
        print(f"error: {err}" + (f"\nAlso not downloaded yet:\n{describe_missing(others)}" if others else ""),
              file=sys.stderr)
        return EXIT_WEIGHTS
    except Exception as err:  # a file that is there but unusable: wrong format, shapes or keys, a torch error
        print(f"error: {option}: cannot be used: {err if str(err) else type(err).__name__}", file=sys.stderr)
        return EXIT_WEIGHTS

    stems = output_stems(photos)
    renamed = [f"{p.name} -> {stems[p]}_edited.png" for p in photos if stems[p] != p.stem]
    if renamed:
        print(f"note: photos that share a name get results named after the whole file name: {', '.join(renamed)}",
              file=sys.stderr)

    def save_png(image_hwc, stem: str) -> Path:
        pixels = (image_hwc.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        path = write_new_file(args.out, stem, ".png", lambda f: Image.fromarray(pixels).save(f, format="PNG"))
        if path.stem != stem:
            tqdm.write(f"note: {args.out / (stem + '.png')} already exists; wrote {path.name} instead")
        return path

    done, no_face, failed = 0, [], []
    for path in tqdm(photos, desc="HyperStyle", unit="photo"):
        stem = stems[path]
        try:
            with warnings.catch_warnings():  # PIL only warns between its pixel limit and twice that
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as photo:  # phones store rotation in EXIF; ComfyUI's Load Image applies it too
                    pixels = torch.from_numpy(np.array(ImageOps.exif_transpose(photo).convert("RGB")))
            image = image_checks.rgb_bhwc(pixels)  # uint8 -> [1, H, W, 3] in [0, 1], as every path does
            faces, records = alignment.align_batch(image, detector, args.align_size, args.faces, 0, args.threshold,
                                                   "error")
            with warmup.listening(tqdm.write):  # "first run at batch N: compiling..." between the bar's lines
                latent, _ = ops.encode(model, faces)
                offsets = None  # SFE's inversion is finished after encoding
                if model.engine == ops.HYPERSTYLE:
                    offsets, _ = ops.refine(model, faces, latent, args.iterations)
                if args.optimize_steps > 0:
                    latent, offsets, _ = _optimize(ops, model, faces, latent, offsets, args, tqdm)
                edited = latent
                for name, strength in edits:
                    edited = ops.apply_edit(edited, name, strength, *layers)
                if text_edit is None:
                    decoded = ops.decode(model, edited, offsets)
                else:
                    decoded = ops.text_edit(model, edited, *text_edit, args.alpha, args.beta, offsets)
            result, _ = alignment.paste_back_batch(image, decoded, records, feather=args.feather)
            save_png(result[0], f"{stem}_edited")
            if args.save_aligned:
                for i, face in enumerate(faces):
                    save_png(face, f"{stem}_aligned{'' if len(faces) == 1 else f'_{i}'}")
            if args.save_inversion:
                ops.save_inversion(args.out, f"{stem}_inversion", latent, offsets)  # picks a free name itself
        except alignment.NoFaceError as err:
            no_face.append(path.name)
            tqdm.write(f"{path.name}: {err}")
            continue
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            failed.append(path.name)
            tqdm.write(f"{path.name}: skipped: {err} Downscale it below {Image.MAX_IMAGE_PIXELS:,} pixels to edit it.")
            continue
        except Exception as err:  # one bad photo (unreadable, odd layout, disk full) must not stop the others
            failed.append(path.name)
            tqdm.write(f"{path.name}: failed: {err if str(err) else type(err).__name__}")
            continue
        done += 1

    print(f"edited {done} of {len(photos)} photo(s) into {args.out}"
          + (f"; no face found in: {', '.join(no_face)}" if no_face else "")
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    if done == 0 and no_face and not failed:
        print("error: no face was found in any photo. Lower --threshold (e.g. 0.5), use photos where the face "
              "is larger, or check the input folder.", file=sys.stderr)
        return EXIT_NO_FACE
    return EXIT_OK if not (no_face or failed) else EXIT_PARTIAL


def _optimize(ops, model, faces, latent, offsets, args, tqdm):
    """The iterator after HyperStyle's refinement, with a progress bar of its own."""
    with tqdm(total=args.optimize_steps, desc="optimize", unit="step", leave=False) as bar:
        return ops.optimize(model, faces, latent, args.optimize_steps, args.optimize_lr, lpips=args.optimize_lpips,
                            offsets=offsets, on_step=lambda done, total, current: bar.update(1))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "edit":
        return run_edit(args)
    return EXIT_USAGE
