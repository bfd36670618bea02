"""From collected runs to the report's sections: tables, figures with captions, chat answers.

Which sections exist follows from the inputs: a figure is drawn only when something feeds it
(no empty plots). The float model (``baseline``, optional) adds the weight and activation
histograms of the worst layers; without it the worst layers show how their codes are used.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field

import torch

from lowbit import defaults
from lowbit.report import clipping, plots
from lowbit.report.collect import ChatSet, Collection, Run
from lowbit.report.peers import Peers
from lowbit.report.tables import Table, bench_table, peers_table, runs_table, validation_table, verdict_text

log = logging.getLogger(__name__)

WORST_LAYERS = 3
"""Layers shown in the histogram sections (those with the largest error)."""
ACTIVATION_TOKENS = 256
"""Evaluation tokens the float model reads to capture the worst layers' input activations."""


@dataclass
class Plot:
    id: str
    title: str
    caption: str
    png: bytes


@dataclass
class Section:
    id: str
    title: str
    text: list[str] = field(default_factory=list)
    """Paragraphs (plain text)."""
    tables: list[tuple[str, Table]] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    appendix: list[tuple[str, Table]] = field(default_factory=list)
    """Tables of detail, after the figures (folded away on the page)."""
    chat: ChatSet | None = None


@dataclass
class Report:
    title: str
    sections: list[Section]
    sources: list[str]


def build_report(collection: Collection, *, peers: Peers | None = None, baseline=None,
                 worst: int = WORST_LAYERS, source: str = defaults.EVAL_SOURCE,
                 activation_tokens: int = ACTIVATION_TOKENS, title: str | None = None) -> Report:
    """The sections of the report on ``collection``.

    baseline: ``(model, tokenizer)`` of the float model, for the float weights and input
    activations of the ``worst`` layers (activations on the first ``activation_tokens`` tokens of
    ``source``'s evaluation text)."""
    sections = [_runs_section(collection)]
    sections += [_validation_section(r) for r in collection.ordered() if r.verdict and r.verdict.tasks]
    for build in (lambda: _size_kl_section(collection, peers), lambda: _heatmap_section(collection),
                  lambda: _worst_layer_section(collection, baseline, worst, source, activation_tokens)):
        section = build()
        if section is not None:
            sections.append(section)
    for i, chat in enumerate(collection.chats):
        sections.append(Section(f"chat-{i + 1}", f"Chat answers: {chat.title}", chat=chat, text=[
            "Greedy answers to the same prompts through the chat template, side by side, with the "
            "agreement measures the chat check reported."]))
    names = [r.label for r in collection.quantized()]
    return Report(title or "lowbit report: " + (", ".join(names[:4]) + (" ..." if len(names) > 4 else "")),
                  sections, list(collection.sources))


def _runs_section(collection: Collection) -> Section:
    text = ["One row per model. size MB counts every stored tensor; bits/weight counts the quantized linear "
            "layers (scales and zero points included)."]
    settings = collection.eval_settings
    if settings:
        text.append(
            "Perplexity, KL divergence and top-1 agreement are against the float model on the same "
            f"{settings.get('tokens_scored', '?')} tokens of {settings.get('source', '?')} "
            f"(windows of {settings.get('window', '?')}).")
    if any(r.tasks for r in collection.runs):
        text.append("Task accuracies are in per cent with their standard error; models scored on the same items "
                    "(validate, or one `lowbit eval --tasks` run) are comparable item by item.")
    section = Section("runs", "Runs", text, tables=[("", runs_table(collection))])
    speed = bench_table(collection)
    if speed is not None:
        text.append("Columns ending in x are ratios to the float model measured in the same bench run "
                    "(weights and RSS: memory; decode: tokens per second at that batch size); the speed table "
                    "has them all (TTFT: time to first token).")
        section.tables.append(("Speed and memory (ratio to the float model)", speed))
    return section


