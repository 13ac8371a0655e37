"""Schemas of the agents' structured answers: research plan, code choice, patch."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Hyperparameters(BaseModel):
    """Training settings of a template; every field has a search range in the plan."""

    model_config = ConfigDict(extra="forbid")

    hidden_dim: int = Field(128, ge=4, le=4096, description="Width of the residual MLP.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0)
    weight_decay: float = Field(1e-2, ge=0.0)
    de_weight: float = Field(1.0, ge=0.0, description="Extra loss weight on large observed effects.")
    max_epochs: int = Field(200, ge=1, le=10000)
    batch_size: int = Field(16, ge=1)
    patience: int = Field(20, ge=1)
    n_components: int = Field(16, ge=1, le=256, description="PCA components of gene and context features.")
    latent_dim: int = Field(32, ge=2, le=1024, description="Latent size of cond_autoencoder.")
    n_neighbours: int = Field(10, ge=1, le=200, description="Co-expression partners per gene in gene_gnn's graph.")
    member_ridge: float = Field(0.1, ge=0.0, description="Ridge penalty of the member_additive reference.")
    dose_encoder: Literal["none", "log_sigmoid"] = Field("none", description="Dose features of pert_mlp (drugs).")
    cv_folds: int = Field(
        4, ge=0, le=20, description="Folds of the cross-validation over training + validation conditions that gives val_* (0: the split's validation set)."
    )
    seed: int = 0


class ResearchPlan(BaseModel):
    """The method design's output: a concrete, trainable model plan."""

    model_config = ConfigDict(extra="forbid")

    task_type: str = Field(description="unseen_perturbation, combination or new_context.")
    template: Literal["pert_mlp", "latent_linear", "gene_gnn", "combo_additive", "cond_autoencoder"] = Field(
        description="Model template the code generator composes (cellforge/execution/templates)."
    )
    architecture: str = Field(description="The model in one paragraph.")
    perturbation_encoder: str
    context_encoder: str
    baseline: Literal[
        "training_mean", "single_mean", "on_target", "additive", "member_additive", "observed_additive", "linear", "coexpression", "context_shift", "context_regression",
        "context_kernel", "context_adaptive",
    ] = Field(description="Reference predictor the model learns a residual over (see templates/_common.py).")
    train_on: Literal["all", "combinations"] = Field(description="Which training conditions supervise the residual.")
    loss: str
    hyperparameters: Hyperparameters
    search_space: dict[str, list[Any]] = Field(default_factory=dict, description="Hyperparameter -> candidate values.")
    candidates: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Alternative models (CONFIG updates, e.g. another template) the refiner compares on validation only.",
    )
    metric_of_record: str = Field("pearson_delta_de20", description="Validation metric used to select models.")
    rationale: list[str] = Field(description="Reasons, each citing the evidence it rests on.")


class CodeChoice(BaseModel):
    """The coder's answer: a whole script of its own, or a template of the library with its CONFIG.

    A ``script`` is checked against the static part of the sandbox contract when the answer is
    validated (:func:`cellforge.execution.contract.check_script`), so a model that breaks it is
    told precisely what to fix.
    """

    model_config = ConfigDict(extra="forbid")

    script: str = Field("", description="A complete training + inference script satisfying the sandbox contract (leave empty to use a template).")
    template: str = Field("", description="A template of the library to render instead of writing a script.")
    config: dict[str, Any] = Field(default_factory=dict, description="CONFIG for the template.")
    notes: str = ""

    @model_validator(mode="after")
    def _one_kind(self) -> CodeChoice:
        from cellforge.execution.contract import check_script

        if bool(self.script.strip()) == bool(self.template):
            raise ValueError("give exactly one of `script` (your own code) or `template` (with `config`)")
        if self.script:
            check_script(self.script, names=True)
        if self.template:
            _check_names({"template": self.template, **self.config})
        return self


def _check_names(config: dict[str, Any]) -> None:
    """A ``template`` or ``baseline`` outside the library is a validation error (the repair loop tells the model the valid names)."""
    from cellforge.execution.codegen import templates

    library = templates()
    if "template" in config and config["template"] not in library:
        msg = f"template {config['template']!r} is not in the library; valid: {', '.join(library)}"
        raise ValueError(msg)
    baselines = ResearchPlan.model_fields["baseline"].annotation.__args__  # type: ignore[union-attr]
    if "baseline" in config and config["baseline"] not in baselines:
        msg = f"baseline {config['baseline']!r} is not a reference predictor of the library; valid: {', '.join(baselines)}"
        raise ValueError(msg)


