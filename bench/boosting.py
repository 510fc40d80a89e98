"""What key-phrase boosting costs: building phrase trees, and decoding batches with boosting.

    make bench-boost                          # the demo model
    python -m bench.boosting --repeats 9      # more repeats

1. Trees: lists of 100 and 1,000 phrases through the worker's tree cache (boosting.trees()), as a
   request pays for them: cold (a new list each repeat: tokenizer check + NeMo's tree build) and
   cached (the same list again); what registering one with the decoder costs per batch
   (add_model + remove_model); the tree's size in memory.
2. Batches: 16 clips of clear speech (30 s of audio) through asr.run_model, the worker's
   model call (encoder + greedy TDT decoding + results), in the decoder the worker builds with
   BOOSTING=off and with boosting on: nothing boosted, one item boosted, every item boosted with
   one shared list of 10 / 100 / 1,000 phrases, every item with its own list of 100. The
   configurations take turns within each repeat, so a busy neighbour slows them alike; wall and
   process CPU time (all threads) are both kept, CPU time being the steadier on a shared machine;
   and the decoder alone (registration + greedy TDT decoding of the same encoder output).
3. The decoder rebuild (the worker's timestamps switch) with boosting on and off.

Prints tables and writes every raw number to bench/out/boosting.json. On a shared CPU these
are CPU numbers for the demo model, not a GPU's for Parakeet.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench import common
from parakeet_worker import config
from parakeet_worker import model as asr
from parakeet_worker.analysis import boosting
from tools import synth

TEXTS = ["one two three four five six seven eight nine zero", "hello world", "stop go left right up down",
         "yes no yes", "three two one go", "seven eight nine", "left right up down stop", "zero one"]  # fmt: skip
VOICES = ("en-us", "en-gb")


def phrases(n: int, seed: int, letters: str) -> list[str]:
    """`n` distinct made-up phrases of 1 to 3 words of 3 to 9 letters (deterministic for a seed),
    spelt with `letters`, the ones the model's tokenizer knows."""
    rng = np.random.default_rng(seed)
    alphabet = np.array(list(letters))
    out: set[str] = set()
    while len(out) < n:
        words = ["".join(rng.choice(alphabet, rng.integers(3, 10))) for _ in range(rng.integers(1, 4))]
        out.add(" ".join(words))
    return sorted(out)


def known_letters(handler: Any) -> str:
    tokenizer = asr.loaded_model().tokenizer
    return "".join(c for c in "abcdefghijklmnopqrstuvwxyz" if tokenizer.unk_id not in tokenizer.text_to_ids(c))


def ms(values: list[float]) -> dict[str, float]:
    return {"min_ms": round(min(values) * 1e3, 3), "median_ms": round(statistics.median(values) * 1e3, 3),
            "max_ms": round(max(values) * 1e3, 3), "n": len(values)}  # fmt: skip


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def request_boost(handler: Any, raw: list[str]) -> Any:
    """What a request's list costs the worker: the lexical check, then the cache (or a build)."""
    return boosting.resolve_boost(asr.loaded_model(), boosting.clean_phrases(raw), 1.0)


def tree_costs(handler: Any, repeats: int, letters: str) -> dict[str, Any]:
    """Cold and cached lists through the worker's own path, registration, memory."""
    multi = boosting.multi_model(asr.loaded_model())
    out: dict[str, Any] = {}
    for n in (100, 1000):
        cold, hot, register = [], [], []
        for r in range(repeats):
            fresh = phrases(n, seed=10_000 * n + r, letters=letters)  # never built before: a miss
            cold.append(timed(lambda raw=fresh: request_boost(handler, raw)))
        same = phrases(n, seed=7 * n, letters=letters)[::-1]  # as a client might send it: unsorted
        boost = request_boost(handler, same)
        for _ in range(200):
            hot.append(timed(lambda raw=same: request_boost(handler, raw)))
        for _ in range(repeats):
            register.append(timed(lambda tree=boost.tree: multi.remove_model(multi.add_model(tree, alpha=1.0))))
        tensors = itertools.chain(boost.tree.parameters(), boost.tree.buffers())
        out[str(n)] = {
            "cold": ms(cold), "cached": ms(hot), "register_per_batch": ms(register),
            "tree_states": int(boost.tree.num_states), "tree_arcs": int(boost.tree.num_arcs),
            "tree_mb": round(sum(t.numel() * t.element_size() for t in tensors) / 2**20, 3),
        }  # fmt: skip
    out["cache"] = boosting.trees().info()
    return out


