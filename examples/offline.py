"""Offline generation with the embedded default model: `python examples/offline.py`."""

from csps import LLM, SamplingParams


def main() -> None:
    llm = LLM(model="smollm2-135m", max_model_len=2048)
    prompts = ["The capital of France is", "Three primary colours are"]
    greedy = SamplingParams(temperature=0, max_tokens=16)
    for output in llm.generate(prompts, greedy):
        print(f"{output.prompt!r} -> {output.outputs[0].text!r}")
    chat = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                    SamplingParams(temperature=0.7, top_p=0.9, seed=1, max_tokens=32))
    print(chat[0].outputs[0].text)


if __name__ == "__main__":
    main()
