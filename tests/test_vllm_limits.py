"""Engine limits (real engine, float32, greedy).

- max_model_len: a request without max_tokens (vLLM then allows max_model_len - prompt tokens)
  finishes exactly like the reference with the length the engine can hold, for block diffusion
  (the last block ends on the last position) and SimSD (the verify region must fit too: the
  output is cut, "length"); a prompt leaving no room is refused with a clear message and the
  engine keeps serving.
- token budget: a full SimSD batch under the smallest max_num_batched_tokens the hook allows
  (every request's verify region and commit in one step) equals the oracle.
- PSD: the same limits with its block copies (draft_depth x B tokens per step)."""
import os
import random

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from vllm_dllm_spec.methods import max_total_tokens  # noqa: E402
from vllm_dllm_spec.reference import SDARModel  # noqa: E402
from vllm_dllm_spec.reference.generate import generate  # noqa: E402
from vllm_dllm_spec.reference.psd import psd_generate  # noqa: E402
from vllm_dllm_spec.reference.simsd import simsd_generate  # noqa: E402
from vllm_dllm_spec.testing import shutdown_llm  # noqa: E402

MAX_LEN = 64
B = 4


def _prompts(lengths, seed=0, vocab_size=64):  # the tiny checkpoint's vocabulary
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab_size) for _ in range(n)] for n in lengths]


def _llm(path, options, **kw):
    from vllm import LLM

    return LLM(model=path, dtype="float32", max_model_len=MAX_LEN, enforce_eager=True, block_size=32,
               seed=0, additional_config={"dllm_spec": options}, **kw)


def _run(llm, prompts, max_tokens):
    from vllm import SamplingParams

    sps = [SamplingParams(max_tokens=m, temperature=0.0) for m in max_tokens]
    return llm.generate([{"prompt_token_ids": p} for p in prompts], sps, use_tqdm=False)


@pytest.fixture(scope="module")
def target(tiny_ckpt):
    model = SDARModel.from_pretrained(tiny_ckpt)
    assert model.config.vocab_size >= 64
    return model


def test_max_total_tokens():
    # block diffusion (span = B): the last block must end inside max_model_len
    assert max_total_tokens(64, 4, 4) == 64
    assert max_total_tokens(66, 4, 4) == 64
    assert max_total_tokens(67, 4, 4) == 64
    assert max_total_tokens(68, 4, 4) == 68
    # SimSD, K draft blocks (span = 2 K B): the region of the last block must fit
    assert max_total_tokens(64, 4, 8) == 60
    assert max_total_tokens(64, 4, 16) == 52
    assert max_total_tokens(64, 8, 16) == 56


def test_max_model_len_too_small_is_a_startup_error(tiny_ckpt):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=tiny_ckpt, dtype="float32", max_model_len=8, enforce_eager=True, block_size=32,
                      additional_config={"dllm_spec": {"method": "simsd", "num_draft_blocks": 2}})
    with pytest.raises(ValueError, match=r"max_model_len \(8\) is too small for method 'simsd'.*>= 16"):
        args.create_engine_config()
    assert max_total_tokens(16, 4, 16) == 4  # the minimum it names holds a 3-token prompt + 1


class TestBlockDiffusion:
    @pytest.fixture(scope="class")
    @classmethod
    def llm(cls, tiny_ckpt):
        llm = _llm(tiny_ckpt, {})
        yield llm
        shutdown_llm(llm)

    def test_requests_up_to_the_last_position_equal_reference(self, llm, target):
        lengths = [33, 48, 55, 57, 58, 59, 60, 61, 62, 63]
        prompts = _prompts(lengths)
        outputs = _run(llm, prompts, [None] * len(prompts))
        for p, o in zip(prompts, outputs):
            ref = generate(target, p, gen_length=MAX_LEN - len(p), fuse_commit=True)
            got = list(o.outputs[0].token_ids)
            assert got == ref.tokens, len(p)
            assert len(got) == MAX_LEN - len(p) and o.outputs[0].finish_reason == "length"
            assert o.kv_transfer_params["dllm_spec"]["num_forwards"] == ref.num_forwards, len(p)


