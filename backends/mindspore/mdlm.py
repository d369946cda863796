"""The MindSpore half of masked diffusion: the weighted loss and the sampler's per-step proposal.

The bidirectional forward is the native model with `ModelInputs(causal=False)`: every real token sees
every real token, padding stays masked (the torch side needs `is_causal = False` on every layer plus a
4D padding-only mask to get the same). Masking, normalisation and the sampler loop are core/'s.
"""

from __future__ import annotations

import numpy as np
from mindspore import Tensor, nn

from vltune.core.contracts import Batch
from vltune.core.mdlm import MdlmObjective
from vltune.core.mdlm_sampler import Propose, SamplerSettings, diffusion_generate

from .models import ModelInputs


def bidirectional_logits(model: nn.Cell, batch: Batch, logits_to_keep: int = 0) -> Tensor:
    if "cu_seqlens" in batch or "attention_mask" not in batch:
        raise NotImplementedError("bidirectional attention needs a padded batch with attention_mask (packed batches are not supported yet)")
    return model(ModelInputs.from_batch(batch, model.cfg, causal=False), logits_to_keep)


def make_propose(model: nn.Cell, mask_token_id: int) -> Propose:
    """core.mdlm_sampler.Propose for a MindSpore model. The Gumbel noise is numpy's (seeded from the
    loop's generator), so T > 0 samples are reproducible per backend; T = 0 matches the torch backend."""

    def propose(batch: Batch, keep: int, temperature: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        logits = bidirectional_logits(model, batch, logits_to_keep=keep).asnumpy().astype(np.float64)
        logits[..., mask_token_id] = -np.inf  # the mask is never a proposal
        if temperature > 0:
            uniform = np.random.default_rng(int(rng.integers(2**62))).random(logits.shape)
            x0 = (logits / temperature - np.log(-np.log(np.maximum(uniform, 1e-300)))).argmax(-1)
        else:
            x0 = logits.argmax(-1)
        shifted = logits - logits.max(-1, keepdims=True)
        probs = np.exp(shifted) / np.exp(shifted).sum(-1, keepdims=True)
        confidence = np.take_along_axis(probs, x0[..., None], -1)[..., 0]
        return x0.astype(np.int64), confidence

    return propose


def diffusion_sample(model: nn.Cell, batch: Batch, objective: MdlmObjective, max_new_tokens: int) -> list[list[int]]:
    """Masked-diffusion generation of `max_new_tokens` for each left-padded prompt row (the recipe's sampler keys)."""
    model.set_train(False)
    a = objective.args
    settings = SamplerSettings(
        gen_length=max_new_tokens, block_length=a.mdlm_block_length, steps=a.mdlm_steps,
        remasking=a.mdlm_remasking, temperature=a.mdlm_temperature, schedule=a.noise_schedule,
    )
    return diffusion_generate(
        make_propose(model, objective.mask_token_id), batch, settings, mask_token_id=objective.mask_token_id,
        end_token_ids=objective.end_token_ids, rng=np.random.default_rng(objective.seed),
    )
