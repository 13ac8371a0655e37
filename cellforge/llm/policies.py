"""Policies of the offline planner, one per agent; each maps a context dict to an answer dict."""

from __future__ import annotations

import re
from typing import Any

from cellforge.llm.offline import handles


@handles("method_designer")
def design_plan(ctx: dict[str, Any]) -> dict[str, Any]:
    """Choose the reference predictor, supervision and size of the model from the profile."""
    profile, task = ctx["profile"], ctx["task"]
    task_type = task["type"]
    n_train = int(ctx["split"]["n_train"])
    n_genes = int(profile["n_genes"])
    rationale = [f"Task type {task_type!r} from the task card: {task['description']}"]
    if task_type == "combination":
        baseline = "additive"
        n_combo_train = int(ctx["split"].get("n_train_combinations", 0))
        train_on = "combinations" if n_combo_train >= 4 else "all"  # noqa: PLR2004
        pert_enc = "sum over members of [gene-PCA embedding of the target, seen single delta in PCA space]"
        rationale.append(
            "Additive predictions are the bar for combinations (Ahlmann-Eltze et al. 2025); the model learns the "
            f"interaction residual on {n_combo_train} training combinations ({train_on})."
        )
    elif task_type == "new_context":
        baseline, train_on = "context_shift", "all"
        pert_enc = "seen deltas of the perturbation in other contexts, in PCA space"
        rationale.append(
            f"Held-out contexts {ctx['split'].get('test_contexts')}: start from the context shift (the "
            "perturbation's mean delta in seen contexts) and learn how the context's control profile changes it."
        )
    else:
        baseline, train_on = "training_mean", "all"
        pert_enc = "gene-PCA embedding of the target gene (zero when the target is not measured)"
        rationale.append(
            "Unseen perturbations: deep models rarely beat the training mean (Ahlmann-Eltze et al. 2025), so the "
            "model is the training mean plus a residual from the target gene's expression embedding."
        )
    small = n_train < 10  # noqa: PLR2004
    hidden = 32 if small else (64 if n_train < 40 else 128)  # noqa: PLR2004
    weight_decay = 0.1 if small else 0.01
    rationale.append(
        f"{n_train} training conditions and {n_genes} genes: hidden width {hidden}, weight decay {weight_decay}, "
        "early stopping on validation loss so the model stays at the baseline unless validation improves."
    )
    return {
        "task_type": task_type,
        "template": "residual_mlp",
        "architecture": (
            f"Predicted delta = {baseline} delta + MLP(perturbation features, context features); one hidden "
            "layer with GELU and dropout, zero-initialised output layer."
        ),
        "perturbation_encoder": pert_enc,
        "context_encoder": "control mean of the context minus the mean control, projected on expression PCs",
        "baseline": baseline,
        "train_on": train_on,
        "loss": "MSE on pseudobulk deltas, weighted towards large observed effects (de_weight)",
        "hyperparameters": {
            "hidden_dim": hidden,
            "dropout": 0.1,
            "learning_rate": 1e-3,
            "weight_decay": weight_decay,
            "de_weight": 1.0,
            "max_epochs": 300,
            "batch_size": max(1, min(16, n_train)),
            "patience": 30,
            "n_components": min(16, max(2, n_train)),
            "seed": 0,
        },
        "search_space": {"hidden_dim": [32, 64, 128], "weight_decay": [0.01, 0.1], "learning_rate": [1e-3, 3e-3]},
        "metric_of_record": "pearson_delta_de20",
        "rationale": rationale,
    }


@handles("coder")
def choose_code(ctx: dict[str, Any]) -> dict[str, Any]:
    """Compose the plan from the template library: template name plus its CONFIG."""
    plan = ctx["plan"]
    if plan["template"] not in ctx["templates"]:
        return {"template": ctx["templates"][0], "config": {}, "notes": f"unknown template {plan['template']!r}"}
    config = dict(plan["hyperparameters"])
    config.update({"baseline": plan["baseline"], "train_on": plan["train_on"], "threads": ctx.get("threads", 2)})
    return {"template": plan["template"], "config": config, "notes": "rendered from the plan's hyperparameters"}


