"""The new-context guard of the template library: a held-out context outside or between the seen ones
does not get an extrapolating reference; one within them, or one that only another normalisation put
outside, keeps it."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

N_GENES = 200


def _lineages(rng: np.random.Generator):
    """Six seen contexts in two lineages whose IFN-like responses differ by lineage.

    Controls are log-scale profiles (non-negative, a wide spread of gene levels) near two
    lineage centres; a lineage's response is shared by its contexts up to small noise.
    """
    centres = {"myeloid": rng.gamma(1.5, 1.0, N_GENES), "lymphoid": rng.gamma(1.5, 1.0, N_GENES)}
    response = {"myeloid": rng.normal(size=N_GENES) * 2.0, "lymphoid": rng.normal(size=N_GENES) * 0.5}
    controls, deltas = {}, {}
    for lineage, centre in centres.items():
        for i in range(3):
            ctx = f"{lineage}{i}"
            controls[ctx] = np.abs(centre + rng.normal(size=N_GENES) * 0.1)
            deltas[ctx] = response[lineage] + rng.normal(size=N_GENES) * 0.05
    return controls, deltas


def _features(lib, controls: dict[str, np.ndarray], deltas: dict[str, np.ndarray], held: str, c0: np.ndarray):
    """Features with every context of ``deltas`` seen (one 'stim' condition each) and ``held`` unseen, control c0."""
    controls = {**controls, held: c0}
    genes = [f"G{i}" for i in range(N_GENES)]
    obs = pd.DataFrame({"condition": [f"{c}:ctrl" for c in controls], "context": list(controls), "is_control": True, "perturbation": "ctrl"})
    obs.index = obs.index.astype(str)
    train = ad.AnnData(X=np.stack(list(controls.values())), obs=obs, var=pd.DataFrame(index=genes))
    table = {f"{c}:stim": {"perturbation": "stim", "context": c} for c in controls}
    feats = lib.Features(train, table, k=2)
    feats.set_seen(pd.DataFrame({f"{c}:stim": controls[c] + d for c, d in deltas.items()}, index=genes).T)
    return feats


@pytest.fixture
def seen():
    return _lineages(np.random.default_rng(7))


def test_a_context_within_the_seen_ones_keeps_its_reference(lib, seen):
    controls, deltas = seen
    held = controls.pop("myeloid2")
    truth = deltas.pop("myeloid2")
    feats = _features(lib, controls, deltas, "new", held)
    guarded = feats.base("new:stim", "context_kernel")
    record = feats.guard["new:stim"]
    assert record["position"] == "within" and record["reference"] == "context_kernel"
    assert record["far_ratio"] < lib.GUARD_FAR_RATIO and record["blend_ratio"] > lib.GUARD_BLEND_RATIO
    # identical to the unguarded kernel, which transfers the myeloid response
    lib.CONFIG = {"context_guard": False}
    feats.set_seen(pd.DataFrame({f"{c}:stim": controls[c] + d for c, d in deltas.items()}, index=feats.genes).T)
    np.testing.assert_array_equal(guarded, feats.base("new:stim", "context_kernel"))
    assert feats.guard == {}
    shift = np.mean(list(deltas.values()), axis=0)
    assert np.abs(guarded - truth).mean() < 0.2 * np.abs(shift - truth).mean()


def test_a_context_far_outside_falls_back_to_the_shift(lib, seen):
    controls, deltas = seen
    # an unrelated profile far from every seen context: even calibrated onto their scale it resembles none
    far = np.random.default_rng(11).gamma(1.5, 1.0, N_GENES) * 6.0
    feats = _features(lib, controls, deltas, "other", far)
    shift = np.mean(list(deltas.values()), axis=0)
    for kind in ("context_kernel", "context_regression", "context_adaptive"):
        np.testing.assert_allclose(feats.base("other:stim", kind), shift)
        record = feats.guard["other:stim"]
        assert record["position"] == "outside" and record["far_ratio"] > lib.GUARD_FAR_RATIO
        assert record["calibrated_position"] != "within"
        assert record["reference"] == "context_shift" and record["kind"] == kind
    # the unguarded regression extrapolates along the far offset
    lib.CONFIG = {"context_guard": False}
    feats.set_seen(pd.DataFrame({f"{c}:stim": controls[c] + d for c, d in deltas.items()}, index=feats.genes).T)
    assert np.abs(feats.base("other:stim", "context_regression") - shift).max() > 1.0


def test_a_blend_of_the_seen_contexts_falls_back_to_the_shift(lib, seen):
    controls, deltas = seen
    # unlabelled cells of every type: their control is a mixture, near no single seen context
    mixture = np.mean(list(controls.values()), axis=0)
    feats = _features(lib, controls, deltas, "pbmc", mixture)
    shift = np.mean(list(deltas.values()), axis=0)
    np.testing.assert_allclose(feats.base("pbmc:stim", "context_kernel"), shift)
    record = feats.guard["pbmc:stim"]
    assert record["position"] == "blend" and record["blend_ratio"] < lib.GUARD_BLEND_RATIO
    assert record["validation_folds"] == 0 and record["reference"] == "context_shift"


def test_another_normalisation_of_a_seen_kind_of_context_is_calibrated_back(lib, seen):
    controls, deltas = seen
    held = controls.pop("myeloid2")
    truth = deltas.pop("myeloid2")
    # the same cells normalised to a 10x larger target: log1p(10 * expm1(x)), increasing in x
    rescaled = np.log1p(10.0 * np.expm1(held))
    feats = _features(lib, controls, deltas, "studyB", rescaled)
    guarded = feats.base("studyB:stim", "context_kernel")
    record = feats.guard["studyB:stim"]
    assert record["position"] == "outside" and record["calibrated_position"] == "within"
    assert record["reference"] == "context_kernel on the calibrated profile"
    shift = np.mean(list(deltas.values()), axis=0)
    assert np.abs(guarded - truth).mean() < 0.2 * np.abs(shift - truth).mean()
    # what a run records: flat, JSON-ready val_metrics entries per held-out context
    summary = lib.guard_summary(feats, ["studyB:stim"])
    assert summary["context_guard:studyB:position"] == "outside"
    assert summary["context_guard:studyB:reference"] == "context_kernel on the calibrated profile"
    assert summary["context_guard:studyB:changed_conditions"] == 1
    assert "quantile-calibrated" in summary["context_guard_rule"]
    assert all(isinstance(v, int | float | str | bool) for v in summary.values())


def test_quantile_calibration_undoes_an_increasing_map(lib):
    rng = np.random.default_rng(3)
    C = np.sort(rng.gamma(1.5, 1.0, (4, 50)), axis=1)
    c0 = C[2].copy()
    rng.shuffle(c0)
    calibrated = lib.quantile_calibrate(np.log1p(5.0 * np.expm1(c0)), C)
    # the genes keep their order and take the seen contexts' mean sorted values
    np.testing.assert_allclose(np.sort(calibrated), C.mean(axis=0))
    np.testing.assert_array_equal(np.argsort(calibrated), np.argsort(c0))


def _depths(rng: np.random.Generator, factors: dict[str, float]):
    """Contexts that are one kind of cell at different sequencing depths: the same response, each on its own scale.

    A context at depth factor f has control log1p(f * expm1(b)) and perturbed profile
    log1p(f * expm1(b + r)), so its observed change shrinks or grows with the scale.
    """
    base, response = rng.gamma(1.5, 1.0, N_GENES), rng.normal(size=N_GENES) * 0.8
    controls, deltas = {}, {}
    for ctx, f in factors.items():
        b = np.abs(base + rng.normal(size=N_GENES) * 0.05)
        controls[ctx] = np.log1p(f * np.expm1(b))
        deltas[ctx] = np.log1p(f * np.expm1(np.maximum(b + response, 0.0))) - controls[ctx]
    return controls, deltas


def test_a_new_study_is_predicted_on_its_own_scale_when_leaving_seen_contexts_out_says_so(lib):
    """Seen contexts at depths 0.5-2 and a new study at 8x: the shift on the seen scale misses its change, the map back does not."""
    controls, deltas = _depths(np.random.default_rng(5), {"a": 0.5, "b": 0.8, "c": 1.25, "d": 2.0, "new": 8.0})
    held, truth = controls.pop("new"), deltas.pop("new")
    feats = _features(lib, controls, deltas, "new", held)
    pred = feats.base("new:stim", "context_adaptive")
    record = feats.guard["new:stim"]
    assert record["position"] == "outside" and record["reference"].endswith("carried to its own scale")
    assert record["validation_mse_top20_own_scale"] < record["validation_mse_top20_seen_scale"]
    shift = np.mean(list(deltas.values()), axis=0)
    assert np.abs(pred - truth).mean() < 0.5 * np.abs(shift - truth).mean()
    # with own_scale off (or when leaving seen contexts out does not favour it) the change stays on the seen scale
    lib.CONFIG = {"own_scale": False}
    feats.set_seen(pd.DataFrame({f"{c}:stim": controls[c] + d for c, d in deltas.items()}, index=feats.genes).T)
    off = feats.base("new:stim", "context_adaptive")
    assert "own scale" not in feats.guard["new:stim"]["reference"]
    assert np.abs(off - truth).mean() > 2 * np.abs(pred - truth).mean()


def test_the_scale_map_is_monotone_and_undoes_a_depth_change(lib):
    rng = np.random.default_rng(2)
    x = rng.gamma(1.5, 1.0, 300)
    y = np.log1p(4.0 * np.expm1(x))
    forward = lib.scale_map(x, y)
    np.testing.assert_allclose(forward(x), y, atol=1e-9)
    grid = np.linspace(-1.0, x.max() + 2.0, 500)  # beyond both ends: the end slopes
    assert np.all(np.diff(forward(grid)) >= 0)
    # a change of zero stays zero on the new scale
    np.testing.assert_allclose(lib.own_scale(np.zeros(N_GENES), np.stack([x[:N_GENES]] * 2), y[:N_GENES]), 0.0, atol=1e-9)


def _states(lib, rng: np.random.Generator, *, differ: bool):
    """Eight perturbations in two stimulation states; their changes share a state-specific part, or not."""
    genes = [f"G{i}" for i in range(40)]
    state = {"rest": rng.normal(size=40) * 2.0, "stim": rng.normal(size=40) * 2.0 if differ else None}
    state["stim"] = state["stim"] if differ else state["rest"]
    deltas, table = {}, {}
    for ctx in ("rest", "stim"):
        for i in range(8):
            cond = f"{ctx}:P{i}"
            table[cond] = {"perturbation": f"P{i}", "context": ctx}
            deltas[cond] = state[ctx] + rng.normal(size=40) * 0.3
    obs = pd.DataFrame({"condition": ["rest:ctrl", "stim:ctrl"], "context": ["rest", "stim"], "is_control": True, "perturbation": "ctrl"})
    obs.index = obs.index.astype(str)
    train = ad.AnnData(X=np.zeros((2, 40)), obs=obs, var=pd.DataFrame(index=genes))
    feats = lib.Features(train, table, k=2)
    held = "stim:P7"
    feats.set_seen(pd.DataFrame({c: d for c, d in deltas.items() if c != held}, index=genes).T)
    return feats, held, deltas


def test_states_that_respond_differently_get_their_own_training_mean(lib):
    feats, held, deltas = _states(lib, np.random.default_rng(5), differ=True)
    pool = feats.mean_pool(held, feats.others(held))
    assert sorted(pool) == [f"stim:P{i}" for i in range(7)]
    own = np.mean([deltas[c] for c in pool], axis=0)
    np.testing.assert_allclose(feats.base(held, "training_mean"), own)
    pooled = np.mean([d for c, d in deltas.items() if c != held], axis=0)
    assert np.abs(own - deltas[held]).mean() < 0.5 * np.abs(pooled - deltas[held]).mean()
    # switched off: the mean over both states, as before
    lib.CONFIG = {"context_pool": False}
    feats.set_seen(pd.DataFrame({c: d for c, d in deltas.items() if c != held}, index=feats.genes).T)
    np.testing.assert_allclose(feats.base(held, "training_mean"), pooled)


def test_states_that_respond_alike_keep_the_pooled_training_mean(lib):
    feats, held, deltas = _states(lib, np.random.default_rng(5), differ=False)
    # the larger pool predicts each seen condition of the state better: every state is kept
    assert len(feats.mean_pool(held, feats.others(held))) == 15
    np.testing.assert_allclose(feats.base(held, "on_target"), np.mean([d for c, d in deltas.items() if c != held], axis=0))


def test_the_coexpression_graph_is_built_once_for_the_same_control_cells(lib, seen):
    """Cross-validation folds rebuild Features without held-out perturbed cells; the controls, and so the graph, are the same."""
    controls, deltas = seen
    feats = _features(lib, controls, deltas, "new", controls["myeloid0"])
    calls = []
    build = lib.Features._coexpression_graph
    lib.Features._coexpression_graph = lambda self, k, sparse: calls.append(k) or build(self, k, sparse)
    try:
        first = feats.coexpression_graph(3)
        again = _features(lib, controls, deltas, "new", controls["myeloid0"]).coexpression_graph(3)
        assert again is first and len(calls) == 1
        other = feats.coexpression_graph(4)  # another setting: built, and the same as without the cache
        assert len(calls) == 2 and not np.array_equal(other, first)
        np.testing.assert_array_equal(other, build(feats, 4, False))
    finally:
        lib.Features._coexpression_graph = build
