"""An independent, deliberately plain Ouro forward written from docs/design.md, "Checkpoint layout".

It reads a raw state dict (the published tensor names) and shares no code with looplm, so the
tests can check that looplm computes what a published-format checkpoint means.
"""

import torch


def _rms(x, w, eps):
    xf = x.float()
    return w * (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x, theta):  # x (B, H, S, D), rotate-half convention, positions 0..S-1
    D, S = x.shape[-1], x.shape[-2]
    inv = 1.0 / theta ** (torch.arange(0, D, 2).float() / D)
    ang = torch.arange(S).float()[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    rot = torch.cat([-x[..., D // 2 :], x[..., : D // 2]], -1)
    return x * cos + rot * sin


def reference_per_loop(sd: dict, cfg: dict, ids: torch.Tensor):
    """(B, S) ids -> (logits (T, B, S, V), lambdas (T, B, S))."""
    H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads", nh)
    hd, eps = H // nh, cfg["rms_norm_eps"]
    lm_head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    B, S = ids.shape
    h = sd["model.embed_tokens.weight"][ids]
    causal = torch.ones(S, S).tril().bool()
    logits, lambdas = [], []
    for _ in range(cfg["total_ut_steps"]):
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            x = _rms(h, sd[p + "input_layernorm.weight"], eps)
            q = (x @ sd[p + "self_attn.q_proj.weight"].T).view(B, S, nh, hd).transpose(1, 2)
            k = (x @ sd[p + "self_attn.k_proj.weight"].T).view(B, S, nkv, hd).transpose(1, 2)
            v = (x @ sd[p + "self_attn.v_proj.weight"].T).view(B, S, nkv, hd).transpose(1, 2)
            q, k = _rope(q, cfg["rope_theta"]), _rope(k, cfg["rope_theta"])
            k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
            att = (q @ k.transpose(-1, -2)) / hd**0.5
            att = att.masked_fill(~causal, float("-inf")).softmax(-1)
            a = (att @ v).transpose(1, 2).reshape(B, S, H) @ sd[p + "self_attn.o_proj.weight"].T
            h = h + _rms(a, sd[p + "input_layernorm_2.weight"], eps)
            x = _rms(h, sd[p + "post_attention_layernorm.weight"], eps)
            gate = x @ sd[p + "mlp.gate_proj.weight"].T
            m = (torch.nn.functional.silu(gate) * (x @ sd[p + "mlp.up_proj.weight"].T)) @ sd[p + "mlp.down_proj.weight"].T
            h = h + _rms(m, sd[p + "post_attention_layernorm_2.weight"], eps)
        h = _rms(h, sd["model.norm.weight"], eps)
        logits.append(h @ lm_head.T)
        lambdas.append(torch.sigmoid(h @ sd["model.early_exit_gate.weight"].T + sd["model.early_exit_gate.bias"]).squeeze(-1))
    return torch.stack(logits), torch.stack(lambdas)


def random_published_state(cfg: dict, seed: int) -> dict:
    """A state dict with exactly the names and shapes of docs/design.md, "Checkpoint layout", filled with fresh random values."""
    g = torch.Generator().manual_seed(seed)
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh = cfg["num_attention_heads"]
    nkv, hd = cfg.get("num_key_value_heads", nh), H // nh

    def r(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    sd = {"model.embed_tokens.weight": r(V, H, std=1.0), "model.norm.weight": 1 + r(H, std=0.1)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd |= {
            p + "self_attn.q_proj.weight": r(nh * hd, H), p + "self_attn.k_proj.weight": r(nkv * hd, H),
            p + "self_attn.v_proj.weight": r(nkv * hd, H), p + "self_attn.o_proj.weight": r(H, nh * hd),
            p + "mlp.gate_proj.weight": r(I, H), p + "mlp.up_proj.weight": r(I, H), p + "mlp.down_proj.weight": r(H, I),
        }
        for n in ("input_layernorm", "input_layernorm_2", "post_attention_layernorm", "post_attention_layernorm_2"):
            sd[p + n + ".weight"] = 1 + r(H, std=0.1)
    sd["model.early_exit_gate.weight"], sd["model.early_exit_gate.bias"] = r(1, H), r(1)
    if not cfg.get("tie_word_embeddings", False):
        sd["lm_head.weight"] = r(V, H)
    return sd
