"""The sandbox contract: what goes into the sandbox and what must come back.

In: ``data/train.h5ad`` (cells of training conditions and every control cell) and
``task.json`` (condition names with their perturbation and context, the train/val/test
lists, the conditions to predict, gene names). Neither the validation cells nor the test
cells enter the sandbox folder: the host keeps both truths (:mod:`cellforge.execution.judge`).

Out: ``outputs/predictions.h5ad`` with one row per condition of ``predict_conditions``
(validation, then test; ``obs["condition"]``) and the training genes as ``var_names``;
``outputs/val_metrics.json`` (what the script says about itself: display only);
``outputs/model.ckpt``.
"""

from __future__ import annotations

import json
import re
from typing import Any
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellforge.data.splits import SplitManifest
from cellforge.data.loaders import read_h5ad_file
from cellforge.execution.genes import GeneSelection
from cellforge.errors import DatasetError, PredictionError
from cellforge.evaluation.pseudobulk import condition_table
from cellforge.safeio import write_h5ad, write_h5ad_in_blocks, write_json

PREDICTIONS = "outputs/predictions.h5ad"
VAL_METRICS = "outputs/val_metrics.json"


#: Rows cut from X at a time by :func:`take_block` when genes are selected too.
BLOCK_ROWS = 10_000


def take_block(X, rows: np.ndarray, columns: np.ndarray | None):  # noqa: ANN001, ANN201 - dense or sparse
    """``X[rows][:, columns]`` (``columns`` None: every gene), :data:`BLOCK_ROWS` rows at a time.

    Cutting the rows first would copy them with every gene (on a Norman-sized screen, 4 GB of
    training rows to keep 2 GB); a block of rows is cut to the selected genes before the next.
    """
    import scipy.sparse as sp

    if columns is None or len(rows) <= BLOCK_ROWS:
        out = X[rows]
        return out if columns is None else out[:, columns]
    blocks = [X[rows[i : i + BLOCK_ROWS]][:, columns] for i in range(0, len(rows), BLOCK_ROWS)]
    return sp.vstack(blocks, format="csr") if sp.issparse(X) else np.vstack(blocks)


def prepare_inputs(
    adata: ad.AnnData, manifest: SplitManifest, work_dir: Path, *, task: dict, max_genes: int | None = None, selection: GeneSelection | None = None
) -> GeneSelection:
    """Write the sandbox's inputs into ``work_dir``; validation and test cells are left out.

    Above ``max_genes`` genes (default :data:`cellforge.execution.genes.MAX_GENES`) only a
    selection made from training and validation cells goes in (:func:`~cellforge.execution.genes.select_genes`);
    ``task.json`` lists the genes handed over; ``selection`` reuses an earlier one (the refit
    of :func:`cellforge.execution.journal.refit_selected` sees the same genes). Returns the selection.
    """
    from cellforge.execution.genes import MAX_GENES, select_genes

    selection = selection or select_genes(adata, manifest, max_genes=max_genes or MAX_GENES)
    columns = None if selection.complete else adata.var_names.get_indexer(selection.genes)
    data = work_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    cond = adata.obs["condition"].astype(str)
    train_mask = (cond.isin(manifest.train) | adata.obs["is_control"]).to_numpy()
    keep = ["perturbation", "is_control", "context", "condition"]
    var = adata.var[[]] if columns is None else adata.var.iloc[columns][[]]
    # validation cells stay on the host, like test cells: the host judges every attempt on them
    for name, mask in [("train", train_mask)]:
        rows = np.flatnonzero(mask)
        # built in memory, then written atomically: a full disk is a clean DiskFullError (HDF5 never meets it)
        obs = adata.obs.iloc[rows][keep].copy()
        for column in obs.columns[obs.dtypes == "category"]:
            obs[column] = obs[column].cat.remove_unused_categories()  # as an AnnData view would
        if sp.issparse(adata.X) and len(rows) > BLOCK_ROWS:  # a screen: the file is built a block of cells at a time
            blocks = (take_block(adata.X, rows[i : i + BLOCK_ROWS], columns).tocsr() for i in range(0, len(rows), BLOCK_ROWS))
            write_h5ad_in_blocks(data / f"{name}.h5ad", obs, var.copy(), blocks)
        else:
            part = ad.AnnData(X=take_block(adata.X, rows, columns), obs=obs, var=var.copy())
            write_h5ad(part, data / f"{name}.h5ad")
            del part
    table = condition_table(adata)
    names = [*manifest.train, *manifest.val, *manifest.test, *table.index[table["is_control"]]]
    dose = _condition_doses(adata)
    payload = {
        **task,
        "conditions": [
            {"condition": c, "perturbation": table.loc[c, "perturbation"], "context": table.loc[c, "context"], **({"dose": dose[c]} if c in dose else {})}
            for c in names
        ],
        "train_conditions": list(manifest.train),
        "val_conditions": list(manifest.val),
        "test_conditions": list(manifest.test),
        "predict_conditions": [*manifest.val, *manifest.test],
        "genes": [str(g) for g in var.index],
        "n_genes_in_data": selection.n_total,
    }
    write_json(work_dir / "task.json", payload, indent=1)
    # the template library's shared code (reference predictors, features), importable by a model's own script
    (work_dir / LIBRARY_MODULE).write_text((Path(__file__).parent / "templates" / "_common.py").read_text())
    return selection


