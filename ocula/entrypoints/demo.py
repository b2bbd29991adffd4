"""`python -m ocula.entrypoints.demo [question] [--model_dir DIR]`: one chat turn, greedy."""

from __future__ import annotations

import argparse
import logging

from ocula.entrypoints.llm import LLM
from ocula.sampling.params import SamplingParams


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Ask the model one question.")
    parser.add_argument("question", nargs="?", default="What is the capital of France?")
    parser.add_argument("--model_dir", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    llm = LLM(args.model_dir)
    messages = [{"role": "user", "content": args.question}]
    [output] = llm.chat(messages, SamplingParams(temperature=0, max_new_tokens=args.max_new_tokens))
    print(f"Q: {args.question}\nA: {output.text}")


if __name__ == "__main__":
    main()
