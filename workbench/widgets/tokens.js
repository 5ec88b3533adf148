// Token sequences with a value per token: the one anywidget view behind TokenView and
// ActivationViewer (workbench/widgets/token_view.py, activation_viewer.py).
//
// Shipped inside the package and loaded from disk: no CDN, no network, no imports.
// Token text is arbitrary (code, markup, "<img src=x onerror=alert(1)>"), so every string
// from the kernel reaches the DOM through textContent or a plain attribute, never as HTML.
//
// Synced traits (see TokenSequences in token_view.py):
//   kind      "token_view" | "activation_viewer" | "feature_contexts" | "prompt_features"
//             (root class .wb-token-view, .wb-activation-viewer, ...)
//   title     one line of summary                 (.wb-summary)
//   error     a message shown instead of tokens   (.wb-error)
//   scale     {min, max, label, diverging}        (.wb-legend)
//   lines     [{label, marked, tokens: [{text, value, row?, info?: [section]}]}]
//   selected  {line, position} | null            (set by a click, or by the kernel)
//   detail    {line, position, sections}          (the kernel's extra detail for the selected token)
// section = {title, tokens?: bool, rows: [{label, value, neuron?}]}; a row with `neuron` is a
// link: clicking it sends {select_neuron: neuron} to the kernel (a neuron, or an SAE feature).

const WHITESPACE = { " ": "\u00b7", "\n": "\u23ce", "\t": "\u2192", "\r": "\u240d" };

// Whitespace made visible (code is mostly whitespace); an empty token shows as ∅.
function visible(text) {
  let out = "";
  for (const ch of String(text ?? "")) out += WHITESPACE[ch] ?? ch;
  return out === "" ? "\u2205" : out;
}

function node(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = String(text);
  return e;
}

function isNumber(v) {
  return typeof v === "number" && Number.isFinite(v);
}

function fmt(v) {
  if (!isNumber(v)) return "\u2014";
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e4 || a < 1e-3)) return v.toExponential(2);
  return v.toFixed(a >= 100 ? 0 : a >= 10 ? 1 : 3);
}

// Background colour of a value: white→red for a sequential scale (loss), blue←white→orange
// for a diverging one (activations, which can be negative). Built from numbers only.
function colour(v, scale) {
  if (!isNumber(v)) return "transparent";
  const lo = isNumber(scale.min) ? scale.min : 0;
  const hi = isNumber(scale.max) ? scale.max : 1;
  if (scale.diverging) {
    const m = Math.max(Math.abs(lo), Math.abs(hi)) || 1;
    const t = Math.max(-1, Math.min(1, v / m));
    return t >= 0 ? `rgba(255, 120, 0, ${(0.85 * t).toFixed(3)})` : `rgba(40, 110, 255, ${(-0.85 * t).toFixed(3)})`;
  }
  const t = Math.max(0, Math.min(1, (v - lo) / (hi - lo || 1)));
  return `rgba(230, 40, 40, ${(0.85 * t).toFixed(3)})`;
}

function legend(scale) {
  const box = node("div", "wb-legend");
  box.appendChild(node("span", "wb-legend-label", scale.label ?? "value"));
  const lo = isNumber(scale.min) ? scale.min : 0;
  const hi = isNumber(scale.max) ? scale.max : 1;
  box.appendChild(node("span", "wb-legend-min", fmt(lo)));
  const bar = node("span", "wb-legend-bar");
  const stops = [0, 0.25, 0.5, 0.75, 1].map((f) => colour(lo + f * (hi - lo), scale));
  bar.style.background = `linear-gradient(to right, ${stops.join(", ")})`;
  box.appendChild(bar);
  box.appendChild(node("span", "wb-legend-max", fmt(hi)));
  return box;
}

