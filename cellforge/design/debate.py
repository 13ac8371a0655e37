"""The expert debate: graph message passing between experts, a critic, confidences, pilot evidence.

Graph: the experts sit on a ring; each sees the latest proposals and critiques of its two ring
neighbours (all others when there are at most three experts). The critic is a hub that sees every
proposal. One round costs one call per expert (propose or revise, and rate the neighbours, in one
answer) plus one critic call: ``n_experts + 1`` calls, linear in the panel size.

Confidence of expert ``i`` after round ``t`` (CellForge's update, weights configurable)::

    c_i(t) = w_self * c_i(t-1) + w_critic * critic_i(t) + w_peer * mean_j rating_{j->i}(t) - evidence_penalty * [pilot contradicts i]

with ``c_i(0)`` the expert's own stated confidence. The debate stops when every confidence is at
least ``tau`` and the largest difference between two is below ``epsilon``, after ``min_rounds``
and at most ``max_rounds`` rounds. A pilot contradicts a proposal when its validation error is
not better than the proposal's own baseline (or than another pilot by more than the tolerance).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class Architecture(BaseModel):
    """The model an expert proposes: what it reads, how it computes, what it outputs, what it minimises.

    ``template`` names the library model the design builds on (the coder renders it), or
    ``custom`` for a design the coder must write from this description.
    """

    model_config = ConfigDict(extra="forbid")

    template: str = Field("pert_mlp", description="Library model the design builds on, or 'custom'.")
    inputs: list[str] = Field(default_factory=lambda: ["perturbation embedding"], description="Inputs and their encoders.")
    core: str = Field("residual MLP", description="The model's core.")
    output: str = Field("change from control per gene, added to the reference", description="What it predicts.")
    loss: str = Field("MSE with extra weight on the largest-change genes", description="Training objective.")
    prose: str = Field("", description="Why this architecture suits the data.")


class DesignProposal(BaseModel):
    """An expert's design: architecture, reference predictor, supervision and hyperparameters."""

    model_config = ConfigDict(extra="forbid")

    architecture: Architecture = Field(default_factory=Architecture)
    baseline: Literal["training_mean", "additive", "context_shift"]
    train_on: Literal["all", "combinations"] = "all"
    hyperparameters: dict[str, float] = Field(default_factory=dict)
    rationale: list[str] = Field(default_factory=list)
    cited: list[str] = Field(default_factory=list, description="Card ids and pilot names relied on.")


class ExpertTurn(BaseModel):
    """One expert's answer in one round."""

    model_config = ConfigDict(extra="forbid")

    proposal: DesignProposal
    ratings: dict[str, float] = Field(default_factory=dict, description="Neighbour -> rating of its proposal in [0, 1].")
    critique: str = ""
    self_confidence: float = Field(0.5, ge=0.0, le=1.0)
    request_pilot: bool = False


class CriticTurn(BaseModel):
    """The critic's scores of every expert's proposal in one round."""

    model_config = ConfigDict(extra="forbid")

    scores: dict[str, float]
    critiques: dict[str, str] = Field(default_factory=dict)


class DebateSettings(BaseModel):
    """Stopping rule and confidence weights (CellForge's values by default)."""

    tau: float = 0.8
    epsilon: float = 0.03
    min_rounds: int = Field(2, ge=1)
    max_rounds: int = Field(10, ge=1, le=10)
    w_self: float = 0.3
    w_critic: float = 0.4
    w_peer: float = 0.3
    evidence_penalty: float = 0.2
    max_pilots: int = Field(2, ge=0, description="Pilot runs the debate may ask for in total.")
    pilot_tolerance: float = 0.01


class Debate(BaseModel):
    """The full transcript and outcome."""

    experts: list[str]
    graph: dict[str, list[str]]
    rounds: list[dict[str, Any]] = Field(default_factory=list)
    confidences: list[dict[str, float]] = Field(default_factory=list)
    pilots: dict[str, dict[str, Any]] = Field(default_factory=dict)
    converged: bool = False
    stop_reason: str = ""
    consensus: DesignProposal | None = None
    calls: int = 0


