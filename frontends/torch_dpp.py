"""Dynamic Probabilistic Pruning (DPP): learnable k-out-of-n masks, trained with the task loss.

Gonzalez-Carabarin, Huijben, Veeling, Schmid, van Sloun, "Dynamic Probabilistic Pruning: A
general framework for hardware-constrained pruning at different granularities", IEEE TNNLS 2022.

Every pruning unit holds learnable logits over its n elements. Each forward pass in training
mode draws an exact k-out-of-n mask with the Gumbel-top-k trick; gradients reach the logits
through a Gumbel-softmax relaxation of top-k (successive softmaxes with masking, temperature
annealed) by the straight-through estimator. In eval mode the mask is the deterministic top-k of
the logits. Granularities (for a weight of shape (out, in, *kernel)):

  weight  one unit per output channel (a Linear row, a conv filter's in x kernel weights):
          k of its n = in * prod(kernel) weights
  kernel  one unit per output channel: k of its n = in input kernels (Linear: k of in weights)
  filter  one unit per layer: k of its n = out filters, each with its bias and the scale and
          shift of a BatchNorm that reads the layer's output (found from one forward pass on
          attach's example_inputs, or by a torch.fx trace), which share the mask the weight drew
          in the same forward pass

    from spa.frontends.torch import dpp

    pruning = dpp.attach(model, amount=0.75, granularity="weight", quantize_bits=8,
                         relaxation="sigmoid")     # or "softmax" (the paper's, O(min(k, n-k) n))
    temperature = pruning.schedule(t0=1.0, t1=0.03, steps=sampling_steps)
    masks = torch.optim.Adam(pruning.parameters(), lr=0.1)   # the logits: ordinary parameters
    for i, (x, y) in zip(range(sampling_steps), batches):    # masks first, on the fixed weights
        loss(model(x), y).backward(); masks.step(); masks.zero_grad(); temperature.step()
        pruning.set_noise(max(0.0, 1 - (i + 1) / sampling_steps))   # Gumbel noise annealed to 0
    pruning.freeze()               # then the weights train on the final masks (docs/sparsity.md)
    pruning.diagnostics()          # per layer: entropy, confidence, diversity since last call
    pruning.finalize(model)        # hard top-k masks baked in as exact zeros
    dpp.recalibrate_batchnorm(model, batches, max_batches=30)   # optional
    pruning.export_onnx(model, (x,), "sparse.onnx")
"""
from __future__ import annotations

import collections
import copy
import math

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from spa.errors import SpaError, first_line

GRANULARITIES = ("weight", "kernel", "filter")
LAYERS = (nn.Conv2d, nn.Conv1d, nn.Linear)
_TINY = 1e-20
_EXP_FLOOR = 30.0  # softmax inputs >= -30 (exp ~ 1e-13): keeps float32 subnormals out, forward and backward


# ------------------------------------------------------------------------------------------
# units: weight <-> (units, n) scores and (units, n) masks -> weight-shaped masks
# ------------------------------------------------------------------------------------------
def element_scores(weight: torch.Tensor, granularity: str) -> torch.Tensor:
    """(units, n) magnitudes of the elements a k-out-of-n choice is made over (L2 norms for
    kernels and filters)."""
    w = weight.detach()
    if granularity == "weight":
        return w.reshape(w.shape[0], -1).abs()
    if granularity == "kernel":
        return w.reshape(w.shape[0], w.shape[1], -1).norm(dim=2)
    if granularity == "filter":
        return w.reshape(1, w.shape[0], -1).norm(dim=2)
    raise SpaError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def expand_mask(unit_mask: torch.Tensor, shape: torch.Size, granularity: str) -> torch.Tensor:
    """A (units, n) mask -> a mask broadcastable to a weight of ``shape``."""
    if granularity == "weight":
        return unit_mask.reshape(shape)
    if granularity == "kernel":
        return unit_mask.reshape(*shape[:2], *([1] * (len(shape) - 2)))
    return unit_mask.reshape(shape[0], *([1] * (len(shape) - 1)))