def _condition_doses(adata: ad.AnnData) -> dict[str, float]:
    """Numeric dose of each condition from ``obs["dose"]`` (first value; none when absent or not numeric)."""
    if "dose" not in adata.obs:
        return {}
    dose = pd.to_numeric(adata.obs["dose"].astype(str), errors="coerce")
    first = dose.groupby(adata.obs["condition"].astype(str).to_numpy()).first().dropna()
    return {str(c): float(v) for c, v in first.items()}


#: Largest ``val_metrics.json`` the host reads, bytes.
MAX_VAL_METRICS_BYTES = 1024 * 1024


#: Most entries of a script's own ``val_metrics.json`` kept, longest key and longest string value kept.
MAX_REPORTED_ENTRIES, MAX_REPORTED_KEY, MAX_REPORTED_CHARS = 200, 200, 500
#: Keys whose values the host reads as numbers (a string there is dropped, never formatted).
_NUMERIC_KEY = re.compile(r"^(val_|test_|train_|n_|epochs?)")


def parse_val_metrics(data: bytes, source: str) -> dict[str, Any]:
    """What a training script says about itself in ``val_metrics.json`` (``data``), as the host keeps it.

    The file is untrusted: it is parsed by pydantic-core's JSON parser (nesting beyond 200 levels
    is an error, not a ``RecursionError``), and reduced to a flat schema: at most
    :data:`MAX_REPORTED_ENTRIES` entries whose values are numbers, booleans, null or strings of at
    most :data:`MAX_REPORTED_CHARS` characters; a nested value is dropped, and so is a string under
    a key the host reads as a number (``val_*``, ``n_*``, ``epochs_run``...). The host never uses
    these numbers to select or score (it judges predictions itself); they are shown beside its own.

    Returns
    -------
    dict
        ``{key: number | bool | None | str}``; ``"_dropped"`` counts entries left out, when any.

    Raises
    ------
    PredictionError
        Not JSON (or nested too deep), or not an object.
    """
    import pydantic_core

    try:
        metrics = pydantic_core.from_json(data, allow_inf_nan=True)
    except ValueError as exc:
        msg = f"{source}: not valid JSON ({str(exc)[:200]})"
        raise PredictionError(msg) from exc
    if not isinstance(metrics, dict):
        msg = f"{source}: expected a JSON object of metric -> value, got {type(metrics).__name__}"
        raise PredictionError(msg)
    kept: dict[str, Any] = {}
    for key, value in metrics.items():
        key = str(key)[:MAX_REPORTED_KEY]
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if len(kept) >= MAX_REPORTED_ENTRIES or key == "_dropped":
            continue
        if numeric or value is None or isinstance(value, bool):
            kept[key] = value
        elif isinstance(value, str) and not _NUMERIC_KEY.match(key):
            kept[key] = value[:MAX_REPORTED_CHARS]
    if len(kept) < len(metrics):
        kept["_dropped"] = len(metrics) - len(kept)
    return kept


