"""DFlash draft training: block mask, loss weights, anchors, data shards, a tiny fit, resume, eval."""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tiny_models import build_draft, build_target, draft_config, target_config

from engine.decode.drafters import DFlashDrafter
from engine.decode.speculative import SpeculativeDecoder
from engine.model.target import Target
from engine.model.tokenizer import Tokenizer
from engine.train.__main__ import build_parser, main
from engine.train.dataset import (
    BlockBatch,
    Sample,
    ShardWriter,
    TokenDataset,
    finished_jobs,
    read_shard,
    sample_anchors,
    shard_paths,
)
from engine.train.draft_shape import choose_mask_token, draft_config_for
from engine.train.evaluate import (
    DomainResult,
    evaluate_domains,
    format_table,
    interleave,
)
from engine.train.generator import GenerationConfig, generate_responses
from engine.train.objective import (
    anchor_runs,
    block_attention_mask,
    block_targets,
    dflash_loss,
    draft_hidden,
    loss_weights,
    soft_targets,
    walk,
)
from engine.train.prompts import (
    Prompt,
    clean,
    is_heldout,
    iter_json_array,
    math_prompts,
    read_prompts,
    sharegpt_splits,
    write_prompts,
)
from engine.train.trainer import TrainConfig, Trainer
from tests.conftest import embedded_gguf_path

VOCAB = 96


@pytest.fixture(scope="module")
def tiny() -> tuple[Target, object]:
    config = target_config("llama", vocab_size=VOCAB)
    draft = build_draft(draft_config(config, block_size=4))
    return Target(build_target(config), draft.config.target_layer_ids), draft