def keep_count(n: int, amount: float) -> int:
    """k for pruning ``amount`` of n elements: at least one kept."""
    if not 0.0 <= amount < 1.0:
        raise SpaError(f"amount (the fraction pruned) must be in [0, 1), got {amount}")
    return max(1, min(n, round((1.0 - amount) * n)))


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly k ones per row, at the k largest scores."""
    return torch.zeros_like(scores).scatter_(1, scores.topk(k, dim=1).indices, 1.0)


def soft_top_k(perturbed: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """Relaxed top-k per row: k successive softmaxes, each masking out (softly) what the
    previous ones chose; rows sum to k. For k > n/2 the n - k smallest are relaxed instead
    (1 - soft bottom-(n - k)), so the loop runs min(k, n - k) times."""
    n = perturbed.shape[1]
    take, scores = (k, perturbed) if k <= n - k else (n - k, -perturbed)
    chosen = torch.zeros_like(scores)
    for _ in range(take):
        z = (scores + torch.log1p(-chosen.clamp(max=1 - 1e-6))) / temperature
        z = z - z.detach().amax(1, keepdim=True)
        onehot = torch.softmax(z.clamp(min=-_EXP_FLOOR), dim=1)  # no subnormal floats: slow on CPUs
        chosen = chosen + onehot
    return chosen if take == k else 1.0 - chosen


def sigmoid_top_k(perturbed: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """Relaxed top-k per row in one pass: sigmoid((x - threshold) / temperature), the threshold
    (not differentiated) midway between the k-th and (k + 1)-th largest; rows sum to about k.
    O(n log n) instead of the successive softmaxes' O(min(k, n - k) n)."""
    n = perturbed.shape[1]
    if k >= n:
        return torch.ones_like(perturbed)
    top = perturbed.detach().topk(k + 1, dim=1).values
    threshold = 0.5 * (top[:, k - 1:k] + top[:, k:k + 1])
    return torch.sigmoid((perturbed - threshold) / temperature)


RELAXATIONS = {"softmax": soft_top_k, "sigmoid": sigmoid_top_k}


