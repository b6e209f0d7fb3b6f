"""harness: offline HumanEval and MBPP, sandboxed execution, pass@k, latency and memory."""
from harness.evaluate import EvalConfig, evaluate, summary_table
from harness.execute import compare_runs, execute_samples, read_jsonl, score, write_jsonl
from harness.metrics import bootstrap_mean, mcnemar_exact, paired_comparison, pass_at_k
from harness.sandbox import ExecResult, IsolatedProgram, Limits, Sandbox
from harness.sanitize import sanitize
from harness.tasks import TASKS, Problem, Task, get_task

__all__ = [
    "EvalConfig", "compare_runs", "evaluate", "summary_table", "execute_samples", "read_jsonl", "score", "write_jsonl",
    "bootstrap_mean", "mcnemar_exact", "paired_comparison", "pass_at_k", "ExecResult", "IsolatedProgram", "Limits",
    "Sandbox", "sanitize", "TASKS", "Problem", "Task", "get_task",
]