def _validation_section(run: Run) -> Section:
    return Section(f"validate-{run.label}", f"Budget gate: {run.label}", [
        f"Verdict: {verdict_text(run.verdict)}. Both models answered the same items; 'paired se' is the "
        "standard error of the accuracy change over those items, 'p' McNemar's exact test. A task fails "
        "when its loss exceeds the budget beyond noise."], tables=[("", validation_table(run))])


def _size_kl_section(collection: Collection, peers: Peers | None) -> Section | None:
    runs = [r for r in collection.quantized() if r.fidelity and r.fidelity.mean_kl and r.fidelity.mean_kl > 0]
    peer_points = list(peers.points) if peers else []
    if not runs:
        return None
    by_bits = all(r.bits_per_weight for r in runs) and all(p.bits is not None for p in peer_points)
    by_size = not by_bits and all(r.size_mb for r in runs) and all(p.size_mb is not None for p in peer_points)
    axis = "size_mb" if by_size else "bits"
    pick = (lambda r: r.size_mb) if by_size else (lambda r: r.bits_per_weight)
    points = [(r.label, pick(r), r.fidelity.mean_kl) for r in runs if pick(r)]
    peer_xy = [(p.name, p.size_mb if by_size else p.bits, p.kl) for p in peer_points
               if p.kl > 0 and (p.size_mb if by_size else p.bits) is not None]
    if not points:
        return None
    xlabel = "size (MB, all stored tensors)" if axis == "size_mb" else "bits per weight (quantized linears)"
    fig = plots.size_vs_kl(points, peer_xy, xlabel)
    caption = (f"Mean KL divergence of each run's next-token distribution to the float model (log scale) "
               f"against {xlabel}; lower left is better.")
    if peer_xy:
        caption += f" Grey squares: {len(peer_xy)} peers" + (f" ({peers.note})" if peers.note else "") + "."
    dropped = len(peer_points) - len(peer_xy)
    if dropped:
        caption += f" {dropped} peers without a {'size' if by_size else 'bits'} value or with zero KL are not drawn."
    section = Section("size-kl", "Size against KL divergence",
                      plots=[Plot("size-kl", "Size against KL divergence", caption, plots.png(fig))])
    if peer_xy:
        section.plots[0].caption += " Labels that would overlap are left out; the table lists every peer."
        section.appendix.append((f"Peers ({len(peer_points)})", peers_table(peer_points)))
    return section


def _heatmap_section(collection: Collection) -> Section | None:
    panels = [(r.label, r.error_metric, r.layers) for r in collection.quantized()
              if r.error_metric and any(e.layer is not None and e.value for e in r.layers)]
    if not panels:
        return None
    metrics = sorted({m for _, m, _ in panels})
    described = {"output_error": "relative output error ||XW^T - XQ^T||^2 / ||XW^T||^2 on the calibration inputs",
                 "weight_mse": "mean squared weight error (a data-free run has no output error)"}
    caption = ("Per-layer error from each run's quantization report: rows are decoder layers, columns the "
               "linear layers of each decoder layer, colour (log scale, shared by runs with the same measure) "
               "the " + "; ".join(described.get(m, m.replace("_", " ")) for m in metrics)
               + ". Grey: no value.")
    return Section("layers", "Per-layer error", plots=[
        Plot("layer-heatmap", "Per-layer error", caption, plots.png(plots.layer_heatmaps(panels)))])


def worst_layers(runs: list[Run], k: int) -> list[str]:
    """The ``k`` layer names with the largest error relative to their run's median (so runs
    measured differently weigh alike), each counted once."""
    score: dict[str, float] = {}
    for run in runs:
        values = [e.value for e in run.layers if e.value is not None and e.value > 0]
        if not values:
            continue
        median = statistics.median(values)
        for e in run.layers:
            if e.value is not None and e.value > 0:
                score[e.name] = max(score.get(e.name, 0.0), e.value / median)
    return sorted(score, key=score.get, reverse=True)[:k]