# ------------------------------------------------------------------------------------------
# the mask and the weight parametrization
# ------------------------------------------------------------------------------------------
class DPPMask(nn.Module):
    """Learnable k-out-of-n mask for one weight. ``forward()``: in training mode a Gumbel-top-k
    sample (exactly k ones per unit) whose gradient is the relaxed soft top-k's
    (straight-through); in eval mode (or with ``sampling`` False) ``hard()``. Logits start at ``prior_scale * log|w|``
    (magnitude prior: sampling probabilities proportional to |w|^prior_scale)."""

    def __init__(self, weight: torch.Tensor, amount: float, granularity: str = "weight",
                 temperature: float = 1.0, prior_scale: float = 1.0, relaxation: str = "softmax"):
        super().__init__()
        if relaxation not in RELAXATIONS:
            raise SpaError(f"relaxation must be one of {tuple(RELAXATIONS)}, got {relaxation!r}")
        scores = element_scores(weight, granularity)
        self.granularity, self.shape = granularity, weight.shape
        self.units, self.n = scores.shape
        self.k = keep_count(self.n, amount)
        self.temperature = float(temperature)
        self.noise = 1.0  # scale of the Gumbel noise (1: the paper's sampling, 0: top-k of the logits)
        self.relaxation = relaxation
        self.sampling = True  # False: the hard top-k in training too (a frozen mask)
        self.logits = nn.Parameter(prior_scale * torch.log(scores / scores.mean().clamp(min=_TINY) + 1e-6))
        self.register_buffer("last_sample", torch.zeros_like(scores), persistent=False)
        self.drawn: torch.Tensor | None = None  # the (units, n) mask of the last forward, detached
        self._has_previous, self._changed, self._pairs, self._draws = False, 0.0, 0, 0

    def forward(self) -> torch.Tensor:
        unit_mask = self.sample() if self.training and self.sampling else self.hard()
        self.drawn = unit_mask.detach()
        return expand_mask(unit_mask, self.shape, self.granularity)

    def filters(self) -> torch.Tensor:
        """(out,) filter mask for the layer's bias: the one the weight drew last (Conv and Linear
        read their weight before their bias, so both see the same sample), the hard top-k before
        any draw. Detached: the logits learn from the weights alone."""
        return (self.drawn if self.drawn is not None else self.hard()).reshape(-1)

    def sample(self) -> torch.Tensor:
        """(units, n) hard Gumbel-top-k sample, straight-through to the relaxed top-k."""
        uniform = torch.rand_like(self.logits).clamp_(_TINY, 1.0)
        perturbed = self.logits - self.noise * torch.log(-torch.log(uniform))
        hard = top_k_mask(perturbed.detach(), self.k)
        self._record(hard)
        soft = RELAXATIONS[self.relaxation](perturbed, self.k, self.temperature)
        return hard + (soft - soft.detach())  # exactly hard ((hard + soft) - soft rounds: 0.99999994)

    @torch.no_grad()
    def hard(self) -> torch.Tensor:
        """(units, n) deterministic final mask: the top-k of the logits."""
        return top_k_mask(self.logits, self.k)

    @torch.no_grad()
    def _record(self, hard: torch.Tensor) -> None:
        if self._has_previous:
            self._changed += float((hard != self.last_sample).sum()) / (2 * self.k * self.units)
            self._pairs += 1
        self._has_previous, self._draws = True, self._draws + 1
        self.last_sample.copy_(hard)

    @torch.no_grad()
    def diagnostics(self) -> dict:
        """entropy: of softmax(logits) per unit / log n (1 uniform, log k / log n when all the mass
        sits evenly on k elements, 0 one-hot); confidence: the
        probability mass on the top-k (k/n uniform, 1 peaked); diversity: mean fraction of the kept
        elements that changed between consecutive samples since the last call (0 frozen, 1 all);
        steps: samples drawn since the last call. Resets the diversity count."""
        p = torch.softmax(self.logits, dim=1)
        entropy = -(p * torch.log(p.clamp(min=_TINY))).sum(1) / math.log(self.n) if self.n > 1 else p.new_zeros(1)
        confidence = p.topk(self.k, dim=1).values.sum(1)
        out = {"entropy": float(entropy.mean()), "confidence": float(confidence.mean()),
               "diversity": self._changed / self._pairs if self._pairs else 0.0, "steps": self._draws,
               "k": self.k, "n": self.n, "units": self.units, "temperature": self.temperature,
               "noise": self.noise}
        self._changed, self._pairs, self._draws = 0.0, 0, 0
        return out


