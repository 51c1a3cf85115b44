// Keyboard shortcuts for reviewers: an element with data-shortcut="KEY" is clicked (or focused,
// for a text field) when KEY is pressed outside a text field; Ctrl+Enter (Cmd+Enter) submits the
// form being edited (else the page's main form, data-main). Everything works without this script.
"use strict";
document.addEventListener("keydown", function (event) {
  var target = event.target;
  var typing = target && (target.tagName === "TEXTAREA" || (target.tagName === "INPUT" && target.type !== "radio" && target.type !== "checkbox"));
  if ((event.ctrlKey || event.metaKey) && event.key === "Enter") {
    var form = (target && target.form) || document.querySelector("form[data-main]");
    if (form) { event.preventDefault(); form.requestSubmit(); }
    return;
  }
  if (typing || event.ctrlKey || event.metaKey || event.altKey) { return; }
  var key = event.key === "=" ? "+" : event.key;
  var found = document.querySelector('[data-shortcut="' + CSS.escape(key) + '"]');
  if (!found) { return; }
  event.preventDefault();
  if (found.tagName === "TEXTAREA" || (found.tagName === "INPUT" && found.type === "text")) { found.focus(); }
  else { found.click(); }
});