def batch_costs(handler: Any, repeats: int, letters: str) -> dict[str, Any]:
    import torch

    clips = [synth.speak(t, v, 150) for v in VOICES for t in TEXTS]
    lengths = [len(c) for c in clips]
    audio = np.zeros((len(clips), max(lengths)), np.float32)
    for row, clip in enumerate(clips):
        audio[row, : len(clip)] = clip
    audio_sec = sum(lengths) / synth.SAMPLE_RATE
    lists = {n: tuple(phrases(n, seed=n, letters=letters)) for n in (10, 100, 1000)}
    own = [tuple(phrases(100, seed=50_000 + i, letters=letters)) for i in range(len(clips))]
    boost = {n: boosting.resolve_boost(asr.loaded_model(), p, 1.0) for n, p in lists.items()}  # built before timing
    own_boosts = [boosting.resolve_boost(asr.loaded_model(), p, 1.0) for p in own]
    rows = len(clips)
    cases: dict[str, tuple[bool, list[Any]]] = {
        "BOOSTING=off (the decoder without boosting)": (False, [None] * rows),
        "on, no item boosted": (True, [None] * rows),
        "on, 1 of 16 boosted (10 phrases)": (True, [boost[10]] + [None] * (rows - 1)),
        "on, all 16 share 10 phrases": (True, [boost[10]] * rows),
        "on, all 16 share 100 phrases": (True, [boost[100]] * rows),
        "on, all 16 share 1,000 phrases": (True, [boost[1000]] * rows),
        "on, 16 lists of 100, one per item": (True, own_boosts),
    }
    walls: dict[str, list[float]] = {name: [] for name in cases}
    cpus: dict[str, list[float]] = {name: [] for name in cases}
    decoder: dict[str, list[float]] = {name: [] for name in cases}
    texts: dict[str, list[str]] = {}
    model, on_cfg = asr.loaded_model(), config.CFG
    with torch.inference_mode():  # the encoder's output, for timing the decoder alone
        signal, signal_len = torch.from_numpy(audio), torch.tensor(lengths)
        encoded, encoded_len = model.forward(input_signal=signal, input_signal_length=signal_len)

    def decode_only(boosts: list[Any]) -> None:
        with boosting.registered(model, boosts) as seeds, torch.inference_mode():
            model.decoding.rnnt_decoder_predictions_tensor(
                encoded, encoded_len, return_hypotheses=True, partial_hypotheses=seeds
            )

    for rep in range(repeats + 1):  # the first round warms up and is not counted
        for name, (on, boosts) in cases.items():
            config.CFG = dataclasses.replace(on_cfg, boosting=on)
            asr.configure_decoding(model, timestamps=False)
            started, cpu = time.perf_counter(), time.process_time()
            result = asr.run_model(model, audio, lengths, False, boosts)
            if rep:
                walls[name].append(time.perf_counter() - started)
                cpus[name].append(time.process_time() - cpu)
                decoder[name].append(timed(lambda b=boosts: decode_only(b)))
            texts[name] = [t.text for t in result]
    config.CFG = on_cfg
    asr.configure_decoding(model, timestamps=False)
    first = next(iter(cases))
    base, base_cpu, base_decoder = (statistics.median(x[first]) for x in (walls, cpus, decoder))
    padded_sec = rows * max(lengths) / synth.SAMPLE_RATE
    return {
        "items": rows, "audio_sec": round(audio_sec, 2), "padded_sec": round(padded_sec, 2),
        "cases": {name: {**ms(w), "vs_off_median": round(statistics.median(w) / base, 3),
                         "cpu": ms(cpus[name]), "cpu_vs_off_median": round(statistics.median(cpus[name]) / base_cpu, 3),
                         "decoder_only": ms(decoder[name]),
                         "decoder_vs_off_median": round(statistics.median(decoder[name]) / base_decoder, 3),
                         "audio_sec_per_sec_median": round(audio_sec / statistics.median(w), 1),
                         "texts_equal_unboosted": texts[name] == texts["on, no item boosted"]}
                  for name, w in walls.items()},
    }  # fmt: skip


