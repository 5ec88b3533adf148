// A sparse feature circuit as a layered SVG graph: the anywidget view of CircuitViewer
// (workbench/widgets/circuit_viewer.py). Shipped in the package: no CDN, no network.
//
// Synced trait `graph` (circuit_graph in circuit_viewer.py):
//   {rows: [module], width (in node units), column_centres, per_position, tokens: [str], summary,
//    nodes: [{id, x, row, position, rank, kind: "feature"|"error", label, effect, info: [str], more?}],
//    edges: [{source, target, weight}], max_effect, max_weight}
// Rows run bottom (first module) to top (last), as in Marks et al. 2024. Every string from the
// kernel (token text, labels) is set with textContent: markup in a token stays text.
// A click on a feature node sends {select: node id} to the kernel.

const SVG = "http://www.w3.org/2000/svg";
const BLUE = "#0072B2", VERMILLION = "#D55E00", GREY = "#7f7f7f"; // Okabe–Ito
const WHITESPACE = { " ": "\u00b7", "\n": "\u23ce", "\t": "\u2192" };

function el(tag, attrs, cls) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (cls) e.setAttribute("class", cls);
  return e;
}

function div(cls, text) {
  const e = document.createElement("div");
  e.className = cls;
  if (text !== undefined) e.textContent = String(text);
  return e;
}

function visible(text) {
  let out = "";
  for (const ch of String(text ?? "")) out += WHITESPACE[ch] ?? ch;
  return out || "\u2205";
}

function num(v, fallback) {
  return typeof v === "number" && Number.isFinite(v) ? v : fallback;
}

function draw(root, model) {
  const g = model.get("graph") || {};
  const rows = g.rows || [], nodes = g.nodes || [], edges = g.edges || [];
  root.replaceChildren();
  root.appendChild(div("wb-circuit-summary", g.summary || ""));
  const unit = 34, cellH = 62, left = 64, bottom = g.per_position ? 34 : 12, top = 14;
  const width = left + Math.max(1, num(g.width, 1)) * unit + 12, height = top + rows.length * cellH + bottom;
  const svg = el("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img" }, "wb-circuit-svg");
  const yOf = (row) => top + (rows.length - 1 - row) * cellH + cellH / 2;
  const xOf = (n) => left + num(n.x, 0) * unit;
  // Module rows and their labels; position labels (tokens) along the bottom.
  rows.forEach((name, row) => {
    const y = yOf(row);
    svg.appendChild(el("line", { x1: left, x2: width - 8, y1: y, y2: y, stroke: "#ddd", "stroke-width": 0.6 }));
    const label = el("text", { x: 6, y: y + 4, "font-size": 11 }, "wb-circuit-row");
    label.textContent = name;
    svg.appendChild(label);
  });
  const centres = g.column_centres || [];
  (g.tokens || []).forEach((token, p) => {
    const t = el("text", { x: left + num(centres[p], p) * unit, y: height - 10, "text-anchor": "middle", "font-size": 11 },
      "wb-circuit-token");
    t.textContent = visible(token);
    svg.appendChild(t);
  });
  const centre = new Map(nodes.map((n) => [n.id, [xOf(n), yOf(n.row)]]));
  const maxW = num(g.max_weight, 1) || 1, maxE = num(g.max_effect, 1) || 1;
  const edgeLayer = el("g"), nodeLayer = el("g");
  svg.append(edgeLayer, nodeLayer);
  for (const e of edges) {
    const a = centre.get(e.source), b = centre.get(e.target);
    if (!a || !b) continue;
    const w = num(e.weight, 0);
    const line = el("line", { x1: a[0], y1: a[1], x2: b[0], y2: b[1], stroke: w > 0 ? BLUE : VERMILLION,
      "stroke-width": (0.4 + 4 * Math.abs(w) / maxW).toFixed(2), "stroke-opacity": 0.45 }, "wb-circuit-edge");
    line.dataset.source = e.source;
    line.dataset.target = e.target;
    edgeLayer.appendChild(line);
  }
  const tooltip = div("wb-circuit-tooltip");
  tooltip.style.display = "none";
  for (const n of nodes) {
    const [x, y] = centre.get(n.id);
    const share = Math.abs(num(n.effect, 0)) / maxE;
    const r = 4 + 12 * Math.sqrt(share); // < unit / 2: neighbours never overlap
    const fill = num(n.effect, 0) > 0 ? BLUE : VERMILLION;
    const group = el("g", { transform: `translate(${x.toFixed(1)},${y.toFixed(1)})` }, "wb-circuit-node");
    group.dataset.node = n.id;
    group.dataset.kind = n.kind;
    const shape = n.kind === "error"
      ? el("rect", { x: -r, y: -r, width: 2 * r, height: 2 * r, fill, "fill-opacity": 0.25 + 0.75 * share,
        stroke: GREY, "stroke-dasharray": "3 2", "stroke-width": 1.2 })
      : el("circle", { r, fill, "fill-opacity": 0.25 + 0.75 * share, stroke: "#222", "stroke-width": 0.6 });
    const text = el("text", { "text-anchor": "middle", y: 3.5, "font-size": 9 });
    text.textContent = n.label;
    group.append(shape, text);
    if (n.more) {
      const more = el("text", { x: r + 3, y: -r, "font-size": 8, fill: GREY });
      more.textContent = `+${n.more}`;
      group.appendChild(more);
    }
    group.addEventListener("mouseenter", () => {
      tooltip.replaceChildren(div("wb-circuit-tooltip-title",
        `${n.kind === "error" ? "error node of" : "feature " + n.label + " of"} ${rows[n.row] ?? ""}` +
        (n.position === null || n.position === undefined ? "" : ` at position ${n.position}`)),
        div("", `effect ${num(n.effect, 0).toFixed(4)}`), ...(n.info || []).map((line) => div("", line)));
      tooltip.style.left = `${x + 14}px`;
      tooltip.style.top = `${y + 18}px`;
      tooltip.style.display = "block";
      for (const line of edgeLayer.children) {
        const touches = line.dataset.source === n.id || line.dataset.target === n.id;
        line.setAttribute("stroke-opacity", touches ? 0.9 : 0.12);
      }
    });
    group.addEventListener("mouseleave", () => {
      tooltip.style.display = "none";
      for (const line of edgeLayer.children) line.setAttribute("stroke-opacity", 0.45);
    });
    if (n.kind === "feature") {
      group.style.cursor = "pointer";
      group.addEventListener("click", () => model.send({ select: n.id }));
    }
    nodeLayer.appendChild(group);
  }
  const frame = div("wb-circuit-frame");
  frame.append(svg, tooltip);
  root.appendChild(frame);
  if (!nodes.length) root.appendChild(div("wb-circuit-empty", "no node above the threshold: lower it"));
}

function render({ model, el: host }) {
  const root = div("wb-circuit");
  host.appendChild(root);
  const redraw = () => draw(root, model);
  model.on("change:graph", redraw);
  redraw();
  return () => model.off("change:graph", redraw);
}

export default { render };
