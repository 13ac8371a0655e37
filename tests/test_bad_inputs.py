"""Bad input at the boundary: a clear error naming the file, column or option, before any run directory exists."""

from __future__ import annotations

import json
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cellforge import cli
from cellforge.cli import app

runner = CliRunner()
N_CELLS, N_GENES = 80, 40


def _counts(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.poisson(3, (N_CELLS, N_GENES)).astype(np.float32)
    x[0, 0] = 50  # counts, unmistakably
    return x


def _write(path, x, genes=None) -> str:
    obs = pd.DataFrame({"perturbation": np.repeat(["control", "A", "B", "C"], N_CELLS // 4)}, index=[f"c{i}" for i in range(N_CELLS)])
    var = pd.DataFrame(index=genes or [f"G{i}" for i in range(N_GENES)])
    ad.AnnData(X=x, obs=obs, var=var).write_h5ad(path)
    return str(path)


def _spoiled(kind: str, tmp_path) -> str:
    path = tmp_path / f"{kind}.h5ad"
    x = _counts()
    if kind == "inf":
        x[3, 4] = np.inf
    elif kind == "negative":
        x = x + 0.5
        x[5, 6] = -1.2
    elif kind == "all_zero":
        x = np.zeros_like(x)
    elif kind == "empty":
        path.write_bytes(b"")
        return str(path)
    elif kind == "not_hdf5":
        path.write_text("gene,cell\n1,2\n")
        return str(path)
    elif kind == "truncated":
        whole = tmp_path / "whole.h5ad"
        _write(whole, x)
        data = whole.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return str(path)
    return _write(path, x)


def _benchmark(tmp_path, *args: str):
    runs = tmp_path / "runs"
    result = runner.invoke(app, ["benchmark", "--runs", str(runs), *args])
    return result, (sorted(p.name for p in runs.iterdir()) if runs.exists() else [])


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("inf", r"inf\.h5ad: X has 1 non-finite values \(inf\) \(first at cell 3, gene 4\)"),
        ("negative", r"negative\.h5ad: X has 1 negative values \(minimum -1\.2\).*cannot be negative"),
        ("all_zero", r"all_zero\.h5ad: X has no non-zero value"),
        ("empty", r"data file .*empty\.h5ad is empty \(0 bytes\)"),
        ("not_hdf5", r"data file .*not_hdf5\.h5ad is not an HDF5 file"),
        ("truncated", r"cannot read data file .*truncated\.h5ad as \.h5ad .*truncated or damaged"),
    ],
)
def test_unusable_data_is_refused_before_any_run_directory(tmp_path, kind, message):
    result, runs = _benchmark(tmp_path, "--data", _spoiled(kind, tmp_path))
    assert result.exit_code == 2, result.output
    assert re.search(message, result.output), result.output
    assert "Traceback" not in result.output
    assert runs == []


@pytest.mark.parametrize("kind", ["inf", "negative", "all_zero", "truncated", "not_hdf5"])
def test_evaluate_and_split_refuse_the_same_data(tmp_path, kind):
    bad = _spoiled(kind, tmp_path)
    result = runner.invoke(app, ["split", "--data", bad, "--strategy", "kfold", "--out", str(tmp_path / "s.json")])
    assert result.exit_code == 2 and kind.replace("_", "") in result.output.replace("_", ""), result.output
    good = _write(tmp_path / "good.h5ad", _counts())
    made = runner.invoke(app, ["split", "--data", good, "--strategy", "kfold", "-o", "n_folds=3", "--out", str(tmp_path / "s.json")])
    assert made.exit_code == 0, made.output
    pd.DataFrame(np.ones((1, N_GENES)), index=["A"], columns=[f"G{i}" for i in range(N_GENES)]).to_csv(tmp_path / "p.csv")
    result = runner.invoke(app, ["evaluate", "--data", bad, "--split", str(tmp_path / "s.json"), "--pred", str(tmp_path / "p.csv")])
    assert result.exit_code == 2, result.output
    assert bad in result.output
    assert not (tmp_path / "p.csv.scores").exists()


@pytest.mark.parametrize("kind", ["truncated", "not_hdf5", "empty"])
def test_evaluate_names_a_damaged_predictions_file(tmp_path, kind):
    good = _write(tmp_path / "good.h5ad", _counts())
    assert runner.invoke(app, ["split", "--data", good, "--strategy", "kfold", "-o", "n_folds=3", "--out", str(tmp_path / "s.json")]).exit_code == 0
    pred = _spoiled(kind, tmp_path)
    result = runner.invoke(app, ["evaluate", "--data", good, "--split", str(tmp_path / "s.json"), "--pred", pred])
    assert result.exit_code == 2, result.output
    assert f"predictions file {pred}" in result.output


def test_duplicated_gene_names_are_a_recorded_warning(tmp_path):
    from cellforge.data.user import load_user_h5ad

    genes = [f"G{i}" for i in range(N_GENES - 2)] + ["G0", "G1"]
    with pytest.warns(UserWarning):  # anndata's own warning on writing
        path = _write(tmp_path / "dups.h5ad", _counts(), genes)
    adata = load_user_h5ad(path)
    warnings = adata.uns["cellforge"]["warnings"]
    assert len(warnings) == 1
    assert "2 duplicated gene names" in warnings[0] and "G0 (x2, renamed G0-1)" in warnings[0] and path in warnings[0]
    assert {"G0-1", "G1-1"} <= set(adata.var_names)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--debate-rounds", "50"], "--debate-rounds 50: Input should be less than or equal to 10"),
        (["--max-attempts", "0"], "--max-attempts 0: Input should be greater than or equal to 1"),
        (["--max-attempts", "-5"], "--max-attempts -5: Input should be greater than or equal to 1"),
        (["--max-attempts", "1" * 27], "Input should be less than or equal to 20"),
        (["--timeout", "-1"], "--timeout -1.0: Input should be greater than 0"),
        (["--timeout", "nan"], "--timeout nan: Input should be a finite number"),
        (["--seed", "-3"], "--seed -3: Input should be greater than or equal to 0"),
        (["--sandbox", "vm"], "--sandbox 'vm': not a sandbox backend; valid: auto, docker, local"),
        (["--task-type", "regression"], "--task-type 'regression': not a task type; valid: combination, drug_dose, new_context, unseen_perturbation"),
        (["--dataset", "adamsom"], "adamson_subset"),
        (["--until", "train"], "--until 'train'; valid: data, profile, analysis, design, codegen, execute, evaluate, report"),
    ],
)
def test_bad_options_fail_before_any_stage(tmp_path, args, message):
    result, runs = _benchmark(tmp_path, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert runs == []
    assert "[stage]" not in result.output


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("type: combination\n  description: [oops\n", r"task file .*task\.yaml is not valid YAML at line 2, column 14"),
        ("metric_of_record: accuracy\n", r"unknown metric_of_record 'accuracy'; valid: .*pearson_delta_de20"),
        ("split: random\n", r"unknown split 'random'; valid: combination, gears_simulation, kfold"),
        ("typ: combination\n", r"unknown key 'typ'; valid: type, description"),
        ("- a\n- b\n", r"must be a YAML mapping"),
        ("split_options: 4\n", r"split_options must be a mapping"),
    ],
)
def test_task_file_problems_name_the_file(tmp_path, text, message):
    task = tmp_path / "task.yaml"
    task.write_text(text)
    result, runs = _benchmark(tmp_path, "--data", _write(tmp_path / "good.h5ad", _counts()), "--task-file", str(task))
    assert result.exit_code == 2, result.output
    assert re.search(message, result.output), result.output
    assert runs == []


