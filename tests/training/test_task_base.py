"""What the task modules share (cellrep.training.tasks.base): one table, one base, one map to cell types."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from cellrep.errors import CellrepError
from cellrep.training.tasks import TASKS
from cellrep.training.tasks.base import Task


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_is_a_task_with_its_own_encoder(name):
    cls = TASKS[name][0]
    assert issubclass(cls, Task) and cls.probe_backbone is not Task.probe_backbone


def test_cell_types_come_from_the_index_rows_and_a_context_needs_them():
    task = Task()
    task.register_groups(torch.tensor([2, 0, 1, 1]))
    context = nn.Identity()
    assert task.cell_types_at(torch.tensor([3, 0]), context).tolist() == [1, 2]
    assert task.cell_types_at(None, None) is None  # no context: no cell types
    with pytest.raises(CellrepError, match="batch has no index"):
        task.cell_types_at(None, context)
    assert "group_of_index" not in task.state_dict()  # rebuilt from the data, never saved
