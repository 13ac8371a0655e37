"""Parity of the pdex Wilcoxon DE (cellforge.evaluation.de.de_table) with scanpy's.

``de_table(method="wilcoxon")`` tests each condition against its context's control cells with
pdex (cell-eval's DE engine: numba-mwu's asymptotic Mann-Whitney U, tie-corrected, with a
continuity correction of 1/2) and takes fold changes from scanpy's group means. The reference
here is scanpy itself, called directly: ``sc.tl.rank_genes_groups(method="wilcoxon",
corr_method="benjamini-hochberg", tie_correct=True)`` per context, against that context's
control cells. ``tie_correct=True`` is the scanpy setting pdex matches: both use the variance
``n1 n2 / 12 * ((n + 1) - sum(t^3 - t) / (n (n - 1)))``; scanpy's default (False) drops the tie
term, which for the zeros of single-cell data inflates the variance and shrinks every z.

What differs, and the tolerances that follow from it:

- p-values: pdex's z is ``(|U - n1 n2 / 2| - 0.5) / s``, scanpy's ``|U - n1 n2 / 2| / s``. So
  pdex's p-value is never smaller, and larger by a factor that grows with |z| and shrinks with
  the group sizes: up to 0.013 in log10 on these sets (kang_subset; 0.0087 on adamson_subset),
  asserted as ``|Δ log10 p| < 0.05``;
- DE sets at FDR < 0.05: BH is monotone in every p-value, so pdex's set is a subset of scanpy's;
  the genes it loses are those whose scanpy FDR sits just under 0.05 (asserted: at most 2 % of
  scanpy's set, or 1 gene, each with pdex FDR < 0.06);
- fold changes: identical (both are scanpy's number, float32 as scanpy stores it).
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

from cellforge.evaluation.de import DE_COLUMNS, de_table, prediction_de_table

#: Largest |log10 p_pdex - log10 p_scanpy| allowed (continuity correction; seen: 0.013).
LOG10P_TOL = 0.05
#: Share of scanpy's FDR < 0.05 genes pdex may miss (at least 1 gene), each with pdex FDR below this.
MISS_SHARE, MISS_FDR = 0.02, 0.06


def _scanpy_wilcoxon(adata: ad.AnnData, *, tie_correct: bool) -> pd.DataFrame:
    """scanpy's Wilcoxon of every non-control condition against its context's control cells."""
    obs = adata.obs
    is_control = obs["is_control"].astype(bool).to_numpy()
    cond = obs["condition"].astype(str).to_numpy()
    context = obs["context"].astype(str).to_numpy()
    frames = []
    for ctx in sorted(set(context[~is_control])):
        keep = context == ctx
        sub = ad.AnnData(X=adata.X[keep].copy(), var=pd.DataFrame(index=adata.var_names))
        sub.obs["group"] = pd.Categorical(np.where(is_control[keep], "REF", cond[keep]))
        wanted = sorted(set(cond[keep & ~is_control]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sc.tl.rank_genes_groups(
                sub,
                groupby="group",
                groups=wanted,
                reference="REF",
                method="wilcoxon",
                corr_method="benjamini-hochberg",
                tie_correct=tie_correct,
                n_genes=sub.n_vars,
                use_raw=False,
            )
        for name in wanted:
            df = sc.get.rank_genes_groups_df(sub, group=name)
            frames.append(
                pd.DataFrame(
                    {
                        "condition": name,
                        "gene": df["names"].astype(str).to_numpy(),
                        "log2_fold_change": df["logfoldchanges"].to_numpy(np.float64),
                        "pvalue": df["pvals"].to_numpy(np.float64),
                        "fdr": df["pvals_adj"].to_numpy(np.float64),
                    }
                )
            )
    return pd.concat(frames, ignore_index=True)


def _assert_parity(ours: pd.DataFrame, ref: pd.DataFrame) -> dict[str, float]:
    """The tolerances of the module docstring; returns the numbers for the failure message."""
    assert list(ours.columns) == DE_COLUMNS
    both = ours.merge(ref, on=["condition", "gene"], suffixes=("", "_ref"), validate="one_to_one")
    assert len(both) == len(ours) == len(ref)
    # identical fold changes
    np.testing.assert_array_equal(both["log2_fold_change"].to_numpy(), both["log2_fold_change_ref"].to_numpy())
    # p-values: never smaller than scanpy's, and close in log10
    p, p_ref = both["pvalue"].to_numpy(), both["pvalue_ref"].to_numpy()
    # (where U equals its mean exactly, scanpy's and pdex's p is 1 and illico's continuity correction gives 0.998)
    assert np.all((p >= p_ref * (1 - 1e-9)) | (p_ref == 1.0))
    dlog = np.abs(np.log10(np.maximum(p, 1e-300)) - np.log10(np.maximum(p_ref, 1e-300)))
    assert dlog.max() < LOG10P_TOL, dlog.max()
    # DE sets at FDR < 0.05: pdex's is inside scanpy's, missing only genes at the boundary
    sig = both["fdr"].to_numpy() < 0.05
    sig_ref = both["fdr_ref"].to_numpy() < 0.05
    assert not np.any(sig & ~sig_ref)
    missed = sig_ref & ~sig
    assert missed.sum() <= max(1, MISS_SHARE * sig_ref.sum()), (missed.sum(), sig_ref.sum())
    assert np.all(both["fdr"].to_numpy()[missed] < MISS_FDR)
    jaccard = (sig & sig_ref).sum() / max(1, (sig | sig_ref).sum())
    return {"n_sig": int(sig.sum()), "n_sig_ref": int(sig_ref.sum()), "jaccard": float(jaccard), "max_dlog10p": float(dlog.max())}


@pytest.mark.parametrize("name", ["adamson_subset", "norman_subset", "papalexi_subset", "kang_subset"])
def test_pdex_wilcoxon_matches_scanpy_tie_corrected(load, name):
    adata = load(name)
    conditions = sorted(set(adata.obs.loc[~adata.obs["is_control"].astype(bool), "condition"].astype(str)))
    ours = de_table(adata, conditions, threads=2)
    ref = _scanpy_wilcoxon(adata, tie_correct=True)
    stats = _assert_parity(ours, ref)
    assert stats["n_sig_ref"] > 20  # each set exercises the DE calls
    assert stats["jaccard"] > 0.95, stats


def test_pdex_calls_more_genes_than_scanpy_default(load):
    """scanpy's default (tie_correct=False, what de_table ran before pdex) calls fewer genes on sparse data."""
    adata = load("adamson_subset")
    conditions = sorted(set(adata.obs.loc[~adata.obs["is_control"].astype(bool), "condition"].astype(str)))
    ours = de_table(adata, conditions, threads=2)
    old = _scanpy_wilcoxon(adata, tie_correct=False)
    both = ours.merge(old, on=["condition", "gene"], suffixes=("", "_old"))
    np.testing.assert_array_equal(both["log2_fold_change"].to_numpy(), both["log2_fold_change_old"].to_numpy())
    assert (both["fdr"] < 0.05).sum() > (both["fdr_old"] < 0.05).sum()