def _worst_layer_section(collection: Collection, baseline, k: int, source: str, tokens: int) -> Section | None:
    runs = [r for r in collection.quantized() if r.folder is not None and r.layers]
    names = worst_layers(runs, k) if k > 0 else []
    if not names:
        return None
    log.info("worst layers: %s", ", ".join(names))
    stored = {r.label: clipping.read_quantized(r.folder, names) for r in runs}
    section = Section("worst-layers", "Worst layers: weights, activations and their ranges", [
        f"The {len(names)} layers with the largest error relative to their run's median: "
        + ", ".join(names) + "."])
    if baseline is None:
        layers = [(name, [(r.label, stored[r.label][name][0].format.name, clipping.code_usage(stored[r.label][name][0]))
                          for r in runs if name in stored[r.label]]) for name in names]
        section.text.append("Give --baseline (the float model) to see the float weights against each grid and "
                            "the input activations.")
        section.plots.append(Plot("codes", "Code usage", "How many weights of each worst layer use each stored "
                                  "code (lowest code left): the outer codes are the grid's ends.",
                                  plots.png(plots.code_histograms(layers))))
        return section
    model, tokenizer = baseline
    modules = dict(model.named_modules())
    weight_rows, reach_rows, unmatched = [], [], []
    for name in names:
        module = modules.get(name)
        row = []
        for r in runs:
            if name not in stored[r.label]:
                continue
            weight = getattr(module, "weight", None)
            clip = None if not isinstance(weight, torch.Tensor) else clipping.weight_clipping(
                name, weight, stored[r.label][name][0], rescale=bool(r.transforms))
            if clip is None:
                unmatched.append(f"{r.label} {name}")
            else:
                row.append((r.label, clip))
        if row:
            weight_rows.append((name, row))
            reach_rows.append((name, [(label, clip.reach) for label, clip in row]))
    if unmatched:
        section.text.append("--baseline has no float weight matching these quantized layers (a different or "
                            "quantized model, or a transform that is not a per-column scale), so they are not drawn: "
                            + ", ".join(unmatched) + ".")
    if weight_rows:
        section.plots.append(Plot(
            "weights", "Float weights against the grid",
            "Histogram (log count) of each worst layer's float weights, each normalised by its own "
            "representable interval: u = (w - lo) / (hi - lo), where lo and hi are the values of the format's "
            "lowest and highest code under that weight's scale and zero point. The red dashed lines at 0 and 1 "
            "are the grid's ends; weights beyond them (more than half a step) are clipped, and the title gives "
            "their share. 'rescaled': a transform stage (e.g. AWQ) scaled the weight's input columns before "
            "quantizing, undone here by a least-squares scale per column.",
            plots.png(plots.weight_histograms(weight_rows))))
        section.plots.append(Plot(
            "reach", "Clipping ranges per group",
            "For every group (the weights sharing one scale) of each worst layer: how far the grid reaches "
            "towards the group's extreme weights, min(hi / max w, lo / min w). 1 (red line): the range is the "
            "group's min-max; below 1 the group's extremes are clipped (a range chosen for lower error), above 1 "
            "the grid is wider than the group needs on its narrower side.",
            plots.png(plots.reach_histograms(reach_rows))))
    from lowbit.data.calibration import evaluation_tokens

    ids = evaluation_tokens(tokenizer, source=source, max_tokens=tokens)
    log.info("capturing the float model's inputs of %d layers on %d tokens of %s", len(names), ids.shape[-1], source)
    inputs = clipping.activation_inputs(model, ids, names)
    acts = [clipping.activation_clipping(name, inputs[name],
                                         [(r.label, stored[r.label][name][1]) for r in runs if name in stored[r.label]])
            for name in names if name in inputs]
    if acts:
        quantized = any(a.ranges for a in acts)
        section.plots.append(Plot(
            "activations", "Input activations",
            f"Histogram (log count) of each worst layer's input activations in the float model, on the first "
            f"{ids.shape[-1]} tokens of {source}'s evaluation text. "
            + ("Dashed lines: the range each run's activation scheme picks on these tokens (a static scheme's "
               "observer range; a dynamic per-token scheme's median token range)."
               if quantized else "Every run is weight-only: its activations stay in float, so no range is drawn; "
               "the spread shows what an activation scheme would have to cover."),
            plots.png(plots.activation_histograms(acts))))
    return section
