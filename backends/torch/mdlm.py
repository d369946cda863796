"""The torch half of masked diffusion: the bidirectional forward, the weighted loss, and the
sampler's per-step proposal. The masking, the normalisation and the sampler's loop are in
core.mdlm / core.mdlm_sampler, shared with every backend."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch

from vltune.core.contracts import Batch
from vltune.core.mdlm_sampler import Propose, SamplerSettings, diffusion_generate

from .batch import to_model_inputs, to_tensor
from .models.bidirectional import padding_only_mask, text_attention_modules


def attn_implementation(model: torch.nn.Module) -> str:
    """The text model's attention kernel (sdpa | eager), which decides the 4D mask's dtype."""
    return text_attention_modules(model)[0].config._attn_implementation


def bidirectional_logits(
    model: torch.nn.Module, batch: Batch, device: torch.device, *, circle=None, autocast_dtype=None, logits_to_keep: int = 0,
    router_logits: list | None = None,
) -> torch.Tensor:
    """Logits [B, L, V] (or of the last `logits_to_keep` positions) with every real token visible to every
    position. The model must have been through models.bidirectional.make_bidirectional. An MoE model's
    router logits are appended to `router_logits` when a list is given (its load-balancing loss)."""
    if "cu_seqlens" in batch or "attention_mask" not in batch:
        raise NotImplementedError("bidirectional attention needs a padded batch with attention_mask (packed batches are not supported yet)")
    if any(module.is_causal for module in text_attention_modules(model)):
        raise RuntimeError("the model still has causal text attention layers: call make_bidirectional(model) first")
    inputs = to_model_inputs(batch, device, model=model)
    inputs["attention_mask"] = padding_only_mask(inputs["attention_mask"], attn_implementation(model))
    alt = batch.get("position_ids_alt")
    layers = circle.alt_positions(to_tensor(alt, device, torch.long)) if circle is not None and alt is not None else nullcontext()
    # Router logits through hooks: asking the forward for them (output_router_logits) would also make it
    # compute the load-balancing loss with the 4-D bidirectional mask, which that function cannot take.
    hooks = [] if router_logits is None else [
        router.register_forward_hook(lambda module, args, output: router_logits.append(output[0])) for router in _routers(model)
    ]
    try:
        with layers, torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            return model(**inputs, use_cache=False, logits_to_keep=logits_to_keep).logits
    finally:
        for hook in hooks:
            hook.remove()


def _routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The MoE routers of the decoder layers (the family's module map), in layer order."""
    from vltune.core.families import get_family

    from .models import part

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    path = get_family(base.config.model_type).modules.moe_router
    if path is None:
        return []
    out = []
    for layer in part(model, "decoder_layers"):
        try:
            out.append(layer.get_submodule(path))
        except AttributeError:  # a dense layer (mlp_only_layers / decoder_sparse_step)
            continue
    return out


def make_propose(model: torch.nn.Module, mask_token_id: int, *, circle=None, autocast_dtype=None) -> Propose:
    """The sampler's per-step proposal (core.mdlm_sampler.Propose) for a bidirectional model."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def propose(batch: Batch, keep: int, temperature: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        logits = bidirectional_logits(model, batch, device, circle=circle, autocast_dtype=autocast_dtype, logits_to_keep=keep)
        logits = logits.double()  # Gumbel-max in low precision collapses the sampling distribution
        logits[..., mask_token_id] = float("-inf")  # the mask is never a proposal
        if temperature > 0:
            generator = torch.Generator(device=device).manual_seed(int(rng.integers(2**62)))
            uniform = torch.rand(logits.shape, generator=generator, device=device, dtype=torch.float64)
            gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-300)))
            x0 = (logits / temperature + gumbel).argmax(-1)
        else:
            x0 = logits.argmax(-1)
        confidence = torch.softmax(logits, dim=-1).gather(-1, x0[..., None])[..., 0]
        return x0.cpu().numpy().astype(np.int64), confidence.cpu().numpy()

    return propose


def diffusion_sample(
    model: torch.nn.Module,
    batch: Batch,
    settings: SamplerSettings,
    *,
    mask_token_id: int,
    end_token_ids: tuple[int, ...],
    seed: int = 0,
    circle=None,
    autocast_dtype=None,
) -> list[list[int]]:
    """Masked-diffusion generation for each left-padded prompt row of `batch` (the Python API)."""
    model.eval()
    propose = make_propose(model, mask_token_id, circle=circle, autocast_dtype=autocast_dtype)
    return diffusion_generate(
        propose, batch, settings, mask_token_id=mask_token_id, end_token_ids=end_token_ids,
        rng=np.random.default_rng(seed),
    )
