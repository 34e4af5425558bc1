"""Cost of the pre-call input-token estimate vs the JSON parse it follows (``python -m bench.tokens``)."""

from __future__ import annotations

import timeit

import orjson

from extproc.tokens import estimate_input_tokens


def main() -> None:
    print("| prompt | estimate (µs) | orjson.loads (µs) |\n|---|---:|---:|")
    for kb in (1, 10, 100):
        text = ("The quick brown fox jumps over the lazy dog. " * (kb * 1024 // 45 + 1))[: kb * 1024]
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
        payload = {"model": "m", "messages": messages}
        body = orjson.dumps(payload)
        n = 20000 if kb < 100 else 5000
        def estimate_once(p: dict[str, object] = payload) -> int:
            return estimate_input_tokens(p, "chat/completions")

        estimate = min(timeit.repeat(estimate_once, number=n, repeat=5))
        parse = min(timeit.repeat(lambda b=body: orjson.loads(b), number=n, repeat=5))
        print(f"| {kb} KB | {estimate / n * 1e6:.2f} | {parse / n * 1e6:.2f} |")


if __name__ == "__main__":
    main()
