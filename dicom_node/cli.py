"""``dicom-node``: the one command line. It wires parts together and reports; no logic lives here."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node import __version__
from dicom_node.observe.logs import configure as configure_logs
from storage.errors import DatabaseError
from storage.states import JobState

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from dicom_node.config import NodeConfig
    from inference.lab.training import TrainingConfig

log = logging.getLogger("dicom_node")

EXIT_OK, EXIT_SOME_REJECTED, EXIT_USAGE, EXIT_NONE_ANALYZED = 0, 1, 2, 3
#: The smallest nodule reported by default (chosen by the cross-case protocol: see
#: docs/model-card.md); config.yaml's detection.min_diameter_mm overrides it at run time.
MIN_DIAMETER_MM = 4.0


def _train(args: argparse.Namespace) -> int:
    from dicom_node.lab.commands import train
    from inference.lab.nodule_folder import NoduleSplit

    split = NoduleSplit(seed=args.split_seed)
    train(
        args.data,
        args.out,
        _training_config(args),
        args.nodules,
        split,
        args.fp_per_scan,
        args.min_diameter_mm,
        args.device,
        bool(args.detection_flips),
        bool(args.scan_relative),
    )
    return EXIT_OK


def _calibrate(args: argparse.Namespace) -> int:
    from dicom_node.lab.commands import calibrate
    from inference.lab.nodule_folder import NoduleSplit

    calibrate(
        args.data,
        args.weights,
        args.out or args.weights,
        args.nodules,
        NoduleSplit(seed=args.split_seed),
        args.fp_per_scan,
        args.min_diameter_mm,
        args.device,
        args.detection_flips,
        args.scan_relative,
    )
    return EXIT_OK


def _training_config(args: argparse.Namespace) -> TrainingConfig:
    from dataclasses import replace

    from inference.lab.training import TrainingConfig

    given = {
        name: getattr(args, name)
        for name in (
            "seed",
            "synthetic",
            "transplanted",
            "voi_views",
            "negatives",
            "voi_negatives",
            "hard_negatives",
            "rotations",
            "epochs",
        )
        if getattr(args, name, None) is not None
    }
    network = {
        name: getattr(args, name)
        for name in ("context", "slice_mm")
        if getattr(args, name, None) is not None
    }
    if network:
        given["network"] = replace(TrainingConfig().network, **network)
    return TrainingConfig(**given)


def _evaluate(args: argparse.Namespace) -> int:
    from dicom_node.lab.commands import evaluate, evaluate_cross_case, evaluate_nodules
    from inference.lab.nodule_folder import NoduleSplit

    if args.cross_case:
        if args.nodules is None or not args.data:
            print(
                "dicom-node evaluate --cross-case: name the annotated cases and --nodules FOLDER",
                file=sys.stderr,
            )
            return EXIT_USAGE
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        evaluate_cross_case(
            args.data,
            args.luna_csv,
            args.nodules,
            args.out,
            _training_config(args),
            NoduleSplit(seed=args.split_seed),
            seeds,
            args.fp_per_scan,
            args.device,
            args.transplant_scans,
            args.synthetic_scans,
            MIN_DIAMETER_MM,
            [n.strip() for n in args.held_out.split(",") if n.strip()],
            bool(args.detection_flips),
            bool(args.scan_relative),
        )
        return EXIT_OK
    if not args.data and args.nodules is None:
        print(
            "dicom-node evaluate: name annotated cases (LIDC-IDRI folders or archives), "
            "--nodules FOLDER, or both",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.nodules is not None:
        evaluate_nodules(
            args.nodules,
            args.out,
            args.weights,
            args.device,
            NoduleSplit(seed=args.split_seed),
            args.patients,
        )
    if not args.data:
        return EXIT_OK
    evaluate(
        args.data,
        args.out,
        args.weights,
        args.luna_csv,
        args.seed,
        args.synthetic_scans,
        args.device,
    )
    return EXIT_OK


def _analyze(args: argparse.Namespace) -> int:
    from dicom_node.analyze import analyze_paths

    return analyze_paths(args.paths, args.out, args.weights, args.device, args.config, args.prior)


def _node_config(args: argparse.Namespace) -> NodeConfig:
    from dicom_node.config import load_config

    return load_config(args.config)


def _serve(args: argparse.Namespace) -> int:
    from dicom_node.node import Node

    config = _node_config(args)
    if args.roles:
        everything = ["receiver", "worker", "sender"]
        named = [r.strip() for r in args.roles.split(",") if r.strip()]
        roles = everything if named == ["all"] else named
        unknown = sorted(set(roles) - set(everything))
        if unknown or not roles:
            print(
                f"--roles: {', '.join(unknown) or 'none given'}; expected all, or receiver, "
                "worker, sender separated by commas",
                file=sys.stderr,
            )
            return EXIT_USAGE
        config = config.model_copy(update={"node": config.node.model_copy(update={"roles": roles})})
    logging.getLogger().setLevel(logging.DEBUG if args.verbose else config.log_level)
    if not args.verbose:  # their INFO is one line per PDU or copied module: noise to an operator
        for chatty in ("pynetdicom", "highdicom", "alembic"):
            logging.getLogger(chatty).setLevel(logging.WARNING)
    Node(config, args.weights).run_until_signalled()
    return EXIT_OK


def _database(args: argparse.Namespace) -> sessionmaker[Session]:
    from storage.database import open_database

    return open_database(_node_config(args).storage.database_url)


def _status(args: argparse.Namespace) -> int:
    from dicom_node.ops.operations import status_lines

    print("\n".join(status_lines(_database(args))))
    return EXIT_OK


def _jobs(args: argparse.Namespace) -> int:
    from dicom_node.ops.operations import job_lines

    print("\n".join(job_lines(_database(args), args.state, args.limit)))
    return EXIT_OK


def _audit(args: argparse.Namespace) -> int:
    from dicom_node.ops.operations import audit_lines

    print("\n".join(audit_lines(_database(args), args.limit)))
    return EXIT_OK


def _retry(args: argparse.Namespace) -> int:
    from dicom_node.ops.operations import retry_job

    if not retry_job(_database(args), args.job):
        print(f"job {args.job}: not found, or still queued or running", file=sys.stderr)
        return EXIT_USAGE
    print(f"job {args.job}: queued again")
    return EXIT_OK


def _findings(args: argparse.Namespace) -> int:
    from dicom_node.ops.operations import series_findings

    try:
        entry = series_findings(_database(args), args.series)
    except KeyError as exc:
        print(f"dicom-node findings: {exc.args[0]}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(entry, indent=1))
    return EXIT_OK


def _resend(args: argparse.Namespace) -> int:
    from dicom_node.ops.operations import resend_series

    try:
        queued = resend_series(_database(args), _node_config(args), args.series)
    except KeyError as exc:
        print(f"dicom-node resend: {exc.args[0]}", file=sys.stderr)
        return EXIT_USAGE
    print(f"series {args.series}: {queued} delivery job(s) queued")
    return EXIT_OK


def _number(low: float, high: float, what: str) -> Callable[[str], float]:
    """An argparse type: a number from ``low`` to ``high``, refused in the parser's own
    words otherwise."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value

    return parse


