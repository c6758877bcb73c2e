"""``atomstream export``: a trained run directory becomes a served artifact, with parity measured and recorded.

Which patches parity was measured on is printed (and written into the manifest): ``--parity-data`` if given, else
the run's own data source re-cut exactly as in training, else — only as a loudly announced fallback — seeded
uniform random patches. A parity failure prints one line naming the worst backend, output and error, and exits 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from atomstream.cli import CommandError
from atomstream.cli._flags import config_flag, from_config, in_flags

__all__ = ["register"]

_FLAGS = {"opset": "opset"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a trained run as encoder.onnx + encoder.ts + manifest.json (parity checked)",
        description="Export a trained run as encoder.onnx, encoder.ts and manifest.json, after checking that both "
        "backends match the Pyro guide's posterior means (max |Δ| <= 1e-4, identical class argmax) on >= 1024 patches.",
    )
    p.add_argument("run_dir", type=Path, help="run directory written by `atomstream train`")
    p.add_argument("--out", type=Path, required=True, help="artifact directory to write (new or empty)")
    p.add_argument(
        "--force",
        action="store_true",
        help="overwrite a non-empty --out (a running service may be serving it), and export a run whose class "
        "latent collapsed (diagnosis.json; the manifest records it)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--triton", type=Path, default=None, help="also write a Triton model-repository entry here (default: none)"
    )
    p.add_argument("--fp16", action="store_true", help="also write encoder.fp16.onnx (for GPUs)")
    p.add_argument(
        "--parity-data",
        type=Path,
        default=None,
        help="patches to check parity on: .npz with 'patches' (preprocessed) or data cut like the run's own "
        "(default: the run's own data source)",
    )
    config_flag(p, "--opset", type=int, where="exporters.export:export_model", field="opset", help="ONNX opset, 17..20")
    p.add_argument(
        "--defect-class",
        action="append",
        default=[],
        metavar="CLASS",
        help="a class (name or index) the service flags as defect by default; repeatable",
    )
    p.add_argument(
        "--defect-score",
        choices=("auto", "joint", "residual", "contrast", "density", "combined"),
        default="auto",
        help="the class-free defect score the server publishes. joint compares the decoder's redrawing of each "
        "patch (its likelihood and its residual) with the neighbours' (it runs the decoder on every patch); "
        "residual leaves the likelihood out; auto (the default) is joint unless the likelihood part flags more "
        "than 5x the residual's training patches (on the STM graphene scan its scan-line streaks), then residual "
        "(docs/real-data.md); contrast/density/combined read the encoder's outputs only (cheaper)",
    )
    p.add_argument(
        "--defect-k",
        type=float,
        default=None,
        metavar="K",
        help="the defect score's bars (the training scores' and each frame's own) at median + K robust sd "
        "(default 6; 4.5 for residual: lower finds fainter defects and flags more clean patches: docs/real-data.md)",
    )
    p.add_argument(
        "--defect-span",
        type=int,
        choices=range(1, 5),  # 1 … streamer.maps.novelty.MAX_GRID_SPAN (not imported: the CLI starts light)
        default=None,
        metavar="N",
        help="grid patches: compare each patch with the N nearest rings of non-overlapping cells (1-4); default: "
        "the rings under which the training scan's outliers stand out most (one unless more clearly do: "
        "docs/real-data.md)",
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


def _calibration(
    model: object, run: object, kind: str, *, k: float | None = None, span: int | None = None
) -> tuple[object, str]:
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
    try:
        stats = calibrate_novelty(model, patches, kind=kind, k=k, span=span)  # type: ignore[arg-type]
    except ValueError as exc:
        if span is None:
            raise
        raise CommandError(f"--defect-span {span}: {exc}") from None
    return stats, (
        f"defect score: {stats.kind}, calibrated on {stats.n_patches} training patches "
        f"(threshold median + {stats.k:g} robust sd: {stats.train_share_over.get(stats.kind, 0.0):.1%} of them over it)"
        + (f"; chosen: {stats.choice}" if stats.choice else "")
    )


def _check_target(out: Path, *, force: bool) -> None:
    """Refuse to write into a folder that holds anything, unless forced: a live service may be serving it."""
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {str(out)!r} is a file, not a directory; pick a folder for the artifact")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not force:
        shown = ", ".join(held[:4]) + (", …" if len(held) > 4 else "")
        raise CommandError(
            f"--out {str(out)!r} is not empty ({shown}); a service may be serving it: "
            "pass --force to overwrite it, or export to a new folder and reload the service there"
        )


def _export(args: argparse.Namespace) -> int:
    from exporters.export import ExportError, export_model
    from exporters.triton import TritonError, write_triton_model
    from exporters.verify import ParityError, parity_patches
    from models.checkpoint import CheckpointError, load_diagnosis, load_run
    from models.data import DataError

    _check_target(args.out, force=args.force)
    if not args.run_dir.is_dir():
        raise CommandError(f"run directory {str(args.run_dir)!r} does not exist; train one with atomstream train")
    if args.parity_data is not None and not args.parity_data.is_file():
        raise CommandError(f"--parity-data {str(args.parity_data)!r}: no such file")
    if args.defect_k is not None and not (args.defect_k > 0 and math.isfinite(args.defect_k)):
        raise CommandError(f"--defect-k {args.defect_k:g}: the bar's robust sd count must be a positive number")
    from tqdm import tqdm

    # disable=None: the bar shows on a terminal only, so it never runs into the one-line error a script reads
    bar = tqdm(
        total=3 + (args.triton is not None), unit="step", disable=True if args.no_progress else None, leave=False
    )
    bar.set_description("loading the run")
    try:
        model, run = load_run(args.run_dir, device="cpu")
    except (CheckpointError, OSError, RuntimeError, ValueError) as exc:
        raise CommandError(f"cannot load run {str(args.run_dir)!r}: {str(exc).splitlines()[0]}") from None
    health = load_diagnosis(args.run_dir)
    if health is not None and health.get("collapsed"):
        if not args.force:
            raise CommandError(
                f"run {str(args.run_dir)!r} has a collapsed class latent ({health.get('reason')}): its class map "
                "would mean nothing. Retrain (more --budget, another --seed, fewer --classes) or pass --force"
            )
        reason = health.get("reason")
        print(f"atomstream export: warning: exporting a collapsed model (--force): {reason}", file=sys.stderr)
    defects = _defect_classes(args.defect_class, run.model.names_of_classes())
    if args.defect_span is not None and run.data.kind != "grid":
        raise CommandError(
            f"--defect-span is for grid patches; run {str(args.run_dir)!r} cut {run.data.kind} patches, whose "
            "neighbours are the nearest atoms"
        )
    bar.update(1)
    bar.set_description("cutting parity patches")
    try:
        patches, described, notes = parity_patches(run, parity_data=args.parity_data)
    except DataError as exc:
        raise CommandError(f"--parity-data: {exc}") from None
    for note in notes:
        print(f"atomstream export: warning: {note.replace('parity_data', '--parity-data')}", file=sys.stderr)
    bar.write(f"parity data: {described}")
    novelty, calibrated = _calibration(model, run, args.defect_score, k=args.defect_k, span=args.defect_span)
    bar.update(1)
    bar.set_description("exporting ONNX + TorchScript, checking parity")
    try:
        manifest = export_model(
            model,
            run,
            args.out,
            parity_patches=patches,
            parity_data=described,
            fp16=args.fp16,
            defect_classes=defects,
            novelty=novelty,
            class_health=health,
            **from_config(args, {"opset": "opset"}),
        )
    except (ParityError, ExportError) as exc:
        raise CommandError(in_flags(str(exc), _FLAGS)) from None
    except OSError as exc:
        raise CommandError(f"cannot write {str(args.out)!r}: {exc}") from None
    bar.update(1)
    if novelty is not None:
        bar.write(calibrated)
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
        f"wrote {args.out}: {', '.join(sorted(manifest.files))}, manifest.json "
        f"({manifest.variant}, opset {manifest.onnx_opset})"
    )
    if args.triton is not None:
        bar.set_description("writing the Triton model")
        try:
            entry = write_triton_model(args.triton, args.out, manifest)
        except (TritonError, OSError) as exc:
            raise CommandError(f"--triton {str(args.triton)!r}: {exc}") from None
        bar.update(1)
        print(f"wrote Triton model {entry}")
    bar.close()
    return 0
