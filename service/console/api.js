// The console's only way to the server: the public REST API (docs/protocol.md), with the
// token of this tab, if any, as a bearer token. The token lives in sessionStorage: it is gone
// when the tab closes and is never written to a cookie, so no other site can use it.

const TOKEN_KEY = "vision-console-token";

export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

function headers(extra = {}) {
  const all = { ...extra };
  const bearer = token();
  if (bearer) all.Authorization = `Bearer ${bearer}`;
  return all;
}

/** A refused or failed call: the HTTP status and a sentence a person can act on. */
export class ApiError extends Error {
  constructor(status, serverMessage) {
    super(explain(status, serverMessage));
    this.status = status;
    this.serverMessage = serverMessage;
  }
}

function explain(status, serverMessage) {
  const said = serverMessage ? `: ${serverMessage}` : "";
  if (status === 401) {
    const hint = token() ? "the access token was not accepted" : "this needs the access token";
    return `Refused (401 Unauthenticated), ${hint}; enter it in the Access token field${said}`;
  }
  if (status === 403) return `Refused (403 Permission denied)${said}`;
  if (status === 0) return serverMessage ? `Stopped: ${serverMessage}` : "The server did not answer (is it running?)";
  return `Failed (${status})${said}`;
}

async function errorOf(response) {
  let message = "";
  try {
    const body = await response.json();
    message = typeof body.error === "string" ? body.error : "";
  } catch {
    message = response.statusText;
  }
  return new ApiError(response.status, message);
}

/** ``method path`` with an optional JSON body; answers the parsed JSON. */
export async function call(method, path, json) {
  const init = { method, headers: headers(json === undefined ? {} : { "Content-Type": "application/json" }) };
  if (json !== undefined) init.body = JSON.stringify(json);
  let response;
  try {
    response = await fetch(path, { ...init, credentials: "omit", cache: "no-store" });
  } catch {
    throw new ApiError(0, "");
  }
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

/** A multipart upload with progress (fetch cannot report upload progress; XHR can). */
export function upload(path, formData, onProgress, signal) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    if (signal) signal.addEventListener("abort", () => request.abort(), { once: true });
    request.addEventListener("abort", () => reject(new ApiError(0, "the upload was cancelled")));
    request.open("POST", path);
    for (const [name, value] of Object.entries(headers())) request.setRequestHeader(name, value);
    request.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress(event.loaded, event.total);
    });
    request.addEventListener("load", () => {
      let body = {};
      try {
        body = JSON.parse(request.responseText);
      } catch {
        body = {};
      }
      if (request.status >= 200 && request.status < 300) resolve(body);
      else reject(new ApiError(request.status, typeof body.error === "string" ? body.error : request.statusText));
    });
    request.addEventListener("error", () => reject(new ApiError(0, "")));
    request.send(formData);
  });
}

/**
 * A stream of Server-Sent Events. EventSource cannot send an Authorization header, so this
 * reads the stream with fetch and splits it into events. ``onEvent(kind, data)`` for each;
 * resolves when the stream ends, rejects on a refusal. ``signal`` stops watching.
 */
export async function watch(path, onEvent, signal) {
  let response;
  try {
    response = await fetch(path, { headers: headers(), credentials: "omit", cache: "no-store", signal });
  } catch (error) {
    if (signal && signal.aborted) return;
    throw new ApiError(0, "");
  }
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (error) {
      if (signal && signal.aborted) return;
      throw error;
    }
    if (chunk.done) break;
    buffer += chunk.value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let kind = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) kind = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) onEvent(kind, JSON.parse(data.join("\n")));
    }
  }
}

/** protobuf's canonical JSON writes doubles as numbers or "NaN"/"Infinity" strings. */
export function num(value) {
  return value === undefined || value === null ? 0 : Number(value);
}

export const api = {
  models: () => call("GET", "/v1/models?without_labels=true"),
  model: (name) => call("GET", `/v1/models/${encodeURIComponent(name)}`),
  load: (name) => call("POST", `/v2/repository/models/${encodeURIComponent(name)}/load`, {}),
  unload: (name) => call("POST", `/v2/repository/models/${encodeURIComponent(name)}/unload`, {}),
  deleteModel: (name) => call("DELETE", `/v1/models/${encodeURIComponent(name)}`),
  rollback: (name, version) =>
    call("POST", `/v1/models/${encodeURIComponent(name)}/versions/${encodeURIComponent(version)}/rollback`, {}),
  infer: (name, body) => call("POST", `/v2/models/${encodeURIComponent(name)}/infer`, body),
  jobs: () => call("GET", "/v1/jobs"),
  job: (id) => call("GET", `/v1/jobs/${encodeURIComponent(id)}`),
  cancel: (id) => call("POST", `/v1/jobs/${encodeURIComponent(id)}/cancel`, {}),
  createJob: (formData, onProgress, signal) => upload("/v1/jobs", formData, onProgress, signal),
  watchJob: (id, onEvent, signal) => watch(`/v1/jobs/${encodeURIComponent(id)}/events`, onEvent, signal),
  throughput: () => call("GET", "/v1/throughput"),
};
