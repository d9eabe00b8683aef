"""Generation on megatron-core against HF ``generate`` on the same tiny random model (fp32, CPU).

Oracle: HF transformers' generate with the same prompts, left-padded as HF pads them: greedy, sampling (same
seed: torch.multinomial draws the same numbers from the same probabilities) and beam search.
"""
import os

import pytest
import torch

from mindspeed_lora import tiny
from mindspeed_lora.errors import UserError
from mindspeed_lora.inference.engine import InferenceEngine
from mindspeed_lora.inference.generation import GenerationConfig, generate
from mindspeed_lora.inference.model import ModelSource, build_inference_engine
from mindspeed_lora.parallel import initialize

NEW = 50
EOS = 2  # <|im_end|> in the tiny tokenizer and eos_token_id of the tiny configs
PROMPT_LENS = (9, 4, 13)


@pytest.fixture(scope="module")
def world():
    initialize(1, 1, seed=5)


def build_lively_model(family: str, path: str, seed: int = 3, **overrides):
    """A tiny random HF model whose linear weights are scaled x8: at std 0.02 the residual stream is mostly the
    token's own embedding and greedy output repeats one token, which would make a weak comparison."""
    hf = tiny.build_hf_model(family, None, seed=seed, **overrides)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                p.mul_(8.0)
    hf.save_pretrained(path)
    return hf


def _model(tmp_path_factory, family):
    path = str(tmp_path_factory.mktemp(family))
    hf = build_lively_model(family, path, seed=5 if family == "mistral" else 3)  # seed 3: one row repeats
    engine, _ = build_inference_engine(ModelSource(load=path), tp_rank=0)
    return hf, engine


@pytest.fixture(scope="module")
def qwen3(world, tmp_path_factory):
    return _model(tmp_path_factory, "qwen3")


def _prompts(lens=PROMPT_LENS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in lens]


def _hf_generate(hf, prompts, **kwargs):
    """HF generate on the left-padded batch; returns each row's new tokens, cut after the first eos."""
    s = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), s, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, s - len(p):] = torch.tensor(p)
        mask[i, s - len(p):] = 1
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=EOS, pad_token_id=0, **kwargs)
    rows = []
    for row in out[:, s:].tolist():
        rows.append(row[: row.index(EOS) + 1] if EOS in row else row)
    return rows


def _ours(engine, prompts, **kwargs):
    cfg = GenerationConfig(max_new_tokens=NEW, stop_token_ids=(EOS,), **kwargs)
    return [o.tokens for o in generate(engine, prompts, cfg)]


@pytest.mark.parametrize("family", ["qwen3", "llama3", "qwen2", "mistral"])
def test_greedy_tokens_equal_hf_generate(world, tmp_path_factory, family):
    hf, engine = _model(tmp_path_factory, family)
    prompts = _prompts()
    ours = _ours(engine, prompts)
    assert ours == _hf_generate(hf, prompts, do_sample=False)
    assert all(len(set(row)) > 5 for row in ours), "a degenerate model would make this comparison weak"
    # batch of one: no padding at all
    assert _ours(engine, prompts[:1]) == _hf_generate(hf, prompts[:1], do_sample=False)


@pytest.mark.parametrize("family", ["qwen3", "llama3"])
def test_yarn_model_logits_and_greedy_tokens_equal_hf(world, tmp_path_factory, family):
    """YaRN (frequencies blended by dimension, cos/sin scaled by its attention factor) on 48 positions, three
    times the 'pretraining' context of 16: logits of every position and greedy tokens equal HF's."""
    path = str(tmp_path_factory.mktemp(f"yarn_{family}"))
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    hf = build_lively_model(family, path, rope_scaling=yarn, max_position_embeddings=128)
    engine, _ = build_inference_engine(ModelSource(load=path), tp_rank=0)
    ids = torch.tensor(_prompts((48,), seed=4))
    with torch.no_grad():
        want = hf(ids).logits.float()
    got = engine.logits(ids)
    assert torch.allclose(got, want, atol=2e-4, rtol=0), (got - want).abs().max()
    prompts = _prompts((20, 9), seed=5)
    assert _ours(engine, prompts) == _hf_generate(hf, prompts, do_sample=False)


