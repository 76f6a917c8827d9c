/*
 * aigc-bot chat widget. Embed with one tag:
 *
 *   <script src="https://bot.example.com/widget.js" data-title="Help" defer></script>
 *
 * Optional attributes: data-greeting (first bubble, shown locally), data-api
 * (API base URL; default: where this script came from), data-accent (a CSS
 * colour), data-position ("right" or "left"), data-open ("true": start open).
 *
 * The widget lives in a shadow root, so the host page's CSS and ours never mix.
 * Bot text is only ever set with textContent: nothing from the server is
 * parsed as HTML. Plain JS, no build step.
 *
 * Besides the answers to what the visitor sends, it listens on
 * GET /api/events for replies pushed later (a person from the team answering,
 * an answer that arrives after a restart) and shows them as they come.
 * Answers from the shop's help centre (FAQ) carry a small label saying so.
 */
(function () {
  "use strict";
  if (window.AigcBotWidget) return;

  var script =
    document.currentScript ||
    Array.prototype.slice
      .call(document.querySelectorAll("script[src]"))
      .filter(function (s) { return /\/widget\.js(\?|#|$)/.test(s.src); })
      .pop();
  var attrs = (script && script.dataset) || {};
  var scriptUrl = new URL(script ? script.src : "/widget.js", location.href);
  var base = (attrs.api || scriptUrl.href.replace(/\/widget\.js([?#].*)?$/, "")).replace(/\/+$/, "");
  var title = attrs.title || "Chat";
  var greeting = attrs.greeting || "Hi! How can I help you today?";
  var storeKey = "aigc-bot-widget:" + base;

  // -- small helpers --------------------------------------------------------------

  function el(tag, props, children) {
    var node = document.createElement(tag);
    Object.keys(props || {}).forEach(function (key) {
      if (key === "text") node.textContent = props[key];
      else if (key === "class") node.className = props[key];
      else if (key.indexOf("aria-") === 0 || key.indexOf("data-") === 0 || key === "role")
        node.setAttribute(key, props[key]);
      else node[key] = props[key];
    });
    (children || []).forEach(function (child) { node.appendChild(child); });
    return node;
  }

  function svg(path) {
    var ns = "http://www.w3.org/2000/svg";
    var icon = document.createElementNS(ns, "svg");
    icon.setAttribute("viewBox", "0 0 24 24");
    icon.setAttribute("aria-hidden", "true");
    icon.setAttribute("focusable", "false");
    var shape = document.createElementNS(ns, "path");
    shape.setAttribute("d", path);
    icon.appendChild(shape);
    return icon;
  }

  function storageGet(area, key) {
    try { return window[area].getItem(storeKey + ":" + key); } catch (e) { return null; }
  }
  function storageSet(area, key, value) {
    try {
      if (value === null) window[area].removeItem(storeKey + ":" + key);
      else window[area].setItem(storeKey + ":" + key, value);
    } catch (e) { /* storage disabled: the chat still works for this page view */ }
  }

  function mediaUrl(url) {
    try {
      var absolute = /^[a-z][a-z0-9+.-]*:/i.test(url);
      var resolved = new URL(absolute ? url : base + (url.charAt(0) === "/" ? "" : "/") + url);
      return /^https?:$/.test(resolved.protocol) ? resolved.href : null;
    } catch (e) { return null; }
  }

  function HttpError(status, message, retryAfter) {
    this.status = status;
    this.message = message;
    this.retryAfter = retryAfter;
  }

  function readableError(error) {
    if (!(error instanceof HttpError)) {
      return "I can't reach the chat service. Check your connection and try again.";
    }
    var text = error.message;
    if (error.retryAfter && !/\d\s*s\b/.test(text)) {
      text += " Please try again in " + error.retryAfter + " s.";
    }
    return text;
  }

  async function errorFrom(response) {
    var retry = parseInt(response.headers.get("Retry-After") || "", 10) || null;
    var message = null;
    try { message = (await response.json()).error; } catch (e) { /* not JSON */ }
    if (!message) message = "The chat service had a problem (HTTP " + response.status + "). Please try again.";
    return new HttpError(response.status, message, retry);
  }

  // -- the API ---------------------------------------------------------------------

  var session = storageGet("localStorage", "session");
  var creating = null;

  function ensureSession() {
    if (session) return Promise.resolve(session);
    if (!creating) {
      creating = fetch(base + "/api/sessions", { method: "POST", headers: { Accept: "application/json" } })
        .then(async function (response) {
          if (response.status !== 201) throw await errorFrom(response);
          session = (await response.json()).session;
          storageSet("localStorage", "session", session);
          return session;
        })
        .finally(function () { creating = null; });
    }
    return creating;
  }

  function dropSession(token) {
    if (session === token) {
      session = null;
      storageSet("localStorage", "session", null);
    }
  }

  function postMessage(token, text) {
    return fetch(base + "/api/messages", {
      method: "POST",
      headers: {
        Authorization: "Bearer " + token,
        "Content-Type": "application/json",
        Accept: "text/event-stream, application/json",
      },
      body: JSON.stringify({ text: text }),
    });
  }

  async function readEvents(response, onEvent) {
    var reader = response.body.getReader();
    var decoder = new TextDecoder();
    var buffer = "";
    var ended = false;
    for (;;) {
      var chunk = await reader.read();
      if (chunk.done) break;
      buffer += decoder.decode(chunk.value, { stream: true }).replace(/\r\n?/g, "\n");
      var cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        var block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        var name = "message";
        var data = [];
        block.split("\n").forEach(function (line) {
          if (!line || line.charAt(0) === ":") return;
          var colon = line.indexOf(":");
          var field = colon < 0 ? line : line.slice(0, colon);
          var value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") name = value;
          else if (field === "data") data.push(value);
        });
        if (!data.length) continue;
        if (name === "done") ended = true;
        onEvent(name, JSON.parse(data.join("\n")));
      }
    }
    return ended;
  }

  // -- the DOM -----------------------------------------------------------------------

  var host = el("div", { id: "aigc-bot-widget" });
  host.setAttribute("data-position", attrs.position === "left" ? "left" : "right");
  if (attrs.accent) host.style.setProperty("--aigc-accent", attrs.accent);
  var root = host.attachShadow ? host.attachShadow({ mode: "open" }) : host;

  var frame = el("div", { class: "frame", hidden: true });
  var stylesheet = el("link", { rel: "stylesheet", href: base + "/widget.css" });
  stylesheet.addEventListener("load", function () { frame.hidden = false; });
  stylesheet.addEventListener("error", function () { frame.hidden = false; });

  var bubble = el(
    "button",
    { type: "button", class: "bubble", "aria-label": "Open chat: " + title, "aria-expanded": "false",
      "aria-controls": "aigc-panel", "aria-haspopup": "dialog" },
    [svg("M4 4h16a2 2 0 0 1 2 2v10a2 2 0 0 1-2 2H9l-5 4v-4a2 2 0 0 1-2-2V6a2 2 0 0 1 2-2z")]
  );
  var closeButton = el(
    "button",
    { type: "button", class: "close", "aria-label": "Close chat" },
    [svg("M6 6l12 12M18 6L6 18")]
  );
  var heading = el("h2", { id: "aigc-title", text: title });
  var messages = el("ol", {
    class: "messages", role: "log", "aria-live": "polite", "aria-relevant": "additions", "aria-label": "Messages",
  });
  var typingLabel = el("span", { class: "sr-only", text: title + " is typing…" });
  var typing = el("div", { class: "typing", role: "status", hidden: true }, [
    el("span", { class: "dots", "aria-hidden": "true" }, [el("i"), el("i"), el("i")]),
    typingLabel,
  ]);
  var log = el("div", { class: "log", role: "region", tabIndex: 0, "aria-label": "Conversation" }, [
    messages,
    typing,
  ]);
  var input = el("textarea", {
    rows: 1, placeholder: "Type a message…", "aria-label": "Message", "aria-describedby": "aigc-hint",
    autocomplete: "off",
  });
  var sendButton = el("button", { type: "submit", class: "send", "aria-label": "Send message" },
    [svg("M3 20l18-8L3 4v6l12 2-12 2z")]);
  var form = el("form", { class: "composer" }, [input, sendButton]);
  var hint = el("p", { id: "aigc-hint", class: "hint", text: "Enter sends · Shift+Enter adds a line" });
  var panel = el(
    "section",
    { id: "aigc-panel", class: "panel", role: "dialog", "aria-labelledby": "aigc-title", hidden: true },
    [el("header", {}, [heading, closeButton]), log, form, hint]
  );
  frame.appendChild(panel);
  frame.appendChild(bubble);
  root.appendChild(stylesheet);
  root.appendChild(frame);

  // -- rendering -----------------------------------------------------------------------

  function nearBottom() {
    return log.scrollHeight - log.scrollTop - log.clientHeight < 80;
  }
  function scrollDown(force) {
    if (force || nearBottom()) log.scrollTop = log.scrollHeight;
  }

  function speaker(kind, meta) {
    if (kind === "user") return "You: ";
    if (kind === "bot") return title + ": ";
    if (kind === "operator") return ((meta && meta.author) || "Our team") + ": ";
    return "";
  }

  function addMessage(kind, text, extraClass, meta) {
    var stick = nearBottom();
    var children = [el("span", { class: "sr-only", text: speaker(kind, meta) })];
    if (kind === "operator") {
      children.push(el("div", { class: "who", "aria-hidden": "true", text: (meta && meta.author) || "Our team" }));
    }
    children.push(el("div", { class: "text", text: text }));
    var source = meta && meta.source;
    if (kind === "bot" && source && source.kind === "faq") {
      children.push(el("div", { class: "source", text: "From our help centre" }));
    }
    var item = el("li", { class: "msg " + kind + (extraClass ? " " + extraClass : "") }, children);
    messages.appendChild(item);
    scrollDown(stick);
    return item;
  }

  function kindOf(entry) {
    return entry.role === "user" ? "user" : entry.role === "operator" ? "operator" : "bot";
  }

  function setText(item, text) {
    var stick = nearBottom();
    item.querySelector(".text").textContent = text;
    scrollDown(stick);
  }

  function addImage(reply) {
    var url = mediaUrl(reply.url || "");
    if (!url) return;
    var caption = reply.caption || "";
    var label = caption ? caption : "A picture";
    if (reply.seed !== undefined && reply.seed !== null) label += " (seed " + reply.seed + ")";
    var image = el("img", { alt: caption || "Generated picture", loading: "lazy", decoding: "async" });
    image.addEventListener("load", function () { scrollDown(false); });
    image.src = url;
    var link = el("a", { href: url, target: "_blank", rel: "noopener noreferrer" }, [image]);
    var item = el("li", { class: "msg bot image" }, [
      el("figure", {}, [link, el("figcaption", { text: label })]),
    ]);
    var stick = nearBottom();
    messages.appendChild(item);
    scrollDown(stick);
  }

  var pending = 0;
  function setTyping(on) {
    pending += on ? 1 : -1;
    typing.hidden = pending <= 0;
    if (!typing.hidden) scrollDown(false);
  }

  var loaded = false;
  async function loadHistory() {
    if (loaded) return;
    loaded = true;
    addMessage("bot", greeting, "greeting");
    var token = session;
    if (!token) return;
    try {
      var response = await fetch(base + "/api/messages", {
        headers: { Authorization: "Bearer " + token, Accept: "application/json" },
      });
      if (response.status === 401) return dropSession(token);
      if (!response.ok) throw await errorFrom(response);
      var history = (await response.json()).messages || [];
      history.forEach(function (entry) {
        if (entry.type === "image" || entry.url) addImage(entry);
        else addMessage(kindOf(entry), entry.text || "", "history", entry);
        seen(entry.at);
      });
      scrollDown(true);
      listen();
    } catch (error) {
      addMessage("error", "Your earlier messages couldn't be loaded. " + readableError(error));
    }
  }

  // -- replies pushed later (GET /api/events) -------------------------------------------

  var newest = "";
  function seen(at) {
    if (at && at > newest) newest = at;
  }

  function showPushed(name, data) {
    if (name === "image") addImage(data);
    else if (name === "message" && data.kind) addMessage("notice", data.text || "");
    else if (name === "message") addMessage(kindOf(data), data.text || "", "pushed", data);
    seen(data.at);
  }

  // What was pushed while the stream was down is in the history: show what is newer.
  async function catchUp(token) {
    var response = await fetch(base + "/api/messages", {
      headers: { Authorization: "Bearer " + token, Accept: "application/json" },
    });
    if (!response.ok) return;
    ((await response.json()).messages || []).forEach(function (entry) {
      if (entry.role !== "user" && entry.at > newest) showPushed("message", entry);
    });
  }

  var listening = false;
  async function listen() {
    if (listening || !session) return;
    listening = true;
    var pause = 1000;
    var first = true;
    while (session) {
      var token = session;
      try {
        var response = await fetch(base + "/api/events", {
          headers: { Authorization: "Bearer " + token, Accept: "text/event-stream" },
        });
        if (response.status === 401) { dropSession(token); break; }
        if (!response.ok || !response.body) throw new Error("HTTP " + response.status);
        if (!first) await catchUp(token);
        first = false;
        pause = 1000;
        await readEvents(response, showPushed);
      } catch (error) { /* offline or restarting: try again below */ }
      first = false;
      await new Promise(function (resolve) { setTimeout(resolve, pause); });
      pause = Math.min(pause * 2, 30000);
    }
    listening = false;
  }

  // -- sending ---------------------------------------------------------------------------

  function Turn() {
    this.bubble = null;
    this.progress = {};
  }
  Turn.prototype.handle = function (name, data) {
    if (name === "partial") {
      if (!this.bubble) {
        this.bubble = addMessage("bot", "", "streaming");
        this.bubble.setAttribute("aria-busy", "true");
      }
      setText(this.bubble, data.text);
    } else if (name === "text") {
      if (this.bubble) {
        this.bubble.remove();
        this.bubble = null;
      }
      addMessage("bot", data.text, null, data);
    } else if (name === "image") {
      addImage(data);
    } else if (name === "notice") {
      addMessage("notice", data.text);
    } else if (name === "progress") {
      var ref = data.ref || "progress";
      if (this.progress[ref]) setText(this.progress[ref], data.text);
      else this.progress[ref] = addMessage("notice", data.text, "progress");
    } else if (name === "error") {
      addMessage("error", readableError(new HttpError(data.status, data.error, data.retry_after)));
    } else if (name === "done") {
      this.finish();
    }
  };
  Turn.prototype.finish = function () {
    var progress = this.progress;
    Object.keys(progress).forEach(function (ref) { progress[ref].remove(); });
    this.progress = {};
    if (this.bubble) {
      this.bubble.classList.remove("streaming");
      this.bubble.removeAttribute("aria-busy");
      this.bubble = null;
    }
  };

  async function send(text) {
    var mine = addMessage("user", text);
    scrollDown(true);
    setTyping(true);
    var turn = new Turn();
    try {
      var token = await ensureSession();
      listen();
      var response = await postMessage(token, text);
      if (response.status === 401) {
        dropSession(token);
        response = await postMessage(await ensureSession(), text);
      }
      if (!response.ok) throw await errorFrom(response);
      var type = response.headers.get("Content-Type") || "";
      if (type.indexOf("text/event-stream") === 0 && response.body) {
        var complete = await readEvents(response, function (name, data) { turn.handle(name, data); });
        if (!complete) {
          addMessage("error", "The connection was lost before the reply finished. Reopen the chat in a moment to see it.");
        }
      } else {
        ((await response.json()).replies || []).forEach(function (reply) { turn.handle(reply.type, reply); });
      }
    } catch (error) {
      if (error instanceof HttpError && [400, 413, 429].indexOf(error.status) >= 0) {
        mine.classList.add("failed");
        mine.appendChild(el("span", { class: "status", text: "Not sent" }));
        if (!input.value) input.value = text;
      }
      addMessage("error", readableError(error));
    } finally {
      turn.finish();
      setTyping(false);
    }
  }

  function submit() {
    var text = input.value.trim();
    if (!text) return;
    input.value = "";
    autosize();
    send(text);
  }

  function autosize() {
    input.style.height = "auto";
    input.style.height = Math.min(input.scrollHeight, 128) + "px";
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    submit();
    input.focus();
  });
  input.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submit();
    }
  });
  input.addEventListener("input", autosize);

  // -- opening and closing -----------------------------------------------------------------

  function open(focus) {
    panel.hidden = false;
    host.setAttribute("data-open", "true");
    bubble.setAttribute("aria-expanded", "true");
    bubble.setAttribute("aria-label", "Close chat: " + title);
    storageSet("sessionStorage", "open", "1");
    loadHistory();
    scrollDown(true);
    if (focus !== false) input.focus();
  }

  function close() {
    panel.hidden = true;
    host.removeAttribute("data-open");
    bubble.setAttribute("aria-expanded", "false");
    bubble.setAttribute("aria-label", "Open chat: " + title);
    storageSet("sessionStorage", "open", null);
    bubble.focus();
  }

  bubble.addEventListener("click", function () { (panel.hidden ? open : close)(); });
  closeButton.addEventListener("click", close);
  panel.addEventListener("keydown", function (event) {
    if (event.key === "Escape") {
      event.preventDefault();
      close();
    }
  });

  function mount() {
    document.body.appendChild(host);
    if (attrs.open === "true" || storageGet("sessionStorage", "open")) open(false);
  }
  if (document.body) mount();
  else document.addEventListener("DOMContentLoaded", mount);

  window.AigcBotWidget = {
    open: function () { open(true); },
    close: close,
    version: "1",
  };
})();
