"""Default authorization texts (45 CFR 164.508(c)) in English and Spanish.

A new organization gets one published version of each per purpose that needs an
authorization, for its compliance officer to review and adapt. ``{organization}`` is replaced
by the organization's name when the text is created.
"""

from __future__ import annotations

from carepost.consent.texts.en import TEXTS as EN
from carepost.consent.texts.es import TEXTS as ES

DEFAULT_TEXTS: dict[str, dict[str, dict[str, str]]] = {
    purpose: {"en": EN[purpose], "es": ES[purpose]} for purpose in EN
}

# Headings of each element when the text is rendered, per language.
HEADINGS: dict[str, dict[str, str]] = {
    "en": {
        "phi_description": "Information to be used or disclosed",
        "disclosers": "Who may use or disclose it",
        "recipients": "Who may receive it",
        "purpose_description": "Purpose",
        "remuneration": "Payment received",
        "expiration": "Expiration",
        "right_to_revoke": "Your right to revoke",
        "conditioning": "No conditions on your care",
        "redisclosure": "Re-disclosure",
        "copy_statement": "Your copy",
        "signature_statement": "Signature",
    },
    "es": {
        "phi_description": "Información que se usará o divulgará",
        "disclosers": "Quién puede usarla o divulgarla",
        "recipients": "Quién puede recibirla",
        "purpose_description": "Propósito",
        "remuneration": "Pago recibido",
        "expiration": "Vencimiento",
        "right_to_revoke": "Su derecho a revocar",
        "conditioning": "Su atención no depende de esta autorización",
        "redisclosure": "Nueva divulgación",
        "copy_statement": "Su copia",
        "signature_statement": "Firma",
    },
}
