"""Chat serving on a replica of a published SDAR chat checkpoint (docs/CHECKPOINTS.md): a real
`vllm serve` process on 127.0.0.1 queried through the openai client, and `LLM.chat`, render the
replica's Qwen3-style chat template, stream token for token what they return whole, equal the
oracle on the templated prompt, and stop at the chat end token `<|im_end|>` (from
generation_config.json's eos list).

The replica's random weights never say `<|im_end|>`, so the fixture makes them: it swaps the
lm_head rows of `<|im_end|>` and a token X that the greedy answer says first in the middle of a
block. Logits are then the same up to that swap, so the answer is unchanged up to X's position
and says `<|im_end|>` there instead of X: the chat stop is exercised mid-block, with the real
chat end token, by the model itself."""
import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

openai = pytest.importorskip("openai")

MAX_TOKENS = 24
B = 4  # the replica has no block_size: SDAR's default
STOP_CHAT = [{"role": "user", "content": "def block_diffusion(model"}]
OTHER_CHAT = [  # a multi-turn chat: the template drops the earlier answer's think part
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "hello world"},
    {"role": "assistant", "content": "<think>\nplan\n</think>\n\nThe quick brown fox"},
    {"role": "user", "content": "import torch, json"},
]


def _template_ids(tok, messages) -> list[int]:
    """The templated prompt as vLLM's chat front end builds it: render, then encode the text."""
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok.encode(text, add_special_tokens=False)


def _oracle(model, prompt_ids: list[int], eos_ids: list[int], mask_id: int) -> list[int]:
    """Greedy block diffusion (the engine's default knobs) stopping at the first id of the eos
    list: the shortest of the one-eos runs (they share their prefix)."""
    from vllm_dllm_spec.reference import generate

    runs = [generate(model, prompt_ids, gen_length=MAX_TOKENS, block_length=B, mask_token_id=mask_id,
                     eos_token_id=e, fuse_commit=True).tokens for e in eos_ids]
    return min(runs, key=len)


def _swap_head_rows(path: str, a: int, b: int) -> None:
    """Swaps two tokens' lm_head rows in the (sharded, untied) replica's weights."""
    import json

    from safetensors.torch import load_file, save_file

    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        file = os.path.join(path, json.load(f)["weight_map"]["lm_head.weight"])
    state = load_file(file)
    head = state["lm_head.weight"]
    head[[a, b]] = head[[b, a]]
    save_file(state, file, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def chat_replica(tmp_path_factory):
    """(path, tokenizer, mask id, eos ids, oracle model, the stop chat's expected answer)."""
    from transformers import AutoTokenizer

    import vllm_dllm_spec
    from vllm_dllm_spec.replicas import ENDOFTEXT, IM_END, make_sdar_replica
    from vllm_dllm_spec.checkpoint import MASK_TOKEN
    from vllm_dllm_spec.reference import SDARModel

    vllm_dllm_spec.register()
    # SDAR-4B-Chat: untied, sharded; the served dense replica without --trust-remote-code
    path = make_sdar_replica(tmp_path_factory.mktemp("chat"), "SDAR-4B-Chat", seed=27)
    tok = AutoTokenizer.from_pretrained(path)
    im_end, endoftext, mask = tok.convert_tokens_to_ids([IM_END, ENDOFTEXT, MASK_TOKEN])
    eos_ids = [im_end, endoftext]  # the replica's generation_config list
    prompt = _template_ids(tok, STOP_CHAT)
    full = _oracle(SDARModel.from_pretrained(path), prompt, eos_ids, mask)
    assert len(full) == MAX_TOKENS and im_end not in full

    def mid_block(i: int) -> bool:  # not the last position of its SDAR block
        return (len(prompt) + i + 1) % B != 0

    stop_at = next(i for i in range(6, len(full)) if full[i] not in full[:i] and mid_block(i))
    _swap_head_rows(path, full[stop_at], im_end)
    model = SDARModel.from_pretrained(path)
    want = _oracle(model, prompt, eos_ids, mask)
    assert want == full[:stop_at] + [im_end]  # the model itself now ends its turn there
    return path, tok, mask, eos_ids, model, want


@pytest.fixture(scope="module")
def client(chat_replica, tmp_path_factory):
    """One `vllm serve` of the replica for the module (no dllm_spec option: SDAR's defaults)."""
    from vllm_dllm_spec.testing import VLLMServer

    log_path = tmp_path_factory.mktemp("chat_serve") / "serve.log"
    with VLLMServer(chat_replica[0], log_path) as srv:
        yield openai.OpenAI(base_url=srv.base_url, api_key="none", timeout=120)


def _chat(client, messages, **kw):
    return client.chat.completions.create(model="sdar", messages=messages, max_tokens=MAX_TOKENS,
                                          temperature=0, extra_body={"return_token_ids": True}, **kw)


def test_chat_completion_stops_at_im_end_like_the_oracle(client, chat_replica):
    _, tok, _, eos_ids, _, want = chat_replica
    resp = _chat(client, STOP_CHAT)
    choice = resp.choices[0]
    assert resp.prompt_token_ids == _template_ids(tok, STOP_CHAT)
    assert choice.token_ids == want and choice.finish_reason == "stop"
    # the end token is not text (random byte tokens may leave an incomplete UTF-8 tail, which
    # vLLM's detokenizer holds back, so the text is not compared with a plain decode)
    assert "<|im_end|>" not in choice.message.content


def test_chat_completion_multi_turn_equals_the_oracle(client, chat_replica):
    _, tok, mask, eos_ids, model, _ = chat_replica
    resp = _chat(client, OTHER_CHAT)
    prompt = _template_ids(tok, OTHER_CHAT)
    assert resp.prompt_token_ids == prompt
    assert "plan" not in tok.decode(prompt)  # the earlier answer's think part is dropped
    assert resp.choices[0].token_ids == _oracle(model, prompt, eos_ids, mask)


@pytest.mark.parametrize("messages", [STOP_CHAT, OTHER_CHAT], ids=["stop", "multi-turn"])
def test_chat_stream_equals_non_streaming(client, messages):
    whole = _chat(client, messages).choices[0]
    text, token_ids, finish = [], [], None
    for chunk in _chat(client, messages, stream=True):
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            token_ids += getattr(choice, "token_ids", None) or []
            finish = choice.finish_reason or finish
    assert token_ids == whole.token_ids
    assert "".join(text) == whole.message.content
    assert finish == whole.finish_reason


def test_llm_chat_equals_the_oracle(chat_replica):
    from vllm import LLM, SamplingParams

    from vllm_dllm_spec.testing import shutdown_llm

    path, tok, mask, eos_ids, model, want = chat_replica
    llm = LLM(model=path, dtype="float32", max_model_len=512, enforce_eager=True, max_num_seqs=8,
              block_size=32, seed=0)
    try:
        outs = llm.chat([STOP_CHAT, OTHER_CHAT], SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
                        use_tqdm=False)
    finally:
        shutdown_llm(llm)
    assert list(outs[0].outputs[0].token_ids) == want and outs[0].outputs[0].finish_reason == "stop"
    prompt = _template_ids(tok, OTHER_CHAT)
    assert list(outs[1].prompt_token_ids) == prompt
    assert list(outs[1].outputs[0].token_ids) == _oracle(model, prompt, eos_ids, mask)
