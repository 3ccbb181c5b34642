"""`sleepbot compare`: sleep strategies x seeds x workloads, with a tuned no-sleep baseline, judged honestly.

The protocol (AlgoPerf / NiNo, see PRIOR_ART.md):

1. Per workload (dataset, architecture, optimizer), the no-sleep baseline is tuned first: every learning rate of a
   grid is trained on a few seeds, and the lr with the best median final validation accuracy (ties: the one whose
   runs reach that accuracy in fewer median steps) is used by every arm. A speedup over an untuned baseline is
   mostly a learning-rate effect.
2. Every arm runs the same seeds. The no-sleep arm runs first and is recorded, because the `oracle` control jumps
   to the weights its own seed's no-sleep run had `horizon` snapshots later.
3. The target is the no-sleep arm's median final validation accuracy (unless the config fixes one); a run that
   never reaches it counts as `miss_factor` x the step budget.
4. Per arm: median steps to target with a bootstrap CI, the speedup over no sleep with a paired bootstrap CI and a
   Wilcoxon signed-rank p-value, best and final test accuracy, the area under the validation curve and the
   wall-clock of training including the cost of sleeping; the learned arm's step saving as a fraction of the
   oracle's.

Resumable: each run's result is a JSON file under `<out>/runs/` whose name carries a hash of everything that
changes the run's numbers (its config, a forecaster's contents, the source of the training and sleep code), so a
rerun skips finished runs and never confuses runs of different configs or code versions.
"""

from sleepbot.compare.config import (
    Arm,
    BaseOptimizer,
    CompareConfig,
    Workload,
    load_compare_config,
    log_grid,
    parse_compare_config,
)
from sleepbot.compare.harness import check_arms, code_digest, compare, compare_task, run_stem
from sleepbot.compare.stats import (
    CSV_COLUMNS,
    PAIR_HEADER,
    RESULTS_SCHEMA,
    TABLE_HEADER,
    choose_lr,
    format_table,
    load_results,
    load_runs,
    pair_rows,
    summarize_comparison,
    table_notes,
    table_rows,
)

__all__ = [
    "CSV_COLUMNS",
    "PAIR_HEADER",
    "RESULTS_SCHEMA",
    "TABLE_HEADER",
    "Arm",
    "BaseOptimizer",
    "CompareConfig",
    "Workload",
    "check_arms",
    "choose_lr",
    "code_digest",
    "compare",
    "compare_task",
    "format_table",
    "load_compare_config",
    "load_results",
    "load_runs",
    "log_grid",
    "pair_rows",
    "parse_compare_config",
    "run_stem",
    "summarize_comparison",
    "table_notes",
    "table_rows",
]
