"""``atomstream export``: a trained run directory becomes a served artifact, with parity measured and recorded.

Which patches parity was measured on is printed (and written into the manifest): ``--parity-data`` if given, else
the run's own data source re-cut exactly as in training, else — only as a loudly announced fallback — seeded
uniform random patches. A parity failure prints one line naming the worst backend, output and error, and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from atomstream.cli import CommandError

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a trained run as encoder.onnx + encoder.ts + manifest.json (parity checked)",
        description="Export a trained run as encoder.onnx, encoder.ts and manifest.json, after checking that both "
        "backends match the Pyro guide's posterior means (max |Δ| <= 1e-4, identical class argmax) on >= 1024 patches.",
    )
    p.add_argument("run_dir", type=Path, help="run directory written by `atomstream train`")
    p.add_argument("--out", type=Path, required=True, help="artifact directory to write")
    p.add_argument("--triton", type=Path, default=None, help="also write a Triton model-repository entry here")
    p.add_argument("--fp16", action="store_true", help="also write encoder.fp16.onnx (for GPUs)")
    p.add_argument(
        "--parity-data",
        type=Path,
        default=None,
        help="patches to check parity on: .npz with 'patches' (preprocessed) or data cut like the run's own",
    )
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 17 to 20 (default 17)")
    p.add_argument(
        "--defect-class",
        action="append",
        default=[],
        metavar="CLASS",
        help="a class (name or index) the service flags as defect by default; repeatable",
    )
    p.add_argument(
        "--defect-score",
        choices=("contrast", "density", "combined"),
        default="contrast",
        help="the class-free defect score the server publishes (docs/real-data.md compares them; default contrast)",
    )
    p.set_defaults(func=_export)


def _defect_classes(given: list[str], names: tuple[str, ...]) -> tuple[int, ...]:
    out: list[int] = []
    for item in given:
        if item in names:
            out.append(names.index(item))
        elif item.isdigit() and int(item) < len(names):
            out.append(int(item))
        else:
            raise CommandError(
                f"--defect-class {item!r} is neither a class name {list(names)} nor an index below {len(names)}"
            )
    return tuple(dict.fromkeys(out))


def _calibration(model: object, run: object, kind: str) -> tuple[object, str]:
    """The defect score's statistics from the run's own training scan, and a line saying what was done; ``None``
    without a scan to re-cut (the server then calibrates on each frame)."""
    from exporters.calibrate import calibrate_novelty, training_patches
    from models.data import DataError

    source = run.data.source  # type: ignore[attr-defined]
    try:
        patches = training_patches(source, run.data)  # type: ignore[attr-defined]
    except DataError as exc:
        return None, f"warning: cannot re-cut the training scan {source!r} ({exc}); the server calibrates per frame"
    if patches is None:
        return None, (
            "warning: no training scan to calibrate the defect score on; the server will calibrate it on each frame "
            "instead (weaker)"
        )
    stats = calibrate_novelty(model, patches, kind=kind)  # type: ignore[arg-type]
    return stats, (
        f"defect score: {stats.kind}, calibrated on {stats.n_patches} training patches "
        f"(threshold median + {stats.k:g} robust sd: {stats.train_share_over.get(stats.kind, 0.0):.1%} of them over it)"
    )


def _export(args: argparse.Namespace) -> int:
    from exporters.export import ExportError, export_model
    from exporters.triton import TritonError, write_triton_model
    from exporters.verify import ParityError, parity_patches
    from models.checkpoint import CheckpointError, load_run
    from models.data import DataError

    if not args.run_dir.is_dir():
        raise CommandError(f"run directory {str(args.run_dir)!r} does not exist; train one with atomstream train")
    if not 17 <= args.opset <= 20:
        raise CommandError(f"--opset {args.opset} is not supported; use 17 to 20 (17 is the default)")
    if args.parity_data is not None and not args.parity_data.is_file():
        raise CommandError(f"--parity-data {str(args.parity_data)!r}: no such file")
    try:
        model, run = load_run(args.run_dir, device="cpu")
    except (CheckpointError, OSError, RuntimeError, ValueError) as exc:
        raise CommandError(f"cannot load run {str(args.run_dir)!r}: {str(exc).splitlines()[0]}") from None
    defects = _defect_classes(args.defect_class, run.model.names_of_classes())
    try:
        patches, described, notes = parity_patches(run, parity_data=args.parity_data)
    except DataError as exc:
        raise CommandError(f"--parity-data: {exc}") from None
    for note in notes:
        print(f"atomstream export: warning: {note}", file=sys.stderr)
    print(f"parity data: {described}")
    novelty, calibrated = _calibration(model, run, args.defect_score)
    try:
        manifest = export_model(
            model,
            run,
            args.out,
            parity_patches=patches,
            parity_data=described,
            opset=args.opset,
            fp16=args.fp16,
            defect_classes=defects,
            novelty=novelty,
        )
    except (ParityError, ExportError) as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"cannot write {str(args.out)!r}: {exc}") from None
    if novelty is not None:
        print(calibrated)
    else:
        print(f"atomstream export: {calibrated}", file=sys.stderr)
    for r in manifest.parity.backends:
        worst = max(r.max_abs_diff, key=lambda k: r.max_abs_diff[k])
        agree = "" if r.argmax_agreement is None else f", class argmax agreement {r.argmax_agreement:.4f}"
        print(
            f"parity {r.backend}: max |Δ| {r.max_abs_diff[worst]:.2e} ({worst}) <= {r.tolerance:g}{agree} "
            f"on {manifest.parity.n_patches} patches"
        )
    print(
        f"wrote {args.out}: {', '.join(sorted(manifest.files))}, manifest.json ({manifest.variant}, opset {args.opset})"
    )
    if args.triton is not None:
        try:
            entry = write_triton_model(args.triton, args.out, manifest)
        except (TritonError, OSError) as exc:
            raise CommandError(f"--triton {str(args.triton)!r}: {exc}") from None
        print(f"wrote Triton model {entry}")
    return 0
