// Related features of the feature shown in the FeatureBrowser (feature_browser.py): its
// nearest features by decoder cosine, most correlated and most co-occurring. One view for
// all three lists, so a feature switch sends one message instead of one per button.
//
// Shipped inside the package and loaded from disk: no CDN, no network, no imports. Only
// numbers and the kernel's fixed titles are shown, and all of it through textContent.
//
// Synced trait:
//   groups  [{title, items: [[feature, value]]}]
// Clicking a feature sends {select_neuron: feature} to the kernel (as tokens.js's links do).

function node(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = String(text);
  return e;
}

function render({ model, el }) {
  const root = node("div", "wb-related");
  el.appendChild(root);

  function draw() {
    root.replaceChildren();
    for (const group of model.get("groups") ?? []) {
      const box = node("div", "wb-related-group");
      box.appendChild(node("div", "wb-panel-title", group.title ?? ""));
      const row = node("div", "wb-related-items");
      for (const [feature, value] of group.items ?? []) {
        const f = Number(feature);
        const button = node("button", "wb-related-button jupyter-button",
                            `${f} (${Number.isFinite(value) ? value.toFixed(2) : "\u2014"})`);
        button.dataset.feature = String(f);
        button.title = `go to feature ${f}`;
        button.addEventListener("click", () => model.send({ select_neuron: f }));
        row.appendChild(button);
      }
      if (!(group.items ?? []).length) row.appendChild(node("span", "wb-hint", "none"));
      box.appendChild(row);
      root.appendChild(box);
    }
  }

  model.on("change:groups", draw);
  draw();
  return () => model.off("change:groups", draw);
}

export default { render };