def periodic_samples(n: int, seed: int = 0) -> list[Sample]:
    """Prompts of random tokens answered by a short repeating pattern: easy to learn to draft."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        prompt = rng.integers(0, VOCAB - 1, size=int(rng.integers(4, 12))).tolist()
        pattern = rng.integers(0, VOCAB - 1, size=int(rng.integers(2, 4))).tolist()
        answer = (pattern * 40)[: int(rng.integers(16, 40))]
        samples.append(Sample(prompt + answer, len(prompt), 7919 * (i + 1), 0, True))
    return samples


# ---- the block attention mask -----------------------------------------------------------------
def test_mask_context_strictly_before_anchor_and_own_block_only() -> None:
    mask = np.array(block_attention_mask(mx.array([[2, 5]]), seq_len=8, block_size=3))[0, 0]  # (6, 14)
    context, blocks = mask[:, :8], mask[:, 8:]
    assert (context[:3] == (np.arange(8) < 2)).all()  # block 0 (anchor 2) sees rows 0, 1 only
    assert (context[3:] == (np.arange(8) < 5)).all()
    own = np.kron(np.eye(2, dtype=bool), np.ones((3, 3), dtype=bool))
    assert (blocks == own).all()  # bidirectional inside a block, blind to the other block


def test_mask_holds_through_the_draft_forward(tiny: tuple[Target, object]) -> None:
    """Changing what a block must not see leaves its output unchanged; changing what it sees does not."""
    _, draft = tiny
    b, seq_len, bs, hidden = 1, 10, 4, draft.config.hidden_size
    anchors = mx.array([[3, 6]])
    positions = (anchors[:, :, None] + mx.arange(bs)).reshape(b, -1)
    mask = block_attention_mask(anchors, seq_len, bs)
    context = mx.random.normal((b, seq_len, hidden), key=mx.random.key(1))
    noise = mx.random.normal((b, 2 * bs, hidden), key=mx.random.key(2))

    def block0(ctx: mx.array, nz: mx.array) -> np.ndarray:
        return np.array(draft_hidden(draft, nz, ctx, positions, mask)[0, :bs])

    base = block0(context, noise)
    later = context.at[:, 3:].add(5.0)  # the anchor's own row and everything after it
    other = noise.at[:, bs:].add(5.0)  # the second block
    earlier = context.at[:, 1].add(5.0)
    np.testing.assert_allclose(block0(later, noise), base, atol=1e-5)
    np.testing.assert_allclose(block0(context, other), base, atol=1e-5)
    assert np.abs(block0(earlier, noise) - base).max() > 1e-3


# ---- loss weights, labels, anchors ---------------------------------------------------------------
def test_loss_weights_decay_from_the_first_draft_position() -> None:
    w = np.array(loss_weights(16, gamma=7.0))
    assert w[0] == 0 and w[1] == pytest.approx(1.0)
    assert w[5] == pytest.approx(math.exp(-4 / 7))
    assert (np.diff(w[1:]) < 0).all()


def test_block_targets_labels_noise_and_weights() -> None:
    tokens = np.zeros((1, 12), dtype=np.int32)
    tokens[0, :10] = np.arange(100, 110)
    batch = BlockBatch(tokens, np.array([10]), np.array([4]), np.array([[4, 8]], dtype=np.int32),
                       np.array([[True, True]]))
    t = block_targets(batch, block_size=4, mask_token_id=7, gamma=2.0)
    assert np.array(t.labels)[0].tolist() == [104, 105, 106, 107, 108, 109, 0, 0]  # padding past the end
    assert np.array(t.noise_ids)[0].tolist() == [104, 7, 7, 7, 108, 7, 7, 7]
    assert np.array(t.positions)[0].tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    w = np.array(t.weights)[0]
    assert w[0] == 0 and w[4] == 0  # anchors carry no loss
    assert w[5] == pytest.approx(1.0) and w[6] == 0 and w[7] == 0  # rows past the sequence end
    invalid = block_targets(batch._replace(block_valid=np.array([[True, False]])), 4, 7, 2.0)
    assert np.array(invalid.weights)[0, 4:].sum() == 0


def test_anchors_lie_on_response_tokens_with_a_successor() -> None:
    rng = np.random.default_rng(0)
    lengths = np.array([30, 12, 9, 50])
    starts = np.array([10, 10, 8, 5])
    anchors, valid = sample_anchors(starts, lengths, num_blocks=8, rng=rng)
    assert anchors.shape == (4, 8)
    for row in range(4):
        chosen = anchors[row][valid[row]]
        assert len(chosen) == min(8, lengths[row] - 1 - starts[row])
        assert len(set(chosen.tolist())) == len(chosen)
        assert (chosen >= starts[row]).all() and (chosen <= lengths[row] - 2).all()
    narrow, _ = sample_anchors(np.array([10]), np.array([13]), num_blocks=8, rng=rng)
    assert narrow.shape == (1, 2)  # width shrinks to what the batch can hold


# ---- data shards -----------------------------------------------------------------------------------
def test_shards_round_trip_and_feed_the_dataset(tmp_path: Path) -> None:
    samples = periodic_samples(5)
    writer = ShardWriter(tmp_path, vocab_size=VOCAB, shard_size=2)
    for s in samples:
        writer.add(s)
    writer.flush()
    paths = shard_paths(tmp_path)
    assert [p.name for p in paths] == ["shard-00000.npz", "shard-00001.npz", "shard-00002.npz"]
    assert [s for p in paths for s in read_shard(p)] == samples
    assert finished_jobs(tmp_path) == {(s.key, 0) for s in samples}
    data = TokenDataset.from_dir(tmp_path, max_len=20)
    assert len(data) == 5 and data.lengths.max() <= 20
    assert data.sequence(0).tolist() == samples[0].tokens[:20]


def test_generation_writes_shards_and_a_rerun_skips_them(tmp_path: Path, gguf_tokenizer: Tokenizer) -> None:
    from tests.conftest import tiny_llama

    model = tiny_llama(gguf_tokenizer.vocab_size)
    prompts = [Prompt(f"p{i}", f"Say something about the number {i}.") for i in range(5)]
    config = GenerationConfig(mode="both", max_new_tokens=6, batch_size=4, prefill_chunk=3, shard_size=4)
    manifest = generate_responses(model, gguf_tokenizer, prompts, tmp_path, config)
    assert manifest["totals"]["sequences"] == 10 and manifest["totals"]["greedy"] == 5
    samples = [s for p in shard_paths(tmp_path) for s in read_shard(p)]
    for s in samples:
        assert 1 <= len(s.tokens) - s.response_start <= 6
        assert s.tokens[: s.response_start][-3:] == gguf_tokenizer.encode("<|im_start|>assistant\n")[-3:]
    again = generate_responses(model, gguf_tokenizer, prompts, tmp_path, config)
    assert again["last_run"] == {} and again["totals"]["sequences"] == 10
    assert len(shard_paths(tmp_path)) == 3


def test_lr_schedule_warms_up_decays_and_can_end_sooner() -> None:
    from engine.train.trainer import LrSchedule

    schedule = LrSchedule(TrainConfig(steps=1000, lr=1e-3, warmup=0.1, min_lr_ratio=0.1))
    lr = lambda step: schedule(mx.array(step)).item()
    assert lr(0) == pytest.approx(1e-5) and lr(100) == pytest.approx(1e-3)
    assert lr(50) < lr(99) < lr(100) and lr(550) == pytest.approx(0.55e-3, rel=1e-3)
    assert lr(1000) == pytest.approx(1e-4) and lr(5000) == pytest.approx(1e-4)
    schedule.total = 400  # what a time limit does after timing the first steps: the warm-up shrinks with it
    assert lr(20) == pytest.approx(0.505e-3, rel=1e-3) and lr(40) == pytest.approx(1e-3)
    assert lr(220) == pytest.approx(0.55e-3, rel=1e-3) and lr(400) == pytest.approx(1e-4)


def test_time_limited_fit_of_many_steps_reaches_the_peak_learning_rate() -> None:
    from engine.train.trainer import LrSchedule

    # --steps 200000 --time-limit T with time for 2,000 steps: peak at step 80, floor at 2,000
    schedule = LrSchedule(TrainConfig(steps=200_000, lr=6e-4, warmup=0.04, min_lr_ratio=0.1))
    schedule.total = 2000
    lr = lambda step: schedule(mx.array(step)).item()
    assert lr(80) == pytest.approx(6e-4) and lr(1040) == pytest.approx(3.3e-4, rel=1e-3)
    assert lr(2000) == pytest.approx(6e-5)


def test_job_plan_alternates_modes_so_a_cut_run_holds_both(gguf_tokenizer: Tokenizer) -> None:
    from engine.train.generator import plan_jobs

    prompts = [Prompt(f"p{i}", f"Question number {i}" + " more" * (i % 5)) for i in range(40)]
    config = GenerationConfig(mode="both", batch_size=2)  # windows of 8 jobs
    jobs, too_long = plan_jobs(prompts, gguf_tokenizer, config, done=set())
    assert too_long == 0 and len(jobs) == 80
    assert [j.mode for j in jobs[:16]] == [0] * 8 + [1] * 8  # a run cut after two windows has both kinds
    assert {(j.key, j.mode) for j in jobs} == {(p.key, m) for p in prompts for m in (0, 1)}
    window = [len(j.prompt_ids) for j in jobs[:8]]
    assert window == sorted(window)


def test_wave_decoding_matches_one_sequence_at_a_time() -> None:
    """Left padding, the batched cache and compaction leave every row's greedy answer unchanged."""
    from tiny_models import plain_greedy

    from engine.train.generator import Job, ResponseGenerator

    model = build_target(target_config("llama", vocab_size=VOCAB))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, VOCAB - 1, size=int(rng.integers(1, 15))).tolist() for _ in range(9)]
    refs = [plain_greedy(model, p, 16)[0] for p in prompts]
    eos = {refs[0][2], refs[3][6], refs[5][10]}  # rows end at different steps, forcing compaction
    generator = ResponseGenerator(model, eos, GenerationConfig(max_new_tokens=16, batch_size=9, prefill_chunk=4))
    outs, ended = generator.decode([Job(p, i, 0) for i, p in enumerate(prompts)])
    for ref, out, hit in zip(refs, outs, ended):
        cut = next((i for i, t in enumerate(ref) if t in eos), None)
        assert out == (ref if cut is None else ref[: cut + 1])
        assert hit == (cut is not None)
    assert sum(ended) >= 3