def test_malformed_split_file_names_the_file_and_the_line(tmp_path):
    split = tmp_path / "split.json"
    split.write_text('{"strategy": "user",\n "train": ["A"], ')
    result, runs = _benchmark(tmp_path, "--data", _write(tmp_path / "good.h5ad", _counts()), "--split", str(split))
    assert result.exit_code == 2
    assert f"split manifest {split} is not valid JSON (line 2" in result.output
    split.write_text(json.dumps({"strategy": "user", "train": ["A"], "val": [], "test": ["B"], "folds": 3}))
    result, runs = _benchmark(tmp_path, "--data", str(tmp_path / "good.h5ad"), "--split", str(split))
    assert result.exit_code == 2 and "folds: Extra inputs are not permitted" in result.output
    split.write_text(json.dumps({"strategy": "user", "train": ["A"], "val": [], "test": ["Z"]}))
    result, runs = _benchmark(tmp_path, "--data", str(tmp_path / "good.h5ad"), "--split", str(split))
    assert result.exit_code == 2 and f"--split {split}" in result.output and "'Z'" in result.output
    assert runs == []


def test_inputs_that_do_not_fit_together_leave_no_run_directory(tmp_path):
    task = tmp_path / "task.yaml"
    task.write_text("split: combination\n")  # the data has no combinations: found by the data stage
    result, runs = _benchmark(tmp_path, "--data", _write(tmp_path / "good.h5ad", _counts()), "--task-file", str(task))
    assert result.exit_code == 2
    assert "needs combinations" in result.output and "no run directory kept" in result.output
    assert "--resume" not in result.output
    assert runs == []