def _code_block(text: str) -> tuple[str, str]:
    """The longest fenced code block of a plain-text answer (the whole text when it has none), and the prose around it (500 characters)."""
    import re

    blocks = re.findall(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", text, flags=re.DOTALL | re.IGNORECASE)
    code = max(blocks, key=len) if blocks else text.strip()
    return code, re.sub(r"```.*?(?:```|\Z)", "", text, flags=re.DOTALL).strip()[:500]


class CodeScript(BaseModel):
    """A language model's coder answer: the whole training + inference script, checked against the static contract.

    Asked for as plain text (``answer_format = "python"``): the script in one fenced Python
    block, then a sentence. Code inside a JSON string is where small models fail (measured:
    Qwen2.5-Coder-1.5B under a JSON schema answered a placeholder three times in a row), and
    plain text needs no escaping. :meth:`from_reply` also takes a JSON object with ``script``.
    """

    model_config = ConfigDict(extra="forbid")
    answer_format: ClassVar[str] = "python"
    answer_instructions: ClassVar[str] = (
        "Reply with the complete script in ONE ```python fenced block (the whole file, runnable as it is), "
        "then one sentence on the model. No other code blocks."
    )

    script: str = Field(description="A complete training + inference script satisfying the sandbox contract (plain Python, no code fences).")
    notes: str = Field("", description="One sentence on the model.")

    @model_validator(mode="after")
    def _script_ok(self) -> CodeScript:
        from cellforge.execution.contract import check_script

        check_script(self.script, names=True)
        return self

    @classmethod
    def from_reply(cls, text: str) -> CodeScript:
        """The script in a plain-text reply: its longest fenced block (or a JSON object's ``script``, or the whole text).

        Raises
        ------
        ValueError
            No script, or one that breaks the static contract (the message says what to fix).
        """
        import json

        stripped = text.strip()
        if stripped.startswith("{"):
            try:
                data = json.loads(stripped)
            except ValueError:
                data = None
            if isinstance(data, dict) and isinstance(data.get("script"), str):
                return cls.model_validate({"script": data["script"], "notes": str(data.get("notes", ""))[:500]})
        script, notes = _code_block(text)
        return cls.model_validate({"script": script, "notes": notes})


class CodeFunction(BaseModel):
    """A coder's answer as a model function: ``predict_deltas`` of the worked example, rewritten to follow the plan.

    The host puts the function in place of the worked example's model region
    (:func:`cellforge.execution.contract.splice_model`); the example does the input and output.
    The model still writes free-form code (any imports, helpers, training loop inside the
    region) and the result is checked against the same contract; what the coder need not write
    is the data loading and the output format, a third of a short script and most of a small
    model's mistakes. Asked for as plain text, like :class:`CodeScript`.
    """

    model_config = ConfigDict(extra="forbid")
    answer_format: ClassVar[str] = "python"
    answer_instructions: ClassVar[str] = (
        "Reply with ONE ```python fenced block holding your `predict_deltas` function (any imports and small helper "
        "functions it needs above it; no classes, no docstring, at most 50 lines); the host puts it in place of the "
        "worked example's model region. Nothing after the block."
    )
    #: Generation ends at the block's closing fence: the 1.5B coder's prose after it (about 100 tokens, 15 s) was never read.
    stop: ClassVar[tuple[str, ...]] = ("```\n\n",)

    function: str = Field(description="The model region: imports, helpers and def predict_deltas(...).")
    script: str = Field(description="The worked example with this region in place of its own (made by the host).")
    notes: str = ""

    @classmethod
    def from_reply(cls, text: str) -> CodeFunction:
        """The function in a plain-text reply, spliced into the worked example.

        Raises
        ------
        ValueError
            No fenced block or no top-level ``def predict_deltas``, or a script that breaks the
            static contract (the message says what to fix).
        """
        from cellforge.execution.contract import EXAMPLE_SCRIPT, splice_model

        code, notes = _code_block(text)
        script = splice_model(EXAMPLE_SCRIPT.read_text(), code)
        return cls(function=code, script=script, notes=notes)


class FunctionFix(BaseModel):
    """A debugger's answer for a coder's model function: the whole corrected ``predict_deltas``.

    A 1.5B debugger asked for find/replace edits of a 25-line function copied its ``find``
    text from the traceback, or proposed an edit that changed nothing, again and again
    (measured); rewriting a short function is what such a model does best. The host puts the
    function in place of the failing script's model region
    (:func:`cellforge.execution.contract.splice_model`) and checks it like the coder's.
    """

    model_config = ConfigDict(extra="forbid")
    answer_format: ClassVar[str] = "python"
    answer_instructions: ClassVar[str] = (
        "Reply with one sentence on the cause, then ONE ```python fenced block holding the whole corrected "
        "`predict_deltas` (any imports and small helpers it needs above it; no docstring). Nothing after the block."
    )
    stop: ClassVar[tuple[str, ...]] = ("```\n\n",)

    diagnosis: str = ""
    function: str = Field(description="The corrected model region: imports, helpers and def predict_deltas(...).")
    #: The failing model region, whose lines fill an answer's ``...`` (:func:`~cellforge.execution.contract.merge_elisions`).
    original: ClassVar[str] = ""

    @classmethod
    def against(cls, original: str) -> type[FunctionFix]:
        """This schema for a fix of ``original`` (the failing model region): elided lines are filled from it."""
        return type(cls.__name__, (cls,), {"__annotations__": {"original": ClassVar[str]}, "original": original, "__module__": cls.__module__})

    @classmethod
    def from_reply(cls, text: str) -> FunctionFix:
        """The corrected function in a plain-text reply, checked like the coder's.

        Raises
        ------
        ValueError
            No fenced block or no top-level ``def predict_deltas``, no return, or a script that
            breaks the static contract (the message says what to fix).
        """
        from cellforge.execution.contract import EXAMPLE_SCRIPT, merge_elisions, splice_model

        code, notes = _code_block(text)
        code = merge_elisions(code, cls.original) if cls.original else code
        splice_model(EXAMPLE_SCRIPT.read_text(), code)
        return cls(diagnosis=notes[:500], function=code)

    def as_patch(self, script: str) -> dict[str, Any]:
        """A :class:`Patch` dict whose ``script`` is ``script`` with this function in its model region."""
        from cellforge.execution.contract import splice_model

        return Patch(diagnosis=self.diagnosis or "rewrote predict_deltas", script=splice_model(script, self.function)).model_dump() | {"function": self.function}


class Edit(BaseModel):
    """Replace the exact text ``find`` (must occur in the script) by ``replace``."""

    model_config = ConfigDict(extra="forbid")

    find: str
    replace: str


class Patch(BaseModel):
    """The debugger's answer to a failed attempt: a unified diff, a whole new script, exact edits and/or CONFIG updates."""

    model_config = ConfigDict(extra="forbid")

    diagnosis: str
    diff: str = Field("", description="A unified diff of the script (any part may change).")
    script: str = Field("", description="The whole corrected script, instead of a diff.")
    edits: list[Edit] = Field(default_factory=list)
    config_updates: dict[str, Any] = Field(default_factory=dict)
    give_up: bool = Field(False, description="True when the debugger sees no fix.")

    @model_validator(mode="after")
    def _script_ok(self) -> Patch:
        if self.script:
            from cellforge.execution.contract import check_script

            check_script(self.script)
        return self


class OneEdit(BaseModel):
    """A debugger's answer in the narrow format small models manage: one exact find/replace."""

    model_config = ConfigDict(extra="forbid")

    diagnosis: str
    find: str = Field(description="Exact text of the script to replace (copied from the script, not from the traceback).")
    replace: str = Field(description="What replaces it.")

    def as_patch(self) -> dict[str, Any]:
        """The same fix as a :class:`Patch` dict."""
        return Patch(diagnosis=self.diagnosis, edits=[Edit(find=self.find, replace=self.replace)]).model_dump()


class Refinement(BaseModel):
    """The refiner's proposal after a clean run: one configuration change, or stop."""

    model_config = ConfigDict(extra="forbid")

    diagnosis: str = Field(description="What the validation metrics and the journal show.")
    config_updates: dict[str, Any] = Field(default_factory=dict, description="CONFIG keys to change for the next round.")
    diff: str = Field("", description="A unified diff of the best script: a change of the model itself, judged like any other.")
    script: str = Field("", description="A whole new version of the best script, instead of a diff.")
    stop: bool = Field(False, description="True when no change is worth another training run.")

    @model_validator(mode="after")
    def _names(self) -> Refinement:
        _check_names(self.config_updates)
        return self
