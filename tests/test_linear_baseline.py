"""cellforge's ``linear`` baseline against a plain transcription of Ahlmann-Eltze et al.'s run_linear_pretrained_model.R."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellforge.evaluation.baselines import MIN_CONTEXT_PERTURBATIONS, BaselineInputs, baseline_notes, linear


def transcription(expression: pd.DataFrame, test_genes: list[str], k: int = 10, ridge: float = 0.1) -> pd.DataFrame:
    """The R script, line by line, for one context: ``expression`` is genes x training conditions incl. "ctrl"."""
    baseline = expression["ctrl"].to_numpy()
    change = expression.to_numpy() - baseline[:, None]
    # gene_emb <- prcomp_irlba(assay(train_data, "X"), n = pca_dim)$x
    x = expression.to_numpy()
    k = min(k, x.shape[1] - 1)  # irlba needs n < the number of columns (the script errors out; cellforge caps k the same way)
    u, s, _ = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
    gene_emb = pd.DataFrame(u[:, :k] * s[:k], index=expression.index)
    # pert_emb <- t(gene_emb), plus a zero "ctrl" column
    pert_emb = pd.concat([gene_emb.T, pd.DataFrame({"ctrl": np.zeros(k)})], axis=1)
    matched = [c for c in pert_emb.columns if c in expression.columns]  # match(colnames(pert_emb), clean_condition)
    B = pert_emb[matched].to_numpy()
    Y = change[:, [list(expression.columns).index(c) for c in matched]]
    # solve_y_axb(Y, A = gene_emb, B = pert_emb_training, A_ridge = ridge, B_ridge = ridge)
    center = Y.mean(axis=1)
    A = gene_emb.to_numpy()
    K = np.linalg.solve(A.T @ A + np.eye(k) * ridge, A.T @ (Y - center[:, None]) @ B.T) @ np.linalg.inv(B @ B.T + np.eye(k) * ridge)
    pred = A @ K @ pert_emb[test_genes].to_numpy() + center[:, None] + baseline[:, None]
    return pd.DataFrame(pred.T, index=test_genes, columns=expression.index)


def _inputs(seen: dict[str, np.ndarray], controls: dict[str, np.ndarray], contexts: dict[str, str], test: list[str], genes: list[str]) -> BaselineInputs:
    return BaselineInputs(
        seen=pd.DataFrame(seen, index=genes).T,
        controls=pd.DataFrame(controls, index=genes).T,
        conditions=pd.DataFrame({"perturbation": [c.split("@")[0] for c in contexts], "context": list(contexts.values())}, index=list(contexts)),
        test=test,
    )


def test_linear_is_the_published_formulation_on_synthetic_knock_downs():
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(40)]
    control = rng.gamma(2.0, 1.0, size=40)
    loadings = rng.normal(size=(40, 3))
    seen = {g: control + loadings @ rng.normal(size=3) + 0.1 * rng.normal(size=40) for g in genes[:15]}
    seen["NOTMEASURED"] = control + rng.normal(size=40)  # in the PCA, not in the fit (no embedding)
    test = ["G20", "G21", "G33"]
    inp = _inputs(seen, {"all": control}, {c: "all" for c in [*seen, *test]}, test, genes)
    expression = pd.DataFrame({"ctrl": control, **seen}, index=genes)
    np.testing.assert_allclose(linear(inp).to_numpy(), transcription(expression, test).to_numpy(), atol=1e-9)


def test_linear_is_the_published_formulation_on_a_shipped_screen(load):
    from cellforge.data.splits import make_split
    from cellforge.evaluation.harness import baseline_inputs
    from cellforge.evaluation.pseudobulk import control_means

    adata = load("papalexi_subset")
    manifest = make_split(adata, "unseen_perturbation", seed=0)
    inp = baseline_inputs(adata, manifest)
    test = [c for c in inp.test if inp.conditions.loc[c, "perturbation"] in inp.seen.columns]
    assert test, "the fold tests at least one knock-out of a measured gene"
    inp = BaselineInputs(seen=inp.seen, controls=inp.controls, conditions=inp.conditions, test=test)
    ctrl = control_means(adata).iloc[0]
    # the script's columns are named by the perturbed gene (clean_condition); a perturbation of an unmeasured gene keeps its name
    names = {c: inp.conditions.loc[c, "perturbation"] for c in inp.seen.index}
    expression = pd.concat([ctrl.rename("ctrl"), inp.seen.rename(index=names).T], axis=1)
    expected = transcription(expression, [inp.conditions.loc[c, "perturbation"] for c in test])
    np.testing.assert_allclose(linear(inp).to_numpy(), expected.to_numpy(), atol=1e-6)


def test_linear_is_fitted_within_each_context_that_has_enough_perturbations(monkeypatch):
    """Two stimulation states where every knock-down acts in opposite directions: pooling them cancels the response."""
    rng = np.random.default_rng(1)
    genes = [f"G{i}" for i in range(30)]
    loadings = rng.normal(size=(30, 2))
    effect = {g: loadings @ rng.normal(size=2) for g in genes[:12]}
    controls = {"rest": rng.gamma(2.0, 1.0, size=30), "stim": rng.gamma(2.0, 1.0, size=30)}
    seen, contexts = {}, {}
    for g in genes[:10]:
        for state, sign in (("rest", 1.0), ("stim", -1.0)):
            seen[f"{g}@{state}"] = controls[state] + sign * effect[g]
            contexts[f"{g}@{state}"] = state
    test = ["G10@rest", "G11@stim"]
    contexts.update({"G10@rest": "rest", "G11@stim": "stim"})
    inp = _inputs(seen, controls, contexts, test, genes)
    truth = np.stack([effect["G10"], -effect["G11"]])

    def correlations() -> list[float]:
        pred = linear(inp).to_numpy() - np.stack([controls["rest"], controls["stim"]])
        return [float(np.corrcoef(pred[i], truth[i])[0, 1]) for i in range(2)]

    within = correlations()
    import cellforge.evaluation.baselines as baselines

    monkeypatch.setattr(baselines, "MIN_CONTEXT_PERTURBATIONS", 10_000)  # every context pooled
    pooled = correlations()
    monkeypatch.undo()
    assert min(within) > 0.7 and max(pooled) < 0.3, (within, pooled)
    note = baseline_notes(inp, ["linear"])["linear"]
    assert "fitted within its own context for 2 of 2 test conditions" in note
    # with fewer seen perturbations in a state than the threshold, that state's conditions use the pooled fit, said so
    few = {k: v for k, v in seen.items() if k.endswith("@rest") or int(k[1:].split("@")[0]) < MIN_CONTEXT_PERTURBATIONS - 1}
    inp_few = _inputs(few, controls, {c: contexts[c] for c in [*few, *test]}, test, genes)
    assert "pooled over every context for 1 (stim: fewer than 5" in baseline_notes(inp_few, ["linear"])["linear"]