def test_damaged_run_json_on_resume_is_named(tmp_path):
    run_dir = tmp_path / "old-run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text('{"dataset": "x", "max_attempts": ')
    result = runner.invoke(app, ["benchmark", "--resume", str(run_dir)])
    assert result.exit_code == 2
    assert f"{run_dir / 'run.json'} is damaged and the run cannot be resumed" in result.output
    (run_dir / "run.json").write_text(json.dumps({"dataset": "x", "debate_rounds": 50}))
    result = runner.invoke(app, ["benchmark", "--resume", str(run_dir)])
    assert result.exit_code == 2 and "debate_rounds: Input should be less than or equal to 10" in result.output


def test_an_unexpected_error_is_one_line_and_a_saved_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "app", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: RuntimeError: boom (traceback saved to " in err
    saved = re.search(r"traceback saved to (\S+);", err).group(1)
    assert "Traceback (most recent call last)" in open(saved).read()  # noqa: PTH123


def test_datasets_marks_what_is_on_this_machine(tmp_path, monkeypatch):
    from cellforge.data import get_card

    monkeypatch.setenv("CELLFORGE_DATA_MIRROR", str(tmp_path))
    (tmp_path / get_card("kang_subset").filename).write_bytes(b"x")
    result = runner.invoke(app, ["datasets"])
    header, *lines = result.stdout.splitlines()
    col = header.index("here")
    rows = {line.split()[0]: line[col : col + 6].strip() for line in lines}
    assert rows["kang_subset"] == "yes" and rows["norman_subset"] == "-"
    assert str(tmp_path) in result.output


def test_default_mirror_is_used_without_the_variable(monkeypatch, tmp_path):
    from cellforge import paths

    monkeypatch.delenv("CELLFORGE_DATA_MIRROR")
    monkeypatch.setattr(paths, "DEFAULT_MIRRORS", (tmp_path / "absent", tmp_path))
    assert paths.mirror_dirs() == [tmp_path]
    assert "default" in paths.mirror_source()
    monkeypatch.setenv("CELLFORGE_DATA_MIRROR", "")
    assert paths.mirror_dirs() == []


def test_a_failed_download_says_where_to_point_the_mirror(tmp_path, monkeypatch):
    from cellforge.data import get_card
    from cellforge.data.download import fetch
    from cellforge.data.registry import DatasetCard
    from cellforge.errors import DatasetError

    monkeypatch.setenv("CELLFORGE_DATA_MIRROR", "")
    card = DatasetCard.model_validate({**get_card("kang_subset").model_dump(), "url": "http://127.0.0.1:9/kang.h5ad"})
    with pytest.raises(DatasetError) as err:
        fetch(card, show_progress=False)
    text = str(err.value)
    assert "ConnectError" in text and "Set CELLFORGE_DATA_MIRROR to a folder holding" in text and "cellforge doctor" in text
    assert ".part" not in text  # nothing was downloaded, so nothing is kept


def test_the_report_repeats_the_data_warnings(tmp_path):
    from cellforge.report.markdown import _data_warnings
    from cellforge.run import Run, RunConfig

    run = Run.create(RunConfig(dataset="dups"), root=tmp_path)
    assert _data_warnings(run) == ""
    run.write_json("data.json", {"provenance": {"warnings": ["dups.h5ad: 2 duplicated gene names (var_names) made unique"]}})
    assert "- dups.h5ad: 2 duplicated gene names (var_names) made unique" in _data_warnings(run)