def test_prediction_de_table_matches_scanpy_with_and_without_negative_values(load):
    """Predicted cells go through pdex's sparse kernel when non-negative and its dense one
    when a value is below 0; both agree with scanpy on the same stacked cells."""
    from cellforge.evaluation.de import _prediction_cells

    real = load("adamson_subset")
    is_control = real.obs["is_control"].astype(bool).to_numpy()
    conds = sorted(set(real.obs.loc[~is_control, "condition"].astype(str)))[:2]
    contexts = pd.Series(real.obs["context"].astype(str).to_numpy(), index=real.obs["condition"].astype(str).to_numpy())
    contexts = contexts[~contexts.index.duplicated()]
    rng = np.random.default_rng(0)
    parts, labels = [], []
    for name in conds:
        cells = real[(real.obs["condition"] == name).to_numpy()].X.toarray()[:40]
        parts.append(cells + rng.normal(0, 0.3, cells.shape) * (cells > 0))
        labels += [name] * len(cells)
    x = np.vstack(parts).astype(np.float32)
    for clip in (True, False):
        pred = ad.AnnData(
            X=np.clip(x, 0, None) if clip else x,
            obs=pd.DataFrame({"condition": labels}, index=[f"p{i}" for i in range(len(labels))]),
            var=pd.DataFrame(index=real.var_names),
        )
        assert (np.asarray(pred.X).min() < 0) != clip
        ours = prediction_de_table(pred, real, contexts, threads=2)
        ref = _scanpy_wilcoxon(_prediction_cells(pred, real, contexts), tie_correct=True)
        stats = _assert_parity(ours, ref)
        assert stats["n_sig_ref"] > 0


