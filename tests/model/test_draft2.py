"""The DFlash 2 draft (shared/docs/dflash2.md): config, published layout, conv and selector numerics.

The NumPy references below are written from the spec's formulas (§2.1, §2.2), not from our code: loops
over block rows, taps and slots, so a wrong axis, shift, group mapping or predecessor shows up.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tiny_models import DFLASH2, build_draft, build_draft2, draft_config, save_tiny_draft, target_config

from engine.model.draft import (
    DFlash2Draft,
    DFlashDraft,
    DraftConfig,
    GroupedDynamicConv,
    load_draft,
    make_draft,
    quantizable,
    walk_lattice,
)
from engine.model.packed_draft import unpacked_parameters
from engine.model.transposed import untransposed_parameters

TARGET = target_config("qwen3")
SIZES = {"target_hidden_size": 64, "target_vocab_size": 96, "target_num_layers": 4}
H, V, G, K_TAPS, R, TOP_K = 64, 96, 16, 2, 8, 6


def dflash1_keys(num_layers: int) -> set[str]:
    per_layer = [
        "input_layernorm.weight", "post_attention_layernorm.weight",
        *(f"self_attn.{p}_proj.weight" for p in "qkvo"), "self_attn.q_norm.weight", "self_attn.k_norm.weight",
        *(f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
    ]
    return {f"layers.{i}.{k}" for i in range(num_layers) for k in per_layer} | {"fc.weight", "hidden_norm.weight",
                                                                                  "norm.weight"}


def dflash2_shapes(num_layers: int, hidden: int, vocab: int, k: int, g: int, r: int) -> dict[str, tuple[int, ...]]:
    """The new tensors of the published layout (dflash2.md §1.2 table), written out by hand."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(num_layers):
        for conv in ("attention_conv", "mlp_conv"):
            shapes[f"layers.{i}.{conv}.base_kernel"] = (2, k, hidden)
            shapes[f"layers.{i}.{conv}.kernel_projection.weight"] = (2 * k * hidden // g, hidden)
    shapes["candidate_selector.hidden_projection.weight"] = (r, hidden)
    shapes["candidate_selector.predecessor_codebook"] = (vocab, r)  # bare: no ".weight"
    shapes["candidate_selector.successor_codebook"] = (vocab, r)
    return shapes


def published_config(**dflash: object) -> dict:
    """A config.json as the Qwen3.8-27B drafter's (dflash2.md §1.1), shrunk to the tiny target."""
    inner = {"block_size": 8, "mask_token_id": 95, "target_layer_ids": [1, 3], "conv_kernel_size": 2,
             "conv_group_size": 16, "selector_rank": 8, "selector_top_k": 6, **dflash}
    return {
        "architectures": ["DFlash2DraftModel"], "model_type": "qwen3", "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128,
        "vocab_size": 96, "rms_norm_eps": 1e-6, "rope_parameters": {"rope_theta": 1e7, "rope_type": "default"},
        "max_position_embeddings": 2048, "layer_types": ["sliding_attention"] * 2, "sliding_window": 2048,
        "use_sliding_window": True, "is_causal": False, "tie_word_embeddings": False, "num_target_layers": 4,
        "dflash_config": {k: v for k, v in inner.items() if v is not None},
    }


def write_published(path: Path, config: dict, *, drop: str | None = None, seed: int = 0) -> Path:
    """A random checkpoint in the published layout, its names and shapes taken from the spec, in bf16."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    inner = config["dflash_config"]
    rng = np.random.default_rng(seed)
    backbone = build_draft(draft_config(TARGET), seed=seed)  # DFlash 1 shapes for the shared tensors
    weights = {k: np.array(v) for k, v in tree_flatten(backbone.parameters())}
    assert set(weights) == dflash1_keys(2)
    shapes = dflash2_shapes(2, H, V, inner.get("conv_kernel_size", 2), inner.get("conv_group_size", 16),
                            inner.get("selector_rank", 8))
    for name, shape in shapes.items():
        weights[name] = 0.3 * rng.standard_normal(shape).astype(np.float32)
    if drop:
        del weights[drop]
    mx.save_safetensors(str(path / "model.safetensors"),
                        {k: mx.array(v).astype(mx.bfloat16) for k, v in weights.items()}, metadata={"format": "pt"})
    return path


# ---- config and layout ------------------------------------------------------------------------------
def test_the_published_config_is_read_from_dflash_config() -> None:
    config = DraftConfig.from_dict(published_config())
    assert config.is_dflash2 and config.block_size == 8  # only inside dflash_config in DFlash 2 configs
    assert (config.conv_kernel_size, config.conv_group_size, config.selector_rank, config.selector_top_k) == (2, 16, 8, 6)
    assert config.is_causal is False and config.layer_types == ("sliding_attention",) * 2
    assert config.rope_theta == 1e7 and config.rope_scaling is None
    assert not DraftConfig.from_dict(draft_config(TARGET).to_dict()).is_dflash2  # DFlash 1 stays DFlash 1


def test_save_writes_the_published_layout(tmp_path: Path) -> None:
    draft = build_draft2(draft_config(TARGET), seed=1)
    save_tiny_draft(draft, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["architectures"] == ["DFlash2DraftModel"] and "block_size" not in raw
    assert {k: raw["dflash_config"][k] for k in (*DFLASH2, "block_size")} == {**DFLASH2, "block_size": 4}
    stored = mx.load(str(tmp_path / "model.safetensors"))
    want = dflash2_shapes(2, H, V, 2, 16, 8)
    assert set(stored) == dflash1_keys(2) | set(want)
    assert {k: tuple(stored[k].shape) for k in want} == want
    loaded = load_draft(tmp_path, **SIZES)
    assert isinstance(loaded, DFlash2Draft)
    published = dict(unpacked_parameters(loaded))
    assert set(published) == set(stored)
    for name, a in tree_flatten(draft.parameters()):
        assert mx.array_equal(a, published[name]), name


def test_a_published_checkpoint_loads_and_keeps_conv_and_selector_unquantized(tmp_path: Path) -> None:
    draft = load_draft(write_published(tmp_path / "d", published_config()), **SIZES)
    assert isinstance(draft, DFlash2Draft) and draft.config.block_size == 8
    stored = mx.load(str(tmp_path / "d" / "model.safetensors"))
    params = dict(untransposed_parameters(draft))
    for name in dflash2_shapes(2, H, V, 2, 16, 8):
        assert mx.array_equal(params[name], stored[name].astype(params[name].dtype)), name
    # quantizing a draft (bench/regime.py, a quantized export) leaves conv and selector alone
    fresh = make_draft(draft.config)  # the loaded one is float32 and transposed on the CPU
    nn.quantize(fresh, group_size=32, bits=8, class_predicate=quantizable)
    kinds = {name: type(m).__name__ for name, m in fresh.named_modules()}
    assert kinds["layers.0.self_attn.q_proj"] == "QuantizedLinear"
    assert kinds["layers.0.attention_conv.kernel_projection"] != "QuantizedLinear"
    assert kinds["candidate_selector.hidden_projection"] != "QuantizedLinear"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"conv_group_size": 24}, r"conv_group_size 24 does not divide hidden_size 64"),
        ({"selector_rank": None}, r"missing dflash_config\.selector_rank"),
        ({"conv_kernel_size": 0}, r"dflash_config\.conv_kernel_size must be a positive integer"),
        ({"selector_top_k": 200}, r"selector_top_k 200 exceeds vocab_size 96"),
        ({"selector_top_k": 4.5}, r"selector_top_k must be a positive integer"),
        ({k: 0 for k in DFLASH2}, r"dflash_config\.conv_kernel_size must be a positive integer"),  # not DFlash 1
    ],
)
def test_bad_configs_fail_at_load_with_one_line(tmp_path: Path, change: dict, message: str) -> None:
    config = published_config(**{k: v for k, v in change.items() if v is not None})
    for key in (k for k, v in change.items() if v is None):
        config["dflash_config"].pop(key)
    write_published(tmp_path, published_config())  # good tensors; the config is the bad part
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message) as info:
        load_draft(tmp_path, **SIZES)
    assert "\n" not in str(info.value)


def test_a_dflash2_config_without_vocab_size_is_refused() -> None:
    config = published_config()
    del config["vocab_size"]
    with pytest.raises(ValueError, match="needs vocab_size"):
        DraftConfig.from_dict(config)


@pytest.mark.parametrize(
    "what, message",
    [("candidate_selector.successor_codebook", r"missing 1 tensors.*successor_codebook"),
     ("layers.1.mlp_conv.base_kernel", r"missing 1 tensors.*mlp_conv\.base_kernel"),
     ("shape", r"predecessor_codebook has shape"),
     ("quantized", r"quantizes layers\.0\.attention_conv\.kernel_projection.*unquantized"),
     ("dflash1", r"unexpected tensors.*(attention_conv|candidate_selector)")],
)
def test_bad_checkpoints_fail_at_load_with_one_line(tmp_path: Path, what: str, message: str) -> None:
    path = write_published(tmp_path, published_config(), drop=what if "." in what else None)
    weights = mx.load(str(path / "model.safetensors"))
    if what == "shape":
        weights["candidate_selector.predecessor_codebook"] = mx.zeros((V, 4))
    elif what == "quantized":
        w, scales, biases = mx.quantize(weights["layers.0.attention_conv.kernel_projection.weight"].astype(mx.float32),
                                        group_size=32, bits=8)
        weights["layers.0.attention_conv.kernel_projection.weight"] = w
        weights["layers.0.attention_conv.kernel_projection.scales"] = scales
        weights["layers.0.attention_conv.kernel_projection.biases"] = biases
    elif what == "dflash1":  # DFlash 2 tensors under a DFlash 1 config
        config = draft_config(TARGET, block_size=8).to_dict()
        (path / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    with pytest.raises(ValueError, match=message) as info:
        load_draft(path, **SIZES)
    assert "\n" not in str(info.value)


# ---- conv numerics ------------------------------------------------------------------------------------
def np_conv(v: np.ndarray, dynamic: np.ndarray, base: np.ndarray, group: int) -> np.ndarray:
    """dflash2.md §2.1 for one side: v (L, H) one block's rows, dynamic (L, K, H/G), base (K, H).

    conv(v)_t[c] = sum_j (base[j, c] + dynamic[t, j, c // G]) * v[t - j, c], v[t - j] = 0 for t - j < 0.
    """
    length, hidden = v.shape
    out = np.zeros_like(v)
    for t in range(length):
        for j in range(base.shape[0]):
            if t - j < 0:
                continue
            for c in range(hidden):
                out[t, c] += (base[j, c] + dynamic[t, j, c // group]) * v[t - j, c]
    return out


def np_coefficients(u: np.ndarray, projection: np.ndarray, k: int, group: int) -> np.ndarray:
    """D = kernel_projection(u), last dim read as [side, tap, group] (side-major): (L, 2, K, H/G)."""
    return (u @ projection.T).reshape(u.shape[0], 2, k, u.shape[1] // group)


@pytest.mark.parametrize("kernel_size, group, blocks, rows", [(2, 16, 1, 5), (2, 8, 3, 4), (3, 4, 2, 3), (2, 64, 1, 1)])
def test_conv_matches_the_spec_formula(kernel_size: int, group: int, blocks: int, rows: int) -> None:
    rng = np.random.default_rng(kernel_size * 100 + group)
    conv = GroupedDynamicConv(H, kernel_size, group)
    base = rng.standard_normal((2, kernel_size, H)).astype(np.float32)
    projection = 0.2 * rng.standard_normal((2 * kernel_size * H // group, H)).astype(np.float32)
    conv.base_kernel = mx.array(base)
    conv.kernel_projection.weight = mx.array(projection)
    u = rng.standard_normal((1, blocks * rows, H)).astype(np.float32)  # normalised sublayer input
    y = rng.standard_normal((1, blocks * rows, H)).astype(np.float32)  # sublayer output
    prepared, dynamic = conv.prepare(mx.array(u), segment=rows)
    finished = conv.finish(mx.array(y), dynamic, segment=rows)
    for b in range(blocks):  # each block on its own: nothing crosses a block boundary
        rows_b = slice(b * rows, (b + 1) * rows)
        coeff = np_coefficients(u[0, rows_b], projection, kernel_size, group)
        want_prepare = np_conv(u[0, rows_b], coeff[:, 0], base[0], group)
        want_finish = np_conv(y[0, rows_b], coeff[:, 1], base[1], group)  # side 1 comes from u too
        np.testing.assert_allclose(np.array(prepared[0, rows_b]), want_prepare, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.array(finished[0, rows_b]), want_finish, rtol=1e-5, atol=1e-5)


def test_conv_starts_as_the_identity_and_is_causal_inside_the_block() -> None:
    conv = GroupedDynamicConv(H, 2, 16)
    x = mx.random.normal((1, 6, H), key=mx.random.key(0))
    out, dynamic = conv.prepare(x)
    assert mx.array_equal(out, x) and mx.array_equal(conv.finish(x, dynamic), x)
    conv.base_kernel = mx.random.normal((2, 2, H), key=mx.random.key(1))
    conv.kernel_projection.weight = 0.1 * mx.random.normal(conv.kernel_projection.weight.shape, key=mx.random.key(2))
    y = conv.prepare(x, segment=3)[0]
    later = conv.prepare(x.at[:, 4].add(1.0), segment=3)[0]  # row 1 of the second block
    changed = mx.abs(later - y).max(axis=-1)[0].tolist()
    assert changed[:4] == [0.0] * 4 and changed[4] > 0 and changed[5] > 0  # itself and its successor only
    first_block = conv.prepare(x.at[:, 3].add(1.0), segment=3)[0]  # the second block's anchor row
    assert mx.abs(first_block - y)[0, :3].max().item() == 0.0  # no tap reaches across blocks


# ---- selector numerics -----------------------------------------------------------------------------------
def np_walk(hidden: np.ndarray, logits: np.ndarray, anchor: int, gate: np.ndarray, pred: np.ndarray,
            succ: np.ndarray, top_k: int, temperature: float = 0.0, noise: np.ndarray | None = None,
            ) -> tuple[list[int], list[np.ndarray], list[np.ndarray]]:
    """dflash2.md §2.2, slot by slot: S_t(a, b) = U_t(b) + sum_k A[a, k] g_t[k] B[b, k] over C_t = top-K of U_t.

    Greedy: argmax; else argmax of S/T + noise[t] at the candidates (a Gumbel-max draw from softmax(S/T)).
    Returns the tokens, each slot's candidates and its realized q_t = softmax(S_t(prev, .)/T).
    """
    prev, tokens, candidates, qs = anchor, [], [], []
    for t in range(hidden.shape[0]):
        ids = np.argsort(-logits[t], kind="stable")[:top_k]
        g = gate @ hidden[t]
        s = logits[t, ids] + np.array([np.sum(pred[prev] * g * succ[b]) for b in ids])
        if temperature == 0:
            j = int(np.argmax(s))
        else:
            z = s / temperature
            q = np.exp(z - z.max())
            qs.append(q / q.sum())
            j = int(np.argmax(z + noise[t, ids]))
        prev = int(ids[j])
        tokens.append(prev)
        candidates.append(ids)
    return tokens, candidates, qs


def random_selector_case(seed: int, rows: int = 7) -> tuple[DFlash2Draft, np.ndarray, np.ndarray, int]:
    draft = build_draft2(draft_config(TARGET), seed=seed, scale=1.0)
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((rows, H)).astype(np.float32)
    logits = (2.0 * rng.standard_normal((rows, V))).astype(np.float32)
    return draft, hidden, logits, int(rng.integers(0, V))


def selector_weights(draft: DFlash2Draft) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sel = draft.candidate_selector
    return np.array(sel.hidden_projection.weight), np.array(sel.predecessor_codebook), np.array(sel.successor_codebook)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_selector_walk_matches_the_spec(seed: int) -> None:
    draft, hidden, logits, anchor = random_selector_case(seed)
    gate, pred, succ = selector_weights(draft)
    want, want_ids, _ = np_walk(hidden, logits, anchor, gate, pred, succ, TOP_K)
    sel = draft.candidate_selector
    ids, scores = sel.lattice(mx.array(hidden), mx.array(logits), anchor)
    picked, _ = walk_lattice(scores)
    got = mx.take_along_axis(ids, picked[:, None], axis=-1)[:, 0].tolist()
    assert got == want
    assert [sorted(r) for r in ids.tolist()] == [sorted(r.tolist()) for r in want_ids]  # C_t = top-K of U_t
    base_argmax = logits.argmax(-1).tolist()
    assert got != base_argmax  # the pair scores changed the path: the test is not argmax in disguise
    # the lattice itself: scores[t, i, j] = S_t(C_{t-1}[i], C_t[j]), slot 1 from the anchor
    ids_np, s = np.array(ids), np.array(scores)
    for t in range(len(want)):
        for i in range(TOP_K):
            a = anchor if t == 0 else ids_np[t - 1, i]
            g = gate @ hidden[t]
            row = logits[t, ids_np[t]] + np.array([np.sum(pred[a] * g * succ[b]) for b in ids_np[t]])
            np.testing.assert_allclose(s[t, i], row, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
def test_sampled_walk_and_its_q_rows_match_the_spec(temperature: float) -> None:
    from engine.decode.drafters import DFlashDrafter
    from engine.decode.sampling import SamplingParams, TokenRng

    draft, hidden, logits, anchor = random_selector_case(5)
    gate, pred, succ = selector_weights(draft)
    noise = np.array(mx.random.gumbel(shape=(7, V), key=mx.random.key(9)))
    want, want_ids, want_q = np_walk(hidden, logits, anchor, gate, pred, succ, TOP_K, temperature, noise)
    sel = draft.candidate_selector
    ids, scores = sel.lattice(mx.array(hidden), mx.array(logits), anchor)
    picked, previous = walk_lattice(scores / temperature, mx.take_along_axis(mx.array(noise), ids, axis=-1))
    assert mx.take_along_axis(ids, picked[:, None], axis=-1)[:, 0].tolist() == want
    # the drafter's proposal: tokens drawn from q_t and the realized q_t rows, scattered on the vocabulary
    drafter = DFlashDrafter.__new__(DFlashDrafter)
    drafter.draft, drafter.dflash2 = draft, True
    drafter.target = type("T", (), {"vocab_size": V})()
    proposal = drafter._select(mx.array(hidden), mx.array(logits), anchor, 0,
                               SamplingParams(temperature=temperature), TokenRng(3, by_position=False))
    tokens = proposal.tokens.tolist()
    q = np.exp(np.array(proposal.draft_logprobs))  # (k, V)
    _, ids_np, q_np = np_walk(hidden, logits, anchor, gate, pred, succ, TOP_K, temperature,
                              noise=_forcing_noise(tokens, V))  # the numpy walk along the drafter's own draws
    for t, token in enumerate(tokens):
        assert token in ids_np[t]
        np.testing.assert_allclose(q[t, ids_np[t]], q_np[t], rtol=1e-5, atol=1e-6)
        assert q[t].sum() == pytest.approx(1.0, abs=1e-5)
        assert np.count_nonzero(q[t]) == TOP_K  # zero outside C_t


def _forcing_noise(tokens: list[int], vocab: int) -> np.ndarray:
    """Noise that makes np_walk pick `tokens` (to read the q rows along a given path)."""
    noise = np.full((len(tokens), vocab), -1e9)
    noise[np.arange(len(tokens)), tokens] = 0.0
    return noise


def test_an_identity_selector_is_the_argmax() -> None:
    draft = build_draft2(draft_config(TARGET), seed=3, identity=True)
    assert not mx.any(draft.candidate_selector.successor_codebook).item()
    assert mx.any(draft.candidate_selector.predecessor_codebook).item()  # N(0, 0.02): only B starts at 0
    logits = mx.random.normal((7, V), key=mx.random.key(4))
    ids, scores = draft.candidate_selector.lattice(mx.random.normal((7, H), key=mx.random.key(5)), logits, 17)
    picked, _ = walk_lattice(scores)
    assert mx.take_along_axis(ids, picked[:, None], axis=-1)[:, 0].tolist() == mx.argmax(logits, axis=-1).tolist()


# ---- identity DFlash 2 == the DFlash 1 draft it wraps ---------------------------------------------------------
def test_identity_dflash2_equals_the_dflash1_draft_logit_for_logit(tmp_path: Path) -> None:
    dflash1 = build_draft(draft_config(TARGET, block_size=8), seed=6)
    dflash2 = DFlash2Draft.wrapping(dflash1, **DFLASH2)
    # the selector's gate and predecessor codebook are live (random); identity = conv taps (1, 0), no dynamic
    # part, successor codebook 0
    dflash2.candidate_selector.hidden_projection.weight = mx.random.normal((R, H), key=mx.random.key(7))
    save_tiny_draft(dflash1, tmp_path / "d1")
    save_tiny_draft(dflash2, tmp_path / "d2")
    ones = [load_draft(tmp_path / "d1", **SIZES), load_draft(tmp_path / "d2", **SIZES)]
    assert type(ones[0]) is DFlashDraft and type(ones[1]) is DFlash2Draft
    ctx = mx.random.normal((1, 10, H), key=mx.random.key(8))
    noise = mx.random.normal((1, 8, H), key=mx.random.key(9))
    head = nn.Linear(H, V, bias=False)
    for a, b in ((dflash1, dflash2), tuple(ones)):
        ca, cb = a.make_cache(), b.make_cache()
        for start in (0, 6):  # two cycles through the caches
            ha = a(noise, ctx[:, start : start + 6], cache=ca, q_offset=ca[0].offset + 6)
            hb = b(noise, ctx[:, start : start + 6], cache=cb, q_offset=cb[0].offset + 6)
            assert mx.array_equal(ha, hb).item()
            assert mx.array_equal(a.logits(ha, head), b.logits(hb, head)).item()
    # the training call too (several blocks under one mask, conv block-local)
    mask = mx.ones((16, 10 + 16), dtype=mx.bool_)
    two = mx.concatenate([noise, noise[:, ::-1]], axis=1)
    assert mx.array_equal(dflash1(two, ctx, q_offset=mx.arange(16), mask=mask),
                          dflash2(two, ctx, q_offset=mx.arange(16), mask=mask, block_size=8)).item()


def test_make_draft_builds_the_configs_kind() -> None:
    assert type(make_draft(draft_config(TARGET))) is DFlashDraft
    two = make_draft(DraftConfig.from_dict(published_config()))
    assert type(two) is DFlash2Draft
    params = dict(tree_flatten(two.parameters()))
    base = np.array(params["layers.0.attention_conv.base_kernel"])
    assert (base[:, 0] == 1).all() and (base[:, 1:] == 0).all()
    assert not np.array(params["layers.1.mlp_conv.kernel_projection.weight"]).any()
