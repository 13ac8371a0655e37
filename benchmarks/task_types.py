"""The task type each shipped split poses, crossed with phrasings of the task: the split decides, the words refine.

For every shipped subset and every split strategy that applies to it, the split is handed to
``cellforge benchmark``'s data stage as a user's split file (strategy ``user``: its name says
nothing) together with each phrasing of the task (none; words that name no task; words that name
another task). The table says which task type the run took, the split's evidence, and what the
run reported when words and split disagreed. Results: ``benchmarks/results/task-types.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: None, then words without the rules' keywords, then words that each name one task type.
PHRASINGS: list[str | None] = [
    None,
    "Tell me what happens to these cells under each condition we did not measure.",
    "Forecast the second donor's response to each compound, having learned from the first donor.",
    "predict transcriptional effects of single CRISPRi knockdowns never seen in training",
    "Predict double knock-downs from their single members (genetic interactions).",
    "Estimate dose-dependent expression changes for every drug treatment.",
]


def one(dataset: str, strategy: str, words: str | None, root: Path, adata: object) -> dict:
    """The data stage of one run given ``strategy``'s split as a user file and ``words`` as the task (``adata``: the loaded set)."""
    from cellforge import stages
    from cellforge.data.splits import SplitManifest, make_split
    from cellforge.errors import ConfigError
    from cellforge.run import Run, RunConfig

    run = Run.create(RunConfig(dataset=dataset, task_description=words, pilots=0), root=root, adata=adata)
    try:
        made = make_split(run.adata(), strategy, seed=0)
    except (ConfigError, ValueError) as exc:
        return {"dataset": dataset, "split": strategy, "words": words, "skipped": str(exc)[:200]}
    path = root / f"{dataset}-{strategy}.json"
    SplitManifest(strategy="user", train=made.train, val=made.val, test=made.test).save(path)
    run.config.split_file = str(path)
    lines: list[str] = []
    stages.stage_data(run, echo=lines.append)
    task = run.read_json("data.json")["task"]
    return {
        "dataset": dataset, "split": strategy, "words": words, "type": task["type"],
        "from": task["spec"]["inferred_from"]["type"], "evidence": task.get("split_evidence"), "disagreement": task.get("disagreement"),
    }  # fmt: skip


def table(records: list[dict]) -> str:
    """Markdown: one row per data set, split and phrasing."""
    rows = ["| data set | split (handed over as a user's file) | task words | task type taken | reported disagreement |", "|---|---|---|---|---|"]
    for r in records:
        if "skipped" in r:
            continue
        words = "(none)" if r["words"] is None else r["words"]
        rows.append(f"| {r['dataset']} | {r['split']} | {words} | {r['type']} | {r['disagreement'] or '-'} |")
    taken = [r for r in records if "skipped" not in r]
    # the type a split poses: that of its run without words (the data card's type where the split says nothing clear)
    by_split = {(r["dataset"], r["split"]): r["type"] for r in taken if r["words"] is None}
    agree = sum(
        r["type"] == by_split.get((r["dataset"], r["split"])) or (r["type"] == "drug_dose" and by_split.get((r["dataset"], r["split"])) == "unseen_perturbation")
        for r in taken
    )  # fmt: skip
    drug = sum(r["type"] == "drug_dose" and by_split.get((r["dataset"], r["split"])) == "unseen_perturbation" for r in taken)
    rows += [
        "",
        f"Runs whose task type is the one the split poses: {agree}/{len(taken)}, of which {drug} drug_dose from the words where the split says "
        "unseen perturbation and the data does not show genes (a split cannot tell a drug from a gene; most perturbations named by measured "
        "genes can, and then the split decides).",
    ]
    skipped = sorted({(r["dataset"], r["split"], r["skipped"]) for r in records if "skipped" in r})
    if skipped:
        rows += ["", "Splits that do not apply to a data set (not run):", ""] + [f"- {d}, {s}: {why}" for d, s, why in skipped]
    return "\n".join(rows) + "\n"


def main() -> None:
    from cellforge.data import load_dataset
    from cellforge.data.registry import list_datasets
    from cellforge.data.splits import STRATEGIES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for card in list_datasets(shipped_only=True):
            adata = load_dataset(card.name, show_progress=False)  # loaded once, checked as a run would
            for strategy in STRATEGIES:
                for words in PHRASINGS:
                    record = one(card.name, strategy, words, Path(tmp), adata)
                    records.append(record)
                    print(json.dumps(record)[:300], flush=True)
                    if "skipped" in record:
                        break
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "task-types.json").write_text(json.dumps({"date": datetime.now(UTC).isoformat(timespec="seconds"), "runs": records}, indent=1))
    (args.out / "task-types.md").write_text("# Task type: the split decides, the words refine\n\n`make bench-task-types`\n\n" + table(records))
    print(args.out / "task-types.md")


if __name__ == "__main__":
    main()
