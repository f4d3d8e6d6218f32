import os

os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch
from torch import nn


@pytest.fixture
def mlp():
    """A small MLP with three prunable layers of different sizes (like LeNet-300-100 scaled down)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 40), nn.ReLU(), nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 5))


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 6 * 6, 4))
