"""Judging on more conditions: out-of-fold predictions of the training conditions, made and scored by the host.

A split of a small screen leaves one or two validation conditions (the shipped subsets': 1 and
2). The paired one-standard-error rule that a model's own script must pass against the plan's
reference then pairs only the 20-40 (condition, gene) cells of those conditions, and a real but
small gain is lost in their spread (``benchmarks/results/llm-ceiling.md``: hand-written answers
of the asked form beat the reference on 1 of 6 runs). Judged on more conditions, the same rule
has more power: the training conditions are cut into ``K`` folds; for fold ``k`` the host writes
sandbox inputs without that fold's cells (a split whose training conditions are the others and
whose validation conditions are the fold's), runs the script there, and scores its predictions
of the fold's conditions against the means of the cells it kept back, as it scores the
validation split (:class:`cellforge.execution.judge.Judge`). The script never holds the cells of
a condition it is judged on. The rule then pairs the validation conditions and every training
condition's out-of-fold prediction (``benchmarks/results/llm-ceiling-oof.md`` measures what that
changes).

Each fold is one more run of a script: the plan's reference and each script of a model that ran
clean, once per fold. The folds' inputs are written when first needed, under ``folds/`` in the
run directory; each fold keeps a journal of its runs (``folds/fold-<k>/journal.json``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cellforge.execution.ensemble import ValPredictions
from cellforge.execution.journal import Executor, Journal, sha
from runtime.hostio import remove_tree

def fold_conditions(train: list[str], folds: int, seed: int) -> list[list[str]]:
    """The training conditions cut into ``min(folds, len(train))`` folds, shuffled by ``seed``.

    Conditions are sorted first, so the folds depend on the set and the seed only. Fewer than
    two training conditions (or ``folds < 2``) give no folds: a fold's script would train on
    nothing.

    Returns
    -------
    list of list of str
        Fold ``k`` holds every ``K``-th condition of the shuffled order, starting at ``k``.
    """
    names = sorted(set(train))
    k = min(folds, len(names))
    if k < 2:  # noqa: PLR2004 - a fold needs other conditions to train on
        return []
    order = np.random.default_rng(seed).permutation(len(names))
    return [[names[i] for i in order[j::k]] for j in range(k)]


class OutOfFold:
    """Runs scripts on the folds of a run's training conditions and judges their predictions on the host.

    Parameters
    ----------
    adata
        The canonical data set (the host's copy of every cell).
    manifest
        The run's split (:class:`cellforge.data.splits.SplitManifest`).
    genes
        Genes handed to the sandbox (:func:`cellforge.execution.contract.prepare_inputs`'s selection).
    selection, task
        The run's gene selection and task, as for the run's own inputs.
    root
        Folder of the folds' inputs and runs (``<run>/folds``).
    folds, seed
        Number of folds and the shuffle's seed (:func:`fold_conditions`).
    open_box
        ``(work_dir, script) -> sandbox``: a sandbox over a fold's inputs for ``script``
        (:func:`runtime.open_sandbox` with the run's settings).
    timeout_s, memory_mb
        The run's limits for each script run.
    """

    def __init__(
        self, adata: Any, manifest: Any, *, genes: list[str], selection: Any, task: dict[str, Any], root: Path,
        folds: int, seed: int, open_box: Callable[[Path, str], Any], timeout_s: float, memory_mb: int | None,
    ) -> None:  # fmt: skip
        self.adata, self.manifest, self.genes, self.selection, self.task = adata, manifest, list(genes), selection, task
        self.root, self.open_box, self.timeout_s, self.memory_mb = Path(root), open_box, timeout_s, memory_mb
        self.folds = fold_conditions(list(manifest.train), folds, seed)
        self._prepared: set[int] = set()
        self._journals: dict[int, Journal] = {}
        self._judges: dict[int, Any] = {}  # fold -> the host's truth for it (one pass over the cells per fold)
        self._judged: dict[str, ValPredictions | str] = {}

    def _inputs(self, k: int) -> Path:
        """Fold ``k``'s sandbox inputs (written on first use): training without the fold's cells, the fold to predict."""
        from cellforge.execution import contract
        from runtime.workfs import release_stale

        work = self.root / f"fold-{k}" / "sandbox"
        if k not in self._prepared:
            release_stale(work)
            if work.exists():
                remove_tree(work)
            work.mkdir(parents=True)
            held = set(self.folds[k])
            split = self.manifest.model_copy(update={"train": [c for c in self.manifest.train if c not in held], "val": list(self.folds[k])})
            contract.prepare_inputs(self.adata, split, work, task=self.task, selection=self.selection)
            self._prepared.add(k)
        return work

    def judged(self, script: str) -> ValPredictions | str | None:
        """``script``'s out-of-fold predictions of every training condition, judged by the host; or why there are none.

        Runs are cached by the script's text: the plan's reference runs once per fold however
        many scripts face it.

        Returns
        -------
        ValPredictions, str or None
            ``pred`` and ``target`` ``(n_train, n_genes)``, changes from the context's control
            mean, rows in fold order; a string saying which fold failed and how, when one did;
            None when the run has no folds (fewer than two training conditions).
        """
        from cellforge.execution import contract
        from cellforge.execution.judge import Judge, load_judged

        if not self.folds:
            return None
        key = sha(script)
        if key in self._judged:
            return self._judged[key]
        conditions: list[str] = []
        preds, targets = [], []
        outcome: ValPredictions | str | None = None
        for k, fold in enumerate(self.folds):
            if k not in self._judges:
                self._judges[k] = Judge.from_data(self.adata, val=list(fold), test=list(self.manifest.test), genes=self.genes)
            judge = self._judges[k]

            def check(outputs: Path, judge: Judge = judge) -> dict[str, Any]:
                contract.check_outputs(outputs, test=list(judge.predict), genes=self.genes)
                return judge.score(outputs, Path(outputs).parent)

            folder = self.root / f"fold-{k}"
            journal_path = folder / "journal.json"
            journal = self._journals.setdefault(k, Journal())
            box = self.open_box(self._inputs(k), script)
            try:
                executor = Executor(
                    sandbox=box, attempts_dir=folder / "attempts", journal_path=journal_path, check_outputs=check,
                    timeout_s=self.timeout_s, memory_mb=self.memory_mb, journal=journal,
                )  # fmt: skip
                attempt = executor.run(script, stage="fold", parent=None, patch={"diagnosis": f"out-of-fold run {k + 1} of {len(self.folds)}: {len(fold)} training conditions held out"})
            finally:
                box.close()
            saved = load_judged(folder / "attempts" / f"attempt-{attempt.index:03d}") if attempt.failure is None else None
            if saved is None:
                detail = (attempt.failure_detail or attempt.log_tail or "").strip().splitlines()
                outcome = f"fold {k + 1} of {len(self.folds)} failed ({attempt.failure.value if attempt.failure else 'not judged'}): {detail[-1][:200] if detail else ''}"
                break
            conditions += list(saved.conditions)
            preds.append(saved.pred)
            targets.append(saved.target)
        if outcome is None:
            outcome = ValPredictions(tuple(conditions), np.vstack(preds), np.vstack(targets))
        self._judged[key] = outcome
        return outcome


__all__ = ["OutOfFold", "fold_conditions"]
