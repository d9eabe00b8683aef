"""Chat prompts (templates.json, history, --history-turns), stop words, streaming, and bad inference input.

Oracles: the chat text written out by hand from the template's documented slots (compared after decoding,
since slots are tokenized one by one as in training data), HF generate on those prompt ids, and the full
decode of the generated tokens for streaming.
"""
import io
import json
import types

import pytest
import torch

from mindspeed_lora import tiny
from mindspeed_lora.errors import UserError
from mindspeed_lora.inference.chat import ChatSession, conversation, interactive
from mindspeed_lora.inference.generation import GenerationConfig, generate
from mindspeed_lora.inference.model import ModelSource, build_inference_engine
from mindspeed_lora.inference.prompting import RawFormat, TemplateFormat, chat_format, stop_tokens
from mindspeed_lora.inference.runner import read_requests
from mindspeed_lora.inference.streaming import TextStreamer
from mindspeed_lora.parallel import initialize
from tests.unit.test_inference import build_lively_model

IM_END = 2


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny.build_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    initialize(1, 1, seed=5)
    path = str(tmp_path_factory.mktemp("chat_model"))
    hf = build_lively_model("qwen3", path, seed=3, max_position_embeddings=512)
    tokenizer = tiny.build_tokenizer(path)
    engine, _ = build_inference_engine(ModelSource(load=path), tp_rank=0)
    return hf, tokenizer, engine


def test_qwen3_template_renders_the_conversation_with_history(tok):
    fmt = chat_format(tok, "tiny", "qwen3", None, enable_thinking=None)
    history = [("Who are you?", "I am an AI assistant."), ("2 * 3 = ?", "6")]
    msgs = conversation("And 1 + 1?", history, history_turns=1, system="Be brief.")
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n"
                "<|im_start|>user\n2 * 3 = ?<|im_end|>\n<|im_start|>assistant\n6<|im_end|>\n"
                "<|im_start|>user\nAnd 1 + 1?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.decode(fmt.encode(msgs)) == expected
    thinking = chat_format(tok, "tiny", "qwen3", None, enable_thinking=True)
    assert tok.decode(thinking.encode(msgs)) == expected[: -len("<think>\n\n</think>\n\n")]
    all_turns = conversation("And 1 + 1?", history, history_turns=3)
    assert tok.decode(fmt.encode(all_turns)).count("<|im_start|>user") == 3
    assert stop_tokens(tok, fmt).token_ids == (IM_END,)  # eos and the stop word <|im_end|> are one token


def test_chat_session_keeps_history_and_replies_like_hf(model):
    hf, tok, engine = model
    fmt = TemplateFormat(tok, "qwen3", None, enable_thinking=None)
    cfg = GenerationConfig(max_new_tokens=12, stop_token_ids=stop_tokens(tok, fmt).token_ids)
    seen = []

    def respond(ids):
        seen.append(ids)
        return tok.decode(generate(engine, [ids], cfg)[0].content_tokens, skip_special_tokens=True)

    session = ChatSession(fmt, respond, history_turns=1)
    first = session.reply("Hello! Who are you?")
    second = session.reply("What is your name?")
    third = session.reply("Who made you?")
    assert session.history == [("Hello! Who are you?", first), ("What is your name?", second),
                               ("Who made you?", third)]
    text = tok.decode(seen[2])
    assert "What is your name?" in text and second in text and "Hello! Who are you?" not in text
    with torch.no_grad():
        out = hf.generate(torch.tensor([seen[2]]), max_new_tokens=12, do_sample=False, eos_token_id=IM_END,
                          pad_token_id=0)[0, len(seen[2]):].tolist()
    out = out[: out.index(IM_END)] if IM_END in out else out
    assert third == tok.decode(out, skip_special_tokens=True)
    session.clear()
    assert session.history == []


def test_interactive_loop_reads_rank0_lines_until_quit(tok):
    replies = []
    session = ChatSession(RawFormat(tok), lambda ids: replies.append(tok.decode(ids)) or "ok", history_turns=2)
    out = io.StringIO()
    interactive(session, True, stdin=io.StringIO("hello\n\nclear\nhow are you?\nq\nnever read\n"), out=out)
    assert replies == ["hello", "how are you?"]  # "clear" dropped the first turn from the second prompt
    assert out.getvalue().count("You >> ") == 5


def test_template_without_stop_words(tok, tmp_path, capsys):
    path = tmp_path / "templates.json"
    path.write_text(json.dumps([{"name": "bare", "format_user": {"slots": ["Q: {{content}}\nA: "]}}]))
    fmt = chat_format(tok, "tiny", "bare", str(path))
    stops = stop_tokens(tok, fmt)
    assert stops.token_ids == (tok.eos_token_id,)
    assert "template 'bare' has no stop_words; replies end at the tokenizer's eos token" in capsys.readouterr().err
    no_eos = types.SimpleNamespace(eos_token_id=None, eos_token=None)
    with pytest.raises(UserError, match="no stop_words and the tokenizer has no eos token"):
        stop_tokens(no_eos, fmt)


def test_multi_token_stop_word_becomes_a_sequence(tok):
    stops = stop_tokens(tok, RawFormat(tok), ["Answer:"])
    assert stops.sequences == (tuple(tok("Answer:", add_special_tokens=False)["input_ids"]),)
    assert stops.token_ids == (tok.eos_token_id,)


