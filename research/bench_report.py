"""The benchmark's report: its figures per candidate and phase, the markdown written to results/bench/, the console table.

Every ratio is between two timings of the same phase (the same allocator and OpenMP settings,
rounds interleaved): ours against each named reference, a setting on against off. Step times of
different phases stand side by side, never divided.
"""

from __future__ import annotations

import datetime
import statistics

import torch
from rich.console import Console
from rich.table import Table

from research.bench_timing import BenchResult, Candidate, Phase, Timing
from research.hardware import cpu_features, cpu_name, resolve_precision, threading_summary


PROFILE_ROWS = 12  # operators listed per profiled step in the report
KNOBS = ("torch.compile", "AdamW")  # per-script settings; the phase holds the process-wide ones


def timing_of(result: BenchResult, name: str, phase: str) -> Timing | None:
    candidate = result.candidate(name)
    return candidate.timings.get(phase) if candidate else None


def references_in(result: BenchResult, phase: str) -> dict[str, Timing]:
    """The references timed in `phase`: {label: timing}."""
    out = {}
    for label, (name, ref_phase) in result.references.items():
        timing = timing_of(result, name, phase)
        if ref_phase == phase and timing is not None:
            out[label] = timing
    return out


def figures(result: BenchResult, candidate: Candidate, phase: str) -> dict:
    """One candidate's figures in one phase; `vs`: its useful tokens/s over each reference's in the same phase."""
    t = candidate.timings[phase]
    ceiling = result.matmul_flops[result.shape["precision"]][0]
    return {
        "candidate": candidate.name,
        "knobs": candidate.knobs,
        "step_s": t.median(),
        "step_range": t.range(),
        "tokens_per_sec": t.tokens_per_sec(),
        "useful_tokens_per_sec": t.useful_tokens_per_sec(),
        "vs": {label: t.useful_tokens_per_sec() / ref.useful_tokens_per_sec() for label, ref in references_in(result, phase).items()},
        "mfu_measured": t.tokens_per_sec() * result.flops_per_token / ceiling,
        "mfu_table": t.tokens_per_sec() * result.flops_per_token / result.table_peak_flops,
        "peak_mib": candidate.peak_mib(),
        "data_wait_share": sum(t.data_wait) / sum(t.seconds),
        "useful_share": sum(t.useful) / sum(t.tokens),
        "page_faults": statistics.median(t.page_faults),
    }


def rows(result: BenchResult, phase: str | None = None) -> list[dict]:
    """The figures of every candidate timed in `phase` (default: the phase train() runs under)."""
    phase = phase or result.main_phase.name
    return [figures(result, c, phase) for c in result.candidates if phase in c.timings]


def phase_named(result: BenchResult, name: str) -> Phase:
    return next(p for p in result.phases + result.load_phases if p.name == name)


def headline(result: BenchResult) -> list[dict]:
    """Ours (as train() builds it) against each reference, in the reference's phase: the ratio and the settings that differ."""
    ours = result.candidates[0]
    out = []
    for label, (name, phase) in result.references.items():
        ref, mine = timing_of(result, name, phase), ours.timings.get(phase)
        if ref is None or mine is None:
            continue
        knobs = result.candidate(name).knobs
        differ = [f"{knob}: {ours.knobs[knob]} vs {knobs[knob]}" for knob in KNOBS if not alike(knob, ours.knobs[knob], knobs[knob])]
        out.append({"reference": label, "phase": phase, "ours_s": mine.median(), "reference_s": ref.median(),
                    "ratio": mine.useful_tokens_per_sec() / ref.useful_tokens_per_sec(), "differ": differ})
    return out


def alike(knob: str, ours: str, theirs: str) -> bool:
    """Do two candidates set `knob` alike? (compiling each block and compiling the whole model both count as compiled)."""
    if knob == "torch.compile":
        return (ours == "no") == (theirs == "no")
    return ours == theirs


