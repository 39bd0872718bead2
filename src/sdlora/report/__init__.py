"""The run's HTML report: one self-contained file that opens offline in any browser.

`write_report(run_dir)` (re)writes `run_dir/report.html` from whatever the run folder holds:
the resolved config, curves from metrics.jsonl (loss and its running mean, validation loss,
gradient norms per parameter group, learning rates, machine load, throughput), the sample
grids of each validation step, the LoRA-vs-baseline images of samples.json and the score
table of scores.json. Plots are inline SVG drawn here (no plotting dependency); images are
downscaled JPEG thumbnails embedded as data URIs, so the file can be mailed or archived alone.
A part the run does not have yet is shown as "not yet"; a part that cannot be read is named
with the reason. The CLI refreshes it after `train`, `sample` and `score`
(`sdlora.cli._common.refresh_report`); `sdlora report` on demand.

  plots.py     inline SVG line plots
  parts.py     thumbnails, numbers and the Section record every section uses
  training.py  curves from metrics.jsonl, the validation samples of each step
  results.py   LoRA vs base model (samples.json), scores (scores.json), LoRA files, config
  page.py      the page: sections in order, style, header; write_report
"""

from sdlora.report.page import SECTIONS, render_report, write_report
from sdlora.report.plots import Series, line_plot, nice_ticks

__all__ = ["SECTIONS", "Series", "line_plot", "nice_ticks", "render_report", "write_report"]