def rebuild_costs(handler: Any, repeats: int) -> dict[str, Any]:
    """asr.configure_decoding, as the worker runs it when a batch's timestamps flag differs
    from the last one's: with boosting on, NeMo also allocates a new multi-model."""
    model, on_cfg = asr.loaded_model(), config.CFG
    out = {}
    for on in (False, True):
        config.CFG = dataclasses.replace(on_cfg, boosting=on)
        out["on" if on else "off"] = ms([timed(lambda stamps=r % 2 == 0: asr.configure_decoding(model, stamps))
                                         for r in range(repeats)])  # fmt: skip
    config.CFG = on_cfg
    asr.configure_decoding(model, timestamps=False)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(p)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice, as the worker)")
    args = p.parse_args()
    common.configure_env(**({"PARAKEET_MODEL": args.model} if args.model else {}))
    result: dict[str, Any] = {}
    if args.wait_quiet:
        result["wait_quiet"] = common.wait_until_quiet(args.wait_quiet)
    import logging

    import torch

    import handler

    if args.threads:
        torch.set_num_threads(args.threads)
    handler.ensure_model()
    from nemo.utils import logging as nemo_logging

    nemo_logging.setLevel(logging.ERROR)  # one INFO line per tree built
    letters = known_letters(handler)
    result["machine"] = {**common.machine_info(os.environ["PARAKEET_MODEL"]), "torch_threads": torch.get_num_threads()}
    result["trees"] = tree_costs(handler, args.repeats, letters)
    result["batch"] = batch_costs(handler, args.repeats, letters)
    result["decoder_rebuild"] = rebuild_costs(handler, args.repeats)
    result["machine"]["load_avg_1m_after"] = round(os.getloadavg()[0], 2)

    trees = result["trees"]
    header = ["phrases", "new list: check + build, median (min) ms", "same list again, median us",
              "register + remove per batch, ms", "tree MB"]  # fmt: skip
    print(common.markdown_table(header, [
        (n, f"{t['cold']['median_ms']:.1f} ({t['cold']['min_ms']:.1f})", f"{t['cached']['median_ms'] * 1e3:.1f}",
         t["register_per_batch"]["median_ms"], t["tree_mb"])
        for n, t in ((n, trees[n]) for n in ("100", "1000"))
    ]))  # fmt: skip
    batch = result["batch"]
    print(f"\nbatch of {batch['items']} clips, {batch['audio_sec']} s of audio, padded to {batch['padded_sec']} s:")
    header = ["decoder and rows", "model call: wall median (min) ms", "vs off", "CPU median ms", "vs off",
              "decoder alone: median ms", "vs off", "texts as unboosted"]  # fmt: skip
    print(common.markdown_table(header, [
        (name, f"{c['median_ms']:.0f} ({c['min_ms']:.0f})", c["vs_off_median"], c["cpu"]["median_ms"],
         c["cpu_vs_off_median"], c["decoder_only"]["median_ms"], c["decoder_vs_off_median"], c["texts_equal_unboosted"])
        for name, c in batch["cases"].items()
    ]))  # fmt: skip
    rebuild = {k: v["median_ms"] for k, v in result["decoder_rebuild"].items()}
    print(f"\ndecoder rebuild (timestamps switch), median: off {rebuild['off']} ms, on {rebuild['on']} ms")
    print(f"load average {result['machine']['load_avg_1m']} before, {result['machine']['load_avg_1m_after']} after; "
          f"raw numbers in {common.write_json('boosting.json', result)}")  # fmt: skip


if __name__ == "__main__":
    main()
