"""rcic-synth: write the embedded RxRx1-shaped synthetic dataset to a folder."""

from rcic.data.synthetic import CELL_TYPES, SynthSpec, generate
from rcic.cli.common import ArgumentParser
from rcic.errors import cli_main


def run(argv):
    p = ArgumentParser(prog="rcic-synth", description=__doc__)
    p.add_argument("--out", required=True, help="folder to create (must not exist or be empty)")
    p.add_argument("--classes", type=int, default=SynthSpec.n_classes,
                   help="treatment siRNAs, a multiple of 4 (1108 as in RxRx1)")
    p.add_argument("--controls", type=int, default=SynthSpec.n_positive_controls,
                   help="positive controls a plate (30 in RxRx1)")
    p.add_argument("--size", type=int, default=SynthSpec.image_size, help="image side in pixels")
    p.add_argument("--experiments", type=int, default=SynthSpec.train_experiments,
                   help="train experiments per cell type")
    p.add_argument("--test-experiments", type=int, default=SynthSpec.test_experiments)
    p.add_argument("--cell-types", nargs="+", default=list(CELL_TYPES), choices=CELL_TYPES)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    spec = SynthSpec(n_classes=args.classes, n_positive_controls=args.controls,
                     image_size=args.size, train_experiments=args.experiments,
                     test_experiments=args.test_experiments, cell_types=args.cell_types,
                     seed=args.seed)
    out = generate(args.out, spec, progress=None)
    print(f"wrote synthetic RxRx1 data to {out}")


def main(argv=None):
    return cli_main("rcic-synth", run, argv)
