"""The co-expression reference for unseen perturbations: the target's change carried along the control
cells' co-expression, weighted by leave-one-out on the seen perturbations (0 where it does not help)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

N_GENES, N_CELLS, N_PROGRAMME = 40, 600, 12


def _screen(rng: np.random.Generator, *, follows_coexpression: bool):
    """Control cells where genes 0-5 share one programme and genes 6-11 another; knock-downs of programme genes.

    When ``follows_coexpression``, a knock-down of gene g by d moves every other gene by its
    control regression slope on g times d (plus a little noise); otherwise the other genes move
    at random, unrelated to co-expression.
    """
    loading = np.zeros((2, N_GENES))
    half = N_PROGRAMME // 2
    loading[0, :half] = rng.uniform(0.6, 1.2, half)
    loading[1, half:N_PROGRAMME] = rng.uniform(0.6, 1.2, half)
    z = rng.normal(size=(N_CELLS, 2))
    X = 3.0 + z @ loading + rng.normal(scale=0.5, size=(N_CELLS, N_GENES))
    Xc = X - X.mean(axis=0)
    deltas = {}
    for g in range(N_PROGRAMME):
        d = -1.5
        slope = Xc.T @ Xc[:, g] / (Xc[:, g] @ Xc[:, g])
        spread = slope * d if follows_coexpression else rng.normal(scale=0.4, size=N_GENES) * (np.arange(N_GENES) < N_PROGRAMME)
        delta = spread + rng.normal(scale=0.02, size=N_GENES)
        delta[g] = d
        deltas[f"G{g}"] = delta
    return X, deltas


def _features(lib, X, deltas, held):
    genes = [f"G{i}" for i in range(N_GENES)]
    obs = pd.DataFrame({"condition": "ctrl", "context": "k562", "is_control": True, "perturbation": "ctrl"}, index=[str(i) for i in range(len(X))])
    train = ad.AnnData(X=X.astype(np.float32), obs=obs, var=pd.DataFrame(index=genes))
    table = {p: {"perturbation": p, "context": "k562"} for p in deltas}
    feats = lib.Features(train, table, k=2)
    control = X.mean(axis=0)
    feats.set_seen(pd.DataFrame({p: control + d for p, d in deltas.items() if p != held}, index=genes).T)
    return feats


@pytest.mark.parametrize("held", ["G3", "G7"])
def test_a_knock_down_that_spreads_along_co_expression_is_predicted_better_than_on_target(lib, held):
    X, deltas = _screen(np.random.default_rng(1), follows_coexpression=True)
    feats = _features(lib, X, deltas, held)
    truth = deltas[held]
    on, co = feats.base(held, "on_target"), feats.base(held, "coexpression")
    assert feats.coexpression_choice(held)[0] >= 0.5  # chosen on the seen knock-downs, without the held-out one
    assert lib.top20_errors(co[None], truth[None])[0] < 0.5 * lib.top20_errors(on[None], truth[None])[0]
    # the target itself is on_target's estimate: the spread only moves the other genes
    assert co[int(held[1:])] == pytest.approx(on[int(held[1:])])


def test_where_co_expression_does_not_predict_the_effects_the_reference_is_on_target(lib):
    X, deltas = _screen(np.random.default_rng(2), follows_coexpression=False)
    feats = _features(lib, X, deltas, "G5")
    assert feats.coexpression_choice("G5") == (0.0, False)
    np.testing.assert_array_equal(feats.base("G5", "coexpression"), feats.base("G5", "on_target"))


def test_co_expression_between_contexts_is_not_taken_for_co_expression(lib):
    # two contexts whose control means differ on genes 0 and 1 together, independent within each context
    rng = np.random.default_rng(3)
    X = rng.normal(3.0, 0.5, size=(400, N_GENES))
    X[200:, :2] += 4.0
    genes = [f"G{i}" for i in range(N_GENES)]
    obs = pd.DataFrame({"condition": "ctrl", "context": ["a"] * 200 + ["b"] * 200, "is_control": True, "perturbation": "ctrl"}, index=[str(i) for i in range(400)])
    feats = lib.Features(ad.AnnData(X=X.astype(np.float32), obs=obs, var=pd.DataFrame(index=genes)), {}, k=2)
    assert abs(feats.control_slopes(0)[1]) < 0.2  # pooled across contexts the slope would be ~0.9
