"""Quickstart: compile a model of your own into one megakernel and inspect it.

    python examples/quickstart.py

Without a GPU this runs in the Triton interpreter on the CPU (slow, tiny shapes)."""

import torch

import mkcompiler

device = "cuda" if torch.cuda.is_available() else "cpu"


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(32)
        self.fc1 = torch.nn.Linear(32, 64)
        self.fc2 = torch.nn.Linear(64, 32)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


torch.manual_seed(0)
model = Model().to(device)
x = torch.randn(8, 32, device=device)
mk = mkcompiler.compile(model, (x,))
out = mk(x)
print("max abs error vs eager:", (out - model(x)).abs().max().item())
print(mk.queue.table(10))  # index, worker, opcode, tile, waits, signals
print(f"DAG: {len(mk.dag)} tile tasks, {mk.dag.number_of_edges()} dependencies")
print(mk.source[:600])  # the generated persistent kernel (standalone Triton source)
