"""What a run leaves on disk: config, metrics, summary, adapter, plots."""

from fedlora.outputs.plots import plot_comparison, plot_run
from fedlora.outputs.run_dir import RunDir, best_row, read_metrics

__all__ = ["RunDir", "best_row", "plot_comparison", "plot_run", "read_metrics"]
