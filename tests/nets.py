"""Small models shared by several test modules."""
from torch import nn


class MLP(nn.Module):
    """fc1 (16 -> 32) -> GELU -> fc2 (32 -> 8): two Linear-input sites."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))