function render({ model, el }) {
  const root = node("div", "wb-tokens");
  el.appendChild(root);
  let hovered = null; // {line, position} under the pointer, shown in preference to the selection
  let panel = null;

  // One listener per event on the root, not three per token: a feature's contexts are
  // about a thousand tokens, redrawn on every switch.
  const whereOf = (target) => {
    const span = target instanceof Element ? target.closest(".wb-token") : null;
    const line = span && span.closest(".wb-line");
    return span && line && root.contains(line)
      ? { line: Number(line.dataset.line), position: Number(span.dataset.position) } : null;
  };
  root.addEventListener("mouseover", (event) => {
    const where = whereOf(event.target);
    if (where && (hovered?.line !== where.line || hovered?.position !== where.position)) { hovered = where; drawDetail(); }
  });
  root.addEventListener("mouseout", (event) => {
    if (!whereOf(event.target) || whereOf(event.relatedTarget)) return;
    hovered = null;
    drawDetail();
  });
  root.addEventListener("click", (event) => {
    const where = whereOf(event.target);
    if (!where) return;
    model.set("selected", where);
    model.save_changes();
  });

  const tokenAt = (where) => {
    const line = where && (model.get("lines") ?? [])[where.line];
    return line ? line.tokens[where.position] : undefined;
  };

  function section(sec) {
    const box = node("div", "wb-detail-section");
    box.appendChild(node("div", "wb-detail-title", sec.title ?? ""));
    const table = node("table", "wb-detail-rows");
    for (const row of sec.rows ?? []) {
      const tr = node("tr", "wb-detail-row");
      const label = node("td", "wb-detail-label", sec.tokens ? visible(row.label) : row.label ?? "");
      if (row.neuron !== undefined && row.neuron !== null) {
        label.classList.add("wb-action");
        label.dataset.neuron = String(row.neuron);
        label.addEventListener("click", () => model.send({ select_neuron: row.neuron }));
      }
      tr.appendChild(label);
      tr.appendChild(node("td", "wb-detail-value", fmt(row.value)));
      table.appendChild(tr);
    }
    box.appendChild(table);
    return box;
  }

  function drawDetail() {
    if (!panel) return;
    panel.replaceChildren();
    const where = hovered ?? model.get("selected");
    const token = tokenAt(where);
    if (!token) {
      panel.appendChild(node("div", "wb-hint", "Hover over a token for details; click it to pin them."));
      return;
    }
    const scale = model.get("scale") ?? {};
    const head = node("div", "wb-detail-head");
    head.appendChild(node("span", "wb-detail-text", visible(token.text)));
    let about = ` position ${where.position}`;
    if (isNumber(token.row)) about += ` \u00b7 row ${token.row}`;
    about += ` \u00b7 ${scale.label ?? "value"} ${fmt(token.value)}`;
    head.appendChild(node("span", "wb-detail-about", about));
    panel.appendChild(head);
    for (const sec of token.info ?? []) panel.appendChild(section(sec));
    const detail = model.get("detail");
    if (detail && detail.line === where.line && detail.position === where.position) {
      for (const sec of detail.sections ?? []) panel.appendChild(section(sec));
    }
  }

  function markSelected() {
    const sel = model.get("selected");
    for (const span of root.querySelectorAll(".wb-token.wb-selected")) span.classList.remove("wb-selected");
    if (sel) {
      const span = root.querySelector(`.wb-line[data-line="${Number(sel.line)}"] .wb-token[data-position="${Number(sel.position)}"]`);
      if (span) span.classList.add("wb-selected");
    }
    drawDetail();
  }

  function draw() {
    const kind = model.get("kind");
    // Root class from the kind: "feature_contexts" → .wb-feature-contexts. Lines of text (the
    // token view, a prompt) wrap at newlines; contexts are one scrolling line each.
    root.className = "wb-tokens wb-" + String(kind).replace(/_/g, "-");
    const asText = kind === "token_view" || kind === "prompt_features";
    root.replaceChildren();
    hovered = null;
    const scale = model.get("scale") ?? {};
    root.appendChild(node("div", "wb-summary", model.get("title") ?? ""));
    const error = model.get("error");
    if (error) root.appendChild(node("div", "wb-error", error));
    root.appendChild(legend(scale));
    const lines = node("div", "wb-lines");
    (model.get("lines") ?? []).forEach((line, li) => {
      const div = node("div", asText ? "wb-line" : "wb-line wb-context");
      div.dataset.line = String(li);
      if (line.label) div.appendChild(node("span", "wb-line-label", line.label));
      line.tokens.forEach((token, pos) => {
        const span = node("span", "wb-token", visible(token.text));
        span.dataset.position = String(pos);
        if (isNumber(token.row)) span.dataset.row = String(token.row);
        if (pos === line.marked) span.classList.add("wb-marked");
        span.style.backgroundColor = colour(token.value, scale);
        span.title = `${visible(token.text)}  ${fmt(token.value)}`;
        div.appendChild(span);
        // The token view reads like the code it shows: a new line after a newline token.
        if (asText && String(token.text).includes("\n")) div.appendChild(node("br"));
      });
      lines.appendChild(div);
    });
    root.appendChild(lines);
    panel = node("div", "wb-token-detail");
    root.appendChild(panel);
    markSelected();
  }

  // One message from the kernel often changes several of these traits at once (title,
  // scale and lines of a new feature): draw once, after all of them are set.
  let pending = false;
  const schedule = () => {
    if (pending) return;
    pending = true;
    queueMicrotask(() => { pending = false; draw(); });
  };
  const redraw = ["kind", "title", "error", "scale", "lines"];
  for (const name of redraw) model.on(`change:${name}`, schedule);
  model.on("change:selected", markSelected);
  model.on("change:detail", drawDetail);
  draw();
  return () => {
    for (const name of redraw) model.off(`change:${name}`, schedule);
    model.off("change:selected", markSelected);
    model.off("change:detail", drawDetail);
  };
}

export default { render };
