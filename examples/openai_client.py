"""Query `vllm serve <sdar-dir>` (block diffusion by default) through the openai client.

    vllm serve <sdar-dir> --port 8000 \
        --additional-config '{"dllm_spec": {"remasking_strategy": "low_confidence_static"}}'
    python examples/openai_client.py http://127.0.0.1:8000/v1

Per-request knobs go in `vllm_xargs`; a bad knob is an HTTP 400 with the message. The
non-streaming response's `kv_transfer_params["dllm_spec"]` holds num_forwards and step_map.
"""
import sys

import openai


def main() -> None:
    client = openai.OpenAI(base_url=sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/v1",
                           api_key="none")
    model = client.models.list().data[0].id
    resp = client.completions.create(
        model=model, prompt="The quick brown fox", max_tokens=16, temperature=0,
        extra_body={"vllm_xargs": {"remasking_strategy": "sequential", "denoising_steps": 2}})
    print(repr(resp.choices[0].text), resp.kv_transfer_params)
    for chunk in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=16,
            temperature=0, stream=True):  # one chunk per finished block
        print(repr(chunk.choices[0].delta.content) if chunk.choices else "", end=" ", flush=True)
    print()
    try:
        client.completions.create(model=model, prompt="x", max_tokens=4,
                                  extra_body={"vllm_xargs": {"remasking_strategy": "nope"}})
    except openai.BadRequestError as err:
        print("400:", err.message)


if __name__ == "__main__":
    main()