_share = _number(0.0, 1.0, "a share from 0 to 1")
#: Thicker than any chest CT reconstruction read for nodules.
MAX_SLICE_MM = 10.0
_slice_thickness = _number(0.0, MAX_SLICE_MM, f"a slice thickness from 0 to {MAX_SLICE_MM:g} mm")


def _training_arguments(parser: argparse.ArgumentParser) -> None:
    """What shapes a training run besides its seed: the nodule folder's split, the patches
    and the epochs. Unset numbers take TrainingConfig's defaults (docs/model-card.md)."""
    _split_argument(parser)
    parser.add_argument("--synthetic", type=int, help="synthetic positive patches")
    parser.add_argument("--transplanted", type=int, help="patches of pasted real nodules")
    parser.add_argument("--voi-views", type=int, help="patches of real nodules as their VOI")
    parser.add_argument("--negatives", type=int, help="negative patches")
    parser.add_argument(
        "--voi-negatives",
        type=int,
        help="negative patches of real lung in the nodules' VOIs, away from the nodule",
    )
    parser.add_argument(
        "--hard-negatives",
        type=int,
        help="candidates added to each epoch of the second half: those the model then scores "
        "highest",
    )
    parser.add_argument(
        "--rotations",
        type=_share,
        help="share of training patches turned to a random 3D orientation in each batch",
    )
    parser.add_argument("--epochs", type=int)
    parser.add_argument(
        "--context",
        type=int,
        choices=(1, 2, 3),
        help="a second input channel showing N times the patch's field at 1/N of its "
        "resolution (1: none, the default)",
    )
    parser.add_argument(
        "--slice-mm",
        type=_slice_thickness,
        help="make every scan and real nodule look as reconstructed at this slice thickness "
        "before the network sees it, in training and when reading (stored with the weights; "
        "thicker scans pass unchanged; 0: as scanned, the default)",
    )
    _detection_arguments(parser)


