"""Registry, download (mirror, HTTP, resume, md5), loaders and splits on the shipped real data."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest

from cellforge.data import get_card, list_datasets
from cellforge.data.download import download, fetch
from cellforge.data.registry import DatasetCard
from cellforge.data.splits import SplitManifest, make_split
from cellforge.errors import ChecksumError, ConfigError, DatasetError, UnknownDatasetError
from tests.conftest import MIRROR

SHIPPED = [c.name for c in list_datasets(shipped_only=True)]


def test_every_mirrored_file_has_a_card():
    filenames = {c.filename for c in list_datasets()}
    for path in MIRROR.glob("*"):
        if path.suffix in {".h5ad", ".rda"}:
            assert path.name in filenames


def test_unknown_dataset_names_valid_choices():
    with pytest.raises(UnknownDatasetError, match="norman_subset"):
        get_card("normann")


def test_fetch_uses_mirror_and_checks_md5(tmp_path, monkeypatch):
    card = get_card("adamson_subset")
    assert fetch(card, show_progress=False).resolve() == (MIRROR / card.filename).resolve()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / card.filename).write_bytes(b"not the file")
    monkeypatch.setenv("CELLFORGE_DATA_MIRROR", str(bad))
    with pytest.raises(ChecksumError, match=card.md5):
        fetch(card, show_progress=False)


def test_offline_missing_file_lists_places_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLFORGE_DATA_MIRROR", str(tmp_path))
    monkeypatch.setenv("CELLFORGE_OFFLINE", "1")
    with pytest.raises(DatasetError, match=str(tmp_path)):
        fetch(get_card("kang_subset"), show_progress=False)


def test_download_from_local_server_resumes_and_verifies(http_server, tmp_path, monkeypatch):
    base, www = http_server
    source = MIRROR / "adamson_2016_upr_360x1000.h5ad"
    shutil.copy(source, www / source.name)
    md5 = hashlib.md5(source.read_bytes()).hexdigest()  # noqa: S324
    dest = tmp_path / "dl" / source.name
    dest.parent.mkdir()
    # A partial file from an interrupted download is resumed with a Range request.
    (dest.parent / (source.name + ".part")).write_bytes(source.read_bytes()[:1000])
    out = download(f"{base}/{source.name}", dest, md5=md5, show_progress=False)
    assert out.read_bytes() == source.read_bytes()
    # Through the registry: no cache, no mirror, so the card's URL is downloaded.
    card = DatasetCard.model_validate({**get_card("adamson_subset").model_dump(), "url": f"{base}/{source.name}"})
    monkeypatch.setenv("CELLFORGE_DATA_MIRROR", "")
    got = fetch(card, show_progress=False)
    assert got.parent.parent.name != "www" and got.read_bytes() == source.read_bytes()


def test_corrupt_download_is_rejected_and_removed(http_server, tmp_path):
    base, www = http_server
    (www / "f.h5ad").write_bytes(b"corrupted bytes")
    with pytest.raises(ChecksumError, match="expected"):
        download(f"{base}/f.h5ad", tmp_path / "f.h5ad", md5="0" * 32, show_progress=False)
    assert not (tmp_path / "f.h5ad").exists() and not (tmp_path / "f.h5ad.part").exists()


@pytest.mark.parametrize("name", SHIPPED)
def test_loaders_give_canonical_anndata(name, load):
    adata = load(name)
    obs = adata.obs
    for column in ["perturbation", "is_control", "context", "condition"]:
        assert column in obs
    assert obs["is_control"].sum() > 0
    assert set(obs.loc[obs["is_control"], "perturbation"]) == {"control"}
    values = adata.X.data
    assert np.isfinite(values).all() and values.min() >= 0 and values.max() < 20  # log scale
    card = get_card(name)
    if adata.uns["cellforge"]["has_counts"]:
        counts = adata.layers["counts"].data
        assert np.allclose(counts, np.round(counts))
    assert adata.uns["cellforge"]["dataset"] == card.name


def test_loader_facts_match_the_sources(load):
    assert load("adamson_subset").shape == (360, 1000)
    norman = load("norman_subset")
    assert norman.n_obs == 3375 and (norman.obs["perturbation"].str.contains(r"\+")).any()
    assert sorted(load("glioblastoma_subset").obs["context"].unique()) == ["PW030", "PW032", "PW034", "PW036", "PW040"]
    papalexi = load("papalexi_subset")
    assert papalexi.obs["perturbation"].nunique() == 26  # 25 targets + control


@pytest.mark.parametrize("name", SHIPPED)
def test_default_splits_are_disjoint_and_keep_controls(name, load):
    adata = load(name)
    card = get_card(name)
    manifest = make_split(adata, card.task.split, **card.task.split_options)
    assert manifest.test and not set(manifest.test) & set(manifest.train + manifest.val)
    controls = set(adata.obs.loc[adata.obs["is_control"], "condition"].astype(str))
    assert not controls & set(manifest.train + manifest.val + manifest.test)


def test_combination_split_labels_subgroups(load):
    manifest = make_split(load("norman_subset"), "combination", seed=1)
    assert all("+" in c for c in manifest.test)
    assert set(manifest.subgroups.values()) <= {"combo_seen0", "combo_seen1", "combo_seen2"}
    singles = {c for c in manifest.train if "+" not in c}
    for cond, group in manifest.subgroups.items():
        assert group == f"combo_seen{sum(m in singles for m in cond.split('+'))}"


def test_user_split_with_unknown_condition_is_rejected(load, tmp_path):
    adata = load("adamson_subset")
    bad = SplitManifest(strategy="user", train=["SPI1"], val=[], test=["NOT_A_GENE"])
    with pytest.raises(ConfigError, match="NOT_A_GENE"):
        bad.check_against(adata)
    with pytest.raises(ConfigError, match="valid"):
        make_split(adata, "random_cells")


def test_a_screen_sized_counts_matrix_is_normalised_in_place_without_a_second_copy(monkeypatch):
    """Above KEEP_COUNTS_MAX_VALUES stored values the counts are not kept: the same normalised X, one matrix in memory."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from cellforge.data import canonical

    rng = np.random.default_rng(0)
    counts = sp.random(300, 50, density=0.3, format="csr", random_state=1, data_rvs=lambda n: rng.integers(1, 20, n)).astype(np.float32)
    obs = pd.DataFrame({"pert": ["ctrl"] * 100 + ["A"] * 100 + ["B"] * 100}, index=[f"c{i}" for i in range(300)])
    kept = canonical.standardise(ad.AnnData(counts.copy(), obs=obs), dataset="toy", perturbation_key="pert", control_labels=["ctrl"], log_normalised=False)
    assert "counts" in kept.layers and kept.uns["cellforge"]["counts_kept"]
    monkeypatch.setattr(canonical, "KEEP_COUNTS_MAX_VALUES", 10)
    monkeypatch.setattr(canonical, "_NORMALISE_BLOCK_ROWS", 7)  # several blocks
    given = ad.AnnData(counts.copy(), obs=obs)
    big = canonical.standardise(given, dataset="toy", perturbation_key="pert", control_labels=["ctrl"], log_normalised=False, owned=True)
    assert "counts" not in big.layers and big.uns["cellforge"]["has_counts"] and not big.uns["cellforge"]["counts_kept"]
    assert any("raw counts not kept" in w for w in big.uns["cellforge"]["warnings"])
    np.testing.assert_allclose(big.X.toarray(), kept.X.toarray(), rtol=1e-6)
    assert big.X.data is given.X.data or np.shares_memory(big.X.data, given.X.data)  # normalised where it lay
    # not handed over: the caller's matrix is left as it was
    mine = ad.AnnData(counts.copy(), obs=obs)
    canonical.standardise(mine, dataset="toy", perturbation_key="pert", control_labels=["ctrl"], log_normalised=False)
    np.testing.assert_array_equal(mine.X.toarray(), counts.toarray())
