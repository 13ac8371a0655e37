"""Dynamics of the expert debate (scripted experts), and the offline panel on shipped data."""

from __future__ import annotations

import pytest

from cellforge.design.debate import CriticTurn, DebateSettings, DesignProposal, ExpertTurn, proposal_distance, ring, run_debate

A = DesignProposal(baseline="additive", hyperparameters={"hidden_dim": 64, "weight_decay": 0.01})
B = DesignProposal(baseline="training_mean", hyperparameters={"hidden_dim": 256, "weight_decay": 0.0001})
EXPERTS = ["data", "biology", "architecture", "training", "evaluation", "domain"]


def _similar_ratings(me: str, context: dict, mine: DesignProposal) -> dict[str, float]:
    return {n: 1 - proposal_distance(mine, DesignProposal(**v["proposal"])) for n, v in context["neighbours"].items()}


def _critic_prefers(good: DesignProposal):  # noqa: ANN202
    def critic(context: dict) -> CriticTurn:
        scores = {n: 0.95 if DesignProposal(**p) == good else 0.3 for n, p in context["proposals"].items()}
        return CriticTurn(scores=scores, critiques={n: "" if s > 0.5 else f"evidence favours {good.baseline}" for n, s in scores.items()})

    return critic


def test_ring_graph_keeps_calls_linear():
    graph = ring(EXPERTS)
    assert all(len(v) == 2 for v in graph.values()) and graph["data"] == ["domain", "biology"]
    assert ring(["a", "b", "c"]) == {"a": ["b", "c"], "b": ["a", "c"], "c": ["a", "b"]}


def test_identical_experts_converge_at_once():
    def expert(name, context):  # noqa: ANN001, ANN202
        return ExpertTurn(proposal=A, ratings=_similar_ratings(name, context, A), self_confidence=0.9)

    debate = run_debate(EXPERTS, ask_expert=expert, ask_critic=_critic_prefers(A))
    assert debate.converged and len(debate.rounds) == DebateSettings().min_rounds
    assert debate.calls == len(debate.rounds) * (len(EXPERTS) + 1)
    assert debate.consensus == A and "converged in round 2" in debate.stop_reason


def test_one_dissenter_holds_consensus_back_until_critique_moves_it():
    def expert(name, context):  # noqa: ANN001, ANN202
        mine = A
        if name == "architecture":  # dissents, and gives in after two critiques
            mine = B if context["round"] <= 3 else A
        return ExpertTurn(proposal=mine, ratings=_similar_ratings(name, context, mine), self_confidence=0.9)

    debate = run_debate(EXPERTS, ask_expert=expert, ask_critic=_critic_prefers(A))
    assert debate.converged
    assert len(debate.rounds) > 4  # not before the dissenter moved (round 4) and confidences recovered
    for conf in debate.confidences[:3]:
        assert conf["architecture"] < 0.8 and max(conf.values()) - min(conf.values()) >= 0.03
    assert debate.consensus == A


def test_a_pilot_that_contradicts_a_proposal_lowers_its_authors_confidence():
    def run(pilot_val: float) -> dict[str, float]:
        def expert(name, context):  # noqa: ANN001, ANN202
            return ExpertTurn(proposal=A, ratings=_similar_ratings(name, context, A), self_confidence=0.9, request_pilot=name == "data")

        def pilots(requests):  # noqa: ANN001, ANN202
            return [{"val_mse_top20": pilot_val, "val_baseline_mse_top20": 1.0} for _ in requests]

        settings = DebateSettings(min_rounds=1, max_rounds=1)
        return run_debate(EXPERTS, ask_expert=expert, ask_critic=_critic_prefers(A), run_pilots=pilots, settings=settings).confidences[-1]

    supported, contradicted = run(0.5), run(1.2)  # better / worse than the proposal's own baseline
    assert contradicted["data"] == pytest.approx(supported["data"] - DebateSettings().evidence_penalty)


