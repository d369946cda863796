"""Packed rows through the Gated DeltaNet layers of the stock transformers Qwen3.5 models.

transformers forwards the packing arguments (`cu_seq_lens_q`) to every decoder layer, but its Gated
DeltaNet runs the causal conv over the whole row and hands `cu_seqlens` to a torch delta rule that
ignores it: a packed row's recurrent state and conv window flow from one sample into the next.
`enable_varlen_linear_attention` replaces the forward of each module at the family's
`ModuleMap.linear_attention` path with `_packed_forward`, which with packing arguments runs both
through ops/torch/gated_delta.py (restarting at every sample) and without them (padded batches,
generation with a cache) is the stock forward, unchanged. The same projections, norm and parameters
as the stock module, so LoRA on them and checkpoints are unaffected. Under sequence parallelism
(sequence_parallel.py) the layer is head-parallel: `_head_parallel_forward`.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from vltune.core.families import get_family
from vltune.ops.torch.gated_delta import causal_conv1d_varlen, chunk_gated_delta_rule_varlen

from . import sequence_parallel
from .models import has_forward, part, swap_forward


def _packed_forward(self, hidden_states: torch.Tensor, *args, **kwargs):
    """The module's forward; its arguments are passed through as the decoder layer gave them (the cache's
    keyword was `cache_params` before transformers 5.2x, `cache` since)."""
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:
        return type(self).forward(self, hidden_states, *args, **kwargs)
    cache = args[0] if args else kwargs.get("cache", kwargs.get("cache_params"))
    attention_mask = kwargs.get("attention_mask")
    problems = []
    if hidden_states.shape[0] != 1:
        problems.append(f"a packed batch has one row, got {hidden_states.shape[0]}")
    if cache is not None:
        problems.append("a recurrent cache (packed rows are for training and scoring)")
    if attention_mask is not None:
        problems.append("an attention mask (packed rows carry cu_seqlens instead)")
    if problems:
        raise NotImplementedError(f"packed Gated DeltaNet: unsupported {'; '.join(problems)}")
    group = sequence_parallel.active()
    if group is not None:
        return _head_parallel_forward(self, hidden_states, cu_seqlens, group)
    _, length, _ = hidden_states.shape
    mixed = causal_conv1d_varlen(self.in_proj_qkv(hidden_states), self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                 self.activation, cu_seqlens)
    query, key, value = torch.split(mixed, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
    query = query.reshape(1, length, -1, self.head_k_dim)
    key = key.reshape(1, length, -1, self.head_k_dim)
    value = value.reshape(1, length, -1, self.head_v_dim)
    beta = self.in_proj_b(hidden_states).sigmoid()
    # as the stock forward: in fp32, or A could overflow to -inf in fp16
    g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(hidden_states).float() + self.dt_bias)
    reference = inspect.getmodule(type(self)).torch_chunk_gated_delta_rule
    out = chunk_gated_delta_rule_varlen(query, key, value, g, beta, cu_seqlens, reference)
    z = self.in_proj_z(hidden_states)
    out = self.norm(out.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim))
    return self.out_proj(out.reshape(1, length, -1))


def _head_parallel_forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, group) -> torch.Tensor:
    """The packed forward under sequence parallelism: heads are independent, so after the projections
    (per token, on this rank's shard) one all-to-all gives this rank every token of its share of the
    heads; the conv (per channel) and the delta rule (per head) then run over whole samples, and a
    second all-to-all returns the outputs to the shards for the gated norm and `out_proj`."""
    n, rank = group.size, group.rank
    hidden = hidden_states[0]
    tokens = hidden.shape[0]
    hk, hv = self.num_k_heads // n, self.num_v_heads // n
    q, k, v = torch.split(self.in_proj_qkv(hidden), [self.key_dim, self.key_dim, self.value_dim], dim=-1)
    # per rank, its heads' q, k and v channels side by side: [T/N, N, channels / N]
    mixed = torch.cat([q.reshape(tokens, n, -1), k.reshape(tokens, n, -1), v.reshape(tokens, n, -1)], dim=-1)
    mixed = group.seq_to_heads(mixed)[:, 0]  # [T, channels / N]
    beta = self.in_proj_b(hidden).sigmoid()
    g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(hidden).float() + self.dt_bias)
    gates = group.seq_to_heads(torch.stack([g, beta.float()], dim=-1))  # [T, HV / N, 2]
    g, beta = gates[..., 0][None], gates[..., 1].to(beta.dtype)[None]
    # this rank's channels of the depthwise conv, in the same q | k | v order
    weight, bias = self.conv1d.weight.squeeze(1), self.conv1d.bias
    key_share, value_share = hk * self.head_k_dim, hv * self.head_v_dim
    channels = torch.cat([torch.arange(rank * key_share, (rank + 1) * key_share) + offset for offset in (0, self.key_dim)]
                         + [torch.arange(rank * value_share, (rank + 1) * value_share) + 2 * self.key_dim]).to(weight.device)
    mixed = causal_conv1d_varlen(mixed[None], weight[channels], bias[channels] if bias is not None else None,
                                 self.activation, cu_seqlens)
    query, key, value = torch.split(mixed, [key_share, key_share, value_share], dim=-1)
    length = query.shape[1]
    reference = inspect.getmodule(type(self)).torch_chunk_gated_delta_rule
    out = chunk_gated_delta_rule_varlen(query.reshape(1, length, hk, self.head_k_dim), key.reshape(1, length, hk, self.head_k_dim),
                                        value.reshape(1, length, hv, self.head_v_dim), g, beta, cu_seqlens, reference)
    out = group.heads_to_seq(out[0])  # [T/N, HV, Dv]
    z = self.in_proj_z(hidden)
    out = self.norm(out.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim))
    return self.out_proj(out.reshape(1, tokens, -1))


def linear_attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The recurrent token mixers of a hybrid model's decoder layers (none for attention-only families)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    path = get_family(base.config.model_type).modules.linear_attention
    if path is None:
        return []
    return [layer.get_submodule(path) for layer in part(base, "decoder_layers") if hasattr(layer, path.split(".")[0])]


def enable_varlen_linear_attention(model: torch.nn.Module) -> int:
    """Packed rows restart every recurrent layer at each sample; idempotent; returns the layer count."""
    return swap_forward(linear_attention_modules(model), _packed_forward)


def linear_attention_varlen_ready(model: torch.nn.Module) -> bool:
    """Whether every recurrent layer of `model` honours packing arguments (trivially true without any)."""
    return all(has_forward(m, _packed_forward) for m in linear_attention_modules(model))