def read_val_metrics(outputs: Path) -> dict:
    """Validation metrics from a host-side copy of ``outputs/`` (empty when the script wrote none).

    Raises
    ------
    PredictionError
        The file is too big, not JSON or not an object.
    """
    path = Path(outputs) / Path(VAL_METRICS).name
    if not path.is_file():
        return {}
    if path.stat().st_size > MAX_VAL_METRICS_BYTES:
        msg = f"{path}: over {MAX_VAL_METRICS_BYTES} bytes"
        raise PredictionError(msg)
    return parse_val_metrics(path.read_bytes(), str(path))


def sandbox_val_metrics(sandbox: object) -> dict:
    """Validation metrics read straight from a sandbox's work folder (no link followed); empty when unusable."""
    from runtime.errors import UntrustedFileError

    try:
        return parse_val_metrics(sandbox.read(VAL_METRICS, max_bytes=MAX_VAL_METRICS_BYTES), VAL_METRICS)  # type: ignore[attr-defined]
    except (OSError, UntrustedFileError, PredictionError):
        return {}


#: Largest value a log1p-normalised profile can plausibly reach (log1p(1e4 * 1e3) ~ 16).
LOG_SCALE_MAX = 50.0


@dataclass
class Predictions:
    """A checked predictions file.

    Attributes
    ----------
    profiles
        ``(n_test, n_genes)`` predicted mean profiles, rows in test order, columns in gene order.
    cells
        The predicted cells ``(n_cells, n_genes)`` when the file holds several rows for
        some condition (cell-level predictions, scored with a DE test as cell-eval does);
        ``None`` for one row per condition.
    """

    profiles: pd.DataFrame
    cells: ad.AnnData | None = None


def _check_values(values: np.ndarray, source: str, *, cell_level: bool) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        msg = f"{source}: {int(bad.sum())} non-finite values (NaN or inf); nothing is filled in, fix the predictions"
        raise PredictionError(msg)
    top = float(values.max()) if values.size else 0.0
    if top > LOG_SCALE_MAX:
        msg = f"{source}: maximum {top:.1f} looks like counts; predictions must be log-normalised like the input (log1p of normalised counts)"
        raise PredictionError(msg)
    if cell_level and top > 1 and np.array_equal(values, np.round(values)):
        msg = f"{source}: every value is an integer (maximum {top:.0f}), which looks like counts; predictions must be log-normalised"
        raise PredictionError(msg)


def _check_labels(conds: pd.Series, columns: list[str], *, test: list[str], genes: list[str], source: str) -> None:
    present = set(columns)  # built once: a screen has ~34,000 genes (a set per gene was 69 s at the Norman size)
    missing_genes = [g for g in genes if g not in present]
    if missing_genes:
        msg = f"{source}: {len(missing_genes)} of {len(genes)} genes missing, e.g. {missing_genes[:5]}"
        raise PredictionError(msg)
    if conds.isna().any() or (conds.astype(str).str.strip() == "").any():
        msg = f"{source}: {int(conds.isna().sum() + (conds.astype(str).str.strip() == '').sum())} rows have no condition label"
        raise PredictionError(msg)
    labels = set(conds.astype(str))
    missing = [c for c in test if c not in labels]
    extra = sorted(labels - set(test))
    if missing or extra:
        msg = (
            f"{source}: missing test conditions {missing[:10]}{' ...' if len(missing) > 10 else ''} ({len(missing)}), "  # noqa: PLR2004
            f"unknown conditions {extra[:10]}{' ...' if len(extra) > 10 else ''} ({len(extra)}); "  # noqa: PLR2004
            f"expected exactly the conditions to predict (task.json predict_conditions), e.g. {test[:5]}"
        )
        raise PredictionError(msg)


def check_prediction_frame(frame: pd.DataFrame, *, test: list[str], genes: list[str], source: str = "predictions") -> pd.DataFrame:
    """Check a ``(n_conditions, n_genes)`` table of mean profiles indexed by condition.

    Returns the table restricted to ``genes`` with rows in ``test`` order.

    Raises
    ------
    PredictionError
        Missing genes, missing, unknown or duplicated conditions, non-finite values or a
        count scale; the message names what is wrong and nothing is filled in.
    """
    _check_labels(pd.Series(frame.index), [str(c) for c in frame.columns], test=test, genes=genes, source=source)
    dup = frame.index[frame.index.duplicated()].astype(str).tolist()
    if dup:
        msg = f"{source}: conditions listed more than once: {sorted(set(dup))[:10]}"
        raise PredictionError(msg)
    frame = frame.copy()
    frame.columns = [str(c) for c in frame.columns]
    try:
        values = frame.loc[test, genes].to_numpy(np.float64)
    except (TypeError, ValueError) as exc:
        msg = f"{source}: values must be numbers ({exc})"
        raise PredictionError(msg) from exc
    _check_values(values, source, cell_level=False)
    return pd.DataFrame(values, index=pd.Index(test, name="condition"), columns=genes)


