"""Review of the chunked loss's masked path (accelerators: ignored rows computed, then masked instead of dropped):
an ignored row whose logits are not finite (a padding position overflowing in half precision, say) must count
for nothing, as it does on the dropping path, not turn the loss and gradients into NaN."""

from __future__ import annotations

import torch

from unipeft.training import losses


def test_masked_path_ignores_nonfinite_ignored_rows(monkeypatch):
    torch.manual_seed(0)
    h = torch.randn(2, 5, 8, dtype=torch.float64)
    W = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 11, (2, 5))
    y[0, 1] = y[1, 4] = -100
    h[0, 1] = float("inf")  # ignored rows: one overflowed, one NaN
    h[1, 4] = float("nan")
    hd = h.clone().requires_grad_(True)
    want = losses.chunked_lm_loss(hd, W, y, chunk=3, shift=False)  # CPU: the ignored rows are dropped
    want.backward()
    gW, gh = W.grad.clone(), hd.grad.clone()
    W.grad = None
    hm = h.clone().requires_grad_(True)
    monkeypatch.setattr(losses, "reads_are_free", lambda device: False)
    got = losses.chunked_lm_loss(hm, W, y, chunk=3, shift=False)
    got.backward()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(W.grad, gW, rtol=0, atol=1e-12)
    torch.testing.assert_close(hm.grad, gh, rtol=0, atol=1e-12)
    assert hm.grad[0, 1].eq(0).all() and hm.grad[1, 4].eq(0).all()
