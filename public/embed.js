// UVM Compute embed: add <script src="https://YOUR-SERVER/embed.js" async></script> to any page.
//
// It places a small card where the tag is (or in the element named by data-target) with an
// opt-in button; everything runs inside an iframe served by the UVM Compute server, so the
// host page shares no cookies, storage or workers with it. Attributes on the tag:
//   data-target="#some-id"  put the card inside that element instead of after the tag
//   data-height="330"       the iframe's height before its page reports its own
(function () {
  const script = document.currentScript;
  if (!script) return;
  const origin = new URL(script.src, location.href).origin;
  const frame = document.createElement("iframe");
  frame.src = `${origin}/?embed=1`;
  frame.title = "UVM Compute: lend this tab to research";
  frame.loading = "lazy";
  frame.setAttribute("allow", "");
  frame.style.cssText =
    "display:block;width:100%;max-width:560px;border:0;background:transparent;color-scheme:light;" +
    `height:${parseInt(script.dataset.height || "330", 10)}px`;
  addEventListener("message", (event) => {
    if (event.source === frame.contentWindow && event.origin === origin && event.data?.type === "uvm-height") {
      frame.style.height = `${Math.min(800, Math.max(120, Number(event.data.height) || 0))}px`;
    }
  });
  const target = script.dataset.target && document.querySelector(script.dataset.target);
  if (target) target.appendChild(frame);
  else script.insertAdjacentElement("afterend", frame);
})();