# ---- prompts -------------------------------------------------------------------------------------
def test_prompt_cleaning_split_and_truncated_json(tmp_path: Path) -> None:
    assert clean("  What is 2 + 2?  ") == "What is 2 + 2?"
    assert clean("") is None and clean("x" * 5000) is None
    assert clean("iVBOR" + "A" * 300 + " please describe") is None  # a base64 blob
    assert clean("1234 5678 9012 3456 7890") is None  # no prose
    text = '[{"id": "a", "conversations": [{"from": "human", "value": "hi"}]}, {"id": "b", "conv'
    assert [r["id"] for r in iter_json_array(text)] == ["a"]
    assert is_heldout("Hello  World", 500) == is_heldout("hello world", 500)
    convs = [{"id": f"c{i}", "conversations": [
        {"from": "human", "value": f"First question number {i}?"}, {"from": "gpt", "value": "An answer."},
        {"from": "human", "value": f"A follow-up about {i}, please."}]} for i in range(40)]
    (tmp_path / "sg.json").write_text(json.dumps(convs))
    train, chat = sharegpt_splits(tmp_path / "sg.json", heldout_permille=250)
    everything, chat_again = sharegpt_splits(tmp_path / "sg.json", heldout_permille=250, all_turns=True)
    assert len(train) + len(chat) == 40 and 0 < len(chat) < 40 and chat_again == chat
    assert everything[: len(train)] == train and len(everything) > len(train)
    assert not {p.text for p in everything} & {p.text for p in chat}
    write_prompts(tmp_path, "math", math_prompts())
    assert len(read_prompts(tmp_path, "math")) >= 40
    with gzip.open(tmp_path / "math.jsonl.gz", "rt") as f:
        assert json.loads(f.readline())["id"] == "math/0"


