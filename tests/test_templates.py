"""The model template library: reference predictors on hand-made data, every template on small real data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from cellforge.data.splits import make_split
from cellforge.errors import ConfigError
from cellforge.execution import contract
from cellforge.execution.codegen import get_config, render, set_config, templates


def _features(lib, deltas: dict[str, np.ndarray], controls: dict[str, np.ndarray], conds: dict[str, tuple[str, str]]):
    """Features over hand-made condition deltas (no noise): one control cell per context."""
    genes = [f"G{i}" for i in range(len(next(iter(controls.values()))))]
    X = np.stack(list(controls.values()))
    obs = pd.DataFrame(
        {"condition": [f"{c}:ctrl" for c in controls], "context": list(controls), "is_control": True, "perturbation": "ctrl"}
    )
    obs.index = obs.index.astype(str)
    train = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes))
    table = {c: {"perturbation": p, "context": x} for c, (p, x) in conds.items()}
    feats = lib.Features(train, table, k=2)
    feats.set_seen(pd.DataFrame({c: controls[conds[c][1]] + d for c, d in deltas.items()}, index=genes).T)
    return feats


def test_condition_and_gene_means_of_a_large_sparse_x_come_in_blocks_and_match_the_whole(lib, monkeypatch):
    """Full-size screens: sums over a subset of cells run a block of rows at a time in float64 and give the one-shot means."""
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    X = sp.random(1000, 30, density=0.2, format="csr", dtype=np.float32, random_state=1)
    cells = ad.AnnData(X=X, obs=pd.DataFrame({"condition": rng.choice(["a", "b", "c"], 1000)}, index=[f"c{i}" for i in range(1000)]))
    rows = np.flatnonzero(rng.random(1000) < 0.7)  # a subset of the cells, as cross-validation folds take
    whole = lib.group_means(cells, rows).to_numpy(), lib.column_means(X, rows)
    monkeypatch.setattr(lib, "CHUNK_VALUES", 500)  # ~80 rows a block
    assert len(lib._row_blocks(X, rows)) > 5
    blocked = lib.group_means(cells, rows).to_numpy(), lib.column_means(X, rows)
    dense = X.toarray().astype(np.float64)[rows]
    labels = cells.obs["condition"].to_numpy()[rows]
    for got in (whole, blocked):
        np.testing.assert_allclose(got[0], [dense[labels == c].mean(axis=0) for c in "abc"], rtol=1e-12)
        np.testing.assert_allclose(got[1], dense.mean(axis=0), rtol=1e-12)


def test_means_over_whole_conditions_come_from_one_pass_over_the_matrix(lib, monkeypatch):
    """Cross-validation folds, controls and perturbed cells are whole conditions: X is summed once, every mean is exact."""
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    X = sp.random(600, 20, density=0.3, format="csr", dtype=np.float32, random_state=2)
    cells = ad.AnnData(X=X, obs=pd.DataFrame({"condition": rng.choice(["a", "b", "c", "d"], 600)}, index=[f"c{i}" for i in range(600)]))
    labels = cells.obs["condition"].to_numpy()
    passes = []
    real = lib._block_sums
    monkeypatch.setattr(lib, "_block_sums", lambda *a: passes.append(len(a[1])) or real(*a))
    dense = X.toarray().astype(np.float64)
    for held in (["a"], ["b", "d"], []):
        rows = np.flatnonzero(~np.isin(labels, held))
        kept = sorted(set("abcd") - set(held))
        np.testing.assert_allclose(lib.group_means(cells, rows).to_numpy(), [dense[labels == c].mean(axis=0) for c in kept], rtol=1e-12)
        np.testing.assert_allclose(lib.cell_mean(cells, rows), dense[rows].mean(axis=0), rtol=1e-12)
    assert passes == [600]  # one pass over all cells, then sums of conditions
    part = np.flatnonzero(labels != "a")[:-3]  # a condition cut in part: summed from its own cells
    np.testing.assert_allclose(lib.cell_mean(cells, part), dense[part].mean(axis=0), rtol=1e-12)


def test_gene_gnn_layers_compute_message_passing_over_the_gene_features(lib):
    """The first layer reads graph @ [target indicator, gene embedding, learned embedding], per condition (GEARS-like),
    computed with the condition-independent part propagated once; dense and sparse graphs agree."""
    import scipy.sparse as sp
    import torch

    ns = vars(lib).copy()
    exec(compile((Path(__file__).resolve().parents[1] / "cellforge" / "execution" / "templates" / "gene_gnn.py").read_text(), "gene_gnn.py", "exec"), ns)  # noqa: S102
    rng = np.random.default_rng(1)
    genes = 40
    graph = sp.random(genes, genes, density=0.1, format="csr", dtype=np.float32, random_state=3) + sp.eye(genes, dtype=np.float32)
    emb = rng.standard_normal((genes, 5)).astype(np.float32)
    x = torch.tensor(rng.standard_normal((3, genes)), dtype=torch.float32)
    outs = []
    for g in (graph.toarray(), sp.csr_matrix(graph)):
        torch.manual_seed(0)
        net = ns["GeneGNN"](genes, g, emb, 8, 0.0).eval()
        torch.nn.init.normal_(net.readout.weight)
        torch.nn.init.normal_(net.learned)
        with torch.no_grad():
            a = torch.tensor(graph.toarray())
            h = torch.cat([x.unsqueeze(-1), torch.cat([net.gene_emb, net.learned], 1).expand(3, -1, -1)], -1)
            h = torch.nn.functional.gelu(net.layer1(a @ h))
            h = torch.nn.functional.gelu(net.layer2(a @ h))
            expected = net.readout(h).squeeze(-1)
            outs.append(net(x))
        np.testing.assert_allclose(outs[-1].numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(outs[0].numpy(), outs[1].numpy(), rtol=1e-4, atol=1e-5)


def test_on_target_moves_the_target_gene_by_the_mean_knockdown(lib):
    shared = np.array([0, 0, 0, 0, 0, 1.0])
    deltas = {}
    for i, gene in enumerate(["G1", "G2", "G3"]):
        d = shared.copy()
        d[i + 1] = -2.0 - i  # knock-downs of -2, -3, -4
        deltas[gene] = d
    conds = {g: (g, "all") for g in [*deltas, "G4"]}
    feats = _features(lib, deltas, {"all": np.ones(6)}, conds)
    pred = feats.base("G4", "on_target")
    # the target gets the mean knock-down; other genes the mean over conditions not targeting them
    np.testing.assert_allclose(pred, [0, 0, 0, 0, -3.0, 1.0])
    np.testing.assert_allclose(feats.base("G4", "training_mean"), [0, -2 / 3, -1, -4 / 3, 0, 1.0])


def test_member_additive_learns_members_seen_only_in_combinations(lib):
    rng = np.random.default_rng(0)
    effect = {m: rng.normal(size=8) for m in "ABCD"}
    effect["B"] = -effect["A"]  # the singles average to b, the model's intercept
    b = rng.normal(size=8) * 0.1
    conds = {"A": "A", "B": "B", "A+C": "A+C", "B+D": "B+D", "C+D": "C+D"}
    singles = ["A", "B"]
    # singles carry b; combinations carry b once plus their members' effects
    deltas = {c: b + sum(effect[m] for m in p.split("+")) for c, p in conds.items()}
    feats = _features(lib, deltas, {"all": np.zeros(8)}, {c: (p, "all") for c, p in conds.items()})
    assert set(singles) <= set(feats.seen)
    # leave C+D out: C is known only from A+C, D only from B+D
    np.testing.assert_allclose(feats.base("C+D", "member_additive"), deltas["C+D"], atol=1e-4)
    # the plain additive baseline cannot see C or D at all
    assert np.abs(feats.base("C+D", "additive")).sum() == 0


def test_observed_additive_prefers_observed_singles_and_falls_back_to_the_member_model(lib):
    rng = np.random.default_rng(4)
    effect = {m: rng.normal(size=8) for m in "ABCDE"}
    conds = {"A": "A", "B": "B", "A+C": "A+C", "B+D": "B+D", "C+D": "C+D", "A+B": "A+B", "A+E": "A+E", "C+E": "C+E"}
    deltas = {c: sum(effect[m] for m in p.split("+")) + (0.5 if "+" in p else 0.0) for c, p in conds.items()}
    held = {"A+B", "A+E", "C+D"}
    feats = _features(lib, {c: d for c, d in deltas.items() if c not in held}, {"all": np.zeros(8)}, {c: (p, "all") for c, p in conds.items()})
    # both members seen alone: the sum of their observed deltas (the additive baseline)
    np.testing.assert_allclose(feats.base("A+B", "observed_additive"), deltas["A"] + deltas["B"])
    # one member seen alone: only its observed delta, even though E is known from C+E
    np.testing.assert_allclose(feats.base("A+E", "observed_additive"), deltas["A"])
    # no member seen alone: the ridge member model learned from the other combinations, shrunk
    # halfway towards the training mean
    member, mean = feats.base("C+D", "member_additive"), feats.base("C+D", "training_mean")
    assert np.abs(member - mean).sum() > 0
    np.testing.assert_allclose(feats.base("C+D", "observed_additive"), 0.5 * (member + mean))


def test_context_regression_recovers_the_control_dependence(lib, monkeypatch):
    rng = np.random.default_rng(1)
    common, beta = rng.normal(size=10), -0.4
    controls = {f"P{i}": rng.normal(size=10) for i in range(5)}
    deltas = {f"P{i}:drug": common + beta * (controls[f"P{i}"] - np.mean(list(controls.values()), axis=0)) for i in range(5)}
    conds = {f"P{i}:drug": ("drug", f"P{i}") for i in range(5)}
    feats = _features(lib, {k: v for k, v in deltas.items() if k != "P4:drug"}, controls, conds)
    truth, shift = deltas["P4:drug"], feats.base("P4:drug", "context_shift")
    assert np.abs(shift - truth).mean() > 0.1
    # the fitted slope is exact here (the data follow the model); the reference moves the shift
    # REGRESSION_SHRINKAGE of the way towards it
    s = lib.REGRESSION_SHRINKAGE
    assert 0 < s <= 1
    np.testing.assert_allclose(feats.base("P4:drug", "context_regression"), shift + s * (truth - shift), atol=1e-8)
    monkeypatch.setattr(lib, "REGRESSION_SHRINKAGE", 1.0)
    feats.set_seen(pd.DataFrame({c: controls[conds[c][1]] + d for c, d in deltas.items() if c != "P4:drug"}, index=feats.genes).T)
    np.testing.assert_allclose(feats.base("P4:drug", "context_regression"), truth, atol=1e-8)


def _two_lineages(rng, n_genes=12):
    """Six contexts in two lineages (controls near two centres) whose responses differ by lineage."""
    centres = {"myeloid": rng.normal(size=n_genes) * 3, "lymphoid": rng.normal(size=n_genes) * 3}
    response = {"myeloid": rng.normal(size=n_genes) * 2, "lymphoid": rng.normal(size=n_genes) * 0.5}
    controls, deltas = {}, {}
    for lineage in centres:
        for i in range(3):
            ctx = f"{lineage}{i}"
            controls[ctx] = centres[lineage] + rng.normal(size=n_genes) * 0.1
            deltas[f"{ctx}:stim"] = response[lineage] + rng.normal(size=n_genes) * 0.05
    return controls, deltas


def test_context_kernel_transfers_the_response_of_similar_contexts(lib):
    controls, deltas = _two_lineages(np.random.default_rng(2))
    conds = {c: ("stim", c.split(":")[0]) for c in deltas}
    feats = _features(lib, {k: v for k, v in deltas.items() if k != "myeloid2:stim"}, controls, conds)
    kernel = feats.base("myeloid2:stim", "context_kernel")
    myeloid = np.mean([deltas["myeloid0:stim"], deltas["myeloid1:stim"]], axis=0)
    shift = feats.base("myeloid2:stim", "context_shift")
    truth = deltas["myeloid2:stim"]
    # the two seen myeloid contexts carry nearly all the weight; the plain mean mixes in lymphoid cells
    np.testing.assert_allclose(kernel, myeloid, atol=0.05)
    assert np.abs(kernel - truth).mean() < 0.2 * np.abs(shift - truth).mean()
    # the adaptive reference picks the kernel here (it predicts each seen context best when left out)
    np.testing.assert_allclose(feats.base("myeloid2:stim", "context_adaptive"), kernel)


def test_context_adaptive_picks_the_regression_when_responses_follow_the_control(lib):
    rng = np.random.default_rng(3)
    common, beta = rng.normal(size=10), -0.5
    controls = {f"P{i}": rng.normal(size=10) for i in range(5)}
    centre = np.mean(list(controls.values()), axis=0)
    deltas = {f"P{i}:drug": common + beta * (controls[f"P{i}"] - centre) for i in range(5)}
    conds = {f"P{i}:drug": ("drug", f"P{i}") for i in range(5)}
    feats = _features(lib, {k: v for k, v in deltas.items() if k != "P4:drug"}, controls, conds)
    np.testing.assert_allclose(feats.base("P4:drug", "context_adaptive"), feats.base("P4:drug", "context_regression"))
    # with a single seen context every context reference is that context's delta
    few = _features(lib, {"P0:drug": deltas["P0:drug"]}, controls, conds)
    for kind in ("context_regression", "context_kernel", "context_adaptive"):
        np.testing.assert_allclose(few.base("P4:drug", kind), deltas["P0:drug"])


def test_two_seen_contexts_fall_back_to_the_references_that_need_no_selection(lib):
    # With two seen contexts every leave-one-out fit sees a single context, where all kernel
    # widths and all context references give the same prediction: nothing can be selected.
    rng = np.random.default_rng(5)
    controls = {f"P{i}": rng.normal(size=10) for i in range(3)}
    deltas = {f"P{i}:drug": rng.normal(size=10) for i in range(3)}
    conds = {f"P{i}:drug": ("drug", f"P{i}") for i in range(3)}
    feats = _features(lib, {k: v for k, v in deltas.items() if k != "P2:drug"}, controls, conds)
    shift, regression = feats.base("P2:drug", "context_shift"), feats.base("P2:drug", "context_regression")
    # the kernel's tie resolves to the widest width, the plain mean, not to the nearest context
    np.testing.assert_allclose(feats.base("P2:drug", "context_kernel"), shift)
    # the adaptive reference takes the shrunk regression, whose one slope two contexts do fix
    assert np.abs(regression - shift).sum() > 0
    np.testing.assert_allclose(feats.base("P2:drug", "context_adaptive"), regression)


def test_dose_encoder_adds_monotone_dose_features(lib, monkeypatch):
    conds = {f"drug:{d}": ("drug", "all") for d in (0.1, 1.0, 10.0)}
    feats = _features(lib, {"drug:0.1": np.ones(3)}, {"all": np.zeros(3)}, conds)
    for d in (0.1, 1.0, 10.0):
        feats.conditions[f"drug:{d}"]["dose"] = d
    plain = feats.vector("drug:1.0")
    monkeypatch.setattr(lib, "CONFIG", {"dose_encoder": "log_sigmoid"})
    encoded = np.stack([feats.vector(f"drug:{d}")[-2:] for d in (0.1, 1.0, 10.0)])
    assert len(feats.vector("drug:1.0")) == len(plain) + 2
    assert (np.diff(encoded, axis=0) > 0).all()  # both features grow with dose
    np.testing.assert_allclose(encoded[1], [np.log10(2.0), 0.5])


def test_unknown_reference_and_template_name_the_choices(lib):
    feats = _features(lib, {"A": np.ones(3)}, {"all": np.zeros(3)}, {"A": ("A", "all"), "B": ("B", "all")})
    with pytest.raises(ValueError, match="valid: training_mean"):
        feats.base("B", "mean_of_everything")
    with pytest.raises(ConfigError, match="available: .*gene_gnn"):
        render("transformer", {})


def test_rendered_scripts_are_standalone_and_carry_their_config():
    assert {"pert_mlp", "latent_linear", "gene_gnn", "combo_additive", "cond_autoencoder"} <= set(templates())
    for name in templates():
        script = render(name, {"hidden_dim": 8})
        assert script.startswith('"""cellforge generated') and f"template: {name}" in script.splitlines()[0]
        assert get_config(script) == {"template": name, "hidden_dim": 8}
        compile(script, name, "exec")
        assert "import cellforge" not in script and "from cellforge" not in script