def test_mistral_sliding_window_is_exact_up_to_the_window_and_refused_beyond(world, tmp_path_factory):
    """Mistral 7B v0.1's window: HF's windowed attention equals ours on up to 16 positions; the engine
    refuses a generation that would go past them, and scoring keeps the newest 16 tokens of a longer prompt
    (as it does past max_position_embeddings)."""
    path = str(tmp_path_factory.mktemp("mistral_window"))
    hf = build_lively_model("mistral", path, seed=5, sliding_window=16)
    engine, _ = build_inference_engine(ModelSource(load=path), tp_rank=0)
    ids = torch.tensor(_prompts((16,), seed=6))
    with torch.no_grad():
        want = hf(ids).logits.float()
    assert torch.allclose(engine.logits(ids), want, atol=2e-4, rtol=0)
    prompt = _prompts((10,), seed=7)
    ours = generate(engine, prompt, GenerationConfig(max_new_tokens=6, stop_token_ids=()))[0].tokens
    with torch.no_grad():
        theirs = hf.generate(torch.tensor(prompt), max_new_tokens=6, do_sample=False, pad_token_id=0)[0, 10:]
    assert ours == theirs.tolist()
    assert engine.max_positions == 16  # what evaluation keeps of a longer prompt
    with pytest.raises(UserError, match="prompt \\+ new tokens = 18 tokens exceeds the model's sliding attention "
                                        "window \\(16; windows are not implemented here\\)"):
        generate(engine, prompt, GenerationConfig(max_new_tokens=8, stop_token_ids=(EOS,)))


def test_kv_cache_on_and_off_give_identical_tokens(qwen3):
    _, engine = qwen3
    prompts = _prompts(seed=1)
    cached = _ours(engine, prompts, use_kv_cache=True)
    assert cached == _ours(engine, prompts, use_kv_cache=False)
    assert max(len(r) for r in cached) == NEW


def test_cached_decode_logits_match_full_forward(qwen3):
    """Each decode step's logits equal the last-position logits of a full forward over the same tokens."""
    _, engine = qwen3
    prompt = _prompts((6,), seed=2)[0]
    dec = engine.decoder(1, 6 + 5)
    ids = torch.tensor([prompt])
    logits = dec.prefill(ids, torch.ones_like(ids, dtype=torch.bool))
    for _ in range(5):
        full = engine.logits(ids)[:, -1]
        assert torch.allclose(logits, full, atol=1e-5, rtol=0)
        nxt = logits.argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        logits = dec.decode(nxt)
    dec.close()


def test_sampling_equals_hf_with_the_same_seed(qwen3):
    hf, engine = qwen3
    prompts = _prompts(seed=4)
    knobs = dict(temperature=0.8, top_k=40, top_p=0.9)
    ours = _ours(engine, prompts, do_sample=True, seed=77, **knobs)
    torch.manual_seed(77)
    assert ours == _hf_generate(hf, prompts, do_sample=True, **knobs)
    assert ours != _ours(engine, prompts, do_sample=True, seed=78, **knobs)


def test_a_shared_generator_continues_its_stream(qwen3):
    """Chat replies and input-file batches share one generator: a repeated prompt gets a new sample."""
    from mindspeed_lora.inference.generation import sampling_generator

    _, engine = qwen3
    prompt = _prompts((6,), seed=3)
    cfg = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=1.5, seed=3)
    g = sampling_generator(engine, cfg)
    first = generate(engine, prompt, cfg, generator=g)[0].tokens
    second = generate(engine, prompt, cfg, generator=g)[0].tokens
    assert first == generate(engine, prompt, cfg)[0].tokens  # a fresh call starts at the seed
    assert second != first


@pytest.mark.parametrize("beams,penalty", [(2, 1.0), (3, 0.5)])
def test_beam_search_equals_hf(qwen3, beams, penalty):
    hf, engine = qwen3
    prompts = _prompts(seed=5)
    ours = _ours(engine, prompts, num_beams=beams, length_penalty=penalty)
    ref = _hf_generate(hf, prompts, do_sample=False, num_beams=beams, length_penalty=penalty)
    # HF fills a row that ended early with pad tokens up to the longest row
    assert [r + [0] * (len(h) - len(r)) for r, h in zip(ours, ref)] == ref


