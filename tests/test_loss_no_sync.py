"""The chunked causal-LM loss's accelerator path (ignored rows masked, no host read) against its CPU path (ignored
rows dropped) and against full-logits cross-entropy: values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unipeft.training import losses


@pytest.mark.parametrize("num_items", [None, 37])
def test_masked_path_equals_dropped_rows_and_full_logits(monkeypatch, num_items):
    torch.manual_seed(0)
    B, T, d, V = 3, 11, 8, 50
    h = torch.randn(B, T, d, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, d, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (B, T))
    y[0, :4] = -100  # a prompt
    y[2, 7:] = -100  # padding
    n = None if num_items is None else torch.tensor(num_items)

    def run(free: bool):
        monkeypatch.setattr(losses, "reads_are_free", lambda device: free)
        loss = losses.chunked_lm_loss(h, W, y, bias=b, chunk=5, num_items_in_batch=n)
        grads = torch.autograd.grad(loss * 1.7, (h, W, b))
        return loss.detach(), grads

    masked, dropped = run(False), run(True)
    z = F.linear(h, W, b)[:, :-1].reshape(-1, V)
    ref = F.cross_entropy(z, y[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    ref = ref / (num_items if num_items is not None else (y[:, 1:] != -100).sum())
    ref_grads = torch.autograd.grad(ref * 1.7, (h, W, b))
    for got in (masked, dropped):
        torch.testing.assert_close(got[0], ref.detach(), rtol=1e-12, atol=0)
        for g, r in zip(got[1], ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_masked_path_reads_nothing_back(monkeypatch):
    """No value of a tensor is read by the accelerator path (each read would wait for the GPU)."""
    monkeypatch.setattr(losses, "reads_are_free", lambda device: False)
    h = torch.randn(2, 6, 4, requires_grad=True)
    W = torch.randn(9, 4, requires_grad=True)
    y = torch.randint(0, 9, (2, 6))
    y[1, 3:] = -100
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "cpu"):
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, __o=orig, __n=name, **k: (reads.append(__n),
                                                                                          __o(self, *a, **k))[1])
    loss = losses.chunked_lm_loss(h, W, y, chunk=4)
    loss.backward()
    monkeypatch.undo()
    assert reads == [], reads
    assert torch.isfinite(loss) and h.grad is not None and h.grad[1, 2:].abs().sum() == 0  # ignored rows: none