def test_other_methods_stay_on_scanpy(load):
    adata = load("adamson_subset")
    cond = sorted(set(adata.obs.loc[~adata.obs["is_control"].astype(bool), "condition"].astype(str)))[:1]
    table = de_table(adata, cond, method="t-test", threads=1)
    sub = adata.copy()
    sub.obs["group"] = pd.Categorical(np.where(sub.obs["is_control"].astype(bool), "REF", sub.obs["condition"].astype(str)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.rank_genes_groups(sub, groupby="group", groups=cond, reference="REF", method="t-test", n_genes=sub.n_vars, use_raw=False)
    ref = sc.get.rank_genes_groups_df(sub, group=cond[0])
    assert table["gene"].tolist() == ref["names"].astype(str).tolist()  # scanpy's order
    np.testing.assert_array_equal(table["pvalue"].to_numpy(), ref["pvals"].to_numpy(np.float64))


def test_context_without_controls_raises(load):
    adata = load("kang_subset")
    cells = adata[~(adata.obs["is_control"].astype(bool) & (adata.obs["context"] == "B")).to_numpy()]
    cond = sorted(set(cells.obs.loc[(cells.obs["context"] == "B") & ~cells.obs["is_control"].astype(bool), "condition"].astype(str)))
    with pytest.raises(ValueError, match="no control cells"):
        de_table(cells, cond)


@pytest.mark.parametrize("name", ["adamson_subset", "kang_subset"])
def test_illico_engine_matches_pdex_cell_evals_engine(load, name):
    """de_table runs illico (controls sorted once per gene); pdex is cell-eval's engine: the same test, to float rounding."""
    from cellforge.evaluation.de import _wilcoxon_de_table

    adata = load(name)
    conditions = sorted(set(adata.obs.loc[~adata.obs["is_control"].astype(bool), "condition"].astype(str)))
    ours = de_table(adata, conditions, threads=2)
    pdex = _wilcoxon_de_table(adata, conditions, threads=2, engine="pdex")
    both = ours.merge(pdex, on=["condition", "gene"], suffixes=("", "_pdex"), validate="one_to_one")
    assert len(both) == len(ours) == len(pdex)
    np.testing.assert_array_equal(both["log2_fold_change"].to_numpy(), both["log2_fold_change_pdex"].to_numpy())
    p, p_pdex = both["pvalue"].to_numpy(), both["pvalue_pdex"].to_numpy()
    below = p_pdex < 1.0  # U at its mean exactly: pdex clips the corrected z at 0 (p = 1), illico gives 0.998
    np.testing.assert_allclose(p[below], p_pdex[below], rtol=1e-9, atol=1e-300)
    assert np.all(p[~below] > 0.99)
    sig, sig_pdex = both["fdr"].to_numpy() < 0.05, both["fdr_pdex"].to_numpy() < 0.05
    assert sig.sum() > 20 and (sig != sig_pdex).sum() <= 1  # a gene whose FDR sits at 0.05 within rounding may flip


@pytest.mark.parametrize("name", ["adamson_subset", "norman_subset", "papalexi_subset", "kang_subset"])
def test_top_de_genes_by_moments_are_scanpys_t_test_ranking(load, name):
    """The top-20 DE genes of pearson_delta_de20 / mse_de20 (GEARS): scanpy's t-test ranking, computed from moments in one pass."""
    from cellforge.evaluation.de import _rank_against_control, t_test_ranking, top_de_genes

    adata = load(name)
    conditions = sorted(set(adata.obs.loc[~adata.obs["is_control"].astype(bool), "condition"].astype(str)))
    ours = top_de_genes(adata, conditions, n_genes=20, method="t-test")
    full = t_test_ranking(adata, conditions)
    compared = 0
    for sub, wanted in _rank_against_control(adata, conditions, method="t-test", n_genes=adata.n_vars, rankby_abs=True, threads=2):
        result = sub.uns["rank_genes_groups"]
        for cond in wanted:
            ref_names = [str(g) for g in result["names"][cond]]
            ref_scores = np.abs(np.asarray(result["scores"][cond], dtype=np.float64))
            assert list(full[cond]) and len(full[cond]) == adata.n_vars
            # the same top 20, in the same order, except where two genes' |t| tie within float rounding
            mine = ours[cond]
            for rank, (a, b) in enumerate(zip(mine, ref_names[:20], strict=True)):
                if a != b:
                    score = dict(zip(ref_names, ref_scores, strict=True))
                    assert abs(score[a] - score[b]) <= 1e-6 * max(score[b], 1.0), (cond, rank, a, b, score[a], score[b])
            assert len(set(mine) ^ set(ref_names[:20])) <= 2 * sum(a != b for a, b in zip(mine, ref_names[:20], strict=True))
            compared += 1
    assert compared == len(conditions)


def test_group_sums_in_blocks_equal_one_pass(monkeypatch):
    """pseudobulk's blocked float64 sums (and squares), as pseudobulk, the t-test and gene selection use them."""
    import scipy.sparse as sp

    from cellforge.evaluation import pseudobulk

    X = sp.random(300, 25, density=0.3, format="csr", dtype=np.float32, random_state=4)
    rows = np.sort(np.random.default_rng(2).choice(300, 200, replace=False))
    codes = np.random.default_rng(3).integers(0, 4, rows.size)
    dense = X.toarray().astype(np.float64)[rows]
    expected = np.stack([dense[codes == g].sum(axis=0) for g in range(4)])
    expected_sq = np.stack([(dense[codes == g] ** 2).sum(axis=0) for g in range(4)])
    monkeypatch.setattr(pseudobulk, "BLOCK_CELLS", 7 * 25)  # blocks of 7 rows
    for matrix in (X, X.toarray()):
        sums, squares = pseudobulk.group_sums(matrix, rows, codes, 4, squares=True)
        np.testing.assert_allclose(sums, expected, rtol=1e-12)
        np.testing.assert_allclose(squares, expected_sq, rtol=1e-12)


def test_a_t_test_ranking_is_computed_once_per_anndata_and_again_for_a_new_matrix(monkeypatch):
    """The truth and the report's figures rank the same conditions: one pass over the cells, until X changes."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from cellforge.evaluation import pseudobulk
    from cellforge.evaluation.de import t_test_ranking

    rng = np.random.default_rng(5)
    X = sp.random(400, 30, density=0.4, format="csr", dtype=np.float32, random_state=6)
    cond = rng.choice(["ctrl", "p1", "p2"], 400)
    obs = pd.DataFrame({"condition": cond, "context": "A", "is_control": cond == "ctrl"}, index=[str(i) for i in range(400)])
    adata = ad.AnnData(X, obs=obs)
    calls = []
    direct = pseudobulk.group_sums
    monkeypatch.setattr(pseudobulk, "group_sums", lambda *a, **k: calls.append(len(a[1])) or direct(*a, **k))
    first = t_test_ranking(adata, ["p1", "p2"])
    again = t_test_ranking(adata, ["p2", "p1"])
    assert calls == [400] and all(np.array_equal(first[c], again[c]) for c in ("p1", "p2"))
    adata.X = X.multiply(rng.random((400, 30))).tocsr()  # a new matrix on the same object is ranked again
    changed = t_test_ranking(adata, ["p1", "p2"])
    assert calls == [400, 400] and not np.array_equal(changed["p1"], first["p1"])
    view = adata[:300]
    t_test_ranking(view, ["p1"])
    t_test_ranking(view, ["p1"])
    assert len(calls) == 4  # a view is not cached: each call sums its rows