SMALL = {"dropout": 0.0, "learning_rate": 3e-3, "weight_decay": 0.01, "de_weight": 1.0, "max_epochs": 4,
         "batch_size": 8, "patience": 2, "n_components": 4, "seed": 0, "threads": 1, "train_on": "all"}  # fmt: skip

#: template -> (data set, split strategy and options, CONFIG updates)
CASES = {
    "pert_mlp": ("adamson_subset", ("kfold", {"n_folds": 3, "fold": 0}), {"baseline": "on_target", "hidden_dim": 8}),
    "latent_linear": ("adamson_subset", ("kfold", {"n_folds": 3, "fold": 1}), {"baseline": "on_target", "hidden_dim": 4}),
    "gene_gnn": ("adamson_subset", ("kfold", {"n_folds": 3, "fold": 2}), {"baseline": "on_target", "hidden_dim": 4, "n_neighbours": 5}),
    "combo_additive": ("norman_subset", ("combination", {}), {"baseline": "single_mean", "hidden_dim": 8, "learning_rate": 1e-2}),
    "cond_autoencoder": (
        "glioblastoma_subset",
        ("new_context", {"test_contexts": ["PW030"]}),
        {"baseline": "context_regression", "hidden_dim": 16, "latent_dim": 4, "batch_size": 256, "max_epochs": 2},
    ),
}


