"""Small models the tests (CPU and GPU) compile."""

import torch

from mkcompiler.tools.demo import MLPBlock, TinyTransformerMLP  # noqa: F401  (MLPBlock re-exported)


class ResidualMLP(torch.nn.Module):
    """3 Linear layers with residual connections and different activations."""

    def __init__(self, dim: int = 32, hidden: int = 48):
        super().__init__()
        self.fc1 = torch.nn.Linear(dim, hidden)
        self.fc2 = torch.nn.Linear(hidden, hidden)
        self.fc3 = torch.nn.Linear(hidden, dim)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = h + torch.nn.functional.gelu(self.fc2(h))
        return x + self.fc3(h)


class TransformerMLP(TinyTransformerMLP):
    """The demo's pre-norm transformer MLP stack, with the tests' default sizes."""

    def __init__(self, dim: int = 32, hidden: int = 64, layers: int = 2):
        super().__init__(dim, hidden, layers)