def headline_table(result: BenchResult) -> list[str]:
    """The report's first table: ours against each reference, and which settings make the margin."""
    lines = ["**Ours against each reference** (useful tokens/s of ours ÷ the reference's, both timed in the same phase):", "",
             "| reference | phase | ours: step s | reference: step s | ours ÷ reference | settings that differ (ours vs reference) |",
             "|---|---|---|---|---|---|"]
    for h in headline(result):
        differ = "; ".join(h["differ"]) or "none: the margin is the model code"
        lines.append(f"| {h['reference']} | {h['phase']} | {h['ours_s']:.3f} | {h['reference_s']:.3f} | {h['ratio']:.2f}× | {differ} |")
    lines += ["", "**The settings of each** (a user can set every one of them for Llama too; in the same phase, allocator and OpenMP are alike):", "",
              "| | torch.compile | AdamW | allocator | OpenMP waiting |", "|---|---|---|---|---|"]
    ours = result.candidates[0]
    settings = [(f"{ours.name} (as train() runs it)", ours.knobs, result.main_phase)]
    settings += [(label, result.candidate(name).knobs, phase_named(result, phase)) for label, (name, phase) in result.references.items()]
    for label, knobs, phase in settings:
        lines.append(f"| {label} | {knobs['torch.compile']} | {knobs['AdamW']} | {phase.allocator} | {phase.openmp} |")
    return lines + [""] + setting_lines(result)


def setting_lines(result: BenchResult) -> list[str]:
    """What the settings are worth: ratios within the phase train() runs under, and the same code's step times in each phase."""
    main, ours = result.main_phase.name, result.candidates[0]
    lines = []
    toggled = next((c for c in result.candidates[1:] if c.name.startswith("ours") and "packing" not in c.name), None)
    if toggled and main in toggled.timings:
        compiled, eager = (ours, toggled) if ours.knobs["torch.compile"] != "no" else (toggled, ours)
        ratio = compiled.timings[main].useful_tokens_per_sec() / eager.timings[main].useful_tokens_per_sec()
        lines.append(f"- torch.compile on our step: {ratio:.2f}× ({main}).")
    names = {label: name for label, (name, _) in result.references.items()}
    plain, tuned = (timing_of(result, names.get(label, ""), main) for label in ("plain Llama", "tuned Llama"))
    if plain and tuned:
        lines.append(f"- torch.compile and fused AdamW on Llama: {tuned.useful_tokens_per_sec() / plain.useful_tokens_per_sec():.2f}× "
                     f"(tuned Llama against the plain script's code, both in {main}).")
    if len(result.phases) > 1:
        for c in (ours, result.candidate(names.get("plain Llama", ""))):
            if c and all(p.name in c.timings for p in result.phases):
                times = ", ".join(f"{c.timings[p.name].median():.3f} s under {p.name}" for p in result.phases)
                lines.append(f"- {c.name}, a step: {times} (allocator and OpenMP settings; separate phases, so no ratio).")
    return (["What each setting is worth:", ""] + lines + [""]) if lines else []


def phase_table(result: BenchResult, phase: Phase) -> list[str]:
    """The report's table of every candidate timed under one phase's settings."""
    refs = list(references_in(result, phase.name))
    memory_note = " (peak memory: measured in the benchmark's process, under our settings)" if phase != result.main_phase else ""
    lines = [
        f"**{phase.name}**: allocator {phase.allocator}; OpenMP waiting {phase.openmp}{load_note(result, phase.name)}{memory_note}:",
        "",
        "| candidate | torch.compile | AdamW | step s: median (min–max) | tokens/s | useful tokens/s | "
        + "".join(f"× {label} | " for label in refs) + "MFU (measured ceiling) | MFU (train/mfu peak) | peak memory MiB | data wait | page faults |",
        "|---|---|---|---|---|---|" + "---|" * len(refs) + "---|---|---|---|---|",
    ]
    for r in rows(result, phase.name):
        lo, hi = r["step_range"]
        ratios = "".join(f"{r['vs'][label]:.2f} | " for label in refs)
        lines.append(
            f"| {r['candidate']} | {r['knobs']['torch.compile']} | {r['knobs']['AdamW']} | {r['step_s']:.3f} ({lo:.3f}–{hi:.3f}) | {r['tokens_per_sec']:,.0f} "
            f"| {r['useful_tokens_per_sec']:,.0f} ({r['useful_share']:.0%}) | {ratios}{r['mfu_measured']:.1%} | {r['mfu_table']:.1%} "
            f"| {r['peak_mib']:,.0f} | {r['data_wait_share']:.2%} | {r['page_faults']:,.0f} |"
        )
    return lines + [""]


def load_note(result: BenchResult, phase: str) -> str:
    """'; load average 3.1 → 2.9': the machine's 1-minute load average at the start and end of the phase, where noted."""
    if phase not in result.load_average:
        return ""
    start, end = result.load_average[phase]
    return f"; load average {start:.1f} → {end:.1f}"


