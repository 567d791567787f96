"""Training HyperStyle for a new domain: `python -m hyperstyle_nodes.train {encoder,hypernet,synthetic}`.

    encoder    W-encoder for a StyleGAN2 generator (IR-SE-50 -> one W code; codes = latent_avg + E(x))
    hypernet   the hypernetwork, against the frozen generator and W-encoder (the official recipe's defaults)
    synthetic  self-check on a random generator, no data needed (`--synthetic`)

Files: cli.py (command line), runs.py (options -> a stage), stages.py (what a step computes), loop.py (steps,
validation, checkpoints, resume, stops), data.py, losses.py, models.py, checkpoint.py, logs.py, dist.py (torchrun),
synthetic.py. The networks are the engine's (hyperstyle_nodes.stylegan2.generator / encoders / hypernetwork / model);
checkpoints are written in the released format and load with `hyperstyle_nodes.load_hyperstyle`.
"""


def main(argv=None) -> int:
    from .cli import main as _main

    return _main(argv)


__all__ = ["main"]