def fake_quantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel fake quantisation, straight-through (identity gradient):
    at most 2^bits - 1 levels per channel, zeros stay exact zeros."""
    qmax = 2 ** (bits - 1) - 1
    scale = weight.detach().reshape(weight.shape[0], -1).abs().amax(1).clamp(min=_TINY) / qmax
    scale = scale.reshape(-1, *([1] * (weight.dim() - 1)))
    quantized = (weight / scale).round().clamp(-qmax, qmax) * scale
    return weight + (quantized - weight).detach()


class DPPWeight(nn.Module):
    """The parametrization ``weight -> fake_quant(weight * mask())`` registered on a layer."""

    def __init__(self, mask: DPPMask, quantize_bits: int | None = None):
        super().__init__()
        self.mask, self.quantize_bits = mask, quantize_bits

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        masked = weight * self.mask()
        return fake_quantize(masked, self.quantize_bits) if self.quantize_bits else masked


class DPPBias(nn.Module):
    """The parametrization ``bias -> bias * filters()`` at filter granularity, on the layer's bias
    and on the weight and bias of the BatchNorm after it: a dropped filter outputs exact zeros, so
    removing it physically changes nothing. ``filters`` is the DPPMask's bound method, not the
    module, so the logits are not registered twice."""

    def __init__(self, filters):
        super().__init__()
        self.filters = filters

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        return bias * self.filters()


# ------------------------------------------------------------------------------------------
# the controller
# ------------------------------------------------------------------------------------------
class ExponentialTemperature:
    """Temperature t0 * (t1 / t0) ** (i / (steps - 1)) at step i (t1 from step steps - 1 on);
    ``step()`` advances one step and sets it on every mask."""

    def __init__(self, controller: "DPPController", t0: float, t1: float, steps: int):
        if t0 <= 0 or t1 <= 0 or steps < 1:
            raise SpaError(f"temperature schedule needs t0, t1 > 0 and steps >= 1, got {t0}, {t1}, {steps}")
        self.controller, self.t0, self.t1, self.steps, self.index = controller, t0, t1, steps, 0
        controller.set_temperature(self.value(0))

    def value(self, index: int) -> float:
        return self.t0 * (self.t1 / self.t0) ** (min(index, self.steps - 1) / max(self.steps - 1, 1))

    def step(self) -> float:
        self.index += 1
        return self.controller.set_temperature(self.value(self.index))


class DPPController:
    """What ``attach`` returns: the DPP masks of a model by module name, and what to do with them."""

    def __init__(self, masks: dict[str, DPPMask], granularity: str, quantize_bits: int | None,
                 batchnorms: dict[str, str] | None = None):
        self.masks, self.granularity, self.quantize_bits = masks, granularity, quantize_bits
        self.batchnorms = batchnorms or {}  # BatchNorm module name -> the masked layer it reads
        self.physical_status: str | None = None

    def parameters(self) -> list[nn.Parameter]:
        """The mask logits (e.g. for their own optimizer parameter group)."""
        return [m.logits for m in self.masks.values()]

    def set_temperature(self, temperature: float) -> float:
        for mask in self.masks.values():
            mask.temperature = float(temperature)
        return float(temperature)

    def set_noise(self, scale: float) -> float:
        """Scale the Gumbel noise of every mask (1: the paper's sampling; towards 0 the samples
        become the top-k of the logits, so the masks settle before they are frozen)."""
        if scale < 0:
            raise SpaError(f"noise scale must be >= 0, got {scale}")
        for mask in self.masks.values():
            mask.noise = float(scale)
        return float(scale)

    def freeze(self) -> None:
        """Stop sampling: every mask is its hard top-k from now on, in training too (e.g. for the
        last epochs, so the weights settle on the final masks)."""
        for mask in self.masks.values():
            mask.sampling = False

    def schedule(self, t0: float, t1: float, steps: int) -> ExponentialTemperature:
        return ExponentialTemperature(self, t0, t1, steps)

    def diagnostics(self) -> dict[str, dict]:
        return {name: mask.diagnostics() for name, mask in self.masks.items()}

    def hard_masks(self) -> dict[str, torch.Tensor]:
        """Weight-shaped final masks (top-k of the logits) by module name."""
        return {name: expand_mask(m.hard(), m.shape, m.granularity).expand(m.shape).clone()
                for name, m in self.masks.items()}

    def finalize(self, model: nn.Module, example_inputs=None, physical: bool = False) -> nn.Module:
        """Bake the hard masks (and the fake quantisation) into the weights as exact zeros and
        remove the parametrizations. ``physical`` (filter granularity, needs ``example_inputs``):
        the zeroed filters are removed by ``spa.frontends.torch_prune.make_physical(exact=False)``
        with their coupled channels (where a constant is left in a dropped channel, e.g. after a
        BatchNorm attach did not pair, it goes too: the largest output change is reported);
        ``physical_status`` says what happened. Returns the model."""
        modules = dict(model.named_modules())
        for name in list(self.masks) + list(self.batchnorms):  # layers first: they leave their hard masks drawn
            _bake(modules[name])
        if physical:
            self.physical_status = self._make_physical(model, example_inputs)
        return model

    def _make_physical(self, model: nn.Module, example_inputs) -> str:
        if self.granularity != "filter":
            raise SpaError(f"physical removal needs filter granularity, not {self.granularity!r}")
        from .torch_prune import make_physical

        _, report = make_physical(model, example_inputs, exact=False)
        return (f"physical removal by spa.frontends.torch_prune.make_physical: parameters {report.params_before} -> "
                f"{report.params_after}, outputs moved by up to {report.max_deviation:.4g}"
                + (f"; {len(report.not_removable)} masked sets kept (see its warning)" if report.not_removable else ""))

    def export_onnx(self, model: nn.Module, example_inputs, path, **export_kwargs):
        """Export the finalized model (a finalized copy if ``model`` still has DPP masks) through
        ``spa.frontends.torch.export``; pruned weights are exact zeros in the ONNX file."""
        from .torch_export import export

        if any(_dpp_parametrization(m) for m in model.modules()):
            model = self.finalize(copy.deepcopy(model))
        return export(model, example_inputs, path, **export_kwargs)


def _dpp_parametrization(module: nn.Module) -> DPPWeight | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p for p in module.parametrizations.weight if isinstance(p, DPPWeight)), None)


@torch.no_grad()
def _bake(module: nn.Module) -> None:
    """Replace the parametrized weight by its eval-mode value (hard mask, fake quant), keeping the
    original Parameter object (optimizers still hold it). Not parametrize.remove_parametrizations:
    it deletes the property from the parametrized class, which deep copies of the model share."""
    masked = dict(module.parametrizations) if parametrize.is_parametrized(module) else {}
    ours = {"weight": (DPPWeight, DPPBias), "bias": (DPPBias,)}
    if not any(isinstance(p, (DPPWeight, DPPBias)) for chain in masked.values() for p in chain):
        raise SpaError(f"{type(module).__name__} has no DPP mask (already finalized?)")
    if any(name not in ours or len(chain) != 1 or not isinstance(chain[0], ours[name])
           for name, chain in masked.items()):
        raise SpaError(f"{type(module).__name__} has parametrizations besides the DPP mask")
    if "weight" in masked:
        masked["weight"][0].eval()  # the hard top-k mask, not a sample
    finals = {name: getattr(module, name).detach().clone() for name in ("weight", "bias") if name in masked}
    originals = {name: chain.original for name, chain in masked.items()}
    del module.parametrizations
    module.__class__ = module.__class__.__bases__[0]
    for name, final in finals.items():
        originals[name].copy_(final)
        setattr(module, name, originals[name])


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches, max_batches: int | None = None) -> int:
    """Re-estimate the running statistics of every BatchNorm layer from ``batches`` (inputs, or
    (inputs, targets) tuples) with the model as it is now (e.g. after ``freeze`` or ``finalize``:
    statistics gathered under changing sampled masks no longer match the final ones). Cumulative
    averages (momentum None) over the batches; no weight changes; the model ends in eval mode.
    Returns the number of batches used."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    used = 0
    try:
        for batch in batches:
            if max_batches is not None and used >= max_batches:
                break
            model(batch[0] if isinstance(batch, (tuple, list)) else batch)
            used += 1
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.eval()
    return used


