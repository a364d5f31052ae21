"""Image history buffer (Shrivastava et al. 2017), as CycleGAN uses for D's fake inputs."""

from __future__ import annotations

import torch
from torch import Tensor


class ImagePool:
    """Holds up to `size` past fakes. Each query image is returned as is while the pool fills;
    afterwards, with probability 1/2, a random stored image is returned and replaced by it.
    Random draws use the torch RNG of this process, which checkpoints restore."""

    def __init__(self, size: int):
        self.size = size
        self.images: Tensor | None = None  # (count, C, H, W)

    def query(self, images: Tensor) -> Tensor:
        if self.size == 0:
            return images
        images = images.detach()
        out = []
        for img in images:
            img = img.unsqueeze(0)
            count = 0 if self.images is None else len(self.images)
            if count < self.size:
                self.images = img.clone() if self.images is None else torch.cat([self.images, img])
                out.append(img)
            elif torch.rand(()) < 0.5:
                i = int(torch.randint(0, self.size, ()))
                out.append(self.images[i : i + 1].clone())
                self.images[i : i + 1] = img
            else:
                out.append(img)
        return torch.cat(out)

    def state(self) -> Tensor:
        return torch.zeros(0) if self.images is None else self.images.detach().cpu().clone()

    def load(self, images: Tensor, device: torch.device) -> None:
        self.images = images.to(device).clone() if images.numel() else None
