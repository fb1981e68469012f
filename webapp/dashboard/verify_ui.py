"""The new-job form's verification fieldset in the page (``#verify`` of ``public/dashboard.html``).

Reads the fields, checks them as they are typed (``verify.parse``: the API's rules), marks the field
to fix and says why, and explains the chosen setting and its cost in one line. Runs only in the
browser; the rules and words are in ``verify`` (pure, tested in CPython).
"""

from __future__ import annotations

from pyscript import document

from . import verify

INPUTS = {  # form field -> element id
    "replication": "verify-k",
    "quorum": "verify-quorum",
    "max_replicas": "verify-max",
    "rtol": "verify-rtol",
    "atol": "verify-atol",
}


def _el(element_id: str):
    return document.getElementById(element_id)


def mode() -> str:
    checked = document.querySelector('input[name="verify-mode"]:checked')
    return str(checked.value) if checked is not None else verify.ADAPTIVE


def fields() -> dict[str, str]:
    out = {name: str(_el(element_id).value) for name, element_id in INPUTS.items()}
    out["mode"] = mode()
    return out


def show_error(message: str | None, field: str | None = None) -> None:
    """Say what to fix (``None``: all is well) and mark that field; the others are unmarked."""
    for name, element_id in INPUTS.items():
        if name == field and message:
            _el(element_id).setAttribute("aria-invalid", "true")
        else:
            _el(element_id).removeAttribute("aria-invalid")
    box = _el("verify-error")
    box.textContent = (message[:1].upper() + message[1:] + ("" if message.endswith(".") else ".")) if message else ""
    box.hidden = not message


def read() -> dict:
    """The settings to send; raises ``verify.VerifyError`` (shown, and its field marked) if one is wrong."""
    try:
        chosen = verify.parse(fields())
    except verify.VerifyError as exc:
        show_error(str(exc), exc.field)
        raise
    show_error(None)
    return chosen


def check(_event=None) -> None:
    """As the researcher types: quorum only for a fixed replication; the explanation; any error."""
    _el("verify-quorum").disabled = mode() == verify.ADAPTIVE
    try:
        chosen = read()
    except verify.VerifyError:
        chosen = None
    if chosen is not None:
        _el("verify-explain").textContent = verify.explain(chosen)


def preset(default: object) -> None:
    """Once per page: preselect the server's default (``UVM_DEFAULT_REPLICATION``) and label it."""
    box = _el("verify")
    if box.getAttribute("data-preset") == "1":  # an unset dataset key is undefined: AttributeError here
        return
    box.setAttribute("data-preset", "1")
    fixed = isinstance(default, int) and not isinstance(default, bool)
    if fixed:
        _el("verify-k").value = str(default)
    for radio in document.querySelectorAll('input[name="verify-mode"]'):
        radio.checked = str(radio.value) == ("fixed" if fixed else verify.ADAPTIVE)
    for chip in document.querySelectorAll("#verify [data-default]"):
        chip.hidden = str(chip.dataset.default) != ("fixed" if fixed else verify.ADAPTIVE)
    check()


def bind(on) -> None:  # noqa: ANN001 -- main's ``_on(element, name, handler)``
    """Check the fields on every change; typing in k picks the fixed choice."""
    for radio in document.querySelectorAll('input[name="verify-mode"]'):
        on(radio, "change", check)
    on(_el("verify-k"), "focus", _pick_fixed)
    for element_id in INPUTS.values():
        on(_el(element_id), "input", check)


def _pick_fixed(_event=None) -> None:
    document.querySelector('input[name="verify-mode"][value="fixed"]').checked = True
    check()