def test_round_cap_ends_a_debate_that_cannot_converge_and_says_so():
    def expert(name, context):  # noqa: ANN001, ANN202
        mine = A if EXPERTS.index(name) % 2 else B
        return ExpertTurn(proposal=mine, ratings=_similar_ratings(name, context, mine), self_confidence=0.6)

    def critic(context):  # noqa: ANN001, ANN202
        return CriticTurn(scores={n: 0.5 for n in context["proposals"]})

    debate = run_debate(EXPERTS, ask_expert=expert, ask_critic=critic, settings=DebateSettings(max_rounds=4))
    assert not debate.converged and len(debate.rounds) == 4
    assert "did not converge in 4 rounds" in debate.stop_reason and debate.consensus is not None


@pytest.fixture(scope="module")
def designed(tmp_path_factory):
    """Stages data -> design (offline panel, no pilots) on every shipped data set."""
    import os

    from tests.conftest import MIRROR

    from cellforge import stages
    from cellforge.pipeline import Run, RunConfig

    if not MIRROR.exists():
        pytest.skip("offline mirror not present")
    old = {k: os.environ.get(k) for k in ("CELLFORGE_DATA_MIRROR", "CELLFORGE_CACHE")}
    os.environ["CELLFORGE_DATA_MIRROR"] = str(MIRROR)
    os.environ["CELLFORGE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    out = {}
    try:
        for name in ["adamson_subset", "norman_subset", "kang_subset", "mcfaline_subset", "papalexi_subset", "glioblastoma_subset"]:
            run = Run.create(RunConfig(dataset=name, pilots=0), root=tmp_path_factory.mktemp(name))
            for stage in ["data", "profile", "analysis", "design"]:
                getattr(stages, f"stage_{stage}")(run, echo=lambda _: None)
            out[name] = (run.read_json("plan.json"), run.read_json("debate.json"), run)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return out


def test_offline_panel_plans_follow_the_task_and_cite_evidence(designed):
    baselines = {name: plan["baseline"] for name, (plan, _, _) in designed.items()}
    models = {name: plan["template"] for name, (plan, _, _) in designed.items()}
    assert (models["norman_subset"], baselines["norman_subset"]) == ("pert_mlp", "observed_additive")
    assert designed["norman_subset"][0]["train_on"] == "combinations"
    assert baselines["kang_subset"] == baselines["mcfaline_subset"] == baselines["glioblastoma_subset"] == "context_adaptive"
    assert baselines["adamson_subset"] == baselines["papalexi_subset"] == "on_target"
    assert models["adamson_subset"] == models["papalexi_subset"] == "gene_gnn"
    # model size follows the number of training conditions
    assert designed["adamson_subset"][0]["hyperparameters"]["hidden_dim"] < designed["papalexi_subset"][0]["hyperparameters"]["hidden_dim"]
    for name, (plan, debate, run) in designed.items():
        assert len(debate["experts"]) == 6 and "critic" not in debate["experts"]
        domain = debate["experts"][-1]
        assert domain == ("expert_cell_state" if baselines[name] == "context_adaptive" else "expert_gene_regulation"), name
        assert debate["converged"], (name, debate["stop_reason"])
        assert debate["calls"] == len(debate["rounds"]) * 7
        text = " ".join(plan["rationale"])
        assert "Expert debate" in text and "Task analysis" in text
        assert any(card in text for card in ["small_data_principle", "pseudobulk_principle", "leakage_principle", "metric_choice_principle"]), name
        assert run.path("debate_convergence.png").stat().st_size > 1000
    # the panel disagreed at first (different perspectives), then converged
    first = designed["norman_subset"][1]["rounds"][0]["turns"]
    assert len({json_key(t["proposal"]) for t in first.values()}) > 1


def json_key(proposal: dict) -> str:
    import json

    return json.dumps({k: proposal[k] for k in ("baseline", "train_on", "hyperparameters")}, sort_keys=True)
