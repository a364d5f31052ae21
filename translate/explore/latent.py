"""Latent vector arithmetic (Radford et al. 2016, section 6.3): average the codes of a few
samples that share a concept, add and subtract the averages, and decode the result, as in
"smiling woman - neutral woman + neutral man = smiling man".

Samples are named by their index in the grid `translate sample RUN --n N --seed S` draws
(0-based, row by row), so one first draws a grid, picks samples by eye, then writes e.g.

    translate sample RUN --n 64 --seed 3 --arithmetic "3,7,9 - 1,2 + 4,5" --out sum.png

which decodes mean(z3, z7, z9) - mean(z1, z2) + mean(z4, z5) (same --n and --seed as the grid).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from translate import viz
from translate.errors import UserError

Term = tuple[int, list[int]]  # (+1 or -1, sample indices averaged together)

_TERM = re.compile(r"\s*([+-]?)\s*(\d+(?:\s*,\s*\d+)*)\s*")


def grid_codes(z_dim: int, n: int, seed: int) -> Tensor:
    """The (n, z_dim) codes of the sample grid drawn with this n and seed."""
    return torch.randn(n, z_dim, generator=torch.Generator().manual_seed(seed))


def parse(expression: str) -> list[Term]:
    """'3,7,9 - 1,2 + 4,5' -> [(1, [3, 7, 9]), (-1, [1, 2]), (1, [4, 5])]."""
    terms: list[Term] = []
    pos = 0
    while pos < len(expression):
        m = _TERM.match(expression, pos)
        sign = m.group(1) if m else ""
        if m is None or m.end() == pos or (terms and not sign) or (not terms and sign == "-"):
            raise UserError(f"--arithmetic: cannot read {expression!r} at "
                            f"{expression[pos:pos + 10]!r}; write groups of sample indices "
                            "joined by + and -, e.g. \"3,7,9 - 1,2 + 4,5\"")
        indices = [int(i) for i in m.group(2).split(",")]
        terms.append((-1 if sign == "-" else 1, indices))
        pos = m.end()
    if not terms:
        raise UserError("--arithmetic: empty expression; e.g. \"3,7,9 - 1,2 + 4,5\"")
    return terms


def combine(codes: Tensor, terms: list[Term]) -> Tensor:
    """sum over terms of sign * mean(codes[indices]): one code (z_dim,)."""
    n = codes.shape[0]
    bad = sorted({i for _, idx in terms for i in idx if i >= n})
    if bad:
        raise UserError(f"--arithmetic: sample index {bad[0]} is not in a grid of --n {n} "
                        f"samples (indices 0 to {n - 1}); use the --n and --seed of the grid")
    return sum(sign * codes[idx].mean(dim=0) for sign, idx in terms)


@torch.no_grad()
def arithmetic_picture(G: nn.Module, terms: list[Term], codes: Tensor, seed: int
                       ) -> tuple[Tensor, list[Tensor], list[str]]:
    """(result code, picture rows, row labels). One row per term: the decoded mean of its
    codes, then (for a group of several) its samples; the last row: the decoded result, then
    variations with small noise added to the result code (N(0, 0.25^2), as the paper shows
    neighbours), as many as the widest group and at least 3. Rows end where their images do:
    no blank cells."""
    result = combine(codes, terms)
    rows, labels = [], []
    for k, (sign, idx) in enumerate(terms):
        mean = G(codes[idx].mean(dim=0, keepdim=True)).float()
        rows.append(torch.cat([mean, G(codes[idx]).float()]) if len(idx) > 1 else mean)
        op = "" if k == 0 else "+ " if sign > 0 else "- "
        labels.append(f"{op}mean of {', '.join(map(str, idx))}" if len(idx) > 1 else
                      f"{op}sample {idx[0]}")
    g = torch.Generator().manual_seed(seed + 1)
    n_var = max(3, *(len(idx) for _, idx in terms))
    jitter = 0.25 * torch.randn(n_var, codes.shape[1], generator=g)
    rows.append(G(torch.cat([result[None], result[None] + jitter])).float())
    labels.append("= result, then + noise")
    return result, rows, labels


def arithmetic_image(G: nn.Module, expression: str, n: int, seed: int) -> tuple[Tensor, object]:
    """(result code, HxWx3 uint8 picture) for `translate sample --arithmetic`: rows labelled
    with their term, the means (and the result) in the first column, set apart by a gap."""
    terms = parse(expression)
    result, rows, labels = arithmetic_picture(G, terms, grid_codes(G.z_dim, n, seed), seed)
    return result, viz.grid(rows, labels=labels, gap_after=1)
