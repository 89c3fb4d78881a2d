"""Guardrail overhead, measured side by side in one process.

Sections (each prints a table of medians and ratios, targets and whether met):

1. generation: plain ``model.generate`` (with the same input building and
   decoding) vs. the guardrail in ``enforce`` and ``shadow`` mode; greedy, fixed
   number of new tokens, prompts mixing text and image, batch 1 and batch 8 with
   left padding; latency, throughput, time to first token, streaming.
2. against a classifier guard: "moderate then generate" with the same model as
   the classifier (input-only, and input-and-output moderation).
3. calibration: activation collection throughput of ``calibrate``'s collector vs.
   a naive ``output_hidden_states=True`` loop; peak memory for 100 vs 1,000 prompts.
4. policy operations: bundle load+verify time, bundle size, model reload time.

Generation is timed in per-request pairs: for each request (or batch) the plain and
guarded runs go back to back in rotating order, and the median of the per-pair ratios
is reported with its interquartile range. Calibration runs are interleaved whole
passes. Everything runs after warm-up.

    python benchmarks/overhead.py --model organism --policy policies/organism/1.0.0
    python benchmarks/overhead.py --model tiny-llava --quick
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from guardrail import Guardrail, PolicyBundle  # noqa: E402
from guardrail.adapters import ModelAdapter  # noqa: E402
from guardrail.calibration.calibrate import accumulate_means, candidate_layers  # noqa: E402
from guardrail.datasets import load_prompts  # noqa: E402
from guardrail.messages import parse_conversation  # noqa: E402
from guardrail.models.loading import load_model  # noqa: E402
from guardrail.steering import last_positions  # noqa: E402

TARGETS = {
    "latency_b1": 1.02,
    "throughput_loss_b8": 0.02,
    "ttft": 1.05,
    "calibration_speedup": 1.5,
    "memory_growth": 0.10,
}


def header(args: argparse.Namespace) -> None:
    import transformers

    print("# mars-guardrail overhead benchmark")
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} cores={torch.get_num_threads()} | "
        f"python {platform.python_version()} | torch {torch.__version__} | transformers {transformers.__version__}"
    )
    print(f"model: {args.model} | policy: {args.policy or 'random test policy'} | new tokens: {args.new_tokens}\n")


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Run each function ``repeats`` times in rotating order; return the timings."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            times[name].append(timed(fns[name]))
    return times


def paired(
    fns: dict[str, Callable[[Any], Any]], items: list[Any], repeats: int
) -> dict[str, list[float]]:
    """Per-request pairs: for every item and repeat, each function runs once on that item,
    back to back in rotating order; returns, per function, the ratios of its time to the
    first function's time on the same item in the same round.

    Pairing keeps slow drift of a shared machine (other load, clock changes) out of the
    ratios: both sides of a ratio ran within a second or two of each other."""
    names = list(fns)
    ratios: dict[str, list[float]] = {n: [] for n in names[1:]}
    k = 0
    for _ in range(repeats):
        for item in items:
            order = names[k % len(names) :] + names[: k % len(names)]
            k += 1
            t = {name: timed(lambda name=name, item=item: fns[name](item)) for name in order}
            for name in names[1:]:
                ratios[name].append(t[name] / t[names[0]])
    return ratios


def spread_note(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return f"{len(values)} pairs, IQR {q[0]:.3f}-{q[2]:.3f}"


def conversations(n: int, renderer: Any) -> list[Any]:
    prompts = [p.prompt for p in load_prompts("harmless", split="test")[: n // 2]]
    prompts += [p.prompt for p in load_prompts("harmful", split="test")[: n - len(prompts)]]
    convs = []
    for k, prompt in enumerate(prompts):
        if renderer is not None and k % 2 == 1:
            convs.append([{"role": "user", "content": renderer.image(prompt)}])
        else:
            convs.append([{"role": "user", "content": prompt}])
    return convs


def plain_generate(adapter: ModelAdapter, convs: list[Any], new_tokens: int, **kw: Any) -> list[str]:
    """What an application does without a guardrail: build inputs, generate, decode."""
    inputs = adapter.build_inputs([parse_conversation(c) for c in convs])
    with torch.no_grad():
        out = adapter.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                     do_sample=False, pad_token_id=adapter.tokenizer.pad_token_id, **kw)
    return adapter.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def row(name: str, value: float, target: float | None = None, higher_is_better: bool = False,
        note: str = "") -> str:
    if target is None:
        verdict = ""
    else:
        ok = value >= target if higher_is_better else value <= target
        verdict = f"target {'>=' if higher_is_better else '<='} {target:g}: {'MET' if ok else 'NOT MET'}"
    if note:
        verdict = f"{verdict} ({note})" if verdict else f"({note})"
    return f"| {name:48s} | {value:10.4f} | {verdict:24s} |"


def section_generation(guard: Guardrail, convs: list[Any], args: argparse.Namespace) -> dict[str, float]:
    adapter = guard.adapter
    n = args.new_tokens
    results: dict[str, float] = {}
    print("## 1. generation overhead (medians of per-request interleaved pairs)")
    print(f"| {'measure':48s} | {'value':>10s} | {'':24s} |\n|---|---:|---|")
    for batch in (1, 8):
        groups = [convs[i : i + batch] for i in range(0, len(convs), batch)][: max(1, args.prompts // batch)]
        fns: dict[str, Callable[[Any], Any]] = {
            "plain": lambda g: plain_generate(adapter, g, n),
            "enforce": lambda g: guard.generate(g, mode="enforce", max_new_tokens=n, min_new_tokens=n),
            "shadow": lambda g: guard.generate(g, mode="shadow", max_new_tokens=n, min_new_tokens=n),
        }
        paired(fns, groups[:2], 1)  # warm-up
        start = time.perf_counter()
        ratios = paired(fns, groups, args.repeats)
        elapsed = time.perf_counter() - start
        for mode in ("enforce", "shadow"):
            ratio = statistics.median(ratios[mode])
            if batch == 1:
                results[f"latency_b1_{mode}"] = ratio
                print(row(f"batch 1 latency ratio {mode}/plain", ratio, TARGETS["latency_b1"],
                          note=spread_note(ratios[mode])))
            else:
                loss = 1 - 1 / ratio  # throughput is tokens / time, the same tokens on both sides
                results[f"throughput_loss_b8_{mode}"] = loss
                print(row(f"batch 8 throughput loss {mode} vs plain", loss, TARGETS["throughput_loss_b8"],
                          note=spread_note(ratios[mode])))
        tokens = n * sum(len(g) for g in groups) * args.repeats * len(fns)
        print(row(f"batch {batch} tokens/s, all modes", tokens / elapsed))
    # time to first token: prefill + one token
    first: dict[str, Callable[[Any], Any]] = {
        "plain": lambda c: plain_generate(adapter, [c], 1),
        "enforce": lambda c: guard.generate(c, max_new_tokens=1),
    }
    paired(first, convs[:2], 1)
    ratios = paired(first, convs[: args.prompts], args.repeats)
    results["ttft"] = statistics.median(ratios["enforce"])
    print(row("time-to-first-token ratio enforce/plain", results["ttft"], TARGETS["ttft"],
              note=spread_note(ratios["enforce"])))
    # streaming
    from transformers import TextIteratorStreamer

    def plain_stream(conv: Any) -> None:
        import threading

        streamer = TextIteratorStreamer(adapter.tokenizer, skip_prompt=True, skip_special_tokens=True)
        inputs = adapter.build_inputs([parse_conversation(conv)])
        worker = threading.Thread(target=lambda: adapter.model.generate(
            **inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=streamer,
            pad_token_id=adapter.tokenizer.pad_token_id))
        worker.start()
        for _ in streamer:
            pass
        worker.join()

    streams: dict[str, Callable[[Any], Any]] = {
        "plain": plain_stream,
        "enforce": lambda c: list(guard.stream(c, max_new_tokens=n, min_new_tokens=n)),
    }
    paired(streams, convs[:2], 1)
    ratios = paired(streams, convs[: max(4, args.prompts // 3)], args.repeats)
    results["stream"] = statistics.median(ratios["enforce"])
    print(row("streaming latency ratio enforce/plain", results["stream"], TARGETS["latency_b1"],
              note=spread_note(ratios["enforce"])))
    print()
    return results


CLASSIFY = (
    "You are a content moderator. Answer with one word, 'safe' or 'unsafe'.\n\nRequest: {prompt}"
)


def section_classifier(guard: Guardrail, convs: list[Any], args: argparse.Namespace) -> None:
    adapter = guard.adapter
    n = args.new_tokens

    def moderate(conv: Any, output: str | None = None) -> None:
        text = conv[0]["content"] if isinstance(conv[0]["content"], str) else "(see image)"
        prompt = CLASSIFY.format(prompt=text) + (f"\n\nResponse: {output}" if output else "")
        content: Any = prompt if isinstance(conv[0]["content"], str) else [*conv[0]["content"][:-1], {"type": "text", "text": prompt}]
        plain_generate(adapter, [[{"role": "user", "content": content}]], 2)

    def guarded_input(conv: Any) -> None:
        moderate(conv)
        plain_generate(adapter, [conv], n)

    def guarded_both(conv: Any) -> None:
        moderate(conv)
        out = plain_generate(adapter, [conv], n)[0]
        moderate(conv, out)

    fns: dict[str, Callable[[Any], Any]] = {
        "mars": lambda c: guard.generate(c, max_new_tokens=n, min_new_tokens=n),
        "classifier_in": guarded_input,
        "classifier_in_out": guarded_both,
    }
    paired(fns, convs[:2], 1)
    ratios = paired(fns, convs[: args.prompts], args.repeats)
    print("## 2. against a classifier guard (the same model as moderator, batch 1)")
    print(f"| {'measure':48s} | {'value':>10s} | {'':24s} |\n|---|---:|---|")
    for key, label in (("classifier_in", "input only"), ("classifier_in_out", "input and output")):
        inverse = [1 / r for r in ratios[key]]
        print(row(f"MARS / classifier guard ({label})", statistics.median(inverse), note=spread_note(inverse)))
    print()


def section_calibration(adapter: ModelAdapter, args: argparse.Namespace) -> None:
    prompts = [parse_conversation(p.prompt) for p in load_prompts("harmless")[: args.calib_prompts]]
    layers = candidate_layers(adapter.num_layers, (0.2, 0.8))

    def ours() -> None:
        accumulate_means(adapter, prompts, layers, batch_size=8)

    def naive() -> None:
        sums: dict[int, torch.Tensor] = {}
        for conv in prompts:  # one prompt at a time, every hidden state materialised
            inputs = adapter.build_inputs([conv])
            with torch.no_grad():
                hs = adapter.model(**inputs, output_hidden_states=True).hidden_states
            pos = last_positions(inputs["attention_mask"])
            for layer in layers:
                v = hs[layer][0, pos[0]].double()
                sums[layer] = sums.get(layer, 0) + v

    def naive_batched() -> None:
        for start in range(0, len(prompts), 8):
            inputs = adapter.build_inputs(prompts[start : start + 8])
            with torch.no_grad():
                adapter.model(**inputs, output_hidden_states=True)

    fns = {"ours": ours, "naive": naive, "naive_batched": naive_batched}
    interleaved(fns, 1)
    t = interleaved(fns, max(1, args.repeats // 2))
    med = {k: statistics.median(v) for k, v in t.items()}
    print("## 3. calibration")
    print(f"| {'measure':48s} | {'value':>10s} | {'':24s} |\n|---|---:|---|")
    for k in ("ours", "naive", "naive_batched"):
        print(row(f"collection throughput {k} (prompts/s)", len(prompts) / med[k]))
    print(row("speed-up vs naive output_hidden_states loop", med["naive"] / med["ours"], TARGETS["calibration_speedup"], True))
    print(row("speed-up vs batched output_hidden_states", med["naive_batched"] / med["ours"]))
    peaks = {n: peak_rss(args.model, n) for n in (100, 1000)}
    growth = peaks[1000] / peaks[100] - 1
    print(row("peak RSS MB, 100 prompts", peaks[100] / 1024))
    print(row("peak RSS MB, 1,000 prompts", peaks[1000] / 1024))
    print(row("peak memory growth 100 -> 1,000 prompts", growth, TARGETS["memory_growth"]))
    print()


def peak_rss(model: str, n: int) -> int:
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(ROOT)!r})
        from guardrail.adapters import ModelAdapter
        from guardrail.calibration.calibrate import accumulate_means, candidate_layers
        from guardrail.models.loading import load_model
        from guardrail.messages import parse_conversation
        model, processor = load_model({model!r})
        adapter = ModelAdapter(model, processor)
        convs = (parse_conversation(f"Write a short note number {{i}} about gardening in spring.") for i in range({n}))
        accumulate_means(adapter, convs, candidate_layers(adapter.num_layers, (0.2, 0.8)), batch_size=8)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def section_policy(guard: Guardrail, args: argparse.Namespace, bundle_dir: Path) -> None:
    size = sum(f.stat().st_size for f in bundle_dir.iterdir())
    load = [timed(lambda: PolicyBundle.from_pretrained(bundle_dir, adapter=guard.adapter)) for _ in range(10)]
    config = {"stable": str(bundle_dir.resolve()),
              "canary": {"ref": str(bundle_dir.resolve()), "share": 0.1, "sticky_key": "user"}}
    new_rollout = [timed(lambda: guard.set_rollout(config)) for _ in range(10)]
    rollout = guard.rollout
    assert rollout is not None
    shares = [timed(lambda k=k: rollout.set_canary_share(0.1 * (k % 2))) for k in range(100)]
    guard.set_rollout(None)
    reload = [timed(lambda: load_model(args.model)) for _ in range(2)]
    print("## 4. policy operations")
    print(f"| {'measure':48s} | {'value':>10s} | {'':24s} |\n|---|---:|---|")
    print(row("bundle size (KB)", size / 1024))
    print(row("bundle load + verify (ms, median)", statistics.median(load) * 1000))
    print(row("set_rollout: new rollout, bundles loaded (ms)", statistics.median(new_rollout) * 1000))
    print(row("rollout swap: canary share / rollback (ms)", statistics.median(shares) * 1000))
    print(row("model reload (ms, median)", statistics.median(reload) * 1000))
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="organism")
    parser.add_argument("--policy", default=None)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calib-prompts", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="small numbers for a smoke run")
    parser.add_argument("--sections", default="generation,classifier,calibration,policy")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.prompts, args.repeats, args.calib_prompts = 8, 8, 3, 16
    header(args)
    model, processor = load_model(args.model)
    adapter = ModelAdapter(model, processor)
    if args.policy:
        bundle = PolicyBundle.from_pretrained(args.policy, adapter=adapter)
        bundle_dir = Path(args.policy)
    else:
        from guardrail.testing import random_policy

        bundle = random_policy(model, processor, layer=adapter.num_layers // 2, name="bench",
                               modalities=tuple(sorted(adapter.modalities)))
        bundle_dir = bundle.save_pretrained(Path("/tmp/mars-bench-policy"))
    guard = Guardrail(model, processor, bundle)
    renderer = None
    if "image" in adapter.modalities:
        from guardrail.evaluation.evaluate import default_renderer

        renderer = default_renderer(args.model)
        if args.model.startswith("tiny-"):
            from guardrail.calibration.typography import TypographicRenderer

            renderer = TypographicRenderer(size=(64, 64), font_size=10)
    convs = conversations(max(args.prompts, 8), renderer)
    sections = set(args.sections.split(","))
    if "generation" in sections:
        section_generation(guard, convs, args)
    if "classifier" in sections:
        section_classifier(guard, convs, args)
    if "calibration" in sections:
        section_calibration(adapter, args)
    if "policy" in sections:
        section_policy(guard, args, bundle_dir)


if __name__ == "__main__":
    main()
