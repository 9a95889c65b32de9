"""rcic-predict: trained weights -> submission.csv (TTA, both sites, ensemble, plate assignment).

Runs offline on CPU or GPU. With no --checkpoint it predicts with the newest finished
weights.pt found under /kaggle/input (when it exists) and runs/. Weights trained on plate
batches predict each test plate with its own BatchNorm statistics (AdaBN) unless --adabn off.
"""
import json
from pathlib import Path

from rcic.adabn import MODES as ADABN_MODES
from rcic.cli.common import ArgumentParser, open_data, setup_logging
from rcic.errors import cli_main
from rcic.plates import MODES
from rcic.search import KAGGLE_INPUT
from rcic.submission import check_output_path
LOCAL_RUNS = Path("runs")


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
    from rcic.predict import REPORT_NAME, pick_device, predict, resolve_checkpoints   # torch after the args
    from rcic.tta import views
    tta = views(args.tta)
    device = pick_device(args.device)
    setup_logging()
    data = open_data(args.data)
    roots = [r for r in (KAGGLE_INPUT, LOCAL_RUNS) if r.is_dir()]
    checkpoints = resolve_checkpoints(args.checkpoint, roots)
    report = predict(data, checkpoints, args.out, tta, args.plates, args.batch_size, device,
                     args.workers, args.cache, args.adabn)
    print(f"wrote {report['submission']} ({report['rows']} rows, checked against {data.root})")
    for mode, acc in report.get("accuracy", {}).items():
        cells = ", ".join(f"{c} {a:.3f}" for c, a in acc["per_cell_type"].items())
        print(f"accuracy --plates {mode}: {acc['overall']:.4f} ({cells})")
    if "plate_groups_correct" in report:
        print(f"test plates with the right siRNA group: {report['plate_groups_correct']}")
    print(json.dumps({"report": str(Path(report["submission"]).parent / REPORT_NAME)}))


def main(argv=None):
    return cli_main("rcic-predict", run, argv)
