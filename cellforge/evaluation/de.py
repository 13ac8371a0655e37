"""Differentially expressed genes of each condition against its context's control cells.

Two uses, two tests, each with its method passed explicitly (scanpy's default depends on its
settings preset, so it is never relied on):

- :func:`top_de_genes`: scanpy ``rank_genes_groups`` t-test, genes ranked by the absolute t
  statistic, top 20 (GEARS's ``top20 DE`` genes for ``pearson_delta_de20`` / ``mse_de20``);
- :func:`de_table`: Wilcoxon rank-sum (Mann-Whitney U) with Benjamini-Hochberg FDR over all
  genes (the real and predicted DE calls behind cell-eval's ``overlap_at_N``,
  ``precision_at_N`` and ``de_direction_match``). The test is ``illico``
  (``asymptotic_wilcoxon(reference=...)``: each gene's control values sorted once, each
  condition merged into them), one call per context against that context's control cells.
  Its p-values are those of ``pdex`` (Arc Institute's parallel Mann-Whitney DE, the engine
  cell-eval itself runs: ``cell_eval._evaluator`` calls ``pdex.pdex(mode="ref",
  is_log1p=True)``) to float rounding, kept here as ``engine="pdex"`` for that parity test;
  pdex re-sorts the control cells for every condition. The fold change is scanpy's (computed
  here from group means, see :data:`LFC_EPS`), so it is the number ``rank_genes_groups``
  reports. Any other ``method`` runs through scanpy ``rank_genes_groups`` as before.

Both engines' p-values (the asymptotic ``scipy.stats.mannwhitneyu``) are the normal
approximation of scanpy's ``rank_genes_groups(method="wilcoxon", tie_correct=True)`` plus a
continuity correction of 1/2 on U, which makes each p-value slightly larger (never smaller).
scanpy's own default, ``tie_correct=False`` (what this module ran before pdex), overstates the
variance of genes with many tied values (the zeros of sparse data) and so calls fewer genes.
See ``tests/test_de_parity.py`` and ``benchmarks/results/de-parity.md``.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import anndata as ad
import numpy as np
import pandas as pd

#: Columns of a DE table (one row per condition x gene).
DE_COLUMNS = ["condition", "gene", "log2_fold_change", "pvalue", "fdr"]

#: scanpy's pseudocount in its fold change: log2((expm1(mean_g) + eps) / (expm1(mean_ref) + eps)).
LFC_EPS = 1e-9

_REFERENCE = "__control__"


def _contexts(adata: ad.AnnData, conditions: list[str]) -> Iterator[tuple[str, np.ndarray, dict[str, np.ndarray]]]:
    """Per context of the requested non-control conditions: its control rows and each condition's rows (sorted by name).

    Raises
    ------
    ValueError
        A context of a requested condition has no control cells.
    """
    obs = adata.obs
    is_control = obs["is_control"].astype(bool).to_numpy()
    cond = obs["condition"].astype(str).to_numpy()
    context = obs["context"].astype(str).to_numpy()
    tested = np.isin(cond, list(conditions)) & ~is_control
    for ctx in sorted(set(context[tested])):
        in_ctx = tested & (context == ctx)
        wanted = sorted(set(cond[in_ctx]))
        control_rows = np.flatnonzero((context == ctx) & is_control)
        if not control_rows.size:
            msg = f"context {ctx!r} has no control cells to test conditions {wanted[:5]} against"
            raise ValueError(msg)
        yield ctx, control_rows, {name: np.flatnonzero(in_ctx & (cond == name)) for name in wanted}


def _rank_chunk(
    adata: ad.AnnData, control_mask: np.ndarray, wanted: list[str], *, method: str, n_genes: int, rankby_abs: bool, tie_correct: bool = False
) -> ad.AnnData:
    """``rank_genes_groups`` of the ``wanted`` conditions against the masked control cells."""
    import scanpy as sc

    cond = adata.obs["condition"].astype(str).to_numpy()
    is_control = adata.obs["is_control"].astype(bool).to_numpy()
    mask = control_mask | (np.isin(cond, wanted) & ~is_control)
    sub = ad.AnnData(X=adata.X[mask], obs=pd.DataFrame(index=adata.obs_names[mask]), var=pd.DataFrame(index=adata.var_names))
    sub.obs["group"] = pd.Categorical(np.where(control_mask[mask], _REFERENCE, cond[mask]))
    sc.tl.rank_genes_groups(
        sub,
        groupby="group",
        groups=wanted,
        reference=_REFERENCE,
        method=method,
        corr_method="benjamini-hochberg",
        rankby_abs=rankby_abs,
        n_genes=min(n_genes, sub.n_vars),
        use_raw=False,
        tie_correct=tie_correct,
    )
    return sub


def _rank_against_control(
    adata: ad.AnnData,
    conditions: list[str],
    *,
    method: str,
    n_genes: int,
    rankby_abs: bool,
    threads: int | None = None,
    tie_correct: bool = False,
) -> Iterator[tuple[ad.AnnData, list[str]]]:
    """Run ``rank_genes_groups`` per context: each condition vs that context's control cells.

    scanpy tests every condition against the reference separately, so conditions are cut
    into chunks run on ``threads`` threads (default :func:`cellforge.paths.host_threads`);
    results do not depend on the chunking. ``tie_correct`` goes to scanpy's Wilcoxon (its
    default ``False``). Yields each chunk's scored AnnData and names.

    Raises
    ------
    ValueError
        A context of a requested condition has no control cells.
    """
    from cellforge.paths import host_threads

    jobs = []
    for _, control_rows, groups in _contexts(adata, conditions):
        wanted = list(groups)
        control_mask = np.zeros(adata.n_obs, dtype=bool)
        control_mask[control_rows] = True
        workers = threads or host_threads()
        size = max(1, -(-len(wanted) // (2 * workers))) if workers > 1 else len(wanted)
        jobs += [(control_mask, wanted[i : i + size]) for i in range(0, len(wanted), size)]
    run = functools.partial(_rank_chunk, adata, method=method, n_genes=n_genes, rankby_abs=rankby_abs, tie_correct=tie_correct)
    workers = threads or host_threads()
    # scanpy warns about fragmented frames and degenerate groups; the filter is process-wide,
    # so it is set once here rather than in each worker thread
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if workers == 1 or len(jobs) == 1:
            for mask, names in jobs:
                yield run(mask, names), names
            return
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(run, mask, names) for mask, names in jobs]
            for future, (_, names) in zip(futures, jobs, strict=True):
                yield future.result(), names


def top_de_genes(
    adata: ad.AnnData,
    conditions: list[str],
    *,
    n_genes: int = 20,
    method: str = "t-test",
    threads: int | None = None,
) -> dict[str, list[str]]:
    """Top DE genes per condition, ranked by absolute score.

    Follows GEARS (``gears/data_utils.py::get_DE_genes``): scanpy ``rank_genes_groups``
    of each condition against the control cells of the same context, ``rankby_abs=True``,
    with the method passed explicitly (t-test, scanpy's V1 default that GEARS relied on).
    The t-test's statistic is computed here from per-group moments in one pass over the rows
    (:func:`t_test_ranking`, scanpy's formula; the same genes in the same order as scanpy,
    ``tests/test_de_parity.py``); other methods run through scanpy.

    Parameters
    ----------
    adata
        Canonical AnnData ``(n_cells, n_genes)``, log-normalised ``X``.
    conditions
        Non-control condition names.
    n_genes
        Genes kept per condition.
    method
        Any ``scanpy.tl.rank_genes_groups`` method.
    threads
        Worker threads (default :func:`cellforge.paths.host_threads`).

    Returns
    -------
    Condition -> gene names, most significant first.
    """
    if method == "t-test":
        return {cond: list(genes[:n_genes]) for cond, genes in t_test_ranking(adata, conditions).items()}
    out: dict[str, list[str]] = {}
    for sub, wanted in _rank_against_control(adata, conditions, method=method, n_genes=n_genes, rankby_abs=True, threads=threads):
        names = sub.uns["rank_genes_groups"]["names"]
        for cond in wanted:
            out[cond] = [str(g) for g in names[cond]]
    return out


def t_test_ranking(adata: ad.AnnData, conditions: list[str]) -> dict[str, np.ndarray]:
    """Every gene of each condition ranked by the absolute Welch t statistic against its context's control cells.

    scanpy's ``rank_genes_groups(method="t-test", reference=...)`` statistic
    (``scanpy.tools._rank_genes_groups._RankGenes.t_test``): ``(mean_g - mean_ref) /
    sqrt(var_g / n_g + var_ref / n_ref)``, variances with ``ddof=1`` from the mean of squares
    (scanpy's ``_get_mean_var``), a NaN score (a gene constant in both groups) set to 0; genes
    ordered by ``|t|``, largest first (ties in ``var_names`` order). The moments come from one
    blocked pass over the context's rows (:func:`cellforge.evaluation.pseudobulk.group_sums`;
    20,000-row blocks of a Norman-sized screen had added 2.4 GiB to the peak): scanpy copies the
    control cells and each chunk's cells for every chunk of conditions.

    Parameters
    ----------
    adata
        Canonical AnnData ``(n_cells, n_genes)`` (``obs``: ``condition``, ``context``, ``is_control``).
    conditions
        Non-control conditions.

    Returns
    -------
    Condition -> ``(n_genes,)`` array of gene names, most significant first.

    Raises
    ------
    ValueError
        A context of a requested condition has no control cells.
    """
    from cellforge.evaluation.pseudobulk import derived_cache, group_sums

    cache = derived_cache(adata)  # the truth and the report's figures rank the same conditions
    key = ("t_test_ranking", tuple(sorted(conditions)))
    if cache is not None and key in cache:
        return dict(cache[key])
    genes = adata.var_names.astype(str).to_numpy()
    out: dict[str, np.ndarray] = {}
    for _, control_rows, groups in _contexts(adata, conditions):
        names = list(groups)
        rows = np.concatenate([control_rows, *(groups[n] for n in names)])
        codes = np.concatenate([np.zeros(control_rows.size, dtype=np.int64), *(np.full(groups[n].size, i + 1, dtype=np.int64) for i, n in enumerate(names))])
        order = np.argsort(rows, kind="stable")  # rows in matrix order: a block is a cheap slice to take
        rows, codes = rows[order], codes[order]
        k = len(names) + 1
        sums, squares = group_sums(adata.X, rows, codes, k, squares=True)
        n = np.bincount(codes, minlength=k).astype(np.float64)[:, None]
        mean = sums / n
        var = (squares / n - mean**2) * (n / np.maximum(n - 1, 1))
        with np.errstate(divide="ignore", invalid="ignore"):
            scores = (mean[1:] - mean[0]) / np.sqrt(var[1:] / n[1:] + var[0] / n[0])
        scores[np.isnan(scores)] = 0.0
        for i, name in enumerate(names):
            out[name] = genes[np.argsort(-np.abs(scores[i]), kind="stable")]
    if cache is not None:
        cache[key] = dict(out)
    return out


def scanpy_log2_fold_change(mean_group: np.ndarray, mean_ref: np.ndarray) -> np.ndarray:
    """scanpy's ``logfoldchanges`` from group means of log1p data, as ``rank_genes_groups`` reports them.

    ``log2((expm1(mean_group) + 1e-9) / (expm1(mean_ref) + 1e-9))`` in float64, rounded to
    float32 (scanpy stores ``logfoldchanges`` as float32 in ``uns["rank_genes_groups"]``) and
    returned as float64. Unlike :func:`pseudobulk_log2_fold_change` nothing is clipped: a
    negative mean (predicted cells can have one) goes in as it is, as in scanpy.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        lfc = np.log2((np.expm1(mean_group) + LFC_EPS) / (np.expm1(mean_ref) + LFC_EPS))
    return lfc.astype(np.float32).astype(np.float64)


def _group_means(x, labels: pd.Categorical) -> pd.DataFrame:  # noqa: ANN001 - any AnnData matrix
    """Mean of every labelled group, ``(n_groups, n_genes)`` float64, rows named by group.

    scanpy ``scanpy.get.aggregate(func="mean")``: the call ``rank_genes_groups`` makes for its
    fold changes (``_RankGenes._aggregate_group_stats``), so the means are bit for bit scanpy's
    (a group's rows are summed in row order in float64; unlabelled rows are skipped).
    """
    import scanpy as sc

    holder = ad.AnnData(X=x, obs=pd.DataFrame({"group": labels}, index=pd.RangeIndex(len(labels)).astype(str)))
    out = sc.get.aggregate(holder, by="group", func="mean")
    return pd.DataFrame(np.asarray(out.layers["mean"], dtype=np.float64), index=out.obs_names.astype(str))


def _test_matrix(x, rows: np.ndarray):  # noqa: ANN001, ANN202 - any AnnData matrix in, CSR or ndarray out
    """The rows of ``x`` in a form the Mann-Whitney kernels (illico, pdex) test without copying per group.

    pdex's sparse Mann-Whitney kernel (``numba_mwu.mannwhitneyu_sparse``) needs CSR without
    explicit zeros or negative values, and treats the zeros as one tied block (only the
    nonzeros are sorted); its dense kernel copies both sides to float64 for every group.
    So: non-negative data become CSR (explicit zeros dropped), data with a negative value (a
    prediction can have one) become float64 ndarray once per context.
    """
    import scipy.sparse as sp

    if sp.issparse(x):
        sub = sp.csr_matrix(x[rows])
        sub.eliminate_zeros()
        if sub.data.size and np.nanmin(sub.data) < 0:
            return sub.toarray().astype(np.float64)
        sub.sort_indices()  # illico refuses unsorted column indices (a fancy-indexed matrix can have them)
        return sub
    sub = np.asarray(x[rows])
    if sub.size and np.nanmin(sub) < 0:
        return sub.astype(np.float64)
    out = sp.csr_matrix(sub)
    out.sort_indices()
    return out


def _whole_matrix(x):  # noqa: ANN001, ANN202 - any AnnData matrix in, CSR or None out
    """``x`` itself when illico can test it in place (CSR, non-negative), made canonical in place; else None.

    A Norman-sized screen's matrix is 4.6 GB: copying a context's rows for the test doubled the
    evaluate stage's peak memory. Dropping explicit zeros and sorting column indices change no
    value of the matrix.
    """
    import scipy.sparse as sp

    if not (sp.issparse(x) and x.format == "csr") or (x.data.size and np.nanmin(x.data) < 0):
        return None
    x.eliminate_zeros()  # stored zeros would be ranked among the nonzero values
    if not x.has_canonical_format:
        x.sum_duplicates()  # sorts the indices too
    return x


@functools.cache
def _pdex():  # noqa: ANN202 - the pdex function
    """``pdex.pdex``, with numba's on-disk cache turned on for pdex's and numba-mwu's kernels.

    Both packages compile their kernels without ``cache=True``: every process paid 15-20 s of
    compilation on its first DE call here (a shipped subset's whole DE then takes 0.3 s). With
    the cache on (numba's own mechanism, ``Dispatcher.enable_caching``, what ``cache=True``
    calls), later processes load the compiled kernels: about 4 s, measured. Where the package
    folder is read-only numba keeps the cache in its user-wide folder.
    """
    import numba_mwu
    import pdex as package
    from numba.core.caching import NullCache
    from numba.core.registry import CPUDispatcher

    modules = [m for name, m in sorted(sys.modules.items()) if name.startswith(("numba_mwu", "pdex")) and m is not None]
    for module in modules:
        for obj in list(vars(module).values()):
            if isinstance(obj, CPUDispatcher) and isinstance(obj._cache, NullCache):  # noqa: SLF001 - not cached yet
                try:
                    obj.enable_caching()
                except (RuntimeError, OSError):  # no cache folder can be written: compile as before
                    pass
    del numba_mwu
    # pdex draws a tqdm bar per context on stderr, between the stage's own progress lines: silenced
    from tqdm import tqdm

    package.tqdm = functools.partial(tqdm, disable=True)
    return package.pdex


def _labelled_context(
    adata: ad.AnnData, control_rows: np.ndarray, group_rows: dict[str, np.ndarray]
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A context's cells labelled for a one-versus-reference test, and scanpy's fold changes.

    Returns the condition names (sorted), the rows (controls first, then each condition's),
    their labels (:data:`_REFERENCE` for controls), every cell's label (``None`` outside the
    test) and the ``(n_conditions, n_genes)`` fold changes from :func:`_group_means`.
    """
    names = sorted(group_rows)
    rows = np.concatenate([control_rows, *(group_rows[n] for n in names)])
    label = np.concatenate([np.full(control_rows.size, _REFERENCE, dtype=object), *(np.full(group_rows[n].size, n, dtype=object) for n in names)])
    full = np.full(adata.n_obs, None, dtype=object)
    full[rows] = label
    means = _group_means(adata.X, pd.Categorical(full, categories=[_REFERENCE, *names]))
    lfc = scanpy_log2_fold_change(means.loc[names].to_numpy(), means.loc[[_REFERENCE]].to_numpy())
    return names, rows, label, full, lfc


def _pdex_context(
    adata: ad.AnnData, control_rows: np.ndarray, group_rows: dict[str, np.ndarray], *, threads: int
) -> list[pd.DataFrame]:
    """One context: every condition of ``group_rows`` against the ``control_rows`` cells.

    Fold changes from :func:`_group_means` (scanpy's means); p-values and per-condition BH
    FDR from one ``pdex.pdex(mode="ref")`` call. In that call pdex isolates the reference
    cells, builds their per-gene column index (``numba_mwu.sparse_column_index``) and their
    pseudobulk once, then for each condition and gene merges the condition's and the
    reference's nonzero values and sorts them (``numba_mwu._sparse._sparse_mwu_column``): the
    control cells' nonzeros are re-sorted for every condition, their zeros only counted (one
    tied block). pdex 0.3.0 has no sort-once reference mode (its one-vs-rest kernel ranks
    each gene once, but against all other cells, not the controls). On the dense path (data
    with negative values) every gene's full control column is re-sorted with the condition's.
    """
    import numba

    pdex = _pdex()
    names, rows, label, full, lfc = _labelled_context(adata, control_rows, group_rows)
    categories = [_REFERENCE, *names]

    # p-values: pdex on the context's rows; the reference is sorted first, groups in name order
    order = np.argsort(rows, kind="stable")  # keep the cells in input order, as scanpy sees them
    x = _test_matrix(adata.X, rows[order])
    obs = pd.DataFrame({"group": pd.Categorical(label[order], categories=categories)}, index=pd.RangeIndex(rows.size).astype(str))
    holder = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=adata.var_names.astype(str)))
    before = numba.get_num_threads()
    try:
        res = pdex(
            holder,
            groupby="group",
            mode="ref",
            reference=_REFERENCE,
            threads=threads,
            is_log1p=True,  # X is log1p: pseudobulk expm1(mean(X)), as scanpy's fold change
            geometric_mean=True,
            epsilon=LFC_EPS,  # pdex's own fold change is then scanpy's formula (not used: float32 means)
            cpm_filter=None,  # every gene tested, FDR over all genes of the condition
        )
    finally:
        numba.set_num_threads(before)
    n_genes = adata.n_vars
    target = res["target"].to_numpy()
    if target.size != len(names) * n_genes or list(target[::n_genes]) != names:
        msg = f"unexpected pdex output layout: {target.size} rows for {len(names)} conditions x {n_genes} genes"
        raise RuntimeError(msg)
    pvalue = res["p_value"].to_numpy().reshape(len(names), n_genes)
    fdr = res["fdr"].to_numpy().reshape(len(names), n_genes)
    genes = adata.var_names.astype(str).to_numpy()
    return [
        pd.DataFrame({"condition": name, "gene": genes, "log2_fold_change": lfc[i], "pvalue": pvalue[i], "fdr": fdr[i]})
        for i, name in enumerate(names)
    ]


@functools.cache
def _illico():  # noqa: ANN202 - the illico function
    """``illico.asymptotic_wilcoxon``, its log lines and progress bar silenced (the stage prints its own progress)."""
    import illico
    from loguru import logger
    from tqdm import tqdm

    logger.disable("illico")
    module = sys.modules["illico.asymptotic_wilcoxon"]  # the package's attribute of that name is the function
    module.tqdm = functools.partial(tqdm, disable=True)
    return illico.asymptotic_wilcoxon


def _illico_context(
    adata: ad.AnnData, control_rows: np.ndarray, group_rows: dict[str, np.ndarray], *, threads: int
) -> list[pd.DataFrame]:
    """One context: every condition of ``group_rows`` against the ``control_rows`` cells, by illico.

    illico (``asymptotic_wilcoxon(reference=...)``, one-versus-reference) sorts the control
    cells' values of each gene once and merges each condition's sorted values into them (a
    linear pass), where pdex re-sorts the controls for every condition; on sparse data only
    the nonzeros are sorted and the zeros counted as one tied block. Its p-values are
    ``scipy.stats.mannwhitneyu(method="asymptotic", use_continuity=True)``'s, tie-corrected:
    pdex's (cell-eval's engine) to float rounding (``tests/test_de_parity.py``). Fold changes
    from :func:`_group_means` (scanpy's means), BH FDR over all genes of each condition
    (``scipy.stats.false_discovery_control``, as pdex).
    """
    from scipy.stats import false_discovery_control

    wilcoxon = _illico()
    names, rows, label, full, lfc = _labelled_context(adata, control_rows, group_rows)
    categories = [_REFERENCE, *names]

    genes = adata.var_names.astype(str).to_numpy()
    whole = _whole_matrix(adata.X)
    if whole is not None:  # the matrix itself, every other cell in a group left out of the test: no copy of the context's rows
        other = "__not_tested__"
        full[full == None] = other  # noqa: E711 - object array
        obs = pd.DataFrame({"group": pd.Categorical(full, categories=[*categories, other])}, index=pd.RangeIndex(adata.n_obs).astype(str))
        holder = ad.AnnData(X=whole, obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    else:
        order = np.argsort(rows, kind="stable")
        obs = pd.DataFrame({"group": pd.Categorical(label[order], categories=categories)}, index=pd.RangeIndex(rows.size).astype(str))
        holder = ad.AnnData(X=_test_matrix(adata.X, rows[order]), obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    import numba

    before = numba.get_num_threads()
    try:  # illico sets numba's thread count, which cannot exceed the cores numba found at start-up
        n_threads = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))
        res = wilcoxon(
            holder, is_log1p=True, group_keys="group", reference=_REFERENCE, groups=names, n_threads=n_threads, use_continuity=True, tie_correct=True,
        )  # fmt: skip
    finally:
        numba.set_num_threads(before)
    frames = []
    for i, name in enumerate(names):
        pvalue = res.loc[name]["p_value"].reindex(genes).to_numpy(np.float64)
        if np.isnan(pvalue).any():
            msg = f"illico returned no p-value for {int(np.isnan(pvalue).sum())} genes of condition {name!r}"
            raise RuntimeError(msg)
        frames.append(pd.DataFrame({"condition": name, "gene": genes, "log2_fold_change": lfc[i], "pvalue": pvalue, "fdr": false_discovery_control(pvalue)}))
    return frames


def _wilcoxon_de_table(adata: ad.AnnData, conditions: list[str], *, threads: int | None = None, engine: str = "illico") -> pd.DataFrame:
    """:func:`de_table`'s Wilcoxon path: one call per context, by illico (:func:`_illico_context`) or pdex (:func:`_pdex_context`).

    Raises
    ------
    ValueError
        A context of a requested condition has no control cells.
    """
    from cellforge.paths import host_threads

    run = _illico_context if engine == "illico" else _pdex_context
    frames: list[pd.DataFrame] = []
    for _, control_rows, groups in _contexts(adata, conditions):
        frames += run(adata, control_rows, groups, threads=threads or host_threads())
    if not frames:
        return pd.DataFrame(columns=DE_COLUMNS)
    return pd.concat(frames, ignore_index=True)


def _scanpy_de_table(
    adata: ad.AnnData, conditions: list[str], *, method: str, threads: int | None = None, tie_correct: bool = False
) -> pd.DataFrame:
    """:func:`de_table` through scanpy ``rank_genes_groups`` (every method but the default Wilcoxon).

    ``tie_correct`` is passed to scanpy's Wilcoxon (scanpy's default ``False``); the parity
    test and ``benchmarks/de_parity.py`` use this path as the scanpy reference of the pdex one.
    Genes of a condition come in scanpy's order (by score), fold changes as scanpy reports them.
    """
    import scanpy as sc

    frames = []
    for sub, wanted in _rank_against_control(
        adata, conditions, method=method, n_genes=adata.n_vars, rankby_abs=False, threads=threads, tie_correct=tie_correct
    ):
        for cond in wanted:
            df = sc.get.rank_genes_groups_df(sub, group=cond)
            frames.append(
                pd.DataFrame(
                    {
                        "condition": cond,
                        "gene": df["names"].astype(str).to_numpy(),
                        "log2_fold_change": df["logfoldchanges"].to_numpy(np.float64),
                        "pvalue": df["pvals"].to_numpy(np.float64),
                        "fdr": df["pvals_adj"].to_numpy(np.float64),
                    }
                )
            )
    if not frames:
        return pd.DataFrame(columns=DE_COLUMNS)
    return pd.concat(frames, ignore_index=True)


def de_table(adata: ad.AnnData, conditions: list[str], *, method: str = "wilcoxon", threads: int | None = None) -> pd.DataFrame:
    """Full DE table: every gene of every condition against its context's control cells.

    ``method="wilcoxon"`` (the default): two-sided Mann-Whitney U test of each gene by
    ``illico`` 0.6 (``asymptotic_wilcoxon(reference=..., use_continuity=True,
    tie_correct=True)``: tie-corrected normal approximation with continuity correction, the
    asymptotic ``scipy.stats.mannwhitneyu``; the control cells sorted once per gene), run once
    per context against that context's control cells on ``threads`` threads, BH FDR over all
    genes of each condition (``scipy.stats.false_discovery_control``). The p-values equal
    pdex's (cell-eval's DE engine) to float rounding and are scanpy's
    ``rank_genes_groups(method="wilcoxon", tie_correct=True)`` up to the continuity
    correction (``tests/test_de_parity.py``). ``log2_fold_change`` is scanpy's, computed
    here from scanpy's group means (:func:`scanpy_log2_fold_change`):
    ``log2((expm1(mean_cond) + 1e-9) / (expm1(mean_ctrl) + 1e-9))`` on the log-normalised
    ``X``, rounded to float32 as scanpy stores it, so the numbers are those the scanpy path
    reported. Genes of a condition come in ``var_names`` order.

    Any other ``method``: scanpy ``rank_genes_groups(method=method,
    corr_method="benjamini-hochberg")``, all genes, chunks of conditions on ``threads``
    threads, genes in scanpy's order.

    Parameters
    ----------
    adata
        Canonical AnnData ``(n_cells, n_genes)``; ``obs`` needs ``condition``, ``context`` and
        ``is_control``. Predicted cells can be scored by concatenating them with the real
        control cells (see :func:`prediction_de_table`).
    conditions
        Non-control conditions to test.
    method
        ``"wilcoxon"`` for cell-eval-style DE sets (illico), else a ``rank_genes_groups`` method.
    threads
        Worker threads (default :func:`cellforge.paths.host_threads`): illico's ``n_threads``
        for Wilcoxon, Python threads over chunks of conditions for scanpy.

    Returns
    -------
    DataFrame with :data:`DE_COLUMNS`, ``n_conditions * n_genes`` rows.

    Raises
    ------
    ValueError
        A context of a requested condition has no control cells.
    """
    if method == "wilcoxon":
        return _wilcoxon_de_table(adata, conditions, threads=threads)
    return _scanpy_de_table(adata, conditions, method=method, threads=threads)


def _prediction_cells(pred_cells: ad.AnnData, real: ad.AnnData, contexts: pd.Series) -> ad.AnnData:
    """Predicted cells stacked on the real control cells, as a canonical AnnData for :func:`de_table`.

    Dense float32 ``X``: the predicted cells first (``obs_names`` ``pred_<i>``), then every
    real control cell (``ctrl_<i>``); ``obs`` has ``condition``, ``context`` (from
    ``contexts``) and ``is_control``.
    """
    import scipy.sparse as sp

    ctrl = real[real.obs["is_control"].astype(bool).to_numpy()]
    conds = pred_cells.obs["condition"].astype(str)
    obs_pred = pd.DataFrame(
        {"condition": conds.to_numpy(), "context": contexts.loc[conds].to_numpy(), "is_control": False},
        index=[f"pred_{i}" for i in range(pred_cells.n_obs)],
    )
    obs_ctrl = pd.DataFrame(
        {
            "condition": ctrl.obs["condition"].astype(str).to_numpy(),
            "context": ctrl.obs["context"].astype(str).to_numpy(),
            "is_control": True,
        },
        index=[f"ctrl_{i}" for i in range(ctrl.n_obs)],
    )
    x_pred = pred_cells.X.toarray() if sp.issparse(pred_cells.X) else np.asarray(pred_cells.X)
    x_ctrl = ctrl.X.toarray() if sp.issparse(ctrl.X) else np.asarray(ctrl.X)
    return ad.AnnData(
        X=np.vstack([x_pred, x_ctrl]).astype(np.float32),
        obs=pd.concat([obs_pred, obs_ctrl]),
        var=pd.DataFrame(index=real.var_names),
    )


def prediction_de_table(
    pred_cells: ad.AnnData, real: ad.AnnData, contexts: pd.Series, *, method: str = "wilcoxon", threads: int | None = None
) -> pd.DataFrame:
    """DE table of predicted *cells* against the *real* control cells of the same context.

    cell-eval tests predicted cells against the control cells in the prediction file; using
    the real controls here means a prediction cannot move its own reference (cell-eval #196).
    The test is :func:`de_table`'s on :func:`_prediction_cells`: illico's Mann-Whitney U (pdex's test,
    cell-eval's engine) for ``method="wilcoxon"``, scanpy ``rank_genes_groups`` otherwise;
    fold changes are scanpy's. Predicted values below 0 are tested as they are (the dense
    kernel, see :func:`_test_matrix`).

    Parameters
    ----------
    pred_cells
        ``(n_pred_cells, n_genes)`` predicted log-normalised cells with ``obs["condition"]``;
        genes in the order of ``real``.
    real
        Canonical AnnData holding the real control cells.
    contexts
        Condition -> context.
    method
        As in :func:`de_table`.
    threads
        As in :func:`de_table`.
    """
    both = _prediction_cells(pred_cells, real, contexts)
    conds = pred_cells.obs["condition"].astype(str)
    return de_table(both, sorted(conds.unique()), method=method, threads=threads)


def pseudobulk_log2_fold_change(profiles: np.ndarray, controls: np.ndarray) -> np.ndarray:
    """scanpy's fold change from mean log1p profiles, ``(n, n_genes)`` each.

    ``log2((expm1(profile) + 1e-9) / (expm1(control) + 1e-9))``: the same number scanpy
    reports for cells whose mean is ``profile``, so a one-row-per-condition prediction gets
    fold changes on the same scale as the real DE table. A predicted mean below 0 (no
    real mean can be) counts as 0.
    """
    return np.log2((np.expm1(np.maximum(profiles, 0.0)) + LFC_EPS) / (np.expm1(np.maximum(controls, 0.0)) + LFC_EPS))
