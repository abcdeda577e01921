"""From raw runs to figures, ratios against transformers and against the bandwidth limit, the targets, a plot and
a markdown table.

Ratios are taken per repeat (engines ran side by side within a repeat) and then summarised by their minimum and
median over repeats: on a noisy machine the absolute numbers drift, ratios measured together much less.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from reference import CohereConfig

BASELINE = "transformers"


def artifact_weight_bytes(artifact: Path) -> int:
    """Bytes of the graph and its weights: what a decode step reads besides the KV cache."""
    return sum(p.stat().st_size for p in artifact.iterdir() if p.name.startswith("model.onnx"))


def kv_bytes_per_row(config: CohereConfig, filled_slots: int, itemsize: int = 4) -> int:
    """KV-cache bytes one decode step reads per row: on ONNX Runtime attention reads the filled prefix of the
    static cache (``kv_slots``), keys and values of every layer."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * filled_slots * config.head_dim * itemsize


def _stats(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def summarise(results: dict) -> None:
    """Add ``figures``, ``ratios`` and ``targets`` to every size in ``results``."""
    bandwidth = results["machine"]["read_bandwidth_bytes_per_s"]["best"]
    plan = results["plan"]
    short, long = plan["decode_prompt"], max(plan["ttft_prompts"])
    for size in results["sizes"].values():
        runs = size["runs"]
        engines = list(dict.fromkeys(r["engine"] for r in runs))
        repeats = sorted({r["repeat"] for r in runs})

        def per_repeat(engine, kind, batch, prompt, value):
            """``value(run)`` for each repeat of one scenario of one engine, in repeat order."""
            by_repeat = {r["repeat"]: value(r) for r in runs if (r["engine"], r["kind"], r["batch"],
                                                                   r["prompt_tokens"]) == (engine, kind, batch, prompt)}
            return [by_repeat[i] for i in repeats]

        def ttft(engine, prompt):
            return per_repeat(engine, "ttft", 1, prompt, lambda r: r["ttft_s"])

        def tok_s(engine, batch):
            return per_repeat(engine, "decode", batch, short,
                              lambda r: r["batch"] * r["decode_steps"] / r["decode_s"])

        def step_s(engine, prompt):
            kind = "decode" if prompt == short else "ttft"
            return per_repeat(engine, kind, 1, prompt, lambda r: r["decode_s"] / r["decode_steps"])

        weight_bytes, kv_row = size["artifact_bytes"], size["kv_bytes_per_row_per_step"]
        limits = {b: b * bandwidth / (weight_bytes + b * kv_row) for b in plan["decode_batches"]}
        size["limit"] = {"bandwidth_bytes_per_s": bandwidth, "weight_bytes": weight_bytes,
                         "kv_bytes_per_row_per_step": kv_row,
                         "bytes_per_token": {str(b): (weight_bytes + b * kv_row) / b for b in limits},
                         "tokens_per_s": {str(b): v for b, v in limits.items()}}
        size["figures"] = {e: {
            "ttft_s": {str(p): _stats(ttft(e, p)) for p in plan["ttft_prompts"]},
            "decode_tokens_per_s": {str(b): _stats(tok_s(e, b)) for b in plan["decode_batches"]},
            "step_s": {str(p): _stats(step_s(e, p)) for p in (short, long)},
        } for e in engines}

        ratios = {}
        for e in engines:
            if e == BASELINE:
                continue
            ratios[e] = {"decode_vs_limit": {str(b): _stats([t / limits[b] for t in tok_s(e, b)])
                                             for b in plan["decode_batches"]}}
            if BASELINE in engines:
                ratios[e]["decode_vs_transformers"] = {
                    str(b): _stats([a / t for a, t in zip(tok_s(e, b), tok_s(BASELINE, b))])
                    for b in plan["decode_batches"]}
                ratios[e]["ttft_vs_transformers"] = {
                    str(p): _stats([a / t for a, t in zip(ttft(e, p), ttft(BASELINE, p))])
                    for p in plan["ttft_prompts"]}
        for e in engines:
            ratios.setdefault(e, {})["step_long_over_short"] = _stats(
                [a / b for a, b in zip(step_s(e, long), step_s(e, short))])
        size["ratios"] = ratios
        size["targets"] = _targets(ratios.get("ours", {}), plan, short, long)


def _targets(ours: dict, plan: dict, short: int, long: int) -> list[dict]:
    """The issue's targets (stated for the 100M model, batch 1, fp32), judged on the median ratio."""
    rows = []

    def add(name, stats, bound, higher_is_better):
        if stats is None:
            return
        met = stats["median"] >= bound if higher_is_better else stats["median"] <= bound
        rows.append({"target": name, "bound": f"{'>=' if higher_is_better else '<='} {bound:g}",
                     "min": stats["min"], "median": stats["median"], "met": met})

    vs_hf = ours.get("decode_vs_transformers", {})
    add("decode tok/s, batch 1, vs transformers", vs_hf.get("1"), 3.0, True)
    # Issue 7 asked for 0.8 of the bandwidth limit at batch 1; issue 14 raised it to 0.85.
    add("decode tok/s, batch 1, vs bandwidth limit", ours.get("decode_vs_limit", {}).get("1"), 0.85, True)
    add(f"step at {long} / step at {short}", ours.get("step_long_over_short"), 1.3, False)
    for p in plan["ttft_prompts"]:
        if p >= 512:
            add(f"TTFT at {p} vs transformers", ours.get("ttft_vs_transformers", {}).get(str(p)), 1.0, False)
    batch = max(plan["decode_batches"])
    if batch > 1:
        add(f"decode tok/s, batch {batch}, vs transformers", vs_hf.get(str(batch)), 1.5, True)
    return rows


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    sizes = results["sizes"]
    plan = results["plan"]
    fig, axes = plt.subplots(len(sizes) + 1, 3, figsize=(15, 4 * (len(sizes) + 1)), squeeze=False)
    for row, (name, size) in zip(axes, sizes.items()):
        figures = size["figures"]
        for engine, f in figures.items():
            prompts = [int(p) for p in f["ttft_s"]]
            row[0].plot(prompts, [f["ttft_s"][str(p)]["median"] for p in prompts], "o-", label=engine)
            batches = [int(b) for b in f["decode_tokens_per_s"]]
            row[1].plot(batches, [f["decode_tokens_per_s"][str(b)]["median"] for b in batches], "o-", label=engine)
        limit = size["limit"]["tokens_per_s"]
        row[1].plot([int(b) for b in limit], list(limit.values()), "k--", label="bandwidth limit (ours)")
        row[0].set(title=f"{name}: time to first token (median)", xlabel="prompt tokens", ylabel="s",
                   xscale="log", yscale="log")
        row[1].set(title=f"{name}: decode throughput (median)", xlabel="batch", ylabel="tokens/s", xscale="log",
                   yscale="log")
        # Ticks at the measured points: a log axis would otherwise label 2 x 10^0 and leave 32 or 16 unlabelled.
        row[0].set_xticks(plan["ttft_prompts"], [str(p) for p in plan["ttft_prompts"]])
        row[1].set_xticks(plan["decode_batches"], [str(b) for b in plan["decode_batches"]])
        positions = list(next(iter(figures.values()))["step_s"])
        width = 0.8 / len(positions)
        for i, position in enumerate(positions):
            row[2].bar([j + i * width for j in range(len(figures))],
                       [f["step_s"][position]["median"] * 1e3 for f in figures.values()], width,
                       label=f"position {position}")
        row[2].set_xticks([j + width * (len(positions) - 1) / 2 for j in range(len(figures))], list(figures))
        row[2].set(title=f"{name}: decode step, batch 1 (median)", ylabel="ms")
        for ax in row:
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)

    last = axes[-1]
    weights = [s["export"]["weight_bytes"] / 1e6 for s in sizes.values()]
    last[0].plot(weights, [s["export"]["seconds"] for s in sizes.values()], "o-")
    last[0].set(title="export wall time (subprocess)", xlabel="checkpoint weights, MB", ylabel="s", xscale="log")
    last[1].plot(weights, [s["export"]["peak_rss_bytes"] / 1e6 for s in sizes.values()], "o-", label="peak RSS")
    last[1].plot(weights, weights, "k:", label="1x weights")
    last[1].set(title="export peak RSS", xlabel="checkpoint weights, MB", ylabel="MB", xscale="log", yscale="log")
    last[1].legend(fontsize=8)
    biggest_name, biggest = list(sizes.items())[-1]
    ops = list(biggest["profile"]["op_ms_per_step"].items())[:10]
    last[2].barh([op for op, _ in ops][::-1], [ms for _, ms in ops][::-1])
    last[2].set(title=f"{biggest_name}: ORT decode step by op ({biggest['profile']['run_ms_per_step']:.1f} ms)",
                xlabel="ms per step (batch 1, position {})".format(plan["decode_prompt"]))
    for ax in last:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{results['machine']['cpu']}, {results['machine']['cores']} cores, read bandwidth "
                 f"{results['machine']['read_bandwidth_bytes_per_s']['best'] / 1e9:.1f} GB/s; "
                 f"{results['repeats']} repeats")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(results: dict) -> str:
    m = results["machine"]
    plan = results["plan"]
    short, long = plan["decode_prompt"], max(plan["ttft_prompts"])
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_bytes'] / 2**30:.0f} GiB; memory read bandwidth "
             f"{m['read_bandwidth_bytes_per_s']['best'] / 1e9:.1f} GB/s (numpy sum or BLAS matrix-vector over 1 GiB, "
             "whichever is faster, best of 5). "
             f"fp32, ONNX Runtime CPU, static KV cache of {results['max_context']} tokens. Medians of "
             f"{results['repeats']} repeats; ratios are per repeat, shown as min / median.", ""]
    for name, size in results["sizes"].items():
        export = size["export"]
        limit = size["limit"]
        lines += [f"### {name}: {export['weight_bytes'] / 1e6:.0f} MB of weights", "",
                  f"Export: {export['seconds']:.0f} s, peak RSS {export['peak_rss_bytes'] / 1e9:.2f} GB "
                  f"({export['peak_rss_bytes'] / export['weight_bytes']:.1f}x the weights). A decode step reads "
                  f"{limit['weight_bytes'] / 1e6:.0f} MB of weights plus "
                  f"{limit['kv_bytes_per_row_per_step'] / 1e6:.1f} MB of KV cache per row (the filled slots at the "
                  "decode scenario's mean position).", ""]
        header = (["engine"] + [f"TTFT {p} (ms)" for p in plan["ttft_prompts"]]
                  + [f"tok/s b{b}" for b in plan["decode_batches"]] + [f"step @{short} (ms)", f"step @{long} (ms)"])
        lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for engine, f in size["figures"].items():
            cells = ([f"{f['ttft_s'][str(p)]['median'] * 1e3:.1f}" for p in plan["ttft_prompts"]]
                     + [f"{f['decode_tokens_per_s'][str(b)]['median']:.1f}" for b in plan["decode_batches"]]
                     + [f"{f['step_s'][str(p)]['median'] * 1e3:.2f}" for p in (short, long)])
            lines.append(f"| {engine} | " + " | ".join(cells) + " |")
        lines.append("| bandwidth limit (ours) | " + " | ".join([""] * len(plan["ttft_prompts"]) + [
            f"{limit['tokens_per_s'][str(b)]:.1f}" for b in plan["decode_batches"]] + ["", ""]) + " |")
        lines += ["", "| target (issue: 100m) | bound | min | median | met |", "| --- | --- | --- | --- | --- |"]
        for t in size["targets"]:
            lines.append(f"| {t['target']} | {t['bound']} | {t['min']:.2f} | {t['median']:.2f} | "
                         f"{'yes' if t['met'] else 'no'} |")
        profile = size["profile"]
        top = ", ".join(f"{op} {ms:.2f}" for op, ms in list(profile["op_ms_per_step"].items())[:6])
        lines += ["", f"ORT decode step (batch 1, position {profile['prompt_tokens']}): "
                      f"{profile['run_ms_per_step']:.2f} ms per run, {profile['kernel_ms_per_step']:.2f} ms in "
                      f"kernels; by op (ms): {top}.", ""]
        if "quantized" in size:
            lines += quantized_markdown(name, size["quantized"])
    trained = results.get("trained")
    if trained is not None:
        lines += ["### the trained model: quality of quantized artifacts", ""]
        if "skipped" in trained:
            lines.append(f"Not measured: {trained['skipped']}.")
        else:
            lines += [f"{trained['checkpoint']}; artifact MB: " + ", ".join(
                f"{v} {info['artifact_bytes'] / 1e6:.2f}" for v, info in trained["variants"].items()) + ".", ""]
            lines += quality_markdown(trained["quality"])
        lines.append("")
    if "long_context" in results:
        # Imported here: bench.long_context imports bench.quantized, which imports this module.
        from .long_context import markdown as long_context_markdown

        lines += long_context_markdown(results["long_context"])
    return "\n".join(lines)