def load_predictions(path: Path, *, test: list[str], genes: list[str]) -> Predictions:
    """Load and check a predictions file.

    Parameters
    ----------
    path
        ``.h5ad`` with ``obs["condition"]`` and genes as ``var_names`` (one row per condition,
        or predicted cells: several rows per condition, averaged into profiles), or ``.csv``
        / ``.tsv``: conditions x genes with the condition in the first column.
    test
        The split's test conditions: exactly these must be predicted.
    genes
        The data's genes: all must be present (extra genes are ignored).

    Raises
    ------
    PredictionError
        Missing or unreadable file, unsupported suffix, no ``condition`` column, missing
        genes, missing or unknown conditions, non-finite values, or values on a count scale.
    """
    path = Path(path)
    if not path.exists():
        msg = f"no predictions file at {path}"
        raise PredictionError(msg)
    suffix = path.suffix.lower()
    if suffix in {".csv", ".tsv"}:
        try:
            frame = pd.read_csv(path, sep="," if suffix == ".csv" else "\t", index_col=0)
        except (ValueError, pd.errors.ParserError) as exc:
            msg = f"{path}: not a readable {suffix} table ({exc})"
            raise PredictionError(msg) from exc
        frame.index = frame.index.astype(str)
        return Predictions(profiles=check_prediction_frame(frame, test=test, genes=genes, source=str(path)))
    if suffix != ".h5ad":
        msg = f"{path}: unsupported predictions format {suffix!r}; use .h5ad (obs['condition']) or .csv/.tsv (conditions x genes)"
        raise PredictionError(msg)
    try:
        pred = read_h5ad_file(path, what="predictions file")
    except DatasetError as exc:
        raise PredictionError(str(exc)) from exc
    if "condition" not in pred.obs:
        msg = f"{path}: obs has no 'condition' column; columns: {list(pred.obs.columns)}"
        raise PredictionError(msg)
    conds = pred.obs["condition"]
    _check_labels(conds, [str(g) for g in pred.var_names], test=test, genes=genes, source=str(path))
    conds = conds.astype(str)
    pred = pred[:, genes]
    X = pred.X  # noqa: N806
    X = np.asarray(X.toarray() if hasattr(X, "toarray") else X, dtype=np.float64)  # noqa: N806
    cell_level = bool(conds.duplicated().any())
    _check_values(X, str(path), cell_level=cell_level)
    profiles = pd.DataFrame(X, columns=genes).groupby(conds.to_numpy()).mean().loc[test]
    profiles.index.name = "condition"
    cells = None
    if cell_level:
        cells = ad.AnnData(X=X.astype(np.float32), obs=pd.DataFrame({"condition": conds.to_numpy()}), var=pd.DataFrame(index=genes))
    return Predictions(profiles=profiles, cells=cells)


def read_predictions(path: Path, *, test: list[str], genes: list[str]) -> pd.DataFrame:
    """Predicted mean profiles ``(n_test, n_genes)`` of a checked file (see :func:`load_predictions`)."""
    return load_predictions(path, test=test, genes=genes).profiles


#: The contract as the coder and debugger read it.
CONTRACT_DOC = Path(__file__).with_name("CONTRACT.md")
#: A worked example that satisfies the contract.
EXAMPLE_SCRIPT = Path(__file__).parent / "examples" / "reference_residual.py"
#: Largest script the host accepts from a model, characters.
MAX_SCRIPT_CHARS = 200_000


#: The library's shared code as the sandbox sees it, beside ``train.py`` (``import cellforge_library``).
LIBRARY_MODULE = "cellforge_library.py"
#: The worked example's model region (:func:`splice_model`).
MODEL_BEGIN, MODEL_END = "# --- model:", "# --- end of model ---"


