"""``vitrine evaluate``: the feasibility study as a report (report.html + metrics.json)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import add_model_flags, settings_from_args


def register(sub: argparse._SubParsersAction, _bench: object = None) -> None:
    p = sub.add_parser("evaluate", help="run the study: features, clustering, classifiers, report")
    p.add_argument("--data", type=Path, required=True, help="folder with the Flipkart CSV")
    p.add_argument("--out", type=Path, required=True, help="folder for report.html, metrics.json")
    p.add_argument("--cache", type=Path, help="feature cache (default: OUT/.cache)")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs (default 10, --fast: 2)")
    p.add_argument("--views", type=int,
                   help="cached augmented views of the training photos (default 4, --fast: 2)")
    p.add_argument("--fast", action="store_true",
                   help="reduced run: 20 listings per category, 2 epochs, short t-SNE, 3 folds")
    p.add_argument("--per-category", type=int, help="use at most N listings per category")
    p.add_argument("--no-tsne", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_model_flags(p)
    p.set_defaults(func=cmd_evaluate)


def r3(v: float) -> float:
    return round(float(v), 3)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from evaluation.study import StudyConfig, run_study

    settings = settings_from_args(args)
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    cfg = StudyConfig(
        data=args.data, out=args.out,
        cache_dir=None if args.no_cache else (args.cache or args.out / ".cache"),
        limit_per_category=args.per_category or (20 if args.fast else None),
        epochs=args.epochs or (2 if args.fast else 10),
        views=args.views or (2 if args.fast else 4),
        tsne=not args.no_tsne, tsne_iter=250 if args.fast else 500,
        folds=3 if args.fast else 5, progress=not args.quiet,
    )
    metrics = run_study(cfg, settings)
    summary = {
        "fused_ari (unsupervised)": r3(metrics["fused"]["ari"]),
        "fused_supervised_projection_ari (SUPERVISED, out-of-fold LDA)":
            r3(metrics["fused_supervised_projection"]["ari"]),
        "feature_ari": {n: r3(f["ari"]) for n, f in metrics["features"].items()},
        "classifier_val_accuracy": r3(metrics["classifier"]["val_accuracy"]),
        "classifier_ari": r3(metrics["classifier"]["ari"]),
        "knn_cv_accuracy": r3(metrics["knn_cv"]["accuracy"]),
        "knn_cv_macro_f1": r3(metrics["knn_cv"]["macro_f1"]),
        "suspects": metrics["suspects"],
        "report": str(args.out / "report.html"),
        "seconds": metrics["seconds"]["total"],
    }
    print(json.dumps(summary, indent=2))
    return 0
