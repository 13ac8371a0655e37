"""Full-data registry cards: every family has a card and a loader; downloads tested against a local server.

The full files (35 MB to 2.5 GB) cannot be downloaded here. Each loader is tested on a
fixture in its upstream layout: RNA fixtures are built from the shipped real subsets; the
protein and chromatin fixtures are SYNTHETIC (no real data of those modalities is on these
machines) and are labelled so in their obs.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import warnings
import zipfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from cellforge.data import get_card, list_datasets, load_card_file
from cellforge.data.download import fetch
from cellforge.data.loaders import clr
from cellforge.data.registry import DatasetCard
from cellforge.errors import ChecksumError

FAMILIES = {
    "adamson": "rna",
    "norman": "rna",
    "sciplex3": "rna",
    "schiebinger": "rna",
    "kang": "rna",
    "papalexi": "rna",
    "papalexi_protein": "protein",
    "liscovitch": "chromatin",
    "adamson_gears": "rna",
    "norman_gears": "rna",
}


def test_every_family_has_a_full_card_with_a_known_loader():
    from cellforge.data.loaders import LOADERS

    names = {c.name for c in list_datasets()}
    assert set(FAMILIES) <= names
    for name, modality in FAMILIES.items():
        card = get_card(name)
        assert not card.shipped_subset and card.modality == modality and card.loader in LOADERS
        assert card.url.startswith("https://")
        # a published checksum, or a card that says why there is none
        assert card.md5 or card.sha256 or "no checksum" in card.notes


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()  # noqa: S324


def _card(name: str, url: str, path: Path, **extra) -> DatasetCard:  # noqa: ANN003
    """The registry card with its URL pointed at the local server and the fixture's checksum."""
    return DatasetCard.model_validate({**get_card(name).model_dump(), "url": url, "md5": _md5(path), "sha256": None, **extra})


def _scperturb_adamson(load, out: Path) -> Path:  # noqa: ANN001
    """The shipped Adamson subset written as scPerturb writes its files (raw counts, obs 'perturbation')."""
    canon = load("adamson_subset")
    obs = pd.DataFrame({"perturbation": canon.obs["perturbation"].astype(str).to_numpy()}, index=canon.obs_names)
    ad.AnnData(X=canon.layers["counts"].copy(), obs=obs, var=pd.DataFrame(index=canon.var_names)).write_h5ad(out)
    return out


def test_full_adamson_card_downloads_from_local_server_and_loads(http_server, load, tmp_path, monkeypatch):
    base, www = http_server
    name = get_card("adamson").filename
    fixture = _scperturb_adamson(load, www / name)
    card = _card("adamson", f"{base}/{name}", fixture)
    monkeypatch.setenv("CELLFORGE_DATA_MIRROR", "")
    # an interrupted download left a partial file: it is resumed, then verified
    cache = Path(__import__("os").environ["CELLFORGE_CACHE"]) / "data"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / (name + ".part")).write_bytes(fixture.read_bytes()[:5000])
    path = fetch(card, show_progress=False)
    assert path.read_bytes() == fixture.read_bytes()
    adata = load_card_file(card, path)
    shipped = load("adamson_subset")
    assert adata.shape == shipped.shape
    np.testing.assert_allclose(adata.X.toarray(), shipped.X.toarray(), rtol=1e-5, atol=1e-6)
    assert set(adata.obs["perturbation"]) == set(shipped.obs["perturbation"])


def test_full_card_rejects_a_corrupted_download(http_server, load, tmp_path, monkeypatch):
    base, www = http_server
    name = get_card("papalexi").filename
    fixture = _scperturb_adamson(load, tmp_path / "good.h5ad")
    card = _card("papalexi", f"{base}/{name}", fixture)
    corrupted = bytearray(fixture.read_bytes())
    corrupted[len(corrupted) // 2] ^= 0xFF
    (www / name).write_bytes(bytes(corrupted))
    monkeypatch.setenv("CELLFORGE_DATA_MIRROR", "")
    with pytest.raises(ChecksumError, match="corrupt file was removed"):
        fetch(card, show_progress=False)
    cache = Path(__import__("os").environ["CELLFORGE_CACHE"]) / "data"
    assert not (cache / name).exists() and not (cache / (name + ".part")).exists()


def test_scperturb_combinations_become_plus_pairs(load, tmp_path):
    canon = load("norman_subset")
    labels = canon.obs["perturbation"].astype(str).str.replace("+", "_", regex=False)
    obs = pd.DataFrame({"perturbation": labels.to_numpy()}, index=canon.obs_names)
    path = tmp_path / "norman.h5ad"
    # scPerturb ships counts; the shipped subset is log-normalised, so undo it to fake counts exactly
    counts = np.round(np.expm1(canon.X.toarray()))
    ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=canon.var_names)).write_h5ad(path)
    card = get_card("norman")
    adata = load_card_file(card, path)
    assert set(adata.obs["perturbation"].astype(str)) == set(canon.obs["perturbation"].astype(str))
    assert any("+" in p for p in adata.obs["perturbation"].astype(str))


