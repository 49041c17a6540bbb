"""notebooks/quickstart.ipynb (recsys_dpo.api) executes top to bottom and shows the comparison
table; the copy in the repository is saved with its outputs, and the README links it."""

import os

import nbformat
from nbclient import NotebookClient

from tests.conftest import ROOT


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("RECSYS_DPO_WORKDIR", str(tmp_path))
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={
        "metadata": {"path": str(ROOT / "notebooks")}}).execute()  # fmt: skip
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    # the policy-vs-reference table, with the CI columns, rendered inline
    assert "ci_lo" in html and "ndcg_at_10" in html and "significant" in html
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # training curves + the three evaluation plots
    assert (tmp_path / "mlflow.db").is_file() and os.listdir(tmp_path / "artifacts" / "bundles")


def test_the_saved_notebook_has_its_outputs_and_the_readme_links_it():
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None and cell.outputs for cell in code)
    assert not [o for cell in code for o in cell.outputs if o.output_type == "error"]
    assert "(notebooks/quickstart.ipynb)" in (ROOT / "README.md").read_text()
