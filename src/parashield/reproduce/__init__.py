"""The paper reproduction: tasks, the cached experiment runner and the report writer."""

from .report import write_report
from .runner import METHODS, QUICK_METHODS, run
from .tasks import TASKS, Task

__all__ = ["METHODS", "QUICK_METHODS", "TASKS", "Task", "run", "write_report"]