def test_beam_search_with_eos_in_reach_equals_hf(world, tmp_path_factory):
    """A model that likes to stop: finished hypotheses and the early-stop heuristic decide the result."""
    hf, engine = _model(tmp_path_factory, "qwen3")
    with torch.no_grad():  # make eos likely: raise its output row in both copies of the weights
        hf.lm_head.weight[EOS] += 0.6 * hf.model.norm.weight
        engine.model.output_layer.weight[EOS] += 0.6 * engine.model.decoder.final_layernorm.weight
    prompts = _prompts(seed=6)
    for beams in (2, 4):
        ours = _ours(engine, prompts, num_beams=beams)
        ref = _hf_generate(hf, prompts, do_sample=False, num_beams=beams)
        assert [r + [0] * (len(h) - len(r)) for r, h in zip(ours, ref)] == ref
        assert any(len(r) < NEW for r in ours), "eos never won: the test would not exercise finished beams"


def test_stop_sequences_end_a_row_and_are_reported(qwen3):
    _, engine = qwen3
    prompt = _prompts((7,), seed=8)[0]
    free = _ours(engine, [prompt])[0]
    stop = tuple(free[10:12])
    out = generate(engine, [prompt], GenerationConfig(max_new_tokens=NEW, stop_sequences=(stop,)))[0]
    first = next(i for i in range(1, len(free)) if tuple(free[i - 1:i + 1]) == stop)
    assert out.tokens == free[: first + 1]
    assert out.finish_reason == "stop" and out.stop == list(stop)
    assert out.content_tokens == free[: first - 1]


def test_prompt_too_long_for_the_model_is_refused(qwen3):
    from mindspeed_lora.errors import UserError

    _, engine = qwen3
    with pytest.raises(UserError, match="max_position_embeddings"):
        _ours(engine, [[5] * 250])  # tiny configs allow 256 positions; 250 + 50 new do not fit


def test_engine_rejects_a_model_without_the_cache_hook(world, tmp_path_factory):
    from mindspeed_lora.models.arch import ModelArch
    from mindspeed_lora.models.builder import ParallelOptions, build_gpt_model

    arch = ModelArch.from_hf_config(tiny.tiny_hf_config("qwen3").to_dict())
    plain = build_gpt_model(arch, ParallelOptions(), pre_process=True, post_process=True)
    with pytest.raises(RuntimeError, match="kv_cache_spec_hook"):
        InferenceEngine(plain, 256)


def convert(*flags: str) -> None:
    """convert_ckpt.py in this process (as the quickstart runs it, minus the interpreter start)."""
    from mindspeed_lora.arguments import parse_args
    from mindspeed_lora.checkpoint.convert import run_from_args

    assert run_from_args(parse_args("convert_ckpt", ["--use-mcore-models", "--no-progress", *flags])) == 0


def test_converted_megatron_checkpoint_greedy_equals_hf_generate(world, tmp_path_factory):
    """--load a Megatron checkpoint made by convert_ckpt.py (tokenizer found in its hf_config/)."""
    from mindspeed_lora.errors import UserError
    from mindspeed_lora.inference.model import tokenizer_dir

    hf_path = str(tmp_path_factory.mktemp("hf_for_mcore"))
    hf = build_lively_model("llama3", hf_path, seed=4)
    tiny.build_tokenizer(hf_path)
    mg = str(tmp_path_factory.mktemp("mcore_ckpt"))
    convert("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", hf_path, "--save-dir", mg,
            "--overwrite-save-dir")
    engine, _ = build_inference_engine(ModelSource(load=mg), tp_rank=0)
    prompts = _prompts(seed=9)
    assert _ours(engine, prompts) == _hf_generate(hf, prompts, do_sample=False)
    assert os.path.isfile(os.path.join(tokenizer_dir(mg, None), "tokenizer.json"))
    with pytest.raises(UserError, match="saved with tensor-model-parallel-size 1.*this run uses 2"):
        build_inference_engine(ModelSource(load=mg, tensor_model_parallel_size=2), tp_rank=0)
