"""h-space: read and replace the U-Net bottleneck during DDIM, and DiffInject's injection.

Asyrp (Kwon et al., "Diffusion models already have a semantic latent space") calls the
output of the U-Net's middle block h-space; InjectFusion / DiffStyle (Jeong et al.,
"Training-free content injection using h-space in diffusion models") injects the content
of one image into the generative process of another by blending their h with a
normalised spherical interpolation at every reverse step down to ``t_edit``, and
DiffInject uses that to turn bias-aligned images into bias-conflicting ones.

* :class:`HSpace` hooks ``unet.mid_block``: records h at chosen timesteps (keyed by
  the integer timestep) and/or replaces it with ``fn(h, t)``; removing it restores the
  plain model exactly (the hooks are gone, nothing else was touched).
* :func:`slerp` is the normalised spherical interpolation.
* :func:`h_share` measures whether a U-Net's decoder reads h at all (swap h between two
  images, see how far the predicted ``x_0`` moves).
* :func:`ddim_sample_with_h` is a general injection: DDIM from the targets' ``x_T`` with
  the sources' h blended in at every grid step ``t >= t_edit`` (globally, or inside a
  mask), optionally stochastic below ``t_boost`` and optionally asymmetric.
* :func:`invert_with_h`, :class:`InjectionSchedule` and :func:`diffstyle_sample` are
  DiffInject's process as its official code runs it (``diff_style`` in
  ``diffusion_latent.py`` of seanko29/DiffInject, from curryjung/InjectFusion_official):
  the content's h is recorded while the content image is DDIM-inverted (``h_dic``) and
  taken at the inversion timestep nearest each generation step; injection, eta = 1 and
  the ``dt_lambda`` shrink happen only on the 50-point replace grid inside the
  1000-step generative process.

The timestep is read from the U-Net call itself (a forward pre-hook on the U-Net), so
the hooks work inside any sampler, not only the ones here; the timesteps of one call
must be equal across the batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from unspur.errors import ConfigError, UnspurError
from unspur.generate.ddpm import (
    EtaSchedule,
    _labels,
    _Schedule,
    _unet_device_dtype,
    boost_eta,
    ddim_invert,
    ddim_reverse,
    ddim_step,
    ddim_timesteps,
    image_generators,
    unet_eps,
)

HFunction = Callable[[torch.Tensor, int], torch.Tensor]
TimestepFilter = bool | Collection[int] | Callable[[int], bool] | None
SlerpNorm = Literal["first", "lerp", "none"]


def _filter(when: TimestepFilter) -> Callable[[int], bool]:
    if when is None or when is False:
        return lambda t: False
    if when is True:
        return lambda t: True
    if callable(when):
        return when
    chosen = {int(t) for t in when}
    return lambda t: t in chosen


def _timestep(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        flat = value.detach().flatten()
        if flat.numel() == 0:
            return None
        if flat.numel() > 1 and not bool((flat == flat[0]).all()):
            raise UnspurError(
                "h-space hooks need one timestep per U-Net call; this batch mixes "
                f"{sorted(set(flat.tolist()))[:5]}"
            )
        value = flat[0].item()
    return int(round(float(value)))


class HSpace:
    """Hooks on a U-Net's middle block that read and/or replace h.

    ``record``: the timesteps at which h is stored in :attr:`h` (``True`` for every
    call, a collection of timesteps, or a predicate); the stored tensor is the block's
    own output (before any replacement), detached, on the CPU if ``to_cpu``. A timestep
    seen twice keeps the latest. ``replace``: ``fn(h, t) -> h'`` (same shape, the whole
    batch) applied at the timesteps of ``replace_at`` (default: every call).

    Use as a context manager (``with HSpace(unet, record=[999]) as hs: ...``) or with
    :meth:`attach` / :meth:`remove`.
    """

    def __init__(
        self,
        unet: Any,
        *,
        record: TimestepFilter = None,
        replace: HFunction | None = None,
        replace_at: TimestepFilter = None,
        to_cpu: bool = False,
    ) -> None:
        if getattr(unet, "mid_block", None) is None:
            raise ConfigError("this U-Net has no middle block, so it has no h-space")
        self.unet = unet
        self.record_at = _filter(record)
        self.replace = replace
        self.replace_at = _filter(True if replace_at is None and replace else replace_at)
        self.to_cpu = to_cpu
        self.h: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._t: int | None = None
        self._paused = False

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> HSpace:
        if not self._handles:
            self._handles = [
                self.unet.register_forward_pre_hook(self._before_unet, with_kwargs=True),
                self.unet.mid_block.register_forward_hook(self._after_mid_block),
            ]
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._t = None

    def __enter__(self) -> HSpace:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    def clear(self) -> None:
        self.h.clear()

    @contextlib.contextmanager
    def paused(self) -> Iterator[HSpace]:
        """Inside this block h is not replaced (it is still recorded)."""
        before, self._paused = self._paused, True
        try:
            yield self
        finally:
            self._paused = before

    def _before_unet(self, module, args, kwargs):
        self._t = _timestep(kwargs["timestep"] if "timestep" in kwargs else args[1])

    def _after_mid_block(self, module, inputs, output):
        t = self._t
        if t is None:
            return None
        h = output[0] if isinstance(output, tuple) else output
        if self.record_at(t):
            kept = h.detach().clone()
            self.h[t] = kept.cpu() if self.to_cpu else kept
        if self.replace is None or self._paused or not self.replace_at(t):
            return None
        new = self.replace(h, t)
        if new.shape != h.shape:
            raise UnspurError(
                f"the h replacement returned shape {tuple(new.shape)}, expected {tuple(h.shape)}"
            )
        new = new.to(h.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new


def slerp(
    a: torch.Tensor,
    b: torch.Tensor,
    t: float | torch.Tensor,
    *,
    norm: SlerpNorm = "first",
) -> torch.Tensor:
    """Spherical interpolation from ``a`` (``t = 0``) to ``b`` (``t = 1``), per sample.

    Each sample is one vector (every dimension but the first, flattened); ``t`` is a
    number or one per sample. The angle is the one between the two directions.

    ``norm`` fixes the length of the result:

    * ``"first"`` (default, the normalised Slerp of InjectFusion / DiffStyle that
      DiffInject uses): ``b`` is first rescaled to ``a``'s norm, so the result has exactly
      ``a``'s norm for every ``t`` and ``t = 1`` gives ``b``'s direction at ``a``'s length.
      In injection ``a`` is the h of the image being generated; keeping its norm keeps h
      consistent with the skip connections and the timestep, which is why those papers
      normalise (h's norm varies with the timestep and from image to image).
    * ``"lerp"``: interpolate the directions, then give the result the length
      ``(1 - t) |a| + t |b|`` (ends exactly at ``a`` and ``b``).
    * ``"none"``: the textbook formula on the raw vectors (norm not preserved).

    Nearly parallel vectors fall back to linear weights; exactly opposite ones have no
    defined great circle and give the linear midpoint.
    """
    if norm not in ("first", "lerp", "none"):
        raise ConfigError(f"slerp norm must be 'first', 'lerp' or 'none', got {norm!r}")
    b = b.expand_as(a)
    batch = a.shape[0]
    af = a.reshape(batch, -1).float()
    bf = b.reshape(batch, -1).float()
    tiny = torch.finfo(torch.float32).tiny
    na = af.norm(dim=1, keepdim=True)
    nb = bf.norm(dim=1, keepdim=True)
    w = torch.as_tensor(t, dtype=torch.float32, device=a.device).reshape(-1, 1)
    if norm == "first":
        bf = bf * (na / nb.clamp_min(tiny))
    ua, ub = af / na.clamp_min(tiny), bf / bf.norm(dim=1, keepdim=True).clamp_min(tiny)
    cos = (ua * ub).sum(dim=1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.acos(cos)
    sin = torch.sin(omega)
    near = sin < 1e-4
    safe = torch.where(near, torch.ones_like(sin), sin)
    wa = torch.where(near, 1.0 - w, torch.sin((1.0 - w) * omega) / safe)
    wb = torch.where(near, w, torch.sin(w * omega) / safe)
    if norm == "lerp":
        out = (wa * ua + wb * ub) * ((1.0 - w) * na + w * nb)
    else:
        out = wa * af + wb * bf
    return out.reshape(a.shape).to(a.dtype)


def _resize_mask(mask: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    mask = mask.to(device=h.device, dtype=torch.float32)
    if mask.shape[-2:] != h.shape[-2:]:
        mask = F.interpolate(mask, size=h.shape[-2:], mode="area")
    return mask


def inject(
    h: torch.Tensor,
    content: torch.Tensor,
    gamma: float | torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    norm: SlerpNorm = "first",
) -> torch.Tensor:
    """Blend ``content``'s h into ``h``: ``slerp(h, content, gamma)``.

    With ``mask`` (``(B or 1, 1, H, W)`` in image or h resolution, 1 = inject; resized to
    h's size by area averaging, so a binary image mask becomes a soft h mask) only the
    masked features are blended (the local variant): ``(1 - m) h + slerp(m h, m c, gamma)``,
    whose masked part keeps the norm of ``h``'s masked part under ``norm="first"``.
    """
    if mask is None:
        return slerp(h, content, gamma, norm=norm)
    m = _resize_mask(mask, h).to(h.dtype)
    return (1 - m) * h + slerp(m * h, m * content, gamma, norm=norm)


def ddim_sample_with_h(
    unet: Any,
    scheduler: Any,
    latents: torch.Tensor,
    source_latents: torch.Tensor | None = None,
    *,
    source_h: Mapping[int, torch.Tensor] | None = None,
    steps: int = 40,
    gamma: float | Callable[[int], float] = 0.3,
    t_edit: int = 500,
    t_boost: int | None = None,
    mask: torch.Tensor | None = None,
    class_labels: Any = None,
    source_class_labels: Any = None,
    seeds: Sequence[int] | None = None,
    asymmetric: bool = False,
    norm: SlerpNorm = "first",
    clip_sample: bool = False,
) -> torch.Tensor:
    """DDIM from ``latents`` (the targets' ``x_T``) with content h injected at every step.

    A general h-space injection; DiffInject's own process (content h from the content's
    inversion, the replace grid, eta and ``dt_lambda`` as its official code) is
    :func:`diffstyle_sample`.

    The content comes from ``source_latents`` (the content images' ``x_T``, usually
    from :func:`~unspur.generate.ddpm.ddim_invert` with the same ``steps``; one per
    target, or one for all): their own deterministic DDIM processes run in the same
    U-Net calls as the targets', and at every grid timestep ``t >= t_edit`` the targets'
    h is replaced by :func:`inject` ``(h, h_source, gamma(t), mask)``. Each injected h
    feeds the next step, so the content accumulates over the steps (InjectFusion's
    "gradual blending"). Or pass ``source_h``: h already recorded per timestep (an
    :class:`HSpace` record of the sources' reconstruction with the same grid).

    ``t_boost``: steps at ``t < t_boost`` are stochastic (``eta = 1``), Asyrp's quality
    boosting (its code: ``eta = 1.0 if t < t_addnoise else 0.0``); they draw from one
    generator per target, so they need ``seeds``. ``None`` keeps every step
    deterministic. ``asymmetric=True`` is Asyrp's asymmetric reverse process: the
    injected noise prediction only sets the predicted ``x_0`` and the direction term uses
    the un-injected one (one more U-Net call per edited step); the default (``False``)
    uses the injected prediction for both, as content injection without calibration.

    Defaults: ``steps=40`` (Asyrp's n_inv/n_test steps); ``gamma=0.3`` and
    ``t_edit=500`` are InjectFusion's official script (``h_gamma``,
    ``user_defined_t_edit``; it also uses ``t_boost=200``). Asyrp picks ``t_edit`` /
    ``t_boost`` per dataset (an LPIPS threshold on the predicted ``x_0``), so check them
    per dataset. The injection only moves the output as far as the U-Net's decoder
    reads h: measure that first (swap h between two images and compare the predicted
    ``x_0``); a decoder that takes the content from its skip connections ignores it.
    """
    if (source_latents is None) == (source_h is None):
        raise UnspurError("pass exactly one content source: source_latents or source_h")
    batch = latents.shape[0]
    device, _ = _unet_device_dtype(unet)
    schedule = _Schedule(scheduler)
    grid = ddim_timesteps(scheduler, steps)
    below = {t: (grid[i - 1] if i > 0 else -1) for i, t in enumerate(grid)}
    labels = _labels(class_labels, batch, device, unet)

    def weight(t: int) -> float:
        return float(gamma(t)) if callable(gamma) else float(gamma)

    state: dict[str, Any] = {}
    if source_latents is not None:
        if source_latents.shape[0] not in (1, batch):
            raise UnspurError(
                f"{source_latents.shape[0]} content latents for {batch} targets; "
                "give one per target or one for all"
            )
        state["x"] = source_latents.expand(batch, *source_latents.shape[1:]).to(
            device=device, dtype=torch.float32
        )
        source_labels = _labels(source_class_labels, batch, device, unet)
        both = None if labels is None else torch.cat([labels, source_labels])

        def replace(h: torch.Tensor, t: int) -> torch.Tensor:
            if h.shape[0] != 2 * batch:
                raise UnspurError("internal: targets and sources must share the U-Net call")
            target, content = h[:batch], h[batch:]
            return torch.cat([inject(target, content, weight(t), mask=mask, norm=norm), content])

    else:

        def replace(h: torch.Tensor, t: int) -> torch.Tensor:
            if t not in source_h:
                raise UnspurError(
                    f"source_h has no h for timestep {t}; record it with the same grid "
                    f"(steps={steps}) at every t >= t_edit"
                )
            content = source_h[t].to(device=h.device, dtype=h.dtype)
            return inject(h, content, weight(t), mask=mask, norm=norm)

    hooks = HSpace(unet, replace=replace, replace_at=lambda t: t >= t_edit)

    def eps_fn(x: torch.Tensor, t: int):
        if t < t_edit:
            return unet_eps(unet, x, t, schedule, labels)
        if source_latents is not None:
            xs = state["x"]
            eps = unet_eps(unet, torch.cat([x, xs]), t, schedule, both)
            eps_target, eps_source = eps[:batch], eps[batch:]
            state["x"] = ddim_step(xs, eps_source, schedule(t), schedule(below[t]))
        else:
            eps_target = unet_eps(unet, x, t, schedule, labels)
        if not asymmetric:
            return eps_target
        with hooks.paused():
            plain = unet_eps(unet, x, t, schedule, labels)
        return eps_target, plain

    eta: EtaSchedule = 0.0 if t_boost is None else boost_eta(t_boost)
    generators = _seeded_generators(seeds, batch)
    with hooks:
        return ddim_reverse(
            unet,
            scheduler,
            latents,
            grid,
            eps_fn=eps_fn,
            class_labels=class_labels,
            eta=eta,
            generators=generators,
            clip_sample=clip_sample,
        )


def _seeded_generators(seeds: Sequence[int] | None, batch: int) -> list[torch.Generator] | None:
    """One generator per image from ``seeds`` (None without seeds); the count must match."""
    if seeds is None:
        return None
    generators = image_generators(seeds)
    if len(generators) != batch:
        raise UnspurError(f"{len(generators)} seeds for {batch} images")
    return generators


# ------------------------------------------------------- DiffInject's official process


def official_timesteps(steps: int, t_0: int = 999) -> list[int]:
    """The grid of the InjectFusion / DiffInject code: ``int(linspace(0, 1, steps) * t_0
    + 1e-6)``, ascending (``seq_inv``, ``seq_train`` and ``seq_replace`` of
    ``diff_style`` in ``diffusion_latent.py``; ``t_0`` = 999, its ``--t_0`` default).
    Truncation, not rounding: for ``steps`` = 1000 it is 0..999, for 50 it is
    0, 20, 40, 61, ..., 978, 999."""
    if steps < 2 or t_0 < 1:
        raise ConfigError(f"the official grid needs steps >= 2 and t_0 >= 1, got {steps}, {t_0}")
    grid = sorted({int(i / (steps - 1) * t_0 + 1e-6) for i in range(steps)})
    return grid


def nearest_timestep(keys: Collection[int], t: int) -> int:
    """The key closest to ``t``; a tie goes to the larger key (the official
    ``take_closest`` scans the keys in descending order and keeps the first minimum)."""
    if not keys:
        raise UnspurError("no recorded timestep to take h from")
    return min(sorted(keys, reverse=True), key=lambda k: abs(k - t))


@dataclass(frozen=True)
class InjectionSchedule:
    """Which generation steps of DiffInject's reverse process do what (official code).

    The generative process walks ``gen_grid`` (``n_gen_step`` points) down from ``t_0``.
    Only the steps whose timestep is on ``replace_grid`` (``content_replace_step`` =
    50 points) are "replace" steps (``if i in seq_replace`` in ``diff_style``); there:

    * ``inject``: ``t >= t_edit`` (the model's ``if timesteps[0] >= t_edit``): h is
      blended with the content's h; x_0 comes from the injected call, the direction
      term from the plain one (Asyrp's asymmetric step, ``index=0``);
    * ``stochastic``: ``t <= t_boost`` (``eta=0 if t > t_noise else 1``): eta = 1;
    * ``shrink``: ``t >= dt_end`` and ``dt_lambda != 1``: the step is recomputed
      deterministically with the direction term times ``dt_lambda``
      (``denoising_step`` in ``utils/diffusion_utils.py``; 0.9985 and ``dt_end`` = 950
      shrink the 3 replace steps 999, 978, 958).

    Every other step is plain deterministic DDIM (eta = 0, no injection, no shrink).
    """

    gen_grid: tuple[int, ...]
    replace: frozenset[int]
    inject: frozenset[int]
    stochastic: frozenset[int]
    shrink: frozenset[int]

    @classmethod
    def build(
        cls,
        *,
        gen_steps: int = 1000,
        replace_steps: int = 50,
        t_edit: int = 500,
        t_boost: int | None = 200,
        dt_lambda: float = 0.9985,
        dt_end: int = 950,
        t_0: int = 999,
    ) -> InjectionSchedule:
        gen = official_timesteps(gen_steps, t_0)
        replace = frozenset(official_timesteps(replace_steps, t_0)) & frozenset(gen)
        shrink = frozenset(t for t in replace if dt_lambda != 1 and t >= dt_end)
        noisy = frozenset(
            t for t in replace if t_boost is not None and t <= t_boost and t not in shrink
        )
        return cls(
            gen_grid=tuple(gen),
            replace=replace,
            inject=frozenset(t for t in replace if t >= t_edit),
            stochastic=noisy,
            shrink=shrink,
        )


def official_local_mask(h: torch.Tensor) -> torch.Tensor:
    """The official local-injection mask of h: ones at ``[..., 4:-1, 3:5]`` (rows 4 to
    the second-last, columns 3 and 4; ``use_mask`` in the U-Net forward of
    ``models/guided_diffusion/unet.py``), shape ``(1, 1, H, W)``. Written for the 8x8 h
    of the 256 px ADMs; it is empty for h smaller than 6x4, which is refused."""
    mask = torch.zeros(1, 1, *h.shape[-2:], device=h.device, dtype=h.dtype)
    mask[..., 4:-1, 3:5] = 1
    if not bool(mask.any()):
        raise ConfigError(
            f"the official local mask (h rows 4:-1, columns 3:5) is empty for h of size "
            f"{tuple(h.shape[-2:])}; use a box (local_mask: [top, left, bottom, right]) or "
            "global injection (local_mask: null)"
        )
    return mask


def invert_with_h(
    unet: Any,
    scheduler: Any,
    images: torch.Tensor,
    *,
    steps: int = 1000,
    record_at: TimestepFilter = True,
    t_0: int = 999,
    class_labels: Any = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """DDIM-invert ``images`` on the official grid and record h on the way (``h_dic``).

    Returns ``(x_T, h)``: ``h[t]`` is the middle block's output of the inversion's U-Net
    call at timestep ``t`` (on the CPU), as ``precompute_pairs_with_h`` of the official
    code stores it; ``record_at`` limits which timesteps are kept (memory).
    """
    grid = official_timesteps(steps, t_0)
    with torch.no_grad(), HSpace(unet, record=record_at, to_cpu=True) as recorder:
        x_t = ddim_invert(unet, scheduler, images, timesteps=grid, class_labels=class_labels)
    return x_t, dict(recorder.h)


def diffstyle_sample(
    unet: Any,
    scheduler: Any,
    latents: torch.Tensor,
    content_h: Mapping[int, torch.Tensor],
    schedule: InjectionSchedule,
    *,
    gamma: float = 0.3,
    dt_lambda: float = 0.9985,
    local: Literal["official"] | torch.Tensor | None = None,
    seeds: Sequence[int] | None = None,
    asymmetric: bool = True,
    class_labels: Any = None,
) -> torch.Tensor:
    """DiffInject's generative process (``diff_style`` of the official code).

    ``latents``: the style images' inverted ``x_T``; ``content_h``: the content images'
    h recorded during their own DDIM inversion (:func:`invert_with_h`), by timestep. At
    every ``schedule.inject`` step the style process's h is replaced by
    :func:`inject` ``(h, content_h[nearest t], gamma)`` with the content h taken at the
    inversion timestep nearest the generation timestep (``take_closest``). Globally the
    content h is rescaled to h's norm first (``norm="first"``); ``local="official"``
    blends only :func:`official_local_mask` with the raw (un-normalised) Slerp of the
    masked vectors, as the official ``use_mask`` branch does; a tensor is our box mask
    (image or h resolution, ``norm="first"``). ``asymmetric=False`` takes the direction
    term from the injected call too (not the official process). Stochastic steps draw
    from one generator per image: pass ``seeds``.
    """
    batch = latents.shape[0]
    device, _ = _unet_device_dtype(unet)
    sched = _Schedule(scheduler)
    labels = _labels(class_labels, batch, device, unet)
    keys = sorted(content_h)
    nearest = {t: nearest_timestep(keys, t) for t in schedule.inject}

    def replace(h: torch.Tensor, t: int) -> torch.Tensor:
        content = content_h[nearest[t]].to(device=h.device, dtype=h.dtype)
        if content.shape[0] not in (1, h.shape[0]):
            raise UnspurError(f"{content.shape[0]} content h for {h.shape[0]} images")
        if isinstance(local, str):
            if local != "official":
                raise ConfigError(f"local must be 'official', a mask or None, got {local!r}")
            return inject(h, content, gamma, mask=official_local_mask(h), norm="none")
        return inject(h, content, gamma, mask=local, norm="first")

    hooks = HSpace(unet, replace=replace, replace_at=lambda t: t in schedule.inject)

    def eps_fn(x: torch.Tensor, t: int):
        eps = unet_eps(unet, x, t, sched, labels)
        if t not in schedule.replace:
            return eps
        plain = eps
        if t in schedule.inject and asymmetric:
            with hooks.paused():
                plain = unet_eps(unet, x, t, sched, labels)
        if t in schedule.shrink:
            return eps, plain * dt_lambda
        return eps, plain

    generators = _seeded_generators(seeds, batch)
    with hooks:
        return ddim_reverse(
            unet,
            scheduler,
            latents,
            list(schedule.gen_grid),
            eps_fn=eps_fn,
            class_labels=class_labels,
            eta=lambda t: 1.0 if t in schedule.stochastic else 0.0,
            generators=generators,
        )


def h_share(
    unet: Any,
    scheduler: Any,
    images: torch.Tensor,
    donors: torch.Tensor,
    t: int,
    *,
    seed: int = 0,
) -> torch.Tensor:
    """How far swapping h alone moves the predicted ``x_0`` towards another image's.

    Both ``images`` and ``donors`` (``(B, C, H, W)`` in ``[-1, 1]``) are noised to ``t``
    with the same noise; the images' U-Net call is repeated with the donors' h (the
    middle block's output) in place of their own. Returns, per image,
    ``|x0(image | donor h) - x0(image)| / |x0(donor) - x0(image)|``: 0 when the decoder
    ignores h (the content comes through the skip connections), about 1 when h alone
    decides the prediction. A quick check of whether h-space injection can carry content
    with a given U-Net (the injection papers use large pretrained ADMs, whose decoders
    read h at high noise levels).

    An undertrained U-Net scores about 0 whatever its architecture: ``x_0 = (x_t -
    sqrt(1 - a) eps) / sqrt(a)`` carries the two images' difference directly (the
    denominator's ``(x_donor - x_image) / sqrt(a)``), and only a model whose ``eps``
    predicts the content cancels that term. So the score grows with training as well as
    with how the decoder is wired: a U-Net with every skip connection cut, whose output
    is a function of h alone, scored 0.003 after 150 steps (a study removed after
    commit c157975: ``git show c157975:bench/results/ddpm_hshare.md``).
    """
    device, _ = _unet_device_dtype(unet)
    schedule = _Schedule(scheduler)
    a = schedule(t)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    noise = noise.to(device)
    own = math.sqrt(a) * images.to(device).float() + math.sqrt(1 - a) * noise
    other = math.sqrt(a) * donors.to(device).float() + math.sqrt(1 - a) * noise

    def x0(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (x - math.sqrt(1 - a) * eps) / math.sqrt(a)

    with torch.no_grad():
        with HSpace(unet, record=[t]) as recorder:
            donor = x0(other, unet_eps(unet, other, t, schedule, None))
        plain = x0(own, unet_eps(unet, own, t, schedule, None))
        swapped_h = recorder.h[t]
        with HSpace(unet, replace=lambda h, _: swapped_h.to(h.dtype)):
            swapped = x0(own, unet_eps(unet, own, t, schedule, None))
    moved = (swapped - plain).flatten(1).norm(dim=1)
    return moved / (donor - plain).flatten(1).norm(dim=1).clamp_min(1e-12)


def h_norms(h: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm of h (flattened): the quantity normalised Slerp preserves."""
    return h.reshape(h.shape[0], -1).float().norm(dim=1)


__all__ = [
    "HSpace",
    "InjectionSchedule",
    "ddim_sample_with_h",
    "diffstyle_sample",
    "h_norms",
    "h_share",
    "inject",
    "invert_with_h",
    "nearest_timestep",
    "official_local_mask",
    "official_timesteps",
    "slerp",
]
