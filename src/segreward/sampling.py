"""Samplers: draw K segmentations per image from a model's per-pixel class distribution.

A sampler is called as ``sampler(logits, k, mask=None) -> (samples, log_prob)``:

* ``logits``  ``[B, C, H, W]``; the policy is ``softmax(logits / temperature)`` per pixel;
* ``samples`` ``[K, B, H, W]`` long, no gradient;
* ``log_prob`` ``[K, B]``, the log-probability of each whole sample under the sampler's policy,
  summed over the pixels where ``mask`` (``[B, H, W]`` bool, e.g. "label is not ignore") is
  true. It carries the gradient to ``logits``: REINFORCE needs exactly this.

Pixels outside ``mask`` are sampled too, but left out of ``log_prob``: the reward does not
look at them, so their score terms would only add zero-mean noise to the gradient.

Two policies:

``categorical``
    every pixel independently; inverse-CDF sampling with one uniform number per pixel and
    sample (counting the classes whose cumulative probability is below it: :func:`draw_from_probs`).
``coherent``
    the same per-pixel marginals, but all pixels of a square region (``block`` pixels wide, a
    grid with a random offset per sample) share one uniform number ``u``. Pixels with similar
    distributions then take the same class, so samples differ by whole regions rather than by
    salt-and-pepper pixels. The log-probability is exact for this coupled policy: a region's
    labels ``y_r`` come out exactly when ``u`` lies in every pixel's CDF interval
    ``[F_i(y_i - 1), F_i(y_i))``, so ``P(y_r) = min_i F_i(y_i) - max_i F_i(y_i - 1)`` and
    ``log_prob = sum_r log P(y_r)``. The score-function gradient is therefore unbiased for
    the coupled policy's expected reward (tested against exact enumeration).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segreward import _draw_kernel, _numba
from segreward.errors import SegrewardError

__all__ = ["CategoricalSampler", "CoherentSampler", "LocalSampler", "draw_from_probs", "get_sampler", "SAMPLERS"]


def _policy(logits: torch.Tensor, temperature: float):
    """``log_softmax(logits / temperature)`` over classes, float32 (no division at temperature 1:
    ``x / 1`` is ``x``, and the pass over every logit is not free)."""
    if logits.dim() != 4:
        raise SegrewardError(f"logits must be [B, C, H, W], got shape {tuple(logits.shape)}")
    z = logits.float()
    return F.log_softmax(z if temperature == 1.0 else z / temperature, dim=1)


@torch.no_grad()
def first_argmax(z: torch.Tensor) -> torch.Tensor:
    """``argmax`` over dim 1 of ``z [B, C, H, W]`` (first maximum on ties) as ``[B, H, W]`` long.

    The first maximum's index is the number of classes whose running maximum is still below the
    maximum: one ``amax`` and one pass per class over contiguous planes, several times faster on a
    CPU than ``max(1)``/``argmax(1)``, which track indices across the strided class dim."""
    top = z.amax(1)
    best = z[:, 0].clone()
    below = torch.empty_like(best, dtype=torch.bool)
    arg = torch.zeros_like(best, dtype=torch.uint8 if z.shape[1] <= 256 else torch.int32)
    for cls in range(1, z.shape[1]):
        torch.lt(best, top, out=below)
        arg.add_(below.to(arg.dtype) if arg.dtype != torch.uint8 else below.view(torch.uint8))
        torch.maximum(best, z[:, cls], out=best)
    return arg.long()


def _cdf_last(logp: torch.Tensor) -> torch.Tensor:
    """Cumulative probabilities ``[B, H, W, C]`` with the last entry exactly 1 (so ``u < 1`` always
    lands on a class despite rounding)."""
    p = logp.exp().permute(0, 2, 3, 1)
    cdf = torch.cumsum(p[..., :-1], dim=-1)
    return torch.cat([cdf, torch.ones_like(p[..., :1])], dim=-1)


@torch.no_grad()
def _draw(logp: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """K independent per-pixel categorical draws ``[K, B, H, W]`` by inverse CDF: one uniform
    number per pixel and sample."""
    return draw_from_probs(logp.exp(), k, generator)[0]


def uniforms(k: int, b: int, h: int, w: int, device, generator: torch.Generator | None) -> torch.Tensor:
    """The inverse-CDF draws' uniform numbers ``[K, B, H, W]``, contiguous (a comparison with the
    permuted view is ~3x slower on a CPU), drawn as ``[B, H, W, K]``: every path that samples
    from the same generator state gets the same numbers."""
    return torch.rand(b, h, w, k, device=device, generator=generator).permute(3, 0, 1, 2).contiguous()


@torch.no_grad()
def draw_from_probs(p: torch.Tensor, k: int, generator: torch.Generator | None = None,
                    with_argmax: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inverse-CDF draws ``[K, B, H, W]`` from probabilities ``p`` ``[B, C, H, W]``, and (optionally)
    the argmax ``[B, H, W]`` (first maximum) from the same pass.

    Sample ``k`` of a pixel is the number of classes ``c < C-1`` whose cumulative probability
    ``p_0 + ... + p_c`` is ``<= u`` (``u`` uniform in [0, 1)): the class whose CDF interval holds
    ``u``, and never past the last class despite rounding. One loop over the classes with
    ``[B, H, W]`` operations: on CPU several times faster than ``searchsorted`` on a permuted
    copy, and no ``[B, H, W, C]`` copy of the probabilities.
    """
    b, c, h, w = p.shape
    u = uniforms(k, b, h, w, p.device, generator)
    if _numba.usable(p):
        # One loop over the pixels (numba): the same sums and comparisons, so the same samples.
        idx = torch.empty(k, b, h, w, dtype=torch.long)
        arg = torch.empty(b, h, w, dtype=torch.long) if with_argmax else torch.empty(1, 1, dtype=torch.long)
        pc = p.contiguous()
        zero = pc.new_zeros(1).numpy()[0]  # the running sum starts at 0 in p's dtype, as the tensor code's
        _draw_kernel.draw(pc.view(b, c, h * w).numpy(), u.view(k, b, h * w).numpy(),
                          zero, idx.view(k, b, h * w).numpy(),
                          arg.view(b, -1).numpy() if with_argmax else arg.numpy(), with_argmax)
        return idx, (arg if with_argmax else None)
    small = torch.uint8 if c <= 256 else torch.int32  # fewer bytes per pass; widened once at the end
    idx = torch.zeros(k, b, h, w, dtype=small, device=p.device)
    acc = torch.zeros(b, h, w, dtype=p.dtype, device=p.device)
    if with_argmax:
        # The first maximum is at the number of classes whose running maximum is still below it.
        top = p.amax(1)
        best = p[:, 0].clone()
        arg = torch.zeros(b, h, w, dtype=small, device=p.device)
    below = torch.empty(k, b, h, w, dtype=torch.bool, device=p.device)
    for cls in range(c - 1):
        acc.add_(p[:, cls])
        torch.le(acc.unsqueeze(0), u, out=below)
        idx.add_(below.view(torch.uint8) if small == torch.uint8 else below)
        if with_argmax:
            arg.add_(best < top)
            torch.maximum(best, p[:, cls + 1], out=best)
    return idx.long(), (arg.long() if with_argmax else None)


