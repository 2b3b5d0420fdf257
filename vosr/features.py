"""(HR crop, LR crop) -> (HR latent, LR latent, semantic tokens): the one encoding function.

Used identically by the materialised precompute, the online dataset and training validation, so both data modes
give the same tensors (docs/method.md s0). Following the reference (docs/method.md s2-3):
- HR and LR are mapped to [-1, 1], concatenated along the batch and encoded in one fp32 autoencoder call
  (posterior sample by default);
- the semantic encoder sees the x4-upsampled LR in [0, 1] (it resizes to its input size itself).

`generator` is either one torch.Generator for the whole batch (the reference's behaviour) or a list with one
generator per sample. With a list, a stochastic autoencoder encodes each sample's (HR, LR) pair on its own so that
its posterior noise depends only on that sample's generator, never on the batch it happens to be in; deterministic
autoencoders (the pixel codec, or posterior mode) still run as one batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _is_stochastic(autoencoder) -> bool:
    return bool(getattr(autoencoder, "sample_default", False))


def encode_views(autoencoder, semantic, hr01: torch.Tensor, lr01: torch.Tensor,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hr01, lr01: [B, 3, H, W] in [0, 1] (LR already at HR size). Returns float32 (hr_latent, lr_latent, tokens)."""
    if hr01.shape != lr01.shape:
        raise ValueError(f"HR {tuple(hr01.shape)} and LR {tuple(lr01.shape)} must have the same shape (the LR is "
                         "pre-upsampled to HR size, docs/method.md s1)")
    b = hr01.shape[0]
    hr = hr01.float() * 2 - 1
    lr = lr01.float() * 2 - 1
    with torch.no_grad():
        if isinstance(generator, (list, tuple)):
            if len(generator) != b:
                raise ValueError(f"encode_views got {b} samples but {len(generator)} generators")
            if _is_stochastic(autoencoder):
                hz, lz = [], []
                for i in range(b):
                    z = autoencoder.encode(torch.cat([hr[i:i + 1], lr[i:i + 1]]), generator=generator[i])
                    hz.append(z[:1])
                    lz.append(z[1:])
                hr_lat, lr_lat = torch.cat(hz), torch.cat(lz)
            else:
                z = autoencoder.encode(torch.cat([hr, lr]))
                hr_lat, lr_lat = z[:b], z[b:]
        else:
            z = autoencoder.encode(torch.cat([hr, lr]), generator=generator)
            hr_lat, lr_lat = z[:b], z[b:]
        tokens = semantic(lr01.float())
    return hr_lat.float(), lr_lat.float(), tokens.float()
