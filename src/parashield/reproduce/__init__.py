"""The paper reproduction: tasks (datasets, models, references), the protocol runner with its
cache, the statistics and findings, and the report writer."""

from .runner import METHODS, QUICK_METHODS, run
from .tasks import TASKS, Task


def write_report(results: dict, out):  # the report imports plotting lazily; keep the import light
    from .report import write_report as _write

    return _write(results, out)


__all__ = ["METHODS", "QUICK_METHODS", "TASKS", "Task", "run", "write_report"]
