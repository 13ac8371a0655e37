"""Stage 7 of the pipeline: score the kept predictions against every baseline on the host."""

from __future__ import annotations

from collections.abc import Callable

from cellforge.run import Run

Echo = Callable[[str], None]


def stage_evaluate(run: Run, *, echo: Echo) -> None:
    """Score the model and the split's baselines on the held-out conditions (host only)."""
    from cellforge.data.splits import SplitManifest
    from cellforge.evaluation.evaluate import baselines_for, evaluate_predictions, file_md5

    adata = run.adata()
    manifest = SplitManifest.load(run.path("split.json"))
    result = evaluate_predictions(
        adata, manifest, run.path("predictions.h5ad"), name="cellforge_model", baselines=baselines_for(adata, manifest)
    )
    result.write(
        run.path("evaluation"),
        {"data": run.config.dataset, "split_strategy": manifest.strategy, "n_test_conditions": len(manifest.test), "pred_md5": file_md5(run.path("predictions.h5ad"))},
    )
    run.write_json("evaluation/summary.json", {"baselines": result.baselines, "methods": result.summary.to_dict(orient="index")})
    echo("  " + result.summary[["pearson_delta", "pearson_delta_de20", "discrimination_score_l1_common", "mse_de20"]].round(4).to_string().replace("\n", "\n  "))
