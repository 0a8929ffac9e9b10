"""Training DFlash 2 drafts (python -m engine.train fit --arch dflash2): CPU smoke tests on tiny models.

The objective is NeMo AutoModel's public one (shared/docs/dflash2.md §5.1; the official one is unpublished):
block CE + λ · the selector's teacher-forced K-way CE. These check its wiring, not its quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tiny_models import build_draft, build_target, draft_config, save_tiny_draft, target_config

from engine.decode.drafters import DFlashDrafter
from engine.decode.sampling import SamplingParams, TokenRng
from engine.model.draft import DFlash2Draft, DFlashDraft, load_draft
from engine.model.target import Target
from engine.model.tokenizer import Tokenizer
from engine.model.transposed import untransposed_parameters
from engine.train.__main__ import main
from engine.train.dataset import BlockBatch, ShardWriter, TokenDataset
from engine.train.objective import block_targets, dflash_loss
from engine.train.trainer import TrainConfig, Trainer
from tests.model.test_loader import save_tiny_dir
from tests.train.test_train import VOCAB, periodic_samples

SMALL = {"conv_group_size": 16, "selector_rank": 16, "selector_top_k": 8}


@pytest.fixture(scope="module")
def tiny() -> tuple[Target, DFlashDraft]:
    config = target_config("llama", vocab_size=VOCAB)
    draft = build_draft(draft_config(config, block_size=4))
    return Target(build_target(config), draft.config.target_layer_ids), draft


def test_an_untrained_dflash2_has_the_dflash1_loss_terms(tiny: tuple[Target, DFlashDraft]) -> None:
    """Identity start: the block CE and the teacher-forced correctness are DFlash 1's; λ only adds the selector CE."""
    target, dflash1 = tiny
    dflash2 = DFlash2Draft.wrapping(dflash1, **SMALL)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB - 1, size=(2, 20)).astype(np.int32)
    batch = BlockBatch(tokens, np.array([20, 18]), np.array([4, 4]), np.array([[5, 9, 13], [4, 8, 12]], dtype=np.int32),
                       np.ones((2, 3), dtype=bool))
    blocks = block_targets(batch, 4, dflash1.config.mask_token_id, gamma=2.0)
    _, taps = target(mx.array(tokens), None, taps=True)
    loss1, correct1, _ = dflash_loss(dflash1, target, taps, blocks)
    loss_base, correct2, _ = dflash_loss(dflash2, target, taps, blocks, selector_weight=0.0)
    assert loss_base.item() == pytest.approx(loss1.item(), rel=1e-6)
    assert mx.array_equal(correct1, correct2).item()  # the selector starts as the argmax
    loss_both, _, _ = dflash_loss(dflash2, target, taps, blocks, selector_weight=1.0)
    assert loss_both.item() > loss_base.item()


def test_the_selector_and_conv_leave_their_identity_start(tiny: tuple[Target, DFlashDraft], tmp_path: Path) -> None:
    """Step 1 moves the successor codebook (the others get gradient once it is non-zero), and the conv."""
    target, dflash1 = tiny
    draft = DFlash2Draft.wrapping(dflash1, **SMALL)
    start = {k: np.array(v) for k, v in tree_flatten(draft.parameters())}
    config = TrainConfig(steps=2, batch_tokens=640, blocks_per_seq=6, lr=3e-3, gamma=2.0, weight_decay=0.0,
                         eval_every=1000, checkpoint_every=1000, val_permille=0)
    trainer = Trainer(target, draft, TokenDataset(periodic_samples(48), max_len=64), config, tmp_path)
    for step in range(2):
        batch = trainer.data.block_batch(next(trainer.batches())[1], 6, np.random.default_rng([0, step, 1]))
        trainer.train_step(batch)
        moved = {k for k, v in tree_flatten(draft.parameters()) if not np.array_equal(np.array(v), start[k])}
        assert "candidate_selector.successor_codebook" in moved
        assert "layers.0.attention_conv.kernel_projection.weight" in moved and "layers.1.mlp_conv.base_kernel" in moved
        if step == 1:
            assert {"candidate_selector.predecessor_codebook", "candidate_selector.hidden_projection.weight"} <= moved