@pytest.mark.parametrize("template", sorted(CASES))
def test_template_trains_and_predicts_on_real_data(template, load, tmp_path):
    dataset, (strategy, options), updates = CASES[template]
    adata = load(dataset)
    manifest = make_split(adata, strategy, seed=0, **options)
    contract.prepare_inputs(adata, manifest, tmp_path, task={"type": strategy, "description": "test"})
    (tmp_path / "train.py").write_text(render(template, {**SMALL, **updates}))
    done = subprocess.run([sys.executable, "train.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    pred = contract.read_predictions(tmp_path / contract.PREDICTIONS, test=[*manifest.val, *manifest.test], genes=[str(g) for g in adata.var_names])
    assert pred.shape == (len(manifest.val) + len(manifest.test), adata.n_vars) and np.isfinite(pred.to_numpy()).all()
    metrics = json.loads((tmp_path / contract.VAL_METRICS).read_text())
    assert "epochs_run" in metrics  # val_* (its own cross-validation) only with cv_folds: the validation cells stay on the host
    import torch

    # the device it trained on
    assert metrics["device"].startswith("cuda:") if torch.cuda.is_available() else metrics["device"] == "cpu"
    if template == "gene_gnn":  # the checkpoint alone reproduces the predictions
        first = pred.to_numpy().copy()
        again = subprocess.run([sys.executable, "train.py", "--predict-only"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
        redo = contract.read_predictions(tmp_path / contract.PREDICTIONS, test=[*manifest.val, *manifest.test], genes=[str(g) for g in adata.var_names])
        np.testing.assert_allclose(redo.to_numpy(), first, rtol=1e-5, atol=1e-6)


def test_the_sparse_coexpression_graph_built_in_blocks_is_the_dense_graph(lib):
    feats = lib.Features.__new__(lib.Features)
    feats.control_cells = np.random.default_rng(0).gamma(1.0, 1.0, (300, 90)).astype(np.float32)
    dense = feats.coexpression_graph(6)
    sparse = feats.coexpression_graph(6, sparse=True)
    centred = feats.control_cells - feats.control_cells.mean(axis=0)
    in_blocks_of_7 = lib.Features._sparse_graph(centred, 6, block=7).toarray()
    # float32 sums in blocks of another size differ in the last bits (1e-7 absolute, measured under load)
    np.testing.assert_allclose(in_blocks_of_7, lib.Features._sparse_graph(centred, 6).toarray(), rtol=1e-6, atol=1e-6)
    assert sparse.nnz < 90 * 14  # about 2 x 6 partners and itself a gene
    np.testing.assert_allclose(sparse.toarray(), dense, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(sparse.sum(axis=1)).ravel(), 1.0, rtol=1e-5)


def test_gene_gnn_with_a_sparse_graph_predicts_what_the_dense_one_does(load, tmp_path):
    """Above SPARSE_GRAPH_GENES the gene graph is sparse (full-size screens); the same model, the same numbers."""
    dataset, (strategy, options), updates = CASES["gene_gnn"]
    adata = load(dataset)
    manifest = make_split(adata, strategy, seed=0, **options)
    preds = {}
    for kind in ("dense", "sparse"):
        work = tmp_path / kind
        contract.prepare_inputs(adata, manifest, work, task={"type": strategy, "description": "test"})
        script = render("gene_gnn", {**SMALL, **updates})
        assert "SPARSE_GRAPH_GENES = 2000" in script and adata.n_vars < 2000
        (work / "train.py").write_text(script if kind == "dense" else script.replace("SPARSE_GRAPH_GENES = 2000", "SPARSE_GRAPH_GENES = 10"))
        for args in ([], ["--predict-only"]):  # the sparse graph is rebuilt, not read from the checkpoint
            done = subprocess.run([sys.executable, "train.py", *args], cwd=work, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
        preds[kind] = contract.read_predictions(work / contract.PREDICTIONS, test=[*manifest.val, *manifest.test], genes=[str(g) for g in adata.var_names]).to_numpy()
    np.testing.assert_allclose(preds["sparse"], preds["dense"], rtol=1e-4, atol=1e-5)


def test_the_model_functions_reference_is_the_hosts_comparator(load, tmp_path):
    """A coder's function starts from the plan's reference; with no correction it predicts what the reference attempt does."""
    adata = load("norman_subset")
    manifest = make_split(adata, "combination", seed=0)
    config = {**SMALL, "baseline": "observed_additive", "n_components": 8, "hidden_dim": 8}
    preds = {}
    for name, script in [
        ("reference", render("pert_mlp", {**config, "reference_only": True, "cv_folds": 0})),
        ("function", contract.splice_model(
            set_config(contract.EXAMPLE_SCRIPT.read_text(), config),
            "def predict_deltas(train_deltas, train_errors, reference, train_features, query_features, config):\n"
            "    assert train_deltas.shape == train_errors.shape and train_features.shape[0] == len(train_deltas)\n"
            "    assert query_features.shape == (len(reference), train_features.shape[1]) and np.isfinite(query_features).all()\n"
            "    return reference.copy()\n",
        )),
    ]:  # fmt: skip
        work = tmp_path / name
        contract.prepare_inputs(adata, manifest, work, task={"type": "combination", "description": "test"})
        (work / "train.py").write_text(script)
        done = subprocess.run([sys.executable, "train.py"], cwd=work, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        preds[name] = contract.read_predictions(work / contract.PREDICTIONS, test=[*manifest.val, *manifest.test], genes=[str(g) for g in adata.var_names])
    np.testing.assert_allclose(preds["function"].to_numpy(), preds["reference"].loc[preds["function"].index].to_numpy(), atol=1e-5)


def test_the_model_functions_nan_names_rows_with_zero_features(load, tmp_path):
    """A function that divides by a zero feature norm fails with the rows and their all-zero features named (the
    1.5B coder's Norman drafts did; its debugger read only "NaN" from the host's contract check)."""
    adata = load("norman_subset")
    manifest = make_split(adata, "combination", seed=0)
    config = {**SMALL, "baseline": "observed_additive", "n_components": 8}
    code = (
        "def predict_deltas(train_deltas, train_errors, reference, train_features, query_features, config):\n"
        "    assert np.allclose(np.linalg.norm(train_features, axis=1)[train_features.any(axis=1)], 1.0)\n"
        "    norms = np.linalg.norm(query_features, axis=1, keepdims=True)\n"
        "    return reference + (query_features / norms) @ np.zeros((train_features.shape[1], reference.shape[1]))\n"
    )
    contract.prepare_inputs(adata, manifest, tmp_path, task={"type": "combination", "description": "test"})
    (tmp_path / "train.py").write_text(contract.splice_model(set_config(contract.EXAMPLE_SCRIPT.read_text(), config), code))
    done = subprocess.run([sys.executable, "-W", "ignore", "train.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    query = [*manifest.val, *manifest.test]
    task = {c["condition"]: c for c in json.loads((tmp_path / "task.json").read_text())["conditions"]}
    unmeasured = [i for i, c in enumerate(query) if not any(t in set(adata.var_names) for t in task[c]["perturbation"].split("+"))]
    if not unmeasured:
        pytest.skip("every condition of this split has a measured target gene")
    assert done.returncode != 0
    assert f"predict_deltas returned NaN or inf in {len(unmeasured)} of {len(query)} rows" in done.stderr
    assert f"rows {unmeasured[:10]} have query_features all zeros" in done.stderr
    assert not (tmp_path / contract.PREDICTIONS).exists()


def test_the_model_function_takes_the_arguments_it_names_and_similarity_is_the_cosine_of_the_features(load, tmp_path):
    """Arguments go by name (a function may take only what it uses, in any order); an unknown name fails with the valid ones."""
    adata = load("adamson_subset")
    manifest = make_split(adata, "unseen_perturbation", seed=0)
    config = {**SMALL, "baseline": "on_target", "n_components": 8}
    contract.prepare_inputs(adata, manifest, tmp_path, task={"type": "unseen_perturbation", "description": "test"})
    example = set_config(contract.EXAMPLE_SCRIPT.read_text(), config)
    own = (
        "def predict_deltas(similarity, reference, train_errors, query_features, train_features):\n"
        "    assert np.allclose(similarity, query_features @ train_features.T) and similarity.shape == (len(reference), len(train_errors))\n"
        "    assert (np.abs(similarity) <= 1 + 1e-9).all()\n"
        "    return reference.copy()\n"
    )
    for code, ok in [(own, True), ("def predict_deltas(reference, weights):\n    return reference\n", False)]:
        (tmp_path / "train.py").write_text(contract.splice_model(example, code))
        done = subprocess.run([sys.executable, "-W", "ignore", "train.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert (done.returncode == 0) == ok, done.stderr[-2000:]
    assert "predict_deltas asks for ['weights']: its arguments can be ['train_deltas', 'train_errors', 'reference', 'train_features', 'query_features', 'similarity'] and config" in done.stderr


def test_task_json_carries_numeric_doses(load, tmp_path):
    adata = load("norman_subset")
    manifest = make_split(adata, "combination", seed=0)
    contract.prepare_inputs(adata, manifest, tmp_path, task={"type": "combination", "description": "test"})
    conditions = {c["condition"]: c for c in json.loads((tmp_path / "task.json").read_text())["conditions"]}
    singles = [c for c in conditions.values() if "+" not in c["perturbation"] and c["condition"] in manifest.train]
    assert singles and all(c["dose"] == 1.0 for c in singles)
    # "1+1" (a dose per member) is not one number: no dose rather than a wrong one
    assert all("dose" not in c for c in conditions.values() if "+" in c["perturbation"])


def test_protein_readout_runs_through_the_library(tmp_path):
    """SYNTHETIC ADT counts (CLR-normalised by the protein loader): knocking out a protein's gene lowers it."""
    from cellforge.data.loaders import load_scperturb_protein

    rng = np.random.default_rng(3)
    proteins = [f"P{i}" for i in range(8)]
    labels = ["control"] * 120 + [p for p in proteins[:6] for _ in range(40)]
    rates = np.full((len(labels), 8), 80.0)
    for row, label in enumerate(labels):
        if label != "control":
            rates[row, proteins.index(label)] = 10.0  # the knocked-out protein falls
    obs = pd.DataFrame({"perturbation": labels, "fixture": "SYNTHETIC"}, index=[f"c{i}" for i in range(len(labels))])
    path = tmp_path / "adt.h5ad"
    ad.AnnData(X=rng.poisson(rates).astype(np.float32), obs=obs, var=pd.DataFrame(index=proteins)).write_h5ad(path)
    adata = load_scperturb_protein(path, dataset="synthetic_adt")
    manifest = make_split(adata, "kfold", seed=0, n_folds=3, fold=0)
    work = tmp_path / "work"
    contract.prepare_inputs(adata, manifest, work, task={"type": "unseen_perturbation", "description": "test"})
    (work / "train.py").write_text(render("pert_mlp", {**SMALL, "baseline": "on_target", "hidden_dim": 8, "n_components": 2}))
    done = subprocess.run([sys.executable, "train.py"], cwd=work, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    pred = contract.read_predictions(work / contract.PREDICTIONS, test=[*manifest.val, *manifest.test], genes=proteins)
    control = np.asarray(adata[adata.obs["is_control"].to_numpy()].X.mean(axis=0)).ravel()
    for cond in manifest.test:
        delta = pred.loc[cond].to_numpy() - control
        assert delta[proteins.index(cond)] < -1.0  # the target protein is predicted down (CLR units)
        assert np.abs(np.delete(delta, proteins.index(cond))).max() < abs(delta[proteins.index(cond)])


def test_linear_reference_is_the_harness_linear_baseline_leaving_the_condition_out(lib):
    from cellforge.evaluation.baselines import BaselineInputs, linear

    rng = np.random.default_rng(4)
    genes = [f"G{i}" for i in range(12)]
    control = rng.normal(size=12)
    seen = {g: rng.normal(size=12) for g in genes[:7]}  # knock-downs of G0..G6, each a random delta
    conds = {g: (g, "all") for g in [*seen, "G9"]}
    feats = _features(lib, seen, {"all": control}, conds)
    inputs = BaselineInputs(
        seen=pd.DataFrame({g: control + d for g, d in seen.items()}, index=genes).T,
        controls=pd.DataFrame([control], index=["all"], columns=genes),
        conditions=pd.DataFrame({"perturbation": [p for p, _ in conds.values()], "context": "all"}, index=list(conds)),
        test=["G9"],
    )
    np.testing.assert_allclose(feats.base("G9", "linear"), linear(inputs).loc["G9"].to_numpy() - control, atol=1e-10)
    # a seen condition's reference is fitted without it: it differs from its own delta
    assert not np.allclose(feats.base("G3", "linear"), seen["G3"], atol=1e-3)


def test_linear_reference_fits_within_a_context_like_the_harness(lib):
    """Two states, one with enough seen knock-downs for its own fit, one without: the template and the harness agree."""
    from cellforge.evaluation.baselines import BaselineInputs, linear

    rng = np.random.default_rng(6)
    genes = [f"G{i}" for i in range(16)]
    controls = {"rest": rng.normal(size=16) + 3, "stim": rng.normal(size=16) + 3}
    deltas, conds = {}, {}
    for i in range(8):
        deltas[f"G{i}@rest"], conds[f"G{i}@rest"] = rng.normal(size=16), (f"G{i}", "rest")
    for i in range(3):
        deltas[f"G{i}@stim"], conds[f"G{i}@stim"] = rng.normal(size=16), (f"G{i}", "stim")
    test = ["G12@rest", "G13@stim"]
    conds.update({"G12@rest": ("G12", "rest"), "G13@stim": ("G13", "stim")})
    feats = _features(lib, deltas, controls, conds)
    inputs = BaselineInputs(
        seen=pd.DataFrame({c: controls[conds[c][1]] + d for c, d in deltas.items()}, index=genes).T,
        controls=pd.DataFrame(controls, index=genes).T,
        conditions=pd.DataFrame({"perturbation": [p for p, _ in conds.values()], "context": [x for _, x in conds.values()]}, index=list(conds)),
        test=test,
    )
    expected = linear(inputs)
    for cond in test:
        np.testing.assert_allclose(feats.base(cond, "linear"), expected.loc[cond].to_numpy() - controls[conds[cond][1]], atol=1e-9)


def _cells(n_genes: int = 12) -> tuple[ad.AnnData, dict]:
    """Control cells plus four perturbed conditions; condition A's cells are far from the rest."""
    rng = np.random.default_rng(5)
    labels = ["ctrl"] * 40 + [c for c in "ABCD" for _ in range(10)]
    X = rng.normal(size=(len(labels), n_genes))
    X[np.array(labels) == "A", :3] += 8.0
    obs = pd.DataFrame({"condition": labels, "context": "all", "is_control": [lab == "ctrl" for lab in labels]}, index=[f"c{i}" for i in range(len(labels))])
    conditions = {c: {"perturbation": c if c != "ctrl" else "ctrl", "context": "all"} for c in ["ctrl", *"ABCD"]}
    return ad.AnnData(X=X.astype(np.float32), obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)])), conditions


def test_cross_validation_folds_build_features_without_the_held_out_cells(lib, monkeypatch, tmp_path):
    train, conditions = _cells()
    monkeypatch.setattr(lib, "CONFIG", {"n_components": 3, "seed": 0, "baseline": "training_mean"})
    monkeypatch.setattr(lib, "OUT", tmp_path)
    seen: list[tuple[list[str], object]] = []

    stops: list[tuple[list[str], list[str], list[str]]] = []

    def fit(feats, rest, stop, *_args, **_kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        held = [c for c in "ABCD" if c not in rest and c not in stop]
        seen.append((held, feats))
        stops.append((held, stop, rest))
        return (lambda conds: (np.zeros((len(conds), train.n_vars)), np.zeros((len(conds), train.n_vars)))), 0

    monkeypatch.setattr(lib, "fit_conditions", fit)
    labels = train.obs["condition"].to_numpy()
    profiles = lib.group_means(train[labels != "ctrl"])
    # early stopping never watches the scored fold: with 4 folds it watches the next one
    lib.cross_validate(train, conditions, list("ABCD"), profiles, "unseen_perturbation", 4)
    assert [len(h) for h, _, _ in stops] == [1, 1, 1, 1] and all(len(s) == 1 and len(r) == 2 for _, s, r in stops)
    assert [h[0] for h, _, _ in stops] == [s[0] for _, s, _ in stops[-1:] + stops[:-1]]
    seen.clear()
    metrics, scheme = lib.cross_validate(train, conditions, list("ABCD"), profiles, "unseen_perturbation", 2)
    assert scheme.startswith("2-fold") and "val_mse_top20" in metrics
    full = lib.Features(train, conditions, 3)
    for held, feats in seen:
        alone = lib.Features(train[~np.isin(labels, held)], conditions, 3)
        np.testing.assert_allclose(np.abs(feats.expr_pcs), np.abs(alone.expr_pcs), atol=1e-6)
        if "A" in held:  # A's cells dominate the full PCA; its own fold must not see them
            assert not np.allclose(np.abs(feats.expr_pcs[0]), np.abs(full.expr_pcs[0]), atol=1e-2)
    saved = np.load(tmp_path / "val_predictions.npz")
    assert sorted(saved["conditions"]) == list("ABCD") and saved["pred"].shape == (4, train.n_vars)


def test_top_components_match_the_full_svd(lib):
    rng = np.random.default_rng(6)
    X = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 400)) * 3 + rng.normal(size=(300, 400)) * 0.1
    X -= X.mean(axis=0)
    s, vt = lib.top_components(X, 5)
    _, s_full, vt_full = np.linalg.svd(X, full_matrices=False)
    np.testing.assert_allclose(s, s_full[:5], rtol=1e-6)
    np.testing.assert_allclose(np.abs(np.sum(vt * vt_full[:5], axis=1)), 1.0, atol=1e-6)  # same directions up to sign
    assert lib.top_components(X[:8], 5)[1].shape == (5, 400)  # small matrices take the exact route


def test_early_stopping_keeps_the_reference_when_no_epoch_beats_it_on_validation(lib):
    """The untrained model (the reference) is epoch 0 of the best-weights choice."""
    import lightning as L
    import torch

    class Residual(L.LightningModule):
        # training pulls the residual towards +1, validation wants -1: every epoch is worse than none
        def __init__(self):
            super().__init__()
            self.residual = torch.nn.Parameter(torch.zeros(1))

        def _loss(self, batch):
            (target,) = batch
            return ((self.residual - target) ** 2).mean()

        def training_step(self, batch, _):
            return self._loss(batch)

        def validation_step(self, batch, _):
            self.log("val_loss", self._loss(batch))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def loader(value):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.full((4, 1), value)), batch_size=4)

    def fit(val_target):
        keep, module = lib.best_weights(), Residual()
        trainer = L.Trainer(max_epochs=5, logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, callbacks=[keep])
        trainer.fit(module, loader(1.0), loader(val_target))
        return keep, module

    keep, module = fit(-1.0)
    assert float(module.residual) > 0.5  # training moved away ...
    assert float(keep.state["residual"]) == 0.0 and keep.best == 1.0 and keep.epoch == 0  # ... but the reference is what is kept
    # when validation agrees with training, every epoch improves and the last one is kept
    keep, module = fit(1.0)
    assert keep.epoch == 5 and float(keep.state["residual"]) == float(module.residual) > 0.5


def test_a_residual_that_does_not_help_in_cross_validation_is_dropped(lib, monkeypatch, tmp_path):
    monkeypatch.setattr(lib, "OUT", tmp_path)
    target = np.zeros((4, 3), dtype=np.float32)
    reference = target + 1.0  # error 1 on every condition

    def check(pred, pd_model=0.8, pd_ref=0.8):
        np.savez_compressed(tmp_path / "val_predictions.npz", conditions=np.array(list("ABCD")), genes=np.array(["x", "y", "z"]),
                            pred=pred, reference=reference, target=target)
        errors = lib.top20_errors(pred, target)
        metrics = {"val_mse_top20": float(errors.mean()), "val_baseline_mse_top20": 1.0,
                   "val_pearson_delta_top20": pd_model, "val_baseline_pearson_delta_top20": pd_ref}
        lib.keep_or_drop_residual(metrics)
        return metrics

    # half the error on every condition: beyond one standard error, kept
    better = check(target + np.sqrt(0.5))
    assert better["residual"] == "kept" and better["val_mse_top20"] == pytest.approx(0.5)
    # a lower mean error carried by one condition (errors 0, 0, 0, 3.6): within one standard error, dropped
    lucky = check(target + np.array([[0.0], [0.0], [0.0], [np.sqrt(3.6)]], dtype=np.float32))
    assert lucky["val_residual_mse_top20"] == pytest.approx(0.9)  # lower than the reference's 1.0 ...
    assert lucky["residual"] == "dropped" and lucky["val_mse_top20"] == 1.0  # ... yet dropped: and lucky["val_pearson_delta_top20"] == 0.8
    np.testing.assert_array_equal(np.load(tmp_path / "val_predictions.npz")["pred"], reference)  # the model becomes its reference
    # a clearly lower error does not make up for a lower pearson
    assert check(target + np.sqrt(0.5), pd_model=0.7)["residual"] == "dropped"


def test_the_residual_is_compared_with_its_reference_condition_by_condition(lib, monkeypatch, tmp_path):
    """Paired: conditions of very different difficulty, the residual lower on each by a little."""
    monkeypatch.setattr(lib, "OUT", tmp_path)
    target = np.zeros((6, 3), dtype=np.float32)
    ref_err = np.array([0.2, 0.5, 1.0, 1.5, 2.2, 3.0])
    reference = target + np.sqrt(ref_err)[:, None].astype(np.float32)

    def check(errors):
        pred = (target + np.sqrt(errors)[:, None]).astype(np.float32)
        np.savez_compressed(tmp_path / "val_predictions.npz", conditions=np.array(list("ABCDEF")), genes=np.array(["x", "y", "z"]),
                            pred=pred, reference=reference, target=target)
        metrics = {"val_mse_top20": float(np.mean(errors)), "val_baseline_mse_top20": float(ref_err.mean()),
                   "val_pearson_delta_top20": 0.8, "val_baseline_pearson_delta_top20": 0.8}
        lib.keep_or_drop_residual(metrics)
        return metrics

    better = check(ref_err - 0.1)
    # the unpaired rule (the residual's own standard error, ~0.44) would have dropped this residual
    assert np.mean(ref_err - 0.1) + np.std(ref_err - 0.1, ddof=1) / np.sqrt(6) > ref_err.mean()
    assert better["residual"] == "kept"
    assert better["residual_mse_top20_diff"] == pytest.approx(-0.1, abs=1e-5)
    assert better["residual_mse_top20_diff_se"] == pytest.approx(0.0, abs=1e-5)
    assert better["residual_better_share"] == 1.0 and better["residual_n_conditions"] == 6
    # the same mean gain carried by one condition: dropped, and the share says how often it was better
    lucky = check(ref_err + np.array([0.1, 0.1, 0.1, 0.1, 0.1, -1.1]))
    assert lucky["residual"] == "dropped" and lucky["residual_better_share"] == pytest.approx(1 / 6)
    # one validation condition gives no standard error: the reference stays
    monkeypatch.setattr(lib, "OUT", tmp_path)
    np.savez_compressed(tmp_path / "val_predictions.npz", conditions=np.array(["A"]), genes=np.array(["x", "y", "z"]),
                        pred=target[:1], reference=reference[:1], target=target[:1])
    single = {"val_mse_top20": 0.0, "val_baseline_mse_top20": 0.2, "val_pearson_delta_top20": 0.8, "val_baseline_pearson_delta_top20": 0.8}
    lib.keep_or_drop_residual(single)
    assert single["residual"] == "dropped" and single["residual_mse_top20_diff_se"] is None

def _learnable_residual_task(seed: int = 0, n_genes: int = 30, n_perts: int = 30, k: int = 2) -> ad.AnnData:
    """SYNTHETIC knock-downs whose change depends on the target gene's place in the control co-expression.

    Control cells vary along ``k`` gene programmes (loadings ``L``, ``(k, n_genes)``); knocking
    down gene ``g`` moves the cells by ``A @ L[:, g]``: targets with similar loadings act alike.
    The training mean is wrong for every perturbation, in a way the template's input (the
    target's gene-PCA embedding) predicts.
    """
    rng = np.random.default_rng(seed)
    loadings = rng.normal(size=(k, n_genes))
    response = rng.normal(size=(n_genes, k)) * 0.6
    genes = [f"G{i}" for i in range(n_genes)]
    blocks, labels = [], []
    for label, delta, n in [("ctrl", 0.0, 300), *((genes[i], response @ loadings[:, i], 25) for i in range(n_perts))]:
        blocks.append(5.0 + rng.normal(size=(n, k)) @ loadings + delta + 0.3 * rng.normal(size=(n, n_genes)))
        labels += [label] * n
    obs = pd.DataFrame({"perturbation": labels, "condition": labels, "context": "all", "is_control": [lab == "ctrl" for lab in labels]})
    obs.index = [f"c{i}" for i in range(len(labels))]
    return ad.AnnData(X=np.concatenate(blocks).astype(np.float32), obs=obs, var=pd.DataFrame(index=genes))


def _run_in_process(script: Path) -> None:
    """Run a rendered training script's ``main()`` in this process (no second torch/Lightning import),
    restoring the global torch settings it changes."""
    import importlib.util

    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    spec = importlib.util.spec_from_file_location(f"rendered_{script.parent.name}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = sys.argv
    try:
        sys.argv = [str(script)]
        module.main()
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def test_a_learnable_residual_moves_beats_its_reference_in_cross_validation_and_is_kept(tmp_path):
    """The whole path (render, cross-validate, early-stop, paired rule, predict) lets a residual learn.

    Fails if the residual cannot leave its zero start (a dead output layer, a learning rate of
    ~0, best weights that never move past the untrained epoch, a gate that drops it).
    """
    from cellforge.data.splits import SplitManifest
    from cellforge.evaluation.pseudobulk import control_means, pseudobulk

    adata = _learnable_residual_task()
    perts = [g for g in adata.obs["condition"].unique() if g != "ctrl"]
    manifest = SplitManifest(strategy="user", train=perts[:18], val=perts[18:24], test=perts[24:])
    contract.prepare_inputs(adata, manifest, tmp_path, task={"type": "unseen_perturbation", "description": "synthetic"})
    config = {**SMALL, "baseline": "training_mean", "hidden_dim": 16, "learning_rate": 3e-2, "max_epochs": 40, "patience": 8,
              "batch_size": 16, "cv_folds": 3, "n_components": 4}  # fmt: skip
    (tmp_path / "train.py").write_text(render("pert_mlp", config))
    _run_in_process(tmp_path / "train.py")
    metrics = json.loads((tmp_path / contract.VAL_METRICS).read_text())
    # out of fold, on every cross-validation condition: the learned model is well below its reference ...
    # (the 6 validation perturbations' cells stay on the host: the script cross-validates its 18 training ones)
    assert metrics["val_scheme"].startswith("3-fold") and metrics["residual_n_conditions"] == 18
    assert metrics["val_residual_mse_top20"] < 0.5 * metrics["val_baseline_mse_top20"]
    # (0.61 with 18 cross-validated perturbations, 6 training per fold; it was 0.75 when the 6 validation ones joined)
    assert metrics["residual_better_share"] >= 0.6 and metrics["residual"] == "kept"
    # ... because training moved it: every fold (and the final model) kept weights from after epoch 0
    assert all(int(e) > 0 for e in metrics["residual_fold_best_epochs"].split(", "))
    # (the final fit has no validation cells to stop on: a fixed short training, best_epoch None)
    assert metrics["residual_fold_train_conditions"] == "6, 6, 6" and metrics["best_epoch"] is None and metrics["residual_trained"]
    # the kept model's test predictions beat the reference on the held-out perturbations too
    pred = contract.read_predictions(tmp_path / contract.PREDICTIONS, test=[*manifest.val, *manifest.test], genes=list(adata.var_names))
    control = control_means(adata).loc["all"].to_numpy()
    profiles = pseudobulk(adata)
    truth = profiles.loc[manifest.test].to_numpy() - control
    reference = (profiles.loc[manifest.train + manifest.val].to_numpy() - control).mean(axis=0)
    assert np.mean((pred.loc[manifest.test].to_numpy() - control - truth) ** 2) < 0.5 * np.mean((reference - truth) ** 2)


def test_a_residual_with_a_single_seen_condition_is_left_at_its_reference(lib, monkeypatch, tmp_path):
    """One seen condition: its leave-one-out reference is zero, so the residual is not fitted to its whole change."""
    import torch

    train, conditions = _cells()
    config = {"n_components": 3, "seed": 0, "baseline": "training_mean", "batch_size": 4, "learning_rate": 1e-2, "weight_decay": 0.0,
              "de_weight": 0.0, "max_epochs": 3, "patience": 2}  # fmt: skip
    monkeypatch.setattr(lib, "CONFIG", config)
    monkeypatch.setattr(lib, "OUT", tmp_path)
    monkeypatch.setattr(lib, "inputs", lambda feats, cond: feats.vector(cond), raising=False)

    def build_net(n_inputs, n_genes, _config, _extra):  # noqa: ANN001, ANN202
        net = torch.nn.Linear(n_inputs, n_genes)
        torch.nn.init.zeros_(net.weight)
        torch.nn.init.zeros_(net.bias)
        return net

    monkeypatch.setattr(lib, "build_net", build_net, raising=False)
    labels = train.obs["condition"].to_numpy()
    profiles = lib.group_means(train[np.isin(labels, ["A", "B", "C"])])
    feats = lib.Features(train, conditions, 3)
    predict, epochs = lib.fit_conditions(feats, ["A"], ["B"], profiles.loc[["A"]], profiles, False, ckpt=tmp_path / "one.ckpt")
    assert predict.training == {"trained": False, "best_epoch": None, "train_conditions": 1} and epochs == 0
    pred, base = predict(["B", "C"])
    assert np.abs(base).sum() > 0
    np.testing.assert_array_equal(pred, base)
    # two seen conditions: each has the other for its reference, and the residual trains
    predict, _ = lib.fit_conditions(feats, ["A", "B"], ["C"], profiles.loc[["A", "B"]], profiles, False, ckpt=tmp_path / "two.ckpt")
    assert predict.training["trained"] and isinstance(predict.training["best_epoch"], int)
    # cross-validation over three perturbations, one of them watched for early stopping: each fold
    # trains on a single condition, so no fold fits the residual and the record says so
    metrics, _ = lib.cross_validate(train, conditions, ["A", "B", "C"], profiles, "unseen_perturbation", 3)
    assert metrics["residual_fold_best_epochs"] == "untrained, untrained, untrained"
    assert metrics["residual_fold_train_conditions"] == "1, 1, 1"
    saved = np.load(tmp_path / "val_predictions.npz")
    np.testing.assert_array_equal(saved["pred"], saved["reference"])