def shared_cores_line(result: BenchResult) -> list[str]:
    """A warning when other work shared the cores: the benchmark alone keeps about one thread per core busy."""
    highest = max((load for pair in result.load_average.values() for load in pair), default=0.0)
    if not result.cores or highest <= result.cores + 1:
        return []
    return [f"Other work shared the machine: the 1-minute load average reached {highest:.1f} on {result.cores} cores (this benchmark "
            f"alone makes about {result.cores}). Step times are longer than on idle cores and vary more; a ratio within a phase shares "
            "the drift of its interleaved rounds, step times of different phases do not.", ""]


def load_rows(result: BenchResult) -> list[dict]:
    """Per candidate timed under load: its median alone and, per load, median, min, max, slowdown and its ratio to tuned Llama's."""
    out = []
    tuned = result.references.get("tuned Llama", ("", ""))[0]
    for c in result.candidates:
        if not result.load_phases or not all(p.name in c.timings for p in result.load_phases):
            continue
        alone = c.timings[result.main_phase.name]
        loads = {}
        for p in result.load_phases:
            t, ref = c.timings[p.name], timing_of(result, tuned, p.name)
            loads[p.name] = {"step_s": t.median(), "step_range": t.range(), "slowdown": t.median() / alone.median(),
                             "vs_tuned_llama": t.useful_tokens_per_sec() / ref.useful_tokens_per_sec() if ref else float("nan")}
        out.append({"candidate": c.name, "alone_s": alone.median(), "alone_range": alone.range(), "loads": loads})
    return out


def load_table(result: BenchResult) -> list[str]:
    """The report's table of step times beside each background load, with the slowdowns."""
    if not result.load_phases:
        return []
    header = " | ".join(f"{p.name}: step s, median (min–max) | slowdown | × tuned Llama" for p in result.load_phases)
    lines = [
        f"**Beside background load** (started before and stopped after each column's rounds; {result.main_phase.name}). "
        "Slowdown: the median step under load over the median alone; lower is more graceful. × tuned Llama: within the same load:",
        "",
        f"| candidate | alone: step s, median (min–max) | {header} |",
        "|---|---|" + "---|---|---|" * len(result.load_phases),
    ]
    for r in load_rows(result):
        lo, hi = r["alone_range"]
        cells = " | ".join(f"{v['step_s']:.3f} ({v['step_range'][0]:.3f}–{v['step_range'][1]:.3f}) | {v['slowdown']:.2f}× | {v['vs_tuned_llama']:.2f}"
                           for v in r["loads"].values())
        lines.append(f"| {r['candidate']} | {r['alone_s']:.3f} ({lo:.3f}–{hi:.3f}) | {cells} |")
    return lines + [""]


def precision_line(results: list[BenchResult]) -> list[str]:
    """Where the report covers several precisions: does `train.precision=auto` pick the faster one for our step?"""
    step = {r.shape["precision"]: r.candidates[0].timings[r.main_phase.name].median() for r in results}
    if len(step) < 2:
        return []
    auto = resolve_precision("auto", torch.device(results[0].device_type))
    times = ", ".join(f"{seconds:.3f} s in {p}" for p, seconds in sorted(step.items(), key=lambda kv: kv[1]))
    verdict = "the faster" if step.get(auto) == min(step.values()) else "NOT the faster"
    return [f"`train.precision=auto` picks {auto} here, {verdict} one for our step: {times}.", ""]


def profile_table(candidate: Candidate) -> list[str]:
    """The report's torch.profiler breakdown of one step of `candidate`, where it was profiled."""
    if not candidate.profile:
        return []
    total = sum(seconds for _, seconds, _ in candidate.profile)
    lines = ["", f"Profile of one step of **{candidate.name}** (torch.profiler, self time; {total:.2f} s in all, profiler overhead included):", "",
             "| operator | self s | share | calls |", "|---|---|---|---|"]
    lines += [f"| {name[:70]} | {seconds:.3f} | {seconds / total:.1%} | {calls} |" for name, seconds, calls in candidate.profile[:PROFILE_ROWS]]
    rest = sum(seconds for _, seconds, _ in candidate.profile[PROFILE_ROWS:])
    return lines + [f"| everything else | {rest:.3f} | {rest / total:.1%} | |"]


def cpu_line() -> str:
    """Which instruction sets decide the precision on this CPU, what `auto` picks, and how the threads are set up."""
    features = ", ".join(name + (" yes" if present else " no") for name, present in cpu_features().items())
    return f"CPU: {cpu_name()}; {features}; `train.precision=auto` picks {resolve_precision('auto', torch.device('cpu'))} on it. {threading_summary()}"