def test_streamer_prints_whole_characters_and_the_full_text(tok):
    ids = tok("你好，我是一个人工智能助手。Hello!", add_special_tokens=False)["input_ids"]
    out = io.StringIO()
    streamer = TextStreamer(tok, out=out)
    for i in range(1, len(ids) + 1):
        streamer.update(ids[:i])
        assert "\ufffd" not in out.getvalue()
    text = streamer.finish(ids)
    assert out.getvalue() == text + "\n" == tok.decode(ids) + "\n"


def _args(**kw):
    base = dict(input_file=None, prompt=None)
    return types.SimpleNamespace(**{**base, **kw})


def test_bad_prompts_and_input_files(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_requests(_args(input_file=str(tmp_path / "missing.jsonl")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": \n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        read_requests(_args(input_file=str(bad)))
    bad.write_text('{"prompt": "fine"}\n\n{"prompt": "   "}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:3: empty prompt"):
        read_requests(_args(input_file=str(bad)))
    bad.write_text('{"text": "no prompt key"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:1: expected a \"prompt\" string or a \"messages\" list"):
        read_requests(_args(input_file=str(bad)))
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:1: the last message must have role \"user\""):
        read_requests(_args(input_file=str(bad)))
    bad.write_text("")
    with pytest.raises(UserError, match="no prompts"):
        read_requests(_args(input_file=str(bad)))
    with pytest.raises(UserError, match="empty prompt"):
        conversation("  ", [], 3)
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "hi", "id": 7}\n{"system": "s", "history": [["a", "b"]], "prompt": "c"}\n')
    reqs = read_requests(_args(input_file=str(good)))
    assert reqs[0].record["id"] == 7
    assert [m["role"] for m in reqs[1].messages] == ["system", "user", "assistant", "user"]
    with pytest.raises(UserError, match="not both"):
        read_requests(_args(input_file=str(good), prompt=["x"]))
    with pytest.raises(UserError, match="--prompt: empty prompt"):
        read_requests(_args(prompt=["ok", " "]))


def test_load_dir_that_is_no_checkpoint(tmp_path):
    from mindspeed_lora.inference.model import checkpoint_kind, tokenizer_dir

    with pytest.raises(UserError, match="neither a Megatron checkpoint .* nor an HF model directory"):
        checkpoint_kind(str(tmp_path))
    with pytest.raises(UserError, match="no tokenizer files in .*pass --tokenizer-name-or-path"):
        tokenizer_dir(str(tmp_path), None)
    with pytest.raises(UserError, match="--load .*: no such directory"):
        ModelSource(load=str(tmp_path / "nope"))


def test_mindspeed_llm_rope_flags_are_checked_against_the_model(tmp_path):
    """MindSpeed-LLM's Llama 3.2 generate script passes its rope scaling and a --global-batch-size."""
    from mindspeed_lora.arguments import parse_args
    from mindspeed_lora.inference.model import model_source_from_args, resolve_arch

    rope = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    hf = tmp_path / "llama"
    tiny.tiny_hf_config("llama3", rope_scaling=dict(rope)).save_pretrained(hf)

    def source(factor):
        return model_source_from_args(parse_args("inference", [
            "--load", str(hf), "--rope-scaling-type", "llama3", "--rope-scaling-factor", factor,
            "--low-freq-factor", "1.0", "--high-freq-factor", "4.0", "--original-max-position-embeddings", "64",
            "--global-batch-size", "1", "--max-tokens-to-oom", "4096"]))
    assert resolve_arch(source("32")).rope_scaling["factor"] == 32.0
    with pytest.raises(UserError, match="rope scaling factor 8.0 on the command line, but --load .* has 32.0"):
        resolve_arch(source("8"))


def test_ckpt_step_reaches_the_model_source_and_an_hf_dir_has_no_iterations(tmp_path):
    """--ckpt-step (Megatron-LM's flag) picks the iteration read, as in training (test_inference_lora has the
    weights); an HF directory has none."""
    from mindspeed_lora.arguments import parse_args
    from mindspeed_lora.inference.model import model_source_from_args, resolve_arch

    tiny.tiny_hf_config("qwen3").save_pretrained(tmp_path)
    assert model_source_from_args(parse_args("inference", ["--load", str(tmp_path)])).ckpt_step is None
    source = model_source_from_args(parse_args("evaluation", ["--load", str(tmp_path), "--ckpt-step", "7", "--task",
                                                              "boolq", "--task-data-path", "x"]))
    assert source.ckpt_step == 7
    with pytest.raises(UserError, match="^--ckpt-step 7: --load .* is an HF model directory"):
        resolve_arch(source)
    with pytest.raises(UserError, match="--ckpt-step -1: expected an iteration number"):
        ModelSource(load=str(tmp_path), ckpt_step=-1)


def test_bad_generation_settings():
    with pytest.raises(UserError, match="--top-p=0"):
        GenerationConfig(top_p=0.0)
    with pytest.raises(UserError, match="--temperature=0"):
        GenerationConfig(do_sample=True, temperature=0.0)
    with pytest.raises(UserError, match="--max-new-tokens=0"):
        GenerationConfig(max_new_tokens=0)
