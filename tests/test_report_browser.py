"""The run report as a newcomer sees it: rendered by a real headless Chromium at 1400 x 900.

One small real run directory on the Norman subset: the data, profile and offline debate stages
run for real; a model's predictions (the matching-mean baseline plus seeded noise) and its
attempts are written directly, to stay fast; then the real evaluate and report stages. The page
is measured in Chromium (``--dump-dom`` of a copy that carries a measuring script) and
screenshotted; a copy of the screenshot goes to ``benchmarks/results/report-screenshot.png``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NO_CHROMIUM = "needs a Chromium browser on PATH (Debian: apt-get install -y --no-install-recommends chromium)"
VIEWPORT = (1400, 900)
SCREENSHOT_COPY = ROOT / "benchmarks" / "results" / "report-screenshot.png"
#: Smallest text, CSS pixels, in the page and in the figures as shown.
MIN_FONT_PX = 10.0

#: Runs in the page once it has loaded; writes what it measured into <pre id="layout">.
MEASURE_JS = """
window.addEventListener('load', function () {
  var images = Array.from(document.images).map(function (im) {
    return {alt: im.alt, complete: im.complete, natural: im.naturalWidth, shown: im.getBoundingClientRect().width};
  });
  var minFont = Infinity, minText = '';
  var walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    var node = walker.currentNode, el = node.parentElement, box = el.getBoundingClientRect();
    if (!node.textContent.trim() || box.width === 0 || box.height === 0) continue;
    var size = parseFloat(getComputedStyle(el).fontSize);
    if (size < minFont) { minFont = size; minText = node.textContent.trim().slice(0, 60); }
  }
  var tables = Array.from(document.querySelectorAll('table')).map(function (t) {
    return {head: t.rows[0].textContent.trim().slice(0, 60), scroll: t.scrollWidth, client: t.clientWidth};
  });
  var out = {innerWidth: window.innerWidth, scrollWidth: document.documentElement.scrollWidth,
             images: images, minFont: minFont, minText: minText, tables: tables};
  var pre = document.createElement('pre');
  pre.id = 'layout';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
"""
#: Starts the page at the metrics table (what comes before it is hidden), for a screenshot of
#: the part a reader looks at first: the table, its notes and the figures below it.
FROM_METRICS_JS = """
(function () {
  var h = Array.from(document.querySelectorAll('h2')).find(function (e) { return e.textContent === 'Model vs baselines'; });
  for (var el = h && h.previousElementSibling; el; el = el.previousElementSibling) { el.style.display = 'none'; }
  document.body.style.marginTop = '0';
})();
"""


def _recording_savefig(record: dict[str, dict]):  # noqa: ANN202
    """A ``Figure.savefig`` that also records, per file, the smallest text in pixels, the width and the x tick labels."""
    import matplotlib.figure
    import matplotlib.text

    original = matplotlib.figure.Figure.savefig

    def savefig(fig, fname, *args, **kwargs):  # noqa: ANN001, ANN202
        out = original(fig, fname, *args, **kwargs)
        dpi = float(kwargs.get("dpi") or fig.dpi)
        sizes = [
            t.get_fontsize() * dpi / 72
            for t in fig.findobj(matplotlib.text.Text)
            if t.get_visible() and t.get_text().strip() and (t.axes is None or t.axes.get_visible())
        ]
        record[Path(fname).name] = {
            "min_px": min(sizes),
            "width": int(round(fig.get_figwidth() * dpi)),
            "xticks": [[t.get_text() for t in ax.get_xticklabels()] for ax in fig.axes if ax.get_visible()],
        }
        return out

    return savefig


@pytest.fixture(scope="module")
def report_run(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """(run, figures): a Norman-subset run directory with its report, and what :func:`_recording_savefig` saw of each figure."""
    import anndata as ad
    import matplotlib.figure
    import pandas as pd

    from cellforge import stages
    from cellforge.data.splits import SplitManifest
    from cellforge.evaluation.harness import baseline_inputs, run_baselines
    from cellforge.run import Run, RunConfig
    from tests.conftest import MIRROR

    if not MIRROR.exists():
        pytest.skip(f"offline mirror {MIRROR} not present")
    figures: dict[str, dict] = {}
    mp = pytest.MonkeyPatch()
    mp.setenv("CELLFORGE_DATA_MIRROR", str(MIRROR))
    mp.setenv("CELLFORGE_CACHE", str(tmp_path_factory.mktemp("cache")))
    for key in list(os.environ):
        if key.startswith("CELLFORGE_LLM"):
            mp.delenv(key)
    mp.setattr(matplotlib.figure.Figure, "savefig", _recording_savefig(figures))
    quiet = lambda _: None  # noqa: E731
    try:
        # two debate rounds keep it fast; the debate then stops at its round cap, as a real one may
        run = Run.create(RunConfig(dataset="norman_subset", pilots=0, debate_rounds=2, refine_rounds=0), root=tmp_path_factory.mktemp("runs"))
        for name in ["data", "profile", "design"]:
            getattr(stages, f"stage_{name}")(run, echo=quiet)
            run.write_json(f"stages/{name}.json", {"stage": name, "wall_s": 1.0})
        adata = run.adata()
        manifest = SplitManifest.load(run.path("split.json"))
        base = run_baselines(baseline_inputs(adata, manifest), ["matching_mean"])["matching_mean"]
        noise = np.random.default_rng(0).normal(0.0, 0.02, size=base.shape)
        pred = ad.AnnData(
            X=(base.to_numpy() + noise).astype(np.float32),
            obs=pd.DataFrame({"condition": list(base.index)}, index=[f"p{i}" for i in range(len(base))]),
            var=pd.DataFrame(index=[str(g) for g in base.columns]),
        )
        pred.write_h5ad(run.path("predictions.h5ad"))
        attempt = {"parent": None, "patch": None, "backend": "local", "isolation": "rlimits"}
        run.write_json(
            "journal.json",
            {
                "attempts": [
                    {**attempt, "index": 0, "stage": "draft", "exit_code": 1, "failure": "code_error", "duration_s": 3.2, "val_metrics": {}},
                    {**attempt, "index": 1, "stage": "debug", "exit_code": 0, "failure": None, "duration_s": 21.5, "val_metrics": {"val_mse_top20": 0.17}},
                    {**attempt, "index": 2, "stage": "refine", "exit_code": 0, "failure": None, "duration_s": 19.0, "val_metrics": {"val_mse_top20": 0.181}},
                ],
                "best_attempt": 1,
                "refine_stop_reason": "no improvement by 1% in 1 round",
            },
        )
        run.write_json("sandbox.json", {"backend": "local", "isolation": "rlimits"})
        for name in ["evaluate", "report"]:
            getattr(stages, f"stage_{name}")(run, echo=quiet)
    finally:
        mp.undo()
    return run, figures


def _chromium(*args: str, timeout: float = 60) -> str:
    """Run headless Chromium (as root it needs --no-sandbox); return its stdout."""
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
        "--disable-dev-shm-usage", f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}", *args,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _with_script(page: Path, script: str, out: Path) -> Path:
    """A copy of ``page`` with ``script`` run at the end of its body."""
    html = page.read_text()
    assert html.count("</body>") == 1
    # the report forbids every script (Content-Security-Policy); this measuring copy lifts that for the harness's own
    html = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>\n?', "", html)
    out.write_text(html.replace("</body>", f"<script>{script}</script>\n</body>"))
    return out


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_report_reads_in_a_real_browser_at_1400_px(report_run, tmp_path):
    import matplotlib.image as plt_image

    run, figures = report_run
    page = run.path("report.html")
    dom = _chromium("--virtual-time-budget=10000", "--dump-dom", _with_script(page, MEASURE_JS, tmp_path / "measure.html").as_uri())
    found = re.search(r'<pre id="layout">(.*?)</pre>', dom, re.DOTALL)
    assert found, dom[-2000:]
    layout = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))

    # no horizontal scrolling: not the page, and not a table inside it
    assert layout["innerWidth"] == VIEWPORT[0]
    assert layout["scrollWidth"] <= layout["innerWidth"], layout
    for table in layout["tables"]:
        assert table["scroll"] <= table["client"] + 1, table
    # every figure the Markdown names is in the page, loaded, and shown at its natural size or
    # near it, so that its smallest text (measured on the matplotlib figure) stays readable
    names = re.findall(r"!\[([^\]]*)\]\(([^)]+\.png)\)", run.path("report.md").read_text())
    assert len(names) == len(layout["images"]) == 4, (names, layout["images"])
    for (alt, name), image in zip(names, layout["images"], strict=True):
        assert image["alt"] == alt and image["complete"] and image["natural"] > 0, image
        drawn = figures[name]
        assert image["natural"] == drawn["width"], (name, image, drawn)
        shown_px = drawn["min_px"] * image["shown"] / image["natural"]
        assert shown_px >= MIN_FONT_PX, f"{name}: smallest text shown at {shown_px:.1f} px ({image})"
    # and the page's own text
    assert layout["minFont"] >= MIN_FONT_PX, (layout["minFont"], layout["minText"])

    # screenshots at 1400 x 900: the top of the page, and the page from the metrics table on
    top, metrics_view = tmp_path / "report-top.png", tmp_path / "report-screenshot.png"
    _chromium("--virtual-time-budget=10000", f"--screenshot={top}", page.as_uri())
    from_metrics = _with_script(page, FROM_METRICS_JS, tmp_path / "from-metrics.html")
    _chromium("--virtual-time-budget=10000", f"--screenshot={metrics_view}", from_metrics.as_uri())
    for shot in (top, metrics_view):
        assert _png_size(shot) == VIEWPORT, shot
        pixels = plt_image.imread(shot)
        assert (pixels[..., :3].min(axis=2) < 0.5).mean() > 0.01, f"{shot} is (nearly) blank"  # dark text and figures
    assert metrics_view.read_bytes() != top.read_bytes()
    SCREENSHOT_COPY.parent.mkdir(parents=True, exist_ok=True)
    if not SCREENSHOT_COPY.exists() or SCREENSHOT_COPY.read_bytes() != metrics_view.read_bytes():
        shutil.copyfile(metrics_view, SCREENSHOT_COPY)


def test_report_text_is_consistent_with_its_own_numbers(report_run):
    run, _ = report_run
    text = run.path("report.md").read_text()
    metrics = json.loads(run.path("metrics.json").read_text())
    plan = json.loads(run.path("plan.json").read_text())
    # no raw Python dicts or lists anywhere, and no number printed to 17 digits
    assert not re.search(r"\{'|\[\{", text), re.search(r".{40}(\{'|\[\{).{40}", text)
    assert not re.search(r"\d\.\d{9,}", text), re.search(r".{40}\d\.\d{9,}.{10}", text)
    # the scatter's two correlations are named; the per-condition one is the table's pearson_delta_de20
    caption = re.search(r"cellforge_model: pooled (-?[\d.]+), per condition (-?[\d.]+), table (-?[\d.]+)", text)
    assert caption and caption.group(2) == caption.group(3) == f"{metrics['methods']['cellforge_model']['pearson_delta_de20']:.4f}"
    # the debate's calls add up to the design row of the usage table
    debate = json.loads(run.path("debate.json").read_text())
    line = re.search(r"The debate itself made (\d+) LLM calls.*?the design stage made (\d+) in all", text)
    assert line and int(line.group(1)) == debate["calls"]
    assert int(line.group(2)) == metrics["llm"]["by_stage"]["design"]["calls"]
    assert re.search(rf"^\| design \| {line.group(2)} \|", text, re.MULTILINE)
    # the rationale's sizes are the plan's (the code's CONFIG starts from them)
    sizing = next(r for r in plan["rationale"] if "hidden width" in r)
    hp = plan["hyperparameters"]
    assert f"hidden width {hp['hidden_dim']:g}" in sizing and f"weight decay {hp['weight_decay']:g}" in sizing, sizing
    assert f"| hidden_dim | {hp['hidden_dim']} |" in text
    # on Norman no test perturbation targets a measured gene: linear is the training mean, and the report says so
    lin, mean = metrics["methods"]["linear"], metrics["methods"]["training_mean"]
    assert all(abs(lin[m] - mean[m]) < 1e-9 for m in ["pearson_delta", "pearson_delta_de20", "mse_de20"])
    assert "targets a measured gene" in metrics["baseline_notes"]["linear"]
    assert "- `linear`: none of the" in text


def test_attempts_plot_ticks_are_the_attempts(report_run):
    run, figures = report_run
    attempts = [str(a["index"]) for a in json.loads(run.path("metrics.json").read_text())["attempts"]]
    assert figures["attempts.png"]["xticks"] == [attempts, attempts]


def test_rationale_sizes_come_from_the_final_hyperparameters():
    from cellforge.planner.policies import design_plan

    ctx = {
        "profile": {"n_genes": 500},
        "task": {"type": "combination", "description": "pairs"},
        "split": {"n_train": 23, "n_train_combinations": 5, "test_contexts": []},
        "debate": {
            "consensus": {"baseline": "additive", "train_on": "combinations", "hyperparameters": {"hidden_dim": 128, "weight_decay": 0.05}},
            "stop_reason": "converged in round 3",
            "pilots": {"pilot-0-expert_training": {"author": "expert_training", "val_mse_top20": 0.1821378656449411, "val_baseline_mse_top20": 0.17950676570447888}},
        },
    }
    plan = design_plan(ctx)
    text = " ".join(plan["rationale"])
    assert plan["hyperparameters"]["hidden_dim"] == 128
    assert "hidden width 128 (the debate's consensus; the size rule gave 64)" in text
    assert "weight decay 0.05 (the debate's consensus; the size rule gave 0.01)" in text
    assert "val_mse_top20 0.1821 vs its baseline 0.1795" in text and "0.18213" not in text
    # without a debate the rule's sizes stand, stated once
    alone = " ".join(design_plan({**ctx, "debate": None})["rationale"])
    assert "hidden width 64, weight decay 0.01," in alone and "size rule" not in alone


def test_debate_section_formats_pilots_and_reconciles_calls(tmp_path):
    from cellforge.report.markdown import _debate_section

    debate = {
        "experts": ["expert_data", "expert_biology"],
        "confidences": [{"expert_data": 0.9, "expert_biology": 0.85}],
        "pilots": {"pilot-0-expert_data": {"author": "expert_data", "proposal": {"baseline": "additive"}, "val_mse_top20": 0.1821378656449411, "val_baseline_mse_top20": None}},
        "stop_reason": "converged in round 1",
        "calls": 3,
    }
    (tmp_path / "debate.json").write_text(json.dumps(debate))
    calls = [
        *({"stage": "design", "role": "expert"} for _ in range(2)),
        {"stage": "design", "role": "critic"},
        {"stage": "design", "role": "critic", "error": "timeout"},
        {"stage": "design", "role": "coder"},
        {"stage": "design", "role": "planner"},
        {"stage": "codegen", "role": "coder"},
    ]
    (tmp_path / "llm_calls.jsonl").write_text("".join(json.dumps(c) + "\n" for c in calls))
    run = SimpleNamespace(dir=tmp_path, path=lambda name: tmp_path / name, read_json=lambda name: json.loads((tmp_path / name).read_text()))
    text = _debate_section(run)
    assert "| 0.1821 | n/a |" in text
    assert (
        "The debate itself made 3 LLM calls (one per expert turn and one critic call per round); the design stage made 6 in all "
        "(2 expert turns, 1 critic turns, 1 pilot scripts (coder), 1 plan (method designer), 1 failed, retried)"
    ) in text


def test_linear_fallback_says_when_linear_is_the_training_mean():
    import pandas as pd

    from cellforge.evaluation.baselines import BaselineInputs, baseline_notes, linear, linear_fallback, training_mean

    rng = np.random.default_rng(0)
    genes = ["g0", "g1", "g2", "g3", "g4"]
    perts = ["X", "Y", "Z", "g1", "X+Y", "g2", "Q"]
    conditions = pd.DataFrame({"perturbation": perts, "context": ["all"] * len(perts)}, index=perts)
    controls = pd.DataFrame([np.ones(len(genes))], index=["all"], columns=genes)

    def inputs(seen: list[str], test: list[str]) -> BaselineInputs:
        frame = pd.DataFrame(1 + rng.normal(size=(len(seen), len(genes))), index=seen, columns=genes)
        return BaselineInputs(seen=frame, controls=controls, conditions=conditions, test=test)

    # no seen perturbation targets a measured gene: linear is exactly the training mean, and says so
    none = inputs(["X", "Y", "Z"], ["X+Y", "g2"])
    assert np.allclose(linear(none).to_numpy(), training_mean(none).to_numpy())
    assert linear_fallback(none).startswith("none of the 3 seen perturbations targets a measured gene")
    assert "linear" in baseline_notes(none, ["linear"])
    # some test perturbations without a measured target: those rows are the training mean
    some = inputs(["X", "g1", "Z"], ["g2", "Q"])
    assert linear_fallback(some).startswith("1 of 2 test perturbations target no measured gene")
    assert np.allclose(linear(some).loc["Q"], training_mean(some).loc["Q"])
    # every target measured: nothing to say
    assert linear_fallback(inputs(["g1", "X+Y"], ["g2"])) == ""


#: What a hostile model or pilot might put where the report quotes it: live tags if rendered as HTML.
HOSTILE = (
    "<script>document.title='PWNED-SCRIPT'</script><img src=x onerror=\"document.body.setAttribute('data-pwned','img')\">"
    "<iframe src=\"javascript:parent.document.body.setAttribute('data-pwned','iframe')\"></iframe>"
    "![tracker](http://198.51.100.7/pixel.png)[click](javascript:alert(1))"
)


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_hostile_strings_from_a_model_and_a_pilot_are_shown_as_text(report_run, tmp_path):
    """A plan written by a language model and a pilot's sandbox-written metrics carry markup: the page shows it, runs none of it."""
    from cellforge import stages
    from cellforge.run import Run

    run, _ = report_run
    copy = tmp_path / "hostile-run"
    shutil.copytree(run.dir, copy)
    plan = json.loads((copy / "plan.json").read_text())
    plan["architecture"] = "A residual MLP " + HOSTILE
    plan["loss"] = HOSTILE
    (copy / "plan.json").write_text(json.dumps(plan))
    debate = json.loads((copy / "debate.json").read_text())
    debate["pilots"] = {
        "pilot-0": {"author": HOSTILE, "proposal": {"baseline": HOSTILE}, "val_mse_top20": "<b>0.0</b>", "val_baseline_mse_top20": None}
    }
    (copy / "debate.json").write_text(json.dumps(debate))
    hostile = Run.resume(copy)
    stages.stage_report(hostile, echo=lambda _: None)
    assert "<b>0.0</b>" not in (copy / "report.md").read_text()  # a string where a number belongs is not printed as one
    page = copy / "report.html"
    raw = page.read_text()
    assert "<script>" not in raw and "<iframe" not in raw and "onerror=" not in raw.replace("onerror=&quot;", "")
    dom = _chromium("--virtual-time-budget=3000", "--dump-dom", page.as_uri())
    assert not re.search(r"<title>[^<]*PWNED", dom) and not re.search(r"<body[^>]*data-pwned", dom)  # no script ran
    assert "&lt;script&gt;document.title='PWNED-SCRIPT'&lt;/script&gt;" in dom  # shown to the reader as the text it is
    assert not re.search(r"<img[^>]+src=\"(?!data:image/png;base64,)", dom)  # nothing fetched from anywhere
