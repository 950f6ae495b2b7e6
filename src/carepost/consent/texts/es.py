"""Textos predeterminados en español. Lenguaje sencillo (164.508(c)(3))."""

_COMMON = {
    "phi_description": (
        "Su nombre, dirección de correo electrónico, idioma preferido, rango de edad y la información de salud que "
        "{organization} tiene sobre usted y que se necesita para elegir los mensajes que le interesan (por ejemplo, "
        "afecciones, medicamentos, citas y pruebas de detección)."
    ),
    "disclosers": (
        "{organization} y los proveedores de servicios que envían correo electrónico en su nombre bajo un acuerdo "
        "de socio comercial."
    ),
    "recipients": "{organization}. Su información no se vende ni se entrega a nadie más bajo esta autorización.",
    "expiration": (
        "Esta autorización vence en la fecha de vencimiento indicada abajo o, si no se indica ninguna, dos años "
        "después del día en que la firme."
    ),
    "right_to_revoke": (
        "Puede revocar esta autorización en cualquier momento, por escrito: use el enlace \"revocar\" de cualquier "
        "mensaje de {organization}, el formulario de revocación del enlace que figura en su copia de esta "
        "autorización, o escriba al responsable de privacidad de {organization}. La revocación tiene efecto de "
        "inmediato, salvo por lo ya realizado con base en esta autorización."
    ),
    "conditioning": (
        "{organization} no condicionará su tratamiento, el pago, la inscripción en un plan de salud ni su "
        "elegibilidad para beneficios a que usted firme esta autorización."
    ),
    "redisclosure": (
        "La información divulgada bajo esta autorización puede ser divulgada nuevamente por quien la recibe y es "
        "posible que ya no esté protegida por las normas federales de privacidad."
    ),
    "copy_statement": "Recibirá una copia de esta autorización después de firmarla.",
    "signature_statement": (
        "Firme con su nombre y la fecha. Si firma como representante personal del paciente, indique su nombre y "
        "su facultad para actuar en nombre del paciente (por ejemplo, padre, madre o tutor legal)."
    ),
}

TEXTS = {
    "marketing": {
        "title": "Autorización para recibir comunicaciones de mercadeo de {organization}",
        **_COMMON,
        "purpose_description": (
            "Enviarle correos electrónicos sobre productos y servicios de {organization} o de otros que puedan "
            "interesarle, elegidos a partir de su información de salud."
        ),
    },
    "marketing_remunerated": {
        "title": "Autorización para recibir comunicaciones de mercadeo patrocinadas de {organization}",
        **_COMMON,
        "purpose_description": (
            "Enviarle correos electrónicos sobre productos y servicios de terceros que puedan interesarle, elegidos "
            "a partir de su información de salud."
        ),
        "remuneration": (
            "{organization} recibe una remuneración económica (un pago) de los terceros cuyos productos o servicios "
            "se describen en estas comunicaciones."
        ),
    },
}