def attach(model: nn.Module, amount: float, granularity: str = "weight", layers=LAYERS,
           quantize_bits: int | None = None, temperature: float = 1.0, prior_scale: float = 1.0,
           skip=(), relaxation: str = "softmax", example_inputs=None) -> DPPController:
    """Register a DPP mask (and optional ``quantize_bits`` fake quantisation) on the weight of every
    module of a type in ``layers`` (names in ``skip`` excepted), pruning ``amount`` of each unit's
    elements. The logits become parameters of the model, so optimizers and state dicts see them.
    At filter granularity the BatchNorms that read a masked layer's output are found from one
    forward pass on ``example_inputs`` where given (any model that runs), else from a torch.fx
    trace (models without data-dependent control flow)."""
    if granularity not in GRANULARITIES:
        raise SpaError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if quantize_bits is not None and not 2 <= quantize_bits <= 16:
        raise SpaError(f"quantize_bits must be in [2, 16], got {quantize_bits}")
    chosen = {name: module for name, module in model.named_modules()
              if isinstance(module, tuple(layers)) and name not in skip}
    batchnorms = {}
    if granularity == "filter":
        batchnorms = _batchnorms_traced(model, set(chosen)) if example_inputs is None else \
            _batchnorms_read(model, set(chosen), example_inputs)
    masks = {}
    for name, module in chosen.items():
        taken = [t for t in ("weight", "bias") if parametrize.is_parametrized(module, t)]
        if taken:
            raise SpaError(f"{name}: {taken[0]} already parametrized")
        mask = DPPMask(module.weight, amount, granularity, temperature, prior_scale, relaxation)
        parametrize.register_parametrization(module, "weight", DPPWeight(mask, quantize_bits), unsafe=True)
        if granularity == "filter" and module.bias is not None:
            parametrize.register_parametrization(module, "bias", DPPBias(mask.filters), unsafe=True)
        masks[name] = mask
    for norm, layer in batchnorms.items():
        for tensor in ("weight", "bias"):
            parametrize.register_parametrization(model.get_submodule(norm), tensor, DPPBias(masks[layer].filters),
                                                 unsafe=True)
    if not masks:
        raise SpaError(f"no {', '.join(t.__name__ for t in layers)} layer to attach DPP masks to")
    return DPPController(masks, granularity, quantize_bits, batchnorms)


