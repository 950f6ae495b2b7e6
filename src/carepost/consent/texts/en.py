"""English default texts. Plain language (164.508(c)(3))."""

_COMMON = {
    "phi_description": (
        "Your name, email address, preferred language, age range and the health information {organization} "
        "holds about you that is needed to choose which messages are relevant to you (for example, conditions, "
        "medications, appointments and screenings)."
    ),
    "disclosers": "{organization} and the service providers that send email on its behalf under a business associate agreement.",
    "recipients": "{organization}. Your information is not sold or given to anyone else under this authorization.",
    "expiration": (
        "This authorization ends on the expiration date shown below, or, if none is shown, two years after the "
        "day you sign it."
    ),
    "right_to_revoke": (
        "You may revoke this authorization at any time, in writing: use the \"revoke\" link in any message from "
        "{organization}, the revocation form at the link in your copy of this authorization, or write to "
        "{organization}'s privacy officer. Revocation takes effect at once, except for actions already taken in "
        "reliance on this authorization."
    ),
    "conditioning": (
        "{organization} will not condition your treatment, payment, enrollment in a health plan or eligibility "
        "for benefits on whether you sign this authorization."
    ),
    "redisclosure": (
        "Information disclosed under this authorization may be re-disclosed by the recipient and may no longer "
        "be protected by federal privacy rules."
    ),
    "copy_statement": "You will receive a copy of this authorization after you sign it.",
    "signature_statement": (
        "Sign with your name and the date. If you sign as the personal representative of the patient, state "
        "your name and your authority to act for the patient (for example, parent or legal guardian)."
    ),
}

TEXTS = {
    "marketing": {
        "title": "Authorization to receive marketing communications from {organization}",
        **_COMMON,
        "purpose_description": (
            "To send you email about products and services offered by {organization} or others that may interest "
            "you, chosen using your health information."
        ),
    },
    "marketing_remunerated": {
        "title": "Authorization to receive sponsored marketing communications from {organization}",
        **_COMMON,
        "purpose_description": (
            "To send you email about products and services of third parties that may interest you, chosen using "
            "your health information."
        ),
        "remuneration": (
            "{organization} receives financial remuneration (payment) from the third parties whose products or "
            "services are described in these communications."
        ),
    },
}
