"""The main job in one call: compile a small transformer MLP block, run it, check it
against eager, and show the queue and the head of the generated kernel."""

from __future__ import annotations

import time

import torch

import mkcompiler


class MLPBlock(torch.nn.Module):
    """Pre-norm transformer MLP block: x + down(silu(gate(norm(x))) * up(norm(x)))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = torch.nn.RMSNorm(dim, eps=1e-6)
        self.gate = torch.nn.Linear(dim, hidden, bias=False)
        self.up = torch.nn.Linear(dim, hidden, bias=False)
        self.down = torch.nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


class TinyTransformerMLP(torch.nn.Module):
    def __init__(self, dim: int = 64, hidden: int = 128, layers: int = 2):
        super().__init__()
        self.blocks = torch.nn.ModuleList(MLPBlock(dim, hidden) for _ in range(layers))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def main() -> int:
    on_gpu = torch.cuda.is_available() and not mkcompiler.api.os.environ.get("TRITON_INTERPRET") == "1"
    device = "cuda" if on_gpu else "cpu"
    torch.manual_seed(0)
    model = TinyTransformerMLP().to(device)
    x = torch.randn(4, 64, device=device)
    t0 = time.perf_counter()
    mk = mkcompiler.compile(model, (x,))
    t1 = time.perf_counter()
    print(f"compiled in {t1 - t0:.2f} s for {device} ({'GPU' if on_gpu else 'Triton interpreter'}): {mk}")
    x = torch.randn(4, 64, device=device)  # fresh inputs, not the example ones
    mk.poison()
    out = mk(x)
    ref = model(x)
    err = ((out - ref).norm() / ref.norm()).item()
    ok = err <= 1e-4
    print(f"ran in {time.perf_counter() - t1:.2f} s; relative error vs eager: {err:.2e} ({'OK' if ok else 'MISMATCH'})")
    print("\ninstruction queue (first 16 rows):")
    print(mk.queue.table(16))
    print("\ngenerated kernel (head):")
    print("\n".join(mk.source.splitlines()[:40]))
    print("...")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
