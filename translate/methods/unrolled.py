"""Unrolled GAN (Metz et al. 2017): the generator is judged by the discriminator it would face
after D took k more steps, which penalises generators that only fool the current D by jumping
to the mode it is weakest on, the mechanism of mode collapse.

Two variants (model.unrolled_backprop):
- `unroll` (false, the cheap, common one): the k steps run on a fresh copy of D with a fresh
  optimizer and the generator's gradient does NOT flow back through them. The copy is rebuilt
  from D's registry kind and config and loaded with its state dict.
- `unroll_through` (true, the paper's): the k steps start from D's optimizer state and are
  written as differentiable functions of D's weights (torch.func.functional_call), so G's
  gradient includes how D's answer would move; second-order terms, ~k times D's memory.
Either way the real D, its buffers and its optimizer state are never touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from translate.nets import build_net

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def unwrap(net: nn.Module) -> nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(net, "module", None) or getattr(net, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return net
        net = inner


def copy_net(net: nn.Module) -> nn.Module:
    """A new module of the same architecture holding the same weights and buffers (spectral
    norm's power-iteration vectors included)."""
    net = unwrap(net)
    twin = build_net(net.kind, **net.config)
    twin.load_state_dict(net.state_dict())
    param = next(net.parameters())
    return twin.to(param.device).train(net.training)


def unroll(D: nn.Module, d_loss: Callable[[nn.Module, int], Tensor], steps: int,
           make_optimizer: OptimizerFactory, after_step: Callable[[nn.Module], None] | None
           ) -> nn.Module:
    """A copy of D after `steps` optimizer steps on `d_loss(D_copy, i)` (i = 0 .. steps-1),
    frozen, ready to judge the generator."""
    D_k = copy_net(D).requires_grad_(True)
    params = [p for p in D_k.parameters() if p.requires_grad]
    opt = make_optimizer(params)
    for i in range(steps):
        # autograd.grad, not backward: nothing outside the copy (G's .grad) can be written to.
        grads = torch.autograd.grad(d_loss(D_k, i), params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        if after_step is not None:
            after_step(D_k)
    return D_k.requires_grad_(False)


# ----------------------------------------------------------------- the full method (Metz et al.)

# Floor under Adam's / RMSprop's second moment before its square root: an entry that never had
# a gradient (0) would otherwise give the square root's infinite slope, and 0 x inf = NaN in
# G's gradient. 1e-30 moves sqrt(v) by 1e-15, far below eps (1e-8).
_TINY = 1e-30


def _adam_rule(p: Tensor, g: Tensor, st: dict, group: dict) -> tuple[Tensor, dict]:
    """torch.optim.Adam's update (no amsgrad), written with differentiable ops."""
    b1, b2 = group["betas"]
    if group["weight_decay"]:
        g = g + group["weight_decay"] * p
    step = st.get("step", 0.0) + 1.0
    m = b1 * st.get("exp_avg", 0.0) + (1 - b1) * g
    v = b2 * st.get("exp_avg_sq", 0.0) + (1 - b2) * g * g
    denom = v.clamp_min(_TINY).sqrt() / math.sqrt(1 - b2**step) + group["eps"]
    return p - group["lr"] / (1 - b1**step) * m / denom, {"step": step, "exp_avg": m,
                                                          "exp_avg_sq": v}


def _rmsprop_rule(p: Tensor, g: Tensor, st: dict, group: dict) -> tuple[Tensor, dict]:
    """torch.optim.RMSprop's update (not centered, no momentum), written with differentiable ops."""
    if group["weight_decay"]:
        g = g + group["weight_decay"] * p
    a = group["alpha"]
    sq = a * st.get("square_avg", 0.0) + (1 - a) * g * g
    return p - group["lr"] * g / (sq.clamp_min(_TINY).sqrt() + group["eps"]), {"square_avg": sq}


_RULES = {torch.optim.Adam: _adam_rule, torch.optim.RMSprop: _rmsprop_rule}


def _start(net: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Callable, dict, dict]:
    """(update rule, {name: param group}, {name: state}) of D's parameters in its optimizer:
    the groups hold the live learning rate and betas; the states, the moments and step count
    (detached, so the real state is never part of the graph or written to)."""
    opt = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's wrapper
    rule = next((r for kind, r in _RULES.items() if isinstance(opt, kind)), None)
    if rule is None:
        raise TypeError(f"the full unrolled GAN knows Adam's and RMSprop's updates, not "
                        f"{type(opt).__name__}'s")
    unknown = [k for k in ("amsgrad", "maximize", "centered", "momentum")
               if any(g.get(k) for g in opt.param_groups)]
    if unknown:
        raise TypeError(f"the full unrolled GAN does not write out {', '.join(unknown)}")
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    groups, states = {}, {}
    for name, p in net.named_parameters():
        if id(p) not in group_of:
            raise ValueError(f"D's parameter {name} is not in the optimizer handed over")
        groups[name] = group_of[id(p)]
        states[name] = {k: (float(v) if k == "step" else v.detach())
                        for k, v in opt.state.get(p, {}).items()}
    return rule, groups, states


def unroll_through(D: nn.Module, d_loss: Callable[[Callable[[Tensor], Tensor], int], Tensor],
                   steps: int, optimizer: torch.optim.Optimizer, clip_value: float | None
                   ) -> Callable[[Tensor], Tensor]:
    """D after `steps` steps of its optimizer on `d_loss(D_i, i)`, as a function whose output
    keeps the graph of every step: G's gradient flows through the k updates (the second-order
    term of Metz et al. 2017). The steps start from D's weights and its optimizer's moments,
    step count and learning rate, as the paper's do, and apply the optimizer's own rule (Adam
    or RMSprop; WGAN's clipping after each step when `clip_value` is set). D's weights, its
    buffers (copied: BatchNorm's statistics, spectral norm's vectors) and the optimizer are
    not written to."""
    net = unwrap(D)
    rule, groups, states = _start(net, optimizer)
    params = {n: p.detach().requires_grad_(True) for n, p in net.named_parameters()}
    buffers = {n: b.clone() for n, b in net.named_buffers()}

    def judge(weights: dict[str, Tensor]) -> Callable[[Tensor], Tensor]:
        return lambda x: functional_call(net, (weights, buffers), (x,))

    for i in range(steps):
        grads = torch.autograd.grad(d_loss(judge(params), i), list(params.values()),
                                    create_graph=True, allow_unused=True)
        new = {}
        for (name, p), g in zip(params.items(), grads):
            if g is None:  # as torch's optimizers: a parameter without a gradient stays
                new[name] = p
                continue
            new[name], states[name] = rule(p, g, states[name], groups[name])
            if clip_value is not None:
                new[name] = new[name].clamp(-clip_value, clip_value)
        params = new
    return judge(params)
