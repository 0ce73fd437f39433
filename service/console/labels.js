// The rule for class names, as the server applies it (vision_client/protocol/labels.py: one line
// of visible text, at most --max-label-length bytes of UTF-8). Its parameters are not restated
// here: the server writes them into the page (<html data-label-rule>) when its HTTP port starts,
// so the console refuses what the server would refuse, before anything is uploaded.

function readRule() {
  try {
    const rule = JSON.parse(document.documentElement.dataset.labelRule || "null");
    if (rule && Number.isFinite(rule.maxBytes) && Array.isArray(rule.refusedCategories)) return rule;
  } catch {
    // a page served without the server's rule: only empty names are refused here
  }
  return null;
}

const rule = readRule();
const categories = rule
  ? rule.refusedCategories.map((category) => ({ category, test: new RegExp(`^\\p{${category}}$`, "u") }))
  : [];
const allowed = new Set(rule ? rule.allowedCharacters : []);
const encoder = new TextEncoder();

/** The rule's limit on a class name's UTF-8 length, or null when the page has no rule. */
export function maxLabelBytes() {
  return rule ? rule.maxBytes : null;
}

function refusedCategory(char) {
  if (allowed.has(char)) return null;
  const found = categories.find(({ test }) => test.test(char));
  return found ? found.category : null;
}

/** "U+XXXX": a character named so that it cannot be misread (or reorder the sentence). */
export function codePoint(char) {
  return `U+${char.codePointAt(0).toString(16).toUpperCase().padStart(4, "0")}`;
}

/** What is wrong with ``name`` as a class name, as the end of a sentence ("... has U+XXXX at
 * position 3, ..."), with how to fix it; null when the server would take it. */
export function labelProblem(name) {
  if (!name) return "is empty; give every class a name";
  if (rule) {
    const size = encoder.encode(name).length;
    if (size > rule.maxBytes) return `is ${size} bytes of UTF-8, over the limit of ${rule.maxBytes}; use a shorter class name`;
  }
  let position = 0;
  for (const char of name) {
    const category = refusedCategory(char);
    if (category) {
      const what = (rule.categoryNames && rule.categoryNames[category]) || `a character of category ${category}`;
      return `has ${codePoint(char)} at position ${position}, ${what}; class names are one line of visible text (letters of any script, digits, punctuation, symbols, spaces): remove it`;
    }
    position += 1;
  }
  return null;
}

/** ``name`` with every refused character written as ⟨U+XXXX⟩, so that a refusal can show the
 * name as it is without the character acting on the page; long names are cut. */
export function visibleName(name, limit = 80) {
  let shown = "";
  let count = 0;
  for (const char of name) {
    if (count === limit) return `${shown}… (${[...name].length} characters)`;
    shown += refusedCategory(char) ? `⟨${codePoint(char)}⟩` : char;
    count += 1;
  }
  return shown;
}
