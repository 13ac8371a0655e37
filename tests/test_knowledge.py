"""Task analysis: knowledge cards, retrieval per task type, online connectors, task specification."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from cellforge.analysis.task import infer_task_spec, task_type_from_profile, task_type_from_words
from cellforge.knowledge.cards import load_cards
from cellforge.knowledge.connectors import search_online
from cellforge.knowledge.retrieval import CardIndex, task_query


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    import os

    old = os.environ.get("CELLFORGE_CACHE")
    os.environ["CELLFORGE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        yield CardIndex()
    finally:
        if old is None:
            os.environ.pop("CELLFORGE_CACHE", None)
        else:
            os.environ["CELLFORGE_CACHE"] = old


def test_knowledge_base_has_forty_linked_cards():
    cards = load_cards()
    assert len(cards) >= 40
    ids = {c.id for c in cards}
    for needed in ["gears", "cpa", "chemcpa", "scgen", "scgpt", "state", "biolord", "cellot", "linear_baseline", "additive_baseline", "gnn_gene_graph", "vae_latent_arithmetic", "flow_matching"]:
        assert needed in ids, needed
    assert sum(c.kind == "principle" for c in cards) >= 10
    assert all(c.references and c.strengths and c.failure_modes for c in cards)
    assert all(link in ids for c in cards for link in c.links)


PROFILE = {"perturbation_type": "CRISPRa", "n_perturbations": 33, "n_combinations": 15, "contexts": ["K562"], "modality": "rna"}
CASES = [
    ("combination", "Predict held-out pairs of CRISPRa perturbations in K562 from singles", PROFILE, {"additive_baseline", "genetic_interaction_principle"}),
    ("new_context", "Predict the interferon-beta response of a held-out cell type", {**PROFILE, "perturbation_type": "cytokine", "n_perturbations": 1, "n_combinations": 0, "contexts": list("abcdefg")}, {"context_shift_baseline", "context_transfer_principle", "scgen"}),
    ("unseen_perturbation", "Predict the effects of knock-downs of genes never perturbed in training", {**PROFILE, "perturbation_type": "CRISPRi", "n_combinations": 0}, {"gears", "linear_baseline"}),
    ("drug_dose", "Predict responses of cancer cell lines to unseen drugs at several doses", {**PROFILE, "perturbation_type": "drug", "n_perturbations": 188, "n_combinations": 0}, {"chemcpa", "dose_response_principle"}),
]


@pytest.mark.parametrize(("task_type", "words", "profile", "expected"), CASES, ids=[c[0] for c in CASES])
def test_retrieval_ranks_task_relevant_cards_first(index, task_type, words, profile, expected):
    found = index.retrieve(task_query(task_type, words, profile), task_type=task_type)
    ids = [r.id for r in found]
    assert expected <= set(ids[:12]), ids[:12]
    seeds = [r for r in found if r.how == "ranking"]
    assert seeds and all(task_type in index.by_id[r.id].task_types or "any" in index.by_id[r.id].task_types for r in seeds[:3])
    # every item keeps its provenance; expanded cards name the card whose link led to them
    for r in found:
        assert r.source.endswith("cards.yaml") and r.detail["references"]
        assert (r.via is None) == (r.how == "ranking") and (r.depth == 0) == (r.how == "ranking")
        if r.via:
            assert r.id in index.by_id[r.via].links


def test_expansion_respects_the_relevance_threshold(index):
    query = task_query(*CASES[0][:3])
    strict = index.retrieve(query, task_type="combination", link_threshold=0.99)
    assert all(r.how == "ranking" for r in strict)
    loose = index.retrieve(query, task_type="combination", link_threshold=0.0, depth=3)
    assert {"breadth_first", "depth_first"} <= {r.how for r in loose}
    assert len({r.id for r in loose}) == len(loose)  # no card twice


class _Apis(BaseHTTPRequestHandler):
    fail_github = False

    def log_message(self, *args: object) -> None:
        pass

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        url = urlparse(self.path)
        q = parse_qs(url.query)
        if url.path.endswith("/esearch.fcgi"):
            assert q["db"] == ["pubmed"] and q["retmode"] == ["json"]
            self._json(200, {"header": {}, "esearchresult": {"count": "2", "idlist": ["37000001", "36000002"]}})
        elif url.path.endswith("/esummary.fcgi"):
            result = {"uids": ["37000001", "36000002"]}
            result["37000001"] = {"uid": "37000001", "title": "Predicting transcriptional outcomes of novel multigene perturbations", "source": "Nat Biotechnol", "pubdate": "2024"}
            result["36000002"] = {"uid": "36000002", "title": "Deep learning-based models do not outperform linear baselines", "source": "Nat Methods", "pubdate": "2025"}
            self._json(200, {"header": {}, "result": result})
        elif url.path.endswith("/search/repositories"):
            if self.fail_github:
                self._json(403, {"message": "API rate limit exceeded"})
                return
            items = [{"full_name": "snap-stanford/GEARS", "html_url": "https://github.com/snap-stanford/GEARS", "description": "GEARS", "stargazers_count": 300}]
            self._json(200, {"total_count": 1, "items": items})
        else:
            self._json(404, {})


@pytest.fixture
def apis(monkeypatch):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Apis)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    monkeypatch.setenv("CELLFORGE_PUBMED_URL", f"{base}/entrez/eutils")
    monkeypatch.setenv("CELLFORGE_GITHUB_API", base)
    yield base
    httpd.shutdown()


def test_online_connectors_are_off_by_default(apis):  # noqa: ARG001
    items, status = search_online("perturbation prediction")
    assert items == [] and status["pubmed"].startswith("off")


def test_connectors_read_pubmed_and_github_formats(apis, monkeypatch):
    monkeypatch.setenv("CELLFORGE_ONLINE", "1")
    items, status = search_online("perturbation response prediction", limit=3)
    assert status == {"pubmed": "ok (2 items)", "github": "ok (1 items)"}
    papers = [i for i in items if i.how == "pubmed"]
    assert papers[0].id == "pmid:37000001" and papers[0].source == "https://pubmed.ncbi.nlm.nih.gov/37000001/"
    assert papers[0].detail["journal"] == "Nat Biotechnol" and papers[0].detail["api"].startswith(apis)
    repo = next(i for i in items if i.how == "github")
    assert repo.name == "snap-stanford/GEARS" and repo.detail["stars"] == 300 and repo.detail["retrieved_at"]
    _Apis.fail_github = True
    try:
        items, status = search_online("x")
    finally:
        _Apis.fail_github = False
    assert status["pubmed"].startswith("ok") and status["github"].startswith("skipped: HTTPStatusError")


def test_task_type_from_words_and_profile():
    assert task_type_from_words("predict held-out drug pairs") == "combination"
    assert task_type_from_words("transfer to a new cell type") == "new_context"
    assert task_type_from_words("responses to unseen drugs at several doses") == "drug_dose"
    assert task_type_from_words("knock-downs of unseen genes") == "unseen_perturbation"
    assert task_type_from_words("model this screen") is None
    spec = infer_task_spec("model this screen", {"n_combinations": 3, "contexts": ["a"]})
    assert spec.type == "combination" and spec.inferred_from["type"] == "the data profile"
    assert infer_task_spec("pairs please", {}, declared="new_context").type == "new_context"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("adamson_subset", "unseen_perturbation"),
        ("norman_subset", "combination"),
        ("mcfaline_subset", "new_context"),
        ("kang_subset", "new_context"),
        ("papalexi_subset", "unseen_perturbation"),
        ("glioblastoma_subset", "new_context"),
    ],
)
def test_task_type_is_right_on_every_shipped_data_set_without_hints(load, name, expected):
    from cellforge.stages import _light_profile

    assert task_type_from_profile(_light_profile(load(name))) == expected


# --------------------------------------------------------------------------- the data parser
def _raw(n_per: int = 30, *, labels=("non-targeting", "A", "B", "A+B"), counts: bool = True, extra_obs: dict | None = None):  # noqa: ANN001, ANN202
    import anndata as ad
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    blocks, obs = [], []
    for lab in labels:
        rate = np.full(40, 3.0)
        if lab != "non-targeting":
            rate[:5] *= 6
        blocks.append(rng.poisson(rate, (n_per, 40)).astype(np.float32))
        obs += [lab] * n_per
    x = np.vstack(blocks)
    if not counts:
        x = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    frame = pd.DataFrame({"target": obs, **(extra_obs or {})}, index=[f"c{i}" for i in range(len(obs))])
    return ad.AnnData(X=x, obs=frame, var=pd.DataFrame(index=[f"G{i}" for i in range(40)]))


def test_parser_reads_a_screen_and_says_how_it_decided():
    from cellforge.analysis.parser import parse_anndata

    p = parse_anndata(_raw())
    assert (p.perturbation_key, p.control_label, p.scale) == ("target", "non-targeting", "counts")
    assert "integers" in p.scale_evidence and p.perturbation_key_how.startswith("inferred")
    assert (p.n_single, p.n_combinations, p.combo_delimiter) == (2, 1, "+")
    assert p.n_de_genes["min"] >= 3 and p.effect_size["min"] > 0 and p.cells_per_condition["median"] == 30
    logs = parse_anndata(_raw(counts=False))
    assert logs.scale == "log-normalised" and logs.modality == "rna"


def test_parser_errors_list_the_candidates(tmp_path):
    import numpy as np

    from cellforge.analysis.parser import parse_anndata
    from cellforge.errors import DatasetError

    with pytest.raises(DatasetError, match="no perturbation column found.*obs columns: \\['target'\\]"):
        parse_anndata(_raw(labels=("A", "B", "C")))
    with pytest.raises(DatasetError, match="several obs columns look like perturbation labels"):
        parse_anndata(_raw(extra_obs={"guide": ["ctrl"] * 60 + ["x"] * 60}))
    with pytest.raises(DatasetError, match="several control labels"):
        parse_anndata(_raw(labels=("non-targeting", "control", "A")))
    with pytest.raises(DatasetError, match="only 1 perturbation"):
        parse_anndata(_raw(labels=("non-targeting", "A")))
    bad = _raw(counts=False)
    bad.X[0, 0] = np.nan
    with pytest.raises(DatasetError, match="NaN"):
        parse_anndata(bad)
    scaled = _raw(counts=False)
    scaled.X = scaled.X - scaled.X.mean(0)
    with pytest.raises(DatasetError, match="negative values"):
        parse_anndata(scaled)
    with pytest.raises(DatasetError, match="no such file"):
        parse_anndata(tmp_path / "none.h5ad")


def test_parser_reads_shipped_files_in_backed_mode():
    from tests.conftest import MIRROR

    from cellforge.analysis.parser import parse_anndata

    if not MIRROR.exists():
        pytest.skip("offline mirror not present")
    kang = parse_anndata(MIRROR / "scgen_valid_pbmc.h5ad")
    assert (kang.perturbation_key, kang.context_key, kang.scale) == ("condition", "cell_type", "log-normalised")
    assert len(kang.contexts) == 7 and kang.n_de_genes["median"] > 10
    adamson = parse_anndata(MIRROR / "adamson_2016_upr_360x1000.h5ad")
    assert (adamson.perturbation_key, adamson.control_label, adamson.scale) == ("guide_gene", "non-targeting", "counts")
