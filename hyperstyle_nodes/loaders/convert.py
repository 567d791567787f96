"""Convert a released .pt checkpoint to .safetensors (no pickle; faster, safer loading).

    python -m hyperstyle_nodes.loaders.convert hyperstyle_ffhq.pt hyperstyle_ffhq.safetensors
    python -m hyperstyle_nodes.loaders.convert S_mean_std S_mean_std.safetensors

The file's kind and options go into the safetensors metadata; loading the result gives bit-identical outputs.
StyleCLIP's `S_mean_std` (a pickle of numpy arrays, told apart by its name) is read without running code.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..editing import styleclip
from .checkpoints import CheckpointError, read_checkpoint, save_safetensors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hyperstyle_nodes.loaders.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help="a HyperStyle, W-encoder, e4e or StyleGAN2 (.pt/.pth) checkpoint, "
                                                 "or StyleCLIP's S_mean_std")
    parser.add_argument("output", type=Path, help="where to write the .safetensors file")
    parser.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    args = parser.parse_args(argv)
    if args.output.suffix != ".safetensors":
        parser.error(f"OUTPUT must end in .safetensors, got {args.output.name}")
    if args.output.exists() and not args.force:
        parser.error(f"{args.output} exists; pass --force to overwrite it")
    if args.input.name.startswith(styleclip.S_STATS_FILE):
        try:
            styleclip.convert_s_statistics(args.input, args.output)
        except (styleclip.StyleClipError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"wrote {args.output} ({args.output.stat().st_size:,} bytes)")
        return 0
    try:
        ckpt = read_checkpoint(args.input)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    save_safetensors(ckpt, args.output)
    print(f"{ckpt.describe()}\nwrote {args.output} ({args.output.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
