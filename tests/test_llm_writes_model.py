"""A language model writes the model: free-form code through LiteLLM, run in the sandbox, fixed from the runtime's events.

A scripted OpenAI-compatible server (a real HTTP server on 127.0.0.1) plays the coder and the
debugger. The coder writes an architecture that is not in the template library, with a bug;
the error reaches the debugger from the sandbox runtime's event stream; its diff is applied;
the fixed script runs and the host scores its predictions beside the baselines.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cellforge.cli import app

NOVEL = '''"""Control-programme kernel: perturbations are embedded by their target gene's loadings on the
leading programmes of control-cell co-expression; a test perturbation's change is the kernel-weighted
average of the training changes of perturbations with similar embeddings."""
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

CONFIG = {"bandwidth": 0.5, "n_programs": 8, "seed": 0}

rng = np.random.default_rng(CONFIG["seed"])
task = json.loads(Path("task.json").read_text())
genes = task["genes"]
train = ad.read_h5ad("data/train.h5ad")[:, genes]


def dense(x):
    return x.toarray() if sp.issparse(x) else np.asarray(x, dtype=np.float64)


class ControlProgrammeKernel:
    def __init__(self, control, n_programs, bandwidth):
        centred = control - control.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        self.loadings = vt[:n_programs].T  # (n_genes, n_programs)
        self.index = {g: i for i, g in enumerate(genes)}
        self.bandwidth = bandwidth

    def embed(self, perturbation):
        rows = [self.loadings[self.index[t]] for t in perturbation.split("+") if t in self.index]
        return np.sum(rows, axis=0) if rows else np.zeros(self.loadings.shape[1])

    def fit(self, perturbations, deltas):
        self.keys = np.stack([self.embed(p) for p in perturbations])
        self.deltas = deltas
        return self

    def predict(self, perturbation):
        dist = ((self.keys - self.embed(perturbation)) ** 2).sum(axis=1)
        weights = np.exp(-(dist - dist.min()) / self.bandwidth)
        return (weights / weights.sum()) @ self.deltas


is_control = train.obs["is_control"].to_numpy()
control = dense(train[is_control].X)
mu = control.mean(axis=0)
labels = train.obs["condition"].astype(str).to_numpy()
perturbation_of = {c["condition"]: c["perturbation"] for c in task["conditions"]}
train_conds = [c for c in task["train_conditions"] if (labels == c).any()]
deltas = np.stack([dense(train[labels == c].X).mean(axis=0) - mu for c in train_conds])
model = ControlProgrammeKernel(control, CONFIG["n_programs"], CONFIG["bandwidth"]).fit([perturbation_of[c] for c in train_conds], deltas)

Path("outputs").mkdir(exist_ok=True)
Path("outputs/val_metrics.json").write_text(json.dumps({"val_mse_top20": 0.0001, "note": "a claim the host does not take"}))

test = task["predict_conditions"]
rows = [mu + model.predict(perturbation_of[c]) for c in test]
pred = np.stack(rows, axis=1)
out = ad.AnnData(X=pred.astype(np.float32), obs=pd.DataFrame({"condition": test}, index=[str(i) for i in range(len(test))]), var=pd.DataFrame(index=genes))
out.write_h5ad("outputs/predictions.h5ad")
print("wrote", len(test), "predictions")
'''

FIX = """--- a/train.py
+++ b/train.py
@@ -60,3 +60,3 @@
 rows = [mu + model.predict(perturbation_of[c]) for c in test]
-pred = np.stack(rows, axis=1)
+pred = np.stack(rows, axis=0)
 out = ad.AnnData(X=pred.astype(np.float32), obs=pd.DataFrame({"condition": test}, index=[str(i) for i in range(len(test))]), var=pd.DataFrame(index=genes))
