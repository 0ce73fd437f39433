// Building the page from data. Everything a user or the server supplies goes in as text
// (text nodes, textContent, attribute values): nothing here parses HTML. And every such string
// goes in isolated (``bdi``: its own direction, ``unicode-bidi: isolate``), so that a
// right-to-left label keeps its reading order and nothing in it can reorder the sentence or
// the table around it.

/** An element with attributes (strings, or booleans for presence) and children (nodes or text). */
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === false || value === null || value === undefined) continue;
    if (name === "class") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  append(node, ...children);
  return node;
}

/** An SVG element (charts). */
export function svg(tag, attributes = {}, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value !== null && value !== undefined) node.setAttribute(name, String(value));
  }
  append(node, ...children);
  return node;
}

export function append(node, ...children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function clear(node) {
  node.replaceChildren();
  return node;
}

export function byId(id) {
  const node = document.getElementById(id);
  if (!node) throw new Error(`no element #${id}`);
  return node;
}

/** A string from the server or the user, isolated from the text around it (dir="auto"). */
export function bdi(text) {
  return el("bdi", {}, text === null || text === undefined ? "" : String(text));
}

/** Sets a status line: ``content`` is text, or a list of text and nodes (``bdi`` for what the
 * server or the user said); ``kind`` is "info", "ok" or "error" (a class for the colour). */
export function say(node, content, kind = "info") {
  clear(node);
  append(node, content);
  node.dataset.kind = kind;
}

/** An error for a status line: the server's own words (an ApiError's ``serverMessage``) isolated
 * inside the console's sentence. */
export function errorParts(error) {
  const message = String(error && error.message !== undefined ? error.message : error);
  const said = error && typeof error.serverMessage === "string" ? error.serverMessage : "";
  const at = said ? message.lastIndexOf(said) : -1;
  if (at < 0) return [message];
  return [message.slice(0, at), bdi(said), message.slice(at + said.length)];
}

/** ``digits`` decimals; a value too small to show that way (a loss of 1.2e-7) in exponent form. */
export function formatNumber(value, digits = 3) {
  if (value === null || value === undefined || Number.isNaN(Number(value))) return "–";
  const number = Number(value);
  if (number !== 0 && Math.abs(number) < 10 ** -digits) return number.toExponential(1);
  return number.toFixed(digits);
}

/** A probability or score with 3 significant digits in at most 7 characters: "0.912", "0.0123",
 * and below 0.01 in exponent form ("1.23e-3", "2.40e-7") rather than a run of zeros. */
export function formatScore(value) {
  const score = Number(value);
  if (!Number.isFinite(score)) return "–";
  if (score === 0) return "0";
  if (Math.abs(score) >= 0.01) return score.toPrecision(3);
  return score.toExponential(2);
}

export function formatTime(unixSeconds) {
  const seconds = Number(unixSeconds);
  if (!seconds) return "–";
  return new Date(seconds * 1000).toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

export function formatDuration(seconds) {
  const s = Number(seconds);
  if (!Number.isFinite(s) || s <= 0) return "–";
  if (s < 60) return `${s.toFixed(1)} s`;
  const minutes = Math.floor(s / 60);
  return `${minutes} min ${Math.round(s - minutes * 60)} s`;
}

/** A labelled form field: the label names the input by its id. */
export function field(labelText, input, hint) {
  const hintNode = hint ? el("small", { id: `${input.id}-hint` }, hint) : null;
  if (hintNode) input.setAttribute("aria-describedby", hintNode.id);
  return el("div", { class: "field" }, el("label", { for: input.id }, labelText), input, hintNode);
}

/** Wires ``zone`` as a drop zone for files: dropped files go to ``onFiles``; Enter or Space on
 * it (it is focusable) opens ``picker``, the file input it stands for. */
export function dropZone(zone, picker, onFiles) {
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    onFiles(event.dataTransfer.files);
  });
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      picker.click();
    }
  });
}