def quantized_markdown(name: str, q: dict) -> list[str]:
    """The quantized section of one size: figures per runtime, ratios, targets, quality."""
    plan = q["plan"]
    batches = [int(b) for b in next(iter(q["figures"].values()))["decode_tokens_per_s"]]
    peer = q["llama_cpp"]
    lines = [f"#### {name}: quantized artifacts and llama.cpp", "",
             "Each runtime in a process of its own, one after another within a repeat; ours on every core, "
             + (f"llama.cpp on {peer['threads']} threads with {peer['n_ctx_per_row']} context tokens per row. "
                if "skipped" not in peer else f"llama.cpp skipped: {peer['skipped']}. ")
             + f"Decode from a {plan['decode_prompt']}-token prompt, {plan['decode_new_tokens']} new tokens; resident "
             "memory (VmRSS, with the process's peak VmHWM) after the batch-1 runs. Medians; ratios per repeat, "
             "min / median.", ""]
    header = (["runtime", "file MB", "RSS after batch 1, MB (peak)", f"TTFT {plan['ttft_prompt']} (s)"]
              + [f"tok/s b{b}" for b in batches])
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for runtime, f in q["figures"].items():
        lines.append(f"| {runtime} | {f['file_bytes'] / 1e6:.1f} | {f['rss_bytes_after_batch_1'] / 1e6:.0f} "
                     f"({f['hwm_bytes_after_batch_1'] / 1e6:.0f}) | "
                     f"{f['ttft_' + str(plan['ttft_prompt']) + '_s']['median']:.3f} | "
                     + " | ".join(f"{f['decode_tokens_per_s'][str(b)]['median']:.1f}" for b in batches) + " |")
    unmeasured = [v for v, info in q["variants"].items() if f"ours {v}" not in q["figures"]]
    for v in unmeasured:
        lines.append(f"| ours {v} | {q['variants'][v]['artifact_bytes'] / 1e6:.1f} | not timed (bytes and quality "
                     "only) | | " + " | ".join("" for _ in batches) + " |")
    header = ["ratio"] + [f"decode b{b}" for b in batches] + [f"TTFT {plan['ttft_prompt']}"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for ratio, r in q["ratios"].items():
        lines.append(f"| {ratio} | " + " | ".join(f"{s['min']:.2f} / {s['median']:.2f}" for s in r.values()) + " |")
    if q["targets"]:
        lines += ["", "| target (issue: 100m, batch 1) | bound | min | median | met |",
                  "| --- | --- | --- | --- | --- |"]
        for t in q["targets"]:
            lines.append(f"| {t['target']} | {t['bound']} | {t['min']:.2f} | {t['median']:.2f} | "
                         f"{'yes' if t['met'] else 'no'} |")
    for variant, profile in q["profiles"].items():
        top = ", ".join(f"{op} {ms:.2f}" for op, ms in list(profile["op_ms_per_step"].items())[:6])
        lines += ["", f"ORT decode step of {variant} (batch 1, position {profile['prompt_tokens']}): "
                      f"{profile['run_ms_per_step']:.2f} ms per run, {profile['kernel_ms_per_step']:.2f} ms in "
                      f"kernels; by op (ms): {top}."]
    lines += [""] + quality_markdown(q["quality"]) + [""]
    return lines


def quality_markdown(quality: dict) -> list[str]:
    if "skipped" in quality:
        return [f"Quality: not measured: {quality['skipped']}"]
    first = next(iter(quality["reports"].values()))
    lines = [f"Quality against the unquantized fp32 reference (export/quality.py), teacher-forced through "
             f"{first['windows']} windows of {first['window_tokens']} tokens of {quality['text']}; "
             f"reference perplexity {first['reference_perplexity']:.2f}:", "",
             "| artifact | top-1 agreement | mean KL (nats) | perplexity | vs reference | gate (top-1, KL, ratio) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, report in quality["reports"].items():
        rows = {r["output"]: r for r in report["rows"]}
        gate = "none" if report["bits"] is None else ("pass" if report["passed"] else "FAIL") + " (" + ", ".join(
            f"{r['tolerance']}" for r in report["rows"]) + ")"
        lines.append(f"| {name} | {rows['top1_agreement']['value']:.4f} | {rows['mean_kl']['value']:.2e} | "
                     f"{report['perplexity']:.3f} | {(rows['perplexity_ratio']['value'] - 1) * 100:+.3f}% | {gate} |")
    return lines
