"""llama-server under load, as people deploy it: aggregate decode speed of parallel slots at a long
context, and a load test of many chat requests from concurrent clients whose greedy answers are
compared with the same requests answered alone."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from ..runtime.programs import Running

LOAD_WORDS = ("river", "stone", "light", "house", "garden", "winter", "market", "letter", "engine", "cloud",
              "silver", "forest", "window", "harbor", "violin", "ladder")


def load_requests(n: int = 64, seed: int = 0) -> list[tuple[str, int]]:
    """(user message, max_tokens): distinct prompts, 8 to 24 tokens each"""
    rng = random.Random(seed)
    return [(f"Request {i}: " + " ".join(rng.choice(LOAD_WORDS) for _ in range(rng.randint(3, 30))), 8 + 4 * (i % 5))
            for i in range(n)]


def client(server: Running):
    """The official ``openai`` client for the server's /v1 (thread-safe, one per run of requests)."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)


def chat(api, message: str, max_tokens: int) -> tuple[str, str, int]:
    """One greedy chat completion through ``client(server)``: (text, finish reason, completion
    tokens)."""
    r = api.chat.completions.create(model="any", messages=[{"role": "user", "content": message}],
                                       max_tokens=max_tokens, temperature=0.0)
    return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens


def answer_all(server: Running, requests: Sequence[tuple[str, int]], clients: int = 0) -> list[tuple[str, str, int]]:
    """Every request's answer; ``clients`` > 0 sends them from that many concurrent clients, 0 one
    at a time."""
    api = client(server)
    if clients <= 0:
        return [chat(api, m, n) for m, n in requests]
    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(lambda r: chat(api, *r), requests))


def slots_at_context(server: Running, prompts: Sequence[Sequence[int]], n_predict: int) -> dict[str, Any]:
    """Decode speed of every slot busy at a long context. Each prompt (token ids) is first processed
    into a slot of its own (all at once, nothing generated); then every slot continues its own
    prompt (the cached prefix is reused: one token processed) and generates ``n_predict`` tokens,
    all slots decoding together. Aggregate decode tokens/s: every slot's generated tokens over the
    wall time of that second phase (and the sum of the slots' own rates, as the server times
    them)."""
    def request(i, ids, n):
        return server.post("/completion", {"prompt": list(ids), "n_predict": n, "temperature": 0, "ignore_eos": True,
                                           "cache_prompt": True, "id_slot": i}, timeout=3600)

    def phase(n):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(prompts)) as pool:
            out = list(pool.map(lambda a: request(a[0], a[1], n), enumerate(prompts)))
        return out, time.perf_counter() - t0

    filled, wall_prefill = phase(0)
    decoded, wall_decode = phase(n_predict)
    timings = [o["timings"] for o in decoded]
    generated = sum(t["predicted_n"] for t in timings)
    return {
        "slots": len(prompts),
        "prompt_tokens": [o["timings"]["prompt_n"] for o in filled],
        "prefill_tok_s_aggregate": round(sum(o["timings"]["prompt_n"] for o in filled) / wall_prefill, 1),
        "reprocessed_tokens": [t["prompt_n"] for t in timings],
        "predicted_tokens": [t["predicted_n"] for t in timings],
        "decode_tok_s_per_slot": [round(t["predicted_per_second"], 2) for t in timings],
        "decode_tok_s_aggregate": round(generated / wall_decode, 2),
        "decode_tok_s_sum_of_slots": round(sum(t["predicted_per_second"] for t in timings), 2),
        "wall_s": round(wall_prefill + wall_decode, 1),
    }
