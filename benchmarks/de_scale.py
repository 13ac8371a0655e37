"""The evaluation's DE at screen scale: illico (now) against pdex and scanpy's Wilcoxon (before), one process (``make bench-de-scale``).

Issue 31, item 1. Reads the Norman-sized SYNTHETIC screen that ``benchmarks/scale.py`` draws
(111,445 cells x 33,694 genes, 237 knock-downs; ``runs/scale/data/norman_sized.h5ad``, drawn by
``python benchmarks/scale.py --generate norman_sized --work runs/scale`` when missing), loads it
as the pipeline does, and times :func:`cellforge.evaluation.de.de_table` on every condition
(illico, 2 threads: the truth's DE table, one of the evaluate stage's tables). pdex (cell-eval's
engine, the path before) and scanpy's Wilcoxon (the path before that) are timed on
``--subset-conditions`` conditions only, and their totals extrapolated from their time per
condition (said so in the table); their DE genes on those conditions are compared with
illico's. Results: ``benchmarks/results/de-scale.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "scale" / "data" / "norman_sized.h5ad")
    parser.add_argument("--subset-conditions", type=int, default=12)
    args = parser.parse_args()
    from cellforge.data.user import load_user_h5ad
    from cellforge.evaluation import de

    t0 = time.monotonic()
    adata = load_user_h5ad(args.data)
    load_s = time.monotonic() - t0
    conditions = sorted(c for c in adata.obs["condition"].astype(str).unique() if not adata.obs.loc[adata.obs["condition"] == c, "is_control"].iloc[0])
    t0 = time.monotonic()
    table = de.de_table(adata, conditions)
    illico_s = time.monotonic() - t0
    subset = conditions[: args.subset_conditions]
    t0 = time.monotonic()
    pdex = de._wilcoxon_de_table(adata, subset, engine="pdex")  # noqa: SLF001 - the path before, cell-eval's engine
    pdex_s = time.monotonic() - t0
    t0 = time.monotonic()
    old = de._scanpy_de_table(adata, subset, method="wilcoxon")  # noqa: SLF001 - the path before that, scanpy tie_correct=False
    scanpy_s = time.monotonic() - t0
    new = table[table["condition"].isin(subset)]

    def significant(frame):  # noqa: ANN001, ANN202
        return set(map(tuple, frame.loc[frame["fdr"] < 0.05, ["condition", "gene"]].to_numpy()))

    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "data": str(args.data), "cells": adata.n_obs, "genes": adata.n_vars,
        "conditions": len(conditions), "load_s": round(load_s, 1),
        "illico_s": round(illico_s, 1), "illico_s_per_condition": round(illico_s / len(conditions), 3),
        "subset_conditions": len(subset),
        "pdex_s": round(pdex_s, 1), "pdex_s_per_condition": round(pdex_s / len(subset), 2), "pdex_s_extrapolated": round(pdex_s / len(subset) * len(conditions), 1),
        "scanpy_s": round(scanpy_s, 1), "scanpy_s_per_condition": round(scanpy_s / len(subset), 2),
        "scanpy_s_extrapolated": round(scanpy_s / len(subset) * len(conditions), 1),
        "de_genes_illico_subset": len(significant(new)), "de_genes_pdex_subset": len(significant(pdex)),
        "de_genes_scanpy_subset": len(significant(old)), "de_genes_illico_not_pdex": len(significant(new) ^ significant(pdex)),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }  # fmt: skip
    out = ROOT / "benchmarks" / "results"
    (out / "de-scale.json").write_text(json.dumps(record, indent=1))
    lines = [
        f"# DE at screen scale ({record['date']}, SYNTHETIC Norman-sized screen, 2 cores)", "",
        f"{record['cells']} cells x {record['genes']} genes, {record['conditions']} conditions; each condition against the control cells, every gene, BH FDR.", "",
        "| engine | conditions timed | seconds | s per condition | all conditions, s |", "|---|---|---|---|---|",
        f"| illico (now) | {record['conditions']} | {record['illico_s']} | {record['illico_s_per_condition']} | {record['illico_s']} (measured) |",
        f"| pdex (before; cell-eval's engine) | {record['subset_conditions']} | {record['pdex_s']} | {record['pdex_s_per_condition']} | {record['pdex_s_extrapolated']} (extrapolated) |",
        f"| scanpy Wilcoxon (before that) | {record['subset_conditions']} | {record['scanpy_s']} | {record['scanpy_s_per_condition']} | {record['scanpy_s_extrapolated']} (extrapolated) |",
        "", f"DE genes (FDR < 0.05) on the {record['subset_conditions']} conditions timed with all three: illico {record['de_genes_illico_subset']}, "
        f"pdex {record['de_genes_pdex_subset']} (in one and not the other: {record['de_genes_illico_not_pdex']}), scanpy {record['de_genes_scanpy_subset']} "
        "(scanpy's default leaves out the tie correction; see de-parity.md).",
        f"Loading the file: {record['load_s']} s; peak resident memory of the process: {record['peak_rss_mib']} MiB "
        f"(all three engines; load average after: {record['loadavg_after'][0]}, other work on the 2 cores slows every engine alike).", "",
        "illico's time is mostly fixed per context (each gene's control values sorted once); each further condition is a merge.", "",
    ]  # fmt: skip
    (out / "de-scale.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