_SHAPE = re.compile(r"mat1 and mat2 shapes cannot be multiplied \((\d+)x(\d+) and (\d+)x(\d+)\)")


@handles("debugger")
def debug(ctx: dict[str, Any]) -> dict[str, Any]:
    """Recognise common failure classes in the log tail and propose a patch."""
    log, script, config = ctx["log_tail"], ctx["script"], ctx.get("config", {})
    shape = _SHAPE.search(log)
    if shape:
        actual, declared = shape.group(2), shape.group(3)
        pattern = re.compile(rf"nn\.Linear\(\s*{declared}\s*,")
        match = pattern.search(script)
        if match:
            return {
                "diagnosis": f"a Linear layer declares {declared} input features but receives {actual}",
                "edits": [{"find": match.group(0), "replace": f"nn.Linear({actual},"}],
            }
        return {
            "diagnosis": f"shape mismatch ({actual} features vs {declared} expected) with no literal layer size to fix",
            "give_up": True,
        }
    if re.search(r"loss is nan|nan loss|contains nan|non-finite", log, re.IGNORECASE) and "learning_rate" in config:
        return {
            "diagnosis": "training diverged (non-finite loss)",
            "config_updates": {"learning_rate": float(config["learning_rate"]) / 4},
        }
    missing_key = re.search(r"KeyError: '(\w+)'", log)
    if missing_key and f'CONFIG["{missing_key.group(1)}"]' in script:
        key = missing_key.group(1)
        defaults = {"threads": 2, "seed": 0, "patience": 20, "de_weight": 1.0, "n_components": 16}
        if key in defaults:
            return {"diagnosis": f"CONFIG lacks {key!r}", "config_updates": {key: defaults[key]}}
    if re.search(r"no CUDA GPUs are available|Torch not compiled with CUDA", log):
        for text in ['accelerator="gpu"', 'accelerator="cuda"']:
            if text in script:
                return {"diagnosis": "the script asks for a GPU that is not there", "edits": [{"find": text, "replace": 'accelerator="auto"'}]}
    return {"diagnosis": "no known failure pattern in the log tail", "give_up": True}


#: Changes the offline refiner tries, in order: (key, how to change it, why).
_REFINE_STEPS: list[tuple[str, Any, str]] = [
    ("learning_rate", lambda v: float(v) / 3, "a smaller learning rate often settles to a lower validation error"),
    ("weight_decay", lambda v: float(v) * 10, "stronger weight decay pulls the residual towards the baseline"),
    ("hidden_dim", lambda v: int(v) * 2, "a wider network if the residual underfits"),
    ("dropout", lambda v: min(0.5, float(v) + 0.2), "more dropout if the residual overfits the few training conditions"),
]


@handles("refiner")
def refine(ctx: dict[str, Any]) -> dict[str, Any]:
    """Propose the next untried configuration change; stop when the list is exhausted.

    When the model is worse than its own baseline on validation, shrink it first (weight decay);
    when training ran to ``max_epochs`` without early stopping, allow more epochs first.
    """
    config, history = ctx["config"], ctx["history"]
    tried = [h["config"] for h in history]
    clean = [h for h in history if h.get("failure") is None and h.get("val_metrics")]
    last = clean[-1]["val_metrics"] if clean else {}
    steps = list(_REFINE_STEPS)
    if last.get("val_mse_top20", 0) > last.get("val_baseline_mse_top20", float("inf")):
        steps.sort(key=lambda step: step[0] != "weight_decay")
    if "max_epochs" in config and last.get("epochs_run", 0) >= int(config["max_epochs"]) - 1:
        steps.insert(0, ("max_epochs", lambda v: int(v) * 2, "training stopped at max_epochs, not by early stopping"))
    for key, change, why in steps:
        if key not in config:
            continue
        candidate = {**config, key: change(config[key])}
        if candidate not in tried:
            return {"diagnosis": why, "config_updates": {key: candidate[key]}}
    return {"diagnosis": "every planned change has been tried", "stop": True}
