"""Evaluation: passkey accuracy grids (paper Fig. 8), ROUGE by input length (Table II), long-context loss by token
position, their pictures, and the MLflow conventions that `dashboards/` reads.

    from condensation.evaluate import passkey_grid, plot_passkey_heatmap
    grid = passkey_grid(model, tokenizer, lengths=[2048, 4096], depths=[0, .25, .5, .75, 1], n_per_cell=10)
    print(grid.format_table()); plot_passkey_heatmap(grid, "heatmap.png", trained_length=2048)

    from condensation.evaluate import loss_by_position, plot_loss_by_position, token_windows
    curve = loss_by_position(model, token_windows(tokenizer, "heldout.jsonl", 65536, n=8), bin_tokens=512)
    print(curve.format_table()); plot_loss_by_position([curve], "loss.png", trained_length=8192)

    from condensation.evaluate import generate_summaries, rouge_by_length, format_rouge_table
    result = rouge_by_length(generate_summaries(model, tokenizer, prompts), references, input_lengths)
"""

from .long_context import LossCurve, format_curves_table, loss_by_position, token_windows
from .passkey import PasskeyGrid, cell_passkeys, digit_accuracy, parse_digits, passkey_grid
from .plots import (
    passkey_table_html,
    plot_loss_by_position,
    plot_passkey_heatmap,
    plot_passkey_matrix,
    plot_rouge_by_length,
    plot_rouge_overall,
    plot_stage_summary,
)
from .rouge import (
    DEFAULT_BUCKETS,
    ROUGE_TYPES,
    buckets_from_edges,
    format_rouge_table,
    generate_summaries,
    rouge_by_length,
    rouge_from_metrics,
    rouge_metrics,
)
from .tracking import load_passkey_grids, load_rouge_runs, log_loss_curves, log_passkey_grid, log_rouge, log_rouge_comparison

__all__ = [
    "DEFAULT_BUCKETS",
    "LossCurve",
    "PasskeyGrid",
    "ROUGE_TYPES",
    "cell_passkeys",
    "digit_accuracy",
    "format_curves_table",
    "format_rouge_table",
    "generate_summaries",
    "load_passkey_grids",
    "log_loss_curves",
    "log_passkey_grid",
    "loss_by_position",
    "parse_digits",
    "passkey_grid",
    "passkey_table_html",
    "plot_loss_by_position",
    "plot_passkey_heatmap",
    "plot_passkey_matrix",
    "plot_rouge_by_length",
    "plot_rouge_overall",
    "plot_stage_summary",
    "buckets_from_edges",
    "load_rouge_runs",
    "log_rouge",
    "log_rouge_comparison",
    "rouge_by_length",
    "rouge_from_metrics",
    "rouge_metrics",
    "token_windows",
]