"""


class ScriptedModel(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint whose answers are scripted per agent."""

    requests: list[dict] = []

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][1]["content"]
        agent = json.loads(user.split("```json\n", 1)[1].split("\n```", 1)[0])["agent"]
        type(self).requests.append({"agent": agent, "user": user, "system": body["messages"][0]["content"], "response_format": body.get("response_format"), "path": self.path})
        if agent == "coder":  # code is asked for as plain text: one fenced block, then a sentence
            answer = f"```python\n{NOVEL}```\nA control-programme kernel, not a template."
        elif agent == "debugger" and "Observations annot. `obs` must have" in user:
            answer = {"diagnosis": "np.stack(axis=1) puts genes on the rows; stack conditions on axis 0", "diff": FIX}
        else:
            answer = {"diagnosis": "unexpected request", "give_up": True}
        content = answer if isinstance(answer, str) else json.dumps(answer)
        reply = {
            "id": f"chatcmpl-{len(type(self).requests)}", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(user) // 4, "completion_tokens": len(content) // 4, "total_tokens": (len(user) + len(content)) // 4},
        }  # fmt: skip
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def scripted_model():  # noqa: ANN201
    ScriptedModel.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedModel)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_an_llm_written_model_is_debugged_from_runtime_events_and_scored(scripted_model, tmp_path, monkeypatch):
    from tests.conftest import MIRROR

    if not MIRROR.exists():
        pytest.skip("offline mirror not present")
    for role in ("CODER", "DEBUGGER"):  # the other roles stay with the offline planner
        monkeypatch.setenv(f"CELLFORGE_LLM_{role}", f"openai/scripted-{role.lower()}")
        monkeypatch.setenv(f"CELLFORGE_LLM_{role}_API_BASE", scripted_model)
    monkeypatch.setenv("CELLFORGE_SANDBOX", "local")
    result = CliRunner().invoke(app, ["benchmark", "--dataset", "adamson_subset", "--runs", str(tmp_path), "--pilots", "0", "--refine-rounds", "0"])
    assert result.exit_code == 0, result.output
    run = Path(result.stdout.strip().splitlines()[-1])

    agents = [r["agent"] for r in ScriptedModel.requests]
    assert agents[:2] == ["coder", "debugger"]
    # structured output to a local server for the debugger's JSON; the coder's script comes as plain text
    assert ScriptedModel.requests[0]["response_format"] is None and "```python fenced block" in ScriptedModel.requests[0]["user"]
    assert ScriptedModel.requests[1]["response_format"]["type"] == "json_schema"
    assert json.loads((run / "code" / "choice.json").read_text())["written_by"] == "coder"
    journal = json.loads((run / "journal.json").read_text())
    first, second = journal["attempts"][:2]
    assert first["failure"] == "code_error" and second["failure"] is None and second["stage"] == "debug"
    # the error the debugger saw came from the runtime's streamed events of the failed attempt
    error = "Observations annot. `obs` must have"
    assert any(error in e["text"] for e in first["events"])
    assert error in ScriptedModel.requests[1]["user"]
    # the host judged the fixed script on validation cells it never saw: its claim of 0.0001 is flagged, not used
    assert second["reported_metrics"]["val_mse_top20"] == 0.0001
    assert second["val_metrics"]["val_judged_by"] == "host" and second["val_metrics"]["val_mse_top20"] > 0.001
    assert "the script reported val_mse_top20 0.0001" in second["disagreement"]
    # the script faced the plan's reference on the same host-named conditions (the paired one-standard-error rule a
    # template applies to its residual), then the plan's library model ran as a candidate against the incumbent
    stages = [a["stage"] for a in journal["attempts"]]
    reference, library = (journal["attempts"][stages.index(s)] for s in ("reference", "library"))
    assert reference["index"] == 2 and reference["failure"] is None and library["failure"] is None
    verdict, candidate = journal["comparisons"][0], journal["comparisons"][-1]
    assert verdict["challenger"] == 1 and verdict["incumbent"] == 2 and verdict["unit"] in {"condition", "condition x gene"}
    # judged on the validation conditions and, out of fold, on every training condition (the host ran both scripts per fold)
    assert verdict["conditions"]["out_of_fold"] == len(json.loads((run / "split.json").read_text())["train"])
    assert "out-of-fold training conditions" in (run / "report.md").read_text()
    if verdict["better"]:
        assert agents == ["coder", "debugger"] and "revise" not in stages
    else:
        # told the host's figures, the coder is asked to revise: its answer (the script before the debugger's fix) fails
        # and goes to the debugger, whose fix runs; asked again, the coder sends code already judged, which is not run twice
        assert agents == ["coder", "debugger", "coder", "debugger", "coder"] and "ran clean, but the host judged" in ScriptedModel.requests[2]["system"]
        revised = journal["attempts"][stages.index("revise")]
        assert stages.count("revise") == 1 and revised["failure"] == "code_error"
        fixed = journal["attempts"][revised["index"] + 1]
        assert fixed["stage"] == "debug" and fixed["parent"] == revised["index"] and fixed["failure"] is None
    assert candidate["challenger"] == library["index"] and candidate["incumbent"] == (1 if verdict["better"] else 2)
    final = (run / "code" / "final_train.py").read_text()
    written_by = journal["lineage"]["written_by"]
    if verdict["better"] and not candidate["better"]:
        assert "class ControlProgrammeKernel" in final and "np.stack(rows, axis=0)" in final
        assert written_by == "coder script, patched by the debugger" and journal["lineage"]["model_written"]
    else:  # the library's model or the reference is scored, and the lineage says which
        assert "class ControlProgrammeKernel" not in final and not journal["lineage"]["model_written"]
        assert written_by.startswith("library template" if candidate["better"] else "the plan's reference predictor")
    assert verdict["better"] == (verdict["mean_diff"] + (verdict["se"] or 0) < 0 and verdict["se"] is not None)
    metrics = json.loads((run / "metrics.json").read_text())
    model = metrics["methods"]["cellforge_model"]
    assert {"no_change", "training_mean", "linear"} <= set(metrics["methods"])
    assert all(isinstance(model[k], float) for k in ("pearson_delta", "pearson_delta_de20", "mse_de20"))
    assert metrics["llm"]["backend_by_role"]["coder"] == "openai/scripted-coder"


@pytest.mark.slow
def test_one_main_job_with_the_real_local_llm(tmp_path):
    """One ``make bench-llm`` run (coder and debugger on Qwen2.5-Coder-1.5B): it ends with a scored model."""
    from cellforge.llm.local_model import xllamacpp_available

    if not xllamacpp_available():
        pytest.skip("the local-llm extra is not installed (make install-llm)")
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_llm", Path(__file__).resolve().parent.parent / "benchmarks" / "llm.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    record = bench.run_one("adamson_subset", 0, runs=tmp_path, model="local/qwen2.5-coder-1.5b", roles=bench.CODE_ROLES, debate_rounds=1, timeout_s=900)
    assert record["exit_code"] == 0 and record["scored"], record.get("error")
    coder = record["calls_by_role"]["coder"]
    assert coder["backend"].startswith("local/qwen2.5-coder-1.5b") and coder["errors"] == 0 and not coder["tokens_estimated"]
    # whatever the model wrote, the host says what was scored and, when its code ran clean, how it fared against the reference
    assert record["lineage"]["written_by"] and record["draft_by"] == "coder function"
    assert not record["llm_code_ran_clean"] or record["reference_verdicts"]