def _masked_sum(lp: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is not None:
        lp = lp * mask.unsqueeze(0).to(lp.dtype)
    return lp.flatten(2).sum(-1)


class CategoricalSampler:
    """Independent per-pixel categorical samples from ``softmax(logits / temperature)``."""

    name = "categorical"

    def __init__(self, temperature: float = 1.0, generator: torch.Generator | None = None):
        if not temperature > 0:
            raise SegrewardError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.generator = generator

    def __call__(self, logits: torch.Tensor, k: int, mask: torch.Tensor | None = None):
        samples, log_prob, _ = self.draw(_policy(logits, self.temperature), k, mask)
        return samples, log_prob

    def draw(self, logp: torch.Tensor, k: int, mask: torch.Tensor | None = None):
        """``(samples, log_prob, p)`` from the policy's log-probabilities ``logp`` (what
        ``__call__`` computes; a caller that also needs the policy, e.g. for its entropy, passes
        its own and gets the probabilities back)."""
        with torch.no_grad():
            p = logp.exp()
        samples = draw_from_probs(p, k, self.generator)[0]
        # Gather the K samples' log-probs along the class dim of logp itself (index [B, K, H, W]):
        # same values as gathering from a K-fold expanded logp, but the backward scatters into one
        # [B, C, H, W] buffer instead of a K times larger one that is then summed over K.
        lp = logp.gather(1, samples.permute(1, 0, 2, 3)).permute(1, 0, 2, 3)
        return samples, _masked_sum(lp, mask), p


class CoherentSampler:
    """Region-coupled samples: one shared uniform per ``block x block`` region (random grid offset
    per sample), exact log-probability of the coupled policy (see the module docstring)."""

    name = "coherent"

    def __init__(self, temperature: float = 1.0, block: int = 16, generator: torch.Generator | None = None):
        if not temperature > 0:
            raise SegrewardError(f"temperature must be > 0, got {temperature}")
        if int(block) < 1:
            raise SegrewardError(f"block must be >= 1 pixel, got {block}")
        self.temperature = float(temperature)
        self.block = int(block)
        self.generator = generator

    def region_ids(self, k: int, h: int, w: int, device) -> tuple[torch.Tensor, int]:
        """Region index ``[K, H, W]`` of every pixel, and the number of regions per sample."""
        s = self.block
        off = torch.randint(0, s, (k, 2), generator=self.generator, device="cpu").to(device)
        ys = torch.arange(h, device=device)
        xs = torch.arange(w, device=device)
        ry = (ys.unsqueeze(0) + off[:, :1]) // s  # [K, H]
        rx = (xs.unsqueeze(0) + off[:, 1:]) // s  # [K, W]
        nx = (w + s - 1) // s + 1
        ny = (h + s - 1) // s + 1
        return ry.unsqueeze(2) * nx + rx.unsqueeze(1), ny * nx

    def __call__(self, logits: torch.Tensor, k: int, mask: torch.Tensor | None = None):
        logp = _policy(logits, self.temperature)
        b, c, h, w = logp.shape
        region, n_regions = self.region_ids(k, h, w, logp.device)  # [K, H, W]
        region = region.unsqueeze(1).expand(k, b, h, w)
        with torch.no_grad():
            u_region = torch.rand(k, b, n_regions, device=logp.device, generator=self.generator)
            u = u_region.gather(2, region.reshape(k, b, -1)).reshape(k, b, h, w)
            cdf = _cdf_last(logp.detach()).contiguous()  # [B, H, W, C]
            idx = torch.searchsorted(cdf, u.permute(1, 2, 3, 0).contiguous(), right=True).clamp_(max=c - 1)
            samples = idx.permute(3, 0, 1, 2).contiguous()  # [K, B, H, W]
        # Differentiable CDF interval [lo, hi) of each pixel's sampled class.
        p = logp.exp()
        cdf_g = torch.cumsum(p, dim=1)
        cdf_g = torch.cat([cdf_g[:, :-1], torch.ones_like(cdf_g[:, :1])], dim=1)
        cdf_prev = torch.cat([torch.zeros_like(cdf_g[:, :1]), cdf_g[:, :-1]], dim=1)
        sel = samples.permute(1, 0, 2, 3)  # [B, K, H, W]: gather without a K-fold expand (cheaper backward)
        hi = cdf_g.gather(1, sel).permute(1, 0, 2, 3)
        lo = cdf_prev.gather(1, sel).permute(1, 0, 2, 3)
        if mask is not None:  # unlabelled pixels constrain nothing
            m = mask.unsqueeze(0).expand(k, -1, -1, -1)
            hi = torch.where(m, hi, torch.ones_like(hi))
            lo = torch.where(m, lo, torch.zeros_like(lo))
        flat = region.reshape(k, b, -1)
        hi_min = torch.ones(k, b, n_regions, device=logp.device).scatter_reduce(
            2, flat, hi.reshape(k, b, -1), reduce="amin", include_self=False)
        lo_max = torch.zeros(k, b, n_regions, device=logp.device).scatter_reduce(
            2, flat, lo.reshape(k, b, -1), reduce="amax", include_self=False)
        width = (hi_min - lo_max).clamp_min(1e-12)
        return samples, width.log().sum(-1)


class LocalSampler:
    """Sample only inside a few random regions and keep the argmax everywhere else.

    Per call, ``n = max(1, round(fraction * regions))`` of the ``block x block`` regions of each
    image (grid with a random offset) are drawn uniformly without replacement; the K samples
    of an image share them, so their rewards differ only through those pixels. Inside, pixels
    are independent categorical draws; outside, the prediction is the argmax. ``log_prob``
    sums over the sampled pixels only, so the score-function estimate is unbiased for
    ``J = E_M E_{y_M} R(y_M, argmax elsewhere)`` -- the expected reward of the argmax
    prediction with one random patch resampled -- and the per-image advantage is credited to
    the pixels that caused it, not spread over the whole image.
    """

    name = "local"

    def __init__(self, temperature: float = 1.0, block: int = 16, fraction: float = 0.05,
                 generator: torch.Generator | None = None):
        if not temperature > 0:
            raise SegrewardError(f"temperature must be > 0, got {temperature}")
        if int(block) < 1:
            raise SegrewardError(f"block must be >= 1 pixel, got {block}")
        if not 0 < fraction <= 1:
            raise SegrewardError(f"fraction must be in (0, 1], got {fraction}")
        self.temperature, self.block, self.fraction = float(temperature), int(block), float(fraction)
        self.generator = generator

    def region_mask(self, b: int, h: int, w: int, device) -> torch.Tensor:
        """``[B, H, W]`` bool: the pixels of the regions drawn for each image."""
        region, n_regions = CoherentSampler(block=self.block, generator=self.generator).region_ids(1, h, w, device)
        present = torch.unique(region)  # regions that hold pixels (the grid overhangs the image)
        n = max(1, round(self.fraction * present.numel()))
        scores = torch.rand(b, present.numel(), generator=self.generator).to(device)
        chosen = present[scores.topk(n, dim=1).indices]  # [B, n]
        picked = torch.zeros(b, n_regions, dtype=torch.bool, device=device)
        picked.scatter_(1, chosen, True)
        return picked.gather(1, region.reshape(1, -1).expand(b, -1)).reshape(b, h, w)

    def __call__(self, logits: torch.Tensor, k: int, mask: torch.Tensor | None = None):
        logp = _policy(logits, self.temperature)
        b, c, h, w = logp.shape
        drawn = _draw(logp, k, self.generator)
        with torch.no_grad():
            local = self.region_mask(b, h, w, logp.device)
            samples = torch.where(local.unsqueeze(0), drawn, logp.max(1).indices.unsqueeze(0)).contiguous()
        lp = logp.gather(1, samples.permute(1, 0, 2, 3)).permute(1, 0, 2, 3)
        keep = local if mask is None else local & mask
        return samples, _masked_sum(lp, keep)


SAMPLERS = {"categorical": CategoricalSampler, "coherent": CoherentSampler, "local": LocalSampler}


def get_sampler(name, **kwargs):
    """A sampler by name (``categorical``, ``coherent``), or a callable passed through."""
    if callable(name):
        return name
    if name not in SAMPLERS:
        raise SegrewardError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    cls = SAMPLERS[name]
    allowed = {"temperature", "generator"} | ({"block"} if cls is CoherentSampler else set()) | (
        {"block", "fraction"} if cls is LocalSampler else set())
    unknown = set(kwargs) - allowed
    if unknown:
        raise SegrewardError(f"sampler {name!r} got unknown options {sorted(unknown)}; valid: {sorted(allowed)}")
    return cls(**kwargs)
