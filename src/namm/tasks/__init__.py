"""Benchmark tasks and metrics: synthetic long-context tasks (passkey, RULER NIAH, KV retrieval, variable
tracking) generated at any token length, and the 21 LongBench tasks.

>>> from namm.tasks import get_task
>>> task = get_task("passkey")
>>> sample = task.samples(1, length=512)[0]
>>> task.score("The pass key is " + sample.answers[0], sample)
1.0
"""

from namm.tasks.base import Sample, Task, count_tokens, get_task, list_tasks, register
from namm.tasks.longbench import LongBenchTask, truncate_middle
from namm.tasks.synthetic import SyntheticTask

__all__ = ["LongBenchTask", "Sample", "SyntheticTask", "Task", "count_tokens", "get_task", "list_tasks",
           "register", "truncate_middle"]
