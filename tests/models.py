"""Small models the tests (CPU and GPU) compile."""

import torch


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


class MLPBlock(torch.nn.Module):
    """Pre-norm transformer MLP block: x + down(silu(gate(rmsnorm(x))) * up(rmsnorm(x)))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = torch.nn.RMSNorm(dim, eps=1e-6)
        self.gate = torch.nn.Linear(dim, hidden, bias=False)
        self.up = torch.nn.Linear(dim, hidden, bias=False)
        self.down = torch.nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


class TransformerMLP(torch.nn.Module):
    def __init__(self, dim: int = 32, hidden: int = 64, layers: int = 2):
        super().__init__()
        self.blocks = torch.nn.ModuleList(MLPBlock(dim, hidden) for _ in range(layers))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x
