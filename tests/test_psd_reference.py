"""The PSD-style self-speculative oracle (`reference.psd.psd_generate`) against plain greedy
block diffusion (`reference.generate`, fuse_commit): identical tokens and step_map for every
remasking strategy, never more forwards, exactly as many at draft_depth 1, and fewer where the
model's drafts are right."""
import pytest

torch = pytest.importorskip("torch")

from vllm_dllm_spec import bundled_model_path  # noqa: E402
from vllm_dllm_spec.reference import SDARModel, generate  # noqa: E402
from vllm_dllm_spec.reference.psd import psd_generate  # noqa: E402
from tolerances import assert_close  # noqa: E402
from vllm_helpers import prompts_for, request_configs  # noqa: E402


@pytest.fixture(scope="module")
def random_model(tiny_ckpt):
    return SDARModel.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def bundled():
    return SDARModel.from_pretrained(bundled_model_path())


def _check(model, prompt, gen_length, depth, **knobs):
    plain = generate(model, prompt, gen_length=gen_length, fuse_commit=True, **knobs)
    psd = psd_generate(model, prompt, gen_length=gen_length, draft_depth=depth, **knobs)
    assert psd.tokens == plain.tokens
    assert psd.step_map == plain.step_map
    # each token's logprobs come from plain decoding's step that unmasked it
    assert psd.logprobs.shape == (len(plain.tokens), model.config.vocab_size)
    assert_close(psd.logprobs, plain.logprobs)
    assert psd.num_forwards <= plain.num_forwards
    assert all(1 <= a <= depth for a in psd.accepted_per_verification)
    return plain, psd


@pytest.mark.parametrize("block_length", [4, 8])
@pytest.mark.parametrize("depth", [1, 2, 4])
def test_equals_plain_block_diffusion_for_every_strategy(random_model, block_length, depth):
    prompts = prompts_for(random_model.config.vocab_size)
    for prompt, knobs in zip(prompts, request_configs(block_length)):
        plain, psd = _check(random_model, prompt, 21, depth, block_length=block_length, **knobs)
        if depth == 1:  # no drafts: one verification per step, exactly plain decoding's forwards
            assert psd.num_forwards == plain.num_forwards
            assert set(psd.accepted_per_verification) <= {1}


def test_fewer_forwards_on_the_bundled_model(bundled):
    from transformers import PreTrainedTokenizerFast

    from vllm_dllm_spec.tools.evaluate_tiny import heldout_prompts

    tok = PreTrainedTokenizerFast.from_pretrained(bundled_model_path())
    plain_fw = psd_fw = 0
    for _, prompt in heldout_prompts(tok, 4):
        for strategy in ("low_confidence_dynamic", "sequential"):
            plain, psd = _check(bundled, prompt, 32, 3, remasking_strategy=strategy)
            plain_fw += plain.num_forwards
            psd_fw += psd.num_forwards
    assert psd_fw < plain_fw  # some drafts are accepted (lossless either way)


def test_eos_and_gen_length_cut_like_plain(random_model):
    prompt = prompts_for(random_model.config.vocab_size)[3]
    plain = generate(random_model, prompt, gen_length=13, fuse_commit=True)
    eos = plain.tokens[5]
    _check(random_model, prompt, 13, 3, eos_token_id=eos)
    _check(random_model, prompt, 13, 3)


def test_bad_draft_depth_names_the_parameter(random_model):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="draft_depth must be an integer >= 1"):
            psd_generate(random_model, [3, 4], gen_length=4, draft_depth=bad)
