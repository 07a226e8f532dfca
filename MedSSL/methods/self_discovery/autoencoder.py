"""The self-discovery auto-encoder (a small Genesis U-Net with its skips zeroed, so the bottleneck must
carry the volume) and the pooled bottleneck features of volumes (V, X, Y, Z) -> (V, 16 w).

Its training stays a plain 20-line Adam loop rather than :class:`~MedSSL.engine.loop.TrainingLoop`: that
loop's AMP, learning-rate schedule, gradient clipping and checkpoints would change the features (and so
the cached patterns) of existing runs, and a few hundred steps on a small grid need none of them.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from MedSSL.models.genesis_unet import GenesisUNet


def bottleneck_features(net: GenesisUNet, small: np.ndarray, device, batch: int = 4) -> np.ndarray:
    feats = []
    was_training = net.training
    net.eval()
    with torch.no_grad():
        for i in range(0, len(small), batch):
            x = torch.from_numpy(np.asarray(small[i:i + batch], dtype=np.float32)).unsqueeze(1).to(device)
            b, _ = net.encode(x)
            feats.append(b.float().mean(dim=(2, 3, 4)).cpu().numpy())
    net.train(was_training)
    return np.concatenate(feats).astype(np.float32)


def train_autoencoder(small: np.ndarray, width: int, steps: int, batch: int, lr: float, device,
                      seed: int, log: Callable[[str], None] = print) -> GenesisUNet:
    """A GenesisUNet auto-encoder (skips zeroed) trained ``steps`` Adam steps on (V, X, Y, Z) [0, 1] volumes."""
    torch.manual_seed(seed)
    net = GenesisUNet(1, 1, width).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    data = torch.from_numpy(np.asarray(small, dtype=np.float32)).unsqueeze(1)
    net.train()
    report = max(1, steps // 5)
    first = None
    for step in range(int(steps)):
        idx = np.sort(rng.integers(0, len(data), size=min(batch, len(data)) if len(data) > 1 else 2))
        x = data[idx].to(device)
        bottleneck, skips = net.encode(x)
        out = net.out_tr(net.decode(bottleneck, [torch.zeros_like(s) for s in skips]))
        loss = F.mse_loss(torch.sigmoid(out.float()), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
        if (step + 1) % report == 0 or step + 1 == steps:
            log(f"self-discovery auto-encoder: step {step + 1}/{steps}, MSE {float(loss.detach()):.4f} (first {first:.4f})")
    return net