def test_scperturb_doses_make_one_condition_per_dose(tmp_path):
    rng = np.random.default_rng(0)
    obs = pd.DataFrame(
        {
            "perturbation": ["control"] * 20 + ["drugA"] * 20,
            "dose_value": ["0"] * 20 + ["10"] * 10 + ["100"] * 10,
            "cell_line": ["A549", "MCF7"] * 20,
        },
        index=[f"c{i}" for i in range(40)],
    )
    path = tmp_path / "sciplex.h5ad"
    ad.AnnData(X=sp.csr_matrix(rng.poisson(3, (40, 30)).astype(np.float32)), obs=obs).write_h5ad(path)
    adata = load_card_file(get_card("sciplex3"), path)
    assert set(adata.obs["condition"].astype(str)) == {
        "A549:control", "MCF7:control", "A549:drugA@10", "MCF7:drugA@10", "A549:drugA@100", "MCF7:drugA@100",
    }  # fmt: skip
    assert set(adata.obs["dose"].astype(str)) == {"0", "10", "100"}


def test_protein_loader_clr_normalises_synthetic_adt_counts(tmp_path):
    rng = np.random.default_rng(1)
    counts = rng.poisson([50, 5, 200, 20], size=(60, 4)).astype(np.float32)
    obs = pd.DataFrame(
        {"perturbation": ["control"] * 30 + ["PDL1_KO"] * 30, "fixture": "SYNTHETIC"}, index=[f"c{i}" for i in range(60)]
    )
    path = tmp_path / "protein.h5ad"
    ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=["CD86", "PDL1", "PDL2", "CD366"])).write_h5ad(path)
    adata = load_card_file(get_card("papalexi_protein"), path)
    X = adata.X.toarray()  # noqa: N806
    np.testing.assert_allclose(X.mean(axis=1), 0, atol=1e-5)  # centred per cell
    np.testing.assert_allclose(X, clr(counts), rtol=1e-6)
    np.testing.assert_allclose(adata.layers["counts"].toarray(), counts)
    assert adata.uns["cellforge"]["modality"] == "protein" and "CLR" in adata.uns["cellforge"]["normalisation"]


def _atac_zip(path: Path, *, features_by_cells: bool) -> tuple[np.ndarray, list[str]]:
    """A SYNTHETIC scPerturb ATAC archive: gene_scores/{obs.csv,var.csv,counts.mtx.gz} plus a peaks folder."""
    rng = np.random.default_rng(2)
    genes = [f"GENE{i}" for i in range(25)]
    labels = ["control"] * 30 + ["ARID1A"] * 15 + ["SMARCA4"] * 15
    scores = rng.gamma(2.0, 2.0, size=(60, 25)) * (rng.random((60, 25)) > 0.3)
    with zipfile.ZipFile(path, "w") as archive:
        root = "Liscovitch-BrauerSanjana2021_K562_1"
        obs = pd.DataFrame({"perturbation": labels, "fixture": "SYNTHETIC"}, index=[f"bc{i}" for i in range(60)])
        archive.writestr(f"{root}/gene_scores/obs.csv", obs.to_csv())
        archive.writestr(f"{root}/gene_scores/var.csv", pd.DataFrame({"chr": "chr1"}, index=genes).to_csv())
        buf = io.BytesIO()
        scipy.io.mmwrite(buf, sp.coo_matrix(scores.T if features_by_cells else scores))
        archive.writestr(f"{root}/gene_scores/counts.mtx.gz", gzip.compress(buf.getvalue()))
        archive.writestr(f"{root}/peak_bc/obs.csv", obs.to_csv())
    return scores, genes


@pytest.mark.parametrize("features_by_cells", [True, False])
def test_atac_loader_reads_gene_scores_in_either_orientation(tmp_path, features_by_cells):
    path = tmp_path / "atac.zip"
    scores, genes = _atac_zip(path, features_by_cells=features_by_cells)
    adata = load_card_file(get_card("liscovitch"), path)
    assert adata.shape == (60, 25) and list(adata.var_names) == genes
    assert adata.uns["cellforge"]["modality"] == "chromatin"
    np.testing.assert_allclose(adata.layers["counts"].toarray(), scores, rtol=1e-5)
    assert set(adata.obs["perturbation"].astype(str)) == {"control", "ARID1A", "SMARCA4"}


def test_gears_archive_loads_and_records_a_first_download_checksum(http_server, load, tmp_path, monkeypatch):
    base, www = http_server
    canon = load("adamson_subset")
    cond = [("ctrl" if p == "control" else f"{p}+ctrl") for p in canon.obs["perturbation"].astype(str)]
    processed = ad.AnnData(
        X=canon.X.copy(), obs=pd.DataFrame({"condition": cond}, index=canon.obs_names),
        var=pd.DataFrame({"gene_name": canon.var_names.to_numpy()}, index=[f"ENSG{i:05d}" for i in range(canon.n_vars)]),
    )  # fmt: skip
    h5ad_path = tmp_path / "perturb_processed.h5ad"
    processed.write_h5ad(h5ad_path)
    name = get_card("adamson_gears").filename
    with zipfile.ZipFile(www / name, "w") as archive:
        archive.write(h5ad_path, "adamson/perturb_processed.h5ad")
    card = DatasetCard.model_validate({**get_card("adamson_gears").model_dump(), "url": f"{base}/{name}"})
    assert card.md5 is None and card.sha256 is None
    monkeypatch.setenv("CELLFORGE_DATA_MIRROR", "")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = fetch(card, show_progress=False)
    assert any("no published checksum" in str(w.message) for w in caught)
    assert (path.parent / (name + ".md5")).read_text() == _md5(www / name)
    adata = load_card_file(card, path)
    assert set(adata.obs["perturbation"].astype(str)) == set(canon.obs["perturbation"].astype(str))
    assert list(adata.var_names) == list(canon.var_names)
    # a later copy that differs from the first download is refused
    path.write_bytes(b"changed")
    with pytest.raises(ChecksumError):
        fetch(card, show_progress=False)