METHOD = (
    "Every candidate trains the same shape on the same data, precision, AdamW hyperparameters and parameter groups, stepped by the "
    "trainer's own step driver. A phase is one setting of the process-wide knobs (allocator, OpenMP waiting); within a phase the "
    "candidates step round-robin, one step each per round, and each figure is the median of the measured rounds (warm-up rounds dropped). "
    "Every ratio is taken within one phase. The references: **plain Llama**, transformers' LlamaForCausalLM as the script a user writes "
    "(eager, torch's AdamW as it comes, glibc's and libgomp's defaults: on a CPU it is timed in a fresh process of its own); "
    "**tuned Llama**, the same with every knob a user can turn set as ours are (torch.compile, fused AdamW, our allocator and OpenMP settings). "
    "MFU counts 6N + 12·L·H·Q·T FLOPs per token (N: matmul weights, L layers, H heads, Q head dim, T sequence) over all tokens processed. "
    "Useful tokens carry loss (Llama shifts its labels inside, so each of its rows has one fewer)."
)


def markdown(results: list[BenchResult], command: str, notes: str = "") -> str:
    first = results[0]
    lines = [f"# Training throughput on {first.device}", "", f"Measured {datetime.date.today().isoformat()} with torch {torch.__version__} by `{command}`.",
             cpu_line() if first.device_type == "cpu" else f"Host CPU: {cpu_name()}.", "", METHOD, ""]
    for result in results:
        s = result.shape
        ceilings = ", ".join(f"{p} {flops / 1e12:.3f} TFLOP/s (size {size})" for p, (flops, size) in result.matmul_flops.items())
        lines += [
            f"## {result.label}", "",
            f"Shape: {s['parameters'] / 1e6:.1f}M parameters (vocab {s['vocab']}, hidden {s['hidden']}, {s['layers']} layers, "
            f"{s['heads']} heads / {s['kv heads']} kv, intermediate {s['intermediate']}), seq {s['seq']}, batch {s['batch']} x {s['grad accum']} accumulation, "
            f"{s['precision']}; {result.flops_per_token / 1e6:.1f} MFLOP per token; {result.rounds} measured rounds.",
            f"Matmul ceiling (median, best size): {ceilings}. Peak used by training runs for train/mfu: {result.table_peak_flops / 1e12:.3f} TFLOP/s.", "",
        ]
        lines += shared_cores_line(result)
        lines += headline_table(result)
        for phase in result.phases:
            lines += phase_table(result, phase)
        lines += load_table(result)
        for c in result.candidates:
            lines += profile_table(c)
        if result.tracking_share == result.tracking_share:  # timed with the report's first variant
            lines += ["", f"Tracking: one log interval's MLflow logging (hook, forced round trip to the store) and progress update took "
                      f"{result.tracking_ms_per_flush:.1f} ms: {result.tracking_share:.3%} of the time of the train.log_every steps it covers.", ""]
    lines += precision_line(results)
    if notes:
        lines += [notes.strip(), ""]
    return "\n".join(lines)


def print_table(result: BenchResult, console: Console) -> None:
    """The phase train() runs under, on the console, and ours against each reference."""
    refs = list(references_in(result, result.main_phase.name))
    table = Table(title=f"{result.device}: {result.label}, {result.main_phase.name}")
    for column in ["candidate", "step s", "useful tok/s"] + [f"× {label}" for label in refs] + ["MFU", "peak MiB", "data wait"]:
        table.add_column(column, justify="left" if column == "candidate" else "right")
    for r in rows(result):
        table.add_row(r["candidate"], f"{r['step_s']:.3f}", f"{r['useful_tokens_per_sec']:,.0f}", *(f"{r['vs'][label]:.2f}" for label in refs),
                      f"{r['mfu_measured']:.1%}", f"{r['peak_mib']:,.0f}", f"{r['data_wait_share']:.2%}")
    console.print(table)
    for h in headline(result):
        console.print(f"ours ÷ {h['reference']} ({h['phase']}): {h['ratio']:.2f}×; differs in: {'; '.join(h['differ']) or 'nothing but the model code'}")
    ceilings = ", ".join(f"{p} {flops / 1e12:.3f} TFLOP/s" for p, (flops, _) in result.matmul_flops.items())
    tracking = f"; tracking + progress: {result.tracking_share:.3%} of step time" if result.tracking_share == result.tracking_share else ""
    console.print(f"matmul ceiling: {ceilings}{tracking}")
