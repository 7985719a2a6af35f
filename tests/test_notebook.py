"""Execute experiments/notebooks/funnel_tour.ipynb end to end, so that it cannot rot."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "experiments" / "notebooks" / "funnel_tour.ipynb"


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.data.get("text/plain", ""))
    return "".join(parts)


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def test_notebook_runs_end_to_end():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError on any failing cell
    text = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
    # The attention maps shrink block by block: 16x16, 8x16 (pooled queries), 4x8, decoder 16x16.
    assert "(2, 2, 16, 16), (2, 2, 8, 16), (2, 2, 4, 8), (2, 2, 16, 16)" in text
    assert "block lengths (config.pooled_lengths): (16, 8, 4)" in text
    # The fine-tuning cell returned its eval results and the best model was reloaded.
    assert "'accuracy':" in text
    assert "FunnelForSequenceClassification" in text
    images = [
        out
        for c in nb.cells
        if c.cell_type == "code"
        for out in c.outputs
        if out.output_type == "display_data" and "image/png" in out.data
    ]
    assert len(images) == 1  # the attention-map figure