def splice_model(example: str, code: str) -> str:
    """The worked example with ``code`` (imports, helpers and ``def predict_deltas``) in place of its model region.

    Also how a debugger's corrected function goes in: ``example`` is then the failing script,
    whose input and output code is the example's (:func:`replace_model`).

    Raises
    ------
    ValueError
        ``code`` is not valid Python, defines no top-level ``predict_deltas`` function, never
        returns a value from it, or the script that results breaks the static contract
        (:func:`check_script`). The message says what to fix.
    """
    import ast

    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        msg = f"the function is not valid Python: line {exc.lineno}: {exc.msg}: {(exc.text or '').strip()[:120]!r}"
        raise ValueError(msg) from exc
    funcs = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "predict_deltas"]
    if not funcs:
        raise ValueError("the answer defines no top-level `def predict_deltas(train_deltas, train_errors, reference, train_features, query_features, similarity, config)`")
    own_returns = [n for n in ast.walk(funcs[-1]) if isinstance(n, ast.Return) and n.value is not None]
    if not own_returns:  # a cut answer (token limit) or a sketch: the example would fail on None after a full data load
        raise ValueError("`predict_deltas` never returns its predictions: end it with `return` of a numpy array shaped like `reference`")
    lines = example.splitlines(keepends=True)
    begin = next(i for i, line in enumerate(lines) if line.startswith(MODEL_BEGIN))
    end = next(i for i, line in enumerate(lines) if line.startswith(MODEL_END))
    # the arguments in brief stay above the model's code: the debugger reads this region, not the coder's prompt
    notes = _argument_notes(EXAMPLE_SCRIPT.read_text())
    return check_script("".join(lines[: begin + 1]) + notes + code.rstrip("\n") + "\n" + "".join(lines[end:]), names=True)


#: A line by which a model elides code it means to keep: ``...``, ``# ...``, ``# rest unchanged``.
_ELISION = re.compile(r"^\s*(?:\.\.\.|#\s*\.\.\..*|#.*\b(?:rest|unchanged|same as before|as before)\b.*)\s*$", re.IGNORECASE)


def merge_elisions(answer: str, original: str) -> str:
    """``answer`` with each elision line (``...``) replaced by the ``original`` lines it stands for.

    Small models rewriting a function copy its start, change a line and end with ``...``
    (Qwen2.5-Coder-1.5B as debugger, three times in a row, measured). The lines an elision
    stands for are the original's between the answer's last line before it and its first line
    after it (matched after stripping whitespace). An answer without elisions comes back as is.

    Raises
    ------
    ValueError
        An elision whose surrounding lines are not in ``original`` (the message asks for the
        whole function).
    """
    lines = answer.splitlines()
    if not any(_ELISION.match(line) for line in lines):
        return answer
    old = original.splitlines()
    stripped = [line.strip() for line in old]
    out: list[str] = []
    cursor = 0
    for i, line in enumerate(lines):
        if not _ELISION.match(line):
            out.append(line)
            continue
        before = next((x.strip() for x in reversed(out) if x.strip()), None)
        after = next((x.strip() for x in lines[i + 1 :] if x.strip() and not _ELISION.match(x)), None)
        start = next((j for j in range(cursor, len(old)) if stripped[j] == before), None) if before is not None else -1
        if start is None:
            msg = "the answer leaves code out with `...` where it cannot be told what stands for it: write the whole function, every line"
            raise ValueError(msg)
        end = next((j for j in range(start + 1, len(old)) if stripped[j] == after), len(old)) if after is not None else len(old)
        out.extend(old[start + 1 : end])
        cursor = end
    return "\n".join(out) + "\n"


def model_region(script: str) -> str | None:
    """The text between the worked example's model markers (arguments in brief, imports, helpers, ``predict_deltas``), or None."""
    lines = script.splitlines(keepends=True)
    begin = next((i for i, line in enumerate(lines) if line.startswith(MODEL_BEGIN)), None)
    end = next((i for i, line in enumerate(lines) if line.startswith(MODEL_END)), None)
    if begin is None or end is None or end <= begin:
        return None
    return "".join(lines[begin + 1 : end])