def _batchnorms_traced(model: nn.Module, layers: set) -> dict[str, str]:
    """{BatchNorm name: the layer of `layers` whose output is its input} for affine BatchNorms
    called once, from a torch.fx trace of `model`; {} where the model does not trace (those
    BatchNorms stay unmasked: finalize(physical=True) reports what their shifts move)."""
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # data-dependent control flow, unsupported ops: fx raises many kinds
        return {}
    calls = [node for node in graph.nodes if node.op == "call_module"]
    sites = collections.Counter(node.target for node in calls)
    found = {}
    for node in calls:
        source = node.args[0] if node.args else None
        if _pairable(model.get_submodule(node.target)) and getattr(source, "op", None) == "call_module" and \
                source.target in layers and sites[node.target] == 1 and sites[source.target] == 1:
            found[node.target] = source.target
    return found


def _batchnorms_read(model: nn.Module, layers: set, example_inputs) -> dict[str, str]:
    """The same pairs as `_batchnorms_traced`, from forward hooks on one eval-mode pass over
    `example_inputs` (a tensor or a sequence of them, as make_physical takes): a BatchNorm pairs
    with a layer when its input is the very tensor the layer returned, not modified in place since
    (same object, same version counter)."""
    from .torch_export import as_args

    produced, read, handles = collections.defaultdict(list), collections.defaultdict(list), []
    kept = []  # the outputs stay alive, so that no other tensor takes their id during the pass

    def record_output(name):
        def hook(module, args, output):
            kept.append(output)
            produced[name].append((id(output), output._version))
        return hook

    def record_input(name):
        def hook(module, args):
            x = args[0] if args else None
            read[name].append((id(x), getattr(x, "_version", None)))
        return hook

    for name, module in model.named_modules():
        if name in layers:
            handles.append(module.register_forward_hook(record_output(name)))
        elif _pairable(module):
            handles.append(module.register_forward_pre_hook(record_input(name)))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(*as_args(example_inputs))
    except Exception as exc:  # the model's own error on inputs that do not fit it: one line, cause chained
        raise SpaError(f"dpp: example_inputs do not run through the model ({type(exc).__name__}: "
                       f"{first_line(exc)})") from exc
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.train(training)
    by_tensor = {calls[0]: name for name, calls in produced.items() if len(calls) == 1}
    return {norm: by_tensor[calls[0]] for norm, calls in read.items() if len(calls) == 1 and calls[0] in by_tensor}


def _pairable(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine
