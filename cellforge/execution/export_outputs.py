"""Runs inside the sandbox, after the training script: its predictions turned into a format the host can bound.

The host never parses an HDF5 file that generated code wrote. An ``.h5ad`` can declare a dataset
of any size with a fill value (28 KB on disk, gigabytes once read), and the HDF5 library that
would parse it on the host runs with the host's rights. So this script, which the host copies into
the work folder and runs there with the sandbox's limits (``python -I``: nothing from the work
folder is imported), reads ``outputs/predictions.h5ad`` with anndata and writes:

- ``outputs/.export/X.npy``: the predicted rows, ``(n_rows, n_genes)`` float32 or float64, in
  NumPy's ``.npy`` format, whose header states the shape and dtype before any byte of data;
- ``outputs/.export/labels.json``: ``{"conditions": [...], "genes": [...], "rows": [...]}``, one
  condition and one row name per row, one gene per column.

The host then reads those two files with bounds fixed in advance
(:func:`cellforge.execution.contract.import_exported`) and writes its own ``predictions.h5ad``.
Whatever this script is made to do by the code it runs after, the host only ever sees two
files in simple formats, checked before they are read.

Exit status: 0 when written; 3 with one line on stderr when the predictions cannot be read; 4 when
there is no ``outputs/predictions.h5ad`` entry at all (nothing to export: the host's check of the
outputs says what is missing).
It must stay self-contained (standard library, numpy, anndata): the sandbox has no cellforge.
"""

import json
import os
import sys
from pathlib import Path

OUT = Path("outputs/.export")


def _clear(folder: Path) -> None:
    """Remove ``folder`` (whatever the training script left there, links included)."""
    if folder.is_symlink() or folder.is_file():
        folder.unlink()
    elif folder.is_dir():
        for root, dirs, files in os.walk(folder, topdown=False):
            for name in files + dirs:
                path = Path(root) / name
                path.unlink() if path.is_symlink() or not path.is_dir() else path.rmdir()
        folder.rmdir()


def main() -> int:
    _clear(OUT)
    source = Path("outputs/predictions.h5ad")
    if not os.path.lexists(source):
        return 4
    import numpy as np

    if not source.is_file() or source.is_symlink():
        print("outputs/predictions.h5ad: missing (or not a regular file)", file=sys.stderr)
        return 3
    try:
        import anndata as ad

        pred = ad.read_h5ad(source)
        if "condition" not in pred.obs:
            print(f"outputs/predictions.h5ad: obs has no 'condition' column; columns: {list(pred.obs.columns)[:20]}", file=sys.stderr)
            return 3
        x = pred.X.toarray() if hasattr(pred.X, "toarray") else np.asarray(pred.X)
        x = np.ascontiguousarray(x, dtype=np.float64 if x.dtype == np.float64 else np.float32)
        labels = {"conditions": [str(c) for c in pred.obs["condition"]], "genes": [str(g) for g in pred.var_names], "rows": [str(r) for r in pred.obs_names]}
    except Exception as exc:  # noqa: BLE001 - any failure to read is the script's, reported as one line
        print(f"outputs/predictions.h5ad: not readable as AnnData ({type(exc).__name__}: {str(exc)[:300]})", file=sys.stderr)
        return 3
    if x.ndim != 2:
        print(f"outputs/predictions.h5ad: X has {x.ndim} dimensions; expected (rows, genes)", file=sys.stderr)
        return 3
    OUT.mkdir(parents=True)
    np.save(OUT / "X.npy", x, allow_pickle=False)
    (OUT / "labels.json").write_text(json.dumps(labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