def _argument_notes(example: str) -> str:
    """The docstring of the example's ``predict_deltas`` as ``#`` comment lines (its arguments in brief)."""
    import ast

    tree = ast.parse(example)
    func = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "predict_deltas")
    doc = ast.get_docstring(func) or ""
    return "".join(f"# {line}\n" if line.strip() else "#\n" for line in doc.splitlines())


def example_scaffold(example: str) -> str:
    """What a coder writing the model function reads: the function's signature, its arguments in brief, no body.

    Shown the example's own body, Qwen2.5-Coder-1.5B returned it unchanged in six runs out of six
    (with unused classes around it); shown the whole example without the body, it spent its
    1,200 tokens on classes and on copying the docstring back. Shown the signature with the
    docstring, it still copied the docstring (about 230 of its 700 tokens) in every answer. So
    the arguments are described in comments above the signature, which the host's splice does
    not need back (:func:`splice_model`: the example does the input and the output).
    """
    import ast

    tree = ast.parse(example)
    func = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "predict_deltas")
    lines = example.splitlines(keepends=True)
    signature = "".join(lines[func.lineno - 1 : func.body[0].lineno - 1])  # the def line(s), up to the docstring
    return (
        "# in scope already: import numpy as np\n"
        + _argument_notes(example)
        + signature
        + "    ...  # the model: compute and return the predicted changes here (no docstring needed)\n"
    )


def check_script(text: str, *, names: bool = False) -> str:
    """Check a model-written script against the static part of the contract; return it unchanged.

    ``names``: also refuse a script that uses names it never defines (:func:`undefined_names`):
    on for a coder's own script, off for a patched library script (whose shared code names hooks
    that only some templates define).

    Raises
    ------
    ValueError
        Empty, too long, not valid Python (with the line and message), no one-line
        ``CONFIG = {...}`` dictionary literal at top level, or (``names``) an undefined name.
        The message says what to fix.
    """
    import ast

    if not text.strip():
        raise ValueError("the script is empty")
    if len(text) > MAX_SCRIPT_CHARS:
        msg = f"the script has {len(text)} characters; at most {MAX_SCRIPT_CHARS}"
        raise ValueError(msg)
    try:
        tree = ast.parse(text)
    except SyntaxError as exc:
        msg = f"the script is not valid Python: line {exc.lineno}: {exc.msg}: {(exc.text or '').strip()[:120]!r}"
        raise ValueError(msg) from exc
    configs = [
        node for node in tree.body
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "CONFIG" for t in node.targets)
    ]  # fmt: skip
    if not configs or not isinstance(configs[0].value, ast.Dict) or configs[0].lineno != configs[0].end_lineno:
        raise ValueError("the script needs a one-line top-level `CONFIG = {...}` dictionary literal holding its hyperparameters")
    try:
        ast.literal_eval(configs[0].value)
    except ValueError as exc:
        raise ValueError("`CONFIG = {...}` must be a literal (numbers, strings, booleans, lists, dicts)") from exc
    missing = undefined_names(text) if names else []
    if missing:
        names = ", ".join(f"`{n}`" for n in missing[:8])
        msg = f"the script uses {names}, defined nowhere in it (not imported, assigned or a built-in): define or import each, or do without"
        raise ValueError(msg)
    return text


def undefined_names(text: str) -> list[str]:
    """Names the script reads at module level, or as globals inside its functions, that it never defines.

    Python's own scope analysis (:mod:`symtable`) decides what is local, free or global; a global
    that no module-level assignment, import, ``def`` or ``class`` binds and that is not a built-in
    is a ``NameError`` waiting for the line that reaches it (a 1.5B coder called a helper it never
    wrote; the sandbox run that found it cost two minutes). A ``from x import *`` turns the check off.

    Returns
    -------
    list of str
        Sorted undefined names (empty when none, or when the text does not parse).
    """
    import builtins
    import symtable

    try:
        top = symtable.symtable(text, "train.py", "exec")
    except SyntaxError:
        return []
    if "import *" in text:
        return []
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported() or s.is_namespace()}
    known = bound | set(dir(builtins)) | {"__file__", "__name__", "__builtins__", "__doc__", "__spec__"}
    missing: set[str] = set()
    stack = [top]
    while stack:
        table = stack.pop()
        stack.extend(table.get_children())
        if table.get_type() == "class":
            continue  # class bodies resolve names differently (and models rarely need them)
        for sym in table.get_symbols():
            name = sym.get_name()
            if not sym.is_referenced() or name in known:
                continue
            if table is top or sym.is_global():
                missing.add(name)
            elif sym.is_declared_global():
                missing.add(name)
    return sorted(missing)


