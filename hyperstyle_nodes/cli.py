"""Headless photo editing: align -> encode -> refine -> edit -> decode -> paste back, with the nodes' code.

    python -m hyperstyle_nodes edit photo.jpg --edit age=+2 --edit smile=-1 --out edited/
    python -m hyperstyle_nodes edit photos/ --edit pose=3 --out edited/ --save-aligned --save-inversion

Default weights download on first use (from the Hugging Face Hub into $HYPERSTYLE_MODELS_DIR or the user cache).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_USAGE, EXIT_NO_FACE, EXIT_WEIGHTS, EXIT_PARTIAL = 0, 2, 3, 4, 5
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
EDIT_ALIASES = {"age": "interfacegan_age", "smile": "interfacegan_smile", "pose": "interfacegan_pose"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hyperstyle_nodes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    edit = commands.add_parser("edit", help="edit the faces in photos and paste them back",
                               description="Align every face, invert it with HyperStyle, apply the edits, decode "
                                           "and paste the result back into the photo (same size as the input).")
    edit.add_argument("input", type=Path, help="a photo, or a folder of photos (jpg/png/webp/bmp/tif)")
    edit.add_argument("--out", type=Path, required=True, help="folder for the results (created if missing)")
    edit.add_argument("--edit", action="append", default=[], metavar="NAME=STRENGTH",
                      help="an edit, repeatable: age, smile or pose (InterFaceGAN), a registry name, or a direction "
                           "file (.pt/.npy/.safetensors); STRENGTH may be negative, e.g. --edit age=-2. "
                           "With no --edit the photos are only reconstructed")
    edit.add_argument("--text", default=None, metavar="'NEUTRAL -> TARGET'",
                      help="a text edit (StyleCLIP global direction), e.g. --text 'face with hair -> face with curly "
                           "hair'; needs fs3.npy, S_mean_std and templates.txt in <models dir>/styleclip/")
    edit.add_argument("--alpha", type=float, default=4.0, help="strength of --text (default 4; negative reverses)")
    edit.add_argument("--beta", type=float, default=0.13,
                      help="disentanglement of --text: channels with relevance below it stay (default 0.13)")
    edit.add_argument("--layers", default=None, metavar="START:END",
                      help="edit only style layers START..END-1 (default: all)")
    edit.add_argument("--iterations", type=int, default=5, help="HyperStyle refinement passes (default 5)")
    edit.add_argument("--checkpoint", default="hyperstyle_ffhq", help="HyperStyle checkpoint: registry name or file")
    edit.add_argument("--encoder", default="faces_w_encoder",
                      help="initial encoder: faces_w_encoder (W), e4e_ffhq_encode (W+) or a file")
    edit.add_argument("--detector", default="retinaface_resnet50",
                      help="face detector: retinaface_resnet50, retinaface_mobilenet0.25 or a file")
    edit.add_argument("--faces", choices=["largest", "all"], default="largest",
                      help="edit the largest face of each photo, or every face (default largest)")
    edit.add_argument("--threshold", type=float, default=0.9, help="face detection confidence (default 0.9)")
    edit.add_argument("--align-size", type=int, choices=[256, 512, 1024], default=1024,
                      help="size of the aligned face crops (default 1024)")
    edit.add_argument("--feather", type=float, default=32.0, help="paste-back mask softness in pixels (default 32)")
    edit.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    edit.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                      help="auto: fp32 on CPU, half precision on GPUs that support it")
    edit.add_argument("--models-dir", type=Path, default=None,
                      help="where weights are looked up and downloaded (default $HYPERSTYLE_MODELS_DIR or the user "
                           "cache)")
    edit.add_argument("--offline", action="store_true", help="never download; use only files already present")
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
    return int(start or 0), int(end) if end else -1


def find_photos(path: Path) -> list:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    raise FileNotFoundError(f"{path} does not exist")


def run_edit(args) -> int:
    # heavy imports after argument parsing, so --help is instant
    import numpy as np
    import torch
    from PIL import Image, ImageOps
    from tqdm import tqdm

    from . import alignment, ops
    from .checkpoints import CheckpointError
    from .downloads import WeightsError

    if args.models_dir is not None:
        os.environ["HYPERSTYLE_MODELS_DIR"] = str(args.models_dir)
    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        edits, layers, text_edit = parse_edits(args.edit), parse_layers(args.layers), parse_text_edit(args.text)
        photos = find_photos(args.input)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if not photos:
        print(f"error: no photos ({', '.join(sorted(PHOTO_SUFFIXES))}) in {args.input}", file=sys.stderr)
        return EXIT_USAGE

    from .styleclip import StyleClipError

    try:
        detector = ops.load_detector(args.detector, args.device)
        model = ops.load_model(args.checkpoint, args.encoder, args.precision, args.device)
        for name, _ in edits:  # fail early on a bad direction, before any photo is processed
            ops.load_edit(name, model.n_styles, model.use().generator.style_dim)
        if text_edit is not None:  # likewise for the text edit's files, CLIP and prompts
            ops.text_direction(model, *text_edit, args.beta)
    except StyleClipError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (WeightsError, CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_WEIGHTS

    args.out.mkdir(parents=True, exist_ok=True)
    done, no_face, failed = 0, [], []
    for path in tqdm(photos, desc="HyperStyle", unit="photo"):
        try:
            with Image.open(path) as photo:  # phones store rotation in EXIF; ComfyUI's Load Image applies it too
                image = torch.from_numpy(np.array(ImageOps.exif_transpose(photo).convert("RGB"))).float()[None] / 255
            faces, records = alignment.align_batch(image, detector, args.align_size, args.faces, 0, args.threshold,
                                                   "error")
            latent, _ = ops.encode(model, faces)
            offsets, _ = ops.refine(model, faces, latent, args.iterations)
            edited = latent
            for name, strength in edits:
                edited = ops.apply_edit(edited, name, strength, *layers)
            if text_edit is None:
                decoded = ops.decode(model, edited, offsets)
            else:
                decoded = ops.text_edit(model, edited, *text_edit, args.alpha, args.beta, offsets)
            result, _ = alignment.paste_back_batch(image, decoded, records, feather=args.feather)
        except alignment.NoFaceError as err:
            no_face.append(path.name)
            tqdm.write(f"{path.name}: {err}")
            continue
        except (ValueError, OSError) as err:
            failed.append(path.name)
            tqdm.write(f"{path.name}: {err}")
            continue
        _save(result[0], args.out / f"{path.stem}_edited.png")
        if args.save_aligned:
            for i, face in enumerate(faces):
                _save(face, args.out / f"{path.stem}_aligned{'' if len(faces) == 1 else f'_{i}'}.png")
        if args.save_inversion:
            ops.save_inversion(args.out, f"{path.stem}_inversion", latent, offsets)
        done += 1

    print(f"edited {done} of {len(photos)} photo(s) into {args.out}"
          + (f"; no face found in: {', '.join(no_face)}" if no_face else "")
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    if done == 0:
        if no_face and not failed:
            print("error: no face was found in any photo. Lower --threshold (e.g. 0.5), use photos where the face "
                  "is larger, or check the input folder.", file=sys.stderr)
            return EXIT_NO_FACE
        return EXIT_PARTIAL
    return EXIT_OK if not (no_face or failed) else EXIT_PARTIAL


def _save(image_hwc, path: Path) -> None:
    import numpy as np
    from PIL import Image
    Image.fromarray((image_hwc.clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(path)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "edit":
        return run_edit(args)
    return EXIT_USAGE
