"""Pictures of the Transformer at work: attention maps (§3.2), positional encodings (§3.5) and one encoder
layer step by step (§3.1-§3.3).

Everything draws with matplotlib's Agg renderer on standalone ``Figure`` objects (no pyplot, no GUI, no
global backend switch). Pictures have fixed sizes so that they can be compared and tested:

* attention, one map (``*_attention.png``): 8 × 8 in;
* attention, all layers × heads (``*_attention_grid.png``): (heads + 1) × 2 in wide, (layers + 1) × 2 in
  + 0.5 in high; the extra column is the mean over heads, the extra row the mean over layers;
* positional encoding 10 × 6 in, position similarity 12 × 5 in, encoder-layer steps 16 × 8 in and
  14 × 4.5 in; all at ``dpi`` (default 100) pixels per inch.

Decoder maps label their rows with the target token each position *produces* (with teacher forcing,
position j reads ``<s> y1 … y(j-1)`` and predicts ``yj``) and their columns with what is read (decoder
inputs for the masked self-attention, source tokens for encoder-decoder attention). Positions the causal
mask hides (key after query) are drawn grey, so the masked self-attention shows as a lower triangle.
Subword tokens are shown decoded, with a leading space drawn as "▁".
"""

from __future__ import annotations

import html
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.colors import Colormap
from matplotlib.figure import Figure

from ..configuration import SINUSOID_LAYOUTS
from ..modeling import sinusoidal_positional_encoding
from .alignment import eager_attention

KINDS = ("encoder", "decoder", "cross")
TITLES = {
    "encoder": "Encoder self-attention",
    "decoder": "Decoder masked self-attention",
    "cross": "Encoder-decoder attention",
}
FILE_STEMS = {
    "encoder": "encoder_self_attention",
    "decoder": "decoder_masked_self_attention",
    "cross": "cross_attention",
}
FOCUS_INCHES = (8.0, 8.0)
GRID_CELL_INCHES = 2.0
GRID_TITLE_INCHES = 0.5
DEFAULT_MAX_TOKENS = 40
GRID_LABEL_LIMIT = 24  # grid panels label their axes only up to this many tokens


# ----------------------------------------------------------------------------------------------------------
# Loading and output paths
# ----------------------------------------------------------------------------------------------------------


def prepare_output_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and parents) for pictures, or raise an ``OSError`` saying why it cannot be written."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        reason = err.strerror or str(err)
        raise type(err)(
            f"cannot write pictures to {os.fspath(folder)!r}: {reason}; choose another output folder"
        ) from err
    if not os.access(folder, os.W_OK):
        raise PermissionError(
            f"cannot write pictures to {os.fspath(folder)!r}: permission denied; choose another output folder"
        )
    return folder


def _save(figure: Figure, path: Path, dpi: int) -> Path:
    try:
        figure.savefig(path, dpi=dpi)
    except OSError as err:
        raise type(err)(f"cannot write {os.fspath(path)!r}: {err.strerror or err}") from err
    return path


# ----------------------------------------------------------------------------------------------------------
# Capturing attention
# ----------------------------------------------------------------------------------------------------------


def display_tokens(tokenizer, ids: Sequence[int]) -> list[str]:
    """Token ids as readable labels: decoded text, a leading space as "▁", special tokens as themselves."""
    special = set(tokenizer.all_special_ids)
    labels = []
    for token_id, token in zip(ids, tokenizer.convert_ids_to_tokens(list(ids))):
        if token_id in special:
            labels.append(token)
            continue
        text = tokenizer.convert_tokens_to_string([token]).replace(" ", "▁")
        labels.append(text or token)
    return labels