#: The script the host runs in the sandbox after each training script (:mod:`cellforge.execution.export_outputs`).
EXPORTER = Path(__file__).with_name("export_outputs.py")
#: Where the exporter writes, inside ``outputs/``.
EXPORT_DIR = ".export"
#: Largest predictions matrix the host reads (declared in the ``.npy`` header before any allocation), bytes.
MAX_PREDICTION_BYTES = 2 * 1024**3
#: Largest ``labels.json`` (condition and gene names) the host reads, bytes.
MAX_LABELS_BYTES = 64 * 1024**2
#: Seconds the exporter may run in the sandbox.
EXPORT_TIMEOUT_S = 300.0


def collect_outputs(sandbox: Any, dest: Path, *, memory_mb: int | None = None, timeout_s: float = EXPORT_TIMEOUT_S) -> list[str]:
    """Copy a finished script's ``outputs/`` to the host folder ``dest``, its predictions re-made by the host.

    The host never parses the predictions file that generated code wrote. The exporter
    (:mod:`cellforge.execution.export_outputs`) reads ``outputs/predictions.h5ad`` inside the
    sandbox, under its limits, and writes a ``.npy`` matrix and a JSON list of labels; the folder
    is copied out without following links (sizes, entries and depth bounded:
    :func:`runtime.hostio.copy_tree_out`); :func:`import_exported` reads the two files with bounds
    fixed in advance and writes the host's own ``dest/predictions.h5ad`` over the copied one.

    Returns
    -------
    list of str
        Entries of ``outputs/`` not copied (links, special files).

    Raises
    ------
    PredictionError
        No outputs folder, an unreadable predictions file (the exporter's one-line reason),
        or exported files that break the bounds.
    """
    from cellforge.console import printable
    from runtime.errors import UntrustedFileError

    sandbox.write_text(".cellforge_export.py", EXPORTER.read_text())
    try:
        result = sandbox.run([sandbox.python, "-I", ".cellforge_export.py"], timeout_s=timeout_s, memory_mb=memory_mb, log_name="export.log")
    finally:
        sandbox.remove(".cellforge_export.py")
    if result.exit_code not in (0, 4):  # 4: no predictions file at all (the check of the outputs names it)
        lines = [line for line in (result.log_tail or "").splitlines() if line.strip()]
        why = printable(lines[-1] if lines else f"exit code {result.exit_code}", max_chars=400)
        if result.exit_code != 3:  # noqa: PLR2004 - the exporter's own "cannot read" status
            why = f"the predictions could not be exported in the sandbox ({result.limit_hit or f'exit code {result.exit_code}'}): {why}"
        raise PredictionError(why)
    try:
        skipped = sandbox.get_tree("outputs", dest)
    except FileNotFoundError as exc:
        msg = "the script wrote no outputs/ folder"
        raise PredictionError(msg) from exc
    except UntrustedFileError as exc:
        raise PredictionError(str(exc)) from exc
    if result.exit_code == 0:
        import_exported(dest)
    else:
        (Path(dest) / Path(PREDICTIONS).name).unlink(missing_ok=True)  # never parsed on the host
    return skipped


def _npy_header(handle: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) from an open ``.npy`` file's header, nothing else read."""
    version = np.lib.format.read_magic(handle)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return reader(handle, max_header_size=10_000)


