"""A digit classifier that scores samples of the bundled digits: how often it recognises the
requested digit is the quality figure of ``ditfast demo`` and of the Gflops study
(``benchmarks/bench_gflops_fid.py``)."""

from __future__ import annotations

import torch

from .digits import load_digits

__all__ = ["DigitClassifier"]


class DigitClassifier:
    """Multinomial logistic regression on real digit pixels (the same 16x16 [-1, 1] domain as the
    samples), trained with full-batch L-BFGS on a fixed 80% split; ``accuracy`` is on the rest."""

    def __init__(self, image_size: int, seed: int = 0):
        x, y = load_digits(image_size)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        cut = int(0.8 * len(y))
        train, held = perm[:cut], perm[cut:]
        feats = x.flatten(1).double()
        self.weight = torch.zeros(feats.shape[1], 10, dtype=torch.float64, requires_grad=True)
        self.bias = torch.zeros(10, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([self.weight, self.bias], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(self._logits(feats[train]), y[train])
            loss = loss + 1e-3 * self.weight.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.accuracy = self.score(x[held], y[held])

    def _logits(self, feats: torch.Tensor) -> torch.Tensor:
        return feats @ self.weight + self.bias

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self._logits(images.flatten(1).double().cpu()).argmax(1)

    def score(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        return (self.predict(images) == labels.cpu()).double().mean().item()
