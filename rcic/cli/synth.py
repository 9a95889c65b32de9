"""rcic-synth: write the embedded RxRx1-shaped synthetic dataset to a folder.

`--preset rxrx1` writes the competition's own shape (its 51 experiments by name, 1,108 siRNAs,
308 wells a plate) at the pixel size you pick; `--fraction` keeps a share of its experiments.
"""
import os

from rcic.data.synthetic import CELL_TYPES, SynthSpec, generate, rxrx1_spec
from rcic.cli.common import ArgumentParser
from rcic.errors import UserError, cli_main

# Options that shape the experiments and plates: the preset fixes them.
SHAPE_OPTIONS = ("classes", "controls", "experiments", "test_experiments", "cell_types")


def run(argv):
    p = ArgumentParser(prog="rcic-synth", description=__doc__)
    p.add_argument("--out", required=True, help="folder to create (must not exist or be empty)")
    p.add_argument("--preset", choices=["rxrx1"],
                   help="rxrx1: the competition's experiments, plates and siRNAs")
    p.add_argument("--fraction", type=float, default=1.0,
                   help="with --preset: keep the first ceil(fraction x n) train and test "
                        "experiments of each cell type")
    p.add_argument("--classes", type=int,
                   help=f"treatment siRNAs, a multiple of 4 (1108 as in RxRx1; default "
                        f"{SynthSpec.n_classes})")
    p.add_argument("--controls", type=int,
                   help=f"positive controls a plate (30 in RxRx1; default "
                        f"{SynthSpec.n_positive_controls})")
    p.add_argument("--size", type=int, default=SynthSpec.image_size, help="image side in pixels")
    p.add_argument("--experiments", type=int,
                   help=f"train experiments per cell type (default {SynthSpec.train_experiments})")
    p.add_argument("--test-experiments", type=int,
                   help=f"test experiments per cell type (default {SynthSpec.test_experiments})")
    p.add_argument("--cell-types", nargs="+", choices=CELL_TYPES,
                   help="cell types to write (default: all four)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count(),
                   help="processes writing plates at once (default: one a CPU core); the "
                        "files are the same whatever the number")
    args = p.parse_args(argv)
    if args.preset:
        given = [f"--{name.replace('_', '-')}" for name in SHAPE_OPTIONS
                 if getattr(args, name) is not None]
        if given:
            raise UserError(f"--preset {args.preset} fixes the experiments and plates: leave out "
                            f"{', '.join(given)} (use --fraction for a smaller set)")
        spec = rxrx1_spec(args.size, seed=args.seed, fraction=args.fraction)
    else:
        if args.fraction != 1.0:
            raise UserError("--fraction needs --preset rxrx1: use --experiments and "
                            "--test-experiments to choose the counts yourself")
        defaults = SynthSpec()
        spec = SynthSpec(
            n_classes=_or(args.classes, defaults.n_classes),
            n_positive_controls=_or(args.controls, defaults.n_positive_controls),
            image_size=args.size, train_experiments=_or(args.experiments, defaults.train_experiments),
            test_experiments=_or(args.test_experiments, defaults.test_experiments),
            cell_types=_or(args.cell_types, defaults.cell_types), seed=args.seed)
    out = generate(args.out, spec, progress=None, workers=args.workers)
    print(f"wrote synthetic RxRx1 data to {out}")


def _or(value, default):
    return default if value is None else value


def main(argv=None):
    return cli_main("rcic-synth", run, argv)