def import_exported(outputs: Path, *, max_bytes: int = MAX_PREDICTION_BYTES) -> Path:
    """Read the exporter's ``.export/X.npy`` and ``labels.json`` in ``outputs`` and write ``outputs/predictions.h5ad``.

    The ``.npy`` header (shape, dtype, order) is read first: a matrix that is not 2-D
    float32/float64, declares more than ``max_bytes``, or whose file is not exactly header + data,
    is refused before any allocation. The labels are parsed by pydantic-core (nesting bounded) and
    must name one condition per row and one gene per column. The exported folder is removed.

    Returns
    -------
    Path
        The host-written ``predictions.h5ad``.

    Raises
    ------
    PredictionError
        Missing or malformed exported files, with what is wrong.
    """
    import os

    import pydantic_core

    from runtime.hostio import remove_tree

    folder = Path(outputs) / EXPORT_DIR
    x_path, labels_path = folder / "X.npy", folder / "labels.json"
    for path in (x_path, labels_path):
        if path.is_symlink() or not path.is_file():
            msg = f"outputs/{EXPORT_DIR}/{path.name}: missing after the export"
            raise PredictionError(msg)
    if labels_path.stat().st_size > MAX_LABELS_BYTES:
        msg = f"outputs/predictions.h5ad: its condition and gene names take over {MAX_LABELS_BYTES} bytes"
        raise PredictionError(msg)
    try:
        labels = pydantic_core.from_json(labels_path.read_bytes())
        conditions, genes = labels["conditions"], labels["genes"]
        if not (isinstance(conditions, list) and isinstance(genes, list) and all(isinstance(v, str) for v in conditions + genes)):
            raise TypeError("conditions and genes must be lists of strings")
    except (ValueError, KeyError, TypeError) as exc:
        msg = f"outputs/{EXPORT_DIR}/labels.json: malformed ({str(exc)[:200]})"
        raise PredictionError(msg) from exc
    with open(x_path, "rb") as handle:
        try:
            shape, fortran, dtype = _npy_header(handle)
        except ValueError as exc:
            msg = f"outputs/{EXPORT_DIR}/X.npy: not a .npy file ({str(exc)[:200]})"
            raise PredictionError(msg) from exc
        if len(shape) != 2 or dtype not in (np.dtype("<f4"), np.dtype("<f8")):  # noqa: PLR2004
            msg = f"outputs/predictions.h5ad: X has shape {shape} and dtype {dtype}; expected (rows, genes) float32 or float64"
            raise PredictionError(msg)
        n = int(shape[0]) * int(shape[1])
        if n * dtype.itemsize > max_bytes:
            msg = f"outputs/predictions.h5ad: X declares {shape} ({n * dtype.itemsize / 2**20:.0f} MiB), over the host's limit of {max_bytes / 2**20:.0f} MiB"
            raise PredictionError(msg)
        if os.fstat(handle.fileno()).st_size != handle.tell() + n * dtype.itemsize:
            msg = f"outputs/{EXPORT_DIR}/X.npy: its size does not match its header {shape}"
            raise PredictionError(msg)
        if shape[0] != len(conditions) or shape[1] != len(genes):
            msg = f"outputs/predictions.h5ad: X is {shape} for {len(conditions)} condition labels and {len(genes)} genes"
            raise PredictionError(msg)
        x = np.fromfile(handle, dtype=dtype, count=n).reshape(shape, order="F" if fortran else "C")
    rows = labels.get("rows")
    if not (isinstance(rows, list) and len(rows) == len(conditions) and all(isinstance(r, str) for r in rows) and len(set(rows)) == len(rows)):
        rows = [str(i) for i in range(len(conditions))]
    obs = pd.DataFrame({"condition": conditions}, index=rows)
    pred = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(genes, dtype=str)))
    remove_tree(folder)
    out = Path(outputs) / Path(PREDICTIONS).name
    out.unlink(missing_ok=True)  # the script's own file: never parsed on the host
    write_h5ad(pred, out)
    return out


def check_outputs(outputs: Path, *, test: list[str], genes: list[str]) -> dict:
    """Check a host-side copy of a script's ``outputs/`` against the contract; return its validation metrics.

    Parameters
    ----------
    outputs
        Folder holding ``predictions.h5ad`` (host-written: :func:`collect_outputs`) and ``val_metrics.json``; no other file is read.
    test, genes
        The split's test conditions and the data's genes (see :func:`load_predictions`).

    Raises
    ------
    PredictionError
        What is wrong, precisely: the missing file, unknown or missing condition names,
        missing genes, shapes, non-finite values, count-scale values, a ``val_metrics.json`` that is not a JSON object.
    """
    outputs = Path(outputs)
    load_predictions(outputs / Path(PREDICTIONS).name, test=test, genes=genes)
    return read_val_metrics(outputs)