def test_mask_token_and_default_draft_shape(gguf_tokenizer: Tokenizer) -> None:
    mask = choose_mask_token(gguf_tokenizer, gguf_tokenizer.vocab_size)
    assert mask == 16  # <empty_output>: unused by SmolLM2's chat template
    config = target_config("llama", num_hidden_layers=30, hidden_size=64, intermediate_size=96, vocab_size=VOCAB)
    target = Target(build_target(config))
    args = type("Args", (), config)
    draft = draft_config_for(target, args, mask_token_id=3, num_layers=3)
    assert draft.target_layer_ids == (1, 14, 27) and draft.hidden_size == 64 and draft.intermediate_size == 96


# ---- training ----------------------------------------------------------------------------------
def make_trainer(tiny: tuple[Target, object], out: Path, steps: int, seed: int = 0, **kw: object) -> Trainer:
    target, reference = tiny
    draft = build_draft(reference.config, seed=seed)
    config = TrainConfig(steps=steps, batch_tokens=640, blocks_per_seq=6, lr=3e-3, gamma=2.0, log_every=5,
                         eval_every=1000, checkpoint_every=1000, val_permille=0, **kw)
    return Trainer(target, draft, TokenDataset(periodic_samples(48), max_len=64), config, out)


def test_tiny_fit_lowers_the_loss_and_publishes(tiny: tuple[Target, object], tmp_path: Path) -> None:
    trainer = make_trainer(tiny, tmp_path, steps=30)
    result = trainer.fit()
    losses = [r["loss"] for r in trainer.history]
    assert result["steps"] == 30 and len(losses) == 6
    assert losses[-1] < 0.8 * losses[0]
    assert trainer.history[-1]["tau"] >= 1.0
    assert (tmp_path / "draft" / "config.json").exists() and (tmp_path / "curves.json").exists()
    published = json.loads((tmp_path / "draft" / "config.json").read_text())
    assert published["dflash_config"]["mask_token_id"] == trainer.draft.config.mask_token_id


