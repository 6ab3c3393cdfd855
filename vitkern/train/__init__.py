"""Training ViTs with vitkern's kernels: `python -m vitkern.train` (torchrun-ready).

    cli.py         the command line (every recipe field is a flag)
    recipes.py     `Recipe` and the presets: the paper's pre-training / fine-tuning / MPP, embedded digits
    data.py        digits (scikit-learn), ImageFolder directories, the resumable distributed sampler
    loop.py        the loop: DDP / FSDP2, precision, accumulation, clipping, evaluation, metrics
    mpp.py         masked patch prediction (paper section 4.6)
    checkpoint.py  safetensors weights + training state, atomic, resumable; DCP under FSDP2
    metrics.py     metrics.csv, summary.json, curves.png, the progress bar
"""

from vitkern.train.recipes import PRESETS, Recipe, preset


def train(recipe: Recipe):
    """Run a training recipe; see `vitkern.train.loop.train`."""
    from vitkern.train.loop import train as _train

    return _train(recipe)


__all__ = ["PRESETS", "Recipe", "preset", "train"]