#: What agents see of a pilot: deterministic evidence only (no durations or log paths), so a
#: replayed debate sends the same messages as the recorded one.
EVIDENCE_KEYS = ("author", "round", "proposal", "val_mse_top20", "val_baseline_mse_top20", "val_pearson_delta", "epochs_run", "exit_code")


def pilot_evidence(pilots: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The pilots as agents see them (:data:`EVIDENCE_KEYS`)."""
    return {name: {k: p.get(k) for k in EVIDENCE_KEYS} for name, p in pilots.items()}


def ring(experts: list[str]) -> dict[str, list[str]]:
    """Each expert's neighbours: the two ring neighbours, or everyone else for three or fewer."""
    n = len(experts)
    if n <= 3:  # noqa: PLR2004
        return {e: [o for o in experts if o != e] for e in experts}
    return {e: [experts[(i - 1) % n], experts[(i + 1) % n]] for i, e in enumerate(experts)}


def proposal_distance(a: DesignProposal, b: DesignProposal) -> float:
    """0 for identical designs, 1 for a different baseline or architecture; else the mean relative difference of shared numbers."""
    if a.baseline != b.baseline or a.architecture.template != b.architecture.template:
        return 1.0
    parts = [0.5 if a.train_on != b.train_on else 0.0]
    for key in set(a.hyperparameters) & set(b.hyperparameters):
        x, y = float(a.hyperparameters[key]), float(b.hyperparameters[key])
        parts.append(min(1.0, abs(x - y) / max(abs(x), abs(y), 1e-12)))
    return float(np.mean(parts))


def _contradicted(pilot: dict[str, Any], best: float | None, tolerance: float) -> bool:
    val, base = pilot.get("val_mse_top20"), pilot.get("val_baseline_mse_top20")
    if val is None:
        return True  # the pilot failed: the design did not run
    if base is not None and val >= base * (1 - tolerance):
        return True  # no better than its own baseline
    return best is not None and val > best * (1 + tolerance)


def run_debate(
    experts: list[str],
    *,
    ask_expert: Callable[[str, dict[str, Any]], ExpertTurn],
    ask_critic: Callable[[dict[str, Any]], CriticTurn],
    settings: DebateSettings | None = None,
    run_pilots: Callable[[list[tuple[str, DesignProposal]]], list[dict[str, Any]]] | None = None,
    evidence: dict[str, Any] | None = None,
) -> Debate:
    """Run the debate until confidences converge or the round cap.

    Parameters
    ----------
    experts
        Expert names (agent spec names), in ring order.
    ask_expert
        ``(expert, context) -> ExpertTurn``; the context holds the round, the expert's own last
        proposal, its neighbours' latest proposals and critiques, the critic's last critique of
        it, the pilot results so far and ``evidence`` (profile, task analysis, retrieved cards).
    ask_critic
        ``(context) -> CriticTurn``; sees every proposal, the pilot results and ``evidence``.
    run_pilots
        ``[(pilot name, proposal), ...] -> [validation metrics, ...]`` (same order): short sandbox
        runs of the designs the experts of one round asked for, which may run at once (the
        stage fans them out); ``None`` disables pilots.

    Returns
    -------
    The transcript; ``consensus`` is the proposal of the most confident expert.
    """
    s = settings or DebateSettings()
    graph = ring(experts)
    debate = Debate(experts=experts, graph=graph)
    latest: dict[str, ExpertTurn] = {}
    critic: CriticTurn | None = None
    conf: dict[str, float] = {}
    for round_index in range(1, s.max_rounds + 1):
        turns: dict[str, ExpertTurn] = {}
        for name in experts:
            context = {
                "round": round_index,
                "expert": name,
                "own_proposal": latest[name].proposal.model_dump() if name in latest else None,
                "neighbours": {n: {"proposal": latest[n].proposal.model_dump(), "critique": latest[n].critique} for n in graph[name] if n in latest},
                "critic_said": critic.critiques.get(name, "") if critic else "",
                "critic_score": critic.scores.get(name) if critic else None,
                "pilots": pilot_evidence(debate.pilots),
                "evidence": evidence or {},
            }
            turns[name] = ask_expert(name, context)
            debate.calls += 1
        latest.update(turns)
        # pilots the experts asked for (distinct designs only, within the budget), run together
        if run_pilots is not None:
            requests: list[tuple[str, str, DesignProposal]] = []
            piloted = [p["proposal"] for p in debate.pilots.values()]
            for name, turn in turns.items():
                design = turn.proposal.model_dump()
                if turn.request_pilot and len(debate.pilots) + len(requests) < s.max_pilots and design not in piloted:
                    requests.append((f"pilot-{len(debate.pilots) + len(requests)}-{name}", name, turn.proposal))
                    piloted.append(design)
            if requests:
                results = run_pilots([(pilot_name, proposal) for pilot_name, _, proposal in requests])
                for (pilot_name, name, proposal), metrics in zip(requests, results, strict=True):
                    debate.pilots[pilot_name] = {"author": name, "round": round_index, "proposal": proposal.model_dump(), **metrics}
        critic = ask_critic(
            {"round": round_index, "proposals": {n: t.proposal.model_dump() for n, t in latest.items()}, "pilots": pilot_evidence(debate.pilots), "evidence": evidence or {}}
        )
        debate.calls += 1
        vals = [p.get("val_mse_top20") for p in debate.pilots.values() if p.get("val_mse_top20") is not None]
        best = min(vals) if vals else None
        for name in experts:
            previous = conf.get(name, latest[name].self_confidence)
            ratings = [latest[j].ratings[name] for j in experts if j != name and name in latest[j].ratings]
            peer = float(np.mean(ratings)) if ratings else previous
            value = s.w_self * previous + s.w_critic * float(critic.scores.get(name, 0.0)) + s.w_peer * peer
            own = latest[name].proposal.model_dump()
            if any(p["proposal"] == own and _contradicted(p, best, s.pilot_tolerance) for p in debate.pilots.values()):
                value -= s.evidence_penalty
            conf[name] = float(np.clip(value, 0.0, 1.0))
        debate.rounds.append(
            {
                "round": round_index,
                "turns": {n: t.model_dump() for n, t in turns.items()},
                "critic": critic.model_dump(),
                "confidence": dict(conf),
            }
        )
        debate.confidences.append(dict(conf))
        values = list(conf.values())
        if round_index >= s.min_rounds and min(values) >= s.tau and max(values) - min(values) < s.epsilon:
            debate.converged = True
            debate.stop_reason = f"converged in round {round_index}: every confidence >= {s.tau} and spread {max(values) - min(values):.3f} < {s.epsilon}"
            break
    else:
        values = list(conf.values())
        debate.stop_reason = (
            f"did not converge in {s.max_rounds} rounds (lowest confidence {min(values):.2f}, spread {max(values) - min(values):.3f}); "
            "the most confident expert's design is used"
        )
    leader = max(experts, key=lambda e: (conf[e], -experts.index(e)))
    debate.consensus = latest[leader].proposal
    return debate


def convergence_plot(debate: Debate, path: Any, *, tau: float = 0.8) -> None:
    """Confidence of each expert per round, with the threshold tau, as a PNG."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    rounds = np.arange(1, len(debate.confidences) + 1)
    for name in debate.experts:
        ax.plot(rounds, [c[name] for c in debate.confidences], marker="o", label=name)
    ax.axhline(tau, color="grey", linestyle="--", linewidth=1, label=f"tau = {tau}")
    ax.set_xlabel("round")
    ax.set_ylabel("confidence")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(rounds)
    ax.set_title("Expert confidence per round" + (" (converged)" if debate.converged else " (round cap)"))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