def test_a_fit_publishes_the_answers_most_frequent_tokens_as_the_proposal_vocabulary(
    tiny: tuple[Target, object], tmp_path: Path
) -> None:
    """Answers over 6 tokens, one of them in half the answer positions: the published draft ships those,
    most frequent first, and a later fit that ships none removes the stale file."""
    target, reference = tiny
    rng = np.random.default_rng(0)
    common, rare = 40, [41, 42, 43, 44, 45]
    samples = []
    for i in range(24):
        prompt = rng.integers(0, VOCAB - 1, size=8).tolist()
        answer = [common if j % 2 else int(rng.choice(rare)) for j in range(30)]
        samples.append(Sample(prompt + answer, len(prompt), 7919 * (i + 1), 0, True))
    config = TrainConfig(steps=2, batch_tokens=640, blocks_per_seq=4, log_every=1, eval_every=1000,
                         checkpoint_every=1000, val_permille=0)
    Trainer(target, build_draft(reference.config), TokenDataset(samples, max_len=64), config, tmp_path).fit()
    ids = np.load(tmp_path / "draft" / "proposal_vocab.npy")
    assert ids[0] == common and sorted(ids.tolist()) == [common, *rare]
    none = replace(config, proposal_coverage=0.0)
    Trainer(target, build_draft(reference.config), TokenDataset(samples, max_len=64), none, tmp_path).publish()
    assert (tmp_path / "draft" / "config.json").exists() and not (tmp_path / "draft" / "proposal_vocab.npy").exists()


def test_a_fit_validates_its_starting_draft_before_the_first_step(tiny: tuple[Target, object], tmp_path: Path) -> None:
    """A continued fit reports where it started, and publishes that draft until a fitted one beats it."""
    target, reference = tiny
    config = TrainConfig(steps=2, batch_tokens=640, blocks_per_seq=6, lr=0.0, val_permille=300, val_batches=2,
                         eval_every=1000, checkpoint_every=1000)
    trainer = Trainer(target, build_draft(reference.config), TokenDataset(periodic_samples(60), max_len=64), config, tmp_path)
    result = trainer.fit()
    assert result["initial_published"] == 1.0 and (tmp_path / "draft" / "config.json").exists()
    assert result["initial_val_loss"] == pytest.approx(result["val_loss"], rel=1e-4)  # lr 0: nothing moved
    assert "published" not in {k for k in result if not k.startswith("initial_")}  # no better draft replaced it