class TestSimSD:
    OPTIONS = {"method": "simsd", "num_draft_blocks": 2}  # verify region 2 * 2 * B = 16 tokens
    ROOM = max_total_tokens(MAX_LEN, B, 16)  # 52
    NUM_SEQS = 8

    @pytest.fixture(scope="class")
    @classmethod
    def llm(cls, tiny_ckpt):
        # a budget of 96 would cut the 8 regions + commits of one step; the hook raises it
        llm = _llm(tiny_ckpt, cls.OPTIONS, max_num_seqs=cls.NUM_SEQS, max_num_batched_tokens=96)
        assert llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens == 3 * 16 * cls.NUM_SEQS
        yield llm
        shutdown_llm(llm)

    def _check(self, target, prompts, max_tokens, outputs):
        for p, m, o in zip(prompts, max_tokens, outputs):
            n = self.ROOM - len(p) if m is None else m
            ref = simsd_generate(target, None, p, gen_length=n, num_draft_blocks=2)
            got = list(o.outputs[0].token_ids)
            assert got == ref.tokens, len(p)
            assert len(got) == n and o.outputs[0].finish_reason == "length"
            assert o.kv_transfer_params["dllm_spec"]["target_forwards"] == ref.target_forwards, len(p)

    def test_output_is_cut_where_the_last_region_still_fits(self, llm, target):
        lengths = [37, 40, 45, 49, 50, 51, 50]
        max_tokens = [None] * 6 + [1]  # the last: an explicit max_tokens inside the room stays
        prompts = _prompts(lengths, seed=1)
        for p, m in zip(prompts, max_tokens):  # one at a time: no prompt is chunked
            self._check(target, [p], [m], _run(llm, [p], [m]))

    def test_full_batch_under_the_smallest_budget(self, llm, target):
        prompts = _prompts([1, 3, 5, 8, 9, 12, 4, 7], seed=3)
        assert len(prompts) == self.NUM_SEQS
        self._check(target, prompts, [None] * len(prompts), _run(llm, prompts, [None] * len(prompts)))

    def test_prompt_without_room_is_refused_and_the_engine_keeps_serving(self, llm, target):
        from vllm.exceptions import VLLMValidationError  # a client error: HTTP 400 on the server

        with pytest.raises(VLLMValidationError, match=rf"prompt \(length {self.ROOM}\) leaves no room.*"
                                                      rf"at most {self.ROOM - 1} tokens") as err:
            _run(llm, _prompts([self.ROOM]), [None])
        assert err.value.parameter == "prompt"
        with pytest.raises(VLLMValidationError, match="leaves no room"):
            _run(llm, _prompts([MAX_LEN - 1]), [1])
        p = _prompts([30], seed=2)
        (o,) = _run(llm, p, [8])
        assert list(o.outputs[0].token_ids) == simsd_generate(target, None, p[0], gen_length=8,
                                                              num_draft_blocks=2).tokens


class TestPSD:
    ROOM = max_total_tokens(MAX_LEN, B, 3 * B)  # 3 block copies per step: 56

    @pytest.fixture(scope="class")
    @classmethod
    def llm(cls, tiny_ckpt):
        llm = _llm(tiny_ckpt, {"method": "psd", "draft_depth": 3})
        yield llm
        shutdown_llm(llm)

    def test_output_cut_where_the_copies_still_fit_and_prompt_without_room_refused(self, llm, target):
        from vllm.exceptions import VLLMValidationError

        prompts = _prompts([30, 45, 52, 55], seed=4)
        for p, o in zip(prompts, _run(llm, prompts, [None] * len(prompts))):
            ref = psd_generate(target, p, gen_length=self.ROOM - len(p), draft_depth=3)
            assert list(o.outputs[0].token_ids) == ref.tokens and o.outputs[0].finish_reason == "length"
            assert o.kv_transfer_params["dllm_spec"]["num_forwards"] == ref.num_forwards
        with pytest.raises(VLLMValidationError, match=rf"at most {self.ROOM - 1} tokens"):
            _run(llm, _prompts([self.ROOM]), [None])
