"""What a method is: named nets and a list of phases. The loop knows nothing else about it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor, nn

Nets = dict[str, nn.Module]
Batch = dict[str, Tensor]
LossFn = Callable[[Nets, Batch, dict[str, Tensor]], dict[str, Tensor]]


@dataclass(frozen=True)
class Phase:
    """One player's update. `loss(nets, batch, prev)` returns a dict whose "loss" entry is
    backpropagated; 0-dim entries are logged; other tensors are handed to the next phase as
    `prev` (e.g. CycleGAN's G phase passes its fakes to the D phase). `prev["progress"]` is
    the fraction of the run done before this step (0-dim), for weights that follow a schedule."""

    name: str                      # "D" or "G": also the log prefix
    nets: tuple[str, ...]          # nets this phase trains; all others are frozen during it
    loss: LossFn
    lr: float                      # base learning rate (the schedule multiplies it)
    betas: tuple[float, float] = (0.5, 0.999)  # Adam betas (ignored by RMSprop)
    repeats: int = 1               # e.g. n_critic for the D phase
    new_batch: bool = True         # draw a fresh batch for each repeat (else reuse the last)
    after_step: Callable[[Nets], None] | None = None  # e.g. WGAN weight clipping
    is_generator: bool = False     # EMA is updated after this phase
    # Losses of the same step whose graphs are apart from `loss`'s, each backpropagated before
    # the next is built (then `loss`, last), so only one graph's activations are alive at a time
    # (CUT's identity terms: ~140 MB less at 128 px). Their gradients add up; their logged
    # values add to `loss`'s under the same keys. A part may return no "loss" (only logs).
    parts: tuple[LossFn, ...] = ()


class Method(Protocol):
    nets: Nets                     # all trainable nets by paper name (G_ab, D_b, G, D, ...)
    phases: list[Phase]
    generators: dict[str, dict[str, Any]]  # exported nets -> metadata (domains, kind, ...)
    # Optional `compile_pays: bool`: torch.compile was measured (bench/speed.py) to make this
    # method's steps faster; only then does train.compile "auto" turn it on.
    # Optional `bind_optimizers(optimizers: {phase name: optimizer})`: called by the loop once
    # the optimizers are prepared (the full unrolled GAN starts from D's optimizer state).

    def sample(self, nets: Nets, fixed: Batch) -> Tensor:
        """A grid of images (N, C, H, W) in [-1, 1] for the sample PNG (or a 2-D plot)."""
        ...

    def fixed_batch(self, dataset: Any, n: int, seed: int) -> Batch:
        """Inputs kept fixed across the run so sample grids are comparable over time."""
        ...

    def state(self) -> dict[str, Tensor]:
        """Per-process state to checkpoint (e.g. image pools); {} if none."""
        ...

    def load_state(self, state: dict[str, Tensor]) -> None: ...


@dataclass(frozen=True)
class CodedSampling:
    """What `translate sample` needs of a G that reads codes beside z (cgan's class, infogan's
    codes): a free z alone would leave its input space, so it draws through these."""

    flag: str      # the sample option that picks the codes: "--class" or "--vary-code"
    usage: str     # the option as the errors name it, e.g. "--class NAME"
    needs: str     # what the option needs, for the error on another run ("an infogan run")
    picture: str   # the picture's name without the option ("classes": one row per class)
    grid: Callable[..., Any]  # (cfg, G, n, generator, option value) -> HxWxC uint8 grid
    # (cfg, G, generator, option value) -> [(subfolder or "", draw(k) -> k images)]: what
    # `sample --separate` writes
    separate: Callable[..., list]


@dataclass(frozen=True)
class MethodSpec:
    """Registry entry: the method's config dataclass, its builder and its recipe checks.
    `resolve` fills in settings found from the data when a recipe is loaded (cgan's class names),
    so config.json holds them and a finished run needs no data to be sampled or exported."""

    config: type
    build: Callable[[Any], Method]
    check: Callable[[Any], None] = field(default=lambda cfg: None)
    resolve: Callable[[Any], Any] = field(default=lambda cfg: cfg)
    # Image-to-image: its generators translate domain A to B ("G_ab") and maybe back ("G_ba"),
    # so `translate eval` scores a run on testA/testB and `translate demo` can train it.
    image_to_image: bool = False
    # G(z) with z ~ N(0, I) alone: periodic KID scoring and GAN inversion draw such a z.
    gaussian_latent: bool = False
    coded: CodedSampling | None = None  # G also reads codes: how `translate sample` draws it
