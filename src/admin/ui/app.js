// keygate's panel: sends the forms marked data-api-* to the admin API (as
// JSON, with the session's CSRF token), shows a new key once in a dialog,
// and asks before a revoke or a removal. A new key lives only in the
// dialog: closing it empties and reloads the page.
"use strict";

(function () {
  const csrf = document.querySelector('meta[name="csrf"]')?.content || "";
  const message = document.getElementById("message");

  function say(text) {
    if (message) message.textContent = text;
  }

  async function call(method, path, body) {
    const init = { method, headers: { "X-CSRF-Token": csrf }, credentials: "same-origin", cache: "no-store" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (e) {
      say("The gateway did not answer: " + e.message);
      return null;
    }
    let answer = {};
    try {
      answer = await response.json();
    } catch (e) {
      answer = {};
    }
    if (response.status === 401) {
      window.location.assign("/ui/login");
      return null;
    }
    if (!response.ok && !answer.key) {
      say(answer.error || "Failed with status " + response.status);
      return null;
    }
    if (!response.ok && answer.error) say(answer.error);
    return answer;
  }

  // The new-key dialog: the key is written as text, never as HTML.
  const keyDialog = document.getElementById("key-dialog");
  const keyOut = document.getElementById("new-key");
  function showKey(key) {
    keyOut.textContent = key;
    keyDialog.showModal();
    document.getElementById("copy-key").focus();
  }
  if (keyDialog) {
    document.getElementById("copy-key").addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(keyOut.textContent);
        say("Copied.");
      } catch (e) {
        const range = document.createRange();
        range.selectNodeContents(keyOut);
        const selection = window.getSelection();
        selection.removeAllRanges();
        selection.addRange(range);
        say("Select and copy the key (Ctrl+C).");
      }
    });
    document.getElementById("close-key").addEventListener("click", () => keyDialog.close());
    // Closed by the button or by Escape: the key goes, the list comes back.
    keyDialog.addEventListener("close", () => {
      keyOut.textContent = "";
      window.getSelection()?.removeAllRanges();
      window.location.replace(window.location.href);
    });
  }

  // Confirmation before anything irreversible.
  const confirmDialog = document.getElementById("confirm-dialog");
  let confirmed = null;
  function ask(text, then) {
    document.getElementById("confirm-text").textContent = text;
    confirmed = then;
    confirmDialog.showModal();
    document.getElementById("confirm-no").focus();
  }
  if (confirmDialog) {
    document.getElementById("confirm-yes").addEventListener("click", async () => {
      const then = confirmed;
      confirmed = null;
      confirmDialog.close();
      if (then) await then();
    });
    document.getElementById("confirm-no").addEventListener("click", () => confirmDialog.close());
  }

  // Forms: fields to JSON; empty optional fields left out; data-list
  // fields split on commas; data-path fields go into the path.
  for (const form of document.querySelectorAll("form[data-api-method]")) {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      say("");
      let path = form.dataset.apiPath;
      const body = {};
      for (const field of form.elements) {
        if (!field.name) continue;
        const value = field.value.trim();
        if (field.dataset.path) {
          path = path.replace("{" + field.name + "}", encodeURIComponent(value));
        } else if (field.dataset.list) {
          const list = value.split(",").map((s) => s.trim()).filter((s) => s);
          if (list.length) body[field.name] = list;
        } else if (value !== "") {
          body[field.name] = field.type === "password" ? field.value : value;
        }
      }
      const answer = await call(form.dataset.apiMethod, path, body);
      for (const field of form.querySelectorAll('input[type="password"]')) field.value = "";
      if (!answer) return;
      if (answer.key) {
        form.reset();
        showKey(answer.key);
      } else {
        window.location.replace(window.location.href);
      }
    });
  }

  document.addEventListener("click", async (event) => {
    const button = event.target.closest("button");
    if (!button) return;
    if (button.dataset.revoke) {
      const id = button.dataset.revoke;
      ask("Revoke " + button.dataset.label + "? Every call with it is refused at once (401).", async () => {
        const answer = await call("DELETE", "/ui/api/keys/" + encodeURIComponent(id));
        if (!answer) return;
        button.closest("tr")?.remove();
        say("Revoked " + button.dataset.label + ".");
      });
    } else if (button.dataset.roll) {
      const id = button.dataset.roll;
      ask("Roll " + button.dataset.label + "? A new key with the same name, scopes and rate is shown once; the old one is refused at once.", async () => {
        const answer = await call("POST", "/ui/api/keys/" + encodeURIComponent(id) + "/roll", {});
        if (answer && answer.key) showKey(answer.key);
      });
    } else if (button.dataset.remove) {
      const path = button.dataset.remove;
      ask("Remove " + button.dataset.label + "?", async () => {
        const answer = await call("DELETE", path);
        if (!answer) return;
        button.closest("tr")?.remove();
        say("Removed " + button.dataset.label + ".");
      });
    }
  });
})();
