"""rcic-predict: trained weights -> submission.csv (TTA, both sites, ensemble, plate assignment).

Runs offline on CPU or GPU. With no --checkpoint it predicts with the newest finished
weights.pt found under /kaggle/input (when it exists) and runs/. Weights trained on plate
batches predict each test plate with its own BatchNorm statistics (AdaBN) unless --adabn off.
"""
import json
from pathlib import Path

from rcic.adabn import MODES as ADABN_MODES
from rcic.cli.common import ArgumentParser, open_data
from rcic.errors import cli_main
from rcic.logs import setup_logging
from rcic.plates import MODES
from rcic.submission import check_output_path


def run(argv):
    p = ArgumentParser(prog="rcic-predict", description=__doc__)
    p.add_argument("--data", help="RxRx1 folder (default: the embedded synthetic data)")
    p.add_argument("--checkpoint", action="append", metavar="PATH",
                   help="weights.pt or a stage output folder; repeat for an ensemble "
                        "(default: the newest under /kaggle/input and runs/)")
    p.add_argument("--out", required=True, help="submission CSV to write, e.g. submission.csv")
    p.add_argument("--tta", type=int, default=8, help="TTA views, 1 (none) to 8 (default 8)")
    p.add_argument("--plates", default="assign", choices=MODES,
                   help="plate step: assign (default), mask, or off (plain argmax)")
    p.add_argument("--adabn", default="auto", choices=ADABN_MODES,
                   help="per-plate BatchNorm statistics (AdaBN): each test plate predicted with "
                        "statistics of its own images; auto (default) = on for weights trained "
                        "with data.plate_batches, off for the others")
    p.add_argument("--batch-size", type=int, default=64,
                   help="sites per batch; with --adabn also the batch its statistics come from")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--workers", type=int, default=0, help="image loader processes (default 0)")
    p.add_argument("--cache", default="", help="decoded-image cache of this data at the model's "
                                               "image size (default: decode the PNGs)")
    args = p.parse_args(argv)

    check_output_path(args.out)          # before any work: prediction can take an hour
    from rcic.predict import REPORT_NAME, describe, run_prediction   # torch after the args
    setup_logging()
    data = args.data or open_data(None)   # a folder is opened after the cheaper checks
    report = run_prediction(data, args.out, args.checkpoint or (), args.tta, args.plates,
                            args.adabn, args.batch_size, args.device, args.workers, args.cache)
    print(*describe(report), sep="\n")
    print(json.dumps({"report": str(Path(report["submission"]).parent / REPORT_NAME)}))


def main(argv=None):
    return cli_main("rcic-predict", run, argv)