def test_training_blocks_match_the_selector_walk(tiny: tuple[Target, DFlashDraft]) -> None:
    """The packed training forward (conv block-local over N blocks) equals the drafter's block forward, and the
    teacher-forced selector choices agree with the live walk up to and including its first wrong slot."""
    from tiny_models import build_draft2

    target, dflash1 = tiny
    draft = build_draft2(dflash1.config, seed=4, scale=0.3)
    bs = draft.config.block_size
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, VOCAB - 1, size=(1, 24)).astype(np.int32)
    anchors = np.array([[9, 13, 20]], dtype=np.int32)
    batch = BlockBatch(tokens, np.array([24]), np.array([8]), anchors, np.ones((1, 3), dtype=bool))
    blocks = block_targets(batch, bs, draft.config.mask_token_id, gamma=2.0)
    _, taps = target(mx.array(tokens), None, taps=True)
    _, correct, _ = dflash_loss(draft, target, taps, blocks)
    labels = np.array(blocks.labels).reshape(3, bs)[:, 1:]
    drafter = DFlashDrafter(draft, target)
    checked = 0
    for j, p in enumerate(anchors[0].tolist()):
        drafter.begin(tokens[0, :p].tolist(), taps[:, :p])
        walk = drafter.propose([int(tokens[0, p])], None, bs - 1, SamplingParams(temperature=0.0), TokenRng(0))
        walk = np.array(walk.tokens)
        drafter.end()
        teacher = np.array(correct[0, j])
        run = int(np.cumprod(teacher).sum())
        assert (walk[:run] == labels[j, :run]).all()  # the walk follows the true path while the selector is right
        if run < bs - 1:  # and its first miss is the teacher-forced choice too (same predecessor: the true token)
            assert walk[run] != labels[j, run]
            checked += 1
    assert checked > 0


def test_a_tiny_dflash2_fit_learns_and_publishes_a_loadable_draft(tiny: tuple[Target, DFlashDraft], tmp_path: Path) -> None:
    target, dflash1 = tiny
    draft = DFlash2Draft.wrapping(build_draft(dflash1.config, seed=0), **SMALL)
    config = TrainConfig(steps=30, batch_tokens=640, blocks_per_seq=6, lr=3e-3, gamma=2.0, log_every=5,
                         eval_every=1000, checkpoint_every=1000, val_permille=0)
    trainer = Trainer(target, draft, TokenDataset(periodic_samples(48), max_len=64), config, tmp_path)
    trainer.fit()
    losses = [r["loss"] for r in trainer.history]
    assert losses[-1] < 0.8 * losses[0]
    raw = json.loads((tmp_path / "draft" / "config.json").read_text())
    assert raw["architectures"] == ["DFlash2DraftModel"] and raw["dflash_config"]["selector_top_k"] == 8
    published = load_draft(tmp_path / "draft", target_hidden_size=64, target_vocab_size=VOCAB, target_num_layers=4)
    assert isinstance(published, DFlash2Draft)
    resumed = Trainer(target, DFlash2Draft.wrapping(dflash1, **SMALL), trainer.data, config, tmp_path)
    assert resumed.load_checkpoint() and resumed.step_count == 30  # the checkpoint holds conv and selector too
    for (name, a), (_, b) in zip(tree_flatten(trainer.draft.parameters()), tree_flatten(resumed.draft.parameters())):
        assert mx.array_equal(a, b).item(), name


def test_fit_cli_builds_a_dflash2_draft_from_a_dflash1_one(tmp_path: Path, gguf_tokenizer: Tokenizer) -> None:
    """`fit --arch dflash2 --init-draft D1`: the DFlash 1 tensors become the backbone of an identity DFlash 2,
    so with a zero learning rate the published DFlash 2 draft drafts exactly as D1."""
    save_tiny_dir(tmp_path / "tiny", gguf_tokenizer)
    out = tmp_path / "run"
    writer = ShardWriter(out / "data", vocab_size=gguf_tokenizer.vocab_size)
    for sample in periodic_samples(40):
        writer.add(sample)
    writer.flush()
    target_cfg = {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": gguf_tokenizer.vocab_size}
    dflash1 = build_draft(draft_config(target_cfg, num_hidden_layers=1, target_layer_ids=(1,), block_size=4), seed=5)
    save_tiny_draft(dflash1, tmp_path / "d1")
    code = main(["fit", "--out", str(out), "--model", str(tmp_path / "tiny"), "--arch", "dflash2",
                 "--init-draft", str(tmp_path / "d1"), "--selector-rank", "8", "--selector-top-k", "8",
                 "--steps", "2", "--lr", "0", "--batch-tokens", "256", "--blocks-per-seq", "4",
                 "--val-permille", "0", "--log-every", "1"])
    assert code == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["draft_config"]["architectures"] == ["DFlash2DraftModel"]
    sizes = {"target_hidden_size": 64, "target_vocab_size": gguf_tokenizer.vocab_size, "target_num_layers": 2}
    published = load_draft(out / "draft", **sizes)
    assert isinstance(published, DFlash2Draft) and published.config.selector_rank == 8
    backbone = dict(untransposed_parameters(load_draft(tmp_path / "d1", **sizes)))
    params = dict(untransposed_parameters(published))
    for name, value in backbone.items():  # bf16 on the way out: compare at that precision
        assert mx.allclose(params[name], value.astype(mx.bfloat16).astype(mx.float32), atol=1e-6).item(), name
    assert not mx.any(params["candidate_selector.successor_codebook"]).item()
    assert (np.array(params["layers.0.attention_conv.base_kernel"])[:, 0] == 1).all()