def test_time_limit_shortens_the_schedule_to_what_fits(
    tiny: tuple[Target, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps of a fake 3 s, then 1 s: the first estimate is too low, later ones end the schedule near the limit."""
    from engine.train import trainer as trainer_module

    now = [0.0]
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: now[0])
    trainer = make_trainer(tiny, tmp_path, steps=100_000, time_limit=1000.0)

    def one_second_step(batch: object) -> dict:
        now[0] += 1.0 if trainer.step_count > 30 else 3.0  # slow first steps (kernel compiles), then 1 s
        trainer.step_count += 1
        return {}

    trainer.train_step = one_second_step
    trainer._log = lambda *a: {"loss": 0, "acc": 0, "tau": 0, "lr": 0, "tokens_per_second": 0}
    trainer.save_checkpoint = trainer.validate_and_publish = lambda: {}
    result = trainer.fit()
    assert 900 <= trainer.schedule.total <= 960 and result["steps"] == trainer.schedule.total


def test_train_and_validation_modes_are_chosen_separately(tiny: tuple[Target, object], tmp_path: Path) -> None:
    """Fits on greedy-only and sampled-only data compare on the same validation sequences, per mode."""
    target, reference = tiny
    samples = [s._replace(mode=i % 2) for i, s in enumerate(periodic_samples(400))]
    data = TokenDataset(samples, max_len=64)

    def trainer(modes: tuple[str, ...], val_modes: tuple[str, ...], max_train_sequences: int = 0) -> Trainer:
        config = TrainConfig(steps=2, batch_tokens=640, blocks_per_seq=6, val_permille=300, val_batches=2,
                             modes=modes, val_modes=val_modes, max_train_sequences=max_train_sequences)
        return Trainer(target, build_draft(reference.config), data, config, tmp_path)

    def trainer_with(modes: tuple[str, ...], max_train_sequences: int) -> Trainer:
        return trainer(modes, ("greedy", "sampled"), max_train_sequences)

    sampled_only = trainer(("sampled",), ("greedy", "sampled"))
    assert set(data.modes[sampled_only.train_idx]) == {1} and set(data.modes[sampled_only.val_idx]) == {0, 1}
    val = sampled_only.evaluate()
    assert {"val_tau_greedy", "val_tau_sampled"} <= set(val) and all(1 <= val[k] <= 16 for k in val if "tau" in k)
    greedy_val = trainer(("greedy", "sampled"), ("greedy",))
    assert set(data.modes[greedy_val.val_idx]) == {0} and len(greedy_val.train_idx) > len(sampled_only.train_idx)
    greedy_scores = greedy_val.evaluate()
    assert "val_tau_sampled" not in greedy_scores
    assert 1 <= greedy_scores["val_walk_tau"] <= reference.config.block_size  # walked along greedy sequences
    no_walk = TrainConfig(steps=2, batch_tokens=640, blocks_per_seq=6, val_permille=300, val_batches=2, val_walk_sequences=0)
    assert "val_walk_tau" not in Trainer(target, build_draft(reference.config), data, no_walk, tmp_path).evaluate()
    equal = [trainer_with(m, 40) for m in (("greedy",), ("sampled",), ("greedy", "sampled"))]
    assert [len(t.train_idx) for t in equal] == [40, 40, 40]
    assert set(data.modes[equal[0].train_idx]) == {0} and set(data.modes[equal[2].train_idx]) == {0, 1}
    assert all(np.array_equal(t.val_idx, equal[0].val_idx) for t in equal)  # one validation set for all three
    with pytest.raises(ValueError, match="max_train_sequences"):
        TrainConfig(max_train_sequences=-1)


def test_resume_from_checkpoint_is_identical(tiny: tuple[Target, object], tmp_path: Path) -> None:
    straight = make_trainer(tiny, tmp_path / "a", steps=6)
    straight.fit()
    first = make_trainer(tiny, tmp_path / "b", steps=6)
    first.fit(until=3)
    resumed = make_trainer(tiny, tmp_path / "b", steps=6, seed=123)  # different init: the checkpoint must win
    assert resumed.load_checkpoint() and resumed.step_count == 3
    resumed.fit()
    for (name, a), (_, b) in zip(tree_flatten(straight.draft.parameters()), tree_flatten(resumed.draft.parameters())):
        np.testing.assert_array_equal(np.array(a), np.array(b), err_msg=name)
    assert resumed.history[-1]["loss"] == straight.history[-1]["loss"]  # the window after the resume point


# ---- evaluation ----------------------------------------------------------------------------------
def test_eval_counts_cycles_through_the_speculative_decoder(gguf_tokenizer: Tokenizer) -> None:
    config = target_config("llama", vocab_size=gguf_tokenizer.vocab_size)
    draft = build_draft(draft_config(config, block_size=4))
    target = Target(build_target(config), draft.config.target_layer_ids)
    prompts = {"chat": [Prompt("a", "Hello there"), Prompt("b", "Write a haiku.")], "math": [Prompt("c", "1+1?")]}
    adaptive = SpeculativeDecoder(target, DFlashDrafter(draft, target), block_size=4)
    with pytest.raises(ValueError, match="fixed verify width"):  # its width would cap the acceptance
        evaluate_domains(adaptive, gguf_tokenizer, prompts, max_tokens=12)
    decoder = SpeculativeDecoder(target, DFlashDrafter(draft, target), block_size=4, adaptive=False)
    assert [d for d, _ in interleave(prompts)] == ["chat", "math", "chat"]
    result, math_result = evaluate_domains(decoder, gguf_tokenizer, prompts, max_tokens=12)
    assert result.prompts == 2 and math_result.prompts == 1 and result.cycles >= 1
    assert 1.0 <= result.acceptance_length <= 4.0
    assert result.drafted_by_position[0] == result.cycles
    rates = result.acceptance_by_position
    assert all(0 <= r <= 1 for r in rates)
    assert "chat" in format_table([result, math_result])


def test_domain_result_arithmetic() -> None:
    r = DomainResult("code")
    r.record(drafted=3, accepted=3)
    r.record(drafted=3, accepted=1)
    r.record(drafted=2, accepted=0)
    assert r.acceptance_length == pytest.approx((4 + 3) / 3)
    assert r.acceptance_by_position == [pytest.approx(2 / 3), pytest.approx(1 / 3), pytest.approx(1 / 2)]


def test_cli_help_lists_every_phase(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(phase in text for phase in ("prompts", "generate", "fit", "eval", "--out DIR"))


def test_cli_mistakes_are_one_line_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", "--out", str(tmp_path)]) == 2  # no generated data yet
    err = capsys.readouterr().err.strip()
    assert err.startswith("engine.train fit: error: no ") and "engine.train generate" in err and "\n" not in err
    assert main(["eval", "--out", str(tmp_path), "--model", str(tmp_path / "missing.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("engine.train eval: error: ") and "missing.gguf" in err and "Traceback" not in err


def test_training_blocks_match_what_the_drafter_proposes(tiny: tuple[Target, object]) -> None:
    """The training forward of a block equals the inference forward on the same prefix (no leak, same positions)."""
    from engine.decode.sampling import SamplingParams, TokenRng

    target, draft = tiny
    bs = draft.config.block_size
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, VOCAB - 1, size=(1, 24)).astype(np.int32)
    anchors = np.array([[9, 13, 20]], dtype=np.int32)
    batch = BlockBatch(tokens, np.array([24]), np.array([8]), anchors, np.ones((1, 3), dtype=bool))
    blocks = block_targets(batch, bs, draft.config.mask_token_id, gamma=2.0)
    _, taps = target(mx.array(tokens), None, taps=True)
    context = draft.project_context(taps)
    noise = draft.noise_embedding(blocks.noise_ids, target.embed)
    hidden = draft_hidden(draft, noise, context, blocks.positions, blocks.mask)  # (1, 3*B, H)
    train_logits = np.array(draft.logits(hidden, target.lm_head)).reshape(3, bs, -1)[:, 1:]
    drafter = DFlashDrafter(draft, target)
    for j, p in enumerate(anchors[0].tolist()):
        cache = draft.make_cache()
        ctx = draft.project_context(taps[:, :p])  # what the decoder holds after committing p tokens
        ids = mx.array([[int(tokens[0, p])] + [draft.config.mask_token_id] * (bs - 1)])
        h = draft(draft.noise_embedding(ids, target.embed), ctx, cache=cache, q_offset=p)
        np.testing.assert_allclose(np.array(draft.logits(h[0, 1:], target.lm_head)), train_logits[j], atol=2e-4)
        drafter.begin(tokens[0, :p].tolist(), taps[:, :p])
        proposal = drafter.propose([int(tokens[0, p])], None, bs - 1, SamplingParams(temperature=0.0), TokenRng(0))
        assert np.array(proposal.tokens).tolist() == train_logits[j].argmax(-1).tolist()
        drafter.end()


def test_walk_visits_the_anchors_decoding_visits() -> None:
    """Anchor 10 accepts 2 (next anchor 13), 13 accepts 0 (14), 14 accepts 5 (20); 20 is the last token."""
    runs = np.array([2, 9, 9, 0, 5, 9, 9, 9, 9, 9])  # anchors 10..19 of a 21-token sequence
    assert walk(runs, 10, 21) == (3, 7)
    assert walk(runs, 10, 17) == (3, 4)  # the third cycle can accept only the 2 tokens left (15, 16)
    assert walk(np.zeros(5, dtype=int), 3, 9) == (5, 0)  # a useless draft: one token per cycle


def test_walked_tau_is_what_live_decoding_gets() -> None:
    """Live greedy decoding with the shipped draft accepts what walk() predicts from teacher-forced blocks."""
    from engine.decode.sampling import SamplingParams, TokenRng
    from engine.model.draft import load_draft
    from engine.model.loader import load_model
    from engine.runtime.serving_model import prepare_model

    loaded = load_model(str(embedded_gguf_path()), dequantize=True)
    prepare_model(loaded.model, fuse=True)
    args = loaded.model.args
    draft = load_draft(Path(__file__).parents[2] / "engine/drafts/smollm2-135m-instruct-dflash", target_hidden_size=args.hidden_size,
                       target_vocab_size=args.vocab_size, target_num_layers=args.num_hidden_layers)
    target = Target(loaded.model, draft.config.target_layer_ids)
    decoder = SpeculativeDecoder(target, DFlashDrafter(draft, target), block_size=16, adaptive=False)
    prompt = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a Python function that merges two sorted lists into one sorted list."}],
        add_generation_prompt=True)
    steps = list(decoder.generate(prompt, SamplingParams(temperature=0.0), 96, TokenRng(0)))
    tokens = np.array(prompt + [t for step in steps for t in step.tokens])
    live = (sum(1 for s in steps if s.drafted), sum(s.accepted for s in steps))
    _, taps = target(mx.array(tokens[None]), None, taps=True)
    walked = walk(anchor_runs(draft, target, taps, tokens, len(prompt)), len(prompt), len(tokens))
    target.close()
    assert live[1] > live[0]  # the trained draft accepts more than one token per cycle here
    # only the last cycle may differ: near max_tokens the decoder drafts a shorter block
    assert abs(walked[0] - live[0]) <= 1 and abs(walked[1] - live[1]) <= 15, (walked, live)


def test_kl_to_a_target_sure_of_each_next_token_is_the_ce(tiny: tuple[Target, object]) -> None:
    """soft_targets reads the target at the position before each label: KL to a one-hot target is the CE."""
    target, draft = tiny
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, VOCAB - 1, size=(1, 12)).astype(np.int32)
    batch = BlockBatch(tokens, np.array([11]), np.array([2]), np.array([[3, 8]], dtype=np.int32), np.array([[True, True]]))
    blocks = block_targets(batch, block_size=4, mask_token_id=draft.config.mask_token_id, gamma=2.0)
    sure = np.zeros((1, 12, VOCAB), dtype=np.float32)
    sure[0, np.arange(11), tokens[0, 1:]] = 60.0  # position p is sure of the token at p + 1
    soft = soft_targets(mx.array(sure), blocks, 4)
    assert soft.shape == (1, 2, 3, VOCAB)
    _, taps = target(mx.array(tokens), None, taps=True)
    ce, correct, _ = dflash_loss(draft, target, taps, blocks)
    kl, correct_kl, _ = dflash_loss(draft, target, taps, blocks, soft=soft)
    assert kl.item() == pytest.approx(ce.item(), rel=1e-4)
    assert mx.array_equal(correct, correct_kl).item()
    unsure = soft_targets(mx.zeros((1, 12, VOCAB)), blocks, 4)  # a uniform target: another loss
    assert dflash_loss(draft, target, taps, blocks, soft=unsure)[0].item() != pytest.approx(ce.item(), rel=1e-2)


def test_a_kl_fit_lowers_its_loss(tiny: tuple[Target, object], tmp_path: Path) -> None:
    trainer = make_trainer(tiny, tmp_path, steps=30, loss="kl")
    trainer.fit()
    losses = [r["loss"] for r in trainer.history]
    assert losses[-1] < 0.8 * losses[0]
    with pytest.raises(ValueError, match="loss must be ce or kl"):
        TrainConfig(loss="mse")