def _detection_arguments(parser: argparse.ArgumentParser) -> None:
    """How a scan's candidates are scored: the operating point is chosen that way and
    stored with the weights. Unset: off, except that ``calibrate`` keeps what the weights
    hold."""
    parser.add_argument(
        "--detection-flips",
        action=argparse.BooleanOptionalAction,
        help="score the best candidates of a scan averaged over the eight flips of the patch axes",
    )
    parser.add_argument(
        "--scan-relative",
        action=argparse.BooleanOptionalAction,
        help="score each candidate by how far it stands out from the scan's own candidates "
        "(their median and spread) instead of as a probability",
    )


def _split_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--split-seed",
        type=int,
        default=20261203,
        help="how the nodule folder's patients fall into train, calibration and validation",
    )


def _operating_point_arguments(parser: argparse.ArgumentParser) -> None:
    """The budget an operating point is chosen for and the smallest size it reports."""
    parser.add_argument(
        "--fp-per-scan", type=float, default=1.0, help="budget the operating point is chosen for"
    )
    parser.add_argument(
        "--min-diameter-mm",
        type=float,
        default=MIN_DIAMETER_MM,
        help="smallest nodule the operating point reports (stored with the weights)",
    )
    parser.add_argument("--device", default="auto")


def build_parser() -> argparse.ArgumentParser:
    from inference.detector import DEFAULT_WEIGHTS

    parser = argparse.ArgumentParser(prog="dicom-node", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dicom-node {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="one line per event for people, or one JSON object per line for log collectors",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    analyze = sub.add_parser(
        "analyze", help="find nodules in CT series on disk; write SR, SEG, key images"
    )
    analyze.add_argument("paths", nargs="+", type=Path, help="DICOM files or folders")
    analyze.add_argument("--out", type=Path, required=True, help="folder for the results")
    analyze.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    analyze.add_argument("--device", default="auto", help="auto, cpu, cuda")
    analyze.add_argument(
        "--config", type=Path, default=None, help="config.yaml (eligibility rules)"
    )
    analyze.add_argument(
        "--prior",
        nargs="+",
        type=Path,
        default=None,
        help="earlier CT of the same patient (files, folders, archives): each series is "
        "compared with the most recent eligible one (new, growing, stable, VDT, Lung-RADS)",
    )
    analyze.set_defaults(func=_analyze)

    train = sub.add_parser("train", help="train Res-MTNet on synthetic nodules in annotated CT")
    train.add_argument(
        "data", nargs="+", type=Path, help="LIDC-IDRI case folders or .tar.xz archives"
    )
    train.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    train.add_argument(
        "--nodules",
        type=Path,
        default=None,
        help="a folder of real nodules laid out like lidc-nodules: its training patients are "
        "pasted into the scans and teach the rating heads",
    )
    train.add_argument("--seed", type=int)
    _training_arguments(train)
    _operating_point_arguments(train)
    train.set_defaults(func=_train)

    calibrate = sub.add_parser(
        "calibrate",
        help="choose trained weights' operating point again (another way of scoring or "
        "budget), as train does at its end; the network stays as it is",
    )
    calibrate.add_argument(
        "data", nargs="+", type=Path, help="the LIDC-IDRI cases the weights were trained on"
    )
    calibrate.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    calibrate.add_argument(
        "--out", type=Path, default=None, help="where the weights go (default: --weights)"
    )
    calibrate.add_argument(
        "--nodules",
        type=Path,
        default=None,
        help="the real nodule folder the weights were trained with: its calibration "
        "patients are pasted into the calibration scans",
    )
    _split_argument(calibrate)
    _detection_arguments(calibrate)
    _operating_point_arguments(calibrate)
    calibrate.set_defaults(func=_calibrate)

    evaluate = sub.add_parser(
        "evaluate",
        help="FROC/CPM on synthetic and annotated scans, ratings of real nodules; markdown + PNG",
    )
    evaluate.add_argument(
        "data", nargs="*", type=Path, help="LIDC-IDRI case folders or .tar.xz archives"
    )
    evaluate.add_argument(
        "--nodules",
        type=Path,
        default=None,
        help="a folder laid out like lidc-nodules (metadata.csv, images, masks): writes "
        "nodule_predictions.csv, and a report where it has the readers' ratings; with "
        "--cross-case, its training patients train the protocol's models",
    )
    evaluate.add_argument(
        "--patients",
        choices=["train", "calibration", "validation"],
        default=None,
        help="with --nodules: only these patients of the folder by --split-seed (the model "
        "card's figures: validation, which the shipped weights never saw); default all",
    )
    _training_arguments(evaluate)
    evaluate.add_argument(
        "--cross-case",
        action="store_true",
        help="the cross-case protocol: per held-out case and seed, train without it (with "
        "--nodules' training patients), choose the operating point without it, score it",
    )
    evaluate.add_argument("--seeds", default="1,2,3", help="training seeds, comma-separated")
    evaluate.add_argument(
        "--held-out",
        default="",
        help="with --cross-case: hold out only these cases (names, comma-separated; default "
        "every case in turn), e.g. one direction per machine",
    )
    evaluate.add_argument(
        "--transplant-scans",
        type=int,
        default=12,
        help="with --cross-case: scans of the held-out case holding pasted validation nodules",
    )
    evaluate.add_argument(
        "--fp-per-scan", type=float, default=1.0, help="budget the operating point is chosen for"
    )
    evaluate.add_argument("--out", type=Path, required=True)
    evaluate.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    evaluate.add_argument(
        "--luna-csv", type=Path, default=None, help="LUNA16 reference rows for these series"
    )
    evaluate.add_argument("--seed", type=int, default=7)
    evaluate.add_argument(
        "--synthetic-scans", type=int, default=5, help="held-out synthetic scans per case"
    )
    evaluate.add_argument("--device", default="auto")
    evaluate.set_defaults(func=_evaluate)

    config_help = "config.yaml (default: the embedded defaults)"
    serve = sub.add_parser("serve", help="run the DICOM node: receive, analyze, send")
    serve.add_argument("--config", type=Path, default=None, help=config_help)
    serve.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    serve.add_argument(
        "--roles",
        default="",
        help="what this process does: all, or e.g. 'worker', 'receiver,sender' "
        "(default: node.roles in the config, all three)",
    )
    serve.set_defaults(func=_serve)

    status = sub.add_parser("status", help="what the node holds and what its queue is doing")
    status.add_argument("--config", type=Path, default=None, help=config_help)
    status.set_defaults(func=_status)

    jobs = sub.add_parser("jobs", help="recent jobs, newest first, with their last error")
    jobs.add_argument("--config", type=Path, default=None, help=config_help)
    jobs.add_argument("--state", type=JobState, choices=list(JobState))
    jobs.add_argument("--limit", type=int, default=50)
    jobs.set_defaults(func=_jobs)

    audit = sub.add_parser(
        "audit", help="recent audit events: associations, stored batches, deliveries"
    )
    audit.add_argument("--config", type=Path, default=None, help=config_help)
    audit.add_argument("--limit", type=int, default=50)
    audit.set_defaults(func=_audit)

    retry = sub.add_parser("retry", help="queue a failed (dead-lettered) or cancelled job again")
    retry.add_argument("job", type=int, help="job id (see `dicom-node jobs`)")
    retry.add_argument("--config", type=Path, default=None, help=config_help)
    retry.set_defaults(func=_retry)

    findings = sub.add_parser(
        "findings",
        help="a series' findings as findings.json has them (with the prior and each change)",
    )
    findings.add_argument("series", help="Series Instance UID of the analyzed CT series")
    findings.add_argument("--config", type=Path, default=None, help=config_help)
    findings.set_defaults(func=_findings)

    resend = sub.add_parser(
        "resend", help="send a series' results again to every destination (same SOP instances)"
    )
    resend.add_argument("series", help="Series Instance UID of the analyzed CT series")
    resend.add_argument("--config", type=Path, default=None, help=config_help)
    resend.set_defaults(func=_resend)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logs(logging.DEBUG if args.verbose else logging.WARNING, args.log_format == "json")
    try:
        return int(args.func(args))
    except (FileNotFoundError, ValueError, OSError, DatabaseError) as exc:
        print(f"dicom-node {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