@dataclass
class AttentionCapture:
    """The three kinds of attention of one sentence pair (§3.2.3), batch dimension removed.

    Arrays are ``[layers, heads, query, key]``: ``encoder`` [L, H, S, S]; ``decoder`` (masked self-attention)
    [L, H, T, T]; ``cross`` (encoder-decoder) [L, H, T, S]. Decoder row j produces ``target_tokens[j]``
    while reading ``decoder_input_tokens[: j + 1]``.
    """

    source: str
    target: str
    source_tokens: list[str]
    target_tokens: list[str]
    decoder_input_tokens: list[str]
    encoder: np.ndarray
    decoder: np.ndarray
    cross: np.ndarray
    translated: bool
    notes: list[str] = field(default_factory=list)

    def matrices(self, kind: str) -> tuple[np.ndarray, list[str], list[str]]:
        """``(attention [L, H, rows, cols], row tokens, column tokens)`` of one kind."""
        if kind == "encoder":
            return self.encoder, self.source_tokens, self.source_tokens
        if kind == "decoder":
            return self.decoder, self.target_tokens, self.decoder_input_tokens
        if kind == "cross":
            return self.cross, self.target_tokens, self.source_tokens
        raise ValueError(f"attention kind must be one of {KINDS}, got {kind!r}")

    def truncated(self, max_tokens: int) -> tuple[AttentionCapture, str | None]:
        """The first ``max_tokens`` source and target tokens (for drawing), and a note when any were cut."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        s, t = len(self.source_tokens), len(self.target_tokens)
        if s <= max_tokens and t <= max_tokens:
            return self, None
        note = (
            f"the source has {s} tokens and the target {t}; drawing only the first {max_tokens} of each "
            "(raise max_tokens / --max-tokens to draw more, at the cost of legibility)"
        )
        n_s, n_t = min(s, max_tokens), min(t, max_tokens)
        cut = replace(
            self,
            source_tokens=self.source_tokens[:n_s],
            target_tokens=self.target_tokens[:n_t],
            decoder_input_tokens=self.decoder_input_tokens[:n_t],
            encoder=self.encoder[..., :n_s, :n_s],
            decoder=self.decoder[..., :n_t, :n_t],
            cross=self.cross[..., :n_t, :n_s],
            notes=[*self.notes, note],
        )
        return cut, note


def capture_attention(
    model,
    tokenizer,
    source: str,
    target: str | None = None,
    *,
    max_new_tokens: int | None = None,
) -> AttentionCapture:
    """Run ``source`` through the model and record its attention probabilities (§3.2.3).

    Without ``target`` the model translates first (``generate`` with the model's generation config, the
    paper's beam search by default) and the translation is the target; with ``target`` that text is used
    (teacher forcing). A model running another attention implementation (``"sdpa"``, flash) returns no
    weights: it is switched to eager attention for the capture, with a note, and switched back after.
    """
    if not isinstance(source, str) or not source.strip():
        raise ValueError("the source sentence is empty; give the sentence to translate")
    if target is not None and (not isinstance(target, str) or not target.strip()):
        raise ValueError("the target sentence is empty; leave it out to let the model translate")
    model.eval()
    notes: list[str] = []
    with eager_attention(model) as switched, torch.no_grad():
        if switched:
            notes.append(switched)
        encoded = tokenizer(source, return_tensors="pt")
        source_ids = encoded["input_ids"]
        start = model.config.decoder_start_token_id
        start = tokenizer.bos_token_id if start is None else start
        if target is None:
            kwargs = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
            generated = model.generate(**encoded, **kwargs)[0].tolist()
            if generated and generated[0] == start:
                generated = generated[1:]
            labels = [i for i in generated if i != tokenizer.pad_token_id]
            if not labels:
                raise ValueError(f"the model produced an empty translation of {source!r}; pass --target")
            target_text = tokenizer.decode(labels, skip_special_tokens=True)
        else:
            labels = tokenizer(target)["input_ids"]
            target_text = target
        decoder_inputs = [start, *labels[:-1]]
        out = model(
            input_ids=source_ids,
            attention_mask=encoded["attention_mask"],
            decoder_input_ids=torch.tensor([decoder_inputs]),
            output_attentions=True,
            use_cache=False,
        )
    if not out.cross_attentions or not out.encoder_attentions:
        raise ValueError(
            "the model returned no attention weights; load it with attn_implementation='eager'"
        )

    def stack(per_layer) -> np.ndarray:
        return torch.stack([layer[0] for layer in per_layer]).float().numpy()

    return AttentionCapture(
        source=source,
        target=target_text,
        source_tokens=display_tokens(tokenizer, source_ids[0].tolist()),
        target_tokens=display_tokens(tokenizer, labels),
        decoder_input_tokens=display_tokens(tokenizer, decoder_inputs),
        encoder=stack(out.encoder_attentions),
        decoder=stack(out.decoder_attentions),
        cross=stack(out.cross_attentions),
        translated=target is None,
        notes=notes,
    )


# ----------------------------------------------------------------------------------------------------------
# Attention heat maps
# ----------------------------------------------------------------------------------------------------------


def select_map(attention: np.ndarray, layer: int | None, head: int | None) -> np.ndarray:
    """One ``[rows, cols]`` map from ``[L, H, rows, cols]``: a layer/head, or the mean where None."""
    layers, heads = attention.shape[:2]
    if layer is not None and not -layers <= layer < layers:
        raise ValueError(f"layer {layer} does not exist: this stack has {layers} layers (0 … {layers - 1})")
    if head is not None and not -heads <= head < heads:
        raise ValueError(f"head {head} does not exist: these layers have {heads} heads (0 … {heads - 1})")
    picked = attention.mean(axis=0) if layer is None else attention[layer]
    return picked.mean(axis=0) if head is None else picked[head]


def _map_name(layer: int | None, head: int | None) -> str:
    layer_text = "mean of layers" if layer is None else f"layer {layer}"
    head_text = "mean of heads" if head is None else f"head {head}"
    return f"{layer_text}, {head_text}"


def _colormap() -> Colormap:
    return matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")  # grey: hidden by the causal mask


def _masked(kind: str, matrix: np.ndarray) -> np.ndarray:
    if kind != "decoder":
        return matrix
    rows, cols = matrix.shape[-2:]
    hidden = np.triu(np.ones((rows, cols), dtype=bool), k=1)
    return np.ma.masked_array(matrix, mask=np.broadcast_to(hidden, matrix.shape))


def _axis_names(kind: str) -> tuple[str, str]:
    if kind == "encoder":
        return "source token (query)", "source token (key)"
    if kind == "decoder":
        return "target token produced (query)", "decoder input (key)"
    return "target token produced (query)", "source token (key)"


def _label_size(n: int, largest: float, budget: float) -> float:
    return max(4.0, min(largest, budget / max(n, 1)))


def _draw_map(ax, kind: str, matrix: np.ndarray, rows: list[str], cols: list[str], labels: str, size: float):
    image = ax.imshow(_masked(kind, matrix), cmap=_colormap(), vmin=0.0, vmax=1.0, aspect="auto",
                      interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if "x" in labels:
        ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=_label_size(len(cols), size, 20 * size))
    if "y" in labels:
        ax.set_yticks(range(len(rows)), rows, fontsize=_label_size(len(rows), size, 20 * size))
    return image


def plot_attention(
    capture: AttentionCapture,
    output_dir: str | os.PathLike[str],
    *,
    layer: int | None = None,
    head: int | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    kinds: Sequence[str] = KINDS,
    dpi: int = 100,
) -> list[Path]:
    """Heat maps of each attention kind (§3.2.3) as PNG files in ``output_dir``; returns their paths.

    Per kind: ``<kind>_attention.png``, one map (``layer``/``head``, or the mean where None) with every
    token labelled, and ``<kind>_attention_grid.png``, every layer × head plus the means. Only the first
    ``max_tokens`` source and target tokens are drawn; a warning says so when the sentence is longer.
    """
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"attention kind must be one of {KINDS}, got {kind!r}")
    for kind in kinds:  # check layer/head before drawing anything
        select_map(capture.matrices(kind)[0], layer, head)
    folder = prepare_output_dir(output_dir)
    view, note = capture.truncated(max_tokens)
    if note:
        warnings.warn(note, UserWarning, stacklevel=2)
    written = []
    for kind in kinds:
        attention, rows, cols = view.matrices(kind)
        written.append(_save(_focus_figure(view, kind, attention, rows, cols, layer, head), folder /
                             f"{FILE_STEMS[kind]}.png", dpi))
        written.append(_save(_grid_figure(view, kind, attention, rows, cols), folder /
                             f"{FILE_STEMS[kind]}_grid.png", dpi))
    return written


def _cut_suffix(capture: AttentionCapture) -> str:
    return " (first tokens only)" if any(n.startswith("the source has") for n in capture.notes) else ""


def _focus_figure(capture, kind, attention, rows, cols, layer, head) -> Figure:
    figure = Figure(figsize=FOCUS_INCHES, layout="constrained")
    ax = figure.add_subplot()
    image = _draw_map(ax, kind, select_map(attention, layer, head), rows, cols, "xy", 10.0)
    ylabel, xlabel = _axis_names(kind)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{TITLES[kind]}: {_map_name(layer, head)}{_cut_suffix(capture)}", fontsize=11)
    figure.colorbar(image, ax=ax, shrink=0.6, label="attention weight")
    return figure


def _grid_figure(capture, kind, attention, rows, cols) -> Figure:
    layers, heads = attention.shape[:2]
    figure = Figure(
        figsize=((heads + 1) * GRID_CELL_INCHES, (layers + 1) * GRID_CELL_INCHES + GRID_TITLE_INCHES),
        layout="constrained",
    )
    axes = figure.subplots(layers + 1, heads + 1, squeeze=False)
    label = max(len(rows), len(cols)) <= GRID_LABEL_LIMIT
    for i in range(layers + 1):
        for j in range(heads + 1):
            layer, head = (None if i == layers else i), (None if j == heads else j)
            which = ("y" if j == 0 else "") + ("x" if i == layers else "") if label else ""
            ax = axes[i, j]
            _draw_map(ax, kind, select_map(attention, layer, head), rows, cols, which, 6.0)
            ax.set_title(
                f"{'mean' if layer is None else f'L{layer}'} · {'mean' if head is None else f'H{head}'}",
                fontsize=8,
            )
    suffix = "" if label else f" (more than {GRID_LABEL_LIMIT} tokens: labels in the single map)"
    figure.suptitle(f"{TITLES[kind]}: layers × heads, last row/column = means{suffix}{_cut_suffix(capture)}",
                    fontsize=11)
    return figure


# ----------------------------------------------------------------------------------------------------------
# Self-contained HTML page
# ----------------------------------------------------------------------------------------------------------

_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font-family:sans-serif;margin:1.5em;color:#222}
label{margin-right:1em}
#value{font-family:monospace;margin:.5em 0;min-height:1.2em}
.notes{color:#8a4b00}
</style></head><body>
<h1>Attention: __TITLE__</h1>
<p><b>source:</b> __SOURCE__<br><b>target:</b> __TARGET__</p>
__NOTES__
<p>
<label>attention <select id="kind"></select></label>
<label>layer <select id="layer"></select></label>
<label>head <select id="head"></select></label>
</p>
<div id="value">hover over a cell</div>
<canvas id="map" width="900" height="900"></canvas>
<script id="attention-data" type="application/json">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("attention-data").textContent);
const kindSel = document.getElementById("kind"), layerSel = document.getElementById("layer"),
      headSel = document.getElementById("head"), canvas = document.getElementById("map"),
      ctx = canvas.getContext("2d"), valueBox = document.getElementById("value");
const VIRIDIS = [[68,1,84],[72,40,120],[62,74,137],[49,104,142],[38,130,142],[31,158,137],
                 [53,183,121],[109,205,89],[180,222,44],[253,231,37]];
function color(v) {
  if (v === null) return "rgb(217,217,217)";
  const x = Math.max(0, Math.min(1, v)) * (VIRIDIS.length - 1), i = Math.min(Math.floor(x), VIRIDIS.length - 2);
  const f = x - i, a = VIRIDIS[i], b = VIRIDIS[i + 1];
  return "rgb(" + [0, 1, 2].map(k => Math.round(a[k] + f * (b[k] - a[k]))).join(",") + ")";
}
function options(select, n, keep) {
  const old = select.value; select.innerHTML = "";
  for (let i = 0; i < n; i++) select.add(new Option(String(i), String(i)));
  select.add(new Option("mean", "mean"));
  select.value = keep && [...select.options].some(o => o.value === old) ? old : "mean";
}
function mapOf(k, layer, head) {
  const stack = DATA.kinds[k].attention, L = stack.length, H = stack[0].length;
  const layers = layer === "mean" ? [...Array(L).keys()] : [Number(layer)];
  const heads = head === "mean" ? [...Array(H).keys()] : [Number(head)];
  const rows = stack[0][0].length, cols = stack[0][0][0].length, out = [];
  for (let r = 0; r < rows; r++) {
    out.push([]);
    for (let c = 0; c < cols; c++) {
      let sum = 0, masked = false;
      for (const l of layers) for (const h of heads) {
        const v = stack[l][h][r][c]; if (v === null) masked = true; else sum += v;
      }
      out[r].push(masked ? null : sum / (layers.length * heads.length));
    }
  }
  return out;
}
let current = null;
function draw() {
  const k = kindSel.value, info = DATA.kinds[k], m = mapOf(k, layerSel.value, headSel.value);
  const rows = info.rows, cols = info.cols, left = 150, top = 150;
  const cell = Math.max(8, Math.min(40, Math.floor(700 / Math.max(rows.length, cols.length))));
  canvas.width = left + cols.length * cell + 20; canvas.height = top + rows.length * cell + 40;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.font = Math.min(14, cell - 2) + "px sans-serif"; ctx.fillStyle = "#222";
  ctx.textAlign = "right"; ctx.textBaseline = "middle";
  rows.forEach((t, r) => ctx.fillText(t, left - 6, top + r * cell + cell / 2));
  cols.forEach((t, c) => {
    ctx.save(); ctx.translate(left + c * cell + cell / 2, top - 6); ctx.rotate(-Math.PI / 2);
    ctx.textAlign = "left"; ctx.fillText(t, 0, 0); ctx.restore();
  });
  m.forEach((row, r) => row.forEach((v, c) => {
    ctx.fillStyle = color(v); ctx.fillRect(left + c * cell, top + r * cell, cell, cell);
  }));
  ctx.fillStyle = "#222"; ctx.textAlign = "left";
  ctx.fillText("rows: " + info.row_axis + "; columns: " + info.col_axis, 10, top + rows.length * cell + 20);
  current = {m, rows, cols, cell, left, top};
}
canvas.addEventListener("mousemove", e => {
  if (!current) return;
  const box = canvas.getBoundingClientRect();
  const c = Math.floor((e.clientX - box.left - current.left) / current.cell);
  const r = Math.floor((e.clientY - box.top - current.top) / current.cell);
  if (r < 0 || c < 0 || r >= current.rows.length || c >= current.cols.length) return;
  const v = current.m[r][c];
  valueBox.textContent = current.rows[r] + " \\u2192 " + current.cols[c] + ": " +
    (v === null ? "masked (future position)" : v.toFixed(3));
});
function changeKind() {
  const stack = DATA.kinds[kindSel.value].attention;
  options(layerSel, stack.length, true); options(headSel, stack[0].length, true); draw();
}
Object.entries(DATA.kinds).forEach(([k, info]) => kindSel.add(new Option(info.title, k)));
kindSel.addEventListener("change", changeKind);
layerSel.addEventListener("change", draw); headSel.addEventListener("change", draw);
changeKind();
</script></body></html>
"""


def attention_html(
    capture: AttentionCapture,
    path: str | os.PathLike[str],
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    decimals: int = 4,
) -> Path:
    """Write one self-contained HTML page where a reader picks the attention kind, layer and head (or means).

    The weights are embedded as JSON and drawn on a canvas by inline JavaScript: no external files or URLs,
    so the page works offline and can be attached or archived as is. Masked (future) decoder positions are
    stored as null and drawn grey.
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{os.fspath(target)!r} is a folder; give a file name such as attention.html")
    prepare_output_dir(target.parent)
    view, note = capture.truncated(max_tokens)
    if note:
        warnings.warn(note, UserWarning, stacklevel=2)
    kinds = {}
    for kind in KINDS:
        attention, rows, cols = view.matrices(kind)
        values = np.round(attention.astype(np.float64), decimals).tolist()
        if kind == "decoder":
            for layer in values:
                for head in layer:
                    for r, row in enumerate(head):
                        for c in range(r + 1, len(row)):
                            row[c] = None
        row_axis, col_axis = _axis_names(kind)
        kinds[kind] = {"title": TITLES[kind], "rows": rows, "cols": cols, "row_axis": row_axis,
                       "col_axis": col_axis, "attention": values}
    payload = json.dumps({"source": view.source, "target": view.target, "kinds": kinds}, ensure_ascii=False)
    payload = payload.replace("</", "<\\/")  # tokens such as </s> must not close the <script> element
    notes = "".join(f'<p class="notes">note: {html.escape(n)}</p>\n' for n in view.notes)
    page = (
        _HTML.replace("__TITLE__", html.escape(view.source[:80]))
        .replace("__SOURCE__", html.escape(view.source))
        .replace("__TARGET__", html.escape(view.target) + (" (model translation)" if view.translated else ""))
        .replace("__NOTES__", notes)
        .replace("__DATA__", payload)
    )
    try:
        target.write_text(page, encoding="utf-8")
    except OSError as err:
        raise type(err)(f"cannot write {os.fspath(target)!r}: {err.strerror or err}") from err
    return target


# ----------------------------------------------------------------------------------------------------------
# Positional encodings (§3.5)
# ----------------------------------------------------------------------------------------------------------


def plot_positions(
    output_dir: str | os.PathLike[str],
    *,
    length: int = 100,
    d_model: int = 512,
    layout: str = "interleaved",
    dpi: int = 100,
) -> list[Path]:
    """Draw the sinusoidal positional encoding (§3.5) and how similar position vectors are to each other.

    ``positional_encoding.png``: the matrix positions × dimensions, and a few dimensions as curves (each
    pair of dimensions is a sinusoid; wavelengths grow geometrically from 2π to 10000·2π).
    ``position_similarity.png``: cosine similarity of every pair of positions, and of one position with
    all others: it depends only on the distance, which is why relative positions are easy to attend by.
    """
    if isinstance(length, bool) or not isinstance(length, int) or not 2 <= length <= 10_000:
        raise ValueError(f"length must be an integer in 2 … 10000, got {length!r}")
    if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 2 or d_model % 2 or d_model > 8192:
        raise ValueError(f"d_model must be an even integer in 2 … 8192, got {d_model!r}")
    if layout not in SINUSOID_LAYOUTS:
        raise ValueError(f"layout must be one of {SINUSOID_LAYOUTS}, got {layout!r}")
    folder = prepare_output_dir(output_dir)
    encoding = sinusoidal_positional_encoding(torch.arange(length), d_model, layout).numpy()

    figure = Figure(figsize=(10.0, 6.0), layout="constrained")
    heat, curves = figure.subplots(1, 2, width_ratios=(3, 2))
    image = heat.imshow(encoding, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
    heat.set_xlabel("dimension")
    heat.set_ylabel("position")
    heat.set_title(f"PE(pos, ·), d_model = {d_model}, {layout}")
    figure.colorbar(image, ax=heat, shrink=0.8)
    half = d_model // 2
    for i in sorted({half // 16, half // 8, 3 * half // 16, half // 4}):
        dim = 2 * i if layout == "interleaved" else i
        curves.plot(np.arange(length), encoding[:, dim], label=f"dim {dim}: sin(pos / 10000^({2 * i}/{d_model}))")
    curves.set_xlabel("position")
    curves.set_ylim(-1.1, 1.6)
    curves.legend(fontsize=7, loc="upper right", ncols=1)
    curves.set_title("a few sine dimensions")
    figure.suptitle("Sinusoidal positional encoding (§3.5)")
    written = [_save(figure, folder / "positional_encoding.png", dpi)]

    unit = encoding / np.linalg.norm(encoding, axis=1, keepdims=True)
    similarity = unit @ unit.T
    figure = Figure(figsize=(12.0, 5.0), layout="constrained")
    matrix, line = figure.subplots(1, 2)
    image = matrix.imshow(similarity, cmap="viridis", aspect="auto", interpolation="nearest")
    matrix.set_xlabel("position")
    matrix.set_ylabel("position")
    matrix.set_title("cosine similarity of position vectors")
    figure.colorbar(image, ax=matrix, shrink=0.8)
    middle = length // 2
    line.plot(np.arange(length) - middle, similarity[middle])
    line.set_xlabel(f"offset from position {middle}")
    line.set_ylabel("cosine similarity")
    line.set_title(f"similarity of position {middle} to the others")
    figure.suptitle(f"Position vectors: similarity falls with distance (length {length}, d_model {d_model})")
    written.append(_save(figure, folder / "position_similarity.png", dpi))
    return written


# ----------------------------------------------------------------------------------------------------------
# One encoder layer step by step (§3.1-§3.3)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class EncoderLayerTrace:
    """Every intermediate of one encoder layer for one sentence, recomputed from the layer's own weights.

    ``x`` [S, d_model] is the layer input (embeddings + positions for layer 0); ``query``/``key``/``value``
    [heads, S, d_k]; ``scores`` = Q Kᵀ / sqrt(d_k) and ``weights`` = softmax(scores) [heads, S, S];
    ``heads`` = weights · V [heads, S, d_k]; ``concatenated`` [S, d_model]; ``attention_output`` = Concat ·
    W^O; ``after_attention`` = LayerNorm(x + attention) (Add & Norm); ``ffn_hidden`` = ReLU(· W1 + b1)
    [S, d_ff]; ``ffn_output``; ``output`` = LayerNorm(after_attention + ffn_output) (the layer's output).
    """

    tokens: list[str]
    layer: int
    x: np.ndarray
    query: np.ndarray
    key: np.ndarray
    value: np.ndarray
    scores: np.ndarray
    weights: np.ndarray
    heads: np.ndarray
    concatenated: np.ndarray
    attention_output: np.ndarray
    after_attention: np.ndarray
    ffn_hidden: np.ndarray
    ffn_output: np.ndarray
    output: np.ndarray
    layer_output: np.ndarray  # what the model's own forward produced, equal to ``output``


def trace_encoder_layer(model, tokenizer, source: str, layer: int = 0) -> EncoderLayerTrace:
    """Recompute encoder layer ``layer`` on ``source`` step by step from its modules (eval mode, no mask:
    one sentence has no padding) and record every intermediate; ``layer_output`` is the real forward's."""
    if not isinstance(source, str) or not source.strip():
        raise ValueError("the source sentence is empty")
    encoder = model.get_encoder()
    n_layers = len(encoder.layers)
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"encoder layer {layer} does not exist: the encoder has {n_layers} (0 … {n_layers - 1})")
    module = encoder.layers[layer]
    seen: dict[str, torch.Tensor] = {}

    def hook(_module, args, output):
        seen["x"], seen["out"] = args[0], output

    model.eval()
    encoded = tokenizer(source, return_tensors="pt")
    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            encoder(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
    finally:
        handle.remove()
    attn, add_norm = module.self_attn, module.self_attn_add_norm
    ffn, ffn_norm = module.feed_forward, module.feed_forward_add_norm
    with torch.no_grad():
        x = seen["x"]
        attn_in = add_norm.sublayer_input(x)
        q, k, v = (attn.split_heads(proj(attn_in)) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        scores = q @ k.transpose(-1, -2) * attn.scaling
        weights = scores.softmax(dim=-1)
        heads = weights @ v  # [1, heads, S, d_k]
        concatenated = heads.transpose(1, 2).reshape(*x.shape[:-1], -1)
        attention_output = attn.out_proj(concatenated)
        after_attention = add_norm(x, attention_output)
        hidden = ffn.activation(ffn.fc1(ffn_norm.sublayer_input(after_attention)))
        ffn_output = ffn.fc2(hidden)
        output = ffn_norm(after_attention, ffn_output)

    def arr(t: torch.Tensor) -> np.ndarray:
        return t[0].float().numpy()  # drop the batch dimension

    return EncoderLayerTrace(
        tokens=display_tokens(tokenizer, encoded["input_ids"][0].tolist()), layer=layer, x=arr(x),
        query=arr(q), key=arr(k), value=arr(v), scores=arr(scores), weights=arr(weights), heads=arr(heads),
        concatenated=arr(concatenated), attention_output=arr(attention_output),
        after_attention=arr(after_attention), ffn_hidden=arr(hidden), ffn_output=arr(ffn_output),
        output=arr(output), layer_output=arr(seen["out"]),
    )


def _matrix_panel(figure: Figure, ax, matrix: np.ndarray, title: str, tokens: list[str] | None,
                  xlabel: str, symmetric: bool = True, cmap: str = "RdBu_r") -> None:
    if symmetric:
        bound = float(np.abs(matrix).max()) or 1.0
        image = ax.imshow(matrix, cmap=cmap, vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
    else:
        image = ax.imshow(matrix, cmap=cmap, vmin=0, aspect="auto", interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    if tokens is not None and len(tokens) <= GRID_LABEL_LIMIT:
        size = _label_size(len(tokens), 7, 160)
        ax.set_yticks(range(len(tokens)), tokens, fontsize=size)
        if xlabel == "key":
            ax.set_xticks(range(len(tokens)), tokens, fontsize=size, rotation=90)
    figure.colorbar(image, ax=ax, shrink=0.7)


def plot_encoder_layer(
    trace: EncoderLayerTrace, output_dir: str | os.PathLike[str], *, head: int = 0, dpi: int = 100
) -> list[Path]:
    """Draw one encoder layer at work: ``attention_step_by_step.png`` (X → Q, K, V of one head → Q Kᵀ/√d_k
    → softmax → head output → concatenation of all heads → W^O, §3.2) and ``add_norm_feed_forward.png``
    (x, x + attention, LayerNorm, the ReLU feed-forward and the second Add & Norm, §3.1 and §3.3)."""
    n_heads = trace.query.shape[0]
    if not -n_heads <= head < n_heads:
        raise ValueError(f"head {head} does not exist: the layer has {n_heads} heads (0 … {n_heads - 1})")
    folder = prepare_output_dir(output_dir)
    tokens, d_k = trace.tokens, trace.query.shape[-1]
    figure = Figure(figsize=(16.0, 8.0), layout="constrained")
    axes = figure.subplots(2, 4)
    panels = [
        (trace.x, f"X: input of layer {trace.layer}", "d_model", True, "RdBu_r"),
        (trace.query[head], f"Q = X W^Q (head {head})", "d_k", True, "RdBu_r"),
        (trace.key[head], f"K = X W^K (head {head})", "d_k", True, "RdBu_r"),
        (trace.value[head], f"V = X W^V (head {head})", "d_k", True, "RdBu_r"),
        (trace.scores[head], f"Q Kᵀ / √d_k (d_k = {d_k})", "key", True, "RdBu_r"),
        (trace.weights[head], "softmax: attention weights", "key", False, "viridis"),
        (trace.concatenated, f"Concat(head 0 … {n_heads - 1}) = weights · V per head", "d_model", True, "RdBu_r"),
        (trace.attention_output, "Concat · W^O: multi-head output", "d_model", True, "RdBu_r"),
    ]
    for ax, (matrix, title, xlabel, symmetric, cmap) in zip(axes.flat, panels):
        _matrix_panel(figure, ax, matrix, title, tokens, xlabel, symmetric, cmap)
    for boundary in range(1, n_heads):
        axes[1, 2].axvline(boundary * d_k - 0.5, color="black", linewidth=0.8)
    figure.suptitle(f"Multi-head attention step by step (§3.2): encoder layer {trace.layer}, head {head}")
    written = [_save(figure, folder / "attention_step_by_step.png", dpi)]

    figure = Figure(figsize=(14.0, 4.5), layout="constrained")
    axes = figure.subplots(1, 5)
    zero_share = float((trace.ffn_hidden == 0).mean())
    panels = [
        (trace.x, "x: layer input", "d_model", True, "RdBu_r"),
        (trace.after_attention, "LayerNorm(x + MultiHead(x))", "d_model", True, "RdBu_r"),
        (trace.ffn_hidden, f"max(0, x W1 + b1): {zero_share:.0%} zeros", "d_ff", False, "magma"),
        (trace.ffn_output, "FFN(x) = max(0, x W1 + b1) W2 + b2", "d_model", True, "RdBu_r"),
        (trace.output, "LayerNorm(x + FFN(x)): layer output", "d_model", True, "RdBu_r"),
    ]
    for ax, (matrix, title, xlabel, symmetric, cmap) in zip(axes.flat, panels):
        _matrix_panel(figure, ax, matrix, title, tokens, xlabel, symmetric, cmap)
    figure.suptitle(f"Add & Norm and the position-wise feed-forward network (§3.1, §3.3): encoder layer {trace.layer}")
    written.append(_save(figure, folder / "add_norm_feed_forward.png", dpi))
    return written


__all__ = [
    "AttentionCapture",
    "EncoderLayerTrace",
    "KINDS",
    "attention_html",
    "capture_attention",
    "display_tokens",
    "plot_attention",
    "plot_encoder_layer",
    "plot_positions",
    "prepare_output_dir",
    "select_map",
    "trace_encoder_layer",
]
